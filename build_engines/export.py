"""ONNX export of the eager modules: `BankUNet` (bank as explicit I/O), `VaeEncoder` / `VaeDecoder`, and one
`ControlNet` per ControlNet of the spec.

The exported graphs are traced from the same modules the eager backend runs, so there is one copy of the
algorithm. Shapes are static (one graph per resolution and UNet batch), or, for a build with dynamic shapes
(`--shapes dynamic`), symbolic in every dimension that differs between the build's frame sizes (`dynamic_dims`):
height, width and the bank's token counts, which the exporter relates to each other. We use the dynamo exporter:
it traces with fake tensors, so an fp16 graph exports in seconds even on a CPU with no fp16 arithmetic
(docs/BUILD.md).
"""

from __future__ import annotations

import logging
import warnings

import onnx
import torch
from torch import nn

from streamv2v_trt.bank_unet import BankUNet
from streamv2v_trt.control_net import ControlNet
from streamv2v_trt.layout import DTYPES, TensorSpec, controlnet_network
from streamv2v_trt.models.loader import Models
from streamv2v_trt.prompt import text_shape
from streamv2v_trt.spec import EngineSpec
from streamv2v_trt.vae import VaeDecoder, VaeEncoder

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


def network_modules(
    models: Models, spec: EngineSpec, controlnets: list | None = None
) -> tuple[dict[str, nn.Module], dict[str, list[TensorSpec]]]:
    """The modules to export (the very ones the eager backend runs) and their I/O contract: the three, and with
    `controlnets` (`spec.controlnets` loaded, models/controlnets.py) one `ControlNet` network each."""
    controlnets = controlnets or []
    if len(controlnets) != len(spec.controlnets):
        raise ValueError(f"the spec names {len(spec.controlnets)} ControlNet(s), {len(controlnets)} were given")
    unet = BankUNet(models.unet, spec).eval()
    modules = {"unet": unet, "vae_encoder": VaeEncoder(models.vae).eval(), "vae_decoder": VaeDecoder(models.vae).eval()}
    modules |= {controlnet_network(j): ControlNet(c).eval() for j, c in enumerate(controlnets)}
    return modules, unet.layout.network_specs(spec, text_shape(models.tokenizer, models.text_encoder))


def example_inputs(specs: list[TensorSpec], *, bank_valid: float = 1.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs for every input spec (timesteps int64 in [0, 1000), images in [-1, 1]); also what parity
    tests feed."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for s in specs:
        if not s.is_input:
            continue
        dtype = DTYPES[s.dtype]
        if s.name == "timestep":
            out[s.name] = torch.randint(0, 1000, s.shape, generator=gen, dtype=torch.int64)
        elif s.name == "bank_valid":
            out[s.name] = torch.full(s.shape, bank_valid, dtype=dtype)
        elif s.name == "images":
            out[s.name] = (torch.rand(s.shape, generator=gen) * 2 - 1).to(dtype)
        elif s.name in ("controlnet_cond", "conditioning_scale"):  # a control image in [0, 1], a scale in [0, 1)
            out[s.name] = torch.rand(s.shape, generator=gen).to(dtype)
        else:
            out[s.name] = torch.randn(s.shape, generator=gen).to(dtype)
    return out


Dims = dict[str, dict[int, object]]  # input name -> {dimension: torch.export.Dim}


def export_module(
    module: nn.Module, inputs: dict[str, torch.Tensor], input_names: list[str], output_names: list[str],
    dynamic: Dims | None = None,
) -> onnx.ModelProto:  # fmt: skip
    """Trace `module(*inputs in input_names order)` into an ONNX model with exactly these I/O names; `dynamic`:
    the input dimensions to export symbolic."""
    args = tuple(inputs[n] for n in input_names)
    shapes = None
    if dynamic:
        from torch.export import ShapesCollection

        collection = ShapesCollection()  # by tensor: whatever the module's signature (BankUNet takes *tensors)
        for name, dims in dynamic.items():
            collection[inputs[name]] = dims
        shapes = collection.dynamic_shapes(module, args)
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)  # "torchvision is not installed" per vision op: none are used here
    try:
        return _export(module, args, input_names, output_names, shapes)
    finally:
        registration.setLevel(level)


