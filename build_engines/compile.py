"""Engine build from an ONNX file with the TensorRT (or TensorRT-RTX) Python API: no shell strings.

Networks are created strongly typed: the ONNX's own dtypes (fp16 for engines) decide the precision, which is
what TensorRT-RTX requires and what full TensorRT 10 supports. TensorRT-RTX builds ahead of time on the CPU;
without a compute-capability setting its builder targets every GPU it supports (Turing .. Blackwell), and the
engine is specialised for the actual GPU when first loaded. Full TensorRT needs a GPU to build.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from streamv2v_trt.backends.tensorrt_import import import_tensorrt, trt_logger

log = logging.getLogger(__name__)


def build_engine(onnx_path: Path, engine_path: Path, *, flavour: str, workspace_gib: float = 4.0) -> float:
    """Parse `onnx_path` (external data next to it is found by the parser), build, write `engine_path`.

    Returns the build time in seconds. Raises with the parser's errors if the graph is rejected.
    """
    trt, _ = import_tensorrt(flavour)
    logger = trt_logger(trt)
    t0 = time.perf_counter()
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{flavour} could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(
            f"{flavour} failed to build an engine from {onnx_path} (errors logged above). Full TensorRT needs a GPU "
            "to build; TensorRT-RTX builds on the CPU (--builder tensorrt-rtx)."
        )
    tmp = engine_path.with_name(engine_path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(serialized)
    tmp.replace(engine_path)
    seconds = time.perf_counter() - t0
    log.info("built %s in %.1f s (%.1f MB)", engine_path, seconds, engine_path.stat().st_size / 1e6)
    return seconds
