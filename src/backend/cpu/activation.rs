//! "Quick GELU": `x * sigmoid(1.702 x)` (REFERENCE.md §3), and residual additions.

use rayon::prelude::*;

const GELU_K: f32 = 1.702;
const CHUNK: usize = 16 * 1024;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

pub fn quick_gelu_forward(out: &mut [f32], x: &[f32]) {
    assert_eq!(out.len(), x.len());
    out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, x)| {
        for (o, &v) in o.iter_mut().zip(x) {
            *o = v * sigmoid(GELU_K * v);
        }
    });
}

/// `dx = dout * d/dx[x * sigmoid(k x)]`, written over `dout` in place (the caller's buffer
/// for the activation gradient becomes the pre-activation gradient).
pub fn quick_gelu_backward_inplace(dout: &mut [f32], x: &[f32]) {
    assert_eq!(dout.len(), x.len());
    dout.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(d, x)| {
        for (d, &v) in d.iter_mut().zip(x) {
            let s = sigmoid(GELU_K * v);
            *d *= s + v * GELU_K * s * (1.0 - s);
        }
    });
}

/// `out = a + b`.
pub fn add(out: &mut [f32], a: &[f32], b: &[f32]) {
    assert!(out.len() == a.len() && a.len() == b.len());
    out.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK)).zip(b.par_chunks(CHUNK)).for_each(|((o, a), b)| {
        for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
            *o = a + b;
        }
    });
}
