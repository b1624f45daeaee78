"""The one import point for TensorRT, shared by `build_engines` and the runtime.

Full TensorRT (`tensorrt`, extra `[trt]`) is used when installed, else TensorRT-RTX (`tensorrt_rtx`, extra
`[trt-rtx]`). Both expose the same builder / ONNX parser / runtime Python API. An engine must be loaded by the
flavour that built it, so the runtime passes the manifest's `builder` as `prefer`.

TensorRT-RTX runs only on some GPUs: measured on an H200 (2026-11-27), an engine it built fails to deserialise
with "Supported compute capabilities: 8.0 8.6 8.9 12.0 12.1 >12.0" (no Hopper, 9.0). `rtx_runs_on` says so
before anything is built or loaded.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

from ..flavours import Builder

FLAVOURS = (Builder.TENSORRT, Builder.TENSORRT_RTX)  # full TensorRT first: preferred where both import
log = logging.getLogger(__name__)
_MODULES = {Builder.TENSORRT: "tensorrt", Builder.TENSORRT_RTX: "tensorrt_rtx"}
_EXTRAS = {Builder.TENSORRT: 'pip install -e ".[trt]"', Builder.TENSORRT_RTX: 'pip install -e ".[trt-rtx]"'}


class TensorRTUnavailable(ImportError):
    """Neither TensorRT nor TensorRT-RTX (or not the requested one) can be imported."""


def _try_import(flavour: str) -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module(_MODULES[flavour]), None
    except ImportError as e:  # also the PyPI `tensorrt` stub, which fails at import without NVIDIA's index
        return None, f"{type(e).__name__}: {e}"


def import_tensorrt(prefer: str = Builder.AUTO) -> tuple[ModuleType, Builder]:
    """Return `(module, flavour)` with flavour `Builder.TENSORRT` or `Builder.TENSORRT_RTX`.

    prefer: auto (tensorrt if installed, else tensorrt-rtx), tensorrt or tensorrt-rtx (that one or an error).
    """
    if prefer not in (Builder.AUTO, *FLAVOURS):
        raise ValueError(f"unknown TensorRT flavour {prefer!r}: expected auto, tensorrt or tensorrt-rtx")
    order = FLAVOURS if prefer == Builder.AUTO else (Builder(prefer),)
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


def rtx_runs_on(capability: tuple[int, int]) -> bool:
    """Whether TensorRT-RTX engines run on a GPU of this compute capability (major, minor)."""
    return capability in ((8, 0), (8, 6), (8, 9)) or capability >= (12, 0)


def rtx_refusal(capability: tuple[int, int], gpu: str) -> str:
    return (
        f"TensorRT-RTX does not run on {gpu} (compute capability {capability[0]}.{capability[1]}; it supports "
        "8.0, 8.6, 8.9 and 12.0 and newer). Build AOTInductor packages instead (--builder aoti), or full TensorRT "
        "(--builder tensorrt) where it is installed"
    )


def tensorrt_version(module: ModuleType) -> str:
    return str(getattr(module, "__version__", "unknown"))


# Parser warnings that need no action here: the runtime binds `timestep` as int64, as the manifest records.
BENIGN_WARNINGS = ("has Int64 binding",)


def trt_logger(trt: ModuleType):
    """A TensorRT `ILogger` that forwards into `logging` (errors, warnings; info, verbose and the benign warnings
    above at debug level)."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity, msg) -> None:
            if severity <= trt.ILogger.Severity.ERROR:
                log.error("%s", msg)
            elif severity == trt.ILogger.Severity.WARNING and not any(b in msg for b in BENIGN_WARNINGS):
                log.warning("%s", msg)
            else:
                log.debug("%s", msg)

    return _Logger()
