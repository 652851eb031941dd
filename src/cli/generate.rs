//! `igpt sample`, `igpt complete` and `igpt score`.

use anyhow::{Context, Result, ensure};
use clap::Args;
use igpt::backend::{Device, Precision};
use igpt::checkpoint::LoadedModel;
use igpt::data::{self, Format, ImageSet, TokenSet};
use igpt::grid;
use igpt::model::{Decoder, Engine};
use igpt::parallel::{Collective, Team, TeamExt};
use igpt::sample::{self, SampleOptions};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};

#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// Softmax temperature (1: the model's own distribution; 0: greedy).
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Sample only among the k most likely colours (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sample only among the most likely colours that together reach this probability.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// The same seed gives the same images.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Images generated together (one pass over the model per pixel serves the whole batch).
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Weights and key/value caches in bf16 or f32 (default: bf16 where the CPU multiplies
    /// bf16 natively, AVX-512 BF16; f32 elsewhere).
    #[arg(long)]
    precision: Option<Precision>,
}

impl SamplingArgs {
    fn options(&self) -> Result<SampleOptions> {
        ensure!(
            self.temperature >= 0.0 && self.temperature.is_finite(),
            "--temperature must be 0 or more (got {})",
            self.temperature
        );
        ensure!(
            self.top_p > 0.0 && self.top_p <= 1.0,
            "--top-p must be in (0, 1] (got {})",
            self.top_p
        );
        Ok(SampleOptions {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
        })
    }
}

#[derive(Args)]
pub struct SampleArgs {
    /// The model: an igpt run directory, a Hugging Face ImageGPT directory, an OpenAI
    /// TensorFlow checkpoint, or a hub name (openai/imagegpt-small, openai-tf/igpt-s-bert).
    #[arg(long)]
    model: String,
    /// Number of images.
    #[arg(long, default_value_t = 16)]
    n: usize,
    /// Grid of all samples (PNG).
    #[arg(long, default_value = "samples.png")]
    out: PathBuf,
    /// Images per grid row (default: about square).
    #[arg(long)]
    cols: Option<usize>,
    /// Also write the token ids as .npy (uint16 [n, side, side]).
    #[arg(long)]
    tokens: Option<PathBuf>,
    /// Also write each image as its own PNG into this folder.
    #[arg(long)]
    png_dir: Option<PathBuf>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Args)]
pub struct CompleteArgs {
    /// The model: an igpt run directory, a Hugging Face ImageGPT directory, an OpenAI
    /// TensorFlow checkpoint, or a hub name (openai/imagegpt-small, openai-tf/igpt-s-bert).
    #[arg(long)]
    model: String,
    /// Image files, or folders of them, to complete.
    #[arg(long, num_args = 1..)]
    images: Vec<PathBuf>,
    /// Or take images from a data set (a path or `fashion-mnist`).
    #[arg(long, conflicts_with = "images")]
    data: Option<String>,
    /// Images to take from --data.
    #[arg(long, default_value_t = 4)]
    n: usize,
    /// First image taken from --data.
    #[arg(long, default_value_t = 0)]
    offset: usize,
    /// Keep this many top rows of each image (default: half the image).
    #[arg(long)]
    rows: Option<usize>,
    /// Keep this many pixels (raster order) instead of whole rows.
    #[arg(long, conflicts_with = "rows")]
    prefix_pixels: Option<usize>,
    /// Completions per image.
    #[arg(long, default_value_t = 4)]
    k: usize,
    /// Grid: per input, the original, the kept part, and the completions (PNG).
    #[arg(long, default_value = "completions.png")]
    out: PathBuf,
    /// Also write the completions' token ids as .npy (uint16 [n * k, side, side], image-major).
    #[arg(long)]
    tokens: Option<PathBuf>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Args)]
