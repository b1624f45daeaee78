"""LoRAs swapped at runtime: what a swap costs, that it drops no frame, and what swappable weights cost per frame.

    python -m benchmarks.lora_swap --model tiny --height 64 --width 64 --device cpu --backends eager,aoti
    python -m benchmarks.lora_swap --model sd-turbo --device cuda --backends eager,aoti --json lora.json

Three measurements, in one run, on the same frames, precision and threads (`--threads`; default 1 on a CPU):

- swap: a stream runs `--frames` frames and every `--swap-every` frames switches between two LoRA sets (A at 1.0,
  B at 0.7; random rank-`--rank` LoRAs on every Linear of the UNet, written for the model's shapes). Times
  `set_loras` itself and `set_loras` + the next frame, which is the first frame with the new weights (the swap
  happens between two frames: tests/test_lora_swap.py and test_aoti_loras.py prove the next frame runs on them),
  beside the p50 of frames without a swap. Backends: eager, and aoti (a build folder with swappable weights).
- drops: the same stream's backend behind a `StreamServer` (one slot): a client pushes every frame of the clip and
  waits for its answer (as `video` feeds a stream), and with every `--swap-every`-th frame asks for a swap right
  after the push (as a page's LoRA message arrives while its frame waits or runs: the loop runs the swap between
  two ticks). Every pushed frame must come back translated: frames in, frames out, dropped and failed are counted
  (dropped and failed must be 0), with the p50 time of frames pushed with a swap and without.
- fps (aoti in `--backends`): two AOTInductor builds of the same spec, swappable and frozen weights, run
  alternately twice (A B A B, so load from other jobs hits both), `--frames` timed frames each after `--warmup`.

Missing build folders are built first under `--engines`: the device's default weights (swappable on the CPU,
frozen on CUDA) under the spec's folder name, the other under that name + "-swappable" / "-frozen". On a GPU,
times are taken after a device synchronise.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from streamv2v_trt.console import HelpFormatter, configure_logging, device_and_threads
from streamv2v_trt.flags import add_flags
from streamv2v_trt.source import DEFAULT_MODEL, Source
from streamv2v_trt.spec import EngineSpec

from .measure import machine

log = logging.getLogger("benchmarks.lora_swap")

BACKENDS = ("eager", "aoti")
SETS = (("a", 1.0), ("b", 0.7))  # the two LoRA sets a swap alternates between


def write_loras(spec: EngineSpec, folder: Path, rank: int) -> dict[str, Path]:
    """Two random LoRA files for `spec.model`'s UNet: rank-`rank` factors (PEFT keys) on every Linear, small enough
    to leave the images sane. {name: path}."""
    from safetensors.torch import save_file

    from streamv2v_trt.models.loader import find_weights, unet_skeleton

    unet = unet_skeleton(spec, find_weights(spec))
    linears = [(name, m) for name, m in unet.named_modules() if isinstance(m, torch.nn.Linear)]
    paths = {}
    for seed, (name, _) in enumerate(SETS):
        gen, tensors = torch.Generator().manual_seed(seed), {}
        for module, linear in linears:
            out_f, in_f = linear.weight.shape
            tensors[f"unet.{module}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) * 0.05
            tensors[f"unet.{module}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * 0.05
        paths[name] = folder / f"{name}.safetensors"
        save_file(tensors, str(paths[name]))
    log.info("wrote 2 LoRA files of rank %d on %d Linear layers under %s", rank, len(linears), folder)
    return paths


def aoti_folder(args, spec: EngineSpec, weights: str) -> Path:
    """The AOTInductor build of `spec` with `weights`, built when missing (build_engines reuses an intact one)."""
    from build_engines import BuildConfig, build
    from build_engines.aoti import aoti_weights
    from streamv2v_trt.flavours import Builder

    name = spec.folder_name(Builder.AOTI)
    out = args.engines / (name if aoti_weights(args.device, None) == weights else f"{name}-{weights}")
    log.info("AOTInductor build with %s weights: %s", weights, out)
    return build(BuildConfig(spec, out=out, builder=Builder.AOTI, device=torch.device(args.device).type,
                             weights=weights)).out  # fmt: skip


class Clock:
    """Wall time in ms, after the device is done (CUDA: synchronised; the swap's copies are asynchronous)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() * 1e3


def swap_run(stream, clip, loras: dict[str, Path], args) -> dict:
    """Frames with a swap every `swap_every`: the set_loras call, set_loras + the next frame, the other frames."""
    clock = Clock(args.device)
    for frame in clip[: args.warmup]:
        stream(frame)
    calls, firsts, plain = [], [], []
    for i, frame in enumerate(clip[args.warmup : args.warmup + args.frames]):
        t0 = clock.now()
        if i % args.swap_every == 0:
            name, scale = SETS[(i // args.swap_every) % 2]
            stream.set_loras([(loras[name], scale)])
            calls.append(clock.now() - t0)
        stream(frame)
        (firsts if i % args.swap_every == 0 else plain).append(clock.now() - t0)
    return {
        "swaps": len(calls), "frames": args.frames,
        "set_loras_ms_p50": float(np.median(calls)), "set_loras_ms_max": float(np.max(calls)),
        "first_frame_after_ms_p50": float(np.median(firsts)), "first_frame_after_ms_max": float(np.max(firsts)),
        "frame_ms_p50": float(np.median(plain)),
    }  # fmt: skip


def drop_run(source: Source, cfg, clip, loras: dict[str, Path], args) -> dict:
    """A one-slot StreamServer fed every frame of `clip`, each pushed when the last came back (as `video` feeds a
    stream); with every `swap_every`-th frame a swap is asked right after the push (as a page's LoRA message
    arrives while its frame waits or runs). Counts what came back and how long those frames took."""
    from streamv2v_trt.opening import open_multistream
    from streamv2v_trt.serving import StreamServer

    multi = open_multistream(source, cfg, 1, prompt=args.prompt)
    counts = {"frames_in": 0, "frames_out": 0, "dropped": 0, "failed": 0, "swaps": 0}
    answered = threading.Semaphore(0)
    latency_ms = {True: [], False: []}  # frames pushed with a swap, without

    def deliver(result) -> None:
        counts["dropped" if result.dropped else "failed" if result.error is not None else "frames_out"] += 1
        answered.release()

    with StreamServer(multi) as server:
        slot = server.open()
        for frame in clip[: args.warmup]:
            server.push(slot, frame, lambda _result: answered.release())
            answered.acquire()
        for i, frame in enumerate(clip[args.warmup : args.warmup + args.frames]):
            swap = i % args.swap_every == 0
            t0 = time.perf_counter()
            counts["frames_in"] += 1
            server.push(slot, frame, deliver)
            if swap:
                name, scale = SETS[counts["swaps"] % 2]
                server.set_loras([(loras[name], scale)]).result()
                counts["swaps"] += 1
            answered.acquire()
            latency_ms[swap].append((time.perf_counter() - t0) * 1e3)
    counts["with_swap_ms_p50"] = float(np.median(latency_ms[True]))
    counts["without_ms_p50"] = float(np.median(latency_ms[False]))
    return counts


def fps_run(source: Source, cfg, clip, args) -> float:
    from streamv2v_trt.opening import open_stream

    stream = open_stream(source, cfg, prompt=args.prompt)
    for frame in clip[: args.warmup]:
        stream(frame)
    clock = Clock(args.device)
    t0 = clock.now()
    for frame in clip[args.warmup : args.warmup + args.frames]:
        stream(frame)
    return args.frames / ((clock.now() - t0) / 1e3)


def run(args) -> dict:
    from streamv2v_trt import StreamConfig
    from streamv2v_trt.clips import pattern_clip
    from streamv2v_trt.opening import open_stream

    cuda = args.device.startswith("cuda")
    spec = EngineSpec.resolve(args.model, height=args.height, width=args.width, precision="fp16" if cuda else "fp32")
    cfg = StreamConfig(spec)
    clip = pattern_clip(args.warmup + args.frames, spec.height, spec.width)
    lora_dir = Path(tempfile.mkdtemp(prefix="lora_swap-"))
    loras = write_loras(spec, lora_dir, args.rank)
    folders = {}
    if "aoti" in args.backends:
        folders = {w: aoti_folder(args, spec, w) for w in ("swappable", "frozen")}
    sources = {"eager": Source(device=args.device, threads=args.threads)}
    if folders:
        sources["aoti"] = Source(engines=folders["swappable"], backend="aoti", device=args.device, threads=args.threads)
    report = {"swap": {}, "drops": {}, "fps": {}}
    for name in args.backends:
        log.info("%s: a swap every %d frames over %d frames", name, args.swap_every, args.frames)
        stream = open_stream(sources[name], cfg, prompt=args.prompt)
        report["swap"][name] = swap_run(stream, clip, loras, args)
        del stream
        report["drops"][name] = drop_run(sources[name], cfg, clip, loras, args)
    if folders:
        runs = {w: [] for w in folders}
        for _ in range(2):  # A B A B
            for weights, folder in folders.items():
                source = Source(engines=folder, backend="aoti", device=args.device, threads=args.threads)
                runs[weights].append(fps_run(source, cfg, clip, args))
                log.info("aoti %s: %.1f FPS", weights, runs[weights][-1])
        report["fps"] = {f"aoti {w}": {"fps_runs": r, "fps": float(np.mean(r))} for w, r in runs.items()}
        report["fps"]["swappable/frozen"] = report["fps"]["aoti swappable"]["fps"] / report["fps"]["aoti frozen"]["fps"]
        report["folders"] = {w: str(f) for w, f in folders.items()}
    return report


def tables(report: dict) -> str:
    lines = ["| backend | swaps | set_loras ms p50 (max) | set_loras + next frame ms p50 (max) | frame ms p50 |",
             "|---|---|---|---|---|"]  # fmt: skip
    for name, r in report["swap"].items():
        lines.append(
            f"| {name} | {r['swaps']} | {r['set_loras_ms_p50']:.1f} ({r['set_loras_ms_max']:.1f}) | "
            f"{r['first_frame_after_ms_p50']:.1f} ({r['first_frame_after_ms_max']:.1f}) | {r['frame_ms_p50']:.1f} |"
        )
    lines += [
        "",
        "| backend (StreamServer) | swaps | frames in | frames out | dropped | failed | ms p50 with swap / without |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in report["drops"].items():
        lines.append(
            f"| {name} | {r['swaps']} | {r['frames_in']} | {r['frames_out']} | {r['dropped']} | {r['failed']} | "
            f"{r['with_swap_ms_p50']:.1f} / {r['without_ms_p50']:.1f} |"
        )
    if report["fps"]:
        lines += ["", "| AOTInductor weights | FPS (mean of 2 runs) | runs |", "|---|---|---|"]
        for name in ("aoti swappable", "aoti frozen"):
            r = report["fps"][name]
            lines.append(f"| {name} | {r['fps']:.1f} | {', '.join(f'{x:.1f}' for x in r['fps_runs'])} |")
        lines.append(f"\nswappable/frozen FPS: {report['fps']['swappable/frozen']:.2f}x")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lora_swap", description=__doc__,
                                formatter_class=HelpFormatter)  # fmt: skip
    add_flags(p, EngineSpec, ["model"], defaults={"model": DEFAULT_MODEL})
    add_flags(p, EngineSpec, ["height", "width"], unset=["height", "width"])
    add_flags(p, Source, ["device", "threads"], defaults={"device": "auto"})
    p.add_argument("--backends", default="eager,aoti", help=f"comma list of {', '.join(BACKENDS)}")
    p.add_argument("--frames", type=int, default=60, help="timed frames per measurement")
    p.add_argument("--warmup", type=int, default=5, help="untimed frames first")
    p.add_argument("--swap-every", type=int, default=5, help="frames between two swaps (>= 2)")
    p.add_argument("--rank", type=int, default=8, help="rank of the generated LoRAs")
    p.add_argument("--engines", type=Path, default=Path("engines"), help="parent folder of the build folders")
    p.add_argument("--prompt", default="a watercolor painting")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging()
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if unknown := [b for b in args.backends if b not in BACKENDS]:
        parser.error(f"--backends: unknown {', '.join(unknown)}; expected {', '.join(BACKENDS)}")
    if args.frames < args.swap_every or args.swap_every < 2 or args.warmup < 1:
        parser.error("--swap-every must be >= 2 (frames without a swap are the baseline), --frames >= --swap-every, "
                     "--warmup >= 1")  # fmt: skip
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads is None:
        args.threads = torch.get_num_threads() if args.device.startswith("cuda") else 1
    torch.set_num_threads(args.threads)
    report = run(args)
    print(f"{args.model}, {device_and_threads(args.device, args.threads)}, {args.frames} timed frames each")
    print(tables(report))
    failed = [n for n, r in report["drops"].items() if r["frames_out"] != r["frames_in"] or r["swaps"] == 0]
    if failed:
        print(f"FAILED: {', '.join(failed)}: a frame was dropped or failed during swaps (or no swap happened)")
    if args.json:
        command = "python -m benchmarks.lora_swap " + " ".join(argv if argv is not None else sys.argv[1:])
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine(), "command": command, **report}, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
