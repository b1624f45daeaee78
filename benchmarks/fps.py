"""Frames per second, latency and memory of every backend, in one run, on the same frames.

    python -m benchmarks.fps --model tiny --height 64 --width 64 --backends eager,onnxruntime --frames 200
    python -m benchmarks.fps --model sd-turbo --backends eager,tensorrt,tensorrt+graphs --frames 500 --soak 10000

Backends: eager (PyTorch), onnxruntime (the build folder's ONNX), tensorrt (its engines); a "+graphs" suffix
replays each frame from CUDA graphs (GPU; eager and tensorrt). Every backend starts from a reset and gets the
same frames; warm-up frames are not timed. Latency is one frame, host frame in to host frame out: CUDA events
on a GPU, perf_counter on the CPU. Peak memory: torch.cuda.max_memory_allocated on a GPU (engines' own
activation memory is not in it; `device_used_mb` is the device-wide figure), RSS on the CPU. Outputs are also
compared with eager's (PSNR over the first 100 timed frames) so a fast wrong backend shows. `--soak N` runs N
more frames and reports memory and latency drift. A missing build folder is built first (build_engines).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch

from streamv2v_trt.cli.log_setup import configure_logging

log = logging.getLogger("benchmarks.fps")

BACKENDS = ("eager", "onnxruntime", "tensorrt")
PSNR_FRAMES = 100


@dataclass
class Result:
    backend: str
    device: str
    dtype: str
    frames: int
    warmup: int
    fps: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    peak_mem_mb: float
    mem_kind: str  # "cuda_max_allocated" or "rss"
    device_used_mb: float | None = None
    psnr_vs_eager_db: float | None = None  # mean over the first timed frames; 100 when identical
    psnr_min_db: float | None = None
    soak: dict = field(default_factory=dict)


def synthetic_video(n: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    """A moving pattern with noise: consecutive frames are similar, as in a camera stream."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = []
    for i in range(n):
        phase = i * 0.15
        r = 127 + 100 * np.sin(x / 9 + phase)
        g = 127 + 100 * np.sin(y / 7 - phase)
        b = 127 + 100 * np.sin((x + y) / 11 + 2 * phase)
        img = np.stack([r, g, b], -1) + rng.normal(0, 4, (height, width, 3))
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
    return frames


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """dB, capped at 100 for identical frames (JSON has no infinity)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return min(100.0, 10 * np.log10(255.0**2 / mse)) if mse else 100.0


class Timer:
    """Per-frame latency: CUDA events on a GPU (read after the run, no sync per frame), perf_counter on a CPU."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.marks: list = []

    def start(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def stop(self, start) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append((start, e))
        else:
            self.marks.append((time.perf_counter() - start) * 1e3)

    def latencies_ms(self) -> np.ndarray:
        if self.cuda:
            torch.cuda.synchronize()
            return np.array([s.elapsed_time(e) for s, e in self.marks])
        return np.array(self.marks)


def memory_mb(cuda: bool) -> float:
    if cuda:
        return torch.cuda.memory_allocated() / 2**20
    return psutil.Process().memory_info().rss / 2**20


def device_used_mb() -> float:
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**20


def open_stream(name: str, args, cfg, engines: Path | None):
    from streamv2v_trt import StreamV2V
    from streamv2v_trt.cuda_graph import CudaGraphStream

    base, _, graphs = name.partition("+")
    if graphs and graphs != "graphs":
        raise ValueError(f"backend {name!r}: the only suffix is +graphs")
    if base == "eager":
        stream = StreamV2V.from_pretrained(
            args.model, cfg, prompt=args.prompt, device=args.device, dtype=args.dtype, vae=args.vae
        )
    elif base in ("onnxruntime", "tensorrt"):
        stream = StreamV2V.from_engines(
            engines, base, cfg, prompt=args.prompt, device=args.device, threads=args.threads
        )
    else:
        raise ValueError(f"unknown backend {name!r}: expected one of {BACKENDS}, optionally with +graphs")
    return (CudaGraphStream(stream) if graphs else stream), stream


def run_backend(name: str, args, cfg, engines, frames, reference) -> tuple[Result, list[np.ndarray]]:
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
    runner, stream = open_stream(name, args, cfg, engines)
    warm = frames[: args.warmup]
    timed = frames[args.warmup : args.warmup + args.frames]
    for f in warm:
        runner(f)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timer = Timer(cuda)
    outputs = []
    t0 = time.perf_counter()
    for i, f in enumerate(timed):
        start = timer.start()
        out = runner(f)
        timer.stop(start)
        if i < PSNR_FRAMES:
            outputs.append(out)
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    lat = timer.latencies_ms()
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else psutil.Process().memory_info().rss / 2**20
    result = Result(
        backend=name,
        device=str(stream.device),
        dtype=str(stream.dtype).removeprefix("torch."),
        frames=len(timed),
        warmup=len(warm),
        fps=len(timed) / wall,
        p50_ms=float(np.percentile(lat, 50)),
        p99_ms=float(np.percentile(lat, 99)),
        mean_ms=float(lat.mean()),
        peak_mem_mb=peak,
        mem_kind="cuda_max_allocated" if cuda else "rss",
        device_used_mb=device_used_mb() if cuda else None,
    )
    if reference is not None and name != "eager":
        scores = [psnr(a, b) for a, b in zip(reference, outputs)]
        result.psnr_vs_eager_db, result.psnr_min_db = float(np.mean(scores)), float(np.min(scores))
    if args.soak:
        result.soak = soak(runner, frames, args.soak, cuda)
    del runner, stream
    return result, outputs


def soak(runner, frames: list[np.ndarray], n: int, cuda: bool) -> dict:
    """n more frames (the clip loops); memory and latency sampled in windows, drift = last window vs first."""
    window = max(1, n // 20)
    timer = Timer(cuda)
    mem = []
    for i in range(n):
        start = timer.start()
        runner(frames[i % len(frames)])
        timer.stop(start)
        if (i + 1) % window == 0:
            mem.append(memory_mb(cuda))
    lat = timer.latencies_ms()
    p50 = [float(np.percentile(lat[j : j + window], 50)) for j in range(0, len(lat) - window + 1, window)]
    return {
        "frames": n,
        "window": window,
        "memory_mb": mem,
        "memory_drift_mb": mem[-1] - mem[0] if mem else 0.0,
        "p50_ms": p50,
        "latency_drift_pct": 100 * (p50[-1] / p50[0] - 1) if p50 else 0.0,
        "device_used_mb_end": device_used_mb() if cuda else None,
    }


def ensure_engines(args, cfg, backends: list[str]) -> Path | None:
    """The build folder the engine backends read; built with build_engines when it has no manifest yet."""
    if not any(b.split("+")[0] in ("onnxruntime", "tensorrt") for b in backends):
        return None
    need_engines = any(b.startswith("tensorrt") for b in backends)
    precision = "fp16" if args.dtype == torch.float16 else "fp32"
    steps = "-".join(map(str, cfg.t_index_list))
    out = args.engines or Path("engines") / f"bench-{args.model}-{cfg.height}x{cfg.width}-t{steps}-{precision}"
    if (out / "manifest.json").is_file() and (not need_engines or "engine" in (out / "manifest.json").read_text()):
        return out
    from build_engines import BuildConfig, build

    log.info("building %s (%s, %s) into %s", args.model, precision, "engines" if need_engines else "onnx", out)
    build(
        BuildConfig(
            out, model=args.model, height=cfg.height, width=cfg.width, t_index_list=cfg.t_index_list,
            bank=cfg.bank, vae=args.vae, precision=precision, onnx_only=not need_engines,
        )
    )  # fmt: skip
    return out


def machine() -> dict:
    import onnxruntime

    info = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "logical_cpus": psutil.cpu_count(),
        "load_avg_1m": psutil.getloadavg()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime": onnxruntime.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def table(results: list[Result]) -> str:
    head = f"{'backend':<18} {'device':<7} {'dtype':<8} {'FPS':>8} {'p50 ms':>8} {'p99 ms':>8} {'peak MB':>9}"
    head += f" {'PSNR dB':>8}"
    rows = [head, "-" * len(head)]
    for r in results:
        ps = "" if r.psnr_vs_eager_db is None else f"{r.psnr_vs_eager_db:.1f}"
        rows.append(
            f"{r.backend:<18} {r.device:<7} {r.dtype:<8} {r.fps:>8.1f} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f} "
            f"{r.peak_mem_mb:>9.0f} {ps:>8}"
        )
        if r.soak:
            s = r.soak
            rows.append(
                f"  soak {s['frames']} frames: memory drift {s['memory_drift_mb']:+.1f} MB, "
                f"p50 latency drift {s['latency_drift_pct']:+.1f}%"
            )
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fps", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="preset (tiny, sd-turbo, sd15) or diffusers folder")
    p.add_argument("--backends", default="eager,onnxruntime", help="comma list: eager, onnxruntime, tensorrt[+graphs]")
    p.add_argument("--frames", type=int, default=100, help="timed frames per backend")
    p.add_argument("--warmup", type=int, default=10, help="untimed frames first (graph capture happens here)")
    p.add_argument("--soak", type=int, default=0, help="then N more frames, tracking memory and latency drift")
    p.add_argument("--height", type=int, default=None, help="default: the preset's")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--t-index-list", default=None, help="e.g. 32 or 30,35,40,45 (steps = its length)")
    p.add_argument("--vae", default="taesd", choices=("taesd", "full"))
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=("fp16", "fp32"), help="default: fp16 on cuda, fp32 on cpu")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for torch and onnxruntime")
    p.add_argument("--engines", type=Path, default=None, help="build folder (default: engines/bench-...)")
    p.add_argument("--prompt", default="a watercolor painting")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    from streamv2v_trt import StreamConfig
    from streamv2v_trt.models.presets import PRESETS

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    fp16 = args.dtype == "fp16" or (args.dtype is None and args.device.startswith("cuda"))
    args.dtype = torch.float16 if fp16 else torch.float32
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS.get(args.model)
    height = args.height or (preset.height if preset else 512)
    width = args.width or (preset.width if preset else 512)
    t_index = (
        tuple(int(t) for t in args.t_index_list.split(","))
        if args.t_index_list
        else (preset.t_index_list if preset else (32,))
    )
    cfg = StreamConfig(height=height, width=width, t_index_list=t_index)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    engines = ensure_engines(args, cfg, backends)
    frames = synthetic_video(args.warmup + args.frames, height, width)

    results, reference = [], None
    for name in sorted(backends, key=lambda b: b != "eager"):  # eager first: it is the reference
        log.info("running %s: %d warm-up + %d timed frames", name, args.warmup, args.frames)
        result, outputs = run_backend(name, args, cfg, engines, frames, reference)
        if name == "eager":
            reference = outputs
        results.append(result)
        log.info("%s: %.1f FPS, p50 %.2f ms", name, result.fps, result.p50_ms)

    by = {r.backend: r for r in results}
    ratios = {f"{r.backend}/eager": r.fps / by["eager"].fps for r in results if "eager" in by and r.backend != "eager"}
    print(f"{args.model} {height}x{width}, steps {cfg.steps}, {machine()['cpu_model']}", end="")
    print(f", GPU {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else "")
    print(table(results))
    for k, v in ratios.items():
        print(f"FPS ratio {k}: {v:.2f}x")
    if args.json:
        report = {
            "machine": machine(),
            "config": {
                "model": args.model, "height": height, "width": width, "t_index_list": list(t_index),
                "bank": cfg.bank.kind.value, "interval": cfg.bank.interval, "vae": args.vae,
                "device": args.device, "dtype": str(args.dtype).removeprefix("torch."), "threads": args.threads,
                "engines": str(engines) if engines else None,
            },
            "results": [asdict(r) for r in results],
            "ratios": ratios,
        }  # fmt: skip
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=float) + "\n")
        log.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
