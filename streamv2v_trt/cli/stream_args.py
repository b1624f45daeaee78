"""Flags shared by every subcommand that runs a stream (`video`, `serve`): parsed into a `Source` and a
`StreamConfig` (`stream_request`), which the subcommand opens with `source.open_stream` / `open_multistream`.

Without `--engines` the eager PyTorch pipeline is built from `--model` (optionally `--compile`d); with
`--engines DIR` the build folder runs on `--backend` (default: what the folder was built for). What the
engines were built for (size, steps, bank, VAE, model, LoRAs) cannot change at runtime: such flags are
checked against the folder and refused when they differ. Runtime settings (seed, strength, guidance scale,
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

from ..config import BankConfig, SimilarFilterConfig, StreamConfig
from ..flavours import ENGINE_BACKENDS, BackendKind, folder_backend
from ..manifest import Manifest
from ..presets import PRESETS, ModelUnavailable
from ..source import Source
from ..spec import BankKind, CfgType, EngineSpec, LoraSpec, Precision, t_index_list_from_strength

log = logging.getLogger(__name__)

GUIDED_DEFAULT_SCALE = 1.2  # StreamDiffusion's default guidance scale; g <= 1 turns guidance off


class CliError(RuntimeError):
    """A user mistake or an unusable input: printed as one line, exit code 1."""


def add_stream_args(parser: argparse.ArgumentParser, *, live: bool = False) -> None:
    """The stream's flags. live=True (the camera demo) turns priming and the similar-frame filter on by default."""
    g = parser.add_argument_group("model and stream")
    g.add_argument("--model", help=f"preset ({', '.join(PRESETS)}), diffusers folder or hub id (default: tiny)")
    g.add_argument("--engines", metavar="DIR", type=Path, help="a build folder (python -m build_engines)")
    g.add_argument(
        "--backend",
        choices=[k.value for k in BackendKind],
        help="eager (PyTorch; the default without --engines); with --engines: onnxruntime (its ONNX), tensorrt "
        "(its TensorRT engines) or aoti (its AOTInductor packages); default: what the folder was built for "
        "(onnxruntime on a CPU)",
    )
    g.add_argument("--compile", action="store_true", help="eager: torch.compile the UNet and VAE (slow first frames)")
    g.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="replay whole frames from CUDA graphs (GPU; eager, tensorrt and aoti backends; no similar-frame filter)",
    )
    g.add_argument("--vae", choices=("taesd", "full"), help="VAE (default: taesd)")
    g.add_argument("--strength", type=float, help="noise strength in (0, 1] (default: the model's schedule)")
    g.add_argument("--steps", type=int, help="denoising steps per frame (default: the model's, or the engines')")
    g.add_argument("--bank", choices=[k.value for k in BankKind], help="feature bank kind (default: dyme)")
    g.add_argument("--bank-frames", type=int, help="frames kept by a fifo bank (default: 1)")
    g.add_argument("--seed", type=int, default=2, help="noise seed (and DyMe's merge seed) (default: 2)")
    g.add_argument("--height", type=int, help="stream height, a multiple of 8 (default: the model's)")
    g.add_argument("--width", type=int, help="stream width, a multiple of 8 (default: the model's)")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ... (default: auto)")
    g.add_argument(
        "--threads",
        type=int,
        help="CPU intra-op threads of torch and ONNX Runtime alike (default: 1 when the stream runs on the CPU: "
        "two thread pools on a small CPU stall each other; torch's default on a GPU)",
    )
    g.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="LoRA .safetensors fused into the weights with SCALE (default 1); repeatable. With --engines: the "
        "LoRAs the engines were built with (python -m build_engines --lora), else they are refused",
    )

    f = parser.add_argument_group("guidance and live features (docs/FEATURES.md)")
    f.add_argument(
        "--cfg-type",
        choices=[c.value for c in CfgType],
        help="guidance: none, self (RCFG, free), initialize (RCFG, +1 UNet batch element), full (classic CFG, "
        "2x UNet batch). Default: none, or with --engines what they were built for (initialize and full need "
        "their own engines)",
    )
    f.add_argument(
        "--guidance-scale",
        type=float,
        metavar="G",
        help=f"guidance scale g (> 1 to guide; default {GUIDED_DEFAULT_SCALE} when --cfg-type guides)",
    )
    f.add_argument(
        "--delta", type=float, metavar="D", help="RCFG (self, initialize): scale of the stock noise (default 1)"
    )
    f.add_argument("--negative-prompt", metavar="TEXT", help="what to steer away from (--cfg-type initialize or full)")
    f.add_argument(
        "--prime",
        action=argparse.BooleanOptionalAction,
        default=live,
        help="fill the stream batch from the first frame (--steps > 1): the first outputs are translations of it, "
        f"not decodes of empty latents (default: {'on' if live else 'off'})",
    )
    f.add_argument(
        "--similar-filter",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="skip (repeat the last output for) input frames nearly equal to the last processed one "
        f"(default: {'on, off with --cuda-graphs' if live else 'off'})",
    )
    f.add_argument(
        "--similar-threshold",
        type=float,
        metavar="S",
        help="cosine similarity in [0, 1] above which frames may be skipped (default 0.98)",
    )
    f.add_argument("--max-skip", type=int, metavar="N", help="most frames skipped in a row (default 10)")
    parser.set_defaults(live=live)


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
    specs = []
    for text in args.lora:
        spec = LoraSpec.parse(text)
        if not spec.path.is_file():
            raise CliError(
                f"--lora {text}: no such file {str(spec.path)!r} (expected FILE.safetensors or FILE.safetensors:SCALE)"
            )
        if spec.path.suffix != ".safetensors":
            raise CliError(f"--lora {text}: only .safetensors files are loaded (pickled .bin/.ckpt files can run code)")
        if not math.isfinite(spec.scale):
            raise CliError(f"--lora {text}: the scale must be a finite number, got {spec.scale}")
        specs.append(spec)
    return tuple(specs)


