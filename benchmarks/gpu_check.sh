#!/usr/bin/env bash
# Issue 8's GPU proof in one go (about ten minutes on an H100): environment, whether TensorRT-RTX runs on this
# GPU (tiny engine vs eager, CUDA graphs), sd-turbo 512x512 engines and FPS/latency/memory against eager in the
# same run, a soak, the paper's SD1.5 4-step setting, a one-frame profile, and a markdown summary.
#
#   . .device/env.sh && OUT=$OUT bash benchmarks/gpu_check.sh         # on the GPU machine (staged by pack.sh)
#   bash benchmarks/gpu_check.sh --dry-run                           # here: tiny model on the CPU, same steps
#
# Results go to $OUT (default artifacts/gpu_check), at most 8 files: gpu_check.log, env.txt, trt_check.txt,
# fps_main.json, fps_soak.json, fps_sd15.json, profile.txt, summary.md. A failed step is logged and the
# script goes on, so one failure still leaves every other number.
set -uo pipefail

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-artifacts/gpu_check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || PY=python

log() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
run() {  # run NAME OUTFILE CMD...: run a step, its output appended to OUTFILE, success or failure logged
  local name=$1 file=$2
  shift 2
  log "start: $name"
  local t0=$SECONDS
  if "$@" >>"$file" 2>&1; then
    log "ok: $name ($((SECONDS - t0)) s)"
  else
    log "FAILED: $name (rc $?, $((SECONDS - t0)) s): $(tail -n 3 "$file" | tr '\n' ' ')"
  fi
}

if [ $DRY = 1 ]; then
  MODEL=tiny SIZE=64 FRAMES=10 WARMUP=3 SOAK=30 SD15_FRAMES=5
  MAIN_BACKENDS=eager,onnxruntime SOAK_BACKEND=onnxruntime SD15_BACKENDS=eager,onnxruntime
  SD15_MODEL=tiny DEVICE=cpu
  export OMP_NUM_THREADS=1  # torch and ONNX Runtime thread pools stall each other on a small CPU
  EXTRA=(--threads 1)
else
  MODEL=sd-turbo SIZE=512 FRAMES=300 WARMUP=20 SOAK=${SOAK:-3000} SD15_FRAMES=100
  MAIN_BACKENDS=${BACKENDS:-eager,eager+graphs,tensorrt,tensorrt+graphs}
  SOAK_BACKEND=${SOAK_BACKEND:-tensorrt+graphs} SD15_BACKENDS=eager,tensorrt+graphs
  SD15_MODEL=sd15 DEVICE=cuda
  EXTRA=()
  if $PY -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"; then
    MAIN_BACKENDS="$MAIN_BACKENDS,onnxruntime"
  fi
fi
ENGINES=${ENGINES:-engines/gpu_check}

log "mode: $([ $DRY = 1 ] && echo dry-run || echo gpu), model $MODEL ${SIZE}x${SIZE}, out $OUT"

