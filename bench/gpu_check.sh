#!/usr/bin/env bash
# One prepared script for a lent GPU (H100/H200): the CUDA tests, the throughput benchmark and the
# paper profile's cross-validations, each with its own time budget, all output under ${OUT:-_build/gpu}.
#
# A bare GPU machine's python3 has torch and torchvision but not nibabel or lifelines: fetch their
# wheels here first (bash bench/gpu_wheels.sh -> .whl/), carry .whl with the working tree, then on
# the GPU machine, from the repository root:
#   bash bench/gpu_check.sh
# With a local .venv (a GPU workstation) the script uses it and needs no wheels.
set -uo pipefail
OUT=${OUT:-_build/gpu}
mkdir -p "$OUT"
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c "import nibabel, lifelines" 2>/dev/null; then
  [ -d .whl ] || { echo "nibabel/lifelines missing and no .whl/ folder: run bench/gpu_wheels.sh first"; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/psma-site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/psma-site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" | tee -a "$OUT/gpu.txt"

echo "== CUDA tests"
timeout 150 "$PY" -m pytest -q -p no:cacheprovider -k "cuda or gpu" tests/test_cox.py tests/test_models.py tests/test_cv.py tests/test_distributed.py \
  2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"

echo "== throughput (resnet18 2D 2x64^2, r3d_18 2x32^3; DataLoader baseline vs fast path vs patient bags)"
timeout 150 "$PY" bench/train_throughput.py --device cuda --steps 100 2>&1 | tee "$OUT/throughput.txt"

echo "== paper profile (99 patients, 64 mm / 2 mm crops, 60 epochs, every backbone)"
timeout 330 "$PY" bench/paper_profile.py --device cuda --out "$OUT/paper" 2>&1 | tee "$OUT/paper_profile.txt"
