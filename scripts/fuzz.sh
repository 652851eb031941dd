#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 120), seeded with the test fixtures.
# Needs the nightly toolchain and cargo-fuzz: cargo install cargo-fuzz
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-120}"
seed() { mkdir -p "fuzz/corpus/$1"; shift; for f in "$@"; do cp "$f" "fuzz/corpus/$1/" 2>/dev/null || true; done; }
seed_dir() { local t="$1"; shift; mkdir -p "fuzz/corpus/$t"; for f in "$@"; do cp "$f" "fuzz/corpus/$t/$(echo "$f" | tr / _)"; done; }
seed_dir torch_zip tests/fixtures/hf/*/pytorch_model.bin
seed_dir safetensors tests/fixtures/hf/*/model.safetensors tests/fixtures/hf/*/expected.safetensors
seed_dir tf_bundle tests/fixtures/tf/*/model.ckpt-1000.index
seed_dir npy tests/fixtures/tf/*/kmeans_centers.npy
mkdir -p fuzz/corpus/pickle
for f in tests/fixtures/hf/*/pytorch_model.bin; do
  python3 -c "import zipfile,sys; z=zipfile.ZipFile(sys.argv[1]); n=[x for x in z.namelist() if x.endswith('data.pkl')][0]; open(sys.argv[2],'wb').write(z.read(n))" "$f" "fuzz/corpus/pickle/$(echo "$f" | tr / _).pkl"
done
# A crash, panic, hang or out-of-memory in any target fails the script (after the others ran).
failed=()
for t in pickle torch_zip tf_bundle safetensors npy; do
  echo "== $t: ${secs}s"
  log="fuzz/$t.log"
  if cargo +nightly fuzz run -O "$t" -- -max_total_time="$secs" -rss_limit_mb=2048 >"$log" 2>&1; then
    grep -E "Done [0-9]+ runs" "$log" || tail -n 3 "$log"
  else
    grep -E "SUMMARY|panicked|ERROR|deadly signal|timeout|out-of-memory" "$log" | head -n 20 || tail -n 20 "$log"
    echo "== $t FAILED: see $log and fuzz/artifacts/$t/"
    failed+=("$t")
  fi
done
if [ "${#failed[@]}" -gt 0 ]; then
  echo "failed: ${failed[*]}"
  exit 1
fi
