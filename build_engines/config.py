"""BuildConfig: everything that decides what `build_engines` produces (and so what its cache key is)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

import torch

from streamv2v_trt.config import BankConfig, BankKind, CfgType, StreamConfig
from streamv2v_trt.engine.manifest import EngineRequest
from streamv2v_trt.models import VaeKind
from streamv2v_trt.models.lora import LoraSpec


class Precision(str, enum.Enum):
    FP16 = "fp16"  # what engines run: TensorRT-RTX is strongly typed, so the ONNX itself is fp16
    FP32 = "fp32"  # CPU parity tests with ONNX Runtime

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float16 if self is Precision.FP16 else torch.float32


class Builder(str, enum.Enum):
    AUTO = "auto"  # tensorrt if installed, else tensorrt-rtx
    TENSORRT = "tensorrt"
    TENSORRT_RTX = "tensorrt-rtx"


@dataclass(frozen=True)
class BuildConfig:
    """One build: model, resolution, UNet batch (steps), bank, VAE, precision, where to write."""

    out: Path
    model: str = "sd-turbo"
    height: int = 512
    width: int = 512
    t_index_list: tuple[int, ...] = (32,)
    bank: BankConfig = field(default_factory=BankConfig)
    cfg_type: CfgType = CfgType.NONE  # guidance sizes the UNet batch: steps, + 1 (initialize), x 2 (full)
    vae: VaeKind = VaeKind.TAESD
    precision: Precision = Precision.FP16
    builder: Builder = Builder.AUTO
    onnx_only: bool = False
    force: bool = False
    seed: int = 0  # random-weight presets are seeded: the same seed gives the same weights hash
    workspace_gib: float = 4.0  # TensorRT builder workspace limit
    loras: tuple[LoraSpec, ...] = ()  # fused into the UNet before export, in this order

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "vae", VaeKind(self.vae))
        object.__setattr__(self, "cfg_type", CfgType(self.cfg_type))
        object.__setattr__(self, "precision", Precision(self.precision))
        object.__setattr__(self, "builder", Builder(self.builder))
        object.__setattr__(self, "t_index_list", tuple(int(t) for t in self.t_index_list))
        object.__setattr__(self, "loras", tuple(self.loras))
        StreamConfig(height=self.height, width=self.width, t_index_list=self.t_index_list)  # same validation

    @classmethod
    def from_stream(
        cls,
        model: str,
        stream: StreamConfig,
        out: Path | str,
        *,
        vae: VaeKind | str = VaeKind.TAESD,
        precision: Precision | str = Precision.FP16,
        builder: Builder | str = Builder.AUTO,
        onnx_only: bool = False,
        force: bool = False,
        seed: int = 0,
        loras: tuple[LoraSpec, ...] = (),
    ) -> BuildConfig:
        """The build that serves `stream`: its size, UNet batch (steps and guidance) and bank."""
        return cls(
            out=Path(out),
            model=model,
            height=stream.height,
            width=stream.width,
            t_index_list=stream.t_index_list,
            bank=stream.bank,
            cfg_type=stream.cfg_type,
            vae=vae,
            precision=precision,
            builder=builder,
            onnx_only=onnx_only,
            force=force,
            seed=seed,
            loras=tuple(loras),
        )

    @property
    def steps(self) -> int:
        return len(self.t_index_list)

    @property
    def unet_batch(self) -> int:
        return self.cfg_type.unet_batch(self.steps)

    def default_out(self) -> Path:
        """engines/<model>-<W>x<H>-b<UNet batch>-<bank><frames>-<vae>-<precision>: one folder per specialisation,
        so builds for another resolution, batch or bank never overwrite each other."""
        name = Path(self.model).name or "model"
        return Path("engines") / (
            f"{name}-{self.width}x{self.height}-b{self.unet_batch}-{self.bank.kind.value}{self.bank.frames}"
            f"-{self.vae.value}-{self.precision.value}"
        )

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // 8, self.width // 8

    def request(self, weights_hash: str | None = None) -> EngineRequest:
        """What this build must produce, in the terms the runtime's manifest check uses."""
        return EngineRequest(
            model=self.model,
            height=self.height,
            width=self.width,
            t_index_list=self.t_index_list,
            bank_kind=self.bank.kind,
            bank_frames=self.bank.frames,
            vae=self.vae.value,
            precision=self.precision.value,
            ff_threshold=self.bank.ff_threshold,
            ff_strength=self.bank.ff_strength,
            weights_hash=weights_hash,
            need="onnx" if self.onnx_only else "engine",
            builder=None if self.builder is Builder.AUTO else self.builder.value,
            cfg_type=self.cfg_type,
            loras=self.loras,
        )


def default_t_index_list(steps: int, preset_default: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """`--steps N`: the preset's own list when it has N steps, else StreamV2V's strength-0.4 schedule.

    Only the count changes the engines (it is the UNet batch); the values are runtime inputs.
    """
    from streamv2v_trt.config import t_index_list_from_strength

    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if preset_default is not None and len(preset_default) == steps:
        return preset_default
    if steps == 1:
        return (32,)
    return t_index_list_from_strength(0.4, steps)


__all__ = ["BankKind", "BuildConfig", "Builder", "Precision", "default_t_index_list"]
