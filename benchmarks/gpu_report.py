"""The GPU check's report: what its children left (benchmarks.fps JSON, pytest's JUnit XML), the targets, summary.md.

A report is the dict `benchmarks.gpu_check` writes to gpu_check.json: mode, command, budget, machine, and its
steps in order, each {"name", "status" (ok, failed, timed_out, skipped), "seconds", "reason", "command",
"result"}. An fps step's result is `condense`d from its benchmarks.fps JSON; the paths are the steps named
"fps <path>", each run beside eager in its own process.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

MET = {True: "yes", False: "NO", None: "not measured"}


def condense(report: dict) -> dict:
    """The parts of a benchmarks.fps JSON report that the summary and the targets read."""
    keep = ("backend", "fps", "p50_ms", "p99_ms", "peak_mem_mb", "psnr_vs_eager_db", "psnr_min_db", "psnr_ok")
    rows = []
    for r in report["results"]:
        row = {k: r[k] for k in keep} | {"p99_p50": r["p99_ms"] / r["p50_ms"]}
        s = r.get("soak") or {}
        row["soak"] = {k: s[k] for k in ("frames", "memory_drift_mb", "latency_drift_pct", "p99_ms") if k in s}
        row["profile"] = r.get("profile") or {}
        rows.append(row)
    c, spec = report["config"], report["config"]["spec"]
    title = f"{spec['model']} {spec['width']}x{spec['height']}, {spec['steps']} step(s) {c['t_index_list']}"
    title += f", {spec['precision']}, {c['device']}, {c['threads']} CPU thread(s)"
    return {"title": title, "rows": rows, "ratios": report["ratios"], "psnr_failed": report["failed"]}


def junit_counts(xml: Path) -> dict:
    """pytest's JUnit XML: counts, and one line per failure / error (with its exception) and per skip."""
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


def path_rows(report: dict) -> list[tuple[dict, dict | None]]:
    """(path row, eager row of the same run) of every path that was measured, in the order they ran."""
    out = []
    for s in report["steps"]:
        rows = {r["backend"]: r for r in s["result"].get("rows", [])}
        path = s["name"].removeprefix("fps ")
        if s["name"].startswith("fps ") and path in rows:
            out.append((rows[path], rows.get("eager")))
    return out


def best_path(report: dict) -> tuple[dict, dict | None] | None:
    """(row, eager row of its run) of the fastest path whose every frame passed the PSNR floor."""
    passed = [(row, eager) for row, eager in path_rows(report) if row["psnr_ok"] is not False]
    return max(passed, key=lambda p: p[0]["fps"], default=None)


def targets(report: dict) -> list[dict]:
    """Each target with its value and whether it was met (None: not measured, the value says why)."""
    steps = {s["name"]: s for s in report["steps"]}
    plan = report["plan"]
    best = best_path(report)
    row, eager = best or (None, None)
    aoti = [r for r, _ in path_rows(report) if r["backend"].partition("+")[0] == "aoti" and r["psnr_min_db"]]
    worst = min(aoti, key=lambda r: r["psnr_min_db"], default=None)
    soak = next(iter(steps.get("soak", {}).get("result", {}).get("rows", [])), {}).get("soak")
    long = bool(soak) and soak["frames"] >= 3000  # a shorter soak says nothing about the target
    sd15 = [r for r in steps.get("sd15", {}).get("result", {}).get("rows", []) if r["psnr_ok"] is not False]
    sd15 = max(sd15, key=lambda r: r["fps"], default=None)
    ratio = row["fps"] / eager["fps"] if row and eager else None
    main = f"{plan['model']} {plan['size']}x{plan['size']} 1 step"
    checks = [  # (target, (value, met) or None when not measured, why not)
        (f"{main}: best path >= 300 FPS (the goal)", row and (f"{row['backend']}: {row['fps']:.1f} FPS",
                                                              row["fps"] >= 300), "no path passed its PSNR floor"),
        (f"{main}: best path >= 150 FPS", row and (f"{row['backend']}: {row['fps']:.1f} FPS", row["fps"] >= 150),
         "no path passed its PSNR floor"),
        ("best path >= 5x eager (same run)", ratio and (f"{ratio:.2f}x", ratio >= 5), "no best path beside eager"),
        ("p99/p50 <= 1.2 (best path)", row and (f"{row['backend']}: {row['p99_p50']:.2f}", row["p99_p50"] <= 1.2),
         "no path passed its PSNR floor"),
        ("memory drift 0 MB over 3,000+ frames (soak)",  # 0.0 at the 0.1 MB the tables show
         soak and (f"{soak['memory_drift_mb']:+.1f} MB over {soak['frames']} frames" + ("" if long else " (too few)"),
                   round(soak["memory_drift_mb"], 1) == 0.0 if long else None), "no soak result"),
        (f"aoti vs eager PSNR >= 40 dB (min over frames, {plan['precision']})",
         worst and (f"{worst['backend']}: {worst['psnr_min_db']:.1f} dB", worst["psnr_min_db"] >= 40),
         "no aoti path measured"),
        (f"{plan['sd15_model']} 4 steps >= 80 FPS", sd15 and (f"{sd15['backend']}: {sd15['fps']:.1f} FPS",
                                                              sd15["fps"] >= 80), "no sd15 result"),
    ]  # fmt: skip
    return [
        {"target": t, "value": m[0], "met": None if m[1] is None else bool(m[1])} if m else
        {"target": t, "value": why, "met": None}
        for t, m, why in checks
    ]  # fmt: skip


