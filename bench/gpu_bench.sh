#!/usr/bin/env bash
# One pass on a GPU machine for the speed work, most important first, each written out as it ends:
# the model-level GPU tests, the full NEU PoC on CUDA (CUDA-graph steps), serving at 8 workers
# (database writer as a process and as a thread), the training benchmark at 30 epochs, the
# database write path (a sync per image file, one per group), the service's GPU tests, serving at
# 4 workers from concurrency 1 to 128, fused MaxMin, the NEU PoC with eager steps; then a summary
# against the GPU targets. At most 8 files
# under OUT_DIR (test results go into log.txt).
# Every step is bounded; the whole pass keeps within GPU_BENCH_BUDGET seconds (default 550),
# skipping what no longer fits. GPU_BENCH_DEVICE=cpu runs the same steps on a machine without a GPU
# (with a small image folder): a check of the script itself, whose figures mean nothing.
# Usage: bench/gpu_bench.sh NEU_DIR OUT_DIR   (python3 with PyTorch; the service's other packages
# as wheels in .whl/ when the machine has no package index: bench/wheels.sh makes them)
set -uo pipefail
NEU=${1:?NEU folder}
OUT=${2:?output folder}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 MAXMIN_DATA_DIR=/tmp/maxmin-var
log() { echo "== $(date +%T) $*" | tee -a "$OUT/log.txt"; }
START=$(date +%s)
BUDGET=${GPU_BENCH_BUDGET:-550}
DEVICE=${GPU_BENCH_DEVICE:-cuda}  # cpu: a dry run of the script itself on a machine without a GPU
# within SECONDS: the step's own limit, cut to what the budget has left; fails when under 15 s left
within() {
    local left=$(( BUDGET - ($(date +%s) - START) - 10 ))
    if (( left < 15 )); then log "skipped: budget spent" >&2; return 1; fi
    echo $(( $1 < left ? $1 : left ))
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc;
  python3 -c "import torch; print('torch', torch.__version__)"; } | tee -a "$OUT/log.txt"

log "GPU tests: layers, models, training steps"
T=$(within 90) && MAXMIN_TEST_DEVICE=$DEVICE timeout "$T" python3 -m pytest -q -p no:cacheprovider \
    tests/test_layers.py tests/test_models.py tests/test_train.py 2>&1 \
    | tail -4 | tee -a "$OUT/log.txt"

log "full NEU PoC on CUDA (CUDA-graph steps; decoding included, no cache)"
t0=$(date +%s%N)
T=$(within 120) && timeout "$T" python3 -m training.cli train "$NEU" --device $DEVICE \
    --out /tmp/neu-gpu --no-cache --quiet 2>&1 | tail -6 | tee -a "$OUT/log.txt"
echo "process wall: $(( ($(date +%s%N) - t0) / 1000000 )) ms" | tee -a "$OUT/log.txt"
cp /tmp/neu-gpu/report.json "$OUT/neu-gpu-report.json" || {
    # the serving steps need a run: train one with eager steps if the captured ones failed
    log "no report from the CUDA-graph run: eager steps instead"
    T=$(within 100) && timeout "$T" python3 -m training.cli train "$NEU" --device $DEVICE \
        --out /tmp/neu-gpu --no-cache --no-cuda-graphs --quiet 2>&1 | tail -6 \
        | tee -a "$OUT/log.txt"
}

# Every upload a new image file here (--distinct), as on a line.
log "serving benchmark (CUDA), 8 workers at 64: the database writer as a process, and as a thread"
T=$(within 100) && timeout "$T" python3 bench/serve_bench.py /tmp/neu-gpu "$NEU" --device $DEVICE \
    --workers 8 --client-procs 4 --seconds 6 --concurrency 64 --distinct \
    --sides service-writer-process,service-writer-thread --out "$OUT/serve-8w.json" 2>&1 \
    | grep "c=" | tee -a "$OUT/log.txt"

# About 2 x (120 s plain + 15 s ours) on an H200 (the plain loop decodes about 950 images/s there)
log "training benchmark (CUDA): plain loop, this trainer, at the trainer's default 30 epochs"
T=$(within 330) && timeout "$T" python3 bench/train_bench.py "$NEU" --device $DEVICE --epochs 30 \
    --repeats 2 --sides plain,ours --out "$OUT/train_bench.json" 2>&1 | tail -3 \
    | tee -a "$OUT/log.txt"

log "database write path, 8 workers, a new image per request: a sync per file, one per group"
T=$(within 60) && timeout "$T" python3 bench/db_bench.py --workers 8 --clients 8 --seconds 3 \
    --repeats 1 --ways write-lock,group-sync --new-images \
    --out "$OUT/db.json" 2>&1 | grep ratio | tee -a "$OUT/log.txt"

log "GPU tests: the service (batcher, model processes, API) on CUDA"
T=$(within 120) && MAXMIN_TEST_DEVICE=$DEVICE timeout "$T" python3 -m pytest -q -p no:cacheprovider \
    tests/test_writer_process.py tests/test_batcher.py tests/test_model_process.py \
    tests/test_model_host.py tests/test_api.py \
    -k "not postgresql" 2>&1 | tail -4 | tee -a "$OUT/log.txt"

log "serving benchmark (CUDA), 4 workers"
T=$(within 130) && timeout "$T" python3 bench/serve_bench.py /tmp/neu-gpu "$NEU" --device $DEVICE \
    --workers 4 --client-procs 4 --seconds 5 --concurrency 1 8 32 64 128 \
    --out "$OUT/serve.json" 2>&1 | grep "c=" | tee -a "$OUT/log.txt"

log "fused MaxMin benchmark (CUDA)"
T=$(within 60) && timeout "$T" python3 bench/fused_bench.py --device $DEVICE > "$OUT/fused.json" 2>&1

log "full NEU PoC on CUDA, eager steps (--no-cuda-graphs), for comparison"
T=$(within 100) && timeout "$T" python3 -m training.cli train "$NEU" --device $DEVICE \
    --out /tmp/neu-gpu-eager --no-cache --no-cuda-graphs --quiet 2>&1 | tail -6 \
    | tee -a "$OUT/log.txt"
cp /tmp/neu-gpu-eager/report.json "$OUT/neu-gpu-eager-report.json" 2>/dev/null
log "summary against the GPU targets"
python3 - "$OUT" <<'PY' 2>&1 | tee -a "$OUT/log.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError) as exc:
        print(f"{name}: missing ({exc})")
for name in ("neu-gpu-report.json", "neu-gpu-eager-report.json"):
    r = load(name)
    if r:
        run = r["run"]
        accs = {m: round(100 * v["accuracy"]["mean"], 1) for m, v in r["models"].items()}
        print(f"{name}: wall {run['wall_seconds']} s (target <= 60), step {run['training_step']}, "
              f"fallbacks {run['training_step_fallbacks']}, accuracy {accs}")
t = load("train_bench.json")
if t:
    print(f"train bench: end to end {t['end_to_end_speedup']}x (target >= 5), per model "
          + ", ".join(f"{m} {v['speedup']}x" for m, v in t["models"].items()))
for name in ("serve.json", "serve-8w.json"):
    s = load(name) or {}
    for side in ("service", "service-shared", "service-per-worker", "service-writer-process",
                 "service-writer-thread"):
        for row in s.get(side, []):
            if row["concurrency"] == 64:
                print(f"{name} {side} c=64: {row['requests_per_s']} req/s (target >= 2000), "
                      f"p99 {row['p99_ms']} ms (target < 50); Server-Timing medians ms: "
                      f"{row.get('server_timing_median_ms')}")
PY
log "done"
