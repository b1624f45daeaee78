"""`EngineSpec`: what a build is specialised for, in one frozen record.

Everything that changes the compiled networks lives here and nowhere else: model and weights, VAE, precision,
frame size, UNet batch (steps and guidance), the build-time part of the bank (kind, frames, fusion constants),
LoRAs and ControlNets (which ones, not their scales). The build config holds a spec (plus where and how to build),
the manifest stores it and compares it field by field, and a `StreamConfig` holds one (plus what may change at
runtime: timesteps, seed, interval, guidance scale, ControlNet scales). This module imports no model library
(diffusers, transformers), so reading a spec is cheap.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .flags import argv, flag
from .flavours import Builder, build_for
from .frame_sizes import parse_size, size_text
from .presets import CONTROLNET_PRESETS, PRESETS

# Layers whose attention output is fused with the bank: the low-resolution ones (docs/DESIGN.md, "Feature fusion").
FF_LAYER_PREFIXES = ("mid_block.", "up_blocks.0.", "up_blocks.1.")
# A build for several frame sizes: every size a multiple of SIZE_STEP pixels (the latent then halves exactly at each
# UNet level, so every size's bank has whole token counts), at most MAX_SIZES sizes (each is its own set of networks).
SIZE_STEP = 64
MAX_SIZES = 32
PRESET = "the preset's"  # --help's default of the fields `EngineSpec.resolve` fills from the model preset
ALWAYS_FLAGS = ("model", "precision")  # in every build command: build_engines' precision depends on the builder


class BankKind(str, enum.Enum):
    DYME = "dyme"  # one frame of tokens, merged with every stored frame (the paper's default)
    FIFO = "fifo"  # the last k stored frames (ablation)


class CfgType(str, enum.Enum):
    """Guidance, as StreamDiffusion defines it (docs/FEATURES.md has the formulas)."""

    NONE = "none"
    SELF = "self"  # RCFG with the stock noise as the negative (StreamDiffusion's "self")
    INITIALIZE = "initialize"  # RCFG whose slot-0 negative is a real uncond UNet pass: one extra batch element
    FULL = "full"  # classic CFG: an uncond copy of every slot, twice the UNet batch (its own engine)

    def uncond_elements(self, steps: int) -> int:
        """UNet batch elements in front of the stream slots that run the negative prompt."""
        return {CfgType.INITIALIZE: 1, CfgType.FULL: steps}.get(self, 0)


class VaeKind(str, enum.Enum):
    TAESD = "taesd"  # the tiny autoencoder (fast)
    FULL = "full"  # the model's KL autoencoder


class Precision(str, enum.Enum):
    FP16 = "fp16"  # what GPUs run: TensorRT-RTX is strongly typed, so the exported graph itself is fp16
    FP32 = "fp32"  # CPU parity tests (ONNX Runtime, AOTInductor on the CPU)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float16 if self is Precision.FP16 else torch.float32

    @classmethod
    def of(cls, dtype: torch.dtype) -> Precision:
        if dtype not in (torch.float16, torch.float32):
            raise ValueError(f"dtype {dtype} is not supported: use torch.float16 or torch.float32")
        return cls.FP16 if dtype == torch.float16 else cls.FP32


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA file and the scale it is fused with.

    `sha256` identifies the file's contents: computed from `path` when not given; a manifest gives it (its
    `path` is then only the file name the build used). Specs compare LoRAs by contents and scale, not names.
    """

    path: Path
    scale: float = 1.0
    sha256: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        object.__setattr__(self, "scale", float(self.scale))

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """`file.safetensors` or `file.safetensors:0.8` (the CLI's `--lora` value)."""
        path, sep, scale = text.rpartition(":")
        if sep and path and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", scale):
            return cls(Path(path), float(scale))
        return cls(Path(text), 1.0)

    def cli_arg(self) -> str:
        return f"{self.path}:{self.scale:g}"

    def digest(self) -> str:
        if self.sha256 is not None:
            return self.sha256
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        object.__setattr__(self, "sha256", h.hexdigest())  # a cache of the file's hash, not state
        return self.sha256

    def record(self) -> dict:
        return {"name": self.path.name, "sha256": self.digest(), "scale": self.scale}


