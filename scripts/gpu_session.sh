#!/usr/bin/env bash
# One lent-GPU session in one command: (1) the benchmark of the full DADRN50 and the demo model
# (throughput, Grad-CAM ratios, end to end, CUDA memory) and (2) a demo model trained on the GPU
# from phantoms generated on the spot, within a fixed deadline. Figures and weights land in $OUT.
#
# Environment: OUT (results), BUDGET_S (wall seconds for everything, default 540), PROCS (parallel
# phantom generators, default: CPU count), CASES_PER_PROC (default 60), DATA_S (instead: each
# generator makes sets of CHUNK phantoms, default 10, until DATA_S seconds have passed, so that the
# data fills the time a machine of unknown speed allows; a set starts only where one as long as the
# generator's last still ends in time), SEED0 (first phantom seed),
# SIZE / WIDTH / BATCH / LR (model input side, backbone width, batch, peak learning rate),
# DEVICE (default cuda), BENCH (0: skip part 1), TRAIN (0: skip part 2), REAL (a folder of real
# cases to paint lesions into, default .device-carry/real; empty: phantoms only), REAL_ROUNDS
# (lesion draws per real scan and class, default 6), REAL_SEED (their lesion draws, default SEED0,
# so that a fine-tuning session paints lesions its starting weights never saw), REAL_HOLDOUT (real
# scans kept for the test split, default ts_native_sm), INIT (weights to start from, e.g. the
# shipped model, with new SEED0 so that every test case is new to both runs; default: from
# scratch), LIVER_SOURCE (the liver mask the phantom slices are masked with: reference, the
# generator's own; automatic, the mask `classify` makes, so that the model learns the masks it
# meets in use; mixed, every other generator automatic; default reference; the cases painted into
# real scans take the automatic mask unless it is reference), GROW (1: the generators go on while
# the model trains and their sets join its training split between epochs, `train --grow-from`; the
# run starts on the sets finished after START_S seconds, default 60, and at least START_SETS of
# them, default PROCS, with the real cases, which also give the validation and test splits; the generators stop starting sets that would end after
# the training; default PROCS there: CPU count - 2, leaving cores to the training process),
# GROW_CLASSES (with GROW: the classes of every set after each generator's first, e.g. "hcc hcc fnh"
# for two HCC phantoms to each FNH, `--phantom-classes`; those sets join the training split only, so
# the validation and test splits, made of the first sets and the real cases, keep all five classes;
# default: all five classes in every set), LOCALISATION_LOSS (the weight of `train --localisation-loss`,
# the loss that pulls the true class's heatmap into the lesion outline; default 0: off), UNENHANCED (the
# share of each phantom set's normal and cyst cases made without contrast, `--phantom-unenhanced`;
# default 0).
# SimpleITK, slicerio and
# pynrrd come from .device-carry/site.tar.xz or the wheels in .whl/ (scripts/device_site.sh; pack
# with scripts/pack_device_carry.sh).
set -uo pipefail
T0=$(date +%s)
OUT=${OUT:-/tmp/gpu-session}
BUDGET_S=${BUDGET_S:-540}
GROW=${GROW:-0}
START_S=${START_S:-60}
if [ "$GROW" = 1 ]; then PROCS=${PROCS:-$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))}; else PROCS=${PROCS:-$(nproc)}; fi
CASES_PER_PROC=${CASES_PER_PROC:-60}
SEED0=${SEED0:-101}
SIZE=${SIZE:-224}
WIDTH=${WIDTH:-0.5}
BATCH=${BATCH:-128}
LR=${LR:-0.003}
DEVICE=${DEVICE:-cuda}
BENCH=${BENCH:-1}
TRAIN=${TRAIN:-1}
REAL=${REAL-.device-carry/real}
REAL_ROUNDS=${REAL_ROUNDS:-6}
REAL_SEED=${REAL_SEED:-$SEED0}
REAL_HOLDOUT=${REAL_HOLDOUT:-ts_native_sm}
INIT=${INIT:-}
GROW_CLASSES=$([ "$GROW" = 1 ] && echo "${GROW_CLASSES:-}" || true)
LIVER_SOURCE=${LIVER_SOURCE:-reference}
LOCALISATION_LOSS=${LOCALISATION_LOSS:-0}
UNENHANCED=${UNENHANCED:-0}
WORK=${WORK:-/tmp/gpu-work}
mkdir -p "$OUT" "$WORK/logs"
rm -f "$WORK/stop_generators"
left() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }
# The session log also goes straight into OUT: a call cut off at its time limit still brings back
# how far it got, even when its printed output was piped through tail and so never came.
SESSION_LOGS=("$WORK/logs/session.txt" "$OUT/session.txt")
log() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "${SESSION_LOGS[@]}"; }

