//! The Image GPT norm: RMS scaling with a gain, no centring, no bias (REFERENCE.md §3).

use rayon::prelude::*;

/// Rows handed to one rayon task in row-wise kernels.
pub(crate) const ROW_BLOCK: usize = 64;

/// `out = x * rsqrt(mean(x^2) + eps) * g` per row; keeps `rstd` per row for the backward pass.
pub fn rmsnorm_forward(out: &mut [f32], rstd: &mut [f32], x: &[f32], g: &[f32], d: usize, eps: f32) {
    let rows = x.len() / d;
    assert_eq!(out.len(), rows * d);
    assert_eq!(rstd.len(), rows);
    assert_eq!(g.len(), d);
    out.par_chunks_mut(ROW_BLOCK * d)
        .zip(rstd.par_chunks_mut(ROW_BLOCK))
        .zip(x.par_chunks(ROW_BLOCK * d))
        .for_each(|((o, r), xs)| {
            for ((orow, rs), xrow) in o.chunks_mut(d).zip(r.iter_mut()).zip(xs.chunks(d)) {
                let ms = xrow.iter().map(|v| v * v).sum::<f32>() / d as f32;
                let s = 1.0 / (ms + eps).sqrt();
                *rs = s;
                for ((o, &v), &gv) in orow.iter_mut().zip(xrow).zip(g) {
                    *o = v * s * gv;
                }
            }
        });
}

/// Backward of [`rmsnorm_forward`]: adds into `dx` and `dg`.
///
/// With `xhat = x * rstd`: `dg += sum_rows(dout * xhat)`,
/// `dx += rstd * (dout*g - xhat * mean(dout*g*xhat))`.
pub fn rmsnorm_backward(dx: &mut [f32], dg: &mut [f32], dout: &[f32], x: &[f32], rstd: &[f32], g: &[f32], d: usize) {
    let rows = x.len() / d;
    assert_eq!(dx.len(), rows * d);
    assert_eq!(dout.len(), rows * d);
    assert_eq!(rstd.len(), rows);
    dx.par_chunks_mut(ROW_BLOCK * d)
        .zip(dout.par_chunks(ROW_BLOCK * d))
        .zip(x.par_chunks(ROW_BLOCK * d))
        .zip(rstd.par_chunks(ROW_BLOCK))
        .for_each(|(((dxs, dos), xs), rs)| {
            for (((dxr, dor), xr), &s) in dxs.chunks_mut(d).zip(dos.chunks(d)).zip(xs.chunks(d)).zip(rs) {
                let mut dot = 0.0f32;
                for j in 0..d {
                    dot += dor[j] * g[j] * xr[j] * s;
                }
                let mean = dot / d as f32;
                for j in 0..d {
                    let xhat = xr[j] * s;
                    dxr[j] += s * (dor[j] * g[j] - xhat * mean);
                }
            }
        });
    // Gain gradient: reduce over rows one column block at a time, so the sum order is fixed.
    column_block_reduce(dg, d, rows, |r, j| dout[r * d + j] * x[r * d + j] * rstd[r]);
}

/// `acc[j] += sum_r f(r, j)` for j in 0..d, parallel over blocks of 16 columns, summing rows
/// in order (deterministic whatever the thread count).
pub(crate) fn column_block_reduce(acc: &mut [f32], d: usize, rows: usize, f: impl Fn(usize, usize) -> f32 + Sync) {
    assert_eq!(acc.len(), d);
    acc.par_chunks_mut(16).enumerate().for_each(|(b, cols)| {
        let j0 = b * 16;
        let mut sums = [0.0f32; 16];
        for r in 0..rows {
            for (c, s) in sums.iter_mut().enumerate().take(cols.len()) {
                *s += f(r, j0 + c);
            }
        }
        for (c, a) in cols.iter_mut().enumerate() {
            *a += sums[c];
        }
    });
}
