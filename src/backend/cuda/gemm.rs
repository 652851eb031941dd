//! Row-major products as cuBLAS calls.
//!
//! igpt stores matrices row-major; cuBLAS reads them column-major. A row-major `[m, n]` matrix
//! is the column-major `[n, m]` one, its transpose, so `C = op(A) op(B)` is computed as
//! `C^T = op(B)^T op(A)^T`: the operands swap places and keep their transpose flags.

use crate::backend::Op;

/// A (batched) row-major product `C[m, n] = alpha * op(A) op(B) + beta * C`. Leading
/// dimensions count elements between consecutive stored rows; strides, elements between
/// consecutive matrices of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowMajor {
    pub ta: Op,
    pub tb: Op,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
    pub batch: usize,
}

impl RowMajor {
    /// A single product of contiguous matrices.
    pub fn plain(ta: Op, tb: Op, m: usize, k: usize, n: usize) -> Self {
        Self {
            ta,
            tb,
            m,
            n,
            k,
            lda: if ta == Op::N { k } else { m },
            ldb: if tb == Op::N { n } else { k },
            ldc: n,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
            batch: 1,
        }
    }
}

/// The same product as cuBLAS's column-major arguments. `first` and `second` say which
/// row-major operand cuBLAS reads as its A and B: always (B, A).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColumnMajor {
    pub trans_first: bool,
    pub trans_second: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub ld_first: usize,
    pub ld_second: usize,
    pub ldc: usize,
    pub stride_first: usize,
    pub stride_second: usize,
    pub stride_c: usize,
    pub batch: usize,
}

/// cuBLAS arguments for a row-major product; the caller passes `B` as cuBLAS's A and `A` as
/// its B.
pub fn column_major(p: &RowMajor) -> ColumnMajor {
    ColumnMajor {
        trans_first: p.tb == Op::T,
        trans_second: p.ta == Op::T,
        m: p.n,
        n: p.m,
        k: p.k,
        ld_first: p.ldb,
        ld_second: p.lda,
        ldc: p.ldc,
        stride_first: p.stride_b,
        stride_second: p.stride_a,
        stride_c: p.stride_c,
        batch: p.batch,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// cuBLAS's gemm, as its documentation defines it, on host memory: column-major, `ld`s
    /// between columns.
    #[allow(clippy::too_many_arguments)]
    fn cublas_reference(
        c: &ColumnMajor,
        a: &[f32],
        b: &[f32],
        out: &mut [f32],
        alpha: f32,
        beta: f32,
    ) {
        for batch in 0..c.batch {
            let (a0, b0, c0) = (
                batch * c.stride_first,
                batch * c.stride_second,
                batch * c.stride_c,
            );
            for i in 0..c.m {
                for j in 0..c.n {
                    let mut s = 0.0;
                    for l in 0..c.k {
                        let av = if c.trans_first {
                            a[a0 + i * c.ld_first + l]
                        } else {
                            a[a0 + l * c.ld_first + i]
                        };
                        let bv = if c.trans_second {
                            b[b0 + l * c.ld_second + j]
                        } else {
                            b[b0 + j * c.ld_second + l]
                        };
                        s += av * bv;
                    }
                    let o = &mut out[c0 + j * c.ldc + i];
                    *o = alpha * s + beta * *o;
                }
            }
        }
    }

    /// The row-major product computed directly.
    fn row_major_reference(
        p: &RowMajor,
        a: &[f32],
        b: &[f32],
        out: &mut [f32],
        alpha: f32,
        beta: f32,
    ) {
        for batch in 0..p.batch {
            let (a0, b0, c0) = (batch * p.stride_a, batch * p.stride_b, batch * p.stride_c);
            for i in 0..p.m {
                for j in 0..p.n {
                    let mut s = 0.0;
                    for l in 0..p.k {
                        let av = if p.ta == Op::N {
                            a[a0 + i * p.lda + l]
                        } else {
                            a[a0 + l * p.lda + i]
                        };
                        let bv = if p.tb == Op::N {
                            b[b0 + l * p.ldb + j]
                        } else {
                            b[b0 + j * p.ldb + l]
                        };
                        s += av * bv;
                    }
                    let o = &mut out[c0 + i * p.ldc + j];
                    *o = alpha * s + beta * *o;
                }
            }
        }
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| ((i.wrapping_mul(2654435761).wrapping_add(seed)) % 97) as f32 / 13.0 - 3.5)
            .collect()
    }

    #[test]
    fn the_swapped_call_computes_the_row_major_product() {
        for ta in [Op::N, Op::T] {
            for tb in [Op::N, Op::T] {
                for &(m, k, n) in &[(3, 4, 5), (1, 7, 2), (6, 1, 6)] {
                    // Padded leading dimensions and batches, as the attention products use.
                    let mut p = RowMajor::plain(ta, tb, m, k, n);
                    p.lda += 2;
                    p.ldb += 3;
                    p.ldc += 1;
                    p.batch = 3;
                    p.stride_a = 100;
                    p.stride_b = 90;
                    p.stride_c = 80;
                    let (a, b) = (values(400, 1), values(400, 7));
                    let (mut want, mut got) = (values(300, 3), values(300, 3));
                    row_major_reference(&p, &a, &b, &mut want, 0.5, 1.0);
                    cublas_reference(&column_major(&p), &b, &a, &mut got, 0.5, 1.0);
                    assert_eq!(want, got, "{ta:?} {tb:?} {m}x{k}x{n}");
                }
            }
        }
    }

    #[test]
    fn plain_products_have_contiguous_leading_dimensions() {
        let p = RowMajor::plain(Op::T, Op::N, 3, 4, 5);
        assert_eq!((p.lda, p.ldb, p.ldc), (3, 5, 5));
        let p = RowMajor::plain(Op::N, Op::T, 3, 4, 5);
        assert_eq!((p.lda, p.ldb, p.ldc), (4, 4, 5));
    }
}
