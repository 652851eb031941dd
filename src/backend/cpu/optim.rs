//! AdamW update and gradient-norm reduction over flat buffers.

use super::simd;
use crate::backend::AdamStep;
use rayon::prelude::*;

const CHUNK: usize = 64 * 1024;

/// One AdamW step on a contiguous tensor; `decay` turns decoupled weight decay on for it.
pub fn adamw(
    params: &mut [f32],
    grads: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    h: AdamStep,
    decay: bool,
) {
    let (bc1, bc2) = h.bias_corrections();
    let wd = if decay { h.weight_decay } else { 0.0 };
    let k = [h.lr, h.beta1, h.beta2, h.eps, wd, h.grad_scale, bc1, bc2];
    params
        .par_chunks_mut(CHUNK)
        .zip(grads.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| simd::adamw_chunk(p, g, m, v, &k));
}

/// Sum of squares in f64, summed serially so the result never depends on the thread count.
pub fn sum_squares(x: &[f32]) -> f64 {
    x.iter().map(|&v| (v as f64) * (v as f64)).sum()
}
