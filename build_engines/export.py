"""ONNX export of the eager modules: `BankUNet` (bank as explicit I/O) and `VaeEncoder` / `VaeDecoder`.

The exported graphs are traced from the same modules the eager backend runs, so there is one copy of the
algorithm. Shapes are static (one graph per resolution and UNet batch). We use the dynamo exporter: it traces
with fake tensors, so an fp16 graph exports in seconds even on a CPU with no fp16 arithmetic (DESIGN.md §7).
"""

from __future__ import annotations

import logging
import warnings

import onnx
import torch
from torch import nn

from streamv2v_trt.bank_unet import BankUNet
from streamv2v_trt.engine.manifest import VAE_IO, TensorEntry
from streamv2v_trt.layout import BankLayout, TensorSpec
from streamv2v_trt.models import Models
from streamv2v_trt.vae import VaeDecoder, VaeEncoder

from .config import BuildConfig

log = logging.getLogger(__name__)

OPSET = 18  # widely supported by TensorRT, TensorRT-RTX and ONNX Runtime parsers
_ONNX_DTYPES = {
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.BOOL: "bool",
}


def exporter_name() -> str:
    return f"torch {torch.__version__} dynamo, opset {OPSET}"


def text_shape(models: Models) -> tuple[int, int]:
    """(tokens, dim) of the prompt embeddings the UNet cross-attends to."""
    cfg = models.text_encoder.config
    return int(cfg.max_position_embeddings), int(models.unet.config.cross_attention_dim)


def unet_specs(layout: BankLayout, cfg: BuildConfig, models: Models) -> list[TensorSpec]:
    return layout.tensor_specs(cfg.unet_batch, cfg.latent_hw, *text_shape(models))


def unet_example_inputs(
    specs: list[TensorSpec], dtype: torch.dtype, *, bank_valid: float = 1.0, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random inputs for every UNet input spec (timesteps int64 in [0, 1000)); also what parity tests feed."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for s in specs:
        if s.role not in ("input", "bank"):
            continue
        if s.name == "timestep":
            out[s.name] = torch.randint(0, 1000, s.shape, generator=gen, dtype=torch.int64)
        elif s.name == "bank_valid":
            out[s.name] = torch.full(s.shape, bank_valid, dtype=dtype)
        else:
            out[s.name] = torch.randn(s.shape, generator=gen).to(dtype)
    return out


def export_module(
    module: nn.Module, inputs: dict[str, torch.Tensor], input_names: list[str], output_names: list[str]
) -> onnx.ModelProto:
    """Trace `module(*inputs in input_names order)` into an ONNX model with exactly these I/O names."""
    args = tuple(inputs[n] for n in input_names)
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)  # "torchvision is not installed" per vision op: none are used here
    try:
        return _export(module, args, input_names, output_names)
    finally:
        registration.setLevel(level)


def _export(module: nn.Module, args: tuple, input_names: list[str], output_names: list[str]) -> onnx.ModelProto:
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # The exporter warns per op about fp16 clamp minimums and missing torchvision ops; neither applies here.
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            input_names=input_names,
            output_names=output_names,
            opset_version=OPSET,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    model = program.model_proto
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    if got_in != input_names or got_out != output_names:
        raise RuntimeError(
            f"exported ONNX I/O names differ from the contract: inputs {got_in} (expected {input_names}), "
            f"outputs {got_out} (expected {output_names})"
        )
    return model


def export_unet(models: Models, cfg: BuildConfig) -> tuple[onnx.ModelProto, BankLayout, list[TensorSpec]]:
    """The bank-I/O UNet at cfg's resolution and batch (= steps), in the models' dtype."""
    module = BankUNet(models.unet, cfg.bank, cfg.latent_hw).eval()
    specs = unet_specs(module.layout, cfg, models)
    inputs = unet_example_inputs(specs, next(models.unet.parameters()).dtype, seed=cfg.seed)
    model = export_module(module, inputs, module.layout.input_names(), module.layout.output_names())
    return model, module.layout, specs


def vae_specs(which: str, cfg: BuildConfig) -> list[TensorSpec]:
    h, w = cfg.latent_hw
    images, latents = (1, 3, cfg.height, cfg.width), (1, 4, h, w)  # the pipeline encodes/decodes one frame
    (inp,), (out,) = VAE_IO[which]
    shapes = {"images": images, "latents": latents}
    return [TensorSpec(inp, shapes[inp], "input"), TensorSpec(out, shapes[out], "output")]


def export_vae(models: Models, cfg: BuildConfig, which: str) -> tuple[onnx.ModelProto, list[TensorSpec]]:
    """`which` is "vae_encoder" (images -> latents) or "vae_decoder" (latents -> images)."""
    module = (VaeEncoder if which == "vae_encoder" else VaeDecoder)(models.vae).eval()
    specs = vae_specs(which, cfg)
    dtype = next(models.vae.parameters()).dtype
    gen = torch.Generator().manual_seed(cfg.seed)
    inputs = {specs[0].name: (torch.rand(specs[0].shape, generator=gen) * 2 - 1).to(dtype)}
    return export_module(module, inputs, [specs[0].name], [specs[1].name]), specs


def tensor_entries(model: onnx.ModelProto, specs: list[TensorSpec]) -> tuple[TensorEntry, ...]:
    """Manifest entries from the graph's own I/O, checked against the layout: names, order and shapes must match."""
    graph_io = [*model.graph.input, *model.graph.output]
    if [v.name for v in graph_io] != [s.name for s in specs]:
        raise RuntimeError(f"ONNX I/O {[v.name for v in graph_io]} differs from the layout {[s.name for s in specs]}")
    entries = []
    for v, s in zip(graph_io, specs):
        t = v.type.tensor_type
        shape = tuple(d.dim_value for d in t.shape.dim)
        if shape != tuple(s.shape):
            raise RuntimeError(f"ONNX tensor {v.name} has shape {shape}, the layout says {s.shape} (static shapes)")
        entries.append(TensorEntry(v.name, shape, _ONNX_DTYPES[t.elem_type], s.role, s.layer))
    return tuple(entries)
