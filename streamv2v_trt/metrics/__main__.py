"""`python -m streamv2v_trt.metrics {warp-error,clip-score}`: score translated videos."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np

from ..video_io import VideoError, VideoReader


def read_frames(path: Path, max_frames: int | None) -> list[np.ndarray]:
    with VideoReader(path) as reader:
        return [f.image for f in reader.frames(max_frames)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m streamv2v_trt.metrics", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    w = sub.add_parser("warp-error", help="temporal consistency of OUT given the input IN (lower is better)")
    w.add_argument("input", type=Path, help="the video that was translated (its motion is measured)")
    w.add_argument("output", type=Path, help="the translated video (frame i out = frame i in)")
    w.add_argument("--error", default="l1", choices=("l1", "mse"), help="l1 on 0-255 (the paper's), mse on 0-1")
    c = sub.add_parser("clip-score", help="prompt alignment and frame consistency of OUT (higher is better)")
    c.add_argument("output", type=Path, help="the translated video")
    c.add_argument("--prompt", required=True)
    c.add_argument("--clip", type=Path, required=True, help="local CLIPModel folder (save_pretrained layout)")
    c.add_argument("--device", default="cpu")
    for p in (w, c):
        p.add_argument("--max-frames", type=int, help="score only the first N frames")
        p.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else x


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "warp-error":
            try:
                from .warp import warp_error
            except ModuleNotFoundError as e:
                raise FileNotFoundError(f"warp-error needs OpenCV ({e.name} is missing): "
                                        "pip install opencv-python-headless") from e  # fmt: skip

            with VideoReader(args.input) as a, VideoReader(args.output) as b:
                if a.info.expected_frames and b.info.expected_frames != a.info.expected_frames:
                    logging.warning("input has %d frames, output %d: scoring the common ones",
                                    a.info.expected_frames, b.info.expected_frames)  # fmt: skip
                ins = (f.image for f in a.frames(args.max_frames))
                outs = (f.image for f in b.frames(args.max_frames))
                r = warp_error(ins, outs, args.error)
            result = {"warp_error": r.value, "error": r.error, "pairs": len(r.per_pair), "valid": r.valid_fraction}
            text = (f"warp error ({r.error}{', 0-255' if r.error == 'l1' else ', 0-1'}): {r.value:.4g} over "
                    f"{len(r.per_pair)} frame pairs, {100 * r.valid_fraction:.0f}% of pixels non-occluded")  # fmt: skip
        else:
            from .clip import ClipScorer

            frames = read_frames(args.output, args.max_frames)
            s = ClipScorer(args.clip, args.device).score(frames, args.prompt)
            result = {"clip_text": s.text, "clip_consistency": _finite(s.consistency), "frames": s.frames}
            text = f"CLIP text score {s.text:.2f}, frame consistency {s.consistency:.2f} over {s.frames} frames"
    except (VideoError, ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    print(json.dumps(result) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
