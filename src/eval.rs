//! Likelihood of images under a model: the held-out loss of a data set ([`evaluate`]) and each
//! image's own score ([`score_images`]).

use crate::bert;
use crate::data::TokenSet;
use crate::model::Engine;
use crate::parallel::{Collective, Single, TeamExt};
use crate::stop::Report;
use anyhow::{Result, ensure};

/// Each image's mean negative log-likelihood in nats per token, in the order of `tokens`,
/// under an autoregressive `engine` (batch by batch; `on_batch` sees how many are done, and may
/// stop the job: [`crate::stop`]).
pub fn score_images(
    engine: &mut Engine,
    tokens: &TokenSet,
    on_batch: impl Report<usize>,
) -> Result<Vec<f64>> {
    let scores = score_images_shared(&mut Single::default(), engine, tokens, on_batch)?;
    Ok(scores.expect("a process alone leads"))
}

/// [`score_images`] with the images split over `team` (whole batches each): every score on
/// rank 0, the same to the last bit as one process's; `None` on the other ranks. `on_batch`
/// counts this rank's images.
pub fn score_images_shared(
    team: &mut dyn Collective,
    engine: &mut Engine,
    tokens: &TokenSet,
    mut on_batch: impl Report<usize>,
) -> Result<Option<Vec<f64>>> {
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
    let mine = team.share(tokens.len(), batch);
    let mut scores = Vec::with_capacity(mine.len());
    // Runs on the thread pool, as training does, so kernels use its local queues.
    rayon::scope(|_| -> Result<()> {
        for start in mine.clone().step_by(batch) {
            let b = batch.min(tokens.len() - start);
            for i in 0..b {
                tokens.copy_image(start + i, &mut buf[i * t..(i + 1) * t]);
            }
            engine.forward(&buf[..b * t])?;
            for per_image in engine.position_losses().chunks(t) {
                scores.push(per_image.iter().map(|&x| x as f64).sum::<f64>() / t as f64);
            }
            on_batch.report(start + b - mine.start)?;
        }
        Ok(())
    })?;
    team.gather_values(&scores)
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
    let alone = &mut Single::default();
    let mean = evaluate_shared(alone, engine, data, max_images, masks, buf)?;
    Ok(mean.expect("a process alone leads"))
}

/// [`evaluate_masks`] with the images split over `team` (whole batches each): the mean on
/// rank 0, the same to the last bit as one process's (the batches' sums are added in the same
/// order); `None` on the other ranks.
pub fn evaluate_shared(
    team: &mut dyn Collective,
    engine: &mut Engine,
    data: &TokenSet,
    max_images: usize,
    masks: usize,
    buf: &mut Vec<u16>,
) -> Result<Option<f64>> {
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
    // Each pass's summed loss, added up in order on rank 0.
    let mut sums = Vec::new();
    let mine = team.share(n, engine.batch);
    for start in mine.step_by(engine.batch) {
        let b = engine.batch.min(n - start);
        for i in 0..b {
            data.copy_image(start + i, &mut buf[i * t..(i + 1) * t]);
        }
        if bert {
            for k in 0..masks {
                bert::eval_masks(start, b, t, masks, k, &mut perm, &mut mask);
                sums.push(engine.forward_masked(&buf[..b * t], &mask[..b * t])?);
            }
        } else {
            sums.push(engine.forward(&buf[..b * t])?);
        }
    }
    let per_image = if bert { bert::mask_count(t) } else { t };
    let Some(all) = team.gather_values(&sums)? else {
        return Ok(None);
    };
    let sum = all.iter().fold(0.0, |acc, s| acc + s);
    Ok(Some(sum / (n * per_image * masks) as f64))
}
