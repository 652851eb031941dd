//! Sampling: temperature, top-k and top-p over the palette, unconditional generation and
//! completion of given prefixes, streamed row by row.

use crate::backend::cpu::simd;
use crate::model::Decoder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// Rows of one step drawn on one thread before the step's draws are split among threads:
/// below it, handing rows to other threads costs more than drawing them.
const ROWS_PER_THREAD: usize = 8;

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

/// Memory [`choose_token`] reuses from draw to draw (it grows to the palette size once).
#[derive(Debug, Clone, Default)]
pub struct SampleScratch {
    /// Each colour's unnormalised probability, in colour order.
    weights: Vec<f32>,
    /// (weight, colour) of the colours top-k and top-p keep, most likely first.
    ranked: Vec<(f32, u16)>,
    /// Each colour's place in that order, as one integer (see `most_likely`).
    keys: Vec<u64>,
}

/// Draws one token from `logits` with one number from `rng` ([`choose_token`]).
pub fn sample_token(
    logits: &[f32],
    opts: &SampleOptions,
    rng: &mut impl Rng,
    scratch: &mut SampleScratch,
) -> u16 {
    choose_token(logits, opts, rng.random::<f32>(), scratch)
}

/// The token `u` (in `[0, 1)`) picks from `logits`, with reusable scratch. Each colour weighs
/// `e^((z - max) / temperature)` (the vectorised exponential of the CPU backend, the same on
/// every machine); top-k and top-p cut the palette, most likely first; `u` picks the colour,
/// walking the kept colours in order (colour order when nothing is cut). Temperature 0 and
/// top-k 1 take the first most likely colour, as do logits whose weights cannot be drawn from.
///
/// This is the rule every backend draws with ([`crate::backend::Backend::draw_tokens`]): the
/// CPU backend calls this function; the CUDA backend's `draw_tokens` kernel does the same
/// float operations in the same order, so it picks the same colour.
pub fn choose_token(
    logits: &[f32],
    opts: &SampleOptions,
    u: f32,
    scratch: &mut SampleScratch,
) -> u16 {
    // The first most likely colour; a logit that is not a number never wins.
    let argmax = || {
        let (mut best, mut best_z) = (0, f32::NEG_INFINITY);
        for (i, &z) in logits.iter().enumerate() {
            if z > best_z {
                (best, best_z) = (i, z);
            }
        }
        best as u16
    };
    if opts.temperature == 0.0 || opts.top_k == 1 || logits.is_empty() {
        return argmax();
    }
    let inv_t = 1.0 / opts.temperature;
    let max = simd::max(logits);
    let weights = &mut scratch.weights;
    weights.resize(logits.len(), 0.0);
    let total = simd::exp_scaled(weights, logits, max, inv_t);
    let cut_k = opts.top_k > 0 && opts.top_k < logits.len();
    if !cut_k && opts.top_p >= 1.0 {
        // The whole palette, in colour order.
        let colours = weights.iter().enumerate().map(|(i, &w)| (w, i as u16));
        return draw(colours, total, u).unwrap_or_else(argmax);
    }
    // Most likely first; ties broken by colour index, so the order is total and fixed.
    let kept = if cut_k { opts.top_k } else { logits.len() };
    let ranked = &mut scratch.ranked;
    most_likely(weights, kept, &mut scratch.keys, ranked);
    if opts.top_p < 1.0 {
        let total: f32 = ranked.iter().map(|p| p.0).sum();
        let mut acc = 0.0;
        let mut keep = ranked.len();
        for (i, p) in ranked.iter().enumerate() {
            acc += p.0 / total;
            if acc >= opts.top_p {
                keep = i + 1;
                break;
            }
        }
        ranked.truncate(keep);
    }
    let total: f32 = ranked.iter().map(|p| p.0).sum();
    draw(ranked.iter().copied(), total, u).unwrap_or_else(argmax)
}

