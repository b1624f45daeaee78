"""Frames per second, latency, memory and correctness of every backend, in one run, on the same frames.

    python -m benchmarks.fps --model tiny --height 64 --width 64 --backends eager,onnxruntime --frames 200
    python -m benchmarks.fps --model sd-turbo --backends eager,eager+graphs,compiled+graphs,aoti+graphs --soak 3000
    python -m benchmarks.fps --model tiny --height 64 --width 64 --backends eager,onnxruntime --streams 2
    python -m benchmarks.fps --model tiny --height 64 --width 64 --backends eager --controlnet tiny --control canny

Backends: eager (PyTorch), compiled (eager + torch.compile; channels_last on CUDA), onnxruntime (a build folder's ONNX),
tensorrt (its TensorRT / TensorRT-RTX engines), aoti (its AOTInductor packages); "+graphs" replays each frame from
CUDA graphs (GPU). Missing build folders are built first (`build_engines`, the folder naming rule of the spec).

Every backend gets the same frames, precision and thread policy (`--threads`, torch intra-op and ONNX Runtime
alike; default 1 on a CPU: two thread pools on a small CPU stall each other and make ratios meaningless), starts
from a reset, and warm-up frames are not timed. Latency is one frame, host frame in to host frame out: CUDA events
on a GPU, perf_counter on a CPU. Peak memory is each backend's own: torch.cuda.max_memory_allocated on a GPU
(engines' own activation memory is not in it; `device_used_mb` is the device-wide figure), the peak RSS while it
ran on a CPU (Linux resets the peak between backends). Every timed frame is compared with eager's (PSNR): a backend
below `--psnr-floor` is marked FAIL and the command exits 1, so a fast wrong backend cannot pass. `--soak N` runs N
more frames and reports memory and latency drift. `--profile` splits one bank interval's time per frame into conv /
GEMM / attention / DyMe / copies / other and lists the top kernels (benchmarks/frame_profile.py).

`--streams K` runs every backend twice: K separate streams on the same networks, called in turn, and one
MultiStream of K slots, one batched network call per round (a build folder made for K streams); each stream gets
its own clip, the same in both. FPS counts all K streams' frames, latency is a round (K frames in, K out), PSNR
compares every stream's frames with eager's K separate streams, and "multiK/xK" is what batching gains. Every
stream is opened by the library's `open_stream` / `open_multistream` from a `Source` and the `StreamConfig`.

`--controlnet NAME[,..]` (with `--control KIND[:SCALE][,..]`, as `video`'s) runs every backend twice in the same
run, on the same frames and threads: without ControlNet, then with them (rows "... +controlnet", compared with eager
+controlnet's frames); "X +controlnet/X" is what the ControlNets cost. Build folders do not export ControlNets yet:
with --controlnet, run the eager backends.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from streamv2v_trt.cli.stream_args import CliError
from streamv2v_trt.console import HelpFormatter, configure_logging, device_and_threads
from streamv2v_trt.flags import add_flags
from streamv2v_trt.flavours import ENGINE_BACKENDS, BackendKind, Builder, build_for
from streamv2v_trt.presets import ModelUnavailable
from streamv2v_trt.source import DEFAULT_MODEL, Source
from streamv2v_trt.spec import EngineSpec

from .measure import PeakMemory, Timer, device_used_mb, machine, memory_mb, psnr

log = logging.getLogger("benchmarks.fps")

EAGER = BackendKind.EAGER  # the reference every other backend's frames are compared with
BACKENDS = (EAGER, "compiled", *ENGINE_BACKENDS)  # compiled: eager with torch.compile


@dataclass
class Result:
    backend: str
    device: str
    dtype: str
    threads: int
    frames: int
    warmup: int
    fps: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    peak_mem_mb: float
    mem_kind: str  # "cuda_max_allocated" or "peak_rss"
    device_used_mb: float | None = None
    psnr_vs_eager_db: float | None = None  # mean over every timed frame
    psnr_min_db: float | None = None
    psnr_ok: bool | None = None  # psnr_min >= the floor; None for eager itself
    engines: str | None = None
    streams: int = 1  # frames per round: FPS counts all of them, latency is a round
    layout: str = "separate"  # K streams called in turn, or "multi": one MultiStream of K slots
    controlnets: list[str] = field(default_factory=list)  # the ControlNets this row ran (--controlnet), with kinds
    soak: dict = field(default_factory=dict)
    profile: dict = field(default_factory=dict)  # --profile: benchmarks/frame_profile.py


def parse_backend(name: str) -> tuple[str, bool]:
    base, _, suffix = name.partition("+")
    if base not in BACKENDS or suffix not in ("", "graphs"):
        raise ValueError(f"unknown backend {name!r}: expected one of {', '.join(BACKENDS)}, optionally with +graphs")
    return base, bool(suffix)


def engine_folder(args, spec, base: str) -> Path:
    """The build folder `base` runs, built first when it is missing or stale (build_engines reuses what it can)."""
    from build_engines import BuildConfig, build

    builder, onnx_only = build_for(base)
    if builder is None and not onnx_only:  # tensorrt: the flavour that imports, full TensorRT, else TensorRT-RTX
        from streamv2v_trt.backends.tensorrt_import import import_tensorrt

        builder = import_tensorrt()[1]
    out = args.engines / spec.folder_name(builder)
    log.info("build folder for %s: %s", base, out)
    return build(BuildConfig(spec, out=out, builder=builder or Builder.AUTO, onnx_only=onnx_only)).out


def source_of(name: str, args, spec) -> tuple[Source, Path | None]:
    """The `Source` backend `name` runs ("aoti+graphs": aoti, CUDA graphs), its build folder built for `spec`."""
    base, graphs = parse_backend(name)
    folder = engine_folder(args, spec, base) if base in ENGINE_BACKENDS else None
    backend = base if folder is not None else None
    source = Source(engines=folder, backend=backend, device=args.device, threads=args.threads,
                    compile=base == "compiled", cuda_graphs=graphs)  # fmt: skip
    return source, folder


def open_stream(name: str, args, cfg):
    """(runner, stream, folder): one stream of backend `name` (the runner is graphed with "+graphs")."""
    from streamv2v_trt.opening import open_stream as open_source

    source, folder = source_of(name, args, cfg.spec)
    runner = open_source(source, cfg, prompt=args.prompt)
    return runner, runner, folder


@dataclass
class Streams:
    """K streams of one backend, run a round at a time: one frame per stream in, one out each."""

    run: Callable[[list[np.ndarray]], list[np.ndarray]]
    device: torch.device
    dtype: torch.dtype
    folder: Path | None


def open_streams(name: str, layout: str, args, cfg) -> Streams:
    """`--streams K` streams of backend `name`: "separate" (K streams on the same networks, each called in
    turn: what runs without batching) or "multi" (a MultiStream of K slots: one batched call per round)."""
    from streamv2v_trt.cuda_graph import CudaGraphStream
    from streamv2v_trt.opening import open_multistream

    K = args.streams
    if layout == "multi":
        base, _ = parse_backend(name)
        if base in ENGINE_BACKENDS:  # a folder built for K streams
            cfg = cfg.with_spec(max_streams=K)
        source, folder = source_of(name, args, cfg.spec)
        multi = open_multistream(source, cfg, K, prompt=args.prompt)
        return Streams(lambda fs: list(multi(dict(enumerate(fs))).values()), multi.device, multi.dtype, folder)
    runner, stream, folder = open_stream(name, args, cfg)
    pipeline = runner.stream if isinstance(runner, CudaGraphStream) else runner
    others = [pipeline.sibling() for _ in range(K - 1)]  # their own banks and noise, the same networks
    runners = [runner, *(CudaGraphStream(s) if runner is not pipeline else s for s in others)]
    return Streams(lambda fs: [r(f) for r, f in zip(runners, fs)], pipeline.device, pipeline.dtype, folder)


CONTROLNET = " +controlnet"  # the suffix of a row that ran the ControlNets (--controlnet)


def label(name: str, layout: str, streams: int, controlnet: bool = False) -> str:
    """A row's name: the backend alone for one stream, "eager x2" for K separate streams, "eager multi2"; with
    ControlNets, " +controlnet" after it."""
    suffix = CONTROLNET if controlnet else ""
    if streams == 1:
        return name + suffix
    return (f"{name} x{streams}" if layout == "separate" else f"{name} multi{streams}") + suffix


def run_backend(name: str, layout: str, args, cfg, clips, reference) -> tuple[Result, list[list[np.ndarray]]]:
    """Warm-up rounds, timed rounds (one frame of each stream's clip per round), PSNR against `reference`'s
    outputs, soak. FPS counts every stream's frames; latency is one round (K frames in, K out)."""
    cuda = args.device.startswith("cuda")
    memory = PeakMemory(cuda)
    memory.reset()
    streams = open_streams(name, layout, args, cfg)
    rounds = [list(r) for r in zip(*clips)]  # round t: frame t of every stream
    warm, timed = rounds[: args.warmup], rounds[args.warmup : args.warmup + args.frames]
    for frames in warm:
        streams.run(frames)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timer = Timer(cuda)
    outputs = []
    t0 = time.perf_counter()
    for frames in timed:
        start = timer.start()
        outputs.append(streams.run(frames))
        timer.stop(start)
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    lat = timer.latencies_ms()
    result = Result(
        backend=label(name, layout, args.streams, bool(cfg.spec.controlnets)),
        device=str(streams.device),
        dtype=str(streams.dtype).removeprefix("torch."),
        threads=args.threads,
        frames=len(timed),
        warmup=len(warm),
        fps=len(timed) * args.streams / wall,
        p50_ms=float(np.percentile(lat, 50)),
        p99_ms=float(np.percentile(lat, 99)),
        mean_ms=float(lat.mean()),
        peak_mem_mb=memory.peak_mb(),
        mem_kind=memory.kind,
        device_used_mb=device_used_mb() if cuda else None,
        engines=str(streams.folder) if streams.folder else None,
        streams=args.streams,
        layout=layout,
        controlnets=[f"{c}:{k}:{s:g}" for c, k, s in zip(cfg.spec.controlnets, cfg.control_kinds,
                                                          cfg.controlnet_scales)],
    )  # fmt: skip
    if reference is not None:
        scores = [psnr(a, b) for want, got in zip(reference, outputs) for a, b in zip(want, got)]
        result.psnr_vs_eager_db, result.psnr_min_db = float(np.mean(scores)), float(np.min(scores))
        result.psnr_ok = result.psnr_min_db >= args.psnr_floor
    if args.profile:  # one bank interval: exactly one bank update among the profiled rounds (K frames each)
        from benchmarks.frame_profile import profile_frames

        result.profile = profile_frames(streams.run, timed, cfg.bank.interval, cuda)
    if args.soak:
        result.soak = soak(streams.run, rounds, args.soak, cuda)
    del streams
    return result, outputs


def soak(run: Callable, rounds: list[list[np.ndarray]], n: int, cuda: bool) -> dict:
    """n more rounds (the clips loop); memory and latency sampled in windows, drift = last window vs first."""
    window = max(1, n // 20)
    timer = Timer(cuda)
    mem, changes = [], []
    last = None
    for i in range(n):
        start = timer.start()
        out = run(rounds[i % len(rounds)])[0]
        timer.stop(start)
        if (i + 1) % window == 0:
            mem.append(memory_mb(cuda))
            if last is not None:  # a stuck stream (the same frame forever) shows as no change at all
                changes.append(float(np.abs(out.astype(np.int16) - last.astype(np.int16)).mean()))
            last = out
    lat = timer.latencies_ms()
    p50 = [float(np.percentile(lat[j : j + window], 50)) for j in range(0, len(lat) - window + 1, window)]
    return {
        "frames": n,
        "window": window,
        "memory_mb": mem,
        "memory_drift_mb": mem[-1] - mem[0] if mem else 0.0,
        "p50_ms": p50,
        "latency_drift_pct": 100 * (p50[-1] / p50[0] - 1) if p50 else 0.0,
        "p99_ms": float(np.percentile(lat, 99)),
        "mean_output_change": float(np.mean(changes)) if changes else None,
        "device_used_mb_end": device_used_mb() if cuda else None,
    }


def fps_ratios(results: list[Result], streams: int) -> dict[str, float]:
    """Every row against eager in the same layout ("onnxruntime/eager", "aoti multi4/eager multi4"), and each
    MultiStream against its K separate streams ("aoti multi4/x4")."""
    by = {r.backend: r for r in results}
    ratios = {}
    for r in results:
        eager = by.get(label(EAGER, r.layout, streams, bool(r.controlnets)))
        if eager is not None and r is not eager:
            ratios[f"{r.backend}/{eager.backend}"] = r.fps / eager.fps
    for r in results:
        if r.layout == "multi":
            ratios[f"{r.backend}/x{streams}"] = r.fps / by[r.backend.replace(f" multi{streams}", f" x{streams}")].fps
    for r in results:  # what the ControlNets cost: the same backend and layout without them, same run
        without = by.get(r.backend.removesuffix(CONTROLNET))
        if r.controlnets and without is not None:
            ratios[f"{r.backend}/{without.backend}"] = r.fps / without.fps
    return ratios


def table(results: list[Result]) -> str:
    head = f"{'backend':<18} {'device':<7} {'dtype':<8} {'FPS':>8} {'p50 ms':>8} {'p99 ms':>8} {'peak MB':>9}"
    head += f" {'PSNR dB (min)':>15}"
    rows = [head, "-" * len(head)]
    for r in results:
        ps = "" if r.psnr_vs_eager_db is None else f"{r.psnr_vs_eager_db:.1f} ({r.psnr_min_db:.1f})"
        mark = "" if r.psnr_ok in (None, True) else "  FAIL: below the PSNR floor"
        rows.append(
            f"{r.backend:<18} {r.device:<7} {r.dtype:<8} {r.fps:>8.1f} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f} "
            f"{r.peak_mem_mb:>9.0f} {ps:>15}{mark}"
        )
        if r.soak:
            s = r.soak
            rows.append(
                f"  soak {s['frames']} frames: memory drift {s['memory_drift_mb']:+.1f} MB, "
                f"p50 latency drift {s['latency_drift_pct']:+.1f}%, p99 {s['p99_ms']:.2f} ms"
            )
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.fps",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    add_flags(p, EngineSpec, ["model"], defaults={"model": DEFAULT_MODEL})
    p.add_argument(
        "--backends", default="eager,onnxruntime", help=f"comma list of {', '.join(BACKENDS)}, each with +graphs"
    )
    p.add_argument("--frames", type=int, default=100, help="timed frames per backend (per stream)")
    p.add_argument(
        "--streams",
        type=int,
        default=1,
        metavar="K",
        help="K > 1: every backend runs K streams twice, as K separate streams on the same networks (called in "
        "turn) and as one MultiStream of K slots (one batched call; engines built with --max-streams K); FPS "
        "counts all K streams' frames, latency is a round of K frames",
    )
    p.add_argument("--warmup", type=int, default=10, help="untimed frames first (compilation, graph capture)")
    p.add_argument("--soak", type=int, default=0, help="then N more frames, tracking memory and latency drift")
    p.add_argument(
        "--profile",
        action="store_true",
        help="then profile one bank interval: ms per frame by kernel kind, the top kernels",
    )
    add_flags(p, EngineSpec, ["height", "width", "steps"], unset=["height", "width", "steps"])
    p.add_argument("--t-index-list", default=None, help="e.g. 30,35,40,45 (default: the spec's)")
    add_flags(p, EngineSpec, ["vae"])
    add_flags(p, Source, ["device", "threads"], defaults={"device": "auto"})
    add_flags(p, EngineSpec, ["precision"], unset=["precision"], defaults={"precision": "fp16 on cuda, fp32 on cpu"},
              aliases={"precision": ("--dtype",)})  # fmt: skip
    add_flags(p, EngineSpec, ["controlnets"])
    p.add_argument("--control", metavar="KIND[:SCALE][,..]", help="per --controlnet: control kind and scale "
                   "(canny, frame, previous; default frame:1 each), as the video command's")  # fmt: skip
    p.add_argument("--psnr-floor", type=float, default=30.0, help="a backend whose min PSNR vs eager is lower fails")
    p.add_argument("--engines", type=Path, default=Path("engines"), help="parent folder of the build folders")
    p.add_argument("--prompt", default="a watercolor painting")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    return p


def run_config(args):
    """The config every backend runs (the spec from the flags), with the device and thread policy set in `args`:
    cuda when available; 1 CPU thread on a CPU, torch's on a GPU; fp16 on cuda, fp32 on the CPU."""
    from streamv2v_trt import StreamConfig

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    if args.threads is None:
        args.threads = torch.get_num_threads() if cuda else 1
    torch.set_num_threads(args.threads)
    t_index = tuple(int(t) for t in args.t_index_list.split(",")) if args.t_index_list else ()
    spec = EngineSpec.resolve(
        args.model, height=args.height, width=args.width, steps=len(t_index) or args.steps, vae=args.vae,
        precision=args.precision or ("fp16" if cuda else "fp32"),
    )  # fmt: skip
    return StreamConfig(spec, t_index_list=t_index)


def control_config(args, cfg):
    """`cfg` with the ControlNets of --controlnet and the kinds and scales of --control, or None without them."""
    from streamv2v_trt.cli.stream_args import parse_controls

    if not args.controlnet:
        if args.control:
            raise SystemExit("--control needs --controlnet NAME_OR_PATH[,..]")
        return None
    kinds, scales = parse_controls(args.control, args.controlnet) if args.control else ((), ())
    if "video" in kinds:
        raise SystemExit("--control video needs control frames from a file: benchmark canny, frame or previous")
    return dataclasses.replace(cfg.with_spec(controlnets=args.controlnet), control_kinds=kinds,
                               controlnet_scales=scales)  # fmt: skip


def run_all(args, cfg, backends: list[str]) -> list[Result]:
    """Every backend (eager first: it is the reference), in each layout, on the same clips; with --controlnet,
    all of it again with the ControlNets (eager +controlnet the reference of those rows)."""
    from streamv2v_trt.clips import pattern_clip

    spec = cfg.spec
    clips = [pattern_clip(args.warmup + args.frames, spec.height, spec.width, seed=i) for i in range(args.streams)]
    layouts = ("separate",) if args.streams == 1 else ("separate", "multi")
    results = []
    if EAGER not in backends:
        log.warning("no eager backend in this run: outputs are not checked (PSNR needs eager as the reference)")
    for config in (cfg, control_config(args, cfg)):
        if config is None:
            continue
        reference = None
        for name in sorted(backends, key=lambda b: b != EAGER):
            for layout in layouts:
                row = label(name, layout, args.streams, bool(config.spec.controlnets))
                log.info("running %s: %d warm-up + %d timed frames, %d thread(s)", row, args.warmup, args.frames,
                         args.threads)  # fmt: skip
                result, outputs = run_backend(name, layout, args, config, clips, reference)
                if name == EAGER and reference is None:
                    reference = outputs  # eager, K separate streams: what every other row is compared with
                results.append(result)
                log.info("%s: %.1f FPS, p50 %.2f ms", row, result.fps, result.p50_ms)
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    if args.streams < 1:
        raise SystemExit(f"--streams must be >= 1, got {args.streams}")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in backends:
        parse_backend(b)
    cfg = run_config(args)
    spec = cfg.spec
    try:
        results = run_all(args, cfg, backends)
    except (ModelUnavailable, CliError) as e:  # its message names what is wrong and says what to do
        print(f"error: {e}", file=sys.stderr)
        return 1
    ratios = fps_ratios(results, args.streams)
    print(
        f"{args.model} {spec.width}x{spec.height}, {spec.steps} step(s) {list(cfg.t_index_list)}, "
        f"{spec.precision.value}, {device_and_threads(args.device, args.threads)} for every backend (torch "
        "and onnxruntime)"
    )
    print(table(results))
    for k, v in ratios.items():
        print(f"FPS ratio {k}: {v:.2f}x")
    failed = [r.backend for r in results if r.psnr_ok is False]
    if failed:
        print(f"FAILED: {', '.join(failed)} below the PSNR floor of {args.psnr_floor} dB vs eager")
    if args.json:
        report = {
            "machine": machine(),
            "command": "python -m benchmarks.fps " + " ".join(argv if argv is not None else sys.argv[1:]),
            "config": {
                "spec": spec.to_json(), "t_index_list": list(cfg.t_index_list), "interval": cfg.bank.interval,
                "device": args.device, "threads": args.threads, "psnr_floor": args.psnr_floor,
                "streams": args.streams,
            },
            "results": [asdict(r) for r in results],
            "ratios": ratios,
            "failed": failed,
        }  # fmt: skip
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=float) + "\n")
        log.info("wrote %s", args.json)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
