#!/usr/bin/env bash
# The GPU check: the one script run on a lent GPU machine (one H200, CUDA 13 driver, PyTorch,
# no Rust, no network). It runs igpt's CUDA selftest and its benchmarks against PyTorch on the
# same GPU, each step with its own log and time limit, and gathers the results.
#
# Build here (the GPU machine has no Rust), into gpu/, which git ignores and the run carries:
#   cargo build --release && mkdir -p gpu && cp target/release/igpt gpu/
# Run there, from the repository root:
#   scripts/gpu_check.sh OUT_DIR
#
# Writes to OUT_DIR: one log per step (nvidia-smi.log, libraries.log, selftest.log,
# same-bits.log, train.log, train-large.log, generate.log, gemm.log), the JSON each step
# writes (selftest.json, train.json with a per-kernel profile of the step, train-large.json,
# generate.json, gemm.json) and
# summary.json: every step's exit code, time and JSON. Prints a short table last. A failing step
# does not stop the next ones; the exit code is 0 only if every step succeeded.
#
# The limits add up to 525 s, so one device call of 10 minutes always comes back.
# Overrides, for tests: IGPT_BIN (the binary), NVIDIA_SMI, PYTHON.
set -u

if [ $# -ne 1 ]; then
    echo "usage: scripts/gpu_check.sh OUT_DIR" >&2
    exit 2
fi
out=$1
repo=$(cd "$(dirname "$0")/.." && pwd)
igpt=${IGPT_BIN:-$repo/gpu/igpt}
smi=${NVIDIA_SMI:-nvidia-smi}
python=${PYTHON:-python3}
mkdir -p "$out" || exit 2
# One line per step: name, exit code, seconds, log, JSON file (or "-"). Kept outside OUT_DIR,
# whose files are what comes back.
steps=$(mktemp) || exit 2
trap 'rm -f "$steps"' EXIT

# step NAME LIMIT_S JSON_FILE_OR_- COMMAND...: runs COMMAND under `timeout` with its output in
# OUT_DIR/NAME.log and records how it ended (124: out of time).
step() {
    local name=$1 limit=$2 json=$3
    shift 3
    local start=$SECONDS
    echo "== $name (limit ${limit} s)"
    timeout -k 5 "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$name.log" "$json" >>"$steps"
    echo "   exit code $rc after $((SECONDS - start)) s"
}

step nvidia-smi 20 - "$smi" --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,temperature.gpu --format=csv

# The CUDA libraries of the pip packages (nvidia-cublas and the rest) and torch's own are not on
# the default library path, and igpt opens them by name at run time.
start=$SECONDS
echo "== libraries (limit 30 s)"
libs=$(timeout -k 5 30 "$python" - 2>"$out/libraries.log" <<'PY'
import glob, os, site, sys

roots = list(site.getsitepackages()) + [site.getusersitepackages()] + sys.path
dirs = []
for root in roots:
    for d in sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib"))):
        if d not in dirs:
            dirs.append(d)
try:
    import torch

    dirs.append(os.path.join(os.path.dirname(torch.__file__), "lib"))
except Exception as e:  # The benchmarks will say more; igpt may still find its libraries.
    print(f"torch: {e}", file=sys.stderr)
for d in dirs:
    print(d, *sorted(os.path.basename(f) for f in glob.glob(os.path.join(d, "libcublas*"))), file=sys.stderr)
if not dirs:
    sys.exit("no site-packages/nvidia/*/lib folder found")
print(":".join(dirs))
PY
)
rc=$?
if [ $rc -eq 0 ] && [ -n "$libs" ]; then
    export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" >>"$out/libraries.log"
else
    [ $rc -eq 0 ] && rc=1
fi
printf '%s\t%s\t%s\t%s\t%s\n' libraries "$rc" "$((SECONDS - start))" libraries.log - >>"$steps"
echo "   exit code $rc after $((SECONDS - start)) s"

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
# iGPT-L's shape (1.36 B parameters), igpt alone: PyTorch would spend the limit compiling.
step train-large 60 train-large.json "$igpt" --device cuda bench train --shape large --batch 8 \
    --warmup 2 --steps 3 --precision bf16 --no-torch --json "$out/train-large.json"
step generate 120 generate.json "$igpt" --device cuda bench generate --shape small --batches 1 64 \
    --python "$python" --json "$out/generate.json"
# iGPT-S's products from f32 and from bf16 operands, in PyTorch: what bf16 activations would buy.
step gemm 25 gemm.json "$python" "$repo/scripts/gemm_precision.py" --json "$out/gemm.json"

# summary.json, in shell alone (the machine's Python may be what broke). igpt writes its JSON
# whole or not at all (a rename), so a file that exists is embedded as it is.
failed=0
{
    echo "{"
    echo "  \"steps\": ["
    sep=""
    while IFS=$'\t' read -r name rc secs log json; do
        [ "$rc" -ne 0 ] && failed=1
        printf '%s    {"step": "%s", "exit_code": %s, "timed_out": %s, "seconds": %s, "log": "%s", "json": ' \
            "$sep" "$name" "$rc" "$([ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && echo true || echo false)" "$secs" "$log"
        if [ "$json" != - ] && [ -s "$out/$json" ]; then
            cat "$out/$json"
        else
            printf 'null'
        fi
        printf '}'
        sep=$',\n'
    done <"$steps"
    echo
    echo "  ],"
    echo "  \"ok\": $([ $failed -eq 0 ] && echo true || echo false)"
    echo "}"
} >"$out/summary.json"

# The headline numbers, where Python can read them (best effort: the summary has them all).
"$python" - "$out/summary.json" <<'PY' 2>/dev/null
import json, sys

for s in json.load(open(sys.argv[1]))["steps"]:
    if s["step"] not in ("train", "train-large", "generate") or not isinstance(s["json"], dict):
        continue
    for r in s["json"].get("runs", []):
        if "error" in r or "tokens_per_s" not in r:
            print(f"{s['step']:<11} {r['impl']:<16} failed")
            continue
        mfu = f"MFU {100 * r['mfu']:5.1f}%" if r.get("mfu") is not None else ""
        mem = f"{r['memory_bytes'] / 1e9:6.2f} GB" if r.get("memory_bytes") else ""
        batch = f"batch {r['batch']:>3}" if "batch" in r else ""
        print(f"{s['step']:<11} {r['impl']:<16} {batch:<9} {r['tokens_per_s']:>10.0f} tokens/s  {mfu}  {mem}")
PY

echo
printf '%-12s %9s %8s\n' step "exit code" seconds
while IFS=$'\t' read -r name rc secs log json; do
    printf '%-12s %9s %8s%s\n' "$name" "$rc" "$secs" "$([ "$rc" -eq 124 ] && echo '  (out of time)')"
done <"$steps"
if [ $failed -eq 0 ]; then
    echo "all steps passed; summary in $out/summary.json"
else
    echo "SOME STEPS FAILED; summary in $out/summary.json"
fi
exit $failed
