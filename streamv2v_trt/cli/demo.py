"""`python -m streamv2v_trt demo`: build (or reuse) the engines, stream a generated clip through eager PyTorch
and the engine path, report both FPS and write input | eager | engine side by side to demo.mp4."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..clips import pan_clip
from ..config import StreamConfig
from ..pipeline import StreamV2V

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="build engines, stream a generated clip through eager and engines, write a side-by-side MP4",
        description="Pans across a real photo (scikit-image's astronaut), builds the model's engines (or reuses "
        "them), translates every frame with StreamV2V (EA + FF + DyMe) in PyTorch eager and on the engine path "
        "(TensorRT on a GPU, ONNX Runtime on the CPU), prints both FPS and writes input | eager | engine side by "
        "side. Runs on the CPU with the tiny random-weight model.",
    )
    p.add_argument("--model", default="tiny", help="preset (tiny, sd-turbo, sd15), diffusers folder or hub id")
    p.add_argument("--frames", type=int, default=48, help="frames in the generated clip (default 48)")
    p.add_argument("--size", type=int, default=128, help="frame height and width in pixels, multiple of 8")
    p.add_argument("--prompt", default="a watercolor painting of an astronaut", help="text prompt")
    p.add_argument("--engines", type=Path, help="engine folder (default: build_engines' folders under engines/)")
    p.add_argument("--eager-only", action="store_true", help="skip building and running the engines")
    p.add_argument("--out", type=Path, default=Path("demo.mp4"), help="output video (default demo.mp4)")
    p.add_argument("--fps", type=int, default=24, help="frame rate of the written video")
    p.set_defaults(func=run)


def write_side_by_side(path: Path, columns: list[list[np.ndarray]], fps: int) -> None:
    import av

    h, w = columns[0][0].shape[:2]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = len(columns) * w, h, "yuv420p"
        for row in zip(*columns):
            frame = av.VideoFrame.from_ndarray(np.concatenate(row, axis=1), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def timed_stream(stream: StreamV2V, frames: list[np.ndarray]) -> tuple[list[np.ndarray], float]:
    """Outputs and FPS; one warm-up frame (then reset) is excluded from the timing."""
    stream(frames[0])
    stream.reset()
    sync = torch.cuda.synchronize if stream.device.type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    outputs = [stream(f) for f in frames]
    sync()
    return outputs, len(frames) / (time.perf_counter() - start)


def _engine_path(args: argparse.Namespace, cfg: StreamConfig, device: torch.device) -> tuple[Path, str, str]:
    """Build (or reuse) what the engine path runs: TensorRT fp16 on a GPU with TensorRT, else ONNX Runtime fp32."""
    from build_engines import BuildConfig, build
    from build_engines.__main__ import summary

    has_trt = any(importlib.util.find_spec(m) for m in ("tensorrt", "tensorrt_rtx"))
    runs_trt = device.type == "cuda" and has_trt
    builds = [("tensorrt-fp16", "fp16", False)] if runs_trt else [("onnxruntime-fp32", "fp32", True)]
    if has_trt and not runs_trt:  # TensorRT-RTX builds ahead of time without a GPU: show that it does
        builds.append(("tensorrt-fp16", "fp16", False))
    folders = []
    for sub, precision, onnx_only in builds:
        out = args.engines / sub if args.engines else Path("engines")
        build_cfg = BuildConfig.from_stream(args.model, cfg, out, precision=precision, onnx_only=onnx_only)
        if args.engines is None:  # the folders `python -m build_engines` would pick for the same build
            build_cfg = replace(build_cfg, out=build_cfg.default_out())
        result = build(build_cfg)
        print(("reused" if result.reused else "built") + f" {build_cfg.out}:\n{summary(result)}")
        folders.append(build_cfg.out)
    return folders[0], "tensorrt" if runs_trt else "onnxruntime", builds[0][1]


def run(args: argparse.Namespace) -> int:
    if args.frames < 1 or args.size % 8:
        raise SystemExit(f"--frames must be >= 1 and --size a multiple of 8 (got {args.frames}, {args.size})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    frames = pan_clip(args.frames, args.size, args.size)
    cfg = StreamConfig(height=args.size, width=args.size)

    eager = StreamV2V.from_pretrained(args.model, cfg, prompt=args.prompt, device=device, dtype=dtype)
    eager_out, eager_fps = timed_stream(eager, frames)
    columns, lines = [frames, eager_out], [f"eager ({device.type}): {eager_fps:.1f} FPS"]
    if not args.eager_only:
        folder, backend, precision = _engine_path(args, cfg, device)
        threads = torch.get_num_threads()
        if device.type == "cpu":
            # ONNX Runtime's thread pool and torch's spinning OpenMP threads stall each other on a small CPU
            # (measured 8 vs 56 FPS on 2 cores): ONNX Runtime gets one thread, the pipeline's torch ops another.
            torch.set_num_threads(1)
        try:
            engine = StreamV2V.from_engines(
                folder, backend=backend, prompt=args.prompt, device=device, threads=1 if device.type == "cpu" else None
            )
            engine_out, engine_fps = timed_stream(engine, frames)
        finally:
            torch.set_num_threads(threads)
        diff = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(eager_out, engine_out))
        columns.append(engine_out)
        lines.append(
            f"{backend} ({precision}, {device.type}): {engine_fps:.1f} FPS = {engine_fps / eager_fps:.2f}x eager; "
            f"max |engine - eager| = {diff} / 255"
        )
    write_side_by_side(args.out, columns, args.fps)
    print(f"{len(frames)} frames of {args.size}x{args.size}, {args.model}, 1 step, DyMe bank every 4 frames")
    print("\n".join(lines))
    print(f"wrote {args.out.resolve()} (input | eager" + (" | engine" if len(columns) > 2 else "") + ")")
    return 0