pub struct ScoreArgs {
    /// The model: an igpt run directory, a Hugging Face ImageGPT directory, an OpenAI
    /// TensorFlow checkpoint, or a hub name (openai/imagegpt-small, openai-tf/igpt-s-bert).
    #[arg(long)]
    model: String,
    /// Image files or folders to score.
    #[arg(long, num_args = 1..)]
    images: Vec<PathBuf>,
    /// Or a data set (a path or `fashion-mnist`).
    #[arg(long, conflicts_with = "images")]
    data: Option<String>,
    /// Score only the first N images of --data.
    #[arg(long)]
    limit: Option<usize>,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Products in bf16 or f32 (default: bf16 where the CPU multiplies bf16 natively,
    /// AVX-512 BF16; f32 elsewhere).
    #[arg(long)]
    precision: Option<Precision>,
    /// Write `index,name,nats_per_token,bits_per_token` rows here.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Also write the token ids the images were scored on as .npy (uint16 [n, side, side]).
    #[arg(long)]
    tokens: Option<PathBuf>,
}

pub(super) fn pixel_bar(total: u64, what: &str) -> ProgressBar {
    let b = ProgressBar::new(total);
    b.set_style(
        ProgressStyle::with_template(&format!(
            "{{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} {what} {{per_sec}} ETA {{eta}}"
        ))
        .expect("valid template")
        .progress_chars("=> "),
    );
    b
}

/// A bar for this rank's share of `n` items in batches of `batch` (shown on rank 0 alone).
pub(super) fn share_bar(team: &dyn Collective, n: usize, batch: usize, what: &str) -> ProgressBar {
    if !team.leads() {
        return ProgressBar::hidden();
    }
    pixel_bar(team.share(n, batch).len() as u64, what)
}

/// Image files named directly or inside the given folders, sorted within each folder.
pub(super) fn image_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("cannot list {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    f.is_file()
                        && matches!(
                            f.extension()
                                .and_then(|e| e.to_str())
                                .map(|e| e.to_ascii_lowercase())
                                .as_deref(),
                            Some("png" | "jpg" | "jpeg")
                        )
                })
                .collect();
            v.sort();
            ensure!(
                !v.is_empty(),
                "{} holds no .png or .jpg images",
                p.display()
            );
            out.extend(v);
        } else {
            ensure!(p.exists(), "image {} does not exist", p.display());
            out.push(p.clone());
        }
    }
    ensure!(
        !out.is_empty(),
        "no images given: pass --images FILES or --data"
    );
    Ok(out)
}

/// Reads image files as the model sees them (`igpt::data::read_files`), saying what was
/// converted.
pub(super) fn load_images(files: &[PathBuf], m: &LoadedModel) -> Result<(ImageSet, Vec<String>)> {
    let set = data::read_files(files, m.model().side, m.model().channels, |f, note| {
        eprintln!("note: {}: {note}", f.display())
    })?;
    let names = files.iter().map(|f| f.display().to_string()).collect();
    Ok((set, names))
}

/// Images `offset..offset + n` of a data set, shaped for the model.
fn dataset_images(
    spec: &str,
    m: &LoadedModel,
    offset: usize,
    n: Option<usize>,
) -> Result<(ImageSet, Vec<String>)> {
    let end = n.map_or(usize::MAX, |n| offset.saturating_add(n));
    let set = data::load_shaped(
        spec,
        Format::Auto,
        Some(offset..end),
        Some(m.model().side),
        Some(m.model().channels),
    )?;
    let names = (offset..offset + set.len())
        .map(|i| format!("{spec}#{i}"))
        .collect();
    Ok((set, names))
}

/// Generates `n` images (with optional per-image prefixes) in batches, with a progress bar.
/// Takes the model's parameters over (the decoder holds them; a large model stays in memory once).
fn generate_all(
    m: &mut LoadedModel,
    prefixes: &[Vec<u16>],
    s: &SamplingArgs,
    dev: &Device,
) -> Result<Vec<u16>> {
    let cfg = m.config.model.clone();
    let cfg = &cfg;
    let n = prefixes.len();
    let batch = s.batch.clamp(1, n.max(1));
    let precision = s.precision.unwrap_or_else(|| dev.inference_precision());
    let mut dec =
        Decoder::with_precision(cfg, batch, dev, std::mem::take(&mut m.params), precision)?;
    let opts = s.options()?;
    let bar = pixel_bar((n * cfg.n_ctx()) as u64, "pixels");
    let out = sample::generate_all(&mut dec, prefixes, &opts, |done| bar.set_position(done))?;
    bar.finish_and_clear();
    if let Some(why) = dec.replay_failure() {
        eprintln!(
            "note: {dev} ran each decoding step call by call, without CUDA graphs (same \
             images, slower): {why}"
        );
    }
    Ok(out)
}

