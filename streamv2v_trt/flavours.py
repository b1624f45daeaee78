"""Backends and builders: the one table of what runs a stream, what makes its files, and what each can do.

A builder (`python -m build_engines --builder`) makes a build folder's files; a backend (`--backend`, `Source`)
runs them, or runs the PyTorch weights (eager). Everything that depends on which is which reads `BACKENDS`:
the files a backend loads, the folders it opens, whether CUDA graphs can capture its calls, its default device,
which backend a folder runs on by default, and which build gives a backend its files (`build_for`, which
`EngineSpec.rebuild_command` words). Plain data: nothing of ours or of a model library is imported here.

    backend       opens folders built by            loads            CUDA graphs   default device
    eager         (none: the PyTorch weights)       -                yes           cuda if present, else cpu
    onnxruntime   --onnx-only, tensorrt(-rtx)       .onnx (+ data)   no (syncs)    cpu
    tensorrt      tensorrt, tensorrt-rtx            .engine          yes           cuda
    aoti          aoti                              .pt2             yes           the packages' device
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class _Name(str, enum.Enum):
    """A name that prints as itself in messages and commands ("aoti", not "Builder.AOTI")."""

    def __str__(self) -> str:
        return self.value


class Builder(_Name):
    AUTO = "auto"  # tensorrt if it imports and a GPU is here; tensorrt-rtx where it runs (or no GPU); else aoti
    TENSORRT = "tensorrt"
    TENSORRT_RTX = "tensorrt-rtx"
    AOTI = "aoti"  # torch.export + AOTInductor: any GPU torch supports (Hopper included), and the CPU

    @property
    def is_tensorrt(self) -> bool:
        return self in (Builder.TENSORRT, Builder.TENSORRT_RTX)


BUILDERS = (Builder.TENSORRT, Builder.TENSORRT_RTX, Builder.AOTI)  # what a manifest records (None: --onnx-only)


class BackendKind(_Name):
    EAGER = "eager"
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"
    AOTI = "aoti"

    @property
    def info(self) -> BackendInfo:
        return BACKENDS[self]


@dataclass(frozen=True)
class BackendInfo:
    opens: tuple[Builder | None, ...]  # build folders it runs, by the builder that made them (None: --onnx-only)
    files: tuple[str, ...]  # the manifest file kinds it loads (the first is the file a runner opens)
    what: str  # those files in words
    build: Builder | None  # what builds its files when the folder's own builder cannot (None: --onnx-only)
    capturable: bool  # its calls can be captured into a CUDA graph (onnxruntime synchronises inside `run`)
    device: str | None  # its default device; None: eager's is cuda when present, aoti's the packages' target

    @property
    def runs_folders(self) -> bool:
        return bool(self.opens)


BACKENDS: dict[BackendKind, BackendInfo] = {
    BackendKind.EAGER: BackendInfo(
        opens=(),
        files=(),
        what="PyTorch weights",
        build=None,
        capturable=True,
        device=None,
    ),
    BackendKind.ONNXRUNTIME: BackendInfo(
        opens=(None, Builder.TENSORRT, Builder.TENSORRT_RTX),
        files=("onnx", "onnx_data"),
        what="ONNX files",
        build=None,
        capturable=False,
        device="cpu",
    ),
    BackendKind.TENSORRT: BackendInfo(
        opens=(Builder.TENSORRT, Builder.TENSORRT_RTX),
        files=("engine",),
        what="TensorRT engines",
        build=Builder.AUTO,
        capturable=True,
        device="cuda",
    ),
    BackendKind.AOTI: BackendInfo(
        opens=(Builder.AOTI,),
        files=("package",),
        what="AOTInductor packages",
        build=Builder.AOTI,
        capturable=True,
        device=None,
    ),
}
ENGINE_BACKENDS = tuple(k for k, info in BACKENDS.items() if info.runs_folders)  # what a build folder opens with
CAPTURABLE_BACKENDS = tuple(k for k, info in BACKENDS.items() if info.capturable)


def backend_of(name: str | BackendKind) -> BackendKind:
    """`name` as a BackendKind; ValueError naming the choices otherwise."""
    try:
        return BackendKind(name)
    except ValueError:
        raise ValueError(f"unknown backend {name!r}: expected one of {', '.join(BackendKind)}") from None


def builder_of(name: str | Builder | None) -> Builder | None:
    return None if name is None else Builder(name)


def folder_backend(built: str | Builder | None, device_type: str) -> BackendKind:
    """The backend a folder built by `built` runs on by default on a `device_type` machine: its own compiled files
    where they can run there (TensorRT engines need a GPU), else its ONNX."""
    built = builder_of(built)
    for kind in (BackendKind.TENSORRT, BackendKind.AOTI, BackendKind.ONNXRUNTIME):
        info = BACKENDS[kind]
        if built in info.opens and (info.device != "cuda" or device_type == "cuda"):
            return kind
    raise ValueError(f"no backend opens a folder built by {built}")  # every builder is in some `opens`


def build_for(backend: str | BackendKind, built: str | Builder | None = None) -> tuple[Builder | None, bool]:
    """(builder, onnx_only) of the build that gives `backend` its files: the folder's own builder `built` when the
    backend opens its folders (ONNX beside TensorRT engines; the same TensorRT flavour), else the backend's."""
    info, built = backend_of(backend).info, builder_of(built)
    builder = built if built is not None and built in info.opens else info.build
    onnx_only = builder is None and backend_of(backend) is BackendKind.ONNXRUNTIME
    return (None if builder is Builder.AUTO else builder), onnx_only
