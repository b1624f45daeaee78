"""Frozen configs: what the bank and the stream do. Engines record these in their manifest."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class BankKind(str, enum.Enum):
    DYME = "dyme"  # one frame of tokens, merged with every stored frame (the paper's default)
    FIFO = "fifo"  # the last k stored frames (ablation)


class CfgType(str, enum.Enum):
    """Guidance, as StreamDiffusion defines it (docs/FEATURES.md has the formulas)."""

    NONE = "none"
    SELF = "self"  # RCFG with the stock noise as the negative (StreamDiffusion's "self")
    INITIALIZE = "initialize"  # RCFG whose slot-0 negative is a real uncond UNet pass: one extra batch element
    FULL = "full"  # classic CFG: an uncond copy of every slot, twice the UNet batch (its own engine)

    def unet_batch(self, steps: int) -> int:
        """The UNet batch this guidance needs for `steps` denoising steps (what the engine is built for)."""
        return {CfgType.INITIALIZE: steps + 1, CfgType.FULL: 2 * steps}.get(self, steps)


# Layers whose attention output is fused with the bank: the low-resolution ones (DESIGN.md §3).
FF_LAYER_PREFIXES = ("mid_block.", "up_blocks.0.", "up_blocks.1.")


@dataclass(frozen=True)
class BankConfig:
    kind: BankKind = BankKind.DYME
    frames: int = 1  # bank size in frames of tokens; DyMe always keeps 1
    interval: int = 4  # update the bank every `interval` UNet calls (frame ids 0, 4, 8, ...)
    ff_threshold: float = 0.98
    ff_strength: float = 0.8
    ff_layer_prefixes: tuple[str, ...] = FF_LAYER_PREFIXES
    seed: int = 0  # DyMe's random bipartite split
    perm_pool: int = 32  # seeded permutations drawn up front, so a merge never needs the host

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", BankKind(self.kind))
        if self.kind is BankKind.DYME and self.frames != 1:
            raise ValueError(f"a DyMe bank holds exactly 1 frame of tokens, got frames={self.frames}; use --bank fifo")
        if self.frames < 1 or self.interval < 1 or self.perm_pool < 1:
            raise ValueError(f"bank frames, interval and perm_pool must be >= 1, got {self}")
        if not 0.0 <= self.ff_strength <= 1.0:
            raise ValueError(f"ff_strength must be in [0, 1], got {self.ff_strength}")

    @property
    def slots(self) -> int:
        return self.frames

    def fuses(self, layer_name: str) -> bool:
        return layer_name.startswith(self.ff_layer_prefixes)


@dataclass(frozen=True)
class SimilarFilterConfig:
    """Similar-frame skip (streamv2v_trt/similar_filter.py): off by default, on for live sources."""

    enabled: bool = False
    threshold: float = 0.98  # cosine similarity of consecutive input frames from which a frame may be skipped
    max_skip: int = 10  # at most this many skipped frames in a row
    seed: int = 0  # the skip decisions are random (probability grows with similarity) and reproducible

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"similar-frame threshold must be in [0, 1], got {self.threshold}")
        if self.max_skip < 0:
            raise ValueError(f"similar-frame max_skip must be >= 0 (0 never skips), got {self.max_skip}")


@dataclass(frozen=True)
class StreamConfig:
    height: int = 512
    width: int = 512
    t_index_list: tuple[int, ...] = (32,)  # indices into the 50-step LCM schedule, one per denoising step
    num_inference_steps: int = 50
    seed: int = 2
    cfg_type: CfgType = CfgType.NONE
    guidance_scale: float = 1.0
    delta: float = 1.0  # RCFG: scale of the stock noise used as the negative
    resize: bool = False  # resize frames of another size instead of refusing them
    bank: BankConfig = field(default_factory=BankConfig)
    similar_filter: SimilarFilterConfig = field(default_factory=SimilarFilterConfig)
    # Fill the stream batch from the first frame after a reset (steps - 1 extra UNet calls on that frame),
    # so the first output is a full translation instead of a decode of zero latents. docs/FEATURES.md.
    prime: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "cfg_type", CfgType(self.cfg_type))
        object.__setattr__(self, "t_index_list", tuple(int(t) for t in self.t_index_list))
        if self.height % 8 or self.width % 8:
            raise ValueError(f"height and width must be multiples of 8, got {self.height}x{self.width}")
        if not self.t_index_list or any(not 0 <= t < self.num_inference_steps for t in self.t_index_list):
            raise ValueError(
                f"t_index_list must hold indices in [0, {self.num_inference_steps}), got {self.t_index_list}"
            )

    @property
    def steps(self) -> int:
        return len(self.t_index_list)

    @property
    def unet_batch(self) -> int:
        """UNet (and bank) batch: steps, + 1 for RCFG initialize, x 2 for full CFG. Engines are built for it."""
        return self.cfg_type.unet_batch(self.steps)


def t_index_list_from_strength(strength: float, steps: int, num_inference_steps: int = 50) -> tuple[int, ...]:
    """StreamV2V's schedule: start at int(50 * (1 - strength)), stride int(50 * strength) // steps."""
    init = int(num_inference_steps * (1 - strength))
    stride = max(1, int(num_inference_steps * strength) // steps)
    return tuple(min(init + i * stride, num_inference_steps - 1) for i in range(steps))
