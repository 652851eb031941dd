#!/usr/bin/env bash
# Trains the models behind the README's Fashion-MNIST representation results, keeping a
# snapshot (an igpt run directory) every CHUNK steps for the probe-against-NLL chart.
#   scripts/fashion_probe_run.sh [RUN_DIR] [STEPS] [CHUNK]
# OBJECTIVE=bert trains the masked-objective model of the same size and budget. When RUN_DIR
# already holds a run, it is continued up to STEPS (the cosine schedule then re-spans all STEPS,
# a warm restart from where the shorter run ended). THREADS limits the worker threads.
# Needs the full Fashion-MNIST: apt-get install dataset-fashion-mnist
set -euo pipefail
cd "$(dirname "$0")/.."
IGPT=${IGPT:-target/release/igpt}
RUN=${1:-runs/fashion-ar}
STEPS=${2:-2000}
CHUNK=${3:-400}
THREADS=(${THREADS:+--threads "$THREADS"})
DATA=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
snapshot() {
  mkdir -p "$RUN/history/step-$1"
  cp "$RUN/config.json" "$RUN/palette.json" "$RUN/model.safetensors" "$RUN/history/step-$1/"
}
# A run killed mid-chunk resumes from its last checkpoint, which trims metrics.jsonl back to
# that step, so the step a snapshot is named after is re-read from the metrics after each chunk.
last_step() { grep -o '"step":[0-9]*' "$RUN/metrics.jsonl" | tail -1 | cut -d: -f2; }
if [ -f "$RUN/trainer.safetensors" ]; then
  done_steps=$(last_step)
else
  $IGPT train "${THREADS[@]}" --data "$DATA" --objective "${OBJECTIVE:-autoregressive}" --side 14 \
    --layers 6 --embd 128 --heads 4 --batch 32 --steps "$STEPS" --warmup 200 --lr 0.002 \
    --eval-every "$CHUNK" --eval-images 2000 --checkpoint-every "$CHUNK" --out "$RUN" --stop-after "$CHUNK"
  done_steps=$CHUNK
  snapshot "$done_steps"
fi
while [ "$done_steps" -lt "$STEPS" ]; do
  $IGPT train "${THREADS[@]}" --resume "$RUN" --steps "$STEPS" --stop-after "$CHUNK"
  done_steps=$(last_step)
  snapshot "$done_steps"
done
