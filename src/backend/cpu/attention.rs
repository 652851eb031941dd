//! Multi-head attention computed one block of query rows at a time.
//!
//! Only one `[QUERY_BLOCK, T]` tile of scores per thread ever exists; the forward pass keeps the
//! log-sum-exp of each row, and the backward pass recomputes the probabilities from it. This is
//! what keeps training memory linear in the context length.
//!
//! Each worker first copies its head's Q, K and V out of the interleaved `qkv` rows into
//! contiguous `[T, head_dim]` blocks: the small products below then read unit-stride rows,
//! and the backward pass accumulates dK and dV there before writing them back once.

use super::matmul::{SendPtr, Strided, gemm_serial};
use super::simd::{self, Stored};
use crate::backend::AttnShape;
use rayon::prelude::*;

/// Query rows per tile.
pub const QUERY_BLOCK: usize = 128;

impl AttnShape {
    fn d(&self) -> usize {
        self.n_head * self.head_dim
    }
    fn tile_len(&self) -> usize {
        QUERY_BLOCK.min(self.t) * self.t
    }
    fn block_len(&self) -> usize {
        self.t * self.head_dim
    }
    /// Floats of scratch one worker uses: two score tiles and six `[t, head_dim]` blocks.
    fn per_worker(&self) -> usize {
        2 * self.tile_len() + 6 * self.block_len()
    }
    /// Scratch floats the kernels need for `threads` parallel workers.
    pub(crate) fn scratch_len(&self, threads: usize) -> usize {
        threads.max(1) * self.per_worker()
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
    let per = s.per_worker();
    assert!(
        scratch.len() >= per,
        "attention scratch too small: {} < {per}",
        scratch.len()
    );
    scratch.len() / per
}

/// A contiguous row-major `[rows, cols]` matrix starting at `ptr` (offset by `row0` rows).
fn rows(ptr: *const f32, row0: usize, cols: usize) -> Strided {
    Strided {
        ptr: ptr.wrapping_add(row0 * cols),
        rs: cols as isize,
        cs: 1,
    }
}

/// The transpose of a contiguous `[rows, cols]` matrix.
fn transposed(ptr: *const f32, cols: usize) -> Strided {
    Strided {
        ptr,
        rs: 1,
        cs: cols as isize,
    }
}

/// Copies head `h` of sequence `b` out of `qkv` into contiguous `[t, head_dim]` Q, K, V blocks.
fn pack_head(
    q: &mut [f32],
    k: &mut [f32],
    v: &mut [f32],
    qkv: &[f32],
    b: usize,
    h: usize,
    s: &AttnShape,
) {
    let (t, d, hd) = (s.t, s.d(), s.head_dim);
    for j in 0..t {
        let row = &qkv[(b * t + j) * 3 * d..(b * t + j + 1) * 3 * d];
        q[j * hd..(j + 1) * hd].copy_from_slice(&row[h * hd..(h + 1) * hd]);
        k[j * hd..(j + 1) * hd].copy_from_slice(&row[d + h * hd..d + (h + 1) * hd]);
        v[j * hd..(j + 1) * hd].copy_from_slice(&row[2 * d + h * hd..2 * d + (h + 1) * hd]);
    }
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
        // Exponentiate whole 16-lane chunks: masked scores are set to -inf first (their
        // exponential is then ~1e-38, and they are zeroed after), which avoids a scalar tail.
        let padded = visible.next_multiple_of(16).min(nk);
        row[visible..padded].fill(f32::NEG_INFINITY);
        let live = &mut row[..padded];
        if from_saved {
            simd::exp_shifted(live, lse[r]);
        } else {
            let max = simd::max(live);
            let sum = simd::exp_shifted(live, max);
            simd::scale(live, 1.0 / sum);
            lse[r] = max + sum.ln();
        }
        row[visible..].fill(0.0);
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
    let per = s.per_worker();
    let qb = QUERY_BLOCK.min(t);
    let (out_p, lse_p) = (SendPtr(out.as_mut_ptr()), SendPtr(lse.as_mut_ptr()));
    scratch[..g * per]
        .par_chunks_mut(per)
        .enumerate()
        .for_each(|(w, mine)| {
            let (tile, rest) = mine.split_at_mut(s.tile_len());
            let (_, rest) = rest.split_at_mut(s.tile_len());
            let (qc, rest) = rest.split_at_mut(s.block_len());
            let (kc, rest) = rest.split_at_mut(s.block_len());
            let (vc, oc) = rest.split_at_mut(s.block_len());
            let oc = &mut oc[..s.block_len()];
            for task in (w..tasks).step_by(g) {
                let (b, h) = (task / s.n_head, task % s.n_head);
                pack_head(qc, kc, vc, qkv, b, h, &s);
                // SAFETY: the lse rows of task (b, h) belong to this task alone.
                let lse_task =
                    unsafe { std::slice::from_raw_parts_mut(lse_p.get().add(task * t), t) };
                for i0 in (0..t).step_by(qb) {
                    let i1 = (i0 + qb).min(t);
                    let (mq, nk) = (i1 - i0, s.keys(i1));
                    let tile = &mut tile[..mq * nk];
                    // SAFETY: all operands are this worker's own packed blocks and tiles, sized above.
                    unsafe {
                        gemm_serial(
                            mq,
                            nk,
                            hd,
                            tile.as_mut_ptr(),
                            nk as isize,
                            rows(qc.as_ptr(), i0, hd),
                            transposed(kc.as_ptr(), hd),
                            false,
                            s.scale(),
                        );
                    }
                    softmax_tile(tile, nk, i0, &s, &mut lse_task[i0..i1], false);
                    // SAFETY: as above; `oc` rows i0..i1 are inside the packed output block.
                    unsafe {
                        gemm_serial(
                            mq,
                            hd,
                            nk,
                            oc.as_mut_ptr().add(i0 * hd),
                            hd as isize,
                            rows(tile.as_ptr(), 0, nk),
                            rows(vc.as_ptr(), 0, hd),
                            false,
                            1.0,
                        );
                    }
                }
                for j in 0..t {
                    // SAFETY: output rows of head h in sequence b are written by this task only.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            out_p.get().add((b * t + j) * d + h * hd),
                            hd,
                        )
                    };
                    dst.copy_from_slice(&oc[j * hd..(j + 1) * hd]);
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
    let per = s.per_worker();
    let qb = QUERY_BLOCK.min(t);
    let dqkv_p = SendPtr(dqkv.as_mut_ptr());
    scratch[..g * per]
        .par_chunks_mut(per)
        .enumerate()
        .for_each(|(w, mine)| {
            let (p_tile, rest) = mine.split_at_mut(s.tile_len());
            let (dp_tile, rest) = rest.split_at_mut(s.tile_len());
            let (qc, rest) = rest.split_at_mut(s.block_len());
            let (kc, rest) = rest.split_at_mut(s.block_len());
            let (vc, rest) = rest.split_at_mut(s.block_len());
            let (dqc, rest) = rest.split_at_mut(s.block_len());
            let (dkc, dvc) = rest.split_at_mut(s.block_len());
            let dvc = &mut dvc[..s.block_len()];
            for task in (w..tasks).step_by(g) {
                let (b, h) = (task / s.n_head, task % s.n_head);
                pack_head(qc, kc, vc, qkv, b, h, &s);
                dkc.fill(0.0);
                dvc.fill(0.0);
                let lse_task = &lse[task * t..(task + 1) * t];
                let mut lse_rows = [0.0f32; QUERY_BLOCK];
                for i0 in (0..t).step_by(qb) {
                    let i1 = (i0 + qb).min(t);
                    let (mq, nk) = (i1 - i0, s.keys(i1));
                    let p = &mut p_tile[..mq * nk];
                    let dp = &mut dp_tile[..mq * nk];
                    let do_rows = Strided {
                        ptr: dout.as_ptr().wrapping_add((b * t + i0) * d + h * hd),
                        rs: d as isize,
                        cs: 1,
                    };
                    // SAFETY (all products here): operands are this worker's packed blocks and tiles
                    // or rows i0..i1 of head h in `dout` (length asserted); destinations are this
                    // worker's own tiles and blocks.
                    unsafe {
                        gemm_serial(
                            mq,
                            nk,
                            hd,
                            p.as_mut_ptr(),
                            nk as isize,
                            rows(qc.as_ptr(), i0, hd),
                            transposed(kc.as_ptr(), hd),
                            false,
                            s.scale(),
                        );
                    }
                    lse_rows[..mq].copy_from_slice(&lse_task[i0..i1]);
                    softmax_tile(p, nk, i0, &s, &mut lse_rows[..mq], true);
                    unsafe {
                        // dV[0..nk] += P^T dO
                        gemm_serial(
                            nk,
                            hd,
                            mq,
                            dvc.as_mut_ptr(),
                            hd as isize,
                            transposed(p.as_ptr(), nk),
                            do_rows,
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
                            do_rows,
                            transposed(vc.as_ptr(), hd),
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
                            dqc.as_mut_ptr().add(i0 * hd),
                            hd as isize,
                            rows(dp.as_ptr(), 0, nk),
                            rows(kc.as_ptr(), 0, hd),
                            false,
                            s.scale(),
                        );
                        // dK[0..nk] += scale * dS^T Q
                        gemm_serial(
                            nk,
                            hd,
                            mq,
                            dkc.as_mut_ptr(),
                            hd as isize,
                            transposed(dp.as_ptr(), nk),
                            rows(qc.as_ptr(), i0, hd),
                            true,
                            s.scale(),
                        );
                    }
                }
                for j in 0..t {
                    for (part, src) in [(0, &*dqc), (d, &*dkc), (2 * d, &*dvc)] {
                        // SAFETY: these head_dim columns of head h in sequence b belong to this task
                        // alone; no other task forms a slice over them.
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut(
                                dqkv_p.get().add((b * t + j) * 3 * d + part + h * hd),
                                hd,
                            )
                        };
                        dst.copy_from_slice(&src[j * hd..(j + 1) * hd]);
                    }
                }
            }
        });
}

/// Decoding steps for every sequence at positions `pos..pos + len`: stores these positions' K
/// and V (from `qkv: [batch * len, 3d]`, sequence-major) in the caches and writes the attention
/// of each position over positions `0..=` itself to `out: [batch * len, d]`. One position is a
/// decoding step; many are a prefill of known tokens. Per (sequence, head), the K cache is kept
/// in blocks of 16 positions, each transposed (`[n_ctx / 16][head_dim][16]`, so the scores of
/// 16 keys read one contiguous block), and the V cache as `[n_ctx, head_dim]`, as f32 or as
/// bfloat16 (`u16`). `n_ctx` must be a multiple of 16 (see [`decode_cache_len`]); `scores`
/// holds `batch * n_head * n_ctx` floats.
#[allow(clippy::too_many_arguments)]
pub fn attention_step<E: Stored>(
    out: &mut [f32],
    k_cache: &mut [E],
    v_cache: &mut [E],
    qkv: &[f32],
    scores: &mut [f32],
    batch: usize,
    n_head: usize,
    head_dim: usize,
    n_ctx: usize,
    pos: usize,
    len: usize,
) {
    let (hd, d) = (head_dim, n_head * head_dim);
    assert!(
        len >= 1 && pos + len <= n_ctx,
        "positions {pos}..{} are outside the context of {n_ctx}",
        pos + len
    );
    assert_eq!(qkv.len(), batch * len * 3 * d);
    assert_eq!(out.len(), batch * len * d);
    assert_eq!(k_cache.len(), batch * n_head * n_ctx * hd);
    assert_eq!(v_cache.len(), k_cache.len());
    assert!(scores.len() >= batch * n_head * n_ctx);
    assert_eq!(
        n_ctx % 16,
        0,
        "the decoding cache length must be a multiple of 16"
    );
    let scale = 1.0 / (hd as f32).sqrt();
    let per = n_ctx * hd;
    let out_p = SendPtr(out.as_mut_ptr());
    k_cache
        .par_chunks_mut(per)
        .zip(v_cache.par_chunks_mut(per))
        .zip(scores.par_chunks_mut(n_ctx))
        .enumerate()
        .for_each(|(task, ((kc, vc), sc))| {
            let (b, h) = (task / n_head, task % n_head);
            for i in 0..len {
                let p = pos + i;
                let row = &qkv[(b * len + i) * 3 * d..(b * len + i + 1) * 3 * d];
                let block = (p / 16) * hd * 16;
                for (c, &k) in row[d + h * hd..d + (h + 1) * hd].iter().enumerate() {
                    kc[block + c * 16 + p % 16] = E::store(k);
                }
                for (dst, &v) in vc[p * hd..(p + 1) * hd]
                    .iter_mut()
                    .zip(&row[2 * d + h * hd..2 * d + (h + 1) * hd])
                {
                    *dst = E::store(v);
                }
            }
            for i in 0..len {
                let row = &qkv[(b * len + i) * 3 * d..(b * len + i + 1) * 3 * d];
                let q = &row[h * hd..(h + 1) * hd];
                // SAFETY: the head_dim outputs of head h at this row belong to this task alone.
                let o = unsafe {
                    std::slice::from_raw_parts_mut(out_p.get().add((b * len + i) * d + h * hd), hd)
                };
                let n = pos + i + 1;
                E::attend(o, q, kc, &vc[..n * hd], sc, n, scale);
            }
        });
}

/// Positions the decoding caches hold for a context of `n_ctx`: rounded up to whole blocks of 16.
pub fn decode_cache_len(n_ctx: usize) -> usize {
    n_ctx.next_multiple_of(16)
}