def _export(
    module: nn.Module, args: tuple, input_names: list[str], output_names: list[str], dynamic_shapes=None
) -> onnx.ModelProto:
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
            dynamic_shapes=dynamic_shapes,
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


def export_network(
    module: nn.Module, specs: list[TensorSpec], seed: int = 0, dynamic: Dims | None = None
) -> onnx.ModelProto:
    """Trace one network at the shapes of `specs` (symbolic in `dynamic`'s dimensions, `dynamic_dims`); the
    exported I/O names are checked against `specs`."""
    inputs = example_inputs(specs, seed=seed)
    names_in = [s.name for s in specs if s.is_input]
    names_out = [s.name for s in specs if not s.is_input]
    return export_module(module, inputs, names_in, names_out, dynamic)


def varying_dims(specs_by_size: list[list[TensorSpec]]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> the dimensions whose length differs between the sizes' specs (one network's, one per size)."""
    shapes = [{s.name: s.shape for s in specs} for specs in specs_by_size]
    return {
        name: tuple(i for i in range(len(shape)) if len({sh[name][i] for sh in shapes}) > 1)
        for name, shape in shapes[0].items()
    }


def dynamic_dims(specs_by_size: list[list[TensorSpec]]) -> Dims:
    """The export's dynamic dimensions for one network built for several sizes: every input dimension that differs
    between them, as `Dim.AUTO` (the exporter finds how a bank's token count follows the latent height and width).
    `tensor_entries` then checks the exporter kept every one of them symbolic."""
    from torch.export import Dim

    inputs = {s.name for s in specs_by_size[0] if s.is_input}
    return {
        name: {i: Dim.AUTO for i in dims}
        for name, dims in varying_dims(specs_by_size).items()
        if dims and name in inputs
    }


def tensor_entries(
    model: onnx.ModelProto, specs: list[TensorSpec], varying: dict[str, tuple[int, ...]] | None = None
) -> tuple[TensorSpec, ...]:
    """Manifest entries from the graph's own I/O, checked against the layout: names, order, shapes, dtypes.
    `varying` (a dynamic-shape export, `varying_dims`): the dimensions that must be symbolic; the entries then have
    `specs`' lengths there (one size's)."""
    graph_io = [*model.graph.input, *model.graph.output]
    if [v.name for v in graph_io] != [s.name for s in specs]:
        raise RuntimeError(f"ONNX I/O {[v.name for v in graph_io]} differs from the layout {[s.name for s in specs]}")
    entries = []
    for v, s in zip(graph_io, specs):
        t = v.type.tensor_type
        dynamic = (varying or {}).get(v.name, ())
        symbolic = [i for i, d in enumerate(t.shape.dim) if not d.HasField("dim_value")]
        if symbolic != list(dynamic):
            raise RuntimeError(
                f"ONNX tensor {v.name} is symbolic in dimensions {symbolic}, the frame sizes need {list(dynamic)} "
                f"({[d.dim_param or d.dim_value for d in t.shape.dim]}): the exporter fixed a length the sizes "
                "change (or left one free). Build with --shapes static (one file per size)."
            )
        shape = tuple(s.shape[i] if i in dynamic else d.dim_value for i, d in enumerate(t.shape.dim))
        if shape != tuple(s.shape):
            raise RuntimeError(f"ONNX tensor {v.name} has shape {shape}, the layout says {s.shape}")
        dtype = _ONNX_DTYPES.get(t.elem_type, f"onnx type {t.elem_type}")
        if dtype != s.dtype:
            raise RuntimeError(f"ONNX tensor {v.name} is {dtype}, the layout says {s.dtype}")
        entries.append(TensorSpec(v.name, shape, dtype, s.role, s.layer))
    return tuple(entries)