def _spec_flags(args: argparse.Namespace) -> dict:
    """The spec fields the flags set explicitly (None = not given)."""
    return {
        "model": args.model,
        "height": args.height,
        "width": args.width,
        "steps": args.steps,
        "bank": args.bank,
        "bank_frames": args.bank_frames,
        "vae": args.vae,
    }


def resolve_spec(args: argparse.Namespace, device: torch.device, manifest: Manifest | None = None) -> EngineSpec:
    """The one place the stream CLIs fill defaults: the preset's (eager) or the build folder's (`manifest`).

    Flags that a build fixes are compared with it: a different value is refused, never dropped."""
    flags = _spec_flags(args)
    cfg_type = CfgType(args.cfg_type) if args.cfg_type else None
    loras = lora_specs(args)
    if manifest is None:
        precision = Precision.FP16 if device.type == "cuda" else Precision.FP32
        try:
            return EngineSpec.resolve(
                flags.pop("model") or "tiny", **flags, cfg_type=cfg_type, loras=loras, precision=precision
            )
        except ValueError as e:
            raise CliError(str(e)) from e
    built = manifest.spec
    wrong = [
        f"--{name.replace('_', '-')} {value} (engines: {_plain(getattr(built, name))})"
        for name, value in flags.items()
        if value is not None and _plain(value) != _plain(getattr(built, name))
    ]
    if wrong:
        from ..build_folder import folder_rebuild

        asked = dataclasses.replace(built, **{k: v for k, v in flags.items() if v is not None})
        rebuild = folder_rebuild(asked, args.engines, engine_backend(args, manifest.builder, device), manifest)
        raise CliError(
            f"the engines in {args.engines} were built for other settings: {', '.join(wrong)}; drop those flags or "
            f"rebuild: {rebuild}"
        )
    spec = built if cfg_type is None else dataclasses.replace(built, cfg_type=cfg_type)
    return dataclasses.replace(spec, loras=loras) if loras or built.loras else spec


def _plain(value) -> str:
    return str(getattr(value, "value", value))


def stream_config(args: argparse.Namespace, spec: EngineSpec) -> StreamConfig:
    """`spec` with the runtime flags: seed, strength (timesteps), guidance, priming, similar-frame filter.
    Flags that would do nothing are refused."""
    t_index: tuple[int, ...] = ()
    if args.strength is not None:
        if not 0.0 < args.strength <= 1.0:
            raise CliError(f"--strength must be in (0, 1], got {args.strength}")
        t_index = t_index_list_from_strength(args.strength, spec.steps)
    guided = spec.cfg_type is not CfgType.NONE
    rcfg = spec.cfg_type in (CfgType.SELF, CfgType.INITIALIZE)
    similar = args.similar_filter if args.similar_filter is not None else args.live and not args.cuda_graphs
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
    scale = args.guidance_scale if args.guidance_scale is not None else (GUIDED_DEFAULT_SCALE if guided else 1.0)
    if not math.isfinite(scale) or scale < 1.0:
        raise CliError(f"--guidance-scale must be a number >= 1 (1 turns guidance off), got {scale}")
    delta = 1.0 if args.delta is None else args.delta
    if not math.isfinite(delta) or delta < 0.0:
        raise CliError(f"--delta must be a number >= 0 (1 is StreamDiffusion's), got {delta}")
    threshold = 0.98 if args.similar_threshold is None else args.similar_threshold
    if not 0.0 <= threshold <= 1.0:  # also refuses nan
        raise CliError(f"--similar-threshold must be a cosine similarity in [0, 1], got {threshold}")
    max_skip = 10 if args.max_skip is None else args.max_skip
    if max_skip < 1:
        raise CliError(f"--max-skip must be >= 1 (to never skip, use --no-similar-filter), got {max_skip}")
    try:
        return StreamConfig(
            spec,
            t_index_list=t_index,
            seed=args.seed,
            guidance_scale=scale,
            delta=delta,
            prime=args.prime,
            bank=BankConfig(seed=args.seed),
            similar_filter=SimilarFilterConfig(enabled=similar, threshold=threshold, max_skip=max_skip, seed=args.seed),
        )
    except ValueError as e:
        raise CliError(str(e)) from e


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
