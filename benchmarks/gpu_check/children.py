"""What runs in the check's child processes (started by Check.call, each in a fresh interpreter, its payload
JSON in argv[1]): the environment probe, the builds and the profile."""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

from benchmarks.gpu_check.report import classify, split_by_kind


def _payload() -> dict:
    return json.loads(sys.argv[1])


def _spec(p: dict):
    from streamv2v_trt import EngineSpec

    return EngineSpec.resolve(
        p["model"], height=p["size"], width=p["size"], steps=p["steps"], vae="taesd", precision=p["precision"]
    )  # as benchmarks.fps resolves it


def environment_child() -> None:
    p = _payload()
    import platform

    import onnxruntime
    import torch

    from build_engines import BuildConfig, choose_builder
    from streamv2v_trt.backends.tensorrt_import import (
        FLAVOURS,
        TensorRTUnavailable,
        import_tensorrt,
        rtx_runs_on,
        tensorrt_version,
    )

    cuda = torch.cuda.is_available()
    cap = torch.cuda.get_device_capability() if cuda else None
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_version": torch.version.cuda,
        "cuda": cuda,
        "onnxruntime": onnxruntime.__version__,
        "ort_providers": onnxruntime.get_available_providers(),
        "tensorrt_import": {},
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, capability=f"{cap[0]}.{cap[1]}", gpu_memory_gib=round(props.total_memory / 2**30, 1))
        env["cudnn"] = torch.backends.cudnn.version()
    env["rtx_runs_on"] = rtx_runs_on(cap) if cap else None
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError as e:
        env["triton"] = f"not importable: {e}"
    imports = {}
    for flavour in FLAVOURS:
        try:
            imports[flavour] = tensorrt_version(import_tensorrt(flavour)[0])
        except TensorRTUnavailable as e:
            imports[flavour] = None
            env.setdefault("tensorrt_errors", {})[flavour] = str(e)[:300]
    env["tensorrt_import"] = {f: v or "no" for f, v in imports.items()}
    # What benchmarks.fps's tensorrt backend would use: full TensorRT if it imports, else TensorRT-RTX.
    flavour = next((f for f in FLAVOURS if imports[f]), None)
    env["tensorrt_runs"] = bool(cuda and flavour and (flavour == "tensorrt" or rtx_runs_on(cap)))
    try:
        env["builder"], env["builder_why"] = choose_builder(BuildConfig(_spec(p)))
    except Exception as e:  # choose_builder raises only for an asked builder; recorded, not fatal
        env["builder"], env["builder_why"] = None, f"{type(e).__name__}: {e}"
    print(json.dumps(env, indent=1))
    Path(p["json"]).write_text(json.dumps(env))


def build_child() -> None:
    """Build (or reuse) the folder of each engine backend in the list, as `benchmarks.fps` would find it."""
    p = _payload()
    from benchmarks import fps
    from streamv2v_trt.console import configure_logging

    configure_logging()
    spec, results = _spec(p), {}
    bases = dict.fromkeys(fps.parse_backend(b)[0] for b in p["backends"])  # raises on an unknown backend
    for b in (b for b in bases if b in fps.ENGINE_BACKENDS):
        t = time.perf_counter()
        try:
            folder = fps.engine_folder(argparse.Namespace(engines=Path(p["engines"])), spec, b)
            results[b] = {"status": "ok", "folder": str(folder)}
        except Exception as e:  # the other backends still build; this one is dropped from the run
            traceback.print_exc()
            results[b] = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:500]}
        results[b]["seconds"] = round(time.perf_counter() - t, 1)
        Path(p["json"]).write_text(json.dumps(results))
    Path(p["json"]).write_text(json.dumps(results))
    raise SystemExit(1 if any(r["status"] != "ok" for r in results.values()) else 0)


def profile_child() -> None:
    p = _payload()
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from benchmarks import fps
    from streamv2v_trt import StreamConfig
    from streamv2v_trt.clips import pattern_clip
    from streamv2v_trt.console import configure_logging

    configure_logging()
    cuda = p["device"].startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.set_num_threads(p["threads"] or torch.get_num_threads())
    spec = _spec(p)
    args = argparse.Namespace(
        device=p["device"],
        prompt=fps.build_parser().get_default("prompt"),
        engines=Path(p["engines"]),
        threads=torch.get_num_threads(),
    )
    runner, _, _ = fps.open_stream(p["backend"], args, StreamConfig(spec))
    n, warm = p["frames"], p["warmup"]
    frames = pattern_clip(warm + 2 * n, spec.height, spec.width)
    for f in frames[:warm]:
        runner(f)
    sync()
    t = time.perf_counter()
    for f in frames[warm : warm + n]:  # the same frame plans as the profiled ones, unprofiled
        runner(f)
    sync()
    frame_ms = (time.perf_counter() - t) * 1e3 / n
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t = time.perf_counter()
    with profile(activities=activities) as prof:
        for f in frames[warm + n :]:
            with record_function("frame"):
                runner(f)
        sync()
    profiled_ms = (time.perf_counter() - t) * 1e3 / n
    kernels = op_times(prof.key_averages(), cuda, kernels=True)
    if cuda and not kernels:  # no kernel events (a profiler that does not report them): time by launching op
        kernels = op_times(prof.key_averages(), cuda, kernels=False)
    kernels.sort(key=lambda k: -k["us"])
    top = [
        {"name": k["name"], "kind": classify(k["name"]), "calls": k["calls"], "ms_per_frame": k["us"] / 1e3 / n}
        for k in kernels[:25]
    ]
    result = {
        "backend": p["backend"],
        "frames": n,
        "frame_ms": frame_ms,
        "profiled_frame_ms": profiled_ms,
        "unit": "CUDA kernels and copies" if cuda else "CPU ops (self time)",
        "timeline": "device time; the rest of the frame is launch gaps and host work"
        if cuda
        else "host time; work inside ONNX Runtime / AOTInductor CPU kernels may not show as ops",
        "busy_ms": sum(k["us"] for k in kernels) / 1e3 / n,
        "kinds": split_by_kind(kernels, n),
        "top": top,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "top"}, indent=1))
    Path(p["json"]).write_text(json.dumps(result))


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
