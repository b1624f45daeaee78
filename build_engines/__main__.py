"""`python -m build_engines`: parse flags into a BuildConfig, build with a progress bar, print a summary."""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from streamv2v_trt.backends.tensorrt_import import TensorRTUnavailable
from streamv2v_trt.console import HelpFormatter, configure_logging
from streamv2v_trt.flags import add_flags, values
from streamv2v_trt.layout import network_names
from streamv2v_trt.presets import ModelUnavailable
from streamv2v_trt.spec import EngineSpec, Precision

from .build import build, stages
from .config import BuildConfig, Builder, choose_builder


def _t_index_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 30,35,40,45, got {text!r}") from e


BUILD_MODEL = "sd-turbo"  # the model the project is built for (the runtime commands default to the tiny one)
# The spec's flags (help and defaults from EngineSpec's fields); size and steps default to the model preset's, the
# precision to what the builder runs (fp32 for AOTInductor on the CPU, else fp16).
SPEC_FLAGS = ("model", "height", "width", "sizes", "cfg_type", "bank", "bank_frames", "ff_threshold", "ff_strength",
              "ff_layer_prefixes", "vae", "precision", "loras", "controlnets", "weights_seed",
              "max_streams")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m build_engines",
        description="Compile the StreamV2V UNet (feature bank as explicit I/O) and the VAE encoder/decoder: ONNX "
        "(cleaned) + TensorRT or TensorRT-RTX engines, or AOTInductor packages; write manifest.json beside them. "
        "Re-running with the same arguments reuses what is already built. Note: this command defaults to the "
        "sd-turbo model (the one the project is built for); the runtime commands default to the tiny test model.",
        formatter_class=HelpFormatter,
    )
    add_flags(p, EngineSpec, SPEC_FLAGS[:4], unset=("height", "width"), defaults={"model": BUILD_MODEL})
    steps = p.add_mutually_exclusive_group()
    add_flags(steps, EngineSpec, ["steps"], unset=("steps",))
    steps.add_argument(
        "--t-index-list",
        type=_t_index_list,
        help="e.g. 30,35,40,45: sets --steps to its length; the timestep values themselves are chosen at runtime",
    )
    add_flags(p, EngineSpec, SPEC_FLAGS[4:], unset=("precision",), unset_text=", fp32 for AOTInductor on the CPU")
    add_flags(p, BuildConfig)  # out, builder, onnx_only, force, workspace_gib, device, max_autotune
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (TensorRT info messages included)")
    return p


def config_from_args(args: argparse.Namespace) -> BuildConfig:
    """The build the flags ask for. Raises ValueError (bad values) or TensorRTUnavailable (asked builder)."""
    cfg = _config(args, args.precision or Precision.FP16)
    if args.precision is None:  # fp16 is what GPUs run; an AOTInductor package for the CPU is fp32
        builder, _ = choose_builder(cfg)
        if builder == Builder.AOTI and cfg.aoti_device.type == "cpu":
            cfg = _config(args, Precision.FP32)
    return cfg


def _config(args: argparse.Namespace, precision: str) -> BuildConfig:
    fields = {**values(args, EngineSpec, SPEC_FLAGS), "precision": precision}
    steps = len(args.t_index_list) if args.t_index_list else args.steps
    spec = EngineSpec.resolve(fields.pop("model"), steps=steps, **fields)
    return BuildConfig(spec, **values(args, BuildConfig))


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
            tqdm(
                total=len(stages(builder, cfg.stage_sizes, network_names(cfg.spec))),
                desc="build_engines",
                unit="stage",
                file=sys.stderr,
            ) as bar,
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
