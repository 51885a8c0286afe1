#!/usr/bin/env bash
# The exact commands that made Resources/Models/dadrn_demo.safetensors and its card dadrn_demo.json.
#
# Phantoms only (plus lesions painted into the small real scans of ../shared/data/real), CPU only,
# fixed seeds. Training runs as two single-threaded processes under torchrun (gloo): on a CPU shared
# with other work this keeps both cores busy without thread-synchronisation stalls.
# Usage: scripts/train_demo_model.sh [WORK_DIR]   (default runs/demo; needs about 2 GB of disk)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-runs/demo}
REAL=${DADRN_REAL_DATA:-../shared/data/real}
BIN=$(dirname "$(command -v dadrn-lesion)")

# 1. Data: 280 phantoms in two seeded sets of 140 (each balanced over the five classes), and six
#    rounds of lesions of every class painted into each real scan; the scan ts_native_sm is held
#    out (test only). Two generators run at a time.
gen() { dadrn-lesion dataset phantoms --out "$WORK/data/p$1" --cases "$2" --seed "$1"; }
gen 11 140 & gen 12 140 & wait
dadrn-lesion dataset phantoms --out "$WORK/data/real" --cases 0 --seed 21 --real-background "$REAL" \
    --real-rounds 6 --real-holdout ts_native_sm

# 2. Slice caches at 128 x 128 (prepare_batch, uint8), built two at a time and merged.
PARTS="p11 p12 real"
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
#    width 0.25. Split by case with seed 0; train and validate on at most 12 normal slices per case;
#    the test split is evaluated on every labelled slice and the figures go into the card.
"$BIN/torchrun" --standalone --nproc_per_node=2 -m DADRNLesionLib train \
    --cache "$WORK/cache/all" --input-size 128 --normal-per-case 12 --split-seed 0 \
    --model dadrn50-a --backbone drn_d_22 --width 0.25 \
    --epochs 20 --samples-per-epoch 2048 --batch-size 16 --weight-decay 0.0001 --patience 6 --seed 0 \
    --device cpu --threads 1 --out "$WORK/train" --model-id dadrn-demo-phantom \
    --intended-use "Demonstration of the DADRNLesion software only; trained on synthetic phantoms; not for diagnosis or any clinical use."

# 4. Ship the best epoch's weights with their card (the card's sha256 covers the weights).
cp "$WORK/train/best.safetensors" Resources/Models/dadrn_demo.safetensors
cp "$WORK/train/best.json" Resources/Models/dadrn_demo.json
echo "test figures: $WORK/train/test/report.txt"
