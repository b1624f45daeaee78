"""Flags shared by every subcommand that runs a stream (`video`, `serve`), and the stream they build.

`--engines DIR --backend NAME` loads compiled engines through `StreamV2V.from_engines` (when this build has
it); without `--engines` the eager PyTorch pipeline is built from `--model`. Guidance, priming and the
similar-frame filter are runtime settings (the same engines serve them, except `--cfg-type initialize/full`,
which need engines built for their UNet batch); LoRAs are fused into the weights (engines: at build time,
so `--lora` must name the files and scales the engines were built with). docs/FEATURES.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math

import torch

from ..config import BankConfig, BankKind, CfgType, SimilarFilterConfig, StreamConfig, t_index_list_from_strength
from ..models import PRESETS
from ..models.lora import LoraError, LoraSpec
from ..pipeline import StreamV2V

log = logging.getLogger(__name__)


class CliError(RuntimeError):
    """A user mistake or an unusable input: printed as one line, exit code 1."""


GUIDED_DEFAULT_SCALE = 1.2  # StreamDiffusion's default guidance scale; g <= 1 turns guidance off


def add_stream_args(parser: argparse.ArgumentParser, *, live: bool = False) -> None:
    """The stream's flags. live=True (the camera demo) turns priming and the similar-frame filter on by default."""
    g = parser.add_argument_group("model and stream")
    g.add_argument("--model", default="tiny", help="preset (tiny, sd-turbo, sd15), diffusers folder or hub id")
    g.add_argument("--engines", metavar="DIR", help="folder of compiled engines (python -m build_engines)")
    g.add_argument(
        "--backend",
        help="eager (PyTorch; the default without --engines), or with --engines: onnxruntime (default), tensorrt",
    )
    g.add_argument("--vae", default="taesd", choices=("taesd", "full"), help="eager only: VAE to use")
    g.add_argument("--strength", type=float, help="noise strength in (0, 1] (default: the model's schedule)")
    g.add_argument("--steps", type=int, help="denoising steps per frame (default: the model's schedule)")
    g.add_argument("--bank", default="dyme", choices=[k.value for k in BankKind], help="feature bank kind")
    g.add_argument("--bank-frames", type=int, default=1, help="frames kept by a fifo bank (dyme keeps 1)")
    g.add_argument("--seed", type=int, default=2, help="noise seed (and DyMe's merge seed)")
    g.add_argument("--height", type=int, help="stream height, a multiple of 8 (default: the model's)")
    g.add_argument("--width", type=int, help="stream width, a multiple of 8 (default: the model's)")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
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
        "--delta",
        type=float,
        metavar="D",
        help="RCFG (self, initialize): scale of the stock noise used as the negative (default 1)",
    )
    f.add_argument(
        "--negative-prompt",
        metavar="TEXT",
        help="what to steer away from (--cfg-type initialize or full; default empty)",
    )
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
        default=live,
        help="skip (repeat the last output for) input frames nearly equal to the last processed one "
        f"(default: {'on' if live else 'off'})",
    )
    f.add_argument(
        "--similar-threshold",
        type=float,
        metavar="S",
        help="cosine similarity in [0, 1] above which frames may be skipped (default 0.98)",
    )
    f.add_argument("--max-skip", type=int, metavar="N", help="most frames skipped in a row (default 10)")


def _device_dtype(name: str) -> tuple[torch.device, torch.dtype]:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise CliError(f"--device {name!r} is not a device name (cpu, cuda, cuda:0, ...)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda asked, but PyTorch sees no CUDA GPU; use --device cpu")
    return device, torch.float16 if device.type == "cuda" else torch.float32


def stream_config(args: argparse.Namespace) -> StreamConfig:
    """The StreamConfig the flags describe, with the model preset's defaults for what is not given."""
    preset = PRESETS.get(args.model)
    height = args.height or (preset.height if preset else 512)
    width = args.width or (preset.width if preset else 512)
    if args.strength is None and args.steps is None:
        t_index = preset.t_index_list if preset else (32,)
    else:
        strength = 0.4 if args.strength is None else args.strength  # the paper's noise strength
        steps = 1 if args.steps is None else args.steps
        if not 0.0 < strength <= 1.0 or steps < 1:
            raise CliError(f"--strength must be in (0, 1] and --steps >= 1, got {strength} and {steps}")
        t_index = t_index_list_from_strength(strength, steps)
    try:
        bank = BankConfig(kind=BankKind(args.bank), frames=args.bank_frames, seed=args.seed)
        cfg = StreamConfig(height=height, width=width, t_index_list=t_index, seed=args.seed, bank=bank)
    except ValueError as e:
        raise CliError(str(e)) from e
    return with_features(cfg, args)