source scripts/device_site.sh || exit 1
DADRN=(python3 -m DADRNLesionLib)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python3 -c "import torch,sys,os; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cpus', os.cpu_count(), 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
} | tee "$WORK/logs/machine.txt"

# 1. Benchmark: both models, naive CAM, end to end on a 512x512x100 study with the phantom's liver
#    mask, then the same study with the automatic liver mask; automatic batch size.
if [ "$BENCH" = 1 ]; then
  log "benchmark"
  timeout 200 python3 -m DADRNLesionLib.bench --models dadrn50 demo --device "$DEVICE" --min-time 2 --slices 100 \
      --json "$WORK/logs/bench_gpu.json" 2>&1 | tee "$WORK/logs/bench_gpu.txt"
  timeout 100 python3 -m DADRNLesionLib.bench --models dadrn50 --device "$DEVICE" --no-naive --min-time 1 --slices 100 \
      --auto-liver --json "$WORK/logs/bench_gpu_auto_liver.json" 2>&1 | tee "$WORK/logs/bench_gpu_auto_liver.txt"
  cp "$WORK"/logs/bench_gpu*.json "$OUT/" 2>/dev/null  # back even if a later part runs out of time
  timeout 90 python3 -m pytest -q -p no:cacheprovider Testing/test_gpu.py 2>&1 | tail -3
fi
if [ "$TRAIN" != 1 ]; then log "done"; exit 0; fi

# 2. Training data: PROCS generators of CASES_PER_PROC phantoms each, or of sets of CHUNK until
#    DATA_S has passed (each set its own seed), sliced into a cache
#    at SIZE in memory (no NIfTI written and read back: 1.6x the cases per second, same slices as
#    `dataset phantoms` + `dataset cache --data`), then one merged cache.
# One thread per generator: PROCS processes with torch's default of one thread per core each
# would oversubscribe the cores PROCS times over (on 2 cores, 2 generators: 8-15 % faster so).
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
# With GROW the sets are written into stream/, which training watches; else into cache/.
SET_DIR=$([ "$GROW" = 1 ] && echo "$WORK/stream" || echo "$WORK/cache")
RESERVE_S=$([ -n "$INIT" ] && echo 90 || echo 60)  # after training: the test evaluation and packing
phantom_set() {  # seed cases liver-source [class ...]; a set of chosen classes is named c<seed>, not p<seed>,
  # so that the start of a GROW run, which takes the p sets, never takes one into its validation split
  local seed=$1 cases=$2 source=$3 name=p$1 classes=()
  shift 3
  if [ $# -gt 0 ]; then name=c$seed; classes=(--phantom-classes "$@"); fi
  "${DADRN[@]}" dataset cache --phantoms "$cases" --phantom-seed "$seed" ${classes[@]+"${classes[@]}"} --phantom-unenhanced "$UNENHANCED" \
      --cache "$SET_DIR/$name" \
      --liver-source "$source" --input-size "$SIZE" --quiet >>"$WORK/logs/data_p$seed.txt" 2>&1
}
liver_source_of() {  # generator index
  case "$LIVER_SOURCE" in mixed) [ $(($1 % 2)) = 1 ] && echo automatic || echo reference ;; *) echo "$LIVER_SOURCE" ;; esac
}
if [ "$GROW" = 1 ]; then
  CHUNK=${CHUNK:-10}
  DATA_END=$(( T0 + BUDGET_S - RESERVE_S - 15 ))  # the training's end, less the last epoch or so
  DATA_S=$(( DATA_END - $(date +%s) ))
  [ "$DATA_S" -ge 1 ] || DATA_S=1  # a budget this short still gets one set per generator to start on
fi
if [ -n "${DATA_S:-}" ]; then
  CHUNK=${CHUNK:-10}
  DATA_END=$(( $(date +%s) + DATA_S ))
  log "phantoms: $PROCS generators, sets of $CHUNK cases (seeds $SEED0, $SEED0 + 1, ...) for $DATA_S s, liver masks: $LIVER_SOURCE${GROW_CLASSES:+; sets after the first of each generator: $GROW_CLASSES}; unenhanced share of normal and cyst cases: $UNENHANCED"
  for i in $(seq 0 $((PROCS - 1))); do
    # A set starts only if one as long as this generator's last still ends by the deadline (a set of
    # ten with automatic masks takes over a minute: checking the start alone overran DATA_S by 73 s).
    ( r=0; last=0; while [ $(( $(date +%s) + last )) -le "$DATA_END" ] && [ ! -f "$WORK/stop_generators" ]; do
        t=$(date +%s); set_classes=$([ "$r" -gt 0 ] && echo "$GROW_CLASSES" || true)
        # shellcheck disable=SC2086  # the classes are words
        phantom_set $((SEED0 + i + PROCS * r)) "$CHUNK" "$(liver_source_of $i)" $set_classes; last=$(( $(date +%s) - t )); r=$((r + 1))
      done ) &
  done
