"""`python -m streamv2v_trt demo`: build (or reuse) the engines, stream a generated clip through eager PyTorch
and the engine path with the same thread policy, report both FPS and write input | eager | engine to demo.mp4."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch

from ..clips import pan_clip
from ..config import StreamConfig
from ..console import HelpFormatter, device_and_threads
from ..flags import add_flags
from ..flavours import folder_backend
from ..opening import open_stream
from ..source import DEFAULT_MODEL, Source
from ..spec import EngineSpec, Precision
from ..stream import Stream

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="build engines, stream a generated clip through eager and engines, write a side-by-side MP4",
        description="Pans across a real photo (scikit-image's astronaut), builds the model's engines (or reuses "
        "them), translates every frame with StreamV2V (EA + FF + DyMe) in PyTorch eager and on the engine path "
        "(on a GPU: TensorRT where it runs, else AOTInductor; on the CPU: ONNX Runtime), prints both FPS and "
        "writes input | eager | engine side by side, labelled. Runs on the CPU with the tiny random-weight model.",
        formatter_class=HelpFormatter,
    )
    add_flags(p, EngineSpec, ["model"], defaults={"model": DEFAULT_MODEL})
    p.add_argument("--frames", type=int, default=48, help="frames in the generated clip")
    p.add_argument("--size", type=int, default=128, help="frame height and width in pixels, multiple of 8")
    p.add_argument("--prompt", default="a watercolor painting of an astronaut", help="text prompt")
    p.add_argument("--engines", type=Path, help="parent folder for the builds (default: build_engines' folders)")
    p.add_argument("--eager-only", action="store_true", help="skip building and running the engines")
    add_flags(p, Source, ["threads"], defaults={"threads": 1})  # for every path: the ratio means nothing otherwise
    p.add_argument("--out", type=Path, default=Path("demo.mp4"), help="output video")
    p.add_argument("--fps", type=int, default=24, help="frame rate of the written video")
    p.set_defaults(func=run, quiet=True)


def label(frame: np.ndarray, text: str) -> np.ndarray:
    """`frame` with `text` in a dark band across its top (the panels of the side-by-side video)."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(frame)
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, img.width, 11), fill=(0, 0, 0))
    draw.text((2, 0), text, fill=(255, 255, 255))
    return np.asarray(img)


def write_side_by_side(path: Path, columns: list[list[np.ndarray]], names: list[str], fps: int) -> None:
    import av

    h, w = columns[0][0].shape[:2]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = len(columns) * w, h, "yuv420p"
        for row in zip(*columns):
            panels = [label(f, name) for f, name in zip(row, names)]
            frame = av.VideoFrame.from_ndarray(np.concatenate(panels, axis=1), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def timed_stream(stream: Stream, frames: list[np.ndarray]) -> tuple[list[np.ndarray], float]:
    """Outputs and FPS; one warm-up frame (then reset) is excluded from the timing."""
    stream(frames[0])
    stream.reset()
    sync = torch.cuda.synchronize if stream.device.type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    outputs = [stream(f) for f in frames]
    sync()
    return outputs, len(frames) / (time.perf_counter() - start)


def _engine_build(args: argparse.Namespace, spec: EngineSpec, device: torch.device) -> tuple:
    """What the engine path runs, as (BuildConfig, backend): on a GPU what `--builder auto` picks (fp16); on the
    CPU ONNX Runtime on an fp32 ONNX build. Only what the demo runs is built: TensorRT-RTX engines build on a CPU
    but need a supported NVIDIA GPU to run, so building them here would cost minutes for a folder nothing uses
    (`python -m build_engines --builder tensorrt-rtx` builds them ahead of time for such a GPU)."""
    from dataclasses import replace

    from build_engines import BuildConfig, choose_builder

    if device.type == "cuda":
        cfg = BuildConfig(replace(spec, precision=Precision.FP16))
        builder, _ = choose_builder(cfg)
    else:
        cfg, builder = BuildConfig(spec, onnx_only=True), None
    backend = folder_backend(builder, device.type)
    return (replace(cfg, out=args.engines / cfg.spec.folder_name(builder)) if args.engines else cfg), backend


def run(args: argparse.Namespace) -> int:
    from build_engines import build

    if args.frames < 1 or args.size % 8 or args.threads < 1:
        raise SystemExit(
            f"--frames and --threads must be >= 1 and --size a multiple of 8 (got {args.frames}, {args.threads}, "
            f"{args.size})"
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = Precision.FP16 if device.type == "cuda" else Precision.FP32
    spec = EngineSpec.resolve(args.model, height=args.size, width=args.size, steps=1, precision=precision)
    frames = pan_clip(args.frames, args.size, args.size)
    threads = torch.get_num_threads()  # restored after: both sources set args.threads, the same for every path
    try:
        eager = open_stream(Source(device=str(device), threads=args.threads), StreamConfig(spec), prompt=args.prompt)
        eager_out, eager_fps = timed_stream(eager, frames)
        columns, names = [frames, eager_out], ["input", "eager"]
        lines = [f"eager ({device.type}, {precision.value}): {eager_fps:.1f} FPS"]
        if not args.eager_only:
            cfg, backend = _engine_build(args, spec, device)
            result = build(cfg)
            print(f"{'reused' if result.reused else 'built'} {result.out}:\n{result.summary()}")
            source = Source(engines=result.out, backend=backend, threads=args.threads)
            engine = open_stream(source, prompt=args.prompt)
            engine_out, engine_fps = timed_stream(engine, frames)
            diff = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(eager_out, engine_out))
            columns.append(engine_out)
            names.append(backend)
            lines.append(
                f"{backend} ({device.type}, {result.manifest.spec.precision.value}): {engine_fps:.1f} FPS = "
                f"{engine_fps / eager_fps:.2f}x eager; max |engine - eager| = {diff} / 255"
            )
    finally:
        torch.set_num_threads(threads)
    write_side_by_side(args.out, columns, names, args.fps)
    print(
        f"{len(frames)} frames of {args.size}x{args.size}, {args.model}, 1 step, DyMe bank every 4 frames, "
        f"on {device_and_threads(device, args.threads)} for every path"
    )
    print("\n".join(lines))
    print(f"wrote {args.out.resolve()} ({' | '.join(names)})")
    return 0
