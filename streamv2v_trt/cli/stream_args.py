"""Flags shared by every subcommand that runs a stream (`video`, `serve`): parsed into a `Source` and a
`StreamConfig` (`stream_request`), which the subcommand opens with `source.open_stream` / `open_multistream`.

Without `--engines` the eager PyTorch pipeline is built from `--model` (optionally `--compile`d); with
`--engines DIR` the build folder runs on `--backend` (default: what the folder was built for). What the
engines were built for (size, steps, bank, VAE, model; LoRAs unless its weights are swappable) cannot change at
runtime: such flags are checked against the folder and refused when they differ (a folder with swappable weights
takes any `--lora` set, applied when it opens). Runtime settings (seed, strength, guidance scale,
priming, the similar-frame filter) apply to both. `--cuda-graphs` replays whole frames from CUDA graphs.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..config import GUIDED_SCALE, BankConfig, SimilarFilterConfig, StreamConfig
from ..control_images import ControlKind
from ..flags import add_flags, field_default, option, values
from ..flavours import ENGINE_BACKENDS, BackendKind, folder_backend
from ..frame_sizes import size_text
from ..manifest import Manifest
from ..presets import ModelUnavailable
from ..source import DEFAULT_MODEL, Source
from ..spec import CfgType, EngineSpec, LoraSpec, Precision, show_sizes, t_index_list_from_strength

log = logging.getLogger(__name__)

FILTER_FLAGS = ("enabled", "threshold", "max_skip")  # SimilarFilterConfig's: --similar-filter, --similar-threshold, ..


class CliError(RuntimeError):
    """A user mistake or an unusable input: printed as one line, exit code 1."""


# Flags that come from config fields (help and defaults there): what a build fixes (compared with a folder's spec),
# where the networks come from, and the runtime settings.
FIXED_FLAGS = ("model", "height", "width", "steps", "bank", "bank_frames", "vae", "controlnets")
SOURCE_FLAGS = ("engines", "backend", "device", "threads", "compile", "cuda_graphs")
FOLDER_S = ", or the build folder's"


def add_stream_args(parser: argparse.ArgumentParser, *, live: bool = False) -> None:
    """The stream's flags. live=True (the camera demo) turns priming and the similar-frame filter on by default."""
    g = parser.add_argument_group("model and stream")
    add_flags(g, EngineSpec, ["model"], unset=["model"], unset_text=FOLDER_S, defaults={"model": DEFAULT_MODEL})
    add_flags(g, Source, SOURCE_FLAGS, defaults={"device": "auto"})
    add_flags(g, EngineSpec, [*FIXED_FLAGS[1:], "loras"], unset=FIXED_FLAGS, unset_text=FOLDER_S)
    add_flags(g, StreamConfig, ["seed"])
    g.add_argument("--strength", type=float, help="noise strength in (0, 1] (default: the model's schedule)")

    f = parser.add_argument_group("guidance and live features (docs/FEATURES.md)")
    add_flags(f, EngineSpec, ["cfg_type"], unset=["cfg_type"], unset_text=FOLDER_S)
    add_flags(f, StreamConfig, ["guidance_scale", "delta"], unset=["guidance_scale", "delta"])
    f.add_argument("--negative-prompt", metavar="TEXT", help="what to steer away from (--cfg-type initialize or full)")
    add_flags(f, StreamConfig, ["prime"], defaults={"prime": live})
    filter_on = "on, off with --cuda-graphs" if live else "off"
    add_flags(f, SimilarFilterConfig, FILTER_FLAGS, unset=FILTER_FLAGS, defaults={"enabled": filter_on})
    f.add_argument(
        "--control",
        metavar="KIND[:SCALE][,..]",
        help=f"per --controlnet, in order: what it is shown ({', '.join(k.value for k in ControlKind)}) and its "
        "conditioning scale (default 1; 0 adds nothing). Default: frame:1 each",
    )
    parser.set_defaults(live=live)


