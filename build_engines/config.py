"""BuildConfig: an `EngineSpec` (what the networks are built for) plus where and how to build them.

`choose_builder` resolves `--builder auto` from what is installed and which GPU is here, and says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from streamv2v_trt.backends.tensorrt_import import TensorRTUnavailable, import_tensorrt, rtx_refusal, rtx_runs_on
from streamv2v_trt.flags import flag
from streamv2v_trt.flavours import Builder
from streamv2v_trt.spec import EngineSpec

WEIGHTS = ("swappable", "frozen")
SHAPES = ("static", "dynamic")
# `--weights` when not given, for the builders that compile an ONNX (AOTInductor: aoti.py). An ONNX file holds its
# weights as initializers either way; a swappable one holds the base weights and ONNX Runtime swaps LoRAs into a new
# session: measured at the same speed as a folder with the LoRA fused (docs/BENCHMARKS.md, "Swappable weights"), so
# swappable, except that a build naming LoRAs (--lora) fuses them as it always has. TensorRT: a refittable engine may
# run slower; not measured here (no GPU in that session): frozen (docs/BUILD.md, "Swappable weights").
DEFAULT_WEIGHTS = {"onnx": "swappable", "tensorrt": "frozen"}


@dataclass(frozen=True)
class BuildConfig:
    """One build: the spec, the folder, the builder, and the builder's knobs."""

    spec: EngineSpec
    out: Path | None = field(
        default=None,
        metadata=flag(
            "output folder (default: engines/<model>-<W>x<H>-b<UNet batch>-<bank><frames>-<vae>-<precision>"
            "[-cn-<names>][-aoti], a name that changes with everything the networks are specialised for)",
            metavar="DIR",
            parse=Path,
        ),
    )
    builder: Builder = field(
        default=Builder.AUTO,
        metadata=flag(
            "auto: tensorrt if it imports and a GPU is here; tensorrt-rtx where it runs (8.0, 8.6, 8.9, 12.x, or no "
            "GPU: it builds ahead of time); else aoti (AOTInductor: any GPU torch supports, Hopper included, the CPU)"
        ),
    )
    onnx_only: bool = field(default=False, metadata=flag("stop after the ONNX export (ONNX Runtime runs it)"))
    force: bool = field(default=False, metadata=flag("rebuild everything even if an intact matching build exists"))
    workspace_gib: float = field(default=4.0, metadata=flag("TensorRT builder workspace limit in GiB"))
    device: str | None = field(  # AOTInductor only
        default=None,
        metadata=flag("aoti: the device to compile for", choices=("cuda", "cpu"), default_text="cuda if any"),
    )
    max_autotune: bool = field(default=False, metadata=flag("aoti: autotune kernels (much slower build)"))
    weights: str | None = field(
        default=None,
        metadata=flag(
            "swappable (the UNet's weights stay replaceable: LoRAs are applied when the folder is opened and swapped "
            "at runtime, none compiled in; TensorRT builds a refittable engine) or frozen (compiled in; a LoRA set is "
            "a rebuild)",
            choices=("swappable", "frozen"),
            default_text="aoti: swappable on the CPU, frozen on CUDA; --onnx-only: swappable, frozen with --lora; "
            "tensorrt and tensorrt-rtx: frozen",
        ),
    )
    shapes: str = field(
        default="static",
        metadata=flag(
            "with --sizes: static (one file per network and size, each compiled for its shapes) or dynamic (one ONNX "
            "per network with symbolic height and width, and one TensorRT engine with an optimisation profile "
            "spanning the sizes: the weights are held once; TensorRT builders and --onnx-only)",
            choices=SHAPES,
        ),
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "builder", Builder(self.builder))
        if self.out is not None:
            object.__setattr__(self, "out", Path(self.out))
        if self.onnx_only and self.builder is Builder.AOTI:
            raise ValueError("--onnx-only builds ONNX for ONNX Runtime / TensorRT; --builder aoti exports no ONNX")
        if self.device is not None and self.builder.is_tensorrt:
            raise ValueError(
                f"--device picks the device AOTInductor compiles for; builder {self.builder.value} has none"
            )
        if self.weights not in (None, *WEIGHTS):
            raise ValueError(f"--weights is one of {WEIGHTS}, not {self.weights!r}")
        if self.shapes not in SHAPES:
            raise ValueError(f"--shapes is one of {SHAPES}, not {self.shapes!r}")
        if self.dynamic and not self.spec.sizes:
            raise ValueError(
                "--shapes dynamic makes one network serve several frame sizes: name them with --sizes (e.g. --sizes "
                "512x512,768x512); a single-size build is static"
            )
        if self.dynamic and self.builder is Builder.AOTI:
            raise ValueError(
                "--shapes dynamic is for ONNX and TensorRT builds (one engine with an optimisation profile); "
                'AOTInductor compiles one package per size (docs/BUILD.md, "Frame sizes"): drop --shapes dynamic, '
                "or build with --builder tensorrt, --builder tensorrt-rtx or --onnx-only"
            )

    @property
    def dynamic(self) -> bool:
        return self.shapes == "dynamic"

    @property
    def stage_sizes(self) -> tuple[tuple[int, int], ...]:
        """The sizes the build's stages run per (`build.stages`): every size, or none when one file serves all."""
        return () if self.dynamic else self.spec.served_sizes

    @property
    def aoti_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def swappable(self, builder: Builder | None) -> bool:
        """Whether `builder` (the resolved one; None: --onnx-only) builds swappable weights: `weights`, or the default
        (AOTInductor: its device's, build_engines/aoti.py DEFAULT_WEIGHTS; ONNX and TensorRT: DEFAULT_WEIGHTS here)."""
        if builder is Builder.AOTI:
            from .aoti import aoti_weights

            return aoti_weights(self.aoti_device, self.weights) == "swappable"
        default = DEFAULT_WEIGHTS["onnx" if builder is None and not self.spec.loras else "tensorrt"]
        return (self.weights or default) == "swappable"

    def folder(self, builder: Builder | None) -> Path:
        return self.out or Path("engines") / self.spec.folder_name(builder)


