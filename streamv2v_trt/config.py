"""Frozen configs of a stream: the `EngineSpec` it runs (build-time) plus what may change at runtime.

A `StreamConfig` holds the spec and never restates it: `cfg.height`, `cfg.steps`, `cfg.stream_batch` read the spec.
Fields a command line sets carry their flag and help (`flags.flag`), so the CLIs read their defaults from here.
What is not in the spec is chosen per stream without a rebuild: the timesteps (only their count is compiled),
the noise seed, the guidance scale, how often the bank is updated, DyMe's random split, and each ControlNet's
scale and control image kind.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .flags import flag
from .spec import CfgType, EngineSpec

SIMILAR_S, MAX_SKIP = ("--similar-threshold",), ("--max-skip",)  # the similar-frame filter's flags
GUIDED_SCALE = 1.2  # StreamDiffusion's guidance scale, what the CLIs use when a --cfg-type guides (g <= 1: off)


@dataclass(frozen=True)
class BankConfig:
    """How the bank is updated at runtime. Its size and the fusion constants are compiled (EngineSpec)."""

    interval: int = 4  # update the bank every `interval` UNet calls (frame ids 0, 4, 8, ...)
    seed: int = 0  # DyMe's random bipartite split
    perm_pool: int = 32  # seeded permutations drawn up front, so a merge never needs the host

    def __post_init__(self) -> None:
        if self.interval < 1 or self.perm_pool < 1:
            raise ValueError(f"bank interval and perm_pool must be >= 1, got {self}")


@dataclass(frozen=True)
class SimilarFilterConfig:
    """Similar-frame skip (streamv2v_trt/similar_filter.py): off by default, on for live sources."""

    enabled: bool = field(
        default=False,
        metadata=flag(
            "skip (repeat the last output for) input frames nearly equal to the last processed one",
            names=("--similar-filter",),
            switch=True,
        ),
    )
    # Cosine similarity of consecutive input frames from which a frame may be skipped.
    threshold: float = field(
        default=0.98, metadata=flag("cosine similarity in [0, 1] from which frames may be skipped", names=SIMILAR_S)
    )
    max_skip: int = field(default=10, metadata=flag("most frames skipped in a row (0 never skips)", names=MAX_SKIP))
    seed: int = 0  # the skip decisions are random (probability grows with similarity) and reproducible

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"similar-frame threshold must be in [0, 1], got {self.threshold}")
        if self.max_skip < 0:
            raise ValueError(f"similar-frame max_skip must be >= 0 (0 never skips), got {self.max_skip}")


@dataclass(frozen=True)
class StreamConfig:
    spec: EngineSpec
    t_index_list: tuple[int, ...] = ()  # indices into the 50-step LCM schedule, one per step; () = spec's default
    num_inference_steps: int = 50
    # The per-slot noise.
    seed: int = field(default=2, metadata=flag("noise seed (and DyMe's merge seed, and the similar-frame filter's)"))
    guidance_scale: float = field(
        default=1.0,
        metadata=flag(
            "guidance scale g (> 1 to guide)",
            metavar="G",
            default_text=f"{GUIDED_SCALE:g} when --cfg-type guides, else 1",
        ),
    )
    # RCFG: scale of the stock noise used as the negative.
    delta: float = field(default=1.0, metadata=flag("RCFG (self, initialize): scale of the stock noise", metavar="D"))
    resize: bool = False  # resize frames of another size instead of refusing them
    bank: BankConfig = field(default_factory=BankConfig)
    similar_filter: SimilarFilterConfig = field(default_factory=SimilarFilterConfig)
    # One scale per ControlNet of the spec (() = 1 each): live, `StreamV2V.update_control(scales=...)`; 0 is exact.
    controlnet_scales: tuple[float, ...] = ()
    # One control image kind per ControlNet (() = "frame" each): what each ControlNet is shown (control_net.py).
    control_kinds: tuple[str, ...] = ()
    # Fill the stream batch from the first frame after a reset (steps - 1 extra UNet calls on that frame),
    # so the first output is a full translation instead of a decode of zero latents. docs/FEATURES.md.
    prime: bool = field(
        default=False,
        metadata=flag(
            "fill the stream batch from the first frame (--steps > 1): the first outputs are translations of it, not "
            "decodes of empty latents",
            switch=True,
        ),
    )

    def __post_init__(self) -> None:
        if not isinstance(self.spec, EngineSpec):
            raise TypeError(f"StreamConfig.spec must be an EngineSpec, got {type(self.spec).__name__}")
        t_index = tuple(int(t) for t in self.t_index_list) or self.spec.default_t_index_list()
        object.__setattr__(self, "t_index_list", t_index)
        if len(t_index) != self.spec.steps:
            raise ValueError(
                f"t_index_list {t_index} has {len(t_index)} step(s), the spec {self.spec.steps}: "
                "the number of steps is compiled (EngineSpec.steps), their values are not"
            )
        if any(not 0 <= t < self.num_inference_steps for t in t_index):
            raise ValueError(f"t_index_list must hold indices in [0, {self.num_inference_steps}), got {t_index}")
        n = len(self.spec.controlnets)
        scales = tuple(float(x) for x in self.controlnet_scales) or (1.0,) * n
        kinds = tuple(str(getattr(k, "value", k)) for k in self.control_kinds) or ("frame",) * n
        if len(scales) != n or len(kinds) != n:
            raise ValueError(
                f"the spec has {n} ControlNet(s) {list(self.spec.controlnets)}: give one scale and one control kind "
                f"each, got scales {scales} and kinds {kinds}"
            )
        object.__setattr__(self, "controlnet_scales", scales)
        object.__setattr__(self, "control_kinds", kinds)

    @classmethod
    def from_spec(cls, spec: EngineSpec, **runtime) -> StreamConfig:
        """The stream config of `spec` with runtime settings (`t_index_list`, `seed`, `bank`, ...) given or
        defaulted. Unknown names raise: a build-time setting belongs in the spec."""
        unknown = sorted(set(runtime) - ({f.name for f in dataclasses.fields(cls)} - {"spec"}))
        if unknown:
            raise TypeError(f"{unknown} are not runtime settings of a stream (build-time ones go in EngineSpec)")
        return cls(spec=spec, **runtime)

    def with_spec(self, **changes) -> StreamConfig:
        """This config with spec fields changed (the timesteps are re-defaulted when the step count changes)."""
        spec = dataclasses.replace(self.spec, **changes)
        t_index = self.t_index_list if spec.steps == self.spec.steps else ()
        same = spec.controlnets == self.spec.controlnets  # else the ControlNets' runtime settings are re-defaulted
        control = {} if same else {"controlnet_scales": (), "control_kinds": ()}
        return dataclasses.replace(self, spec=spec, t_index_list=t_index, **control)

    # The spec's facts, read where they are kept (never copied).
    @property
    def height(self) -> int:
        return self.spec.height

    @property
    def width(self) -> int:
        return self.spec.width

    @property
    def steps(self) -> int:
        return self.spec.steps

    @property
    def stream_batch(self) -> int:
        """This stream's part of the UNet batch (`EngineSpec.stream_batch`; the UNet's batch is
        `EngineSpec.unet_batch`, max_streams streams side by side)."""
        return self.spec.stream_batch

    @property
    def cfg_type(self) -> CfgType:
        return self.spec.cfg_type
