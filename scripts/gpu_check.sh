#!/usr/bin/env bash
# The GPU check: the one script run on a lent GPU machine (one H200, CUDA 13 driver, PyTorch,
# no Rust, no network). It runs igpt's CUDA selftest and its benchmarks against PyTorch on the
# same GPU, each step with its own log and time limit, and gathers the results.
#
# Build here (the GPU machine has no Rust), into gpu/, which git ignores and the run carries:
#   cargo build --release && mkdir -p gpu && cp target/release/igpt gpu/
# Optionally, a build of an earlier commit as gpu/igpt-before, to time the same training step
# and the same generation with both in this one call (ratios on one GPU at one time), for
# example the wmma flash kernels and the earlier decoding kernels before their rewrites:
#   git worktree add /tmp/before 0f24546 && (cd /tmp/before && cargo build --release) &&
#   cp /tmp/before/target/release/igpt gpu/igpt-before
# Run there, from the repository root:
#   scripts/gpu_check.sh OUT_DIR
#
# Writes to OUT_DIR: one log per step (nvidia-smi.log, libraries.log, selftest.log,
# same-bits.log, train.log, train-before.log where gpu/igpt-before exists, train-large.log,
# generate.log, generate-before.log with gpu/igpt-before, gemm.log), the JSON each step writes
# (selftest.json, train.json with a per-kernel profile of the step, train-before.json,
# train-large.json, generate.json, generate-before.json, gemm.json) and
# summary.json: every step's exit code, time and JSON. Prints a short table last. A failing step
# does not stop the next ones; the exit code is 0 only if every step succeeded.
#
# The limits add up to 500 s, 535 s with the earlier build, so one device call of 10 minutes
# comes back even if every step is killed 5 s after its limit, with 15 s left for the summary.
# Overrides, for tests: IGPT_BIN (the binary), IGPT_BEFORE (the earlier build), NVIDIA_SMI,
# PYTHON.
set -u

if [ $# -ne 1 ]; then
    echo "usage: scripts/gpu_check.sh OUT_DIR" >&2
    exit 2
fi
out=$1
repo=$(cd "$(dirname "$0")/.." && pwd)
igpt=${IGPT_BIN:-$repo/gpu/igpt}
before=${IGPT_BEFORE:-$repo/gpu/igpt-before}
smi=${NVIDIA_SMI:-nvidia-smi}
python=${PYTHON:-python3}
mkdir -p "$out" || exit 2
. "$repo/scripts/gpu_steps.sh"

step nvidia-smi 10 - "$smi" --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,temperature.gpu --format=csv

find_cuda_libraries

if [ ! -x "$igpt" ]; then
    echo "no igpt binary at $igpt: build it here first (see the top of this script)" >&2
fi
step selftest 60 selftest.json "$igpt" --device cuda selftest --json "$out/selftest.json"

# Training twice gives the same bits (no kernel adds floats with atomics, and cuBLAS is
# reproducible on one GPU): a small bf16 model (flash attention, heads of 32), six steps, both
# checkpoints compared byte for byte.
same_bits() {
    local dir rc=0 run
    dir=$(mktemp -d) || return 2
    for run in a b; do
        "$igpt" --device cuda train --data "$repo/data/fashion-mnist/t10k-images-idx3-ubyte.gz" \
            --limit 512 --side 16 --palette-size 64 --layers 4 --embd 128 --heads 4 --batch 16 \
            --steps 6 --checkpoint-every 6 --precision bf16 --out "$dir/$run" || { rc=$?; break; }
    done
    if [ $rc -eq 0 ]; then
        cmp "$dir/a/model.safetensors" "$dir/b/model.safetensors" &&
            cmp "$dir/a/trainer.safetensors" "$dir/b/trainer.safetensors"
        rc=$?
        [ $rc -eq 0 ] && echo "the two runs saved the same bytes"
    fi
    rm -rf "$dir"
    return $rc
}
export -f same_bits
export igpt repo
step same-bits 30 - bash -c same_bits
step train 180 train.json "$igpt" --device cuda bench train --shape small --batch 32 --precision bf16 \
    --profile --python "$python" --json "$out/train.json"
# The same step by the earlier build, igpt alone, with its profile: the ratio of the two
# igpt rows, and of their attention calls, is what the change between them bought.
if [ -x "$before" ]; then
    step train-before 20 train-before.json "$before" --device cuda bench train --shape small \
        --batch 32 --precision bf16 --profile --no-torch --json "$out/train-before.json"
fi
# iGPT-L's shape (1.36 B parameters), igpt alone: PyTorch would spend the limit compiling.
step train-large 55 train-large.json "$igpt" --device cuda bench train --shape large --batch 8 \
    --warmup 2 --steps 3 --precision bf16 --no-torch --json "$out/train-large.json"
step generate 120 generate.json "$igpt" --device cuda bench generate --shape small --batches 1 64 \
    --python "$python" --json "$out/generate.json"
# The same sampling by the earlier build, bf16, igpt alone: the ratio of the two igpt-bf16 rows
# at each batch is what the decoding changes between them bought.
if [ -x "$before" ]; then
    step generate-before 15 generate-before.json "$before" --device cuda bench generate \
        --shape small --batches 1 64 --precisions bf16 --no-python --json "$out/generate-before.json"
fi
# iGPT-S's products from f32 and from bf16 operands, in PyTorch: what bf16 operands buy.
step gemm 15 gemm.json "$python" "$repo/scripts/gemm_precision.py" --json "$out/gemm.json"

write_summary

# The headline numbers, where Python can read them (best effort: the summary has them all).
"$python" - "$out/summary.json" <<'PY' 2>/dev/null
import json, sys

for s in json.load(open(sys.argv[1]))["steps"]:
    if s["step"] not in ("train", "train-before", "train-large", "generate", "generate-before") or not isinstance(s["json"], dict):
        continue
    for r in s["json"].get("runs", []):
        if "error" in r or "tokens_per_s" not in r:
            print(f"{s['step']:<12} {r['impl']:<16} failed")
            continue
        mfu = f"MFU {100 * r['mfu']:5.1f}%" if r.get("mfu") is not None else ""
        mem = f"{r['memory_bytes'] / 1e9:6.2f} GB" if r.get("memory_bytes") else ""
        batch = f"batch {r['batch']:>3}" if "batch" in r else ""
        print(f"{s['step']:<12} {r['impl']:<16} {batch:<9} {r['tokens_per_s']:>10.0f} tokens/s  {mfu}  {mem}")
PY

print_steps
exit $failed
