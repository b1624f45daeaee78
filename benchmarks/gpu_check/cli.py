"""The command line of the GPU check: `python -m benchmarks.gpu_check [--dry-run] ...`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import benchmarks.gpu_check as package  # its docstring is --help's description
from benchmarks.gpu_check.check import Check
from benchmarks.gpu_check.plan import DRY, GPU, STEPS, split

log = logging.getLogger("benchmarks.gpu_check")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check",
        description=package.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="the same steps on the CPU: tiny model 64x64, fp32, eager / onnxruntime / aoti, 6 timed "
        "frames after 2 warm-up, soak 20, profile 4 (pytest -m gpu skips everything here)",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="results folder (default: $OUT if set, else artifacts/gpu_check)"
    )
    p.add_argument(
        "--engines",
        type=Path,
        default=None,
        help="parent of the build folders, found by spec.folder_name and reused (default: "
        "/tmp/gpu_check_engines on a GPU, engines/gpu_check with --dry-run)",
    )
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the whole check (default 480)")
    p.add_argument(
        "--backends",
        default=None,
        help="fps_main's backends instead of the mode's (e.g. add compiled to a dry run: it is slow on a CPU)",
    )
    p.add_argument(
        "--sd15-backends",
        default=None,
        help="fps_sd15's backends (default: fps_main's on a GPU, "
        "eager,onnxruntime in a dry run: a second AOTInductor CPU compile takes minutes)",
    )
    p.add_argument("--skip", default="", help=f"comma list of steps to record as skipped: {', '.join(STEPS[:-1])}")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    args.skip = split(args.skip)
    if unknown := [s for s in args.skip if s not in STEPS[:-1]]:
        parser.error(f"--skip: unknown step(s) {', '.join(unknown)}; steps are {', '.join(STEPS[:-1])}")
    plan = DRY if args.dry_run else GPU
    args.out = (args.out or Path(os.environ.get("OUT") or "artifacts/gpu_check")).resolve()
    args.engines = (args.engines or plan.engines).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.log").write_text("")
    handlers = [logging.StreamHandler(sys.stderr), logging.FileHandler(args.out / "gpu_check.log")]
    fmt = logging.Formatter("[gpu_check %(asctime)s] %(message)s", "%H:%M:%S")
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        log.info("mode %s, budget %.0f s, out %s, engines %s", plan.mode, args.budget_s, args.out, args.engines)
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
            check = Check(args, plan, Path(scratch))
            code = check.run_all()
        print((args.out / "summary.md").read_text())
        log.info("done in %.0f s, exit code %d: %s", time.monotonic() - check.t0, code, args.out)
        return code
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()
