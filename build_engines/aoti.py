"""AOTInductor packages of the eager modules: `torch.export` + `aoti_compile_and_package`, one `.pt2` per network.

The same modules the ONNX exporter traces (`BankUNet`, `VaeEncoder`, `VaeDecoder`) are exported with static
shapes and compiled for the device they will run on: CUDA kernels for the GPU the build runs on (the fast path on
Hopper, where TensorRT-RTX cannot run), C++ for the CPU (fp32, for tests). The package carries our I/O contract as
AOTInductor metadata (streamv2v_trt/backends/aoti.py reads it), so the runner needs nothing beside it.

Layout: the runtime passes contiguous NCHW buffers, and a package reads its inputs with the example inputs'
strides, so inputs stay NCHW here. The module is not converted to channels_last: inductor's layout optimisation
(on by default) already runs the convolutions in NHWC where its heuristic (`GraphLowering.decide_layout_opt`)
picks it, and on CUDA it picks it for every network here (no grouped convolutions; sd-turbo UNet 66 convolutions
in ~4,700 graph nodes, TAESD 35 in ~220), and with `freezing` the conv weights are transposed once at build time.
A channels_last module would only make the outputs come back NHWC-strided (inductor keeps eager output strides,
measured on the CPU), breaking the contiguous contract.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from streamv2v_trt.backends.aoti import BUILD_KEY, IO_KEY, AotiTensor, build_info, io_to_json
from streamv2v_trt.layout import dtype_name

log = logging.getLogger(__name__)

# Inductor options (torch._inductor.config names) per device type. On CUDA, for GPU speed at a build time of minutes:
# - freezing: weights become constants, so constant subgraphs are folded at build time and every conv weight is
#   stored once in the layout its kernel reads (NHWC under layout optimisation). Without it the package re-lays
#   each conv weight on every call (seen in the generated CPU wrapper: a copy kernel per conv per call; on CUDA
#   `require_channels_last(weight)` does the same). Compile_fx freezes only with grad disabled, hence no_grad.
# - conv_1x1_as_mm: 1x1 convolutions (UNet shortcuts, TAESD skips) become matmuls that fuse with their neighbours
#   (the diffusers torch.compile recipe for SD UNets).
# On the CPU (fp32 test packages) none: freezing swaps in prepacked oneDNN kernels that made the tiny UNet 1.6-2x
# slower per call on this 2-core CPU (one thread, medians 10.2 vs 6.3 ms), for about the same compile time.
# Off everywhere, overridable through `options`:
# - max_autotune: benchmarks Triton GEMM/conv templates against cuBLAS/cuDNN per shape; tens of minutes for a UNet.
# - coordinate_descent_tuning: tunes each Triton kernel's block sizes; minutes more, gain unmeasured here.
# - triton.cudagraphs does not apply to AOTInductor: the pipeline captures a whole frame itself (cuda_graph.py).
# - layout_optimization is already on (see the module docstring); keep_output_stride keeps outputs NCHW.
DEFAULT_OPTIONS: dict[str, dict[str, object]] = {"cuda": {"freezing": True, "conv_1x1_as_mm": True}, "cpu": {}}

# Swappable weights (docs/BUILD.md, "Swappable weights"): without `freezing` every parameter stays a package
# constant under its module name (`unet.down_blocks.0...weight`, the exported `BankUNet`'s names), so the runtime
# can write new values into it (`AotiRunner.load_weights`); with `freezing` the Linear/Conv2d weights become
# `_frozen_param<N>`, folded and re-laid at build time (only biases and norms keep their names), so the weights a
# LoRA changes have no name left to write to (measured on the tiny UNet, torch 2.13 CPU). The default:
# swappable on the CPU, where freezing is off anyway; frozen on CUDA, where freezing's speed-up was chosen and
# the cost of unfrozen weights has not been measured here (no GPU in that session).
DEFAULT_WEIGHTS = {"cuda": "frozen", "cpu": "swappable"}
WEIGHTS = ("swappable", "frozen")


@dataclass(frozen=True)
class AotiResult:
    """What the manifest records about one compiled package."""

    path: Path
    seconds: float  # export + compile
    options: dict[str, object]  # inductor options used (JSON-able)
    torch_version: str
    device: str  # "cuda" or "cpu"
    capability: str | None  # "9.0" on an H100/H200, None on the CPU
    tensors: tuple[AotiTensor, ...]  # inputs in call order, then outputs


def aoti_weights(device: torch.device | str, weights: str | None = None) -> str:
    """ "swappable" or "frozen": `weights`, or the device's default (DEFAULT_WEIGHTS)."""
    device = torch.device(device)
    if device.type not in DEFAULT_WEIGHTS:
        raise ValueError(f"AOTInductor packages are built for {sorted(DEFAULT_WEIGHTS)}, not {device}")
    weights = weights or DEFAULT_WEIGHTS[device.type]
    if weights not in WEIGHTS:
        raise ValueError(f"weights is one of {WEIGHTS}, not {weights!r}")
    return weights


