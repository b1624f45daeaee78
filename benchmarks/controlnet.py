"""`python -m benchmarks.controlnet`: what ControlNet costs per frame, and what it does to the output's warp error.

    python -m benchmarks.controlnet --model tiny --height 128 --width 128             # the CPU figures
    python -m benchmarks.controlnet --model sd-turbo --controlnet sd-turbo-canny      # on a GPU (fp16)

One process, one clip with real motion (a scikit-image photo panned, then zoomed into: `clips.pan_clip`,
`clips.zoom_clip`), and the same strength, seed, prompt, size and threads for every stream: one without ControlNet,
and one per `--kinds` kind (canny, previous, frame) with `--controlnet` at `--scale`. The streams run in lockstep
(frame t of every stream before frame t+1 of any), so a load spike on a shared machine falls on all of them alike.
Per stream: per-frame latency after the warm-up (p50 and mean; CUDA events on a GPU), and the warp error of its
output on the pan and on the zoom (streamv2v_trt/metrics/warp.py: l1 on 0-255, flow from the input; not across
the cut between them) and their mean, each beside the stream without ControlNet. Eager backend (build folders
with ControlNets come with the build work).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from streamv2v_trt.console import HelpFormatter, configure_logging, device_and_threads
from streamv2v_trt.control_images import ControlKind
from streamv2v_trt.flags import add_flags
from streamv2v_trt.presets import ModelUnavailable
from streamv2v_trt.source import DEFAULT_MODEL, Source
from streamv2v_trt.spec import EngineSpec, t_index_list_from_strength

from .measure import Timer, machine

log = logging.getLogger("benchmarks.controlnet")
NONE = "none"  # the stream without ControlNet


def clip(frames: int, height: int, width: int) -> tuple[list[np.ndarray], int]:
    """Half a pan across the astronaut photo, then half a zoom into the coffee photo: real motion of two kinds, and
    the index of the cut between them (the warp error is measured on each side of it, never across)."""
    from streamv2v_trt.clips import pan_clip, zoom_clip

    half = frames // 2
    return pan_clip(half, height, width, "astronaut", step=3) + zoom_clip(frames - half, height, width, "coffee"), half


def split_warp_error(inputs: list[np.ndarray], outputs: list[np.ndarray], cut: int) -> tuple[float, float, float]:
    """(pan, zoom, mean of the two) warp errors: each part's pairs by themselves (a cut is no motion to follow)."""
    from streamv2v_trt.metrics.warp import warp_error

    pan = warp_error(inputs[:cut], outputs[:cut])
    zoom = warp_error(inputs[cut:], outputs[cut:])
    return pan.value, zoom.value, (pan.value + zoom.value) / 2


