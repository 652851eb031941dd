//! Softmax cross-entropy over the palette, fused with its gradient.

use rayon::prelude::*;

/// Per-row loss `-log softmax(logits)[target]` into `losses`. When `grad_scale` is given,
/// `logits` is overwritten by `grad_scale * (softmax - onehot)`, its gradient.
pub fn cross_entropy(logits: &mut [f32], losses: &mut [f32], targets: &[u16], v: usize, grad_scale: Option<f32>) {
    assert_eq!(logits.len(), targets.len() * v);
    assert_eq!(losses.len(), targets.len());
    logits.par_chunks_mut(v).zip(losses.par_iter_mut()).zip(targets.par_iter()).for_each(|((row, loss), &tgt)| {
        let tgt = tgt as usize;
        assert!(tgt < v, "target token {tgt} is outside the palette of {v} colours");
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = row.iter().map(|&z| (z - max).exp()).sum();
        let log_z = max + sum.ln();
        *loss = log_z - row[tgt];
        if let Some(scale) = grad_scale {
            for z in row.iter_mut() {
                *z = (*z - log_z).exp() * scale;
            }
            row[tgt] -= scale;
        }
    });
}
