"""ONNX Runtime (or TensorRT): FPS of a folder with swappable weights against one with frozen weights, in one run.

    python -m benchmarks.onnx_weights [--model tiny] [--size 64] [--frames 60] [--rounds 3] [--threads 1]
    python -m benchmarks.onnx_weights --builder tensorrt --precision fp16   # on a GPU: a refittable engine

Builds two folders of the same spec: swappable (base weights; the LoRA is swapped in at open and by `set_loras`: a
new ONNX Runtime session, or a TensorRT refit) and frozen (the same LoRA fused at build); --onnx-only run by
onnxruntime on the CPU, or --builder tensorrt / tensorrt-rtx run by the tensorrt backend on the GPU. The LoRA is a
random rank-4 one on every attention projection and feed-forward Linear (PEFT keys), written beside the folders.
Streams run in alternating rounds (frozen, swappable with the LoRA, swappable with no LoRA), so load on a shared
machine hits all alike; each figure is the median over rounds. Also the time of `set_loras` (a swap: a new session
made and swapped in, or a refit). Results go to docs/BENCHMARKS.md ("Swappable weights: ONNX Runtime") with the
machine they came from.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from build_engines import BuildConfig, build
from streamv2v_trt import StreamV2V
from streamv2v_trt.models.loader import find_weights, load_unet
from streamv2v_trt.spec import EngineSpec, LoraSpec

from .measure import machine

log = logging.getLogger(__name__)
LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.2")


def write_lora(path: Path, spec: EngineSpec, rank: int = 4, seed: int = 0) -> Path:
    """A random LoRA over the UNet's attention and feed-forward Linears (PEFT keys), scaled to visibly change it."""
    unet, gen = load_unet(spec, find_weights(spec), "cpu"), torch.Generator().manual_seed(seed)
    tensors = {}
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear) and name.endswith(LAYERS):
            tensors[f"unet.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=gen) * 0.1
            tensors[f"unet.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=gen) * 0.1
    save_file(tensors, str(path))
    return path


def frames(n: int, size: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (*size, 3)).astype(np.int16)
    return [np.clip(base + rng.integers(-6, 7, base.shape) + i, 0, 255).astype(np.uint8) for i in range(n)]


def clip_fps(stream, clip: list[np.ndarray]) -> float:
    """Frames per second of `stream` over `clip`. Each call returns its frame on the host, so the clock stops on
    finished work, GPU included."""
    t0 = time.perf_counter()
    for f in clip:
        stream(f)
    return len(clip) / (time.perf_counter() - t0)


def run(args) -> dict:
    spec = EngineSpec.resolve(args.model, height=args.size, width=args.size, precision=args.precision)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    lora = LoraSpec(write_lora(root / "lora.safetensors", spec), 0.8)
    how = dict(builder=args.builder) if args.builder else dict(onnx_only=True)
    swappable = build(BuildConfig(spec, weights="swappable", out=root / "swappable", **how)).out
    frozen = build(BuildConfig(replace(spec, loras=(lora,)), weights="frozen", out=root / "frozen", **how)).out
    backend = "tensorrt" if args.builder else "onnxruntime"
    opened = dict(prompt="a watercolor cat") | (dict(device="cuda") if args.builder else dict(threads=args.threads))
    streams = {
        "frozen (LoRA fused)": StreamV2V.from_engines(frozen, backend, loras=[lora], **opened),
        "swappable (LoRA swapped in)": StreamV2V.from_engines(swappable, backend, **opened),
        "swappable (no LoRA)": StreamV2V.from_engines(swappable, backend, **opened),
    }
    swaps = []
    for scale in (0.8, 0.5, 0.8):  # the first swap also loads the CPU UNet and builds the name map
        t0 = time.perf_counter()
        streams["swappable (LoRA swapped in)"].set_loras([(lora.path, scale)], reset=True)
        swaps.append(round((time.perf_counter() - t0) * 1e3, 1))
    clip = frames(args.frames, (spec.height, spec.width))
    for s in streams.values():  # warm-up: first store, first merge, inputs bound
        for f in clip[:8]:
            s(f)
    fps: dict[str, list[float]] = {k: [] for k in streams}
    for _ in range(args.rounds):
        for name, s in streams.items():
            fps[name].append(clip_fps(s, clip))
    return {
        "machine": machine(),
        "spec": f"{spec.model} {spec.width}x{spec.height} {spec.precision.value}",
        "backend": backend,
        "threads": args.threads,
        "frames_per_round": args.frames,
        "rounds": args.rounds,
        "fps_median": {k: round(float(np.median(v)), 1) for k, v in fps.items()},
        "fps_rounds": {k: [round(x, 1) for x in v] for k, v in fps.items()},
        "set_loras_ms": {"first (loads the CPU UNet, maps names)": swaps[0], "later": swaps[1:]},
    }


def two_folders_parser(prog: str, description: str, frames: int, out: str) -> argparse.ArgumentParser:
    """The flags of a benchmark that builds two folders of one spec and runs them in one run (this one, and
    benchmarks.onnx_shapes): model, precision, frames, rounds, threads, builder, out."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--model", default="tiny", help="preset (tiny: random weights)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16"))
    p.add_argument("--frames", type=int, default=frames, help="frames per stream per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds over every stream (median reported)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    p.add_argument("--builder", choices=("tensorrt", "tensorrt-rtx"), help="engines on the GPU instead of ONNX")
    p.add_argument("--out", default=out, help="folder for the two builds")
    return p


def print_run(run, args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # beside ONNX Runtime's pool (tests/conftest.py one_thread: measured)
    print(json.dumps(run(args), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    description = __doc__.split("\n\n")[0]
    p = two_folders_parser("python -m benchmarks.onnx_weights", description, 60, "engines/bench-onnx-weights")
    p.add_argument("--size", type=int, default=64, help="frame height and width")
    return print_run(run, p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
