"""Engines on disk: the manifest that describes and validates them, and the one TensorRT import point."""

from .manifest import (
    MANIFEST_FILE,
    EngineMismatch,
    EngineRequest,
    Manifest,
    NetworkEntry,
    TensorEntry,
    load_checked,
    load_manifest,
    sha256_file,
)
from .trt import TensorRTUnavailable, import_tensorrt

__all__ = [
    "MANIFEST_FILE",
    "EngineMismatch",
    "EngineRequest",
    "Manifest",
    "NetworkEntry",
    "TensorEntry",
    "TensorRTUnavailable",
    "import_tensorrt",
    "load_checked",
    "load_manifest",
    "sha256_file",
]
