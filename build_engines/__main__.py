"""`python -m build_engines`: parse flags into a BuildConfig, build with a progress bar, print a summary."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from streamv2v_trt.backends.tensorrt_import import TensorRTUnavailable
from streamv2v_trt.console import HelpFormatter, configure_logging
from streamv2v_trt.presets import PRESETS, ModelUnavailable
from streamv2v_trt.spec import FF_LAYER_PREFIXES, BankKind, CfgType, EngineSpec, LoraSpec, Precision, VaeKind

from .build import build, stages
from .config import BuildConfig, Builder, choose_builder


def _t_index_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 30,35,40,45, got {text!r}") from e


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m build_engines",
        description="Compile the StreamV2V UNet (feature bank as explicit I/O) and the VAE encoder/decoder: ONNX "
        "(cleaned) + TensorRT or TensorRT-RTX engines, or AOTInductor packages; write manifest.json beside them. "
        "Re-running with the same arguments reuses what is already built. Note: this command defaults to the "
        "sd-turbo model (the one the project is built for); the runtime commands default to the tiny test model.",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--model",
        default="sd-turbo",
        help=f"preset ({', '.join(PRESETS)}; random weights unless real ones are in the Hugging Face cache) "
        "or a local diffusers folder / hub id",
    )
    p.add_argument("--height", type=int, help="frame height in pixels, multiple of 8 (default: the preset's)")
    p.add_argument("--width", type=int, help="frame width in pixels, multiple of 8 (default: the preset's)")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument(
        "--steps", type=int, help="denoising steps = the UNet batch without guidance (default: the preset's)"
    )
    steps.add_argument(
        "--t-index-list",
        type=_t_index_list,
        help="e.g. 30,35,40,45: sets --steps to its length; the timestep values themselves are chosen at runtime",
    )
    p.add_argument(
        "--cfg-type",
        choices=[c.value for c in CfgType],
        default="none",
        help="guidance the UNet batch is sized for: none/self = steps, initialize = steps + 1, full = 2 x steps",
    )
    p.add_argument("--bank", choices=[k.value for k in BankKind], default="dyme", help="feature bank kind")
    p.add_argument("--bank-frames", type=int, default=1, help="frames held by a fifo bank (dyme holds 1)")
    p.add_argument("--ff-threshold", type=float, default=0.98, help="feature-fusion cosine threshold (compiled in)")
    p.add_argument("--ff-strength", type=float, default=0.8, help="feature-fusion blend strength (compiled in)")
    p.add_argument(
        "--ff-layers",
        default=",".join(FF_LAYER_PREFIXES),
        help="comma-separated prefixes of the layers with feature fusion",
    )
    p.add_argument("--vae", choices=[v.value for v in VaeKind], default="taesd", help="taesd (fast) or the full KL VAE")
    p.add_argument(
        "--precision",
        choices=[x.value for x in Precision],
        help="fp16 for GPUs (the exported graph itself is fp16); fp32 for CPU parity (default: fp32 when the "
        "build is AOTInductor for the CPU, else fp16)",
    )
    p.add_argument(
        "--lora",
        type=LoraSpec.parse,
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="LoRA safetensors fused into the UNet before export (repeatable; scale default 1)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of a preset's random weights")
    p.add_argument(
        "--max-streams",
        type=int,
        default=1,
        help="streams batched into one network call (python -m streamv2v_trt serve --streams K runs them)",
    )
    p.add_argument(
        "--builder",
        choices=[b.value for b in Builder],
        default="auto",
        help="auto: tensorrt if it imports and a GPU is here; tensorrt-rtx where it runs (8.0, 8.6, 8.9, 12.x, or "
        "no GPU: it builds ahead of time); else aoti (AOTInductor: any GPU torch supports, Hopper included, and "
        "the CPU)",
    )
    p.add_argument("--onnx-only", action="store_true", help="stop after the ONNX export (ONNX Runtime runs it)")
    p.add_argument("--device", choices=("cuda", "cpu"), help="aoti: the device to compile for (default: cuda if any)")
    p.add_argument("--max-autotune", action="store_true", help="aoti: autotune kernels (much slower build)")
    p.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="output folder (default: engines/<model>-<W>x<H>-b<UNet batch>-<bank><frames>-<vae>-<precision>"
        "[-aoti], a name that changes with everything the networks are specialised for)",
    )
    p.add_argument("--force", action="store_true", help="rebuild everything even if an intact matching build exists")
    p.add_argument("--workspace-gib", type=float, default=4.0, help="TensorRT builder workspace limit")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (TensorRT info messages included)")
    return p


def config_from_args(args: argparse.Namespace) -> BuildConfig:
    """The build the flags ask for. Raises ValueError (bad values) or TensorRTUnavailable (asked builder)."""
    cfg = _config(args, args.precision or "fp16")
    if args.precision is None:  # fp16 is what GPUs run; an AOTInductor package for the CPU is fp32
        builder, _ = choose_builder(cfg)
        if builder == Builder.AOTI and cfg.aoti_device.type == "cpu":
            cfg = _config(args, "fp32")
    return cfg


def _config(args: argparse.Namespace, precision: str) -> BuildConfig:
    steps = len(args.t_index_list) if args.t_index_list else args.steps
    spec = EngineSpec.resolve(
        args.model,
        height=args.height,
        width=args.width,
        steps=steps,
        cfg_type=args.cfg_type,
        bank=args.bank,
        bank_frames=args.bank_frames,
        ff_threshold=args.ff_threshold,
        ff_strength=args.ff_strength,
        ff_layer_prefixes=tuple(p for p in args.ff_layers.split(",") if p),
        vae=args.vae,
        precision=precision,
        loras=tuple(args.lora),
        weights_seed=args.seed,
        max_streams=args.max_streams,
    )
    return BuildConfig(
        spec,
        out=args.out,
        builder=args.builder,
        onnx_only=args.onnx_only,
        force=args.force,
        workspace_gib=args.workspace_gib,
        device=args.device,
        max_autotune=args.max_autotune,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)  # ours at INFO: the builder choice, node counts per cleanup pass, sizes
    try:
        cfg = config_from_args(args)
        builder, _ = choose_builder(cfg)
    except (ValueError, TensorRTUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    try:
        # Log lines print above the bar rather than into its line: the redirect routes the console handler that
        # configure_logging put on the root logger (ours propagate to it) through tqdm.write while the bar lives.
        with (
            logging_redirect_tqdm(),
            tqdm(total=len(stages(builder)), desc="build_engines", unit="stage", file=sys.stderr) as bar,
        ):

            def step(desc: str) -> None:
                bar.set_postfix_str(desc)
                bar.update(1)

            result = build(cfg, progress=step)
    except (TensorRTUnavailable, ModelUnavailable) as e:  # printed after the bar closed, on a line of its own
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
