"""The GPU check (issue 8) in one go, inside a time budget: every number the targets need, in one device call.

    bash ../shared/device/pack.sh                                   # here: stage what the GPU image lacks
    device call: carry [".device"], command: bash .device/run.sh python3 -m benchmarks.gpu_check
    python -m benchmarks.gpu_check --dry-run                        # here: the same steps, tiny model, CPU

Steps, in order (each a subprocess, so a crash is recorded and the check goes on; each is timed and logged):
  environment  python, torch, CUDA, GPU and compute capability, whether tensorrt / tensorrt_rtx import and
               whether TensorRT-RTX runs on this GPU, what `build_engines.choose_builder` picks and why,
               onnxruntime providers, triton; nvidia-smi.
  pytest       `pytest -m gpu -q -rfEs`: pass / fail / skip counts, each failure's first line, skip reasons.
  build_main   build (or reuse) the folders fps_main's backends run, under --engines (build_engines.build).
  fps_main     sd-turbo 512x512, 1 step, TAESD, DyMe every 4 frames: eager, eager+graphs, compiled+graphs,
               aoti+graphs (+ tensorrt, tensorrt+graphs where TensorRT imports and runs on this GPU) in ONE
               `benchmarks.fps` run, 300 timed frames after 30 warm-up (torch.compile, graph capture): FPS,
               p50/p99, peak memory, PSNR of every frame vs eager. A backend whose build failed is left out; one
               that crashes is dropped and the run repeated without it, while the budget allows.
  build_sd15   build (or reuse) the folders of the SD1.5 step.
  fps_sd15     SD1.5 architecture, 4 steps (t_index_list [30,35,40,45]), the same backends, 100 timed frames.
               Optional: skipped unless the budget still holds what the soak and the profile need.
  soak         the best backend of fps_main (highest FPS that passed its PSNR floor), 3,000 more frames:
               memory drift and p50 latency drift (`benchmarks.fps --soak`).
  profile      torch.profiler over one DyMe interval (4 frames) of the best path after warm-up, NOT graphed
               so kernels show (a "+graphs" path profiles its base): time per frame split into conv, GEMM,
               attention, DyMe, copies and other by the kernel-name table KINDS, and the top-25 kernels.
  summary      gpu_check.json (every step: status, seconds, result) and summary.md (tables and targets).

Budget: a step starts only if the time left, less what the later core steps (build_main, fps_main, soak,
profile) need, covers what it needs; otherwise it is recorded as skipped with the reason. A started step is
killed at its share and recorded as timed_out. Builds stay in --engines (on a warm machine /tmp survives
between calls, so a rerun reuses them). The exit code is 1 if any step failed or timed out, or any backend
fell below its PSNR floor; targets not met do not change it.

Files under --out (at most 6, the device call returns 8): gpu_check.json, summary.md, gpu_check.log (every
step's lines and its subprocess's output), fps_main.json, fps_sd15.json, fps_soak.json.
"""

from benchmarks.gpu_check.check import Check
from benchmarks.gpu_check.children import build_child, environment_child, op_times, profile_child
from benchmarks.gpu_check.cli import build_parser, main
from benchmarks.gpu_check.outputs import crashed_backend, last_error, progress_lines
from benchmarks.gpu_check.plan import DRY, GPU, STEPS, Plan, Step, base
from benchmarks.gpu_check.report import KIND_NAMES, KINDS, best_row, classify, split_by_kind

__all__ = [
    "DRY",
    "GPU",
    "KINDS",
    "KIND_NAMES",
    "STEPS",
    "Check",
    "Plan",
    "Step",
    "base",
    "best_row",
    "build_child",
    "build_parser",
    "classify",
    "crashed_backend",
    "environment_child",
    "last_error",
    "main",
    "op_times",
    "profile_child",
    "progress_lines",
    "split_by_kind",
]
