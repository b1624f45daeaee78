"""The runner of the GPU check: the steps in order within the budget, each in a child process."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.gpu_check.outputs import condense, crashed_backend, finish, junit_counts, last_error, progress_lines
from benchmarks.gpu_check.plan import CORE, ENGINE_BASES, STEPS, Plan, Step, base, split
from benchmarks.gpu_check.report import best_row, summary_md, targets

ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("benchmarks.gpu_check")


class Check:
    """Runs the steps in order within the budget; records each, and rewrites the report after every step."""

    def __init__(self, args: argparse.Namespace, plan: Plan, scratch: Path) -> None:
        self.args, self.plan, self.scratch = args, plan, scratch
        self.out: Path = args.out
        self.t0 = time.monotonic()
        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.steps = {name: Step(name) for name in STEPS}
        self.log_path = self.out / "gpu_check.log"
        self.env: dict = {}

    # -- budget and subprocesses -------------------------------------------------------------------------------
    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.t0)

    def room(self, step: Step) -> tuple[float, list[str]]:
        """Seconds this step may use: what is left less the needs of the core steps after it still pending."""
        later = [n for n in CORE if STEPS.index(n) > STEPS.index(step.name) and self.steps[n].status == "pending"]
        return self.left() - sum(self.plan.need[n] for n in later), later

    def admit(self, step: Step, need: float | None = None) -> float | None:
        """The step's timeout, or None after recording it as skipped (--skip, or it would not fit)."""
        need = self.plan.need[step.name] if need is None else need
        if step.name in self.args.skip:
            self.skip(step, "--skip")
            return None
        room, later = self.room(step)
        if room < need:
            kept = f", and {', '.join(later)} keep {self.left() - room:.0f} s of it" if later else ""
            self.skip(step, f"needs ~{need:.0f} s; {self.left():.0f} s of the budget left{kept}")
            return None
        return min(self.plan.cap.get(step.name, room), room)

    def skip(self, step: Step, reason: str) -> None:
        step.status, step.reason = "skipped", reason
        log.info("skipped: %s (%s)", step.name, reason)

    def child(self, step: Step, argv: list[str], timeout: float) -> tuple[int | None, str]:
        """Run argv from the project root, its output into the log; (exit code, None if killed at the timeout;
        the output)."""
        shown = " ".join(argv[:3] + ["..."] if argv[1] == "-c" else argv)
        step.commands.append(shown)
        log.info("%s: running %s (timeout %.0f s)", step.name, shown, timeout)
        for h in log.handlers:
            h.flush()
        start = self.log_path.stat().st_size
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        with open(self.log_path, "ab") as sink:
            proc = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                rc = proc.wait(timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: compile workers go with it
                proc.wait()
                rc = None
        with open(self.log_path, "rb") as f:
            f.seek(start)
            return rc, f.read().decode(errors="replace")

    def call(self, func: str, payload: dict) -> list[str]:
        """argv running `func(payload)` of benchmarks.gpu_check.children in a fresh interpreter."""
        code = f"from benchmarks.gpu_check.children import {func}; {func}()"
        return [sys.executable, "-c", code, json.dumps(payload)]

    def run(self, name: str, func) -> None:
        step = self.steps[name]
        if step.status != "pending":
            return
        t = time.monotonic()
        log.info("start: %s (%.0f s of the budget left)", name, self.left())
        try:
            func(step)
        except Exception as e:  # a bug in the check itself: recorded like any failed step
            step.status, step.reason = "failed", f"{type(e).__name__}: {e}"
            log.error("%s: %s", name, traceback.format_exc())
        step.seconds = round(time.monotonic() - t, 1)
        if step.status == "pending":
            step.status = "ok"
        if step.status != "skipped":  # skip() said so
            log.info("%s: %s (%.1f s)%s", step.status, name, step.seconds, f": {step.reason}" if step.reason else "")
        self.write()

    def spec_args(self, sd15: bool = False) -> dict:
        p = self.plan
        model = p.sd15_model if sd15 else p.model
        return {"model": model, "size": p.size, "steps": 4 if sd15 else None, "precision": p.precision}

    # -- steps ----------------------------------------------------------------------------------------------
    def environment(self, step: Step) -> None:
        timeout = self.admit(step)
        if timeout is None:
            return
        smi = shutil.which("nvidia-smi")
        if smi:
            try:
                step.result["nvidia_smi"] = subprocess.run([smi], capture_output=True, text=True, timeout=30).stdout
            except (OSError, subprocess.SubprocessError) as e:
                step.result["nvidia_smi"] = f"{type(e).__name__}: {e}"
        else:
            step.result["nvidia_smi"] = "not found"
        path = self.scratch / "environment.json"
        rc, output = self.child(step, self.call("environment_child", {"json": str(path), **self.spec_args()}), timeout)
        if path.exists():
            self.env = json.loads(path.read_text())
            step.result.update(self.env)
        finish(step, rc, output)

    def pytest(self, step: Step) -> None:
        timeout = self.admit(step)
        if timeout is None:
            return
        xml = self.scratch / "pytest.xml"
        argv = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider"]
        rc, output = self.child(step, [*argv, f"--junitxml={xml}"], timeout)
        step.result = junit_counts(xml) if xml.exists() else {}
        finish(step, 0 if rc == 5 else rc, output)  # 5: no test selected

    def build(self, step: Step, backends: list[str], sd15: bool) -> dict:
        """Build folders for `backends`; returns {base: error} of the ones that failed (their backends drop)."""
        timeout = self.admit(step)
        if timeout is None:
            return {}
        path = self.scratch / f"{step.name}.json"
        payload = {"json": str(path), "backends": backends, "engines": str(self.args.engines), **self.spec_args(sd15)}
        rc, output = self.child(step, self.call("build_child", payload), timeout)
        step.result = json.loads(path.read_text()) if path.exists() else {}
        finish(step, rc, output)
        why = {b: r.get("error") for b, r in step.result.items() if r.get("status") != "ok"}  # per folder
        missing = {base(b) for b in backends if base(b) in ENGINE_BASES} - set(step.result)
        return {**why, **{b: f"{step.status}: {step.reason}" for b in missing}} if step.status != "ok" else {}

    def fps(self, step: Step, backends: list[str], fps_args: list[str], need: float | None = None) -> None:
        """One `benchmarks.fps` run into <out>/<step>.json; a crashed backend is dropped and the run repeated."""
        report = self.out / f"{'fps_' + step.name if step.name == 'soak' else step.name}.json"
        report.unlink(missing_ok=True)
        crashed: dict[str, str] = {}
        while (timeout := self.admit(step, need)) is not None:
            argv = [sys.executable, "-m", "benchmarks.fps", *fps_args, "--backends", ",".join(backends)]
            rc, output = self.child(step, [*argv, "--json", str(report)], timeout)
            if report.exists():
                step.result = condense(json.loads(report.read_text()), report.name)
                break
            culprit = crashed_backend(output)
            if rc is None or culprit in (None, "eager") or len(backends) < 2:
                step.result = {"partial": progress_lines(output)}
                finish(step, rc, output)
                break
            crashed[culprit] = last_error(output)
            backends = [b for b in backends if b != culprit]
            log.warning("%s: %s crashed (%s); running again without it", step.name, culprit, crashed[culprit])
        if crashed:
            step.result["crashed"] = crashed
            step.status, step.reason = "failed", "crashed: " + "; ".join(f"{b}: {e}" for b, e in crashed.items())
        if step.result.get("psnr_failed"):
            step.reason = f"below the PSNR floor: {', '.join(step.result['psnr_failed'])}"

    def run_fps(self, name: str, build: str, backends: list[str], sd15: bool) -> None:
        p = self.plan
        dropped = {}
        self.run(build, lambda s: dropped.update(self.build(s, backends, sd15)))
        keep = [b for b in backends if base(b) not in dropped]
        frames, warmup = (p.sd15_frames, p.sd15_warmup) if sd15 else (p.frames, p.warmup)

        def fps_step(step: Step) -> None:
            skipped = self.steps[build]
            if skipped.status == "skipped" and skipped.reason != "--skip":
                return self.skip(step, f"{build} did not fit, so the build inside the run would not either")
            self.fps(step, keep, self.fps_args(sd15, frames, warmup))
            if dropped:
                step.result["dropped"] = {b: f"not built: {dropped[base(b)]}" for b in backends if b not in keep}

        self.run(name, fps_step)

    def fps_args(self, sd15: bool, frames: int, warmup: int) -> list[str]:
        p = self.plan
        s = self.spec_args(sd15)
        argv = ["--model", s["model"], "--height", str(p.size), "--width", str(p.size), "--device", p.device]
        argv += ["--dtype", p.precision, "--frames", str(frames), "--warmup", str(warmup)]
        argv += ["--engines", str(self.args.engines)] + (["--steps", "4"] if sd15 else [])
        return argv + (["--threads", str(p.threads)] if p.threads else [])

    def soak(self, step: Step) -> None:
        best = best_row(self.steps["fps_main"].result)
        if best is None:
            return self.skip(step, "fps_main has no backend that passed its PSNR floor")
        p = self.plan
        startup = p.need["soak"] * (2 if best["backend"].startswith("compiled") else 1)
        need = startup + (p.soak + p.soak_frames + p.warmup) / best["fps"]
        args = self.fps_args(False, p.soak_frames, p.warmup) + ["--soak", str(p.soak)]
        self.fps(step, [best["backend"]], args, need)

    def profile(self, step: Step) -> None:
        best = best_row(self.steps["fps_main"].result)
        if best is None:
            return self.skip(step, "fps_main has no backend that passed its PSNR floor")
        timeout = self.admit(step)
        if timeout is None:
            return
        p, path = self.plan, self.scratch / "profile.json"
        payload = {
            "json": str(path),
            "backend": base(best["backend"]),
            "device": p.device,
            "threads": p.threads,
            "engines": str(self.args.engines),
            "warmup": p.profile_warmup,
            "frames": p.profile_frames,
            **self.spec_args(),
        }
        rc, output = self.child(step, self.call("profile_child", payload), timeout)
        step.result = json.loads(path.read_text()) if path.exists() else {}
        step.result["best"] = best["backend"]
        finish(step, rc, output)

    def main_backends(self) -> list[str]:
        if self.args.backends:
            return split(self.args.backends)
        extra = ["tensorrt", "tensorrt+graphs"] if self.plan.mode == "gpu" and self.env.get("tensorrt_runs") else []
        return [*self.plan.backends, *extra]

    def run_all(self) -> int:
        self.run("environment", self.environment)
        if self.plan.mode == "gpu" and self.steps["environment"].status == "ok" and not self.env.get("cuda"):
            for step in self.steps.values():
                if step.status == "pending" and step.name != "summary":
                    self.skip(step, "no CUDA GPU here (on a CPU run --dry-run)")
        self.run("pytest", self.pytest)
        main = self.main_backends()
        self.run_fps("fps_main", "build_main", main, sd15=False)
        sd15 = split(self.args.sd15_backends) if self.args.sd15_backends else list(self.plan.sd15_backends or main)
        self.run_fps("fps_sd15", "build_sd15", sd15, sd15=True)
        self.run("soak", self.soak)
        self.run("profile", self.profile)
        self.steps["summary"].status = "ok"
        self.write()
        return self.exit_code()

    # -- report ---------------------------------------------------------------------------------------------
    def exit_code(self) -> int:
        failed = [s for s in self.steps.values() if s.status in ("failed", "timed_out")]
        psnr = [b for s in self.steps.values() for b in s.result.get("psnr_failed", [])]
        return 1 if failed or psnr else 0

    def report(self) -> dict:
        return {
            "mode": self.plan.mode,
            "command": "python -m benchmarks.gpu_check " + " ".join(self.args.argv),
            "started": self.started,
            "seconds": round(time.monotonic() - self.t0, 1),
            "budget_s": self.args.budget_s,
            "engines": str(self.args.engines),
            "plan": {k: v for k, v in asdict(self.plan).items() if k not in ("need", "cap")},
            "exit_code": self.exit_code(),
            "steps": [asdict(s) for s in self.steps.values()],
            "targets": targets(self.steps, self.plan),
        }

    def write(self) -> None:
        report = self.report()
        (self.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (self.out / "summary.md").write_text(summary_md(report))
