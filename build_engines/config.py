"""BuildConfig: an `EngineSpec` (what the networks are built for) plus where and how to build them.

`choose_builder` resolves `--builder auto` from what is installed and which GPU is here, and says why.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

import torch

from streamv2v_trt.backends.tensorrt_import import TensorRTUnavailable, import_tensorrt, rtx_refusal, rtx_runs_on
from streamv2v_trt.spec import EngineSpec


class Builder(str, enum.Enum):
    AUTO = "auto"  # tensorrt if it imports and a GPU is here; tensorrt-rtx where it runs (or no GPU); else aoti
    TENSORRT = "tensorrt"
    TENSORRT_RTX = "tensorrt-rtx"
    AOTI = "aoti"  # torch.export + AOTInductor: any GPU torch supports (Hopper included), and the CPU


@dataclass(frozen=True)
class BuildConfig:
    """One build: the spec, the folder, the builder, and the builder's knobs."""

    spec: EngineSpec
    out: Path | None = None  # None: engines/<spec.folder_name(builder)>
    builder: Builder = Builder.AUTO
    onnx_only: bool = False  # stop after the ONNX export (ONNX Runtime runs it; no TensorRT needed)
    force: bool = False  # rebuild even if an intact matching build exists
    workspace_gib: float = 4.0  # TensorRT builder workspace limit
    device: str | None = None  # AOTInductor: compile for this device (default: cuda when present, else cpu)
    max_autotune: bool = False  # AOTInductor: benchmark kernel choices while compiling (much slower builds)

    def __post_init__(self) -> None:
        object.__setattr__(self, "builder", Builder(self.builder))
        if self.out is not None:
            object.__setattr__(self, "out", Path(self.out))
        if self.onnx_only and self.builder is Builder.AOTI:
            raise ValueError("--onnx-only builds ONNX for ONNX Runtime / TensorRT; --builder aoti exports no ONNX")
        if self.device is not None and self.builder in (Builder.TENSORRT, Builder.TENSORRT_RTX):
            raise ValueError(
                f"--device picks the device AOTInductor compiles for; builder {self.builder.value} has none"
            )

    @property
    def aoti_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def folder(self, builder: str | None) -> Path:
        return self.out or Path("engines") / self.spec.folder_name(builder)


def choose_builder(cfg: BuildConfig) -> tuple[str | None, str]:
    """(builder, why): the builder `cfg` asks for, or what `auto` picks here. None: an --onnx-only build.

    `why` is printed in parentheses after the builder ("builder aoti (--builder aoti)", "builder tensorrt-rtx
    (auto: no GPU here, TensorRT-RTX builds ahead of time on the CPU)"), so it holds no parentheses of its own.

    Raises before any export when the asked builder cannot run: TensorRT not installed, or TensorRT-RTX for a
    GPU it does not run on (it would build, then fail to load: measured on an H200)."""
    if cfg.onnx_only:
        return None, "--onnx-only"
    gpu = torch.cuda.is_available()
    cap = torch.cuda.get_device_capability() if gpu else None
    name = torch.cuda.get_device_name() if gpu else "no GPU"
    if cfg.builder is Builder.AOTI:
        return "aoti", "--builder aoti"
    if cfg.builder is Builder.TENSORRT_RTX:
        import_tensorrt("tensorrt-rtx")  # TensorRTUnavailable with the install command
        if cap is not None and not rtx_runs_on(cap):
            raise TensorRTUnavailable(rtx_refusal(cap, name))
        return "tensorrt-rtx", "--builder tensorrt-rtx"
    if cfg.builder is Builder.TENSORRT:
        import_tensorrt("tensorrt")
        return "tensorrt", "--builder tensorrt"
    if gpu and _imports("tensorrt"):
        return "tensorrt", f"auto: TensorRT is installed and a GPU is here, {name}"
    if _imports("tensorrt-rtx"):
        if cap is None:
            return "tensorrt-rtx", "auto: no GPU here, TensorRT-RTX builds ahead of time on the CPU"
        if rtx_runs_on(cap):
            return "tensorrt-rtx", f"auto: TensorRT-RTX runs on {name}, compute capability {cap[0]}.{cap[1]}"
        return "aoti", f"auto: TensorRT-RTX does not run on {name}, compute capability {cap[0]}.{cap[1]}"
    if gpu:
        return "aoti", f"auto: a GPU is here, {name}, but neither TensorRT nor TensorRT-RTX imports"
    why = "full TensorRT needs a GPU to build" if _imports("tensorrt") else "neither TensorRT nor TensorRT-RTX imports"
    return "aoti", f"auto: no GPU here and {why}"


def _imports(flavour: str) -> bool:
    try:
        import_tensorrt(flavour)
    except TensorRTUnavailable:
        return False
    return True
