"""The report of the check: kernel kinds of the profile, the best path, the targets and summary.md."""

from __future__ import annotations

from benchmarks.gpu_check.plan import Plan, Step, base

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


def best_row(result: dict) -> dict | None:
    rows = [r for r in result.get("rows", []) if r["psnr_ok"] is not False]
    return max(rows, key=lambda r: r["fps"], default=None)


def classify(name: str) -> str:
    low = name.lower()
    return next((kind for kind, words in KINDS if any(w in low for w in words)), "other")


def split_by_kind(kernels: list[dict], frames: int) -> dict:
    """{kind: ms per frame} of kernel rows {"name", "us"}."""
    split_ms = dict.fromkeys(KIND_NAMES, 0.0)
    for k in kernels:
        split_ms[classify(k["name"])] += k["us"] / 1e3 / frames
    return split_ms


def targets(steps: dict[str, Step], plan: Plan) -> list[dict]:
    """Each target with its value and whether it was met (None: not measured, the value says why)."""
    main = steps["fps_main"].result
    rows = {r["backend"]: r for r in main.get("rows", [])}
    best, eager, b15 = best_row(main), rows.get("eager"), best_row(steps["fps_sd15"].result)
    soak = (steps["soak"].result.get("rows") or [{}])[0].get("soak") or {}
    aoti = [r for r in rows.values() if base(r["backend"]) == "aoti" and r["psnr_min_db"] is not None]
    worst = min(aoti, key=lambda r: r["psnr_min_db"], default=None)
    ratio = best["fps"] / eager["fps"] if best and eager else None
    long = soak and soak["frames"] >= 3000  # a shorter soak says nothing about the target
    checks = [  # (target, (value, met) or None when not measured, why not)
        ("best path >= 150 FPS", best and (f"{best['backend']}: {best['fps']:.1f} FPS", best["fps"] >= 150),
         "no fps_main backend passed its PSNR floor"),
        ("best path >= 5x eager (same run)", ratio and (f"{ratio:.2f}x", ratio >= 5), "no eager and best in fps_main"),
        ("p99/p50 <= 1.2 (best path)", best and (f"{best['backend']}: {best['p99_p50']:.2f}", best["p99_p50"] <= 1.2),
         "no fps_main result"),
        ("memory drift 0 MB over 3,000+ frames (soak)",  # 0.0 at the 0.1 MB the tables show
         soak and (f"{soak['memory_drift_mb']:+.1f} MB over {soak['frames']} frames" + ("" if long else " (too few)"),
                   round(soak["memory_drift_mb"], 1) == 0.0 if long else None), "no soak result"),
        (f"aoti vs eager PSNR >= 40 dB (min over frames, {plan.precision} vs {plan.precision})",
         worst and (f"{worst['backend']}: {worst['psnr_min_db']:.1f} dB", worst["psnr_min_db"] >= 40),
         "no aoti result"),
        (f"{plan.sd15_model} 4 steps >= 80 FPS", b15 and (f"{b15['backend']}: {b15['fps']:.1f} FPS", b15["fps"] >= 80),
         "no fps_sd15 result"),
    ]  # fmt: skip
    return [
        {"target": t, "value": m[0], "met": None if m[1] is None else bool(m[1])} if m else
        {"target": t, "value": why, "met": None}
        for t, m, why in checks
    ]  # fmt: skip


