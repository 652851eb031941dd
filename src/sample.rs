//! Sampling: temperature, top-k and top-p over the palette, unconditional generation and
//! completion of given prefixes, streamed row by row.

use crate::model::Decoder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How the next colour is drawn from the model's distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleOptions {
    /// Softmax temperature; 1 samples the model's own distribution (as the paper), 0 is greedy.
    pub temperature: f32,
    /// Keep only the k most likely colours (0: all).
    pub top_k: usize,
    /// Keep the smallest set of colours whose probability reaches p (1: all).
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SampleOptions {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl SampleOptions {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.temperature >= 0.0 && self.temperature.is_finite(),
            "the sampling temperature must be 0 or more (got {})",
            self.temperature
        );
        anyhow::ensure!(
            self.top_p > 0.0 && self.top_p <= 1.0,
            "the top-p probability mass must be in (0, 1] (got {})",
            self.top_p
        );
        Ok(())
    }
}

/// Draws one token from `logits` with reusable scratch (`probs` grows to the palette size once).
pub fn sample_token(
    logits: &[f32],
    opts: &SampleOptions,
    rng: &mut impl Rng,
    probs: &mut Vec<(f32, u16)>,
) -> u16 {
    let argmax = || {
        let mut best = 0;
        for (i, &z) in logits.iter().enumerate() {
            if z > logits[best] {
                best = i;
            }
        }
        best as u16
    };
    if opts.temperature == 0.0 || opts.top_k == 1 {
        return argmax();
    }
    let inv_t = 1.0 / opts.temperature;
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    probs.clear();
    probs.extend(
        logits
            .iter()
            .enumerate()
            .map(|(i, &z)| (((z - max) * inv_t).exp(), i as u16)),
    );
    let restricted = opts.top_k > 0 && opts.top_k < probs.len() || opts.top_p < 1.0;
    if restricted {
        // Most likely first; ties broken by colour index so the order is fixed.
        probs.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        if opts.top_k > 0 && opts.top_k < probs.len() {
            probs.truncate(opts.top_k);
        }
        if opts.top_p < 1.0 {
            let total: f32 = probs.iter().map(|p| p.0).sum();
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                acc += p.0 / total;
                if acc >= opts.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
    }
    let total: f32 = probs.iter().map(|p| p.0).sum();
    if !(total > 0.0 && total.is_finite()) {
        return argmax();
    }
    let mut u = rng.random::<f32>() * total;
    for &(p, id) in probs.iter() {
        if u < p {
            return id;
        }
        u -= p;
    }
    probs
        .iter()
        .rev()
        .find(|p| p.0 > 0.0)
        .map_or_else(argmax, |p| p.1)
}

/// The random stream of image `index`: one per image, so an image does not depend on which
/// other images share its batch.
pub fn image_rng(seed: u64, index: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream(index);
    r
}

/// Generates `decoder.batch` images. `prefix[b]` holds the known first tokens of image b
/// (empty for unconditional samples); they are fed as they are and only the rest is sampled
/// (the pixels all images know go through the model in one prefill).
/// `first_index` numbers the images for their random streams. `on_row(row, tokens)` is called
/// each time a row of pixels is complete, with every image's tokens so far (`[batch, n_ctx]`).
pub fn generate(
    decoder: &mut Decoder,
    prefix: &[&[u16]],
    opts: &SampleOptions,
    first_index: u64,
    mut on_row: impl FnMut(usize, &[u16]),
) -> anyhow::Result<Vec<u16>> {
    opts.validate()?;
    let (batch, t, side) = (decoder.batch, decoder.cfg.n_ctx(), decoder.cfg.side);
    anyhow::ensure!(
        prefix.len() == batch,
        "{} prefixes for a batch of {batch}",
        prefix.len()
    );
    for p in prefix {
        anyhow::ensure!(
            p.len() <= t,
            "a prefix of {} pixels is longer than the image ({t} pixels)",
            p.len()
        );
    }
    let mut rngs: Vec<ChaCha8Rng> = (0..batch as u64)
        .map(|b| image_rng(opts.seed, first_index + b))
        .collect();
    let mut tokens = vec![0u16; batch * t];
    let mut prev = vec![0u16; batch];
    let mut probs = Vec::with_capacity(decoder.cfg.n_vocab);
    // The pixels every image knows go through the model at once.
    let known = prefix.iter().map(|p| p.len()).min().unwrap_or(0);
    let mut first: Vec<u16> = Vec::with_capacity(batch * known);
    for (b, p) in prefix.iter().enumerate() {
        first.extend_from_slice(&p[..known]);
        tokens[b * t..b * t + known].copy_from_slice(&p[..known]);
        prev[b] = if known > 0 { p[known - 1] } else { 0 };
    }
    decoder.prefill(&first, known)?;
    for row in 0..known / side {
        on_row(row, &tokens);
    }
    for pos in known..t {
        let logits = decoder.step(&prev)?;
        let v = logits.len() / batch;
        for b in 0..batch {
            let tok = match prefix[b].get(pos) {
                Some(&given) => given,
                None => sample_token(&logits[b * v..(b + 1) * v], opts, &mut rngs[b], &mut probs),
            };
            tokens[b * t + pos] = tok;
            prev[b] = tok;
        }
        if (pos + 1) % side == 0 {
            on_row((pos + 1) / side - 1, &tokens);
        }
    }
    Ok(tokens)
}

/// Generates one image per entry of `prefixes` (each the known first tokens; empty for an
/// unconditional sample), `decoder.batch` at a time; image i draws from stream i, so the result
/// does not depend on the batch size. `on_pixels(done)` sees how many pixels of all images are
/// done. Returns `[prefixes.len(), n_ctx]` tokens.
pub fn generate_all(
    decoder: &mut Decoder,
    prefixes: &[Vec<u16>],
    opts: &SampleOptions,
    mut on_pixels: impl FnMut(u64) + Send,
) -> anyhow::Result<Vec<u16>> {
    let (n, batch, t, side) = (
        prefixes.len(),
        decoder.batch,
        decoder.cfg.n_ctx(),
        decoder.cfg.side,
    );
    let mut out = Vec::with_capacity(n * t);
    // Runs on the thread pool, as training does, so kernels use its local queues.
    rayon::scope(|_| -> anyhow::Result<()> {
        for start in (0..n).step_by(batch) {
            let count = batch.min(n - start);
            // A short last batch is padded with copies of its first prefix; the extras are dropped.
            let refs: Vec<&[u16]> = (0..batch)
                .map(|i| prefixes[start + i.min(count - 1)].as_slice())
                .collect();
            let done = (start * t) as u64;
            let toks = generate(decoder, &refs, opts, start as u64, |row, _| {
                on_pixels(done + (((row + 1) * side) * count) as u64)
            })?;
            out.extend_from_slice(&toks[..count * t]);
        }
        Ok(())
    })?;
    Ok(out)
}

/// The prefixes that complete each image of `originals` (`[n, t]` tokens) from its first `keep`
/// pixels, `k` times each (image-major), for [`generate_all`].
pub fn completion_prefixes(originals: &[u16], t: usize, keep: usize, k: usize) -> Vec<Vec<u16>> {
    originals
        .chunks(t)
        .flat_map(|img| std::iter::repeat_n(img[..keep.min(img.len())].to_vec(), k))
        .collect()
}
