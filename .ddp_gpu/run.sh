#!/bin/bash
set -u
cd "$(dirname "$0")"
echo "pwd $(pwd)"; (cd .. && git log -1 --oneline 2>/dev/null)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
W=../.whl; [ -d $W ] || W=.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $W/*.whl || echo "wheel install failed"
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.device_count(), 'GPU(s)')"
echo "== worker: 2 ranks sharing GPU 0 over gloo (SyncBatchNorm, float32, no TF32)"
timeout 240 python3 -m torch.distributed.run --standalone --nproc-per-node 2 tests/ddp_worker.py $OUT/cuda_gloo_share.json --device cuda > $OUT/worker.log 2>&1; echo "rc $?"
grep -v Warning $OUT/worker.log | tail -25
cat $OUT/cuda_gloo_share.json 2>/dev/null
echo "== bench: one GPU, single process"
timeout 150 python3 bench/ddp_throughput.py --device cuda --ranks 1 --steps 50 --gradient-batches 0 --threads 4 2>&1 | grep -v Warn | tail -8
echo "== load $(cat /proc/loadavg)"
