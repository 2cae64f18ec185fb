#!/usr/bin/env bash
# One prepared GPU check (run on a lent CUDA machine via the device tool; see README "GPU").
# Needs a subset of shared/ at .device_data/shared (the full data does not travel):
#   weights/cifar10-resnet/*.th, data/cifar10-jpeg/train-10k (130/class), data/cifar10-jpeg/test (100/class).
# Writes to $OUT: bench_profile.md/json (profile ratios on CUDA, batch 256; batch1024/ the same at 1024),
# search.log, r20_plan.json, r32_plan.json.
set -uo pipefail
OUT=${OUT:-/tmp/rr_device_out}
mkdir -p "$OUT"
export RR_ALLOC_SHARED=$PWD/.device_data/shared RR_ALLOC_CACHE=/tmp/rr_cache PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PY:-python3}
{
  nvidia-smi -L
  $PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/search.log"
$PY studies/bench_profile.py --device cuda --no-memory --breakdown --repeats 30 --out "$OUT" 2>&1 | grep "^| resnet" | tee -a "$OUT/search.log"
# GPU timings are milliseconds and jittery: median of 30. The same at batch 1024 (one batch; at 256 the GPU is launch-bound)
$PY studies/bench_profile.py --device cuda --no-memory --breakdown --repeats 30 --batch-size 1024 --out "$OUT/batch1024" 2>&1 | grep "^| resnet" | tee -a "$OUT/search.log"
for m in 20 32; do
  start=$(date +%s)
  $PY -m rr_alloc search --budget 0.9 --config configs/cifar10_resnet$m.yaml --device cuda \
      --selection-size 256 --no-cache --out /tmp/rr_r$m/plan.json 2>&1 | grep -v "it/s" | tee -a "$OUT/search.log"
  end=$(date +%s)
  echo "resnet$m search --budget 0.9 on cuda: wall $((end - start)) s (includes data decoding)" | tee -a "$OUT/search.log"
  cp /tmp/rr_r$m/plan.json "$OUT/r${m}_plan.json"
done
