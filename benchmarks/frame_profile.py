"""Where a frame's time goes: torch.profiler over one bank interval, split by kernel kind, with the top kernels.

`python -m benchmarks.fps --profile` calls `profile_frames` for every backend after its timed frames. It runs n
frames unprofiled (the frame time without the profiler's overhead), then the next n under the profiler; n is one
bank interval, so exactly one bank update (a DyMe merge) is among them. On a GPU the split is device time per
frame of every CUDA kernel and copy (the rest of the frame is launch gaps and host work); where no kernel events
come back it falls back to the device time of the ops that launched them. On a CPU it is the self time of every
op (work inside ONNX Runtime or AOTInductor's CPU kernels may not show as ops). Profile a backend without
"+graphs" to see every kernel beside the op that launched it: a graph replay launches no ops.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger("benchmarks.frame_profile")

# Kernel kinds by name substring (lower case), first match wins. Names are CUDA kernel names on a GPU (cuDNN,
# cuBLAS, flash attention, Inductor's Triton kernels, ours) or aten op names on a CPU. Inductor's fused
# pointwise / reduction kernels are named after the ops they fuse ("triton_poi_fused_convolution_silu_0"), so
# they count as other before the conv / GEMM words can match.
KINDS = (
    ("dyme", ("_dyme", "dyme_")),  # streamv2v_trt/kernels/dyme_triton.py: _dyme_prepare/assign/segments/merge_kernel
    ("other", ("triton_poi_", "triton_red_", "triton_per_")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
    ("conv", ("conv", "fprop", "dgrad", "wgrad", "cudnn")),
    ("gemm", ("gemm", "gemv", "nvjet", "cublas", "cutlass", "matmul", "addmm", "aten::mm", "bmm", "splitk")),
    ("copies", ("memcpy", "copy", "nchwtonhwc", "nhwctonchw", "transpose")),
)
KIND_NAMES = ("conv", "gemm", "attention", "dyme", "copies", "other")
TOP = 25


def classify(name: str) -> str:
    low = name.lower()
    return next((kind for kind, words in KINDS if any(w in low for w in words)), "other")


def split_by_kind(kernels: list[dict], frames: int) -> dict[str, float]:
    """{kind: ms per frame} of kernel rows {"name", "us"}."""
    split = dict.fromkeys(KIND_NAMES, 0.0)
    for k in kernels:
        split[classify(k["name"])] += k["us"] / 1e3 / frames
    return split


def op_times(averages, cuda: bool, kernels: bool) -> list[dict]:
    """{"name", "us", "calls"} per kernel (GPU, kernels=True), per op with device time (GPU), or per op with its
    self CPU time (CPU); the "frame" annotation itself left out."""
    from torch.autograd import DeviceType

    rows = []
    for e in averages:
        if getattr(e, "is_user_annotation", False) or e.key == "frame":
            continue
        if cuda and (e.device_type == DeviceType.CUDA) != kernels:
            continue
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if us > 0:
            rows.append({"name": e.key, "us": us, "calls": e.count})
    return rows


def profile_frames(runner: Callable[[Any], Any], frames: list, n: int, cuda: bool) -> dict:
    """n frames timed, then n more under torch.profiler (`frames` loops): ms per frame by kind and the top kernels.
    A "frame" is whatever `runner` takes: one frame, or (benchmarks.fps --streams K) a round of K frames."""
    from torch.profiler import ProfilerActivity, profile, record_function

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    clip = [frames[i % len(frames)] for i in range(2 * n)]
    sync()
    t = time.perf_counter()
    for f in clip[:n]:
        runner(f)
    sync()
    frame_ms = (time.perf_counter() - t) * 1e3 / n
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t = time.perf_counter()
    with profile(activities=activities) as prof:
        for f in clip[n:]:
            with record_function("frame"):
                runner(f)
        sync()
    profiled_ms = (time.perf_counter() - t) * 1e3 / n
    kernels = op_times(prof.key_averages(), cuda, kernels=True)
    if cuda and not kernels:  # no kernel events came back: time by the op that launched them
        kernels = op_times(prof.key_averages(), cuda, kernels=False)
    kernels.sort(key=lambda k: -k["us"])
    result = {
        "frames": n,
        "frame_ms": frame_ms,
        "profiled_frame_ms": profiled_ms,
        "unit": "CUDA kernels and copies, device time" if cuda else "CPU ops, self host time",
        "busy_ms": sum(k["us"] for k in kernels) / 1e3 / n,
        "kinds": split_by_kind(kernels, n),
        "top": [
            {"name": k["name"], "kind": classify(k["name"]), "calls": k["calls"], "ms_per_frame": k["us"] / 1e3 / n}
            for k in kernels[:TOP]
        ],
    }
    log.info("profile: %s", describe(result))
    return result


def describe(profile: dict) -> str:
    """One line: "frame 6.95 ms, 5.80 ms per frame in CUDA kernels ...: conv 2.10, gemm 1.50, ..."."""
    kinds = ", ".join(f"{k} {v:.2f}" for k, v in profile["kinds"].items())
    return (
        f"frame {profile['frame_ms']:.2f} ms ({profile['profiled_frame_ms']:.2f} profiled), "
        f"{profile['busy_ms']:.2f} ms per frame in {profile['unit']} over {profile['frames']} frames: {kinds}"
    )