else
  log "phantoms: $PROCS x $CASES_PER_PROC cases, liver masks: $LIVER_SOURCE"
  for i in $(seq 0 $((PROCS - 1))); do phantom_set $((SEED0 + i)) "$CASES_PER_PROC" "$(liver_source_of $i)" & done
fi
# The real scans with lesions painted in (their own patients for the split; REAL_HOLDOUT's cases
# go to the test split only), generated beside the phantoms; a warm machine's previous cache
# already holds draws of them, which this run keeps rather than spending its time on more.
if [ -n "$REAL" ] && [ -d "$REAL" ] && [ ! -f "$WORK/cache/all/cache.json" ]; then
  log "real backgrounds: $REAL, $REAL_ROUNDS rounds of seed $REAL_SEED, held out: $REAL_HOLDOUT"
  "${DADRN[@]}" dataset cache --phantoms 0 --phantom-seed "$REAL_SEED" --real-background "$REAL" --real-rounds "$REAL_ROUNDS" \
      --liver-source "$([ "$LIVER_SOURCE" = reference ] && echo reference || echo automatic)" \
      --real-holdout $REAL_HOLDOUT --cache "$WORK/cache/real" --input-size "$SIZE" --quiet >"$WORK/logs/data_real.txt" 2>&1 &
  REAL_PID=$!
fi
if [ "$GROW" = 1 ]; then
  # Start on what is there after START_S (and the real cases, which hold the held-out scan's test
  # cases): those sets move from stream/ into cache/; the generators go on writing into stream/.
  sleep "$(( START_S > 0 ? START_S : 0 ))"
  [ -n "${REAL_PID:-}" ] && wait "$REAL_PID"
  # ... and at least START_SETS sets (default: one per generator, so both liver masks of `mixed`;
  # with GROW_CLASSES no more than one per generator, the only sets of all five classes).
  START_SETS=${START_SETS:-$PROCS}
  [ -n "$GROW_CLASSES" ] && [ "$START_SETS" -gt "$PROCS" ] && START_SETS=$PROCS
  finished() { ls "$SET_DIR"/p*/cache.json 2>/dev/null | wc -l; }
  until [ "$(finished)" -ge "$START_SETS" ] || [ "$(left)" -le "$RESERVE_S" ]; do sleep 2; done
  mkdir -p "$WORK/cache"
  for d in "$SET_DIR"/p[0-9]*; do [ -f "$d/cache.json" ] && mv "$d" "$WORK/cache/"; done
else
  wait