@dataclass(frozen=True)
class EngineSpec:
    """What the networks are built for. Two specs that differ in any field need different builds."""

    model: str = field(
        metadata=flag(
            f"preset ({', '.join(PRESETS)}; random weights unless real ones are in the "
            "Hugging Face cache), a local diffusers folder or a hub id"
        )
    )
    height: int = field(default=512, metadata=flag("frame height in pixels, a multiple of 8", default_text=PRESET))
    width: int = field(default=512, metadata=flag("frame width in pixels, a multiple of 8", default_text=PRESET))
    # Denoising steps: the stream batch. Only the count is compiled; the timestep values are runtime inputs.
    steps: int = field(
        default=1,
        metadata=flag(
            "denoising steps per frame (only the count is compiled; the timesteps are chosen at runtime)",
            default_text=PRESET,
        ),
    )
    cfg_type: CfgType = field(
        default=CfgType.NONE,
        metadata=flag(
            "guidance the UNet batch is sized for: none and self (RCFG, free) = steps, initialize (RCFG) = steps + 1, "
            "full (classic CFG) = 2 x steps"
        ),
    )
    bank: BankKind = field(default=BankKind.DYME, metadata=flag("feature bank kind"))
    bank_frames: int = field(default=1, metadata=flag("frames held by a fifo bank (dyme always holds 1)"))
    ff_threshold: float = field(  # from this cosine similarity on a token is fused (compiled in)
        default=0.98, metadata=flag("feature-fusion cosine threshold (compiled in)")
    )
    ff_strength: float = field(  # blend weight of the banked token (compiled in)
        default=0.8, metadata=flag("feature-fusion blend strength (compiled in)")
    )
    ff_layer_prefixes: tuple[str, ...] = field(
        default=FF_LAYER_PREFIXES,
        metadata=flag(
            "comma-separated prefixes of the layers with feature fusion",
            names=("--ff-layers",),
            metavar="P1,P2,..",
            parse=lambda text: tuple(p for p in text.split(",") if p),
            show=",".join,
        ),
    )
    vae: VaeKind = field(default=VaeKind.TAESD, metadata=flag("taesd (fast) or the model's full KL autoencoder"))
    precision: Precision = field(
        default=Precision.FP16,
        metadata=flag(  # fp32 for CPU runs (the CLIs pick it)
            "fp16 for GPUs (the exported graph itself is fp16); fp32 for CPU parity"
        ),
    )
    # Fused into the UNet (and text encoder) before anything runs, in order.
    loras: tuple[LoraSpec, ...] = field(
        default=(),
        metadata=flag(
            "LoRA .safetensors fused into the UNet and text encoder with SCALE (default 1); repeatable. A build folder "
            "with frozen weights runs only the LoRAs it was built with; one built with swappable weights takes any "
            "set, applied when it opens",
            names=("--lora",),
            metavar="FILE[:SCALE]",
            parse=LoraSpec.parse,
            show=LoraSpec.cli_arg,
            repeat=True,
        ),
    )
    # ControlNets whose residuals the UNet adds (docs/FEATURES.md, "ControlNet"): presets (`CONTROLNET_PRESETS`),
    # local diffusers folders or hub ids, in order. Their scales and control images are runtime state (StreamConfig).
    controlnets: tuple[str, ...] = field(
        default=(),
        metadata=flag(
            f"ControlNets ({', '.join(CONTROLNET_PRESETS)}; random weights unless real ones are in the Hugging Face "
            "cache), local diffusers ControlNet folders or hub ids, comma-separated: the UNet takes their summed "
            "residuals (a build compiles each as its own network, controlnet_<j>); scales are set at runtime",
            names=("--controlnet",),
            metavar="NAME_OR_PATH[,..]",
            parse=lambda text: tuple(p for p in text.split(",") if p),
            show=",".join,
        ),
    )
    # Seed of a preset's random weights (used only when no real weights are on disk).
    weights_seed: int = field(
        default=0,
        metadata=flag(
            "seed of a preset's random weights (used only without real weights)", names=("--weights-seed", "--seed")
        ),
    )
    # Every frame size the build serves, (height, width) each, sorted; () = only (height, width). (height, width) is
    # where a stream starts and one of them. Each size has its own static networks in the one folder.
    sizes: tuple[tuple[int, int], ...] = field(
        default=(),
        metadata=flag(
            "every frame size the build serves, WIDTHxHEIGHT: a list 512x512,768x512 or a range 256x256-512x512 "
            f"(every multiple of {SIZE_STEP} between, both dimensions; at most {MAX_SIZES} sizes), multiples of "
            f"{SIZE_STEP}; --height/--width (where a stream starts) default to the first",
            metavar="WxH,WxH|WxH-WxH",
            parse=lambda text: parse_sizes(text),  # defined below the class
            show=lambda sizes: show_sizes(sizes),
        ),
    )
    # Streams batched into one network call (MultiStream slots); 1 for a single stream.
    max_streams: int = field(
        default=1,
        metadata=flag("streams batched into one network call (python -m streamv2v_trt serve --streams K runs them)"),
    )

    def __post_init__(self) -> None:
        for name, kind in (("cfg_type", CfgType), ("bank", BankKind), ("vae", VaeKind), ("precision", Precision)):
            object.__setattr__(self, name, kind(getattr(self, name)))
        object.__setattr__(self, "loras", tuple(self.loras))
        object.__setattr__(self, "ff_layer_prefixes", tuple(self.ff_layer_prefixes))
        object.__setattr__(self, "controlnets", tuple(str(c) for c in self.controlnets))
        if any(not c for c in self.controlnets):
            raise ValueError(f"controlnets must name presets, folders or hub ids, got {self.controlnets}")
        if self.height % 8 or self.width % 8 or self.height < 8 or self.width < 8:
            raise ValueError(f"height and width must be positive multiples of 8, got {self.height}x{self.width}")
        object.__setattr__(self, "sizes", _check_sizes(self.sizes, (self.height, self.width)))
        if self.steps < 1 or self.max_streams < 1:
            raise ValueError(f"steps and max_streams must be >= 1, got {self.steps} and {self.max_streams}")
        if self.bank is BankKind.DYME and self.bank_frames != 1:
            raise ValueError(f"a DyMe bank holds exactly 1 frame of tokens, got bank_frames={self.bank_frames}")
        if self.bank_frames < 1:
            raise ValueError(f"bank_frames must be >= 1, got {self.bank_frames}")
        if not 0.0 <= self.ff_strength <= 1.0:
            raise ValueError(f"ff_strength must be in [0, 1], got {self.ff_strength}")

    @classmethod
    def resolve(
        cls,
        model: str,
        *,
        height: int | None = None,
        width: int | None = None,
        steps: int | None = None,
        **fields,
    ) -> EngineSpec:
        """A spec with the model preset's defaults (size, steps) for what is None: the one place CLIs and
        benchmarks fill defaults. A folder or hub id defaults to 512x512, 1 step."""
        preset = PRESETS.get(model)
        first = tuple(fields["sizes"][0]) if fields.get("sizes") else None  # a multi-size build starts at its first
        return cls(
            model=model,
            height=height or (first[0] if first else preset.height if preset else 512),
            width=width or (first[1] if first else preset.width if preset else 512),
            steps=steps or (len(preset.t_index_list) if preset else 1),
            **{k: v for k, v in fields.items() if v is not None},
        )

    # -- what the spec implies ------------------------------------------------------------------------------
    @property
    def served_sizes(self) -> tuple[tuple[int, int], ...]:
        """Every (height, width) the networks are built for: `sizes`, or the one size."""
        return self.sizes or ((self.height, self.width),)

    @property
    def stream_batch(self) -> int:
        """One stream's UNet (and bank) batch: uncond elements (guidance) + one stream slot per step."""
        return self.cfg_type.uncond_elements(self.steps) + self.steps

    @property
    def unet_batch(self) -> int:
        """The UNet's batch: every stream's batch, `max_streams` streams side by side."""
        return self.max_streams * self.stream_batch

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // 8, self.width // 8

    @property
    def bank_slots(self) -> int:
        return self.bank_frames

    def fuses(self, layer_name: str) -> bool:
        """Whether the self-attention layer `layer_name` applies feature fusion (and its bank holds O)."""
        return layer_name.startswith(self.ff_layer_prefixes)

    def default_t_index_list(self) -> tuple[int, ...]:
        return default_t_index_list(self.steps, self.model)

    # -- comparing and naming -------------------------------------------------------------------------------
    def differences(self, asked: EngineSpec) -> list[str]:
        """What differs between this (built) spec and `asked`, field by field, in words.

        Guidance is compared by the UNet batch it needs (none and self share a build). LoRAs by file contents
        and scale. `weights_seed` only matters for random weights; the weights hash check covers it. Sizes: a build
        for sizes S serves every spec whose size and sizes are all in S (it may start at any of them).
        """
        diffs = []
        if self.sizes or asked.sizes:
            missing = [s for s in asked.served_sizes if s not in self.served_sizes]
            if missing:
                diffs.append(
                    f"sizes: engines have {show_sizes(self.served_sizes)}, asked {show_sizes(asked.served_sizes)} "
                    f"({show_sizes(missing)} not built)"
                )
        for f in dataclasses.fields(self):
            if f.name in ("cfg_type", "loras", "weights_seed", "sizes") or (
                f.name in ("height", "width") and (self.sizes or asked.sizes)
            ):
                continue
            have, want = getattr(self, f.name), getattr(asked, f.name)
            if have != want:
                diffs.append(f"{f.name}: engines have {_show(have)}, asked {_show(want)}")
        if self.stream_batch != asked.stream_batch:
            diffs.append(
                f"UNet batch: engines have {self.stream_batch} per stream ({self.steps} step(s), guidance "
                f"{self.cfg_type.value}), asked {asked.stream_batch} ({asked.steps} step(s), guidance "
                f"{asked.cfg_type.value})"
            )
        have = [(lora.digest(), lora.scale) for lora in self.loras]
        if have != [(lora.digest(), lora.scale) for lora in asked.loras]:
            built = ", ".join(f"{lora.path.name}:{lora.scale:g}" for lora in self.loras) or "no LoRA"
            want = ", ".join(lora.cli_arg() for lora in asked.loras) or "no LoRA"
            diffs.append(f"loras: engines were built with {built}, asked {want} (file contents or scales differ)")
        return diffs

    def folder_name(self, builder: str | None = None) -> str:
        """The one naming rule for build folders: everything the networks are specialised for, so builds for
        another size, batch or bank never overwrite each other. AOTInductor packages get their own folder."""
        name = Path(self.model).name or "model"
        streams = f"-s{self.max_streams}" if self.max_streams > 1 else ""
        suffix = "-aoti" if builder == Builder.AOTI else ""
        # ControlNets add networks and UNet inputs: their own folder, named by the last part of each name
        control = f"-cn-{'+'.join(Path(c).name for c in self.controlnets)}" if self.controlnets else ""
        return (
            f"{name}-{_sizes_label(self.served_sizes)}-b{self.stream_batch}{streams}-{self.bank.value}{self.bank_frames}"
            f"-{self.vae.value}-{self.precision.value}{control}{suffix}"
        )

    def build_command(self, out: Path | str | None = None, builder: str | None = None, onnx_only: bool = False) -> str:
        """The exact `python -m build_engines` command that builds this spec (into `out`): the flags of the fields
        that differ from the command's defaults (the preset's size and steps), the model and precision always."""
        # A multi-size build names its start size: parsing defaults it to the first size, not the preset's.
        always = ALWAYS_FLAGS + (("height", "width") if self.sizes else ())
        args = ["python", "-m", "build_engines", *argv(self, EngineSpec.resolve(self.model), always=always)]
        if builder:
            args += ["--builder", Builder(builder).value]
        if onnx_only:
            args.append("--onnx-only")
        if out is not None:
            args += ["--out", str(out)]
        return shlex.join(args)

    def rebuild_command(self, backend: str, directory: Path | str | None = None, built: str | None = None) -> str:
        """The one rebuild text: the command that builds this spec for `backend` (`flavours.build_for`). Into
        `directory` when given (the same spec: files damaged, another GPU or torch); else into the spec's own
        folder (the naming rule), which the text names. `built`: the builder of the folder at hand, whose TensorRT
        flavour a rebuild keeps."""
        builder, onnx_only = build_for(backend, built)
        if directory is not None:
            return self.build_command(directory, builder=builder, onnx_only=onnx_only)
        folder = Path("engines") / self.folder_name(builder)
        return f"{self.build_command(builder=builder, onnx_only=onnx_only)} (writes {folder}; open that folder)"

    # -- JSON (the manifest) --------------------------------------------------------------------------------
    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.update({k: v.value for k, v in d.items() if isinstance(v, enum.Enum)})
        d["ff_layer_prefixes"] = list(self.ff_layer_prefixes)
        d["loras"] = [lora.record() for lora in self.loras]
        d["sizes"] = [f"{w}x{h}" for h, w in self.sizes]
        d["controlnets"] = list(self.controlnets)
        return d

    @classmethod
    def from_json(cls, d: dict) -> EngineSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown spec fields {unknown}: written by a newer version?")
        loras = tuple(LoraSpec(Path(r["name"]), r["scale"], r["sha256"]) for r in d.get("loras", ()))
        sizes = tuple(parse_size(text) for text in d.get("sizes", ()))  # older manifests: one size
        prefixes = tuple(d.get("ff_layer_prefixes", FF_LAYER_PREFIXES))
        # Manifests older than ControlNet support have no "controlnets": none.
        controlnets = tuple(d.get("controlnets", ()))
        return cls(**{**d, "loras": loras, "ff_layer_prefixes": prefixes, "sizes": sizes, "controlnets": controlnets})