def with_features(cfg: StreamConfig, args: argparse.Namespace) -> StreamConfig:
    """`cfg` with the guidance, priming and similar-frame flags applied (runtime settings: engines need no
    rebuild for them, except a --cfg-type that changes the UNet batch). Flags that would do nothing are refused."""
    cfg_type = CfgType(args.cfg_type) if args.cfg_type else cfg.cfg_type
    guided = cfg_type is not CfgType.NONE
    rcfg = cfg_type in (CfgType.SELF, CfgType.INITIALIZE)
    guidance = f"guidance is {cfg_type.value}"
    ignored = [
        ("--guidance-scale", args.guidance_scale is not None and not guided, guidance, "a --cfg-type other than none"),
        ("--delta", args.delta is not None and not rcfg, guidance, "--cfg-type self or initialize"),
        ("--negative-prompt", args.negative_prompt is not None and cfg_type not in (CfgType.INITIALIZE, CfgType.FULL),
         guidance, "--cfg-type initialize or full (none and self use no negative prompt)"),
        ("--similar-threshold", args.similar_threshold is not None and not args.similar_filter,
         "the similar-frame filter is off", "--similar-filter"),
        ("--max-skip", args.max_skip is not None and not args.similar_filter, "the similar-frame filter is off",
         "--similar-filter"),
    ]  # fmt: skip
    for flag, unused, why, needs in ignored:
        if unused:
            raise CliError(f"{flag} has no effect: {why}; add {needs} or drop the flag")
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
    similar = SimilarFilterConfig(enabled=args.similar_filter, threshold=threshold, max_skip=max_skip, seed=args.seed)
    return dataclasses.replace(
        cfg, cfg_type=cfg_type, guidance_scale=scale, delta=delta, prime=args.prime, similar_filter=similar
    )


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


def build_stream(args: argparse.Namespace, prompt: str = "") -> StreamV2V:
    """Load the stream the flags ask for. Raises CliError with what to change."""
    loras = lora_specs(args)
    if args.engines:
        if args.backend == "eager":
            raise CliError(
                "--backend eager runs the PyTorch weights, not engines: drop --engines, or pick an engine backend "
                "(--backend onnxruntime or tensorrt)"
            )
        from ..backends.engines import stream_config as built_config
        from ..engine.manifest import load_manifest

        options = {} if args.device == "auto" else {"device": args.device}
        try:
            manifest = load_manifest(args.engines)
        except RuntimeError as e:  # EngineMismatch: no folder, no or corrupt manifest
            raise CliError(f"cannot load engines from {args.engines}: {' '.join(str(e).split())}") from e
        cfg = with_features(built_config(manifest), args)
        try:
            stream = StreamV2V.from_engines(
                args.engines, backend=args.backend or "onnxruntime", cfg=cfg, prompt=prompt, loras=loras, **options
            )
        except (FileNotFoundError, ValueError, RuntimeError) as e:  # manifest mismatch, LoRA, backend, ...
            raise CliError(f"cannot load engines from {args.engines}: {' '.join(str(e).split())}") from e
        _check_engine_matches_flags(stream, args)
        if args.negative_prompt is not None:
            stream.update_prompt(prompt, negative_prompt=args.negative_prompt)
        return stream
    if args.backend not in (None, "eager"):
        raise CliError(
            f"--backend {args.backend} runs compiled engines: add --engines DIR "
            f"(build them with: python -m build_engines --model {args.model}), or use --backend eager"
        )
    cfg = stream_config(args)
    device, dtype = _device_dtype(args.device)
    try:
        return StreamV2V.from_pretrained(
            args.model, cfg, prompt=prompt, vae=args.vae, device=device, dtype=dtype, loras=loras,
            negative_prompt=args.negative_prompt or "",
        )  # fmt: skip
    except LoraError as e:  # a ValueError, but the model loaded fine: say which flag to fix
        raise CliError(f"--lora: {' '.join(str(e).split())}") from e
    except (FileNotFoundError, OSError, ValueError) as e:
        raise CliError(f"cannot load model {args.model!r}: {' '.join(str(e).split())}") from e


def _check_engine_matches_flags(stream: StreamV2V, args: argparse.Namespace) -> None:
    """Engines fix size, schedule and bank at build time; refuse flags that ask for something else."""
    cfg = stream.cfg
    asked = {
        "--height": (args.height, cfg.height),
        "--width": (args.width, cfg.width),
        "--steps": (args.steps, cfg.steps),
        "--bank": (args.bank if args.bank != "dyme" else None, cfg.bank.kind.value),
        "--bank-frames": (args.bank_frames if args.bank_frames != 1 else None, cfg.bank.frames),
    }
    wrong = [
        f"{flag} {want} (engines: {have})" for flag, (want, have) in asked.items() if want is not None and want != have
    ]
    if wrong:
        raise CliError(
            f"the engines in {args.engines} were built for other settings: {', '.join(wrong)}; drop those flags "
            "or rebuild with python -m build_engines"
        )
