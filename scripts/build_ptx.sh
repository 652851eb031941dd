#!/usr/bin/env bash
# Compiles the CUDA kernels (src/backend/cuda/kernels.cu) to the PTX the binary embeds, for
# sm_80 (A100) and sm_90 (H100, H200), with nvcc 13.0 from PyPI: PTX from a newer nvcc does
# not load on a CUDA 13.0 driver.
#
#   scripts/build_ptx.sh           rebuild src/backend/cuda/ptx/*.ptx
#   scripts/build_ptx.sh --check   fail if the committed PTX differs from what the sources give,
#                                  and assemble each file with ptxas to prove it loads
#
# The compiler goes to $IGPT_NVCC_DIR (default target/nvcc), installed on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
nvcc_dir=${IGPT_NVCC_DIR:-target/nvcc}
bin=$nvcc_dir/nvidia/cu13/bin
if [[ ! -x $bin/nvcc ]]; then
    echo "installing nvcc 13.0.88 into $nvcc_dir"
    # The wheels share one nvidia/ folder: install them in one command, or pip skips it.
    "${PYTHON:-python3}" -m pip install -q --no-deps --target "$nvcc_dir" \
        nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
fi
out=src/backend/cuda/ptx
if [[ ${1:-} == --check ]]; then
    out=$(mktemp -d)
    trap 'rm -rf "$out"' EXIT
fi
for arch in 80 90; do
    "$bin/nvcc" -ptx -O3 -arch=sm_$arch -o "$out/kernels.sm_$arch.ptx" src/backend/cuda/kernels.cu
done
if [[ ${1:-} == --check ]]; then
    for arch in 80 90; do
        if ! cmp -s "$out/kernels.sm_$arch.ptx" "src/backend/cuda/ptx/kernels.sm_$arch.ptx"; then
            echo "src/backend/cuda/ptx/kernels.sm_$arch.ptx does not match kernels.cu: run scripts/build_ptx.sh and commit the result" >&2
            exit 1
        fi
        "$bin/ptxas" -arch=sm_$arch -o /dev/null "src/backend/cuda/ptx/kernels.sm_$arch.ptx"
    done
    echo "the committed PTX matches kernels.cu and assembles for sm_80 and sm_90"
fi