def show_sizes(sizes) -> str:
    return ",".join(size_text(s) for s in sizes)


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """`--sizes`: '512x512,768x512' (a list) or '256x256-512x512' (every multiple of SIZE_STEP from the first to
    the second, in both dimensions). (height, width) each, in the order given (a range: smallest first)."""
    low, sep, high = text.partition("-")
    if not sep:
        return tuple(parse_size(part) for part in text.split(",") if part.strip())
    (h0, w0), (h1, w1) = parse_size(low), parse_size(high)
    if any(v % SIZE_STEP for v in (h0, w0, h1, w1)) or h0 > h1 or w0 > w1:
        raise ValueError(
            f"--sizes {text}: a range goes from the smaller WIDTHxHEIGHT to the larger, both multiples of {SIZE_STEP} "
            "in each dimension, e.g. 256x256-512x512"
        )
    heights, widths = range(h0, h1 + 1, SIZE_STEP), range(w0, w1 + 1, SIZE_STEP)
    if len(heights) * len(widths) > MAX_SIZES:
        raise ValueError(
            f"--sizes {text} is {len(heights) * len(widths)} sizes ({len(widths)} widths x {len(heights)} heights, "
            f"every multiple of {SIZE_STEP}); a build holds at most {MAX_SIZES}, each its own set of networks: "
            "narrow the range or list the sizes (512x512,768x512)"
        )
    return tuple((h, w) for h in heights for w in widths)


