//! Multi-head attention computed one block of query rows at a time.
//!
//! Only one `[QUERY_BLOCK, T]` tile of scores per thread ever exists; the forward pass keeps the
//! log-sum-exp of each row, and the backward pass recomputes the probabilities from it. This is
//! what keeps training memory linear in the context length.

use super::matmul::{SendPtr, Strided, gemm_serial};
use super::simd;
use rayon::prelude::*;

/// Query rows per tile.
pub const QUERY_BLOCK: usize = 128;

/// Shape of an attention call. `qkv` is `[batch * t, 3d]` with columns Q, K, V, each split into
/// `n_head` contiguous groups of `head_dim`; the output is `[batch * t, d]`.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub batch: usize,
    pub t: usize,
    pub n_head: usize,
    pub head_dim: usize,
    /// Autoregressive (causal) or bidirectional attention.
    pub causal: bool,
}

impl AttnShape {
    fn d(&self) -> usize {
        self.n_head * self.head_dim
    }
    /// Scratch floats the kernels need for `threads` parallel workers.
    pub fn scratch_len(&self, threads: usize) -> usize {
        threads.max(1) * 2 * QUERY_BLOCK.min(self.t) * self.t
    }
    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
    /// Keys visible from a query block ending (exclusive) at row `i1`.
    fn keys(&self, i1: usize) -> usize {
        if self.causal { i1 } else { self.t }
    }
}

fn workers(scratch: &[f32], s: &AttnShape) -> usize {
    let per = s.scratch_len(1);
    assert!(
        scratch.len() >= per,
        "attention scratch too small: {} < {per}",
        scratch.len()
    );
    scratch.len() / per
}

/// Turns the score tile of query rows `i0..` into probabilities in place. Without
/// `from_saved`, each row's log-sum-exp is written to `lse`; with it, `lse` is read instead.
fn softmax_tile(
    tile: &mut [f32],
    nk: usize,
    i0: usize,
    s: &AttnShape,
    lse: &mut [f32],
    from_saved: bool,
) {
    for (r, row) in tile.chunks_mut(nk).enumerate() {
        let i = i0 + r;
        let visible = if s.causal { i + 1 } else { nk };
        let (live, masked) = row.split_at_mut(visible);
        if from_saved {
            simd::exp_shifted(live, lse[r]);
        } else {
            let max = simd::max(live);
            let sum = simd::exp_shifted(live, max);
            simd::scale(live, 1.0 / sum);
            lse[r] = max + sum.ln();
        }
        masked.fill(0.0);
    }
}

/// Forward: `out = softmax(scale * Q K^T + mask) V` per head; `lse: [batch, n_head, t]`.
pub fn attention_forward(
    out: &mut [f32],
    lse: &mut [f32],
    qkv: &[f32],
    scratch: &mut [f32],
    s: AttnShape,
) {
    let (t, d, hd) = (s.t, s.d(), s.head_dim);
    assert_eq!(qkv.len(), s.batch * t * 3 * d);
    assert_eq!(out.len(), s.batch * t * d);
    assert_eq!(lse.len(), s.batch * s.n_head * t);
    let g = workers(scratch, &s);
    let tasks = s.batch * s.n_head;
    let per = s.scratch_len(1);
    let (out_p, lse_p, qkv_p) = (
        SendPtr(out.as_mut_ptr()),
        SendPtr(lse.as_mut_ptr()),
        SendPtr(qkv.as_ptr() as *mut f32),
    );
    let qb = QUERY_BLOCK.min(t);
    scratch[..g * per]
        .par_chunks_mut(per)
        .enumerate()
        .for_each(|(w, tile)| {
            for task in (w..tasks).step_by(g) {
                let (b, h) = (task / s.n_head, task % s.n_head);
                let base = qkv_p.get().wrapping_add(b * t * 3 * d);
                let q = base.wrapping_add(h * hd);
                let k = base.wrapping_add(d + h * hd);
                let v = base.wrapping_add(2 * d + h * hd);
                for i0 in (0..t).step_by(qb) {
                    let i1 = (i0 + qb).min(t);
                    let (mq, nk) = (i1 - i0, s.keys(i1));
                    let tile = &mut tile[..mq * nk];
                    // SAFETY: Q rows i0..i1 and K rows 0..nk of this (b, h) lie inside `qkv`
                    // (length asserted); `tile` is this worker's own scratch.
                    unsafe {
                        gemm_serial(
                            mq,
                            nk,
                            hd,
                            tile.as_mut_ptr(),
                            nk as isize,
                            Strided {
                                ptr: q.wrapping_add(i0 * 3 * d),
                                rs: 3 * d as isize,
                                cs: 1,
                            },
                            Strided {
                                ptr: k,
                                rs: 1,
                                cs: 3 * d as isize,
                            },
                            false,
                            s.scale(),
                        )
                    };
                    // SAFETY: the lse rows of task (b, h) belong to this task alone.
                    let lse_rows = unsafe {
                        std::slice::from_raw_parts_mut(lse_p.get().add(task * t + i0), mq)
                    };
                    softmax_tile(tile, nk, i0, &s, lse_rows, false);
                    // SAFETY: output rows i0..i1, columns of head h, are written by this task only.
                    unsafe {
                        gemm_serial(
                            mq,
                            hd,
                            nk,
                            out_p.get().add((b * t + i0) * d + h * hd),
                            d as isize,
                            Strided {
                                ptr: tile.as_ptr(),
                                rs: nk as isize,
                                cs: 1,
                            },
                            Strided {
                                ptr: v,
                                rs: 3 * d as isize,
                                cs: 1,
                            },
                            false,
                            1.0,
                        )
                    };
                }
            }
        });
}

