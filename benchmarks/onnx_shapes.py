"""ONNX Runtime (or TensorRT): FPS at each frame size of a folder with static shapes (a network per size) against
one with dynamic shapes (`--shapes dynamic`: one network for every size; TensorRT, one engine with an optimisation
profile), in one run.

    python -m benchmarks.onnx_shapes [--model tiny] [--sizes 128x128,256x128] [--frames 40] [--rounds 3]
    python -m benchmarks.onnx_shapes --builder tensorrt --precision fp16 --model sd-turbo --sizes 512x512,768x512

Builds the two folders of the same spec (--onnx-only run by onnxruntime on the CPU, or --builder tensorrt /
tensorrt-rtx run by the tensorrt backend on the GPU). Each round runs every (folder, size) stream in turn, so load on
a shared machine hits all alike; each figure is the median over rounds. Also: build time and bytes on disk of each
folder, and the max difference between the two folders' frames. Results go to docs/BENCHMARKS.md ("Frame sizes:
static or dynamic shapes") with the machine they came from.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from build_engines import BuildConfig, build
from streamv2v_trt import StreamV2V
from streamv2v_trt.frame_sizes import size_text
from streamv2v_trt.spec import EngineSpec, parse_sizes

from .measure import machine
from .onnx_weights import clip_fps, frames, print_run, two_folders_parser

log = logging.getLogger(__name__)
SHAPES = ("static", "dynamic")


def run(args) -> dict:
    sizes = parse_sizes(args.sizes)
    spec = EngineSpec.resolve(args.model, height=sizes[0][0], width=sizes[0][1], sizes=sizes, precision=args.precision)
    root = Path(args.out)
    how = dict(builder=args.builder) if args.builder else dict(onnx_only=True)
    folders, built = {}, {}
    for shapes in SHAPES:
        result = build(BuildConfig(spec, out=root / shapes, shapes=shapes, force=True, **how))
        folders[shapes] = result.out
        built[shapes] = {
            "build_s": round(result.seconds, 1),
            "mb": round(sum(a.bytes for a in result.artifacts) / 1e6, 1),
        }
    backend = "tensorrt" if args.builder else "onnxruntime"
    opened = dict(prompt="a watercolor cat") | (dict(device="cuda") if args.builder else dict(threads=args.threads))
    streams = {}
    for shapes, folder in folders.items():
        first = StreamV2V.from_engines(folder, backend, **opened)
        for size in sizes:
            stream = first if size == sizes[0] else first.sibling()  # the same networks, a stream of its own
            if stream is not first:
                stream.resize(*size)
            streams[(shapes, size)] = stream
    clips = {size: frames(args.frames, size) for size in sizes}
    diff = {}
    for size in sizes:  # warm-up (first store, first merge, inputs bound), and the two folders' frames compared
        a, b = streams[("static", size)], streams[("dynamic", size)]
        diff[size_text(size)] = max(int(np.abs(a(f).astype(int) - b(f)).max()) for f in clips[size][:8])
    fps: dict[tuple, list[float]] = {k: [] for k in streams}
    for _ in range(args.rounds):
        for key, stream in streams.items():
            fps[key].append(clip_fps(stream, clips[key[1]]))
    return {
        "machine": machine(),
        "spec": f"{spec.model} {spec.precision.value}, sizes {args.sizes}",
        "backend": backend,
        "threads": args.threads,
        "frames_per_round": args.frames,
        "rounds": args.rounds,
        "build": built,
        "fps_median": {
            f"{shapes} {size_text(size)}": round(float(np.median(v)), 1) for (shapes, size), v in fps.items()
        },
        "fps_rounds": {f"{shapes} {size_text(size)}": [round(x, 1) for x in v] for (shapes, size), v in fps.items()},
        "max_frame_diff_static_vs_dynamic": diff,
    }


def main(argv: list[str] | None = None) -> int:
    description = __doc__.split("\n\n")[0]
    p = two_folders_parser("python -m benchmarks.onnx_shapes", description, 40, "engines/bench-onnx-shapes")
    p.add_argument("--sizes", default="128x128,256x128", help="two or more WIDTHxHEIGHT, multiples of 64")
    return print_run(run, p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