/// The `k` (1 to all) heaviest of `weights` as (weight, colour), heaviest first, equal weights
/// in colour order, a NaN weight above all others. Each colour becomes one integer whose
/// ascending order is that order (the weight's `total_cmp` key inverted, then the colour), so
/// selecting and sorting compare plain integers.
fn most_likely(weights: &[f32], k: usize, keys: &mut Vec<u64>, ranked: &mut Vec<(f32, u16)>) {
    keys.clear();
    keys.extend(weights.iter().enumerate().map(|(i, &w)| {
        // Every NaN ranks as one (a NaN's sign depends on the machine that made it).
        let w = if w.is_nan() { f32::NAN } else { w };
        // f32::total_cmp's order as unsigned integers.
        let bits = w.to_bits() as i32;
        let ordered = (bits ^ (((bits >> 31) as u32) >> 1) as i32) as u32 ^ 0x8000_0000;
        ((!ordered as u64) << 16) | i as u64
    }));
    keys.select_nth_unstable(k - 1);
    keys.truncate(k);
    keys.sort_unstable();
    ranked.clear();
    ranked.extend(keys.iter().map(|&key| {
        let colour = (key & 0xFFFF) as u16;
        (weights[colour as usize], colour)
    }));
}

/// Picks from (weight, colour) pairs summing to `total` with `u` in `[0, 1)`: the first colour
/// whose weight the remaining draw falls under. None (drawing nothing) when the weights are
/// not numbers that can be drawn from (the caller then takes the argmax).
fn draw(
    weighted: impl DoubleEndedIterator<Item = (f32, u16)> + Clone,
    total: f32,
    u: f32,
) -> Option<u16> {
    if !(total > 0.0 && total.is_finite()) {
        return None;
    }
    let mut u = u * total;
    for (p, id) in weighted.clone() {
        if u < p {
            return Some(id);
        }
        u -= p;
    }
    // Rounding left the draw past the end: the last colour that can be drawn.
    weighted.rev().find(|p| p.0 > 0.0).map(|p| p.1)
}

/// The tokens of one decoding step at position `pos`: row r of `logits` (`[rows, v]`) is image
/// `images[live[r]]`, whose token is its known one where its prefix reaches `pos` (with that
/// token's negative log-likelihood) or one drawn with its options and its number for `pos`
/// (`numbers` is `[rows, n_ctx]`, from [`draw_numbers`]). `drawn` receives one entry per row.
pub fn next_tokens(
    logits: &[f32],
    live: &[usize],
    images: &[ImageSpec],
    pos: usize,
    numbers: &[f32],
    drawn: &mut Vec<(u16, Option<f64>)>,
) {
    let rows = live.len();
    assert!(
        rows > 0 && logits.len().is_multiple_of(rows) && numbers.len().is_multiple_of(rows),
        "next_tokens: {rows} rows of logits and numbers"
    );
    let (v, t) = (logits.len() / rows, numbers.len() / rows);
    let row = |r: usize, scratch: &mut SampleScratch| {
        let z = &logits[r * v..(r + 1) * v];
        let image = &images[live[r]];
        match image.prefix.get(pos) {
            Some(&given) => (given, Some(neg_log_prob(z, given))),
            None => (
                choose_token(z, &image.opts, numbers[r * t + pos], scratch),
                None,
            ),
        }
    };
    for_each_row(rows, row, drawn);
}

/// `out[r] = f(r, scratch)` for each of `rows` rows. Many rows run in parallel; each entry
/// depends only on its row, so the result is the same on any number of threads. `out` and
/// each thread's scratch keep their memory from call to call.
pub fn for_each_row<T: Send>(
    rows: usize,
    f: impl Fn(usize, &mut SampleScratch) -> T + Sync,
    out: &mut Vec<T>,
) {
    thread_local! {
        static SCRATCH: std::cell::RefCell<SampleScratch> = std::cell::RefCell::new(SampleScratch::default());
    }
    let run = |r| SCRATCH.with(|s| f(r, &mut s.borrow_mut()));
    out.clear();
    if rows < 2 * ROWS_PER_THREAD || rayon::current_num_threads() == 1 {
        out.extend((0..rows).map(run));
    } else {
        out.par_extend(
            (0..rows)
                .into_par_iter()
                .with_min_len(ROWS_PER_THREAD)
                .map(run),
        );
    }
}

