"""`python -m benchmarks.canny`: the device Canny of `streamv2v_trt.control_images` beside OpenCV's `cv2.Canny`.

    python -m benchmarks.canny                       # 512x512, CPU, one thread for torch and OpenCV alike
    python -m benchmarks.canny --device cuda --json canny.json

The three skimage photos (astronaut, coffee, chelsea) cropped and resized to --size. Per photo it first checks the
torch edges against cv2.Canny(rgb, --low, --high) (the call ControlNet's canny annotator makes): it prints the
share of pixels that differ and fails (exit 1) if torch has an edge OpenCV lacks, since the fixed hysteresis can
only drop edges. Then it times, in the same run and on the same images, the median of --repeats calls after a
warm-up: cv2.Canny, torch `canny` (default hysteresis steps and none, so the hysteresis share shows), and
`ControlImages("canny")` as a stream calls it (from the [-1, 1] frame into its buffer). On CUDA the torch rows are
timed with CUDA events, and `ControlImages` also as one CUDA graph replay.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import skimage.data
import torch

from streamv2v_trt.console import HelpFormatter, device_and_threads
from streamv2v_trt.control_images import HYSTERESIS_STEPS, ControlImages, canny
from streamv2v_trt.frames import uint8_to_image
from streamv2v_trt.images import fit_to_size

from .kernels import graphed, time_ms
from .measure import machine

PHOTOS = ("astronaut", "coffee", "chelsea")


def timed(fn: Callable[[], object], repeats: int, cuda: bool) -> float:
    """Median ms of `repeats` calls after two warm-up calls (CUDA events on the GPU: `kernels.time_ms`)."""
    if cuda:
        return time_ms(fn, 2, repeats)
    fn(), fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(name: str, args: argparse.Namespace) -> dict:
    """One photo's check against cv2.Canny and its timings."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    rgb = fit_to_size(getattr(skimage.data, name)(), args.size, args.size)
    pixels = torch.from_numpy(rgb).permute(2, 0, 1)[None].to(device)  # [1, 3, H, W] uint8
    ref = cv2.Canny(rgb, args.low, args.high) > 0
    ours = canny(pixels, args.low, args.high)[0, 0].cpu().numpy() > 0
    control = ControlImages("canny", args.size, args.size, device, torch.float32, args.low, args.high)
    image = uint8_to_image(pixels[0].permute(1, 2, 0), torch.float32)
    row = {
        "differ": float((ours != ref).mean()),
        "extra_edges": int((ours & ~ref).sum()),
        "opencv_ms": timed(lambda: cv2.Canny(rgb, args.low, args.high), args.repeats, False),
        "torch_ms": timed(lambda: canny(pixels, args.low, args.high), args.repeats, cuda),
        "torch_no_hysteresis_ms": timed(lambda: canny(pixels, args.low, args.high, steps=0), args.repeats, cuda),
        "control_images_ms": timed(lambda: control(image), args.repeats, cuda),
    }
    if cuda:
        row["control_images_graph_ms"] = timed(graphed(lambda: control(image)), args.repeats, cuda)
    return row


def table(rows: dict[str, dict]) -> str:
    cols = list(next(iter(rows.values())))
    lines = ["| photo | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in rows.items():
        cells = [
            f"{v:.3%}" if k == "differ" else f"{v:.3f}" if isinstance(v, float) else str(v) for k, v in row.items()
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.canny", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--size", type=int, default=512, help="square image side the photos are resized to")
    parser.add_argument("--low", type=float, default=100.0, help="Canny low threshold (the annotator's default)")
    parser.add_argument("--high", type=float, default=200.0, help="Canny high threshold (the annotator's default)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per row (median reported)")
    parser.add_argument("--device", default="cpu", help="where torch runs: cpu or cuda")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch and OpenCV alike")
    parser.add_argument("--json", type=Path, help="also write the figures and the machine to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    rows = {name: measure(name, args) for name in PHOTOS}
    print(f"{args.size}x{args.size}, {device_and_threads(args.device, args.threads)} (OpenCV: {args.threads}), "
          f"hysteresis steps {HYSTERESIS_STEPS}, median of {args.repeats}")  # fmt: skip
    print(table(rows))
    if args.json:
        command = "python -m benchmarks.canny " + " ".join(argv if argv is not None else sys.argv[1:])
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine(), "command": command, "rows": rows}, indent=2) + "\n")
    if bad := [name for name, row in rows.items() if row["extra_edges"]]:
        print(f"FAILED: {', '.join(bad)}: torch found edges cv2.Canny does not have")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