/// The memory `images` generated images of `t` pixels take as tokens, prefixes and tiles,
/// refused before any of it is allocated when it does not fit.
fn check_outputs(images: u128, t: usize, keep: usize) -> Result<()> {
    let t = t as u128;
    igpt::memory::Estimate::new()
        .add(
            "generated tokens and their prefixes",
            images * (2 * t + 24 + 2 * keep as u128),
            igpt::memory::Scale::Count,
        )
        .add(
            "image tiles and the grid",
            // A tile at the model's side, and its place in the grid (tiles are drawn up to
            // 128 pixels a side), in RGB.
            images * 3 * (t + t.max(128 * 128)),
            igpt::memory::Scale::Count,
        )
        .check(&format!("generating {images} images"))?;
    Ok(())
}

pub fn sample(a: SampleArgs, dev: &Device) -> Result<()> {
    ensure!(a.n >= 1, "--n must be at least 1");
    let mut m = igpt::formats::load_model(&a.model)?;
    let (side, t) = (m.model().side, m.model().n_ctx());
    check_outputs(a.n as u128, t, 0)?;
    let t0 = std::time::Instant::now();
    let tokens = generate_all(&mut m, &vec![Vec::new(); a.n], &a.sampling, dev)?;
    let secs = t0.elapsed().as_secs_f64();
    let tiles: Vec<_> = tokens
        .chunks(t)
        .map(|tk| grid::tokens_to_image(&m.palette, tk, side))
        .collect::<Result<_>>()?;
    let cols = a
        .cols
        .unwrap_or_else(|| (a.n as f64).sqrt().ceil() as usize);
    grid::save_grid(&a.out, &tiles, cols, grid::auto_scale(side), 2)?;
    println!(
        "{} samples in {secs:.1} s ({:.0} tokens/s): {}",
        a.n,
        (a.n * t) as f64 / secs,
        a.out.display()
    );
    if let Some(p) = &a.tokens {
        write_tokens(p, &tokens, side)?;
    }
    if let Some(dir) = &a.png_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        for (i, tile) in tiles.iter().enumerate() {
            let p = dir.join(format!("sample_{i:04}.png"));
            tile.save(&p)
                .with_context(|| format!("cannot write {}", p.display()))?;
        }
        println!("images: {}", dir.display());
    }
    Ok(())
}

pub fn complete(a: CompleteArgs, dev: &Device) -> Result<()> {
    ensure!(a.k >= 1, "--k must be at least 1");
    let mut m = igpt::formats::load_model(&a.model)?;
    let (side, t) = (m.model().side, m.model().n_ctx());
    let (set, _names) = match &a.data {
        Some(spec) => dataset_images(spec, &m, a.offset, Some(a.n))?,
        None => load_images(&image_files(&a.images)?, &m)?,
    };
    let keep = match (a.prefix_pixels, a.rows) {
        (Some(p), _) => p,
        (None, Some(r)) => r.checked_mul(side).context("--rows too large")?,
        (None, None) => side / 2 * side,
    };
    ensure!(
        keep <= t,
        "the prefix ({keep} pixels) is longer than the image ({t} pixels = {side} rows)"
    );
    check_outputs(
        set.len() as u128 * a.k as u128 + 2 * set.len() as u128,
        t,
        keep,
    )?;
    let originals = m.palette.encode(&set.pixels);
    let completions = complete_tokens(&mut m, &originals, keep, a.k, &a.sampling, &a.out, dev)?;
    if let Some(p) = &a.tokens {
        write_tokens(p, &completions, side)?;
    }
    Ok(())
}

/// Completes each image of `originals` (`[n, n_ctx]` tokens) from its first `keep` pixels,
/// `k` times, draws the grid and returns the completions (`[n * k, n_ctx]`, image-major).
fn complete_tokens(
    m: &mut LoadedModel,
    originals: &[u16],
    keep: usize,
    k: usize,
    s: &SamplingArgs,
    out: &Path,
    dev: &Device,
) -> Result<Vec<u16>> {
    let (side, t) = (m.model().side, m.model().n_ctx());
    let prefixes = sample::completion_prefixes(originals, t, keep, k);
    let tokens = generate_all(m, &prefixes, s, dev)?;
    let m = &*m;
    let mut tiles = Vec::new();
    for (i, img) in originals.chunks(t).enumerate() {
        tiles.push(grid::tokens_to_image(&m.palette, img, side)?);
        tiles.push(grid::occluded(&m.palette, img, side, keep)?);
        for j in 0..k {
            let c = &tokens[(i * k + j) * t..(i * k + j + 1) * t];
            ensure!(
                c[..keep] == img[..keep],
                "internal error: a completion changed its prefix"
            );
            tiles.push(grid::tokens_to_image(&m.palette, c, side)?);
        }
    }
    grid::save_grid(out, &tiles, k + 2, grid::auto_scale(side), 2)?;
    println!(
        "{} image(s), {k} completion(s) each from the first {keep} pixels: {} (columns: original, kept part, completions)",
        originals.len() / t,
        out.display()
    );
    Ok(tokens)
}

