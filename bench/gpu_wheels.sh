#!/usr/bin/env bash
# Wheels of the packages a bare GPU machine lacks (its python3 has torch, torchvision, numpy,
# scipy, pandas, scikit-learn, matplotlib, pyyaml, safetensors, tqdm, pytest, statsmodels, formulaic),
# for CPython 3.12 on x86-64, into .whl/ (ignored by git): carried to the device for gpu_check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for pkg in nibabel lifelines autograd autograd-gamma scikit-survival numexpr ecos osqp; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$pkg"
done
ls .whl