def _check_sizes(sizes, start: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """`EngineSpec.sizes`, checked and sorted; one size that is the start size is the single-size spec, ()."""
    sizes = tuple(sorted((int(h), int(w)) for h, w in sizes))
    if not sizes or sizes == (start,):
        return ()
    shown = show_sizes(sizes)
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"sizes {shown} name a size twice")
    if len(sizes) > MAX_SIZES:
        raise ValueError(f"sizes {shown}: a build holds at most {MAX_SIZES} sizes (each its own set of networks)")
    bad = [s for s in sizes if s[0] % SIZE_STEP or s[1] % SIZE_STEP or min(s) < SIZE_STEP]
    if bad:
        raise ValueError(
            f"sizes {show_sizes(bad)}: a build for several sizes needs multiples of {SIZE_STEP} in both dimensions"
        )
    if start not in sizes:
        raise ValueError(
            f"the start size {size_text(start)} (--width x --height) is not among the sizes {shown}: add it, or "
            "leave --height/--width out (they default to the first size)"
        )
    return sizes


def _sizes_label(sizes: tuple[tuple[int, int], ...]) -> str:
    """The folder name's size part: '512x512' for one size, '256x256-512x512' for a whole range, up to four sizes
    joined by '+', else the smallest and largest with the count and a hash of the set (names differ per set)."""
    if len(sizes) == 1:
        return size_text(sizes[0])
    heights, widths = sorted({h for h, _ in sizes}), sorted({w for _, w in sizes})
    if len(heights) * len(widths) == len(sizes) and all(
        b - a == SIZE_STEP for values in (heights, widths) for a, b in zip(values, values[1:])
    ):  # every multiple of SIZE_STEP between the smallest and the largest, in both dimensions
        return f"{size_text((heights[0], widths[0]))}-{size_text((heights[-1], widths[-1]))}"
    if len(sizes) <= 4:
        return "+".join(size_text(s) for s in sizes)
    digest = hashlib.sha256(show_sizes(sizes).encode()).hexdigest()[:6]
    return f"{size_text(sizes[0])}+{len(sizes) - 1}more-{digest}"


