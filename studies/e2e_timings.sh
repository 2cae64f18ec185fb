#!/usr/bin/env bash
# End-to-end wall times of the main job on this machine (writes studies/results/e2e/timings.md).
#   bash studies/e2e_timings.sh          (needs RR_ALLOC_SHARED for the CIFAR runs)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=studies/results/e2e
mkdir -p "$OUT"
TMP=$(mktemp -d)
export RR_ALLOC_SHARED=${RR_ALLOC_SHARED:-../shared}
log="$TMP/timings.md"
echo "# End-to-end timings" > "$log"
echo "" >> "$log"
echo "Machine: $(nproc) cores, $(python -c 'import torch; print("torch", torch.__version__, torch.get_num_threads(), "threads")'); $(date -u +%F)." >> "$log"
echo "" >> "$log"
echo "| command | wall (s) | notes |" >> "$log"
echo "|---|---:|---|" >> "$log"
run() {  # run NAME NOTES CMD...
  local name=$1 notes=$2; shift 2
  local t0=$(date +%s.%N)
  "$@" > "$TMP/$name.log" 2>&1
  local t1=$(date +%s.%N)
  printf '| `%s` | %.1f | %s |\n' "${*#python -m }" "$(python -c "print($t1 - $t0)")" "$notes" >> "$log"
}
# embedded default on a fresh cache: the RR profile is computed (the digits weights ship in the package)
RR_ALLOC_CACHE=$TMP/cache run default "fresh cache: computes the RR profile" \
  python -m rr_alloc search --budget 0.9 --out "$TMP/d/plan.json"
RR_ALLOC_CACHE=$TMP/cache run default2 "second run (profile cached)" \
  python -m rr_alloc search --budget 0.9 --out "$TMP/d2/plan.json"
RR_ALLOC_CACHE=$TMP/cache run r32 "ResNet-32, default allocator (global) with the rr-greedy plan verified beside it on 10,000 test images; profile not cached" \
  python -m rr_alloc search --budget 0.9 --config configs/cifar10_resnet32.yaml --out "$TMP/r32/plan.json"
RR_ALLOC_CACHE=$TMP/cache run r32b "same at another budget: profile from cache" \
  python -m rr_alloc search --budget 0.95 --config configs/cifar10_resnet32.yaml --out "$TMP/r32b/plan.json"
RR_ALLOC_CACHE=$TMP/cache run opt30 "ResNet-20, Optuna 30 trials (selection split), new SQLite study" \
  python -m rr_alloc search --budget 0.9 --config configs/cifar10_resnet20.yaml --allocator optuna --n-trials 30 --out "$TMP/opt/plan.json"
RR_ALLOC_CACHE=$TMP/cache run opt10 "same storage, 10 more trials (resumes)" \
  python -m rr_alloc search --budget 0.9 --config configs/cifar10_resnet20.yaml --allocator optuna --n-trials 10 --out "$TMP/opt/plan.json"
echo "" >> "$log"
echo "Optuna study after both runs:" >> "$log"
grep "optuna study" "$TMP/opt10.log" | sed 's/^/    /' >> "$log"
for n in default r32 opt10; do
  echo "" >> "$log"; echo "Output of \`$n\` (tail):" >> "$log"; echo '```' >> "$log"
  grep -v "it/s" "$TMP/$n.log" | tail -12 >> "$log"; echo '```' >> "$log"
done
cp "$log" "$OUT/timings.md"
cat "$OUT/timings.md"
