"""The one import point for TensorRT, shared by `build_engines` and the runtime.

Full TensorRT (`tensorrt`, extra `[trt]`) is used when installed, else TensorRT-RTX (`tensorrt_rtx`, extra
`[trt-rtx]`). Both expose the same builder / ONNX parser / runtime Python API. An engine must be loaded by the
flavour that built it, so the runtime passes the manifest's `builder` as `prefer`.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

FLAVOURS = ("tensorrt", "tensorrt-rtx")
log = logging.getLogger(__name__)
_MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
_EXTRAS = {"tensorrt": 'pip install -e ".[trt]"', "tensorrt-rtx": 'pip install -e ".[trt-rtx]"'}


class TensorRTUnavailable(ImportError):
    """Neither TensorRT nor TensorRT-RTX (or not the requested one) can be imported."""


def _try_import(flavour: str) -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module(_MODULES[flavour]), None
    except ImportError as e:  # also the PyPI `tensorrt` stub, which fails at import without NVIDIA's index
        return None, f"{type(e).__name__}: {e}"


def import_tensorrt(prefer: str = "auto") -> tuple[ModuleType, str]:
    """Return `(module, flavour)` with flavour "tensorrt" or "tensorrt-rtx".

    prefer: "auto" (tensorrt if installed, else tensorrt-rtx), "tensorrt" or "tensorrt-rtx" (that one or an error).
    """
    if prefer not in ("auto", *FLAVOURS):
        raise ValueError(f"unknown TensorRT flavour {prefer!r}: expected auto, tensorrt or tensorrt-rtx")
    order = FLAVOURS if prefer == "auto" else (prefer,)
    errors = []
    for flavour in order:
        module, err = _try_import(flavour)
        if module is not None:
            return module, flavour
        errors.append(f"{_MODULES[flavour]} ({err})")
    installs = " or ".join(_EXTRAS[f] for f in order)
    raise TensorRTUnavailable(
        f"cannot import {' nor '.join(errors)}. Install {installs}; TensorRT-RTX (tensorrt-rtx-cu13) installs from "
        "PyPI and builds engines without a GPU. Or build ONNX only: python -m build_engines ... --onnx-only"
    )


def tensorrt_version(module: ModuleType) -> str:
    return str(getattr(module, "__version__", "unknown"))


def trt_logger(trt: ModuleType):
    """A TensorRT `ILogger` that forwards into `logging` (errors, warnings; info and verbose at debug level)."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity, msg) -> None:
            if severity <= trt.ILogger.Severity.ERROR:
                log.error("%s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("%s", msg)
            else:
                log.debug("%s", msg)

    return _Logger()


def load_engine(path, flavour: str):
    """Deserialise the engine at `path` with the flavour that built it (the manifest's `builder`).

    Returns `(runtime, engine)`; keep the runtime alive as long as the engine. Needs a CUDA driver and GPU:
    TensorRT-RTX builds without one, but deserialising creates a CUDA stream.
    """
    trt, _ = import_tensorrt(flavour)
    runtime = trt.Runtime(trt_logger(trt))
    with open(path, "rb") as f:
        engine = runtime.deserialize_cuda_engine(f.read())
    if engine is None:
        raise RuntimeError(
            f"{flavour} could not deserialise {path} (see the TensorRT log above): it needs a CUDA driver, a supported "
            "GPU and the TensorRT version that built it; rebuild with python -m build_engines"
        )
    return runtime, engine


def engine_io(engine) -> dict[str, tuple[tuple[int, ...], str, bool]]:
    """name -> (shape, dtype name, is_input) for every I/O tensor of a deserialised engine."""
    out = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = engine.get_tensor_mode(name)
        dtype = str(engine.get_tensor_dtype(name)).rsplit(".", 1)[-1].lower()  # DataType.HALF -> "half"
        out[name] = (tuple(engine.get_tensor_shape(name)), dtype, mode.name == "INPUT")
    return out
