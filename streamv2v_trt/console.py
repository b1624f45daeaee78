"""What every command line entry point shares (`python -m streamv2v_trt`, `build_engines`, `benchmarks`):
logging set-up and `--help` that shows defaults.

Our packages log at INFO, third-party libraries at WARNING (the ONNX exporter's optimiser logs thousands of
INFO lines per export). `quiet=True` keeps ours at WARNING too, for commands whose output is their result.
"""

from __future__ import annotations

import argparse
import logging

OUR_PACKAGES = ("streamv2v_trt", "build_engines", "benchmarks")


def configure_logging(verbose: bool = False, *, quiet: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    ours = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    for name in OUR_PACKAGES:
        logging.getLogger(name).setLevel(ours)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to every option that has a default and does not state it already; options
    without one (None, off switches, empty lists and strings) get nothing rather than "(default: None)"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is False or default in ([], "", argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)
