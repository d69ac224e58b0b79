#!/usr/bin/env bash
# One prepared script for a lent GPU (H100/H200): the CUDA tests, the throughput benchmark and a
# short GPU cross-validation, each with its own time budget, all output under ${OUT:-_build/gpu}.
# Usage on the device machine (from the repository root, with .venv carried or installed):
#   bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-_build/gpu}
mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" | tee -a "$OUT/gpu.txt"

echo "== CUDA tests"
timeout 120 "$PY" -m pytest -q -k "cuda or gpu" tests/test_cox.py tests/test_models.py tests/test_cv.py \
  2>&1 | tail -20 | tee "$OUT/gpu_tests.txt"

echo "== throughput (resnet18 2D 2x64^2, r3d_18 2x32^3; DataLoader baseline vs fast path)"
timeout 240 "$PY" bench/train_throughput.py --device cuda --steps 100 2>&1 | tee "$OUT/throughput.txt"

echo "== short GPU cross-validation (r3d_18 multimodal, small synthetic cohort)"
timeout 200 bash -c "
  $PY -m psma_lib.cli generate --out $OUT/cohort --patients 40 --seed 1 --no-progress &&
  $PY -m psma_lib.cli crop $OUT/cohort/manifest.yaml --out $OUT/crops --size-mm 64 --spacing-mm 2 --no-progress &&
  $PY -m psma_lib.cli cv --crops $OUT/crops --modality multimodal --backbone r3d_18 --epochs 5 \
      --device cuda --aggregation sum --out $OUT/cv_r3d --no-progress" 2>&1 | tail -5 | tee "$OUT/cv.txt"
