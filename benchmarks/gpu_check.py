"""`python -m benchmarks.gpu_check`: every figure the project measures on this machine's GPU, and the targets.

    python -m benchmarks.gpu_check                 # on the machine with the GPU
    python -m benchmarks.gpu_check --dry-run       # the same steps on the CPU with the tiny model (minutes)

Steps, in order, each a child process: a crash or a CUDA error (which poisons its process's context) fails that
step and the check goes on; every run starts from a clean CUDA context with its own peak memory; a child that
would overrun the budget is killed with its process group (Inductor's compile workers too).
  pytest       `pytest -m gpu`: passed / failed / skipped, each failure's first line, the skip reasons.
  kernels      `python -m benchmarks.kernels`: the DyMe Triton kernels checked against dyme_ref, and timed.
  fps PATH     `python -m benchmarks.fps --backends eager,PATH` for each path: sd-turbo 512x512, 1 step, TAESD,
               DyMe every 4 frames, fp16; eager+graphs, compiled+graphs, aoti+graphs, and tensorrt+graphs where
               TensorRT imports and runs on this GPU; 300 timed frames after 30 warm-up: FPS, p50 / p99, peak
               memory, every frame's PSNR vs eager. Missing build folders are built first, under --engines.
  soak         the best path (highest FPS that passed its PSNR floor) again, then 3,000 more frames: memory and
               latency drift (`benchmarks.fps --soak`).
  profile      `benchmarks.fps --profile` of the best path's base, not graphed so every kernel shows: time per
               frame as conv / GEMM / attention / DyMe / copies / other over one bank interval, the top kernels.
  sd15         the SD1.5 architecture at 4 steps, eager and the best path, if the budget still allows.
  lora         `python -m benchmarks.lora_swap`: the time of `set_loras` and of the first frame after it, frames
               dropped while swapping (must be 0), and AOTInductor swappable vs frozen weights FPS (two builds of
               the plan's spec; the frozen one is the aoti path's, the default on CUDA). The dry run measures eager
               only: no further AOTInductor compile on a CPU.
  controlnet   `python -m benchmarks.controlnet`: eager, the plan's model with its family's canny ControlNet preset
               (sd-turbo-canny; the dry run: tiny), streams without ControlNet and with kinds canny and previous in
               lockstep on a panned and zoomed photo clip: the per-frame cost of ControlNet and the warp error of
               the output beside no ControlNet, at the same strength.

Budget (--budget-s): a step starts only if the time left, less what the later paths, soak and profile need,
covers what it needs; otherwise it is recorded as skipped with the reason. A started step may use that room.
Builds stay under --engines, so a second run reuses them (and Inductor's cache) and gets further.

Under --out: gpu_check.json (every step's status, seconds, reason, command and result; the targets, met or
not), summary.md (the same as tables, printed at the end), gpu_check.log (each step's child output),
pytest.xml, and each benchmarks.fps report (fps_<path>.json, fps_soak.json, fps_profile.json, fps_sd15.json).
The JSON and the summary are rewritten after every step: an interrupted check keeps what it measured. The exit
code is 1 if a step failed or timed out (a path below its PSNR floor fails its step); targets not met do not
change it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.gpu_report import best_path, condense, junit_counts, path_rows, summary_md, targets

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmarks.gpu_check")
SKIPPABLE = ("pytest", "kernels", "soak", "profile", "sd15", "lora", "controlnet")
RESERVED = ("path", "soak", "profile")  # what later steps of these kinds need is kept back from earlier steps


@dataclass(frozen=True)
class Plan:
    """What one mode measures: the GPU check, or its dry run on the CPU (tiny model, few frames)."""

    mode: str  # "gpu" or "dry-run"
    model: str
    size: int
    device: str
    precision: str
    threads: int | None  # None: benchmarks.fps's default (every core beside a GPU)
    paths: tuple[str, ...]  # benchmarks.fps backends, each run beside eager in its own process
    frames: int
    warmup: int  # enough for torch.compile and one CUDA graph per frame plan (prime, none, store, merge)
    soak: int
    profile_frames: int
    sd15_model: str
    sd15_frames: int
    sd15_best: bool  # sd15 runs the best path beside eager (False: eager only)
    lora_backends: tuple[str, ...]  # benchmarks.lora_swap --backends
    controlnet: str  # benchmarks.controlnet --controlnet: a preset of the plan model's family
    need: dict = field(default_factory=dict)  # step kind -> seconds it needs to be worth starting
    cap: dict = field(default_factory=dict)  # step kind -> most seconds it may take


GPU = Plan(
    "gpu", "sd-turbo", 512, "cuda", "fp16", None, ("eager+graphs", "compiled+graphs", "aoti+graphs", "tensorrt+graphs"),
    frames=300, warmup=30, soak=3000, profile_frames=8, sd15_model="sd15", sd15_frames=100, sd15_best=True,
    lora_backends=("eager", "aoti"), controlnet="sd-turbo-canny",
    need={"pytest": 60, "kernels": 30, "path": 90, "soak": 60, "profile": 60, "sd15": 180, "lora": 300,
          "controlnet": 120},
    cap={"pytest": 600, "kernels": 300},
)  # fmt: skip
DRY = Plan(
    "dry-run", "tiny", 64, "cpu", "fp32", 1, ("onnxruntime", "aoti"),
    frames=6, warmup=2, soak=20, profile_frames=4, sd15_model="tiny", sd15_frames=6, sd15_best=False,
    lora_backends=("eager",), controlnet="tiny",
    need={"pytest": 10, "kernels": 5, "path": 15, "soak": 10, "profile": 10, "sd15": 10, "lora": 10,
          "controlnet": 10},
    cap={"pytest": 300},
)  # fmt: skip


@dataclass
class Step:
    name: str
    kind: str  # pytest, kernels, path, soak, profile, sd15: the Check method that runs it
    status: str = "pending"  # ok, failed, timed_out, skipped
    seconds: float = 0.0
    reason: str = ""
    command: str = ""
    result: dict = field(default_factory=dict)


def base(path: str) -> str:
    """The backend without its modifiers: "aoti+graphs" -> "aoti"."""
    return path.partition("+")[0]


def last_error(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "Exception" in ln or ln.startswith(("FAILED", "error:"))]
    return (errors or lines or ["no output"])[-1][:300]


def tensorrt_here(machine: dict) -> tuple[bool, str]:
    """(whether benchmarks.fps's tensorrt backend can run here, which flavour imports or why not)."""
    from streamv2v_trt.backends.tensorrt_import import TensorRTUnavailable, import_tensorrt, rtx_refusal, rtx_runs_on

    try:
        module, flavour = import_tensorrt()
    except TensorRTUnavailable as e:
        return False, str(e)
    if flavour == "tensorrt-rtx" and machine.get("capability"):
        cap = tuple(int(x) for x in machine["capability"].split("."))
        if not rtx_runs_on(cap):
            return False, rtx_refusal(cap, machine["gpu"])
    return True, f"{flavour} {getattr(module, '__version__', '')} imports"


class Check:
    """Runs the steps in order within the budget, each in a child process; rewrites the report after each."""

    def __init__(self, args: argparse.Namespace, plan: Plan) -> None:
        self.args, self.plan, self.out = args, plan, args.out
        self.t0 = time.monotonic()
        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        names = [("pytest", "pytest"), ("kernels", "kernels")] + [(f"fps {p}", "path") for p in args.paths]
        later = [(k, k) for k in ("soak", "profile", "sd15", "lora", "controlnet")]
        self.steps = [Step(n, k) for n, k in names + later]
        self.machine: dict = {}  # from the first benchmarks.fps report

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.t0)

    def skip(self, step: Step, reason: str) -> None:
        step.status, step.reason = "skipped", reason

    def timeout(self, step: Step, need: float | None = None) -> float | None:
        """The step's timeout, or None after recording it as skipped (--skip, or it would not fit)."""
        need = self.plan.need[step.kind] if need is None else need
        if step.kind in self.args.skip:
            return self.skip(step, "--skip")
        later = [s for s in self.steps[self.steps.index(step) + 1 :] if s.kind in RESERVED and s.status == "pending"]
        kept = sum(self.plan.need[s.kind] for s in later)
        if self.left() - kept < need:
            why = f"needs ~{need:.0f} s; {self.left():.0f} s of the budget left"
            return self.skip(step, why + (f", {len(later)} later step(s) keep {kept:.0f} s of it" if later else ""))
        return min(self.plan.cap.get(step.kind, self.left() - kept), self.left() - kept)

    def child(self, step: Step, argv: list[str], timeout: float, ok: tuple[int, ...] = (0,)) -> str:
        """Run argv from the project root, its output into the log; record a timeout or an exit code not in `ok`
        on the step. Returns the output."""
        step.command = " ".join(["python", *argv[1:]])
        log.info("%s: %s (timeout %.0f s)", step.name, step.command, timeout)
        log_path = self.out / "gpu_check.log"
        start = log_path.stat().st_size
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        with open(log_path, "ab") as sink:
            proc = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                rc = proc.wait(timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: compile workers go with it
                proc.wait()
                rc = None
        with open(log_path, "rb") as f:
            f.seek(start)
            output = f.read().decode(errors="replace")
        if rc is None:
            step.status, step.reason = "timed_out", f"killed after {timeout:.0f} s, its share of the budget"
        elif rc not in ok:
            step.status, step.reason = "failed", f"exit code {rc}: {last_error(output)}"
        return output

    def fps(self, step: Step, backends: list[str], name: str, need: float | None = None, **options) -> None:
        """One benchmarks.fps run of the plan's setting (`options` override or add flags: frames=6, profile=True)
        into <out>/<name>; its figures become the step's result."""
        timeout = self.timeout(step, need)
        if timeout is None:
            return
        p, report = self.plan, self.out / name
        options = {
            "model": p.model, "height": p.size, "width": p.size, "device": p.device, "dtype": p.precision,
            "threads": p.threads, "engines": self.args.engines, "frames": p.frames, "warmup": p.warmup, **options,
            "backends": ",".join(dict.fromkeys(backends)), "json": report,
        }  # fmt: skip
        argv = [sys.executable, "-m", "benchmarks.fps"]
        for k, v in options.items():
            flag = "--" + k.replace("_", "-")
            argv += [] if v is None or v is False else [flag] if v is True else [flag, str(v)]
        report.unlink(missing_ok=True)
        self.child(step, argv, timeout)
        if report.exists():
            data = json.loads(report.read_text())
            self.machine = self.machine or data["machine"]
            step.result = condense(data) | {"json": name}
            if data["failed"]:  # benchmarks.fps exited 1 for it
                floor = data["config"]["psnr_floor"]
                step.reason = f"below the PSNR floor of {floor} dB vs eager: {', '.join(data['failed'])}"

    def best(self, step: Step) -> dict | None:
        """The best path's row, or None after recording the step as skipped."""
        report = self.report()
        if (best := best_path(report)) is None:
            self.skip(step, "no path passed its PSNR floor" if path_rows(report) else "no path was measured")
        return best and best[0]

    # -- steps, by kind ----------------------------------------------------------------------------------------
    def pytest(self, step: Step) -> None:
        if (timeout := self.timeout(step)) is None:
            return
        xml = self.out / "pytest.xml"
        xml.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider"]
        self.child(step, [*argv, f"--junitxml={xml}"], timeout, ok=(0, 5))  # 5: no test collected
        step.result = junit_counts(xml) if xml.exists() else {}

    def kernels(self, step: Step) -> None:
        if (timeout := self.timeout(step)) is not None:
            output = self.child(step, [sys.executable, "-m", "benchmarks.kernels"], timeout)
            step.result = {"output": [ln for ln in output.splitlines() if ln.strip()][-60:]}

    def path(self, step: Step) -> None:
        path = step.name.removeprefix("fps ")
        if base(path) == "tensorrt" and not (why := tensorrt_here(self.machine))[0]:
            return self.skip(step, why[1])
        self.fps(step, ["eager", path], f"fps_{path.replace('+', '_')}.json")

    def soak(self, step: Step) -> None:
        if best := self.best(step):
            p = self.plan
            need = p.need["soak"] + (p.soak + p.frames + p.warmup) / best["fps"]
            self.fps(step, [best["backend"]], "fps_soak.json", need, soak=p.soak)

    def profile(self, step: Step) -> None:
        if best := self.best(step):
            self.fps(step, [base(best["backend"])], "fps_profile.json", frames=self.plan.profile_frames, profile=True)

    def sd15(self, step: Step) -> None:
        p = self.plan
        best = self.best(step) if p.sd15_best else {"backend": "eager"}
        if best:
            self.fps(
                step, ["eager", best["backend"]], "fps_sd15.json", model=p.sd15_model, steps=4, frames=p.sd15_frames
            )

    def lora(self, step: Step) -> None:
        if (timeout := self.timeout(step)) is None:
            return
        p, report = self.plan, self.out / "lora_swap.json"
        argv = [sys.executable, "-m", "benchmarks.lora_swap", "--model", p.model, "--height", str(p.size), "--width",
                str(p.size), "--device", p.device, "--backends", ",".join(p.lora_backends), "--frames", str(p.frames),
                "--swap-every", "2" if p.frames < 10 else "5", "--warmup", str(p.warmup), "--engines",
                str(self.args.engines), "--json", str(report)]  # fmt: skip
        argv += ["--threads", str(p.threads)] if p.threads else []
        report.unlink(missing_ok=True)
        self.child(step, argv, timeout)
        if report.exists():
            from benchmarks.lora_swap import tables

            data = json.loads(report.read_text())
            step.result = {k: data[k] for k in ("swap", "drops", "fps")} | {"table": tables(data), "json": report.name}

    def controlnet(self, step: Step) -> None:
        if (timeout := self.timeout(step)) is None:
            return
        p, report = self.plan, self.out / "controlnet.json"
        argv = [sys.executable, "-m", "benchmarks.controlnet", "--model", p.model, "--height", str(p.size), "--width",
                str(p.size), "--device", p.device, "--controlnet", p.controlnet, "--kinds", "canny,previous",
                "--frames", str(p.frames), "--warmup", str(p.warmup), "--json", str(report)]  # fmt: skip
        argv += ["--threads", str(p.threads)] if p.threads else []
        report.unlink(missing_ok=True)
        self.child(step, argv, timeout)
        if report.exists():
            from benchmarks.controlnet import table

            data = json.loads(report.read_text())
            step.result = {"controls": data["rows"], "table": table(data), "json": report.name}  # not fps "rows"

    # -- running and the report ----------------------------------------------------------------------------
    def run_all(self) -> int:
        for step in self.steps:
            t = time.monotonic()
            log.info("start: %s (%.0f s of the budget left)", step.name, self.left())
            try:
                getattr(self, step.kind)(step)
            except Exception as e:  # a bug in the check itself: recorded like any failed step
                step.status, step.reason = "failed", f"{type(e).__name__}: {e}"
                log.error("%s: %s", step.name, traceback.format_exc())
            step.seconds = round(time.monotonic() - t, 1)
            step.status = "ok" if step.status == "pending" else step.status
            log.info("%s: %s (%.1f s)%s", step.status, step.name, step.seconds, f": {step.reason}" * bool(step.reason))
            self.write()
        return self.exit_code()

    def exit_code(self) -> int:
        return int(any(s.status in ("failed", "timed_out") for s in self.steps))

    def report(self) -> dict:
        report = {
            "mode": self.plan.mode,
            "command": "python -m benchmarks.gpu_check " + " ".join(self.args.argv),
            "started": self.started,
            "seconds": round(time.monotonic() - self.t0, 1),
            "budget_s": self.args.budget_s,
            "out": str(self.out),
            "engines": str(self.args.engines),
            "plan": {k: v for k, v in asdict(self.plan).items() if k not in ("need", "cap")},
            "machine": self.machine,
            "tensorrt": tensorrt_here(self.machine)[1],
            "exit_code": self.exit_code(),
            "steps": [asdict(s) for s in self.steps],
        }
        return report | {"targets": targets(report)}

    def write(self) -> None:
        report = self.report()
        (self.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (self.out / "summary.md").write_text(summary_md(report))


def split(text: str) -> list[str]:
    return [b.strip() for b in text.split(",") if b.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="the same steps on the CPU: tiny model 64x64, fp32, paths onnxruntime and aoti, 6 timed frames after "
        "2 warm-up, soak 20, sd15 as tiny at 4 steps with eager only (pytest -m gpu skips everything there)",
    )
    p.add_argument(
        "--out", type=Path, default=Path("artifacts/gpu_check"), help="results folder (default: %(default)s)"
    )
    p.add_argument(
        "--engines",
        type=Path,
        default=Path("engines"),
        help="parent of the build folders, found by the spec's folder name and reused (default: %(default)s, as "
        "benchmarks.fps)",
    )
    p.add_argument("--budget-s", type=float, default=1800.0, help="wall-clock budget of the check (default 1800)")
    p.add_argument("--paths", default=None, help="comma list of benchmarks.fps backends instead of the mode's")
    p.add_argument("--skip", default="", help=f"comma list of steps to record as skipped: {', '.join(SKIPPABLE)}")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    args.skip = split(args.skip)
    if unknown := [s for s in args.skip if s not in SKIPPABLE]:
        parser.error(f"--skip: unknown step(s) {', '.join(unknown)}; steps are {', '.join(SKIPPABLE)}")
    plan = DRY if args.dry_run else GPU
    args.paths = split(args.paths) if args.paths else list(plan.paths)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA GPU here: run the check on the machine with the GPU, or --dry-run on a CPU")
    args.out, args.engines = args.out.resolve(), args.engines.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.log").write_text("")
    handlers = [logging.StreamHandler(sys.stderr), logging.FileHandler(args.out / "gpu_check.log")]
    for h in handlers:
        h.setFormatter(logging.Formatter("[gpu_check %(asctime)s] %(message)s", "%H:%M:%S"))
        log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        log.info("mode %s, budget %.0f s, out %s, engines %s", plan.mode, args.budget_s, args.out, args.engines)
        check = Check(args, plan)
        code = check.run_all()
        print((args.out / "summary.md").read_text())
        log.info("done in %.0f s, exit code %d: %s", time.monotonic() - check.t0, code, args.out)
        return code
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()


if __name__ == "__main__":
    raise SystemExit(main())
