"""`python -m benchmarks.gpu_check --dry-run`: every step recorded, the files written, a failed step does not stop
the later ones, and steps that do not fit the budget are skipped with the reason.

One dry run per session (about a minute on a 2-core CPU), on the session's shared tiny build folders, which the
check finds by `spec.folder_name` under `--engines` and reuses instead of building again.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_spec

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]
STATUSES = {"ok", "failed", "timed_out", "skipped"}


@pytest.fixture(scope="module")
def dry_run(tiny_build, tmp_path_factory):
    """(out folder, report, completed process, seconds, the aoti build's error or None)."""
    root = tiny_build(tiny_spec()).parent
    try:  # build_engines/aoti.py is young: a failing AOTInductor build must show in the check, not stop this test
        tiny_build(tiny_spec(), builder="aoti")
        aoti_error = None
    except Exception as e:
        aoti_error = f"{type(e).__name__}: {e}"
    out = tmp_path_factory.mktemp("gpu_check")
    argv = ["--dry-run", "--out", str(out), "--engines", str(root), "--sd15-backends", "eager,no-such-backend"]
    t = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", *argv], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    seconds = time.monotonic() - t
    print(f"gpu_check --dry-run: {seconds:.0f} s")  # shown with -s: the time this test adds to the suite
    return out, json.loads((out / "gpu_check.json").read_text()), proc, seconds, aoti_error


def steps_of(report: dict) -> dict:
    return {s["name"]: s for s in report["steps"]}


@pytest.mark.slow
def test_dry_run_writes_the_files_and_records_every_step(dry_run):
    out, report, proc, _, _ = dry_run
    files = sorted(p.name for p in out.iterdir())
    assert files == ["fps_main.json", "fps_soak.json", "gpu_check.json", "gpu_check.log", "summary.md"]  # sd15 failed
    assert report["mode"] == "dry-run" and report["exit_code"] == proc.returncode
    steps = steps_of(report)
    assert list(steps) == list(gpu_check.STEPS)
    for s in steps.values():
        assert s["status"] in STATUSES, s
        assert s["status"] != "failed" or s["reason"], s  # a failure says why
    log = (out / "gpu_check.log").read_text()
    for name, s in steps.items():
        if name != "summary":
            assert f"start: {name} " in log
            assert f"{s['status']}: {name} (" in log or s["status"] == "skipped"
    env = steps["environment"]
    assert env["status"] == "ok" and env["result"]["torch"] and env["result"]["cuda"] is False
    assert env["result"]["builder"] and env["result"]["builder_why"] and "onnxruntime" in env["result"]
    # pytest -m gpu ran: on a CPU nothing passes (everything skips, unless a module fails to import).
    assert steps["pytest"]["status"] in ("ok", "failed") and steps["pytest"]["result"]["passed"] == 0
    for name in ("fps_main.json", "fps_soak.json"):
        assert json.loads((out / name).read_text())["results"]


@pytest.mark.slow
def test_summary_has_the_tables_and_the_targets(dry_run):
    out, report, proc, _, _ = dry_run
    summary = (out / "summary.md").read_text()
    for head in (
        "## Steps",
        "## Environment",
        "## pytest -m gpu",
        "## fps_main:",
        "## soak:",
        "## profile:",
        "## Targets",
    ):
        assert head in summary
    assert "| backend | FPS | p50 ms | p99 ms | p99/p50 | peak MB | PSNR vs eager dB (min) |" in summary
    assert "| kind | ms per frame | share |" in summary and "| kernel | kind | calls | ms per frame |" in summary
    assert [t["target"].split(" ")[0] for t in report["targets"]] == [
        "best",
        "best",
        "p99/p50",
        "memory",
        "aoti",
        "tiny",
    ]
    for t in report["targets"]:
        assert t["met"] in (True, False, None) and t["value"] and t["target"] in summary
    soak = next(t for t in report["targets"] if t["target"].startswith("memory"))
    assert soak["met"] is None and "20 frames (too few)" in soak["value"]  # 20 frames say nothing about 3,000
    assert summary in proc.stdout  # the end of the output is the summary (what a device call's reply shows)


@pytest.mark.slow
def test_fps_main_compares_every_backend_with_eager(dry_run):
    _, report, _, _, aoti_error = dry_run
    steps = steps_of(report)
    main = steps["fps_main"]
    rows = {r["backend"]: r for r in main["result"]["rows"]}
    assert rows["eager"]["psnr_ok"] is None and rows["onnxruntime"]["psnr_ok"] is True
    assert all(r["fps"] > 0 and r["p99_p50"] >= 1.0 for r in rows.values())
    if "aoti" in rows:
        assert rows["aoti"]["psnr_ok"] is True and steps["build_main"]["status"] == "ok"
        assert main["status"] == "ok"
        return
    # AOTInductor (being finished) did not run: the check says why, failed the step, and measured the others.
    assert main["status"] == "failed"
    if aoti_error is None:  # the session built it, so the check reused it and the run crashed in it
        assert steps["build_main"]["status"] == "ok" and "aoti" in main["result"]["crashed"]
    else:
        assert steps["build_main"]["status"] == "failed" and main["result"]["dropped"]["aoti"].startswith("not built")


@pytest.mark.slow
def test_a_failed_step_is_recorded_and_the_later_steps_run(dry_run):
    _, report, proc, _, _ = dry_run
    steps = steps_of(report)
    # --sd15-backends eager,no-such-backend: both SD1.5 steps fail, saying why; the soak and the profile still run.
    assert steps["build_sd15"]["status"] == "failed" and steps["fps_sd15"]["status"] == "failed"
    assert "no-such-backend" in steps["fps_sd15"]["reason"]
    assert proc.returncode == 1
    soak, profile = steps["soak"], steps["profile"]
    assert soak["status"] == "ok" and profile["status"] == "ok"
    best = gpu_check.best_row(steps["fps_main"]["result"])["backend"]
    (row,) = soak["result"]["rows"]
    assert row["backend"] == best and row["soak"]["frames"] == 20 and "memory_drift_mb" in row["soak"]
    assert profile["result"]["backend"] == gpu_check.base(best) and profile["result"]["frames"] == 4
    assert list(profile["result"]["kinds"]) == list(gpu_check.KIND_NAMES) and 0 < len(profile["result"]["top"]) <= 25


def test_steps_that_do_not_fit_are_skipped_and_a_crashing_step_is_recorded(tmp_path, monkeypatch):
    def broken(self, step):
        raise RuntimeError("probe broke")

    monkeypatch.setattr(gpu_check.Check, "environment", broken)
    code = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--budget-s", "3", "--engines", str(tmp_path / "e")])
    steps = steps_of(json.loads((tmp_path / "gpu_check.json").read_text()))
    assert code == 1
    assert steps["environment"]["status"] == "failed" and "probe broke" in steps["environment"]["reason"]
    assert steps["pytest"]["status"] == "skipped" and steps["pytest"]["reason"].startswith(
        "needs ~10 s; 3 s of the budget left"
    )
    assert all(
        s["status"] == "skipped" and s["reason"] for n, s in steps.items() if n not in ("environment", "summary")
    )
    assert "| soak | skipped |" in (tmp_path / "summary.md").read_text()
    assert not (tmp_path / "e").exists()  # nothing was built


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
    assert gpu_check.classify(name) == kind


def test_split_by_kind_is_per_frame():
    kernels = [{"name": "_dyme_assign_kernel", "us": 400.0}, {"name": "nvjet_x", "us": 2000.0}]
    assert gpu_check.split_by_kind(kernels, 4) == {**dict.fromkeys(gpu_check.KIND_NAMES, 0.0), "dyme": 0.1, "gemm": 0.5}


def test_what_a_dead_fps_run_leaves_is_read_from_its_log():
    output = (
        "INFO benchmarks.fps: running eager: 2 warm-up + 6 timed frames, 1 thread(s)\n"
        "INFO benchmarks.fps: eager: 20.0 FPS, p50 50.00 ms\n"
        "INFO benchmarks.fps: running aoti+graphs: 2 warm-up + 6 timed frames, 1 thread(s)\n"
        "Traceback (most recent call last):\n  ...\nRuntimeError: CUDA error: an illegal memory access\n"
    )
    assert gpu_check.crashed_backend(output) == "aoti+graphs"
    assert gpu_check.progress_lines(output) == ["eager: 20.0 FPS, p50 50.00 ms"]
    assert gpu_check.last_error(output) == "RuntimeError: CUDA error: an illegal memory access"


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
    kernels = gpu_check.op_times(averages, cuda=True, kernels=True)
    assert kernels == [{"name": "sm90_xmma_fprop_implicit_gemm_cudnn", "us": 500.0, "calls": 3}]
    assert [r["name"] for r in gpu_check.op_times(averages, cuda=True, kernels=False)] == ["aten::convolution"]
    cpu = gpu_check.op_times(averages, cuda=False, kernels=True)
    assert [(r["name"], r["us"]) for r in cpu] == [
        ("aten::convolution", 1000.0), ("sm90_xmma_fprop_implicit_gemm_cudnn", 1000.0)
    ]  # fmt: skip
