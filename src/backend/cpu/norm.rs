//! The Image GPT norm: RMS scaling with a gain, no centring, no bias (REFERENCE.md §3).

use super::simd;
use rayon::prelude::*;

/// Rows handed to one rayon task in row-wise kernels.
pub(crate) const ROW_BLOCK: usize = 64;

/// `out = x * rsqrt(mean(x^2) + eps) * g` per row; keeps `rstd` per row for the backward pass.
pub fn rmsnorm_forward(
    out: &mut [f32],
    rstd: &mut [f32],
    x: &[f32],
    g: &[f32],
    d: usize,
    eps: f32,
) {
    let rows = x.len() / d;
    assert_eq!(out.len(), rows * d);
    assert_eq!(rstd.len(), rows);
    assert_eq!(g.len(), d);
    out.par_chunks_mut(ROW_BLOCK * d)
        .zip(rstd.par_chunks_mut(ROW_BLOCK))
        .zip(x.par_chunks(ROW_BLOCK * d))
        .for_each(|((o, r), xs)| {
            for ((orow, rs), xrow) in o.chunks_mut(d).zip(r.iter_mut()).zip(xs.chunks(d)) {
                let ms = simd::dot(xrow, xrow) / d as f32;
                let s = 1.0 / (ms + eps).sqrt();
                *rs = s;
                simd::scale_mul(orow, xrow, s, g);
            }
        });
}

/// Backward of [`rmsnorm_forward`]: adds into `dx` and `dg`.
///
/// With `xhat = x * rstd`: `dg += sum_rows(dout * xhat)`,
/// `dx += rstd * (dout*g - xhat * mean(dout*g*xhat))`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    dx: &mut [f32],
    dg: &mut [f32],
    dout: &[f32],
    x: &[f32],
    rstd: &[f32],
    g: &[f32],
    d: usize,
    dg_scratch: &mut [f32],
) {
    let rows = x.len() / d;
    assert_eq!(dx.len(), rows * d);
    assert_eq!(dout.len(), rows * d);
    assert_eq!(rstd.len(), rows);
    dx.par_chunks_mut(ROW_BLOCK * d)
        .zip(dout.par_chunks(ROW_BLOCK * d))
        .zip(x.par_chunks(ROW_BLOCK * d))
        .zip(rstd.par_chunks(ROW_BLOCK))
        .for_each(|(((dxs, dos), xs), rs)| {
            for (((dxr, dor), xr), &s) in dxs
                .chunks_mut(d)
                .zip(dos.chunks(d))
                .zip(xs.chunks(d))
                .zip(rs)
            {
                let mean = simd::dot3(dor, g, xr) * s / d as f32;
                simd::rmsnorm_dx(dxr, dor, xr, g, s, mean);
            }
        });
    // Gain gradient: each task sums a fixed block of rows, then the blocks are added in
    // order, so the result does not depend on the thread count.
    let blocks = rows.div_ceil(ROW_BLOCK * 4);
    let partial = &mut dg_scratch[..blocks * d];
    partial
        .par_chunks_mut(d)
        .enumerate()
        .for_each(|(blk, acc)| {
            acc.fill(0.0);
            for r in blk * ROW_BLOCK * 4..((blk + 1) * ROW_BLOCK * 4).min(rows) {
                simd::add_product(
                    acc,
                    &dout[r * d..(r + 1) * d],
                    &x[r * d..(r + 1) * d],
                    rstd[r],
                );
            }
        });
    for acc in partial.chunks(d) {
        simd::add_assign(dg, acc);
    }
}

/// Scratch floats [`rmsnorm_backward`] needs for `rows` rows of width `d`.
pub fn rmsnorm_backward_scratch(rows: usize, d: usize) -> usize {
    rows.div_ceil(ROW_BLOCK * 4) * d
}
