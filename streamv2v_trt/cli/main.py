"""`python -m streamv2v_trt {demo,video,serve}`: each subcommand lives in its own module.

A subcommand module provides `add_parser(subparsers)` (registering its flags and `func=run`) and
`run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..console import configure_logging
from ..presets import ModelUnavailable

SUBCOMMANDS = ("demo", "video", "serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m streamv2v_trt",
        description="StreamV2V-TRT: real-time video-to-video translation with feature banks. Related commands: "
        "python -m build_engines (compile a model), python -m streamv2v_trt.metrics (warp error, CLIP score), "
        "python -m benchmarks.fps (FPS of every backend in one run).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{name}":
                raise
            continue  # subcommand not part of this build
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, quiet=getattr(args, "quiet", False))
    try:
        return int(args.func(args) or 0)
    except ModelUnavailable as e:  # `demo` loads the model itself; `video` and `serve` report it as a CliError
        print(f"error: {e}", file=sys.stderr)
        return 1