# 1. Environment.
{
  date -u
  uname -a
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  $PY - <<'EOF'
import torch, onnxruntime
print("python torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
print("onnxruntime", onnxruntime.__version__, onnxruntime.get_available_providers())
from streamv2v_trt.engine.trt import import_tensorrt, tensorrt_version
try:
    trt, flavour = import_tensorrt()
    print("tensorrt flavour", flavour, tensorrt_version(trt))
except ImportError as e:
    print("tensorrt: not importable:", e)
EOF
} >"$OUT/env.txt" 2>&1
log "environment: $(grep -E '^(gpu|tensorrt)' "$OUT/env.txt" | tr '\n' ';')"

# 2. Does TensorRT(-RTX) run on this GPU at all? Tiny engine vs eager and CUDA graphs (the GPU tests).
if [ $DRY = 1 ]; then
  run "runtime tests (CPU: onnxruntime parity, graph planning)" "$OUT/trt_check.txt" \
    $PY -m pytest -q -x tests/test_runtime_ort.py tests/test_gpu_runtime.py
else
  run "tensorrt + CUDA graph tests on this GPU" "$OUT/trt_check.txt" $PY -m pytest -q -rs -m gpu tests/test_gpu_runtime.py
fi
WHAT=$([ $DRY = 1 ] && echo "runtime tests pass (CPU, no TensorRT run)" || echo "TensorRT and CUDA graphs run on this GPU")
if grep -qE "[0-9]+ passed" "$OUT/trt_check.txt" && ! grep -qE "[0-9]+ (failed|error)" "$OUT/trt_check.txt"; then
  log "$WHAT: yes ($(grep -E 'passed|skipped' "$OUT/trt_check.txt" | tail -n 1))"
else
  log "$WHAT: NO (see trt_check.txt: $(grep -m 1 -E 'Error|error' "$OUT/trt_check.txt"))"
fi

# 3. The main comparison, every backend in the same run on the same frames (builds the engines first).
run "fps $MODEL ${SIZE}x${SIZE} ($MAIN_BACKENDS)" "$LOG" $PY -m benchmarks.fps --model $MODEL --height $SIZE \
  --width $SIZE --backends "$MAIN_BACKENDS" --frames $FRAMES --warmup $WARMUP --device $DEVICE \
  --engines "$ENGINES/$MODEL" --json "$OUT/fps_main.json" "${EXTRA[@]}"

# 4. Soak: memory and latency drift of the best path over a long run.
run "soak $SOAK frames ($SOAK_BACKEND)" "$LOG" $PY -m benchmarks.fps --model $MODEL --height $SIZE --width $SIZE \
  --backends "$SOAK_BACKEND" --frames $FRAMES --warmup $WARMUP --soak $SOAK --device $DEVICE \
  --engines "$ENGINES/$MODEL" --json "$OUT/fps_soak.json" "${EXTRA[@]}"

# 5. The paper's setting: SD1.5 architecture, 4 steps (stream batch 4).
run "fps $SD15_MODEL 4 steps" "$LOG" $PY -m benchmarks.fps --model $SD15_MODEL --height $SIZE --width $SIZE \
  --t-index-list 30,35,40,45 --backends "$SD15_BACKENDS" --frames $SD15_FRAMES --warmup $WARMUP --device $DEVICE \
  --engines "$ENGINES/$SD15_MODEL-4" --json "$OUT/fps_sd15.json" "${EXTRA[@]}"

# 6. Where the milliseconds of one frame go (not graphed, so every kernel shows).
PROFILE_BACKEND=$([ $DRY = 1 ] && echo onnxruntime || echo tensorrt)
run "profile one frame ($PROFILE_BACKEND)" "$OUT/profile.txt" $PY - "$ENGINES/$MODEL" "$PROFILE_BACKEND" "$DEVICE" <<'EOF'
import sys, torch, numpy as np
from torch.profiler import ProfilerActivity, profile
from streamv2v_trt import StreamV2V
from benchmarks.fps import synthetic_video
folder, backend, device = sys.argv[1:4]
s = StreamV2V.from_engines(folder, backend, device=device, prompt="a watercolor painting")
frames = synthetic_video(12, s.cfg.height, s.cfg.width)
for f in frames[:8]:
    s(f)
acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
with profile(activities=acts) as prof:
    for f in frames[8:]:  # frame 8 updates the bank (DyMe), 9-11 do not
        with torch.profiler.record_function("frame"):
            s(f)
key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
print(prof.key_averages().table(sort_by=key, row_limit=25))
EOF

# 7. Summary table.
$PY - "$OUT" >"$OUT/summary.md" 2>>"$LOG" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("# gpu_check summary\n")
env = (out / "env.txt").read_text() if (out / "env.txt").exists() else ""
print("```\n" + "\n".join(l for l in env.splitlines() if l.startswith(("python", "gpu", "onnxruntime", "tensorrt"))) + "\n```\n")
for name in ("fps_main", "fps_soak", "fps_sd15"):
    p = out / f"{name}.json"
    if not p.exists():
        print(f"## {name}: missing (step failed, see gpu_check.log)\n")
        continue
    d = json.loads(p.read_text())
    c = d["config"]
    print(f"## {name}: {c['model']} {c['height']}x{c['width']}, t_index_list {c['t_index_list']}, {c['device']} {c['dtype']}\n")
    print("| backend | FPS | p50 ms | p99 ms | p99/p50 | peak MB | PSNR vs eager dB | soak memory drift MB | soak p50 drift % |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in d["results"]:
        s = r.get("soak") or {}
        ps = "" if r["psnr_vs_eager_db"] is None else f"{r['psnr_vs_eager_db']:.1f} (min {r['psnr_min_db']:.1f})"
        print(f"| {r['backend']} | {r['fps']:.1f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['p99_ms'] / r['p50_ms']:.2f} "
              f"| {r['peak_mem_mb']:.0f} | {ps} | {s.get('memory_drift_mb', '')} | "
              f"{'' if not s else round(s['latency_drift_pct'], 1)} |")
    for k, v in d["ratios"].items():
        print(f"\nFPS ratio {k}: {v:.2f}x")
    print()
EOF
log "summary written: $OUT/summary.md"
cat "$OUT/summary.md"