def aoti_options(
    device: torch.device | str,
    options: dict[str, object] | None = None,
    *,
    max_autotune: bool = False,
    weights: str | None = None,
) -> dict[str, object]:
    """The device's DEFAULT_OPTIONS, freezing on for frozen `weights` and off for swappable ones (default: what
    `options` say, else the device's, `aoti_weights`), max_autotune if asked, then `options` on top: what
    compile_aoti uses and the manifest records. Plain JSON only."""
    device = torch.device(device)
    if device.type not in DEFAULT_OPTIONS:
        raise ValueError(f"AOTInductor packages are built for {sorted(DEFAULT_OPTIONS)}, not {device}")
    if weights is None and "freezing" in (options or {}):  # options name it: the weights follow
        weights = "frozen" if options["freezing"] else "swappable"
    frozen = aoti_weights(device, weights) == "frozen"
    extra = {"max_autotune": True} if max_autotune else {}
    merged = {**DEFAULT_OPTIONS[device.type], "freezing": frozen, **extra, **(options or {})}
    if merged["freezing"] != frozen:
        raise ValueError(f"{weights} weights need freezing {'on' if frozen else 'off'}, options ask the opposite")
    try:
        json.dumps(merged)
    except TypeError as e:
        raise TypeError(f"inductor options must be JSON values (str, number, bool, list, dict): {e}") from e
    if "aot_inductor.metadata" in merged:
        raise ValueError("aot_inductor.metadata is reserved: compile_aoti stores the package's I/O contract there")
    return merged


def _check_placement(module: nn.Module, args: dict[str, torch.Tensor], device: torch.device) -> None:
    if module.training:
        raise ValueError("the module is in training mode; call .eval() before compiling (dropout would be baked in)")
    for name, p in [*module.named_parameters(), *module.named_buffers()]:
        if p.device.type != device.type:
            raise ValueError(f"module tensor {name} is on {p.device}, the package targets {device}; move the module")
    for name, t in args.items():
        if t.device.type != device.type or not t.is_contiguous():
            raise ValueError(
                f"example input {name} is on {t.device} (contiguous: {t.is_contiguous()}); the package reads "
                f"contiguous tensors on {device}: pass `.to({str(device)!r}).contiguous()`"
            )


@contextlib.contextmanager
def _torch_leafspec_warning_silenced() -> Iterator[None]:
    """Exporting and compiling a program, torch's own pytree code copies tree specs and so creates instances of its
    deprecated `LeafSpec` class, which warns "`isinstance(treespec, LeafSpec)` is deprecated" once per network
    (torch 2.13: three FutureWarnings per build). It is torch's internal deprecation, nothing a user of this build
    can act on; only that warning is silenced, every other warning still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
        )
        yield


def _user_outputs(program: torch.export.ExportedProgram) -> list[torch.Tensor]:
    """Fake tensors of the exported graph's user outputs, in order (the graph also lists buffer mutations)."""
    from torch.export.graph_signature import OutputKind

    (node,) = program.graph.find_nodes(op="output")
    specs = program.graph_signature.output_specs
    vals = [arg.meta.get("val") for spec, arg in zip(specs, node.args[0]) if spec.kind == OutputKind.USER_OUTPUT]
    if not all(isinstance(v, torch.Tensor) for v in vals):
        raise TypeError(f"the module returns non-tensor outputs {[type(v).__name__ for v in vals]}; return tensors")
    return vals


