"""Engine build from an ONNX file with the TensorRT (or TensorRT-RTX) Python API: no shell strings.

Networks are created strongly typed: the ONNX's own dtypes (fp16 for engines) decide the precision, which is
what TensorRT-RTX requires and what full TensorRT 10 supports. TensorRT-RTX builds ahead of time on the CPU;
without a compute-capability setting its builder targets every GPU it supports (Turing .. Blackwell), and the
engine is specialised for the actual GPU when first loaded. Full TensorRT needs a GPU to build.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from streamv2v_trt.backends.tensorrt_import import import_tensorrt, trt_logger

log = logging.getLogger(__name__)

# What TensorRT-RTX prints straight to stdout (not through the logger) that says nothing is wrong: the fp16 graph's
# clamp constants (the cosine epsilon, already fp16 in the ONNX) are "cast" to the op's own type.
BENIGN_PRINTS = ("payload type requires precision-lose casting",)


@contextlib.contextmanager
def _prints_through_logging(what: str) -> Iterator[None]:
    """The native library's direct stdout/stderr prints during `what`, re-issued through logging: known-benign ones
    at debug level (counted at info), the rest as warnings."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with tempfile.TemporaryFile(mode="w+b") as capture:
        for fd in saved:
            os.dup2(capture.fileno(), fd)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            capture.seek(0)
            lines = [line for line in capture.read().decode(errors="replace").splitlines() if line.strip()]
    benign = [line for line in lines if any(b in line for b in BENIGN_PRINTS)]
    for line in benign:
        log.debug("%s: %s", what, line)
    if benign:
        log.info("%s: %d notes about fp16 clamp constants (benign; -v shows them)", what, len(benign))
    for line in lines:
        if line not in benign:
            log.warning("%s: %s", what, line)


def builder_config(trt, builder, *, workspace_gib: float = 4.0, refit: bool = False):
    """The builder settings of every engine: the workspace limit, and with `refit` (`--weights swappable`) the
    REFIT_INDIVIDUAL flag: the weights marked refittable (`mark_refittable`) can be set by a `Refitter` by their ONNX
    initializer names (backends/tensorrt.py), the others (biases, norms) the builder may still fold."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if refit:
        config.set_flag(trt.BuilderFlag.REFIT_INDIVIDUAL)
    return config


def mark_refittable(network, onnx_path: Path) -> list[str]:
    """Mark every weight a LoRA can change refittable: the initializers read as a Conv / MatMul / Gemm weight
    (`onnx_weights.weight_initializers`, the runtime name map's candidates). Returns those the network has."""
    import onnx

    from streamv2v_trt.backends.onnx_weights import weight_initializers

    names = weight_initializers(onnx.load(str(onnx_path), load_external_data=False))
    marked = [name for name in names if network.mark_weights_refittable(name)]
    log.info("%s: %d of %d weight initializers refittable", onnx_path.name, len(marked), len(names))
    if not marked:
        raise RuntimeError(f"{onnx_path}: no weight initializer is refittable: the parser named none of {len(names)}")
    return marked


Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max) shapes


def build_engine(
    onnx_path: Path, engine_path: Path, *, flavour: str, workspace_gib: float = 4.0, refit: bool = False,
    profile: Profile | None = None,
) -> float:  # fmt: skip
    """Parse `onnx_path` (external data next to it is found by the parser), build, write `engine_path`.
    `profile`: the optimisation profile of an ONNX with dynamic shapes (`--shapes dynamic`), every input's
    (min, opt, max); the engine runs any shapes within it, its kernels tuned for opt.

    Returns the build time in seconds. Raises with the parser's errors if the graph is rejected.
    """
    trt, _ = import_tensorrt(flavour)
    logger = trt_logger(trt)
    t0 = time.perf_counter()
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    with _prints_through_logging(f"parsing {onnx_path.name}"):
        parsed = parser.parse_from_file(str(onnx_path))
    if not parsed:
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{flavour} could not parse {onnx_path}: {errors}")
    config = builder_config(trt, builder, workspace_gib=workspace_gib, refit=refit)
    if profile:
        shapes = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.items():
            shapes.set_shape(name, low, opt, high)
        config.add_optimization_profile(shapes)
    if refit:
        mark_refittable(network, onnx_path)
    with _prints_through_logging(f"building {engine_path.name}"):
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        # Measured (tensorrt-rtx 1.7.1, no GPU): frozen engines build on the CPU, refittable ones fail in its JIT.
        refittable = (
            " A refittable engine (--weights swappable) needs a GPU to build, TensorRT-RTX included (its JIT "
            "compiles refittable weights with CUDA): build it on a GPU machine, or use --weights frozen."
            if refit
            else ""
        )
        raise RuntimeError(
            f"{flavour} failed to build an engine from {onnx_path} (errors logged above). Full TensorRT needs a GPU "
            f"to build; TensorRT-RTX builds on the CPU (--builder tensorrt-rtx).{refittable}"
        )
    tmp = engine_path.with_name(engine_path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(serialized)
    tmp.replace(engine_path)
    seconds = time.perf_counter() - t0
    log.info("built %s in %.1f s (%.1f MB)", engine_path, seconds, engine_path.stat().st_size / 1e6)
    return seconds