def summary_md(report: dict) -> str:
    steps = {s["name"]: s for s in report["steps"]}
    env = steps["environment"]["result"]
    took = f"{report['seconds']:.0f} s of a {report['budget_s']:.0f} s budget, exit code {report['exit_code']}"
    lines = [f"# GPU check ({report['mode']})", "", f"`{report['command']}`, started {report['started']}, {took}."]
    if report["mode"] == "dry-run":
        lines += ["", "Dry run: the tiny random-weight model on the CPU; the numbers test the check, not the targets."]
    lines += ["", "## Steps", "", "| step | status | time s | note |", "|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {s['reason']} |" for s in report["steps"]]
    if env.get("torch"):
        trt = env.get("tensorrt_import", {})
        lines += ["", "## Environment", ""] + [f"- {k}: {v}" for k, v in (
            ("python / torch / CUDA", f"{env['python']} / {env['torch']} / {env['cuda_version']}"),
            ("GPU", f"{env.get('gpu', 'none')} (compute capability {env.get('capability', '-')})"),
            ("tensorrt / tensorrt_rtx import", ", ".join(f"{f}: {v}" for f, v in trt.items())),
            ("TensorRT-RTX runs on this GPU", env.get("rtx_runs_on")),
            ("choose_builder (auto)", f"{env.get('builder')} ({env.get('builder_why')})"),
            ("onnxruntime", f"{env.get('onnxruntime')} {env.get('ort_providers')}"), ("triton", env.get("triton")),
        )]  # fmt: skip
    pt = steps["pytest"]["result"]
    if pt:
        lines += [
            "",
            "## pytest -m gpu",
            "",
            f"{pt['passed']} passed, {pt['failed']} failed, {pt['errors']} errors, {pt['skipped']} skipped",
        ] + [f"- {f}" for f in pt["failures"]]
        lines += [f"- skipped {s}" for s in pt["skips"][:10]]
    for name in ("fps_main", "fps_sd15", "soak"):
        r = steps[name]["result"]
        if r.get("rows") or r.get("partial"):
            lines += ["", f"## {name}: {r.get('title', 'killed before the end (partial)')}", ""] + fps_table(r)
    prof = steps["profile"]["result"]
    if prof.get("kinds"):
        head = f"## profile: {prof['backend']} (best path {prof['best']}, not graphed), {prof['frames']} frames"
        lines += [
            "",
            head,
            "",
            f"Frame {prof['frame_ms']:.2f} ms unprofiled, {prof['profiled_frame_ms']:.2f} ms profiled; "
            f"{prof['busy_ms']:.2f} ms per frame in {prof['unit']} ({prof['timeline']}).",
            "",
            "| kind | ms per frame | share |",
            "|---|---|---|",
        ]
        total = sum(prof["kinds"].values()) or 1.0
        lines += [f"| {k} | {v:.3f} | {100 * v / total:.1f}% |" for k, v in prof["kinds"].items()]
        lines += ["", "| kernel | kind | calls | ms per frame |", "|---|---|---|---|"]
        lines += [f"| `{k['name'][:90]}` | {k['kind']} | {k['calls']} | {k['ms_per_frame']:.3f} |" for k in prof["top"]]
    lines += ["", "## Targets", "", "| target | value | met |", "|---|---|---|"]
    met = {True: "yes", False: "NO", None: "not measured"}
    lines += [f"| {t['target']} | {t['value']} | {met[t['met']]} |" for t in report["targets"]]
    return "\n".join(lines) + "\n"


def fps_table(r: dict) -> list[str]:
    if not r.get("rows"):
        return [f"- {line}" for line in r["partial"]] or ["- nothing measured"]
    out = [
        "| backend | FPS | p50 ms | p99 ms | p99/p50 | peak MB | PSNR vs eager dB (min) | soak memory drift MB "
        "| soak p50 drift % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for w in r["rows"]:
        ps = "" if w["psnr_db"] is None else f"{w['psnr_db']:.1f} ({w['psnr_min_db']:.1f})"
        ps += " FAIL" if w["psnr_ok"] is False else ""
        s = w["soak"]
        drift = (
            (f"{s['memory_drift_mb']:+.1f} ({s['frames']} frames)", f"{s['latency_drift_pct']:+.1f}") if s else ("", "")
        )
        out.append(
            f"| {w['backend']} | {w['fps']:.1f} | {w['p50_ms']:.2f} | {w['p99_ms']:.2f} | {w['p99_p50']:.2f} "
            f"| {w['peak_mem_mb']:.0f} | {ps} | {drift[0]} | {drift[1]} |"
        )
    out += [""] + [f"FPS ratio {k}: {v:.2f}x" for k, v in r["ratios"].items()] if r["ratios"] else []
    for b, why in {**r.get("crashed", {}), **r.get("dropped", {})}.items():
        out.append(f"- {b} not measured: {why}")
    return out
