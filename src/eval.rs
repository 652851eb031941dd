//! Likelihood of images under a model: the held-out loss of a data set ([`evaluate`]) and each
//! image's own score ([`score_images`]).

use crate::bert;
use crate::data::TokenSet;
use crate::model::Engine;
use crate::stop::Report;
use anyhow::{Result, ensure};

/// Each image's mean negative log-likelihood in nats per token, in the order of `tokens`,
/// under an autoregressive `engine` (batch by batch; `on_batch` sees how many are done, and may
/// stop the job: [`crate::stop`]).
pub fn score_images(
    engine: &mut Engine,
    tokens: &TokenSet,
    mut on_batch: impl Report<usize>,
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
            on_batch.report(start + b)?;
        }
        Ok(())
    })?;
    Ok(scores)
}

/// Mean loss in nats per token of `engine`'s model over (the first `max_images`, 0 = all,
/// of) `data`, with the start token as in training; a BERT model's loss is per hidden pixel
/// under one fixed mask per image (the same at every evaluation, so runs compare). `buf` is
/// reused batch storage.
pub fn evaluate(
    engine: &mut Engine,
    data: &TokenSet,
    max_images: usize,
    buf: &mut Vec<u16>,
) -> Result<f64> {
    evaluate_masks(engine, data, max_images, 1, buf)
}

/// [`evaluate`], with a BERT model's loss averaged over `masks` fixed masks per image (those
/// of [`bert::eval_masks`]; one mask gives [`evaluate`]'s). Autoregressive models ignore
/// `masks`.
pub fn evaluate_masks(
    engine: &mut Engine,
    data: &TokenSet,
    max_images: usize,
    masks: usize,
    buf: &mut Vec<u16>,
) -> Result<f64> {
    let t = engine.cfg.n_ctx();
    ensure!(
        data.header.t == t && data.header.n_vocab == engine.cfg.n_vocab,
        "the data ({} tokens per image, {} colours) does not fit the model ({t} tokens, {} colours)",
        data.header.t,
        data.header.n_vocab,
        engine.cfg.n_vocab
    );
    let n = if max_images == 0 {
        data.len()
    } else {
        max_images.min(data.len())
    };
    ensure!(n > 0, "no images to evaluate on");
    buf.resize(engine.batch * t, 0);
    let bert = !engine.cfg.causal();
    let masks = if bert { masks.max(1) } else { 1 };
    let mut mask = if bert {
        vec![false; engine.batch * t]
    } else {
        Vec::new()
    };
    let mut perm = Vec::new();
    let mut sum = 0.0;
    let mut start = 0;
    while start < n {
        let b = engine.batch.min(n - start);
        for i in 0..b {
            data.copy_image(start + i, &mut buf[i * t..(i + 1) * t]);
        }
        if bert {
            for k in 0..masks {
                bert::eval_masks(start, b, t, masks, k, &mut perm, &mut mask);
                sum += engine.forward_masked(&buf[..b * t], &mask[..b * t])?;
            }
        } else {
            sum += engine.forward(&buf[..b * t])?;
        }
        start += b;
    }
    let per_image = if bert { bert::mask_count(t) } else { t };
    Ok(sum / (n * per_image * masks) as f64)
}
