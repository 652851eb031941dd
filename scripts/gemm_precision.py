"""How fast the GPU multiplies iGPT-S's training products from f32 and from bf16 operands.

igpt's bf16 training stores the products' inputs and gradients in bf16 and hands cuBLASLt bf16
operands; before, it kept them in f32 and asked for bf16 tensor-core products of f32 operands
(CUBLAS_COMPUTE_32F_FAST_16BF), as it still does where attention stores f32. This
times both, with PyTorch on the same GPU, so the first GPU run says what that change is worth
for the products (the element-wise passes are the other half of it):

  f32-exact   f32 operands, f32 products                 (torch "highest")
  f32-fast    f32 operands, bf16 products inside cuBLAS  (torch "medium"; igpt asked so before)
  bf16        bf16 operands, f32 accumulation, bf16 out

  python3 scripts/gemm_precision.py [--rows 32768] [--json OUT.json]

Shapes are iGPT-S's (d 512, batch 32 x 1024 positions): the four block products and the head,
forward (rows x k times k x n), and the weight gradient of the widest (k = rows).
"""
import argparse
import json
import sys
import time

import torch


def shapes(rows, d=512, vocab=512):
    """(name, m, k, n) of C[m, n] = A[m, k] B[k, n]."""
    return [
        ("qkv", rows, d, 3 * d),
        ("attention out", rows, d, d),
        ("mlp up", rows, d, 4 * d),
        ("mlp down", rows, 4 * d, d),
        ("head", rows, d, vocab),
        ("mlp up weight gradient", d, rows, 4 * d),
    ]


def time_product(a, b, repeats):
    """Median seconds of a @ b over `repeats` runs, after two warm-up runs."""
    for _ in range(2):
        a @ b
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=32 * 1024, help="rows of the activations")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gemm_precision.py: no CUDA GPU visible to PyTorch")
    began = time.time()
    results = []
    for name, m, k, n in shapes(args.rows):
        flop = 2.0 * m * k * n
        row = {"product": name, "m": m, "k": k, "n": n}
        for mode, dtype, precision in [
            ("f32-exact", torch.float32, "highest"),
            ("f32-fast", torch.float32, "medium"),
            ("bf16", torch.bfloat16, "highest"),
        ]:
            torch.set_float32_matmul_precision(precision)
            a = torch.randn(m, k, device="cuda", dtype=dtype)
            b = torch.randn(k, n, device="cuda", dtype=dtype)
            s = time_product(a, b, args.repeats)
            row[mode] = {"ms": s * 1e3, "tflops": flop / s / 1e12}
            del a, b
        results.append(row)
        print(
            f"{name:<24} {m:>6} x {k:>6} x {n:>5}   "
            + "   ".join(f"{mode} {row[mode]['tflops']:6.1f} TFLOP/s" for mode in ("f32-exact", "f32-fast", "bf16")),
            flush=True,
        )
    torch.set_float32_matmul_precision("highest")
    report = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "rows": args.rows,
        "products": results,
        "seconds": time.time() - began,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
