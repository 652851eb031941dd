#!/usr/bin/env bash
# The second GPU call, for when the first (scripts/gpu_check.sh) left device time: what only a
# GPU's own tools can see. compute-sanitizer runs igpt's quick selftest (every kernel, the flash
# attention ones included) under memcheck (bad device memory accesses) and racecheck (shared
# memory hazards, which the host emulation in tests/cuda_host cannot see); ncu reads the
# hardware counters of igpt's own kernels (not cuBLAS's) at iGPT-S's shapes, so each can be
# placed against the GPU's ceilings.
#
# Build and carry as for gpu_check.sh; run from the repository root, after gpu_check.sh (whose
# `libraries` step finds the CUDA libraries: this script looks for them the same way):
#   scripts/gpu_inspect.sh OUT_DIR
#
# Writes to OUT_DIR: memcheck.log, racecheck.log, ncu.log, igpt.ncu-rep (ncu's report) and
# ncu.csv (one row per kernel launch and metric), kernels.txt (per kernel: launches, its share of igpt's own kernels'
# time, compute and memory throughput in percent of the GPU's peak), and summary.json as
# gpu_check.sh writes it.
# The limits add up to 240 s. Overrides, for tests: IGPT_BIN, PYTHON, SANITIZER, NCU.
set -u

if [ $# -ne 1 ]; then
    echo "usage: scripts/gpu_inspect.sh OUT_DIR" >&2
    exit 2
fi
out=$1
repo=$(cd "$(dirname "$0")/.." && pwd)
igpt=${IGPT_BIN:-$repo/gpu/igpt}
python=${PYTHON:-python3}
sanitizer=${SANITIZER:-compute-sanitizer}
ncu=${NCU:-ncu}
mkdir -p "$out" || exit 2
. "$repo/scripts/gpu_steps.sh"

find_cuda_libraries

# Both tools exit non-zero when they report an error (--error-exitcode).
step memcheck 70 - "$sanitizer" --tool memcheck --error-exitcode 9 \
    "$igpt" --device cuda selftest --quick
step racecheck 70 - "$sanitizer" --tool racecheck --racecheck-report hazard --error-exitcode 9 \
    "$igpt" --device cuda selftest --quick

# iGPT-S's kernels at batch 32, in a two-layer model (every kernel of a layer has iGPT-S's shape;
# the step has a twelfth of its launches): igpt's own kernels only (cuBLAS's names do not
# match), each replayed alone by ncu into a report, then the report's details as CSV with
# durations in nanoseconds (--print-units base), apart from igpt's and ncu's own output.
igpt_kernels='regex:^(flash|rmsnorm|embed|gelu|cross_entropy|adamw|sum_|add_column|round_bf16|pack_weight|fill)'
step ncu 90 - "$ncu" --clock-control none --section SpeedOfLight --kernel-name "$igpt_kernels" \
    --launch-count 150 --export "$out/igpt" --force-overwrite \
    "$igpt" --device cuda bench train --layers 2 --embd 512 --heads 8 --side 32 --vocab 512 \
    --batch 32 --warmup 1 --steps 1 --no-torch
step ncu-csv 10 - bash -c '"$0" --import "$1" --csv --page details --print-units base >"$2"' \
    "$ncu" "$out/igpt.ncu-rep" "$out/ncu.csv"

# Per kernel: launches, summed duration, and the mean of its compute and memory throughput
# (percent of peak), from ncu's CSV.
"$python" - "$out/ncu.csv" >"$out/kernels.txt" 2>&1 <<'PY'
import csv, sys
from collections import defaultdict

rows = [r for r in csv.reader(open(sys.argv[1])) if r]
start = next((i for i, r in enumerate(rows) if "Kernel Name" in r), None)
if start is None:
    sys.exit("no ncu table in " + sys.argv[1])
head = rows[start]
col = {name: head.index(name) for name in ("ID", "Kernel Name", "Metric Name", "Metric Value")}
per = defaultdict(lambda: defaultdict(dict))
for r in rows[start + 1 :]:
    if len(r) != len(head):  # a line of another kind (a warning, a program's output)
        continue
    try:
        value = float(r[col["Metric Value"]].replace(",", ""))
    except ValueError:
        continue
    per[r[col["Kernel Name"]]][r[col["ID"]]][r[col["Metric Name"]]] = value
total = sum(m.get("Duration", 0) for k in per.values() for m in k.values()) or 1
print(f"{'kernel':<40} {'launches':>8} {'time':>7} {'compute %':>9} {'memory %':>9}")
# time: the share of all these kernels' summed durations.
for name, launches in sorted(per.items(), key=lambda kv: -sum(m.get("Duration", 0) for m in kv[1].values())):
    t = sum(m.get("Duration", 0) for m in launches.values())
    mean = lambda key: sum(m.get(key, 0) for m in launches.values()) / len(launches)
    print(f"{name[:40]:<40} {len(launches):>8} {100 * t / total:6.1f}% "
          f"{mean('Compute (SM) Throughput'):9.1f} {mean('Memory Throughput'):9.1f}")
PY

write_summary
cat "$out/kernels.txt"
print_steps
exit $failed