def choose_builder(cfg: BuildConfig) -> tuple[Builder | None, str]:
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
    if cfg.builder is not Builder.AUTO:
        if cfg.builder.is_tensorrt:
            import_tensorrt(cfg.builder)  # TensorRTUnavailable with the install command
        if cfg.builder is Builder.TENSORRT_RTX and cap is not None and not rtx_runs_on(cap):
            raise TensorRTUnavailable(rtx_refusal(cap, name))
        return cfg.builder, f"--builder {cfg.builder.value}"
    if gpu and _imports(Builder.TENSORRT):
        return Builder.TENSORRT, f"auto: TensorRT is installed and a GPU is here, {name}"
    if _imports(Builder.TENSORRT_RTX):
        if cap is None:
            return Builder.TENSORRT_RTX, "auto: no GPU here, TensorRT-RTX builds ahead of time on the CPU"
        if rtx_runs_on(cap):
            return Builder.TENSORRT_RTX, f"auto: TensorRT-RTX runs on {name}, compute capability {cap[0]}.{cap[1]}"
        return Builder.AOTI, f"auto: TensorRT-RTX does not run on {name}, compute capability {cap[0]}.{cap[1]}"
    if gpu:
        return Builder.AOTI, f"auto: a GPU is here, {name}, but neither TensorRT nor TensorRT-RTX imports"
    trt = _imports(Builder.TENSORRT)
    why = "full TensorRT needs a GPU to build" if trt else "neither TensorRT nor TensorRT-RTX imports"
    return Builder.AOTI, f"auto: no GPU here and {why}"


def _imports(flavour: Builder) -> bool:
    try:
        import_tensorrt(flavour)
    except TensorRTUnavailable:
        return False
    return True
