"""What every command line entry point shares (`python -m streamv2v_trt`, `build_engines`, `benchmarks`):
logging set-up, `--help` that shows defaults, and how a speed figure names the device and threads it ran with.

Our packages log at INFO, third-party libraries at WARNING (the ONNX exporter's optimiser logs thousands of
INFO lines per export). `quiet=True` keeps ours at WARNING too, for commands whose output is their result.
"""

from __future__ import annotations

import argparse
import logging
import platform
from pathlib import Path

import torch

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


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC 7B13"), or what `platform` knows where /proc/cpuinfo does not say."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_and_threads(device: torch.device | str, threads: int | None = None) -> str:
    """Where a speed figure was measured, for summary lines: "cpu (AMD EPYC 7B13), 1 CPU thread(s)" or
    "cuda (NVIDIA H100 80GB HBM3), 16 CPU thread(s)". An FPS means little without both: one CPU thread against
    sixteen, or another GPU, changes it several times over. `threads`: the intra-op threads the run used
    (default: torch's current count, which the commands set from their --threads policy)."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    threads = torch.get_num_threads() if threads is None else threads
    return f"{device} ({name}), {threads} CPU thread(s)"