/// The numbers image `spec` draws its colours with, one per position of `out` (`n_ctx`): in
/// order from its stream ([`image_rng`]), one for each position after its prefix, drawn or
/// not (temperature 0 uses none); 0 for the prefix's positions.
pub fn draw_numbers(spec: &ImageSpec, out: &mut [f32]) {
    let mut rng = image_rng(spec.opts.seed, spec.stream);
    let first = spec.prefix.len().min(out.len());
    out[..first].fill(0.0);
    for u in &mut out[first..] {
        *u = rng.random();
    }
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
    anyhow::ensure!(
        prefix.len() == decoder.batch,
        "{} prefixes for a batch of {}",
        prefix.len(),
        decoder.batch
    );
    let images: Vec<ImageSpec> = prefix
        .iter()
        .enumerate()
        .map(|(b, p)| ImageSpec {
            prefix: p,
            opts: *opts,
            stream: first_index + b as u64,
        })
        .collect();
    let known = prefix.iter().map(|p| p.len()).min().unwrap_or(0);
    let done = generate_images(decoder, &images, known, |row, tokens, _| {
        on_row(row, tokens)
    })?;
    Ok(done.tokens)
}

/// One image to generate: its known first tokens, how the rest is drawn, and its random
/// stream (with `opts.seed`, as [`image_rng`]).
#[derive(Debug, Clone, Copy)]
pub struct ImageSpec<'a> {
    pub prefix: &'a [u16],
    pub opts: SampleOptions,
    pub stream: u64,
}

/// What [`generate_images`] made.
#[derive(Debug, Clone)]
pub struct Generated {
    /// `[images, n_ctx]`; an image dropped part-way keeps the rows it had.
    pub tokens: Vec<u16>,
    /// Per image: the negative log-likelihood (nats) of its known tokens that were fed after
    /// the prefill, and how many there were: an image whose every token is known, generated
    /// with no prefill, is scored at every position.
    pub nats: Vec<f64>,
    pub scored: Vec<usize>,
}

