#!/usr/bin/env bash
# The README's Fashion-MNIST representation results, from the runs of fashion_probe_run.sh.
#   scripts/fashion_results.sh ar|nll|bert|finetune
set -euo pipefail
cd "$(dirname "$0")/.."
IGPT=${IGPT:-target/release/igpt}
T=/usr/share/datasets/fashion-mnist
TRAIN=$T/train-images-idx3-ubyte.gz
TEST=$T/t10k-images-idx3-ubyte.gz
LIMIT=${LIMIT:-20000}
case "$1" in
  ar)   $IGPT probe --model runs/fashion-ar --data $TRAIN --limit $LIMIT --test-data $TEST \
          --layers all --concat --chart docs/fashion-probe-ar.png ;;
  bert) $IGPT probe --model runs/fashion-bert --data $TRAIN --limit $LIMIT --test-data $TEST \
          --layers all --concat --chart docs/fashion-probe-bert.png ;;
  nll)  $IGPT probe --model runs/fashion-ar/history/step-400 --model runs/fashion-ar/history/step-1200 \
          --model runs/fashion-ar/history/step-2000 --data $TRAIN --limit 5000 --test-data $TEST \
          --test-limit 2000 --chart /tmp/fashion-nll-layers.png --nll-chart docs/fashion-probe-vs-nll.png ;;
  finetune) $IGPT finetune --model runs/fashion-ar --data $TRAIN --limit $LIMIT --test-data $TEST \
          --steps "${STEPS:-300}" --batch 16 --eval-every 100 --lr 3e-4 --out runs/fashion-ft ;;
  *) echo "usage: $0 ar|nll|bert|finetune" >&2; exit 2 ;;
esac
