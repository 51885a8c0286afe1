#!/usr/bin/env bash
# The exact commands that made Resources/Models/dadrn_demo.safetensors and its card dadrn_demo.json.
#
# Phantoms only (plus lesions painted into the small real scans of ../shared/data/real), CPU only,
# fixed seeds. Training runs as two single-threaded processes under torchrun (gloo): on a CPU shared
# with other work this keeps both cores busy without thread-synchronisation stalls.
# Usage: scripts/train_demo_model.sh [WORK_DIR]   (default runs/demo; needs about 12 GB of disk;
# about 3 hours on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-runs/demo}
REAL=${DADRN_REAL_DATA:-../shared/data/real}
BIN=$(dirname "$(command -v dadrn-lesion)")

# 1. Data: 860 phantoms in six seeded sets (each balanced over the five classes), and six rounds of
#    lesions of every class painted into each real scan; the scan ts_native_sm is held out (test
#    only). Two generators run at a time.
gen() { dadrn-lesion dataset phantoms --out "$WORK/data/p$1" --cases "$2" --seed "$1"; }
gen 11 140 & gen 12 140 & wait
gen 13 150 & gen 14 150 & wait
gen 15 150 & gen 16 150 & wait
dadrn-lesion dataset phantoms --out "$WORK/data/real" --cases 0 --seed 21 --real-background "$REAL" \
    --real-rounds 6 --real-holdout ts_native_sm

# 2. Slice caches at 128 x 128 (prepare_batch, uint8), built two at a time and merged.
PARTS="p11 p12 p13 p14 p15 p16 real"
set -- $PARTS
while [ $# -gt 0 ]; do
  for part in "$1" "${2:-}"; do
    [ -n "$part" ] && dadrn-lesion dataset cache --data "$WORK/data/$part/cases.csv" --cache "$WORK/cache/$part" --input-size 128 &
  done
  wait
  shift; [ $# -gt 0 ] && shift
done
dadrn-lesion dataset cache --merge $(for p in $PARTS; do echo "$WORK/cache/$p"; done) --cache "$WORK/cache/all" --input-size 128

# 3. Train DADRN-A (sigmoid, sum fusion; the better DADRN variant in docs/ablation.md) on DRN-D-22 at
#    width 0.25, in two stages on the same split (by case, seed 0; at most 12 normal slices per case
#    for training and validation; the test split is evaluated on every labelled slice and the
#    figures go into the card). Stage 1: 24 epochs of 2048 slices from a random initialisation.
#    Stage 2: 30 more epochs of 4096 slices from stage 1's best weights (--init-weights), with a
#    fresh warm-up and cosine schedule at a lower peak learning rate.
INTENDED="Demonstration of the DADRNLesion software only; trained on synthetic phantoms; not for diagnosis or any clinical use."
COMMON=(--cache "$WORK/cache/all" --input-size 128 --normal-per-case 12 --split-seed 0
        --model dadrn50-a --backbone drn_d_22 --width 0.25 --dropout 0.1 --batch-size 16 --weight-decay 0.05
        --device cpu --threads 1 --model-id dadrn-demo-phantom --intended-use "$INTENDED")
"$BIN/torchrun" --standalone --nproc_per_node=2 -m DADRNLesionLib train "${COMMON[@]}" \
    --epochs 24 --samples-per-epoch 2048 --patience 8 --seed 0 --out "$WORK/stage1"
"$BIN/torchrun" --standalone --nproc_per_node=2 -m DADRNLesionLib train "${COMMON[@]}" \
    --epochs 30 --samples-per-epoch 4096 --lr 0.0015 --patience 10 --seed 1 \
    --init-weights "$WORK/stage1/best.safetensors" --out "$WORK/train"

# 4. Ship the best epoch's weights with their card (the card's sha256 covers the weights).
cp "$WORK/train/best.safetensors" Resources/Models/dadrn_demo.safetensors
cp "$WORK/train/best.json" Resources/Models/dadrn_demo.json
echo "test figures: $WORK/train/test/report.txt"