/// Backward: writes `dqkv` (overwrites) from `dout`, recomputing probabilities from `lse`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dqkv: &mut [f32],
    dout: &[f32],
    out: &[f32],
    lse: &[f32],
    qkv: &[f32],
    scratch: &mut [f32],
    s: AttnShape,
) {
    let (t, d, hd) = (s.t, s.d(), s.head_dim);
    assert_eq!(qkv.len(), s.batch * t * 3 * d);
    assert_eq!(dqkv.len(), qkv.len());
    assert_eq!(dout.len(), s.batch * t * d);
    assert_eq!(out.len(), dout.len());
    assert_eq!(lse.len(), s.batch * s.n_head * t);
    let g = workers(scratch, &s);
    let tasks = s.batch * s.n_head;
    let per = s.scratch_len(1);
    let qb = QUERY_BLOCK.min(t);
    let dqkv_p = SendPtr(dqkv.as_mut_ptr());
    let qkv_p = SendPtr(qkv.as_ptr() as *mut f32);
    scratch[..g * per]
        .par_chunks_mut(per)
        .enumerate()
        .for_each(|(w, tile)| {
            let (p_tile, dp_tile) = tile.split_at_mut(per / 2);
            for task in (w..tasks).step_by(g) {
                let (b, h) = (task / s.n_head, task % s.n_head);
                let base = qkv_p.get().wrapping_add(b * t * 3 * d);
                let (q, k, v) = (
                    base.wrapping_add(h * hd),
                    base.wrapping_add(d + h * hd),
                    base.wrapping_add(2 * d + h * hd),
                );
                let dbase = dqkv_p.get().wrapping_add(b * t * 3 * d);
                let (dq, dk, dv) = (
                    dbase.wrapping_add(h * hd),
                    dbase.wrapping_add(d + h * hd),
                    dbase.wrapping_add(2 * d + h * hd),
                );
                for j in 0..t {
                    for c in 0..hd {
                        // SAFETY: the K and V gradient columns of (b, h) belong to this task alone.
                        unsafe {
                            *dk.add(j * 3 * d + c) = 0.0;
                            *dv.add(j * 3 * d + c) = 0.0;
                        }
                    }
                }
                let mut lse_rows = [0.0f32; QUERY_BLOCK];
                for i0 in (0..t).step_by(qb) {
                    let i1 = (i0 + qb).min(t);
                    let (mq, nk) = (i1 - i0, s.keys(i1));
                    let p = &mut p_tile[..mq * nk];
                    let dp = &mut dp_tile[..mq * nk];
                    let do_ptr = dout.as_ptr().wrapping_add((b * t + i0) * d + h * hd);
                    // SAFETY (all products below): every strided operand addresses rows of this
                    // (b, h) inside buffers whose lengths were asserted; the destinations are this
                    // worker's tiles or the gradient columns of (b, h), which no other task touches.
                    unsafe {
                        gemm_serial(
                            mq,
                            nk,
                            hd,
                            p.as_mut_ptr(),
                            nk as isize,
                            Strided {
                                ptr: q.wrapping_add(i0 * 3 * d),
                                rs: 3 * d as isize,
                                cs: 1,
                            },
                            Strided {
                                ptr: k,
                                rs: 1,
                                cs: 3 * d as isize,
                            },
                            false,
                            s.scale(),
                        );
                    }
                    lse_rows[..mq].copy_from_slice(&lse[task * t + i0..task * t + i1]);
                    softmax_tile(p, nk, i0, &s, &mut lse_rows[..mq], true);
                    unsafe {
                        // dV[0..nk] += P^T dO
                        gemm_serial(
                            nk,
                            hd,
                            mq,
                            dv,
                            3 * d as isize,
                            Strided {
                                ptr: p.as_ptr(),
                                rs: 1,
                                cs: nk as isize,
                            },
                            Strided {
                                ptr: do_ptr,
                                rs: d as isize,
                                cs: 1,
                            },
                            true,
                            1.0,
                        );
                        // dP = dO V^T
                        gemm_serial(
                            mq,
                            nk,
                            hd,
                            dp.as_mut_ptr(),
                            nk as isize,
                            Strided {
                                ptr: do_ptr,
                                rs: d as isize,
                                cs: 1,
                            },
                            Strided {
                                ptr: v,
                                rs: 1,
                                cs: 3 * d as isize,
                            },
                            false,
                            1.0,
                        );
                    }
                    for r in 0..mq {
                        let row = (b * t + i0 + r) * d + h * hd;
                        let di = simd::dot(&dout[row..row + hd], &out[row..row + hd]);
                        simd::softmax_grad(
                            &mut dp[r * nk..(r + 1) * nk],
                            &p[r * nk..(r + 1) * nk],
                            di,
                        );
                    }
                    unsafe {
                        // dQ rows i0..i1 = scale * dS K
                        gemm_serial(
                            mq,
                            hd,
                            nk,
                            dq.wrapping_add(i0 * 3 * d),
                            3 * d as isize,
                            Strided {
                                ptr: dp.as_ptr(),
                                rs: nk as isize,
                                cs: 1,
                            },
                            Strided {
                                ptr: k,
                                rs: 3 * d as isize,
                                cs: 1,
                            },
                            false,
                            s.scale(),
                        );
                        // dK[0..nk] += scale * dS^T Q
                        gemm_serial(
                            nk,
                            hd,
                            mq,
                            dk,
                            3 * d as isize,
                            Strided {
                                ptr: dp.as_ptr(),
                                rs: 1,
                                cs: nk as isize,
                            },
                            Strided {
                                ptr: q.wrapping_add(i0 * 3 * d),
                                rs: 3 * d as isize,
                                cs: 1,
                            },
                            true,
                            s.scale(),
                        );
                    }
                }
            }
        });
}
