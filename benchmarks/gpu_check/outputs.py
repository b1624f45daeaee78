"""What a child process of the check leaves behind, read back: its exit and log lines, pytest's JUnit XML and
the JSON report of `benchmarks.fps`."""

from __future__ import annotations

from pathlib import Path

from benchmarks.gpu_check.plan import Step


def finish(step: Step, rc: int | None, output: str) -> None:
    """Record a child's end: timed out (rc None), failed (rc != 0, with its last error line) or ok."""
    if rc is None:
        step.status, step.reason = "timed_out", "killed at its share of the budget"
    elif rc != 0:
        step.status, step.reason = "failed", f"exit code {rc}: {last_error(output)}"


def last_error(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "Exception" in ln or ln.startswith("FAILED")]
    return (errors or lines or ["no output"])[-1][:300]


def crashed_backend(output: str) -> str | None:
    """The backend `benchmarks.fps` was running when it died: its last "running NAME:" log line."""
    names = [
        ln.split("running ", 1)[1].split(":", 1)[0] for ln in output.splitlines() if "benchmarks.fps: running " in ln
    ]
    return names[-1] if names else None


def progress_lines(output: str) -> list[str]:
    """What a killed `benchmarks.fps` had measured: its per-backend "NAME: X FPS, p50 Y ms" lines."""
    return [
        ln.split("benchmarks.fps: ", 1)[1]
        for ln in output.splitlines()
        if "benchmarks.fps: " in ln and " FPS, p50" in ln
    ]


def junit_counts(xml: Path) -> dict:
    """pytest's JUnit XML: counts, and one line per failure / error (with its exception) and per skip."""
    import xml.etree.ElementTree as ET

    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "skips": []}
    keys = {"failure": "failed", "error": "errors", "skipped": "skipped"}
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = "::".join(n for n in (case.get("classname"), case.get("name")) if n)
        outcome = next((c for c in case if c.tag in keys), None)
        if outcome is None:
            counts["passed"] += 1
            continue
        counts[keys[outcome.tag]] += 1
        message = (outcome.get("message") or "").strip().split("\n")[0][:200]
        if outcome.tag == "skipped":
            counts["skips"].append(f"{name}: {message}")
            continue
        raised = [ln[1:].strip() for ln in (outcome.text or "").splitlines() if ln.startswith("E ")]
        counts["failures"].append(f"{outcome.tag} {name}: {message}" + (f" ({raised[0][:200]})" if raised else ""))
    return counts


def condense(report: dict, name: str) -> dict:
    """The rows of a `benchmarks.fps` JSON report that the summary shows."""
    rows = []
    for r in report["results"]:
        s = r.get("soak") or {}
        rows.append({
            "backend": r["backend"], "fps": r["fps"], "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"],
            "p99_p50": r["p99_ms"] / r["p50_ms"], "peak_mem_mb": r["peak_mem_mb"], "mem_kind": r["mem_kind"],
            "psnr_db": r["psnr_vs_eager_db"], "psnr_min_db": r["psnr_min_db"], "psnr_ok": r["psnr_ok"],
            "soak": {k: s[k] for k in ("frames", "memory_drift_mb", "latency_drift_pct", "p99_ms") if k in s},
        })  # fmt: skip
    c = report["config"]
    spec = c["spec"]
    title = f"{spec['model']} {spec['width']}x{spec['height']}, {spec['steps']} step(s) {c['t_index_list']}"
    title += f", {spec['precision']}, {c['device']}, {report['machine'].get('gpu') or report['machine']['cpu_model']}"
    return {"json": name, "title": title, "rows": rows, "ratios": report["ratios"], "psnr_failed": report["failed"]}