def parse_controls(text: str, controlnets: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """`--control KIND[:SCALE][,..]` -> (kinds, scales), one per ControlNet of `--controlnet`. CliError."""
    if not controlnets:
        raise CliError(f"--control {text} has no effect: no ControlNet; add --controlnet NAME_OR_PATH or drop the flag")
    kinds, scales = [], []
    for part in text.split(","):
        kind, _, scale = part.strip().partition(":")
        if kind not in {k.value for k in ControlKind}:
            raise CliError(
                f"--control {text}: control kind {kind!r} is unknown; use one of "
                f"{', '.join(k.value for k in ControlKind)} (KIND[:SCALE], e.g. canny:0.8)"
            )
        try:
            value = float(scale) if scale else 1.0
        except ValueError:
            raise CliError(f"--control {text}: scale {scale!r} of {kind} is not a number (KIND[:SCALE])") from None
        if not (math.isfinite(value) and value >= 0):
            raise CliError(f"--control {text}: the scale of {kind} must be a finite number >= 0, got {value}")
        kinds.append(kind)
        scales.append(value)
    if len(kinds) != len(controlnets):
        raise CliError(
            f"--control {text} gives {len(kinds)} control(s) for {len(controlnets)} ControlNet(s) "
            f"{','.join(controlnets)}: give one KIND[:SCALE] per --controlnet, in order"
        )
    return tuple(kinds), tuple(scales)


def device_of(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise CliError(f"--device {name!r} is not a device name (cpu, cuda, cuda:0, ...)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda asked, but PyTorch sees no CUDA GPU; use --device cpu")
    return device


def lora_specs(args: argparse.Namespace) -> tuple[LoraSpec, ...]:
    """The `--lora FILE[:SCALE]` values, each checked to be an existing .safetensors file with a finite scale."""
    for spec in args.lora:
        text = spec.cli_arg()
        if not spec.path.is_file():
            raise CliError(
                f"--lora {text}: no such file {str(spec.path)!r} (expected FILE.safetensors or FILE.safetensors:SCALE)"
            )
        if spec.path.suffix != ".safetensors":
            raise CliError(f"--lora {text}: only .safetensors files are loaded (pickled .bin/.ckpt files can run code)")
        if not math.isfinite(spec.scale):
            raise CliError(f"--lora {text}: the scale must be a finite number, got {spec.scale}")
    return tuple(args.lora)


def resolve_spec(args: argparse.Namespace, device: torch.device, manifest: Manifest | None = None) -> EngineSpec:
    """The one place the stream CLIs fill defaults: the preset's (eager) or the build folder's (`manifest`).

    Flags that a build fixes are compared with it: a different value is refused, never dropped."""
    asked = {name: value for name, value in values(args, EngineSpec, FIXED_FLAGS).items() if value is not None}
    cfg_type, loras = args.cfg_type, lora_specs(args)
    if manifest is None:
        precision = Precision.FP16 if device.type == "cuda" else Precision.FP32
        model = asked.pop("model", DEFAULT_MODEL)
        try:
            return EngineSpec.resolve(model, **asked, cfg_type=cfg_type, loras=loras, precision=precision)
        except ValueError as e:
            raise CliError(str(e)) from e
    built = manifest.spec
    size = (asked.get("height", built.height), asked.get("width", built.width))
    if size in built.served_sizes:  # a multi-size folder starts at any size it was built for
        asked.pop("height", None), asked.pop("width", None)
        built = dataclasses.replace(built, height=size[0], width=size[1])
    elif built.sizes:
        raise CliError(_size_refusal(args, built, size, engine_backend(args, manifest.builder, device), manifest))
    wrong = [
        f"{option(EngineSpec, name)} {_plain(value)} (engines: {_plain(getattr(built, name))})"
        for name, value in asked.items()
        if _plain(value) != _plain(getattr(built, name))
    ]
    if wrong:
        from ..build_folder import folder_rebuild

        rebuild = folder_rebuild(
            dataclasses.replace(built, **asked), args.engines, engine_backend(args, manifest.builder, device), manifest
        )
        raise CliError(
            f"the engines in {args.engines} were built for other settings: {', '.join(wrong)}; drop those flags or "
            f"rebuild: {rebuild}"
        )
    spec = built if cfg_type is None else dataclasses.replace(built, cfg_type=cfg_type)
    return dataclasses.replace(spec, loras=loras) if loras or built.loras else spec


def _size_refusal(
    args: argparse.Namespace, built: EngineSpec, size: tuple[int, int], backend: BackendKind, manifest: Manifest
) -> str:
    """A multi-size folder asked for a size it was not built for: its sizes, and the build that adds this one."""
    from ..build_folder import folder_rebuild

    have, want = show_sizes(built.served_sizes), size_text(size)
    try:
        wider = dataclasses.replace(built, height=size[0], width=size[1], sizes=(*built.sizes, size))
    except ValueError as e:  # not a size a multi-size build takes (multiples of 64)
        return f"the engines in {args.engines} were built for frame sizes {have}, not {want}: pick one ({e})"
    rebuild = folder_rebuild(wider, args.engines, backend, manifest)
    said = f"the engines in {args.engines} were built for frame sizes {have}, not {want}"
    return f"{said}: pick one, or rebuild: {rebuild}"


def _plain(value) -> str:
    if isinstance(value, tuple):  # --controlnet: as the flag takes it
        return ",".join(map(str, value)) or "none"
    return str(getattr(value, "value", value))


def stream_config(args: argparse.Namespace, spec: EngineSpec) -> StreamConfig:
    """`spec` with the runtime flags: seed, strength (timesteps), guidance, priming, similar-frame filter; what is
    not given is the config classes' default. Flags that would do nothing are refused."""
    t_index: tuple[int, ...] = ()
    if args.strength is not None:
        if not 0.0 < args.strength <= 1.0:
            raise CliError(f"--strength must be in (0, 1], got {args.strength}")
        t_index = t_index_list_from_strength(args.strength, spec.steps)
    similar = args.similar_filter if args.similar_filter is not None else args.live and not args.cuda_graphs
    _refuse_unused(args, spec, similar)
    runtime = values(args, StreamConfig, ["seed", "guidance_scale", "delta", "prime"])
    if runtime["guidance_scale"] is None and spec.cfg_type is not CfgType.NONE:
        runtime["guidance_scale"] = GUIDED_SCALE
    runtime = {k: field_default(StreamConfig, k) if v is None else v for k, v in runtime.items()}
    given = values(args, SimilarFilterConfig, FILTER_FLAGS)
    similar_filter = {k: field_default(SimilarFilterConfig, k) if v is None else v for k, v in given.items()}
    checks = (  # the values a flag must have, beyond what its config class checks
        (StreamConfig, runtime, "guidance_scale", lambda g: g >= 1.0, "a number >= 1 (1 turns guidance off)"),
        (StreamConfig, runtime, "delta", lambda d: d >= 0.0, "a number >= 0 (1 is StreamDiffusion's)"),
        (SimilarFilterConfig, similar_filter, "threshold", lambda s: 0.0 <= s <= 1.0, "a cosine similarity in [0, 1]"),
        (SimilarFilterConfig, similar_filter, "max_skip", lambda n: n >= 0, "a number of frames >= 0 (0 never skips)"),
    )
    for cls, chosen, name, ok, must in checks:
        if not (math.isfinite(chosen[name]) and ok(chosen[name])):  # nan fails every comparison
            raise CliError(f"{option(cls, name)} must be {must}, got {chosen[name]}")
    similar_filter.update(enabled=similar, seed=runtime["seed"])
    control = {}
    if args.control is not None:
        kinds, scales = parse_controls(args.control, spec.controlnets)
        if ControlKind.VIDEO.value in kinds and not hasattr(args, "control_video"):
            raise CliError(f"--control {args.control}: kind video takes its frames from --control-video FILE, a flag "
                           "of the video command; use another kind here")  # fmt: skip
        control = {"control_kinds": kinds, "controlnet_scales": scales}
    try:
        return StreamConfig(
            spec, t_index_list=t_index, **runtime, bank=BankConfig(seed=runtime["seed"]),
            similar_filter=SimilarFilterConfig(**similar_filter), **control,
        )  # fmt: skip
    except ValueError as e:
        raise CliError(str(e)) from e


def _refuse_unused(args: argparse.Namespace, spec: EngineSpec, similar: bool) -> None:
    """Flags that would do nothing with this spec and filter setting raise CliError, naming what they need."""
    guided = spec.cfg_type is not CfgType.NONE
    rcfg = spec.cfg_type in (CfgType.SELF, CfgType.INITIALIZE)
    guidance = f"guidance is {spec.cfg_type.value}"
    ignored = [
        ("--guidance-scale", args.guidance_scale is not None and not guided, guidance, "a --cfg-type other than none"),
        ("--delta", args.delta is not None and not rcfg, guidance, "--cfg-type self or initialize"),
        ("--negative-prompt", args.negative_prompt is not None
         and spec.cfg_type not in (CfgType.INITIALIZE, CfgType.FULL),
         guidance, "--cfg-type initialize or full (none and self use no negative prompt)"),
        ("--similar-threshold", args.similar_threshold is not None and not similar,
         "the similar-frame filter is off", "--similar-filter"),
        ("--max-skip", args.max_skip is not None and not similar, "the similar-frame filter is off",
         "--similar-filter"),
    ]  # fmt: skip
    for flag, unused, why, needs in ignored:
        if unused:
            raise CliError(f"{flag} has no effect: {why}; add {needs} or drop the flag")
    if similar and args.cuda_graphs:
        raise CliError(
            "--cuda-graphs cannot replay the similar-frame filter (it decides on the host per frame): "
            "add --no-similar-filter or drop --cuda-graphs"
        )


def engine_backend(args: argparse.Namespace, builder: str | None, device: torch.device) -> BackendKind:
    """The backend for a build folder: `--backend`, else what the folder was built for (onnxruntime on a CPU)."""
    if args.backend is None:
        return folder_backend(builder, device.type)
    if args.backend == BackendKind.EAGER:
        raise CliError(
            "--backend eager runs the PyTorch weights, not a build folder: drop --engines, or pick "
            f"--backend {' or '.join(ENGINE_BACKENDS)}"
        )
    return BackendKind(args.backend)


def stream_source(args: argparse.Namespace, backend: BackendKind | None = None) -> Source:
    """Where the flags' stream comes from and how it runs. The thread policy: one intra-op thread on a CPU unless
    --threads says (two thread pools on a small CPU stall each other)."""
    device = device_of(args.device)
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else None)
    if threads is not None and threads < 1:
        raise CliError(f"--threads must be >= 1, got {threads}")
    if args.cuda_graphs and device.type != "cuda":  # before minutes of loading
        raise CliError(f"--cuda-graphs needs a CUDA GPU, the streams run on {device}")
    return Source(
        engines=args.engines,
        backend=backend,
        device=None if args.device == "auto" else str(device),
        threads=threads,
        compile=args.compile,
        cuda_graphs=args.cuda_graphs,
    )  # fmt: skip  (the LoRAs are the config's: resolve_spec puts them in the spec)


def stream_request(args: argparse.Namespace, streams: int | None = None) -> tuple[Source, StreamConfig]:
    """The `Source` and `StreamConfig` the flags ask for, every flag checked; nothing loaded (a build folder's
    manifest is read). `streams`: the slots of a MultiStream (a folder must be built for that many). CliError."""
    if streams is not None and streams < 1:
        raise CliError(f"--streams must be >= 1, got {streams}")
    if args.compile and args.engines is not None:
        raise CliError("--compile has no effect: --engines runs compiled networks already; add the eager backend "
                       "(drop --engines) or drop the flag")  # fmt: skip
    device = device_of(args.device)
    if args.engines is None:
        if args.backend not in (None, BackendKind.EAGER):
            raise CliError(
                f"--backend {args.backend} runs a build folder: add --engines DIR (build one with python -m "
                f"build_engines --model {args.model or 'tiny'}), or use --backend eager"
            )
        return stream_source(args), stream_config(args, resolve_spec(args, device))
    from ..manifest import load_manifest

    with opening(args.engines):
        manifest = load_manifest(args.engines)
        backend = engine_backend(args, manifest.builder, device)
        cfg = stream_config(args, resolve_spec(args, device, manifest))
    if streams is not None:  # a folder built for another count is refused when it opens, with its rebuild command
        cfg = cfg.with_spec(max_streams=streams)
    return stream_source(args, backend), cfg


@contextmanager
def opening(engines: Path | None, model: str | None = None) -> Iterator[None]:
    """Library errors while opening a stream as one CliError line (a CliError passes through)."""
    try:
        yield
    except CliError:
        raise
    except ModelUnavailable as e:  # names the model and says what to do already
        raise CliError(str(e)) from e
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as e:  # EngineMismatch, LoRA, backend, device
        what = f"open {engines}" if engines is not None else f"load model {model!r}"
        raise CliError(f"cannot {what}: {' '.join(str(e).split())}") from e
