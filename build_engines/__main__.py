"""`python -m build_engines`: parse flags into a BuildConfig, build with a progress bar, print a summary."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from streamv2v_trt.cli.log_setup import configure_logging
from streamv2v_trt.config import BankConfig, BankKind, CfgType
from streamv2v_trt.engine.trt import TensorRTUnavailable
from streamv2v_trt.models import PRESETS, VaeKind
from streamv2v_trt.models.lora import LoraSpec

from .build import BuildResult, build, stages
from .config import BuildConfig, Builder, Precision, default_t_index_list


def _t_index_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 30,35,40,45, got {text!r}") from e


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m build_engines",
        description="Export the StreamV2V UNet (feature bank as explicit I/O) and the VAE encoder/decoder to ONNX, "
        "clean the graphs, build TensorRT or TensorRT-RTX engines, and write manifest.json beside them. "
        "Re-running with the same arguments reuses what is already built.",
    )
    p.add_argument(
        "--model",
        default="sd-turbo",
        help=f"preset ({', '.join(PRESETS)}; random weights unless real ones are in the Hugging Face cache) "
        "or a local diffusers folder / hub id (default: sd-turbo)",
    )
    p.add_argument("--height", type=int, help="frame height in pixels, multiple of 8 (default: the preset's, 512)")
    p.add_argument("--width", type=int, help="frame width in pixels, multiple of 8 (default: the preset's, 512)")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument(
        "--steps",
        type=int,
        help="denoising steps, the UNet batch without guidance (default: the preset's: 1 sd-turbo, 4 sd15)",
    )
    steps.add_argument(
        "--t-index-list",
        type=_t_index_list,
        help="indices into the 50-step LCM schedule, e.g. 30,35,40,45; only their count changes the engines",
    )
    p.add_argument(
        "--cfg-type",
        choices=[c.value for c in CfgType],
        default="none",
        help="guidance the UNet batch is sized for: none/self = steps, initialize = steps + 1, full = 2 x steps",
    )
    p.add_argument(
        "--bank", choices=[k.value for k in BankKind], default="dyme", help="feature bank kind (default: dyme)"
    )
    p.add_argument("--bank-frames", type=int, default=1, help="frames held by a fifo bank (dyme holds 1; default: 1)")
    p.add_argument("--interval", type=int, default=4, help="bank update interval in frames, recorded (default: 4)")
    p.add_argument("--ff-threshold", type=float, default=0.98, help="feature-fusion cosine threshold (default: 0.98)")
    p.add_argument("--ff-strength", type=float, default=0.8, help="feature-fusion blend strength (default: 0.8)")
    p.add_argument(
        "--vae",
        choices=[v.value for v in VaeKind],
        default="taesd",
        help="taesd (fast) or the full KL autoencoder (default: taesd)",
    )
    p.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="output folder for the ONNX files, engines and manifest (default: engines/<model>-<W>x<H>-b<UNet batch>"
        "-<bank><frames>-<vae>-<precision>, a name that changes with everything the engines are specialised for)",
    )
    p.add_argument("--onnx-only", action="store_true", help="stop after the ONNX export (no TensorRT needed)")
    p.add_argument(
        "--builder",
        choices=[b.value for b in Builder],
        default="auto",
        help="auto: tensorrt if installed, else tensorrt-rtx (which builds without a GPU)",
    )
    p.add_argument(
        "--precision",
        choices=[x.value for x in Precision],
        default="fp16",
        help="fp16: engines (the ONNX itself is fp16); fp32: CPU parity with ONNX Runtime (default: fp16)",
    )
    p.add_argument(
        "--lora",
        type=LoraSpec.parse,
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="LoRA safetensors fused into the UNet before export (repeatable; scale default 1)",
    )
    p.add_argument("--force", action="store_true", help="rebuild everything even if an intact matching build exists")
    p.add_argument("--seed", type=int, default=0, help="seed of random-weight presets (default: 0)")
    p.add_argument("--workspace-gib", type=float, default=4.0, help="TensorRT builder workspace limit (default: 4)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (TensorRT info messages included)")
    return p


def config_from_args(args: argparse.Namespace) -> BuildConfig:
    preset = PRESETS.get(args.model)
    if args.t_index_list is not None:
        t_index_list = args.t_index_list
    elif args.steps is not None:
        t_index_list = default_t_index_list(args.steps, preset.t_index_list if preset else None)
    else:
        t_index_list = preset.t_index_list if preset else (32,)
    bank = BankConfig(
        kind=BankKind(args.bank),
        frames=args.bank_frames,
        interval=args.interval,
        ff_threshold=args.ff_threshold,
        ff_strength=args.ff_strength,
    )
    cfg = BuildConfig(
        out=args.out or Path("engines"),
        model=args.model,
        height=args.height or (preset.height if preset else 512),
        width=args.width or (preset.width if preset else 512),
        t_index_list=t_index_list,
        bank=bank,
        cfg_type=CfgType(args.cfg_type),
        vae=VaeKind(args.vae),
        precision=Precision(args.precision),
        builder=Builder(args.builder),
        onnx_only=args.onnx_only,
        force=args.force,
        seed=args.seed,
        workspace_gib=args.workspace_gib,
        loras=tuple(args.lora),
    )
    return cfg if args.out else replace(cfg, out=cfg.default_out())


def summary(result: BuildResult) -> str:
    m = result.manifest
    rows = [("network", "file", "size MB", "time s", "nodes", "status")]
    for a in result.artifacts:
        status = "reused" if a.reused else "built"
        nodes = str(a.nodes) if a.nodes is not None else ""
        rows.append((a.network, a.path.name, f"{a.bytes / 1e6:.1f}", f"{a.seconds:.1f}", nodes, status))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    builder = f"{m.builder} {m.builder_version}" if m.builder else "none (--onnx-only)"
    head = (
        f"{m.model} {m.width}x{m.height}, {m.steps} step(s), UNet batch {m.unet_batch}, "
        f"bank {m.bank_kind} x{m.bank_frames}, vae {m.vae}, "
        f"{m.precision}, builder {builder}, weights {m.weights_hash}{' (random)' if m.random_weights else ''}"
    )
    total = f"total {result.seconds:.1f} s -> {result.out / 'manifest.json'}"
    return "\n".join([head, *lines, total])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)  # ours at INFO: node counts per cleanup pass, engine sizes
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with tqdm(total=len(stages(cfg)), desc="build_engines", unit="stage", file=sys.stderr) as bar:

        def step(desc: str) -> None:
            bar.set_postfix_str(desc)
            bar.update(1)

        try:
            result = build(cfg, progress=step)
        except TensorRTUnavailable as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