def summary_md(report: dict) -> str:
    steps = {s["name"]: s for s in report["steps"]}
    took = f"{report['seconds']:.0f} s of a {report['budget_s']:.0f} s budget, exit code {report['exit_code']}"
    lines = [f"# GPU check ({report['mode']})", "", f"`{report['command']}`, started {report['started']}, {took}."]
    if report["mode"] == "dry-run":
        lines += ["", "Dry run: the tiny random-weight model on the CPU; the numbers test the check, not the targets."]
    m = report["machine"]
    if m:
        gpu = f"{m['gpu']} (compute capability {m['capability']}, CUDA {m['cuda']})" if m.get("gpu") else "none"
        lines += ["", f"GPU: {gpu}; CPU: {m['cpu_model']}, {m['logical_cpus']} logical; torch {m['torch']}, "
                  f"onnxruntime {m['onnxruntime']}; TensorRT: {report['tensorrt']}."]  # fmt: skip
    lines += ["", "## Steps", "", "| step | status | s | note |", "|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {s['reason']} |" for s in report["steps"]]
    paths = [s for s in report["steps"] if s["name"].startswith("fps ")]
    measured = path_rows(report)
    if paths:
        title = next((s["result"]["title"] for s in paths if s["result"]), "nothing measured")
        lines += ["", f"## Paths: {title}", "", "Each path ran in its own process beside eager (the PSNR reference);"]
        lines += ["x eager is against that run's eager; the eager row is the first run's.", ""]
        first_eager = measured[0][1] if measured else None
        lines += fps_table(([(first_eager, None)] if first_eager else []) + measured)
        done = {row["backend"] for row, _ in measured}
        lines += [f"- {s['name'][4:]}: {s['status']}, {s['reason']}" for s in paths if s["name"][4:] not in done]
    if steps.get("sd15", {}).get("result", {}).get("rows"):
        r = steps["sd15"]["result"]
        eager = next((w for w in r["rows"] if w["backend"] == "eager"), None)
        lines += ["", f"## sd15: {r['title']}", ""] + fps_table([(w, eager) for w in r["rows"]])
    soak = steps.get("soak", {}).get("result", {}).get("rows")
    if soak and soak[0]["soak"]:
        s = soak[0]["soak"]
        lines += ["", f"## Soak: {soak[0]['backend']}, {s['frames']} frames", ""]
        lines += [f"Memory drift {s['memory_drift_mb']:+.1f} MB, p50 latency drift {s['latency_drift_pct']:+.1f} %, "
                  f"p99 {s['p99_ms']:.2f} ms."]  # fmt: skip
    prof = steps.get("profile", {}).get("result", {}).get("rows")
    if prof and prof[0]["profile"]:
        lines += ["", f"## Profile: {prof[0]['backend']} (not graphed)", ""] + profile_table(prof[0]["profile"])
    lora = steps.get("lora", {}).get("result", {}).get("table")
    if lora:
        lines += ["", "## LoRA swaps (benchmarks.lora_swap)", "", lora]
    controlnet = steps.get("controlnet", {}).get("result", {}).get("table")
    if controlnet:
        lines += ["", "## ControlNet: cost and warp error (benchmarks.controlnet)", "", "```", controlnet, "```"]
    kernels = steps.get("kernels", {}).get("result", {}).get("output")
    if kernels:
        lines += ["", "## DyMe kernels (benchmarks.kernels)", "", "```", *kernels, "```"]
    pt = steps.get("pytest", {}).get("result")
    if pt:
        lines += ["", "## pytest -m gpu", ""]
        lines += [f"{pt['passed']} passed, {pt['failed']} failed, {pt['errors']} errors, {pt['skipped']} skipped"]
        lines += [f"- {f}" for f in pt["failures"]] + [f"- skipped {s}" for s in pt["skips"][:10]]
    lines += ["", "## Targets", "", "| target | value | met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['value']} | {MET[t['met']]} |" for t in report["targets"]]
    return "\n".join(lines) + "\n"


def fps_table(rows: list[tuple[dict, dict | None]]) -> list[str]:
    """(row, eager row of its run) -> a markdown table."""
    out = [
        "| path | FPS | p50 ms | p99 ms | p99/p50 | peak MB | x eager | PSNR vs eager dB (min) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for w, eager in rows:
        ps = "" if w["psnr_vs_eager_db"] is None else f"{w['psnr_vs_eager_db']:.1f} ({w['psnr_min_db']:.1f})"
        ps += " FAIL" if w["psnr_ok"] is False else ""
        x = f"{w['fps'] / eager['fps']:.2f}x" if eager and w is not eager else ""
        out.append(
            f"| {w['backend']} | {w['fps']:.1f} | {w['p50_ms']:.2f} | {w['p99_ms']:.2f} | {w['p99_p50']:.2f} "
            f"| {w['peak_mem_mb']:.0f} | {x} | {ps} |"
        )
    return out


def profile_table(p: dict) -> list[str]:
    out = [
        f"Frame {p['frame_ms']:.2f} ms unprofiled, {p['profiled_frame_ms']:.2f} ms profiled; {p['busy_ms']:.2f} ms "
        f"per frame in {p['unit']}, over {p['frames']} frames (one bank interval).",
        "",
        "| kind | ms per frame | share |",
        "|---|---|---|",
    ]
    total = sum(p["kinds"].values()) or 1.0
    out += [f"| {k} | {v:.3f} | {100 * v / total:.1f}% |" for k, v in p["kinds"].items()]
    out += ["", "| kernel | kind | calls | ms per frame |", "|---|---|---|---|"]
    return out + [f"| `{k['name'][:90]}` | {k['kind']} | {k['calls']} | {k['ms_per_frame']:.3f} |" for k in p["top"]]
