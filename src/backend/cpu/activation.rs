//! "Quick GELU": `x * sigmoid(1.702 x)` (REFERENCE.md §3), and residual additions.

use rayon::prelude::*;

use super::simd;

const CHUNK: usize = 16 * 1024;

pub fn quick_gelu_forward(out: &mut [f32], x: &[f32]) {
    assert_eq!(out.len(), x.len());
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| simd::quick_gelu(o, x));
}

/// `dx = dout * d/dx[x * sigmoid(k x)]`, written over `dout` in place (the caller's buffer
/// for the activation gradient becomes the pre-activation gradient).
pub fn quick_gelu_backward_inplace(dout: &mut [f32], x: &[f32]) {
    assert_eq!(dout.len(), x.len());
    dout.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(d, x)| simd::quick_gelu_grad(d, x));
}
