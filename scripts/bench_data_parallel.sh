#!/usr/bin/env bash
# Data-parallel training on one machine: 2 MPI ranks x 1 thread against 1 process x 2 threads,
# on the iGPT-tiny shape (8 layers, d=256, 8 heads) over the shipped Fashion-MNIST at 32x32
# (16 gray levels), batch 8 in passes of 4 either way. Alternates the two ROUNDS times (the
# host is shared and noisy) and prints, per round, the median tokens/s of the timed steps and
# the share of the step the ranks spent summing gradients (metrics.jsonl's comm_s).
#
#   cargo build --release --features mpi && scripts/bench_data_parallel.sh [ROUNDS] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
STEPS=${2:-12}
BIN=target/release/igpt
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
ARGS=(train --data fashion-mnist --limit 2000 --side 32 --preset tiny --batch 8 --micro-batch 4
      --steps "$STEPS" --eval-every 100000 --eval-images 8 --checkpoint-every 100000 --seed 1)

summary() {
  python3 - "$1" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
steps = [r for r in rows if "loss" in r][2:]  # the first two steps warm up
tps = statistics.median(r["tokens_per_s"] for r in steps)
share = statistics.mean(r.get("comm_s", 0.0) * r["tokens_per_s"] / 8192 for r in steps)
print(f"{tps:.0f} {share:.4f}")
EOF
}

echo "round  1x2 tokens/s  2x1 tokens/s  ratio  comm share (2x1)"
for r in $(seq 1 "$ROUNDS"); do
  rm -rf "$OUT/one" "$OUT/two"
  "$BIN" --threads 2 "${ARGS[@]}" --out "$OUT/one" > /dev/null
  mpirun --allow-run-as-root --oversubscribe --bind-to none -np 2 "$BIN" --threads 1 "${ARGS[@]}" \
    --out "$OUT/two" > /dev/null
  read -r one _ < <(summary "$OUT/one")
  read -r two share < <(summary "$OUT/two")
  python3 -c "print(f'{$r:>5}  {$one:>12}  {$two:>12}  {$two/$one:5.2f}  {100*$share:.2f}%')"
done
