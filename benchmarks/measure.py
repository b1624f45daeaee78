"""What `benchmarks.fps` measures with: PSNR, per-frame latency, a backend's own peak memory, memory now, and the
machine a figure was measured on."""

from __future__ import annotations

import gc
import platform
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from streamv2v_trt.console import cpu_model


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


class PeakMemory:
    """A backend's own peak: CUDA max allocated, or the process's peak RSS since `reset` (Linux clear_refs)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.kind = "cuda_max_allocated" if cuda else "peak_rss"

    def reset(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak RSS) to the current RSS
        except OSError:
            self.kind = "peak_rss_cumulative"  # not Linux: the peak covers earlier backends too

    def peak_mb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_mb(cuda: bool) -> float:
    if cuda:
        return torch.cuda.memory_allocated() / 2**20
    return psutil.Process().memory_info().rss / 2**20


def device_used_mb() -> float:
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**20


def machine() -> dict:
    import onnxruntime

    info = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "logical_cpus": psutil.cpu_count(),
        "load_avg_1m": psutil.getloadavg()[0],
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        info["cuda"] = torch.version.cuda
    return info
