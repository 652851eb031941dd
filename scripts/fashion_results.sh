#!/usr/bin/env bash
# The README's Fashion-MNIST representation results, from the runs of fashion_probe_run.sh.
#   scripts/fashion_results.sh ar|nll|bert|finetune [more igpt flags, e.g. --flip --pad-crop 1]
# Probes use all 60,000 training images (10% of them choose the L2 strength) and the 10,000
# test images; LIMIT uses only the first LIMIT training images. THREADS limits the worker threads.
# RUN names another autoregressive run for `ar`, `nll` and `finetune` (charts
# docs/fashion-probe-<name>.png and docs/fashion-probe-vs-nll-<name>.png; fine-tuned model
# runs/fashion-ft<suffix>, runs/fashion-ar12k giving runs/fashion-ft12k). For `nll`, SNAPSHOTS
# lists the steps of RUN/history to probe (all of them unless given).
set -euo pipefail
cd "$(dirname "$0")/.."
IGPT=${IGPT:-target/release/igpt}
T=/usr/share/datasets/fashion-mnist
TRAIN=$T/train-images-idx3-ubyte.gz
TEST=$T/t10k-images-idx3-ubyte.gz
LIMIT=(${LIMIT:+--limit "$LIMIT"})
THREADS=(${THREADS:+--threads "$THREADS"})
RUN=${RUN:-runs/fashion-ar}
what=${1:-}
shift || true
case "$what" in
  ar)   $IGPT probe "${THREADS[@]}" --model "$RUN" --data $TRAIN "${LIMIT[@]}" --test-data $TEST \
          --layers all --concat --chart "docs/fashion-probe-${RUN##*/fashion-}.png" "$@" ;;
  bert) $IGPT probe "${THREADS[@]}" --model runs/fashion-bert --data $TRAIN "${LIMIT[@]}" --test-data $TEST \
          --layers all --concat --masks "${MASKS:-5}" --chart docs/fashion-probe-bert.png "$@" ;;
  nll)  if [ "$RUN" = runs/fashion-ar ]; then
          SNAPSHOTS=${SNAPSHOTS:-400 1200 2000 2800 4000 4800 6000}; CHART=docs/fashion-probe-vs-nll.png
        else
          CHART="docs/fashion-probe-vs-nll-${RUN##*/fashion-}.png"
        fi
        SNAPSHOTS=${SNAPSHOTS:-$(ls "$RUN/history" | sed 's/^step-//' | sort -n)}
        MODELS=()
        for s in $SNAPSHOTS; do MODELS+=(--model "$RUN/history/step-$s"); done
        $IGPT probe "${THREADS[@]}" "${MODELS[@]}" --data $TRAIN --limit 5000 \
          --test-data $TEST --test-limit 2000 --chart /tmp/fashion-nll-layers.png \
          --nll-chart "$CHART" "$@" ;;
  finetune) $IGPT finetune "${THREADS[@]}" --model "$RUN" --data $TRAIN "${LIMIT[@]}" --test-data $TEST \
          --steps "${STEPS:-750}" --batch "${BATCH:-64}" --eval-every "${EVAL_EVERY:-125}" --lr "${LR:-1e-5}" \
          --warmup "${WARMUP:-75}" --patience 3 --out "runs/fashion-ft${RUN##*/fashion-ar}" "$@" ;;
  *) echo "usage: $0 ar|nll|bert|finetune" >&2; exit 2 ;;
esac
