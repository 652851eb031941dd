//! Softmax cross-entropy over the palette, fused with its gradient.

use super::simd;
use rayon::prelude::*;

/// Per-row loss `-log softmax(logits)[target]` into `losses`. When `grad_scale` is given,
/// `logits` is overwritten by `grad_scale * (softmax - onehot)`, its gradient.
pub fn cross_entropy(
    logits: &mut [f32],
    losses: &mut [f32],
    targets: &[u16],
    v: usize,
    grad_scale: Option<f32>,
) {
    assert_eq!(logits.len(), targets.len() * v);
    assert_eq!(losses.len(), targets.len());
    logits
        .par_chunks_mut(v)
        .zip(losses.par_iter_mut())
        .zip(targets.par_iter())
        .for_each(|((row, loss), &tgt)| {
            let tgt = tgt as usize;
            assert!(
                tgt < v,
                "target token {tgt} is outside the palette of {v} colours"
            );
            let max = simd::max(row);
            let z_tgt = row[tgt];
            match grad_scale {
                Some(scale) => {
                    let sum = simd::exp_shifted(row, max);
                    *loss = max + sum.ln() - z_tgt;
                    simd::scale(row, scale / sum);
                    row[tgt] -= scale;
                }
                None => {
                    let sum = simd::sum_exp_shifted(row, max);
                    *loss = max + sum.ln() - z_tgt;
                }
            }
        });
}

/// [`cross_entropy`] against separate targets, each position's loss and gradient multiplied
/// by its weight (BERT: 1 at masked positions, 0 elsewhere).
pub fn cross_entropy_weighted(
    logits: &mut [f32],
    losses: &mut [f32],
    targets: &[u16],
    weights: &[f32],
    v: usize,
    grad_scale: Option<f32>,
) {
    assert_eq!(weights.len(), targets.len());
    cross_entropy(logits, losses, targets, v, grad_scale);
    logits
        .par_chunks_mut(v)
        .zip(losses.par_iter_mut())
        .zip(weights.par_iter())
        .for_each(|((row, loss), &w)| {
            if w != 1.0 {
                *loss *= w;
                if grad_scale.is_some() {
                    simd::scale(row, w);
                }
            }
        });
}
