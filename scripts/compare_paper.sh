#!/usr/bin/env bash
# Reproduce the comparison tables of docs/comparison.md on phantoms (the paper's tables 1-3).
#
#   scripts/compare_paper.sh            # CPU size: width 0.25, 96x96 input, 5 epochs x 192 slices (about 50 min on 2 cores)
#   scripts/compare_paper.sh full       # the paper's size: width 1, 224x224 input, 30 epochs (needs a GPU)
#
# Steps: two phantom sets of CASES cases each (seeds 2019 and 2020) -> one slice cache -> every method on
# patient-level split seeds 0 and 1, the two splits run as two processes at once -> OUT/tables.md.
# Finished runs are reused, so the script can be stopped and started again. Environment overrides:
# OUT, PY, CASES, EPOCHS, SAMPLES, BATCH, PATIENCE, WIDTH, SIZE, DEVICE, THREADS, METHODS, CACHE, TIME_LIMIT (s).
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=${1:-small}
PY=${PY:-.venv/bin/python}
export PYTHONPATH="$PWD/DADRNLesion${PYTHONPATH:+:$PYTHONPATH}"
CASES=${CASES:-30}
case "$MODE" in
  small)
    OUT=${OUT:-runs/compare/cpu96}; SIZE=${SIZE:-96}; WIDTH=${WIDTH:-0.25}; EPOCHS=${EPOCHS:-5}; SAMPLES=${SAMPLES:-192}
    BATCH=${BATCH:-16}; PATIENCE=${PATIENCE:-0}; DEVICE=${DEVICE:-cpu}; THREADS=${THREADS:-1} ;;
  full)
    OUT=${OUT:-runs/compare/full224}; SIZE=${SIZE:-224}; WIDTH=${WIDTH:-1}; EPOCHS=${EPOCHS:-30}; SAMPLES=${SAMPLES:-}
    BATCH=${BATCH:-32}; PATIENCE=${PATIENCE:-8}; DEVICE=${DEVICE:-cuda}; THREADS=${THREADS:-} ;;
  *) echo "usage: $0 [small|full]" >&2; exit 2 ;;
esac
METHODS=${METHODS:-drn50 seresnet50 raresnet50 sadrn50-a cadrn50-a dadrn50-a dadrn50-b roi}
DATA=runs/compare
CACHE=${CACHE:-$DATA/cache$SIZE}
mkdir -p "$OUT" "$DATA"

lesion() { "$PY" -m DADRNLesionLib "$@"; }

if [ ! -f "$CACHE/cache.json" ]; then
  for seed in 2019 2020; do
    [ -f "$DATA/phantoms_s$seed/cases.csv" ] ||
      lesion dataset phantoms --out "$DATA/phantoms_s$seed" --cases "$CASES" --seed "$seed" --quiet &
  done
  wait
  lesion dataset cache --data "$DATA/phantoms_s2019/cases.csv" "$DATA/phantoms_s2020/cases.csv" \
    --cache "$CACHE" --input-size "$SIZE" --normal-per-case 4 --quiet
fi

args=(compare --cache "$CACHE" --input-size "$SIZE" --out "$OUT" --methods $METHODS --width "$WIDTH"
      --epochs "$EPOCHS" --batch-size "$BATCH" --patience "$PATIENCE" --device "$DEVICE")
[ -n "$SAMPLES" ] && args+=(--samples-per-epoch "$SAMPLES")
[ -n "$THREADS" ] && args+=(--threads "$THREADS")
limit=()
[ -n "${TIME_LIMIT:-}" ] && limit=(timeout "$TIME_LIMIT")

pids=()
for split in 0 1; do
  "${limit[@]}" "$PY" -m DADRNLesionLib "${args[@]}" --split-seeds "$split" > "$OUT/split$split.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
[ "$status" -eq 0 ] || echo "a comparison process ended with status $status (see $OUT/split*.log); tabulating what finished" >&2

lesion compare --out "$OUT" --tables-only --quiet
echo "tables: $OUT/tables.md"
exit "$status"