def _show(value) -> str:
    return str(value.value) if isinstance(value, enum.Enum) else repr(value) if isinstance(value, str) else str(value)


def t_index_list_from_strength(strength: float, steps: int, num_inference_steps: int = 50) -> tuple[int, ...]:
    """StreamV2V's schedule: start at int(50 * (1 - strength)), stride int(50 * strength) // steps."""
    if not 0.0 < strength <= 1.0 or steps < 1:
        raise ValueError(f"strength must be in (0, 1] and steps >= 1, got {strength} and {steps}")
    init = int(num_inference_steps * (1 - strength))
    stride = max(1, int(num_inference_steps * strength) // steps)
    return tuple(min(init + i * stride, num_inference_steps - 1) for i in range(steps))


def default_t_index_list(steps: int, model: str | None = None) -> tuple[int, ...]:
    """The timesteps a stream of `steps` steps uses unless told: the preset's own list when it has that many
    steps (sd-turbo [32], sd15 [30, 35, 40, 45]), else [32] for one step, else StreamV2V's strength-0.4 schedule."""
    preset = PRESETS.get(model) if model else None
    if preset is not None and len(preset.t_index_list) == steps:
        return preset.t_index_list
    return (32,) if steps == 1 else t_index_list_from_strength(0.4, steps)