/// Generates `images` (at most `decoder.batch`), each with its own prefix, sampling options
/// and random stream, so an image's pixels do not depend on which images share its batch.
/// The first `prefill` tokens (at most the shortest prefix) go through the model in one
/// prefill. After each complete row, `on_row(row, tokens, wanted)` sees every image's tokens
/// so far (`[images, n_ctx]`) and may set `wanted[i] = false`: image i is then dropped from
/// every later step, and generation ends early when none is left.
pub fn generate_images(
    decoder: &mut Decoder,
    images: &[ImageSpec],
    prefill: usize,
    mut on_row: impl FnMut(usize, &[u16], &mut [bool]),
) -> anyhow::Result<Generated> {
    let (n, t, side) = (images.len(), decoder.cfg.n_ctx(), decoder.cfg.side);
    anyhow::ensure!(
        (1..=decoder.batch).contains(&n),
        "{n} images for a decoder of batch {}",
        decoder.batch
    );
    for im in images {
        im.opts.validate()?;
        anyhow::ensure!(
            im.prefix.len() <= t,
            "a prefix of {} pixels is longer than the image ({t} pixels)",
            im.prefix.len()
        );
        anyhow::ensure!(
            prefill <= im.prefix.len(),
            "a prefill of {prefill} pixels is longer than a prefix of {}",
            im.prefix.len()
        );
    }
    // Decoder row r's options and numbers, as `live` and `prev` are its image and last token.
    let mut options: Vec<SampleOptions> = images.iter().map(|im| im.opts).collect();
    let mut numbers = vec![0.0f32; n * t];
    for (im, row) in images.iter().zip(numbers.chunks_mut(t)) {
        draw_numbers(im, row);
    }
    let mut out = Generated {
        tokens: vec![0u16; n * t],
        nats: vec![0.0; n],
        scored: vec![0; n],
    };
    let mut wanted = vec![true; n];
    let mut prev = vec![0u16; n];
    let mut drawn = Vec::with_capacity(n);
    let mut first: Vec<u16> = Vec::with_capacity(n * prefill);
    for (b, im) in images.iter().enumerate() {
        first.extend_from_slice(&im.prefix[..prefill]);
        out.tokens[b * t..b * t + prefill].copy_from_slice(&im.prefix[..prefill]);
        prev[b] = if prefill > 0 {
            im.prefix[prefill - 1]
        } else {
            0
        };
    }
    decoder.prefill_rows(n, &first, prefill)?;
    // Decoder row r holds image live[r].
    let mut live: Vec<usize> = (0..n).collect();
    for row in 0..prefill / side {
        on_row(row, &out.tokens, &mut wanted);
    }
    // Once no image has a known token left, the backend draws the tokens itself and they stay
    // there as the next step's inputs: the host fetches them once a row, not every step.
    let mut draws_set = false;
    let mut inputs_drawn = false;
    let mut unfetched: Option<usize> = None;
    for pos in prefill..t {
        if live.iter().any(|&i| !wanted[i]) {
            let keep: Vec<usize> = (0..live.len()).filter(|&r| wanted[live[r]]).collect();
            if keep.is_empty() {
                break;
            }
            decoder.retain(&keep)?;
            live = keep.iter().map(|&r| live[r]).collect();
            prev = keep.iter().map(|&r| prev[r]).collect();
            options = keep.iter().map(|&r| options[r]).collect();
            numbers = keep
                .iter()
                .flat_map(|&r| numbers[r * t..(r + 1) * t].iter().copied())
                .collect();
            (draws_set, inputs_drawn) = (false, false);
        }
        if live.iter().all(|&i| images[i].prefix.len() <= pos) {
            if !draws_set {
                decoder.set_draws(&options, &numbers)?;
                draws_set = true;
            }
            decoder.step_drawing((!inputs_drawn).then_some(&prev[..]))?;
            inputs_drawn = true;
            unfetched.get_or_insert(pos);
        } else {
            let logits = decoder.step(&prev)?;
            next_tokens(logits, &live, images, pos, &numbers, &mut drawn);
            for (r, (&i, &(tok, nats))) in live.iter().zip(&drawn).enumerate() {
                if let Some(nats) = nats {
                    out.nats[i] += nats;
                    out.scored[i] += 1;
                }
                out.tokens[i * t + pos] = tok;
                prev[r] = tok;
            }
        }
        let row_done = (pos + 1) % side == 0;
        if let Some(from) = unfetched
            && (row_done || pos + 1 == t)
        {
            let rows = live.len();
            let got = decoder.drawn(from, pos + 1)?;
            for (p, tokens) in (from..=pos).zip(got.chunks_exact(rows)) {
                for (&i, &tok) in live.iter().zip(tokens) {
                    out.tokens[i * t + p] = tok;
                }
            }
            prev.copy_from_slice(&got[got.len() - rows..]);
            unfetched = None;
        }
        if row_done {
            on_row((pos + 1) / side - 1, &out.tokens, &mut wanted);
        }
    }
    Ok(out)
}

/// `-log softmax(logits)[id]`, in nats, computed in f64.
fn neg_log_prob(logits: &[f32], id: u16) -> f64 {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&z| (z as f64 - max).exp()).sum();
    max + sum.ln() - logits[id as usize] as f64
}

/// Generates one image per entry of `prefixes` (each the known first tokens; empty for an
/// unconditional sample), `decoder.batch` at a time; image i draws from stream i, so the result
/// does not depend on the batch size. `on_pixels(done)` sees how many pixels of all images are
/// done, after each row, and may stop the job ([`crate::stop`]). Returns `[prefixes.len(),
/// n_ctx]` tokens.
pub fn generate_all(
    decoder: &mut Decoder,
    prefixes: &[Vec<u16>],
    opts: &SampleOptions,
    mut on_pixels: impl crate::stop::Report<u64>,
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
            // A short last batch decodes only its own images.
            let count = batch.min(n - start);
            let images: Vec<ImageSpec> = (start..start + count)
                .map(|i| ImageSpec {
                    prefix: &prefixes[i],
                    opts: *opts,
                    stream: i as u64,
                })
                .collect();
            let known = images.iter().map(|im| im.prefix.len()).min().unwrap_or(0);
            let done = (start * t) as u64;
            let mut stopped = Ok(());
            let made = generate_images(decoder, &images, known, |row, _, wanted| {
                if stopped.is_ok() {
                    stopped = on_pixels.report(done + (((row + 1) * side) * count) as u64);
                }
                if stopped.is_err() {
                    // Dropping every image ends the batch at this row.
                    wanted.fill(false);
                }
            })?;
            stopped?;
            out.extend_from_slice(&made.tokens);
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
