//! The masked-pixel (BERT) objective: which pixels are hidden, in training and in evaluation.
//!
//! Training hides a fresh 15% of each image every step; evaluation, features and classification
//! use fixed masks keyed by the image's index, so their numbers repeat from run to run. The
//! engine itself only sees the resulting flags ([`crate::model::Engine::forward_train`],
//! [`crate::model::Engine::forward_masked`], [`crate::model::Engine::probe_features`]).

use crate::config::ModelConfig;
use rand::{Rng, SeedableRng};

/// Fraction of each image's pixels the masked objective hides.
pub const MASK_RATE: f64 = 0.15;

/// Seed of the fixed masks a BERT model is evaluated with (held-out loss, features,
/// classification).
pub const EVAL_MASK_SEED: u64 = 0x5eed;

/// Masks a BERT model's features and predictions are averaged over unless told otherwise.
pub const EVAL_MASKS: usize = 5;

/// Pixels hidden per image of `t` pixels: 15%, at least one.
pub fn mask_count(t: usize) -> usize {
    ((t as f64 * MASK_RATE).round() as usize).clamp(1, t)
}

/// Marks `mask_count(t)` positions of `out` (`t` flags), chosen uniformly without replacement
/// by a generator seeded from `(seed, key)`; `perm` is reused scratch.
pub fn mask(seed: u64, key: u64, perm: &mut Vec<usize>, out: &mut [bool]) {
    let t = out.len();
    perm.clear();
    perm.extend(0..t);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
        seed ^ key.wrapping_add(1).wrapping_mul(0xD1B5_4A32_D192_ED03),
    );
    out.fill(false);
    for i in 0..mask_count(t) {
        let j = rng.random_range(i..t);
        perm.swap(i, j);
        out[perm[i]] = true;
    }
}

/// Training masks for consecutive images (`out`: `t` flags per image), the first keyed by
/// `first_key` and each next one by the next key: a step's images have keys
/// `step * batch + slot`, whichever pass or process computes them.
pub fn training_masks(
    seed: u64,
    first_key: u64,
    t: usize,
    perm: &mut Vec<usize>,
    out: &mut [bool],
) {
    for (i, m) in out.chunks_exact_mut(t).enumerate() {
        mask(seed, first_key + i as u64, perm, m);
    }
}

/// Evaluation mask `k` of `masks` for images `start..start + b` (of `t` pixels each) into
/// `out`: fixed by the image's index.
pub fn eval_masks(
    start: usize,
    b: usize,
    t: usize,
    masks: usize,
    k: usize,
    perm: &mut Vec<usize>,
    out: &mut [bool],
) {
    for i in 0..b {
        let key = ((start + i) * masks + k) as u64;
        mask(EVAL_MASK_SEED, key, perm, &mut out[i * t..(i + 1) * t]);
    }
}

/// A number of evaluation masks a model cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MasksError {
    #[error("evaluation masks ({0} asked for) are for BERT models; this one is autoregressive")]
    Autoregressive(usize),
    #[error(
        "a BERT model's likelihood is scored on hidden pixels: it needs at least 1 mask per image"
    )]
    NoMasks,
}

/// The number of evaluation masks for a model's features and predictions: `asked`, else
/// [`EVAL_MASKS`] for BERT models and 0 for autoregressive ones (which have no masks). 0 reads
/// a BERT model's images whole.
pub fn masks_for(model: &ModelConfig, asked: Option<usize>) -> Result<usize, MasksError> {
    match asked {
        Some(k) if k > 0 && model.causal() => Err(MasksError::Autoregressive(k)),
        Some(k) => Ok(k),
        None if model.causal() => Ok(0),
        None => Ok(EVAL_MASKS),
    }
}

/// The number of fixed masks a model's held-out loss is averaged over: `asked`, else 1 (the mask
/// training's validation uses) for BERT models; autoregressive models take none (the count is
/// then ignored).
pub fn loss_masks(model: &ModelConfig, asked: Option<usize>) -> Result<usize, MasksError> {
    match asked {
        Some(0) if !model.causal() => Err(MasksError::NoMasks),
        Some(_) => masks_for(model, asked),
        None => Ok(1),
    }
}
