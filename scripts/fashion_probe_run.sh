#!/usr/bin/env bash
# Trains the autoregressive model behind the README's Fashion-MNIST probe results, keeping a
# snapshot (an igpt run directory) every CHUNK steps for the probe-against-NLL chart.
#   scripts/fashion_probe_run.sh [RUN_DIR] [STEPS] [CHUNK]
# OBJECTIVE=bert trains the masked-objective model of the same size and budget.
# Needs the full Fashion-MNIST: apt-get install dataset-fashion-mnist
set -euo pipefail
cd "$(dirname "$0")/.."
IGPT=${IGPT:-target/release/igpt}
RUN=${1:-runs/fashion-ar}
STEPS=${2:-2000}
CHUNK=${3:-400}
DATA=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
$IGPT train --data "$DATA" --objective "${OBJECTIVE:-autoregressive}" --side 14 --layers 6 --embd 128 --heads 4 --batch 32 \
  --steps "$STEPS" --warmup 200 --lr 0.002 --eval-every "$CHUNK" --eval-images 2000 \
  --checkpoint-every "$CHUNK" --out "$RUN" --stop-after "$CHUNK"
done_steps=$CHUNK
while true; do
  mkdir -p "$RUN/history/step-$done_steps"
  cp "$RUN/config.json" "$RUN/palette.json" "$RUN/model.safetensors" "$RUN/history/step-$done_steps/"
  [ "$done_steps" -ge "$STEPS" ] && break
  $IGPT train --resume "$RUN" --stop-after "$CHUNK"
  done_steps=$((done_steps + CHUNK))
done