pub fn score(a: ScoreArgs, dev: &Device, mut team: Team) -> Result<()> {
    let mut m = igpt::formats::load_model(&a.model)?;
    let (set, names) = match &a.data {
        Some(spec) => dataset_images(spec, &m, 0, a.limit)?,
        None => load_images(&image_files(&a.images)?, &m)?,
    };
    let ids = m.palette.encode(&set.pixels);
    if let Some(p) = a.tokens.as_ref().filter(|_| team.leads()) {
        write_tokens(p, &ids, m.model().side)?;
    }
    let tokens = TokenSet::from_tokens(ids, m.model().n_ctx(), m.model().n_vocab, None)?;
    let batch = a.batch.clamp(1, tokens.len());
    let model = m.model().clone();
    let precision = a.precision.unwrap_or_else(|| dev.inference_precision());
    let mut engine =
        Engine::with_precision(&model, batch, dev, std::mem::take(&mut m.params), precision)?;
    // Each rank scores its share; rank 0 shows its own progress and everything after.
    let bar = share_bar(&*team, tokens.len(), batch, "images");
    let scores = igpt::eval::score_images_shared(&mut *team, &mut engine, &tokens, |done| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    let Some(scores) = scores else { return Ok(()) };
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&i, &j| scores[i].total_cmp(&scores[j]));
    println!(
        "{:>6}  {:>12}  {:>11}  image (most likely first)",
        "index", "nats/token", "bits/token"
    );
    let show = if order.len() > 20 {
        [&order[..10], &order[order.len() - 10..]].concat()
    } else {
        order.clone()
    };
    for (k, &i) in show.iter().enumerate() {
        if order.len() > 20 && k == 10 {
            println!("   ...");
        }
        println!(
            "{i:>6}  {:>12.4}  {:>11.4}  {}",
            scores[i],
            scores[i] / std::f64::consts::LN_2,
            names[i]
        );
    }
    let mean = scores.iter().sum::<f64>() / scores.len() as f64;
    println!(
        "{} images, mean {mean:.4} nats/token ({precision})",
        scores.len()
    );
    if let Some(p) = &a.csv {
        let mut text = String::from("index,name,nats_per_token,bits_per_token\n");
        for (i, s) in scores.iter().enumerate() {
            text.push_str(&format!(
                "{i},\"{}\",{s:.6},{:.6}\n",
                names[i].replace('"', "'"),
                s / std::f64::consts::LN_2
            ));
        }
        igpt::fsutil::write_atomic(p, text.as_bytes())?;
        println!("scores: {}", p.display());
    }
    Ok(())
}

/// Token ids `[n, side * side]` as .npy, uint16 `[n, side, side]` (`sample`, `score` and
/// `complete --tokens`).
fn write_tokens(path: &Path, ids: &[u16], side: usize) -> Result<()> {
    let bytes: Vec<u8> = ids.iter().flat_map(|v| v.to_le_bytes()).collect();
    let shape = [ids.len() / (side * side), side, side];
    igpt::fsutil::write_atomic(
        path,
        &igpt::npy::encode(&shape, igpt::npy::DType::U16, &bytes),
    )?;
    println!("tokens: {}", path.display());
    Ok(())
}

/// Samples and completions for the demo's model (`val`: its held-out images).
pub fn demo_pictures(run: &Path, val: &TokenSet, dev: &Device) -> Result<()> {
    let s = SamplingArgs {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        seed: 0,
        batch: 16,
        precision: None,
    };
    let samples = SampleArgs {
        model: run.display().to_string(),
        n: 16,
        out: run.join("samples.png"),
        cols: Some(8),
        tokens: None,
        png_dir: None,
        sampling: s.clone(),
    };
    sample(samples, dev)?;
    let mut m = LoadedModel::open(run)?;
    let t = m.model().n_ctx();
    let n = 6.min(val.len());
    let mut originals = vec![0u16; n * t];
    for i in 0..n {
        val.copy_image(i, &mut originals[i * t..(i + 1) * t]);
    }
    let keep = m.model().side / 2 * m.model().side;
    complete_tokens(
        &mut m,
        &originals,
        keep,
        4,
        &s,
        &run.join("completions.png"),
        dev,
    )?;
    Ok(())
}
