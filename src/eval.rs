//! Likelihood of images under a model: the held-out loss of a data set
//! ([`crate::train::evaluate`]) and each image's own score.

use crate::data::TokenSet;
use crate::model::Engine;
use anyhow::{Result, ensure};

pub use crate::train::{evaluate, evaluate_masks};

/// Each image's mean negative log-likelihood in nats per token, in the order of `tokens`,
/// under an autoregressive `engine` (batch by batch; `on_batch` sees how many are done).
pub fn score_images(
    engine: &mut Engine,
    tokens: &TokenSet,
    mut on_batch: impl FnMut(usize) + Send,
) -> Result<Vec<f64>> {
    let (t, batch) = (engine.cfg.n_ctx(), engine.batch);
    ensure!(
        engine.cfg.causal(),
        "per-image likelihoods are for autoregressive models; this one is BERT"
    );
    ensure!(
        tokens.header.t == t && tokens.header.n_vocab == engine.cfg.n_vocab,
        "the images ({} tokens, {} colours) do not fit the model ({t} tokens, {} colours)",
        tokens.header.t,
        tokens.header.n_vocab,
        engine.cfg.n_vocab
    );
    let mut buf = vec![0u16; batch * t];
    let mut scores = Vec::with_capacity(tokens.len());
    // Runs on the thread pool, as training does, so kernels use its local queues.
    rayon::scope(|_| -> Result<()> {
        for start in (0..tokens.len()).step_by(batch) {
            let b = batch.min(tokens.len() - start);
            for i in 0..b {
                tokens.copy_image(start + i, &mut buf[i * t..(i + 1) * t]);
            }
            engine.forward(&buf[..b * t])?;
            for per_image in engine.position_losses().chunks(t) {
                scores.push(per_image.iter().map(|&x| x as f64).sum::<f64>() / t as f64);
            }
            on_batch(start + b);
        }
        Ok(())
    })?;
    Ok(scores)
}