def _check_package(package: Path, metadata: dict[str, str]) -> None:
    """Every metadata file in the archive parses and carries our contract: the loader parses them all, and a
    truncated one (the race described in compile_aoti) makes the package unloadable."""
    with zipfile.ZipFile(package) as archive:
        names = [n for n in archive.namelist() if n.endswith("_metadata.json")]
        for name in names:
            try:
                stored = json.loads(archive.read(name))
            except ValueError as e:
                raise RuntimeError(f"{package.name}: {name} is not valid JSON ({e}); rebuild it") from e
            if any(stored.get(k) != v for k, v in metadata.items()):
                raise RuntimeError(f"{package.name}: {name} lacks the I/O contract compile_aoti stored; rebuild it")
    if not names:
        raise RuntimeError(f"{package.name}: no AOTInductor metadata in the archive; rebuild it")


def compile_aoti(
    module: nn.Module,
    inputs: dict[str, torch.Tensor],
    input_names: list[str],
    output_names: list[str],
    path: Path,
    device: torch.device,
    *,
    options: dict[str, object] | None = None,
) -> AotiResult:
    """Export `module(*inputs in input_names order)` with static shapes and compile it into the package `path`.

    The module and inputs must already be on `device`, in the dtype the package will run. The package is written
    to a temporary name beside `path` and renamed, so a failed or interrupted build never leaves a half package.
    """
    device, path = torch.device(device), Path(path)
    missing = [n for n in input_names if n not in inputs]
    if missing:
        raise KeyError(f"example inputs {missing} not given (got {sorted(inputs)})")
    args = {n: inputs[n] for n in input_names}
    _check_placement(module, args, device)
    opts = aoti_options(device, options)

    start = time.perf_counter()
    # Inference tensors cannot be exported; no autograd graph.
    with torch.inference_mode(False), torch.no_grad(), _torch_leafspec_warning_silenced():
        program = torch.export.export(module, tuple(args.values()), strict=False)
    outs = _user_outputs(program)
    if len(outs) != len(output_names):
        raise ValueError(f"the module returns {len(outs)} tensors, output_names lists {len(output_names)}")
    tensors = tuple(
        [AotiTensor(n, tuple(t.shape), dtype_name(t.dtype), True) for n, t in args.items()]
        + [
            AotiTensor(n, tuple(int(s) for s in t.shape), dtype_name(t.dtype), False)
            for n, t in zip(output_names, outs)
        ]
    )
    info = build_info(device, opts)
    log.info("%s: exported in %.1f s; compiling for %s with %s", path.name, time.perf_counter() - start, device, opts)

    from torch._inductor import aoti_compile_and_package
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    # Everything happens in a fresh folder beside `path` (same file system, so the final rename is atomic): the
    # package, under its final file name (the archive's root folder is named after it), and a private inductor
    # cache. AOTInductor writes generated files at paths named by the code hash, some not atomically, so two
    # builds of the same graph sharing the default cache can package each other's half-written files (seen here:
    # an empty kernel_metadata.json while another process compiled the same tiny UNet). A cold cache compiled no
    # slower on this CPU (UNet 65 s vs 78 s warm, VAE encoder 16 s vs 23 s, on a busy machine).
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    metadata = {IO_KEY: io_to_json(list(tensors)), BUILD_KEY: json.dumps(info)}
    try:
        with (
            temporary_cache_dir(str(tmp_dir / "inductor")),
            torch.inference_mode(False),
            torch.no_grad(),  # freezing applies only with grad disabled
            _torch_leafspec_warning_silenced(),
        ):
            package = aoti_compile_and_package(
                program,
                package_path=str(tmp_dir / path.name),
                inductor_configs={**opts, "aot_inductor.metadata": metadata},
            )
        _check_package(Path(package), metadata)
        os.replace(package, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    seconds = time.perf_counter() - start
    log.info("%s: compiled in %.1f s (%.1f MB)", path.name, seconds, path.stat().st_size / 2**20)
    return AotiResult(path, seconds, opts, info["torch"], device.type, info["capability"], tensors)
