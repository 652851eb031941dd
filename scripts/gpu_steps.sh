# What scripts/gpu_check.sh and scripts/gpu_inspect.sh share, sourced by both: steps run under
# time limits with a log each, the pip packages' CUDA libraries found, and summary.json.
# The sourcing script sets `out` (OUT_DIR, created) and `python` first.

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

# The CUDA libraries of the pip packages (nvidia-cublas and the rest) and torch's own are not on
# the default library path, and igpt opens them by name at run time: the `libraries` step finds
# them and puts them on LD_LIBRARY_PATH, its findings in OUT_DIR/libraries.log.
find_cuda_libraries() {
    local start=$SECONDS libs rc
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
}

# OUT_DIR/summary.json, in shell alone (the machine's Python may be what broke): every step's
# exit code, time, log and JSON. igpt writes its JSON whole or not at all (a rename), so a file
# that exists is embedded as it is. Sets `failed` (1 if any step failed).
write_summary() {
    local sep="" name rc secs log json
    failed=0
    {
        echo "{"
        echo "  \"steps\": ["
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
}

# The table of steps, and the verdict, last.
print_steps() {
    local name rc secs log json
    echo
    printf '%-12s %9s %8s\n' step "exit code" seconds
    while IFS=$'\t' read -r name rc secs log json; do
        printf '%-12s %9s %8s%s\n' "$name" "$rc" "$secs" "$([ "$rc" -eq 124 ] && echo '  (out of time)')"
    done <"$steps"
    if [ "$failed" -eq 0 ]; then
        echo "all steps passed; summary in $out/summary.json"
    else
        echo "SOME STEPS FAILED; summary in $out/summary.json"
    fi
}