fi
parts=()
for d in "$WORK"/cache/p[0-9]*; do [ -f "$d/cache.json" ] && parts+=("$d"); done
START_SEEDS=$(for d in "${parts[@]}"; do basename "$d"; done | sed 's/^p//')
log_seeds() {  # every phantom set finished: merged at the start, and (GROW) written into stream/ since
  local s
  s=$( { echo "$START_SEEDS"; for d in "$WORK"/stream/[pc][0-9]*; do [ -f "$d/cache.json" ] && basename "$d" | sed 's/^[pc]//'; done; } \
      | grep -v '^$' | sort -n)
  [ -n "$s" ] && log "phantom seeds used: $(echo "$s" | head -1)-$(echo "$s" | tail -1) ($(echo "$s" | wc -l) sets); the next session's SEED0 must lie above"
}
[ "$GROW" = 1 ] || log_seeds
[ -f "$WORK/cache/real/cache.json" ] && parts+=("$WORK/cache/real")
# A warm machine keeps the last run's merged cache: its cases join this run's.
[ -f "$WORK/cache/all/cache.json" ] && mv "$WORK/cache/all" "$WORK/cache/previous" && parts+=("$WORK/cache/previous")
log "caches ready: ${#parts[@]} (phantom generators: $PROCS)"
[ ${#parts[@]} -gt 0 ] || { tail -5 "$WORK"/logs/data_p*.txt; exit 1; }
unset OMP_NUM_THREADS MKL_NUM_THREADS OPENBLAS_NUM_THREADS
"${DADRN[@]}" dataset cache --merge "${parts[@]}" --cache "$WORK/cache/all" --input-size "$SIZE" 2>&1 | tail -4 | tee -a "${SESSION_LOGS[@]}"
rm -rf "${parts[@]}"
# With GROW the generators go on beside the training: its CPU work (batch reads, resizes) gets the
# cores they leave. With torch's default of a thread per core beside them (14 generators on 16
# cores, the localisation loss on), an H200 run took 5.6 s a step, probably for that reason too.
[ "$GROW" = 1 ] && export OMP_NUM_THREADS=$(( $(nproc) - PROCS > 1 ? $(nproc) - PROCS : 1 ))

# 3. Train DADRN-A (sigmoid, sum fusion) on DRN-D-22 x WIDTH at SIZE px until the deadline (then the
#    decision rule is chosen on the validation split, --calibrate), keeping
#    60 s for the test evaluation and packing (90 s with INIT, whose weights are scored on the same
#    test split); the time limit fits the epochs and the schedule.
MINUTES=$(python3 -c "print(max(0.5, ($(left) - $RESERVE_S) / 60))")
GROW_FROM=$([ "$GROW" = 1 ] && echo "$SET_DIR" || true)
log "training for at most $MINUTES min${GROW_FROM:+, its training split growing from $GROW_FROM}"
SOURCES="synthetic phantoms"
grep -q '"real_background": "\|"real": "' "$WORK/cache/all/cache.json" 2>/dev/null && SOURCES="synthetic phantoms and on synthetic lesions painted into public CT scans"
INTENDED="Demonstration of the DADRNLesion software only; trained on $SOURCES; not for diagnosis or any clinical use."
"${DADRN[@]}" train --cache "$WORK/cache/all" --input-size "$SIZE" --normal-per-case 12 --split-seed 0 \
    --model dadrn50-a --backbone drn_d_22 --width "$WIDTH" --dropout 0.1 --batch-size "$BATCH" --lr "$LR" \
    --weight-decay 0.05 --epochs 200 --samples-per-epoch $((BATCH * 64)) --patience 0 --seed 0 \
    --time-limit "$MINUTES" --calibrate --localisation-loss "$LOCALISATION_LOSS" --device "$DEVICE" --model-id dadrn-demo-phantom --intended-use "$INTENDED" \
    ${INIT:+--init-weights "$INIT"} ${GROW_FROM:+--grow-from "$GROW_FROM"} --out "$WORK/train" --overwrite >"$WORK/logs/train.txt" 2>&1
TRAIN_RC=$?
log "training exit $TRAIN_RC"
if [ "$GROW" = 1 ]; then
  # Generators still at work make data nobody will train on: stop them, then name every set made.
  touch "$WORK/stop_generators"  # no generator starts another set; the sets under way are stopped
  command -v pkill >/dev/null && for pid in $(jobs -p); do pkill -P "$pid" 2>/dev/null; done
  wait 2>/dev/null
  rm -f "$WORK/stop_generators"
  log_seeds
  grep -E "new caches|left out" "$WORK/logs/train.txt" | tail -3
fi
grep -E "^epoch " "$WORK/logs/train.txt" | tail -4; tail -22 "$WORK/logs/train.txt"
# The starting weights on the same test split: whether this run improved on them.
if [ -n "$INIT" ] && [ -f "$WORK/train/split.csv" ]; then
  log "starting weights on the same test split"
  timeout 60 "${DADRN[@]}" evaluate --weights "$INIT" --cache "$WORK/cache/all" --split-file "$WORK/train/split.csv" \
      --split test --device "$DEVICE" --out "$WORK/train/test_init" --quiet 2>&1 | tail -5
  head -24 "$WORK/train/test_init/report.txt" 2>/dev/null
  # Slice by slice, with paired intervals: whether the difference is more than the test set's noise.
  "${DADRN[@]}" compare-evaluations "$WORK/train/test_init" "$WORK/train/test" --names start trained \
      --out "$WORK/train/compare" --quiet >"$WORK/logs/compare.txt" 2>&1
  head -20 "$WORK/logs/compare.txt"
fi

# 4. Back: weights and card as files, everything else in one archive.
cp "$WORK/train/best.safetensors" "$WORK/train/best.json" "$OUT/" 2>/dev/null
tar -czf "$OUT/results.tgz" -C "$WORK" logs $(cd "$WORK" && ls -d train/metrics.csv train/curves.png train/summary.json \
    train/split.csv train/train_config.json train/test train/test_init train/compare 2>/dev/null)
log "done"
exit "$TRAIN_RC"  # a session whose training failed brings nothing worth keeping: say so
