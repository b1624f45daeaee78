"""`python -m benchmarks.gpu_check --dry-run` end to end (every step a real child process: pytest -m gpu,
benchmarks.kernels, benchmarks.fps per path, soak, profile, sd15), the targets, the budget, a failed or hung child,
and the profile's kernel kinds (`benchmarks.fps --profile`, benchmarks/frame_profile.py).

One dry run per session (about two minutes on a 2-core CPU), on the session's shared tiny build folders, which the
fps children find by `spec.folder_name` under `--engines` and reuse instead of building again.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_spec

from benchmarks import gpu_check, gpu_report
from benchmarks.frame_profile import KIND_NAMES, classify, op_times, profile_frames, split_by_kind

ROOT = Path(__file__).resolve().parents[1]
STATUSES = {"ok", "failed", "timed_out", "skipped"}


@pytest.fixture(scope="module")
def dry_run(tiny_build, tmp_path_factory):
    """(out folder, report, completed process, paths asked). eager+graphs is asked for too: on the CPU it fails."""
    root = tiny_build(tiny_spec()).parent
    paths = ["onnxruntime", "aoti", "eager+graphs"]
    try:  # an AOTInductor build that fails here would fail the aoti path too; the rest is still tested
        tiny_build(tiny_spec(), builder="aoti")
    except Exception:
        paths.remove("aoti")
    out = tmp_path_factory.mktemp("gpu_check")
    argv = ["--dry-run", "--out", str(out), "--engines", str(root), "--paths", ",".join(paths)]
    t = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", *argv], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    print(f"gpu_check --dry-run: {time.monotonic() - t:.0f} s")  # shown with -s: the time this test adds
    return out, json.loads((out / "gpu_check.json").read_text()), proc, paths


def steps_of(report: dict) -> dict:
    return {s["name"]: s for s in report["steps"]}


@pytest.mark.slow
def test_dry_run_measures_every_path_beside_eager(dry_run):
    out, report, proc, paths = dry_run
    steps = steps_of(report)
    assert list(steps) == [
        "pytest",
        "kernels",
        *(f"fps {p}" for p in paths),
        "soak",
        "profile",
        "sd15",
        "lora",
        "controlnet",
    ]
    assert all(s["status"] in STATUSES and (s["status"] == "ok" or s["reason"]) for s in steps.values())
    assert report["mode"] == "dry-run" and report["exit_code"] == proc.returncode
    assert report["machine"]["cpu_model"] and "gpu" not in report["machine"]
    measured = [p for p in paths if p != "eager+graphs"]
    for path in measured:
        step = steps[f"fps {path}"]
        rows = {r["backend"]: r for r in step["result"]["rows"]}
        assert step["status"] == "ok" and list(rows) == ["eager", path], step
        assert step["command"].startswith("python -m benchmarks.fps --model tiny --height 64 --width 64 --device cpu")
        assert all(r["fps"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"] and r["peak_mem_mb"] > 0 for r in rows.values())
        assert rows[path]["psnr_ok"] is True and rows["eager"]["psnr_ok"] is None
        assert step["result"]["ratios"][f"{path}/eager"] == pytest.approx(rows[path]["fps"] / rows["eager"]["fps"])
        assert json.loads((out / step["result"]["json"]).read_text())["results"][1]["backend"] == path
    kept = {"gpu_check.json", "gpu_check.log", "summary.md", "pytest.xml", "fps_soak.json", "fps_profile.json"}
    kept |= {"fps_sd15.json", "lora_swap.json", "controlnet.json"}
    assert {p.name for p in out.iterdir()} == kept | {f"fps_{p}.json" for p in measured}
    # pytest -m gpu ran: on a CPU every gpu test skips, with its reason.
    pt = steps["pytest"]["result"]
    assert steps["pytest"]["status"] == "ok" and pt["passed"] == 0 and pt["skipped"] == len(pt["skips"]) > 0
    assert steps["kernels"]["status"] == "ok" and "no CUDA device here" in steps["kernels"]["result"]["output"][-1]
    log = (out / "gpu_check.log").read_text()
    assert all(f"start: {name} " in log for name in steps) and "benchmarks.fps: running onnxruntime" in log


@pytest.mark.slow
def test_a_failed_path_is_reported_and_the_later_steps_run(dry_run):
    out, report, proc, _ = dry_run
    steps = steps_of(report)
    failed = steps["fps eager+graphs"]
    assert failed["status"] == "failed" and "CUDA graphs need a CUDA GPU, the streams run on cpu" in failed["reason"]
    assert proc.returncode == 1  # a failed step fails the check; targets not met would not
    assert "- eager+graphs: failed, exit code 1: ValueError: CUDA graphs need" in (out / "summary.md").read_text()
    best = gpu_report.best_path(report)[0]["backend"]
    soak, profile, sd15 = steps["soak"], steps["profile"], steps["sd15"]
    assert soak["status"] == profile["status"] == sd15["status"] == "ok"
    (row,) = soak["result"]["rows"]
    assert row["backend"] == best and row["soak"]["frames"] == 20 and "memory_drift_mb" in row["soak"]
    (prof,) = profile["result"]["rows"]
    assert prof["backend"] == gpu_check.base(best) and "--profile" in profile["command"]
    p = prof["profile"]
    assert p["frames"] == 4 and list(p["kinds"]) == list(KIND_NAMES) and 0 < len(p["top"]) <= 25  # one interval
    assert sum(p["kinds"].values()) == pytest.approx(p["busy_ms"]) and p["busy_ms"] > 0
    assert [r["backend"] for r in sd15["result"]["rows"]] == ["eager"] and "4 step(s)" in sd15["result"]["title"]


@pytest.mark.slow
def test_summary_has_every_table_and_the_targets(dry_run):
    out, report, proc, paths = dry_run
    summary = (out / "summary.md").read_text()
    for head in ("## Steps", "## Paths: tiny 64x64", "## sd15:", "## Soak:", "## Profile:", "## LoRA swaps",
                 "## DyMe kernels", "## pytest -m gpu", "## Targets"):  # fmt: skip
        assert head in summary
    assert "| path | FPS | p50 ms | p99 ms | p99/p50 | peak MB | x eager | PSNR vs eager dB (min) |" in summary
    assert "| kind | ms per frame | share |" in summary and "| kernel | kind | calls | ms per frame |" in summary
    targets = {t["target"]: t for t in report["targets"]}
    assert list(targets) == [
        "tiny 64x64 1 step: best path >= 300 FPS (the goal)",
        "tiny 64x64 1 step: best path >= 150 FPS",
        "best path >= 5x eager (same run)",
        "p99/p50 <= 1.2 (best path)",
        "memory drift 0 MB over 3,000+ frames (soak)",
        "aoti vs eager PSNR >= 40 dB (min over frames, fp32)",
        "tiny 4 steps >= 80 FPS",
    ]
    best = gpu_report.best_path(report)[0]
    goal = targets["tiny 64x64 1 step: best path >= 300 FPS (the goal)"]
    assert goal["value"] == f"{best['backend']}: {best['fps']:.1f} FPS" and goal["met"] is (best["fps"] >= 300)
    soak = targets["memory drift 0 MB over 3,000+ frames (soak)"]
    assert soak["met"] is None and "20 frames (too few)" in soak["value"]  # 20 frames say nothing about 3,000
    if "aoti" in paths:
        assert targets["aoti vs eager PSNR >= 40 dB (min over frames, fp32)"]["met"] is True
    assert all(f"| {t} | {v['value']} |" in summary for t, v in targets.items())
    assert proc.stdout.endswith(summary + "\n")  # the command ends by printing the summary


def test_targets_from_a_report():
    def row(backend, fps, psnr_ok=True, psnr_min=50.0, p50=2.0, p99=2.2):
        return {
            "backend": backend,
            "fps": fps,
            "p50_ms": p50,
            "p99_ms": p99,
            "p99_p50": p99 / p50,
            "peak_mem_mb": 1,
            "psnr_vs_eager_db": psnr_min,
            "psnr_min_db": psnr_min,
            "psnr_ok": psnr_ok,
            "soak": {},
            "profile": {},
        }

    def step(name, *rows):
        return {"name": name, "status": "ok", "seconds": 1.0, "reason": "", "command": "", "result": {"rows": rows}}

    eager = row("eager", 30.0, psnr_ok=None, psnr_min=None)
    soaked = row("aoti+graphs", 300.0) | {"soak": {"frames": 3000, "memory_drift_mb": 0.02, "latency_drift_pct": 1.0}}
    report = {
        "plan": {"model": "sd-turbo", "size": 512, "precision": "fp16", "sd15_model": "sd15"},
        "steps": [
            step("fps aoti+graphs", eager, row("aoti+graphs", 320.0, psnr_min=38.0)),
            step("fps tensorrt+graphs", eager, row("tensorrt+graphs", 900.0, psnr_ok=False)),  # fast, wrong: out
            step("soak", soaked),
        ],
    }
    met = {t["target"].split(":")[-1].strip(): (t["value"], t["met"]) for t in gpu_report.targets(report)}
    assert met["best path >= 300 FPS (the goal)"] == ("aoti+graphs: 320.0 FPS", True)
    assert met["best path >= 5x eager (same run)"] == ("10.67x", True)
    assert met["p99/p50 <= 1.2 (best path)"] == ("aoti+graphs: 1.10", True)
    assert met["memory drift 0 MB over 3,000+ frames (soak)"] == ("+0.0 MB over 3000 frames", True)
    assert met["aoti vs eager PSNR >= 40 dB (min over frames, fp16)"] == ("aoti+graphs: 38.0 dB", False)
    assert met["sd15 4 steps >= 80 FPS"] == ("no sd15 result", None)


def test_steps_that_do_not_fit_are_skipped_and_a_crashing_step_is_recorded(tmp_path, monkeypatch, capsys):
    def broken(self, step):
        raise RuntimeError("probe broke")

    monkeypatch.setattr(gpu_check.Check, "pytest", broken)
    code = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--budget-s", "3", "--engines", str(tmp_path / "e")])
    steps = steps_of(json.loads((tmp_path / "gpu_check.json").read_text()))
    assert code == 1
    assert steps["pytest"]["status"] == "failed" and "RuntimeError: probe broke" in steps["pytest"]["reason"]
    assert steps["kernels"]["reason"] == "needs ~5 s; 3 s of the budget left, 4 later step(s) keep 50 s of it"
    assert steps["soak"]["reason"] == steps["profile"]["reason"] == "no path was measured"  # no best path
    assert all(s["status"] == "skipped" and s["reason"] for n, s in steps.items() if n != "pytest")
    assert "| fps aoti | skipped |" in (tmp_path / "summary.md").read_text()
    assert "| fps aoti | skipped |" in capsys.readouterr().out
    assert not (tmp_path / "e").exists()  # nothing was built


def test_a_child_past_its_timeout_is_killed_and_recorded(tmp_path):
    args = argparse.Namespace(out=tmp_path, paths=[], budget_s=60.0, skip=[], argv=[], engines=tmp_path)
    (tmp_path / "gpu_check.log").write_text("")
    check = gpu_check.Check(args, gpu_check.DRY)
    step = check.steps[0]
    t = time.monotonic()
    output = check.child(step, [sys.executable, "-c", "print('started', flush=True); import time; time.sleep(60)"], 1)
    assert time.monotonic() - t < 30 and output.strip() == "started"
    assert step.status == "timed_out" and step.reason == "killed after 1 s, its share of the budget"
    check.child(step := gpu_check.Step("x", "kernels"), [sys.executable, "-c", "raise SystemExit('bad input')"], 30)
    assert step.status == "failed" and step.reason == "exit code 1: bad input"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without CUDA")
def test_the_gpu_check_needs_a_gpu(capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.main([])
    assert e.value.code == 2 and "no CUDA GPU here" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, kind",
    [
        ("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_cudnn", "conv"),
        ("aten::mkldnn_convolution", "conv"),
        ("nvjet_hsh_128x256_64x4_1x2_h_bz_coopA_NNT", "gemm"),
        ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64", "gemm"),
        ("aten::addmm", "gemm"),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "attention"),
        ("fmha_cutlassF_f16_aligned_64x64_rf_sm80", "attention"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", "attention"),
        ("_dyme_merge_kernel", "dyme"),
        ("Memcpy HtoD (Pageable -> Device)", "copies"),
        ("void at::native::elementwise_kernel<128, 2, direct_copy_kernel_cuda>", "copies"),
        ("triton_poi_fused_convolution_silu_3", "other"),
        ("void at::native::vectorized_elementwise_kernel<4, silu_kernel>", "other"),
    ],
)
def test_kernel_kinds(name, kind):
    assert classify(name) == kind


def test_split_by_kind_is_per_frame():
    kernels = [{"name": "_dyme_assign_kernel", "us": 400.0}, {"name": "nvjet_x", "us": 2000.0}]
    assert split_by_kind(kernels, 4) == {**dict.fromkeys(KIND_NAMES, 0.0), "dyme": 0.1, "gemm": 0.5}


def test_profile_frames_splits_a_runner_by_kind(one_thread):
    weight, x = torch.randn(16, 8, 3, 3), torch.randn(1, 8, 32, 32)
    seen = []

    def runner(frame):  # a convolution and a matrix product per frame
        seen.append(frame)
        y = torch.nn.functional.conv2d(x, weight, padding=1)  # [1, 16, 32, 32]
        return (y.flatten(1) @ torch.randn(16 * 32 * 32, 4)).numpy()

    p = profile_frames(runner, [1, 2, 3], 4, cuda=False)
    assert seen == [1, 2, 3, 1, 2, 3, 1, 2]  # 4 timed, then 4 profiled; the frames loop
    assert p["frames"] == 4 and p["frame_ms"] > 0 and p["profiled_frame_ms"] > 0
    assert p["kinds"]["conv"] > 0 and p["kinds"]["gemm"] > 0 and p["kinds"]["dyme"] == 0
    assert sum(p["kinds"].values()) == pytest.approx(p["busy_ms"])
    assert {k["kind"] for k in p["top"]} >= {"conv", "gemm"} and "frame" not in {k["name"] for k in p["top"]}


def test_profile_rows_are_kernels_without_the_frame_annotation():
    from types import SimpleNamespace as Event

    from torch.autograd import DeviceType

    def event(key, device, us, annotation=False):
        return Event(key=key, device_type=device, self_device_time_total=us, self_cpu_time_total=us * 2, count=3,
                     is_user_annotation=annotation)  # fmt: skip

    averages = [
        event("frame", DeviceType.CUDA, 9000.0, annotation=True),  # the record_function span on the GPU timeline
        event("aten::convolution", DeviceType.CPU, 500.0),  # the op that launched the kernel below
        event("sm90_xmma_fprop_implicit_gemm_cudnn", DeviceType.CUDA, 500.0),
        event("Memset (Device)", DeviceType.CUDA, 0.0),
    ]
    kernels = op_times(averages, cuda=True, kernels=True)
    assert kernels == [{"name": "sm90_xmma_fprop_implicit_gemm_cudnn", "us": 500.0, "calls": 3}]
    assert [r["name"] for r in op_times(averages, cuda=True, kernels=False)] == ["aten::convolution"]
    cpu = op_times(averages, cuda=False, kernels=True)
    assert [(r["name"], r["us"]) for r in cpu] == [
        ("aten::convolution", 1000.0), ("sm90_xmma_fprop_implicit_gemm_cudnn", 1000.0)
    ]  # fmt: skip


@pytest.mark.slow
def test_the_lora_step_swaps_on_eager_and_drops_no_frame(dry_run):
    """The dry run's lora step: eager only (no AOTInductor compile on a CPU), 6 frames, a swap every 2."""
    out, report, _, _ = dry_run
    step = steps_of(report)["lora"]
    assert step["status"] == "ok", step
    assert step["command"].startswith("python -m benchmarks.lora_swap --model tiny --height 64 --width 64 --device cpu")
    swap, drops = step["result"]["swap"]["eager"], step["result"]["drops"]["eager"]
    assert swap["swaps"] == 3 and 0 < swap["set_loras_ms_p50"] <= swap["first_frame_after_ms_p50"]
    assert drops["swaps"] == 3 and drops["frames_in"] == drops["frames_out"] == 6
    assert drops["dropped"] == drops["failed"] == 0
    assert step["result"]["fps"] == {}  # no aoti in the dry run
    assert "| eager | 3 | 6 | 6 | 0 | 0 |" in (out / "summary.md").read_text()