def run(args: argparse.Namespace) -> dict:
    """Every stream over the clip in lockstep: {"rows": [{kind, p50_ms, mean_ms, warp_error, ...}], ...}."""
    from streamv2v_trt import StreamConfig
    from streamv2v_trt.opening import open_stream

    cuda = args.device.startswith("cuda")
    spec = EngineSpec.resolve(args.model, height=args.height, width=args.width, steps=args.steps,
                              precision="fp16" if cuda else "fp32")  # fmt: skip
    t_index = t_index_list_from_strength(args.strength, spec.steps) if args.strength is not None else ()
    base = StreamConfig(spec, t_index_list=t_index, seed=args.seed)
    source = Source(device=args.device, threads=args.threads)
    configs = {NONE: base}
    for kind in args.kinds:
        with_cn = base.with_spec(controlnets=(args.controlnet,))
        configs[kind] = dataclasses.replace(with_cn, control_kinds=(kind,), controlnet_scales=(args.scale,))
    streams = {kind: open_stream(source, cfg, prompt=args.prompt) for kind, cfg in configs.items()}
    frames, cut = clip(args.warmup + args.frames, spec.height, spec.width)
    timers = {kind: Timer(cuda) for kind in streams}
    outputs: dict[str, list[np.ndarray]] = {kind: [] for kind in streams}
    for t, frame in enumerate(frames):
        for kind, stream in streams.items():
            start = timers[kind].start() if t >= args.warmup else None
            outputs[kind].append(stream(frame))
            if start is not None:
                timers[kind].stop(start)
    delay = spec.steps - 1  # output i is input i - delay; the first outputs come from empty slots
    rows = []
    for kind in streams:
        lat = timers[kind].latencies_ms()
        pan, zoom, mean = split_warp_error(frames[: len(frames) - delay], outputs[kind][delay:], cut)
        rows.append({"kind": kind, "p50_ms": float(np.percentile(lat, 50)), "mean_ms": float(lat.mean()),
                     "warp_error": mean, "warp_pan": pan, "warp_zoom": zoom})  # fmt: skip
    for row in rows:
        row["cost_ms_vs_none"] = row["p50_ms"] - rows[0]["p50_ms"]
        row["warp_vs_none"] = row["warp_error"] / rows[0]["warp_error"]
    return {
        "machine": machine(),
        "config": {
            "model": args.model,
            "height": spec.height,
            "width": spec.width,
            "steps": spec.steps,
            "t_index_list": list(base.t_index_list),
            "controlnet": args.controlnet,
            "scale": args.scale,
            "device": args.device,
            "threads": args.threads,
            "frames": args.frames,
            "warmup": args.warmup,
            "precision": spec.precision.value,
        },  # fmt: skip
        "input_warp_error": split_warp_error(frames, frames, cut)[2],  # the clip itself: what a copy scores
        "rows": rows,
    }


def table(report: dict) -> str:
    head = f"{'control':<10} {'p50 ms':>8} {'mean ms':>8} {'+ms vs none':>12} {'warp pan':>9} {'zoom':>6} {'mean':>6}"
    head += f" {'x none':>7}"
    lines = [head, "-" * len(head)]
    for r in report["rows"]:
        lines.append(f"{r['kind']:<10} {r['p50_ms']:>8.2f} {r['mean_ms']:>8.2f} {r['cost_ms_vs_none']:>+12.2f} "
                     f"{r['warp_pan']:>9.2f} {r['warp_zoom']:>6.2f} {r['warp_error']:>6.2f} "
                     f"{r['warp_vs_none']:>7.2f}")  # fmt: skip
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.controlnet", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)  # fmt: skip
    add_flags(p, EngineSpec, ["model"], defaults={"model": DEFAULT_MODEL})
    add_flags(p, EngineSpec, ["height", "width", "steps"], unset=["height", "width", "steps"])
    p.add_argument("--controlnet", default="tiny", help="the ControlNet (preset, folder or hub id)")
    p.add_argument("--kinds", default="canny,previous", help="control kinds, one stream each (canny, previous, frame)")
    p.add_argument("--scale", type=float, default=1.0, help="the ControlNet's conditioning scale")
    p.add_argument("--strength", type=float, default=None, help="noise strength for every stream (default: the spec's)")
    p.add_argument("--frames", type=int, default=40, help="timed frames (the warp error covers warm-up ones too)")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--prompt", default="a watercolor painting")
    add_flags(p, Source, ["device", "threads"], defaults={"device": "auto"})
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    usable = {ControlKind.CANNY.value, ControlKind.PREVIOUS.value, ControlKind.FRAME.value}
    if not args.kinds or not set(args.kinds) <= usable:
        print(f"error: --kinds {','.join(args.kinds)}: use some of {', '.join(sorted(usable))}", file=sys.stderr)
        return 1
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads is None:
        args.threads = torch.get_num_threads() if args.device.startswith("cuda") else 1
    torch.set_num_threads(args.threads)
    try:
        report = run(args)
    except ModelUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    c = report["config"]
    print(f"{c['model']} {c['width']}x{c['height']}, {c['steps']} step(s) {c['t_index_list']}, {c['precision']}, "
          f"ControlNet {c['controlnet']} at scale {c['scale']:g}, {device_and_threads(args.device, args.threads)}; "
          f"the clip's own warp error {report['input_warp_error']:.2f}")  # fmt: skip
    print(table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
