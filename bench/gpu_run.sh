#!/usr/bin/env bash
# One pass on a GPU machine: environment, the GPU model tests, and the full NEU PoC on CUDA.
# Usage: bench/gpu_run.sh NEU_DIR OUT_DIR   (uses the machine's own python3 with PyTorch)
set -uo pipefail
NEU=${1:?NEU folder}
OUT=${2:?output folder}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
echo "== GPU tests"
MAXMIN_TEST_DEVICE=cuda timeout 240 python3 -m pytest -q -p no:cacheprovider \
    tests/test_layers.py tests/test_models.py tests/test_train.py 2>&1 | tail -5 | tee "$OUT/tests.txt"
echo "== full NEU PoC on CUDA (3 models x 3 seeds, 64 px, default budget)"
python3 -m training.cli train "$NEU" --device cuda --out "$OUT/neu-gpu" \
    --cache-dir "$OUT/cache" --quiet 2>&1 | tee "$OUT/train.txt" | tail -12
echo "== again, decoding from cache"
python3 -m training.cli train "$NEU" --device cuda --out "$OUT/neu-gpu-cached" \
    --cache-dir "$OUT/cache" --quiet 2>&1 | tail -3
python3 bench/summarize.py "$OUT/neu-gpu" "$OUT/neu-gpu-cached" | tee "$OUT/summary.md"
rm -rf "$OUT/cache" "$OUT"/neu-gpu*/checkpoints
