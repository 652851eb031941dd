//! `igpt logits`, `igpt encode` and `igpt convert`: working with other tools' models and data.

use super::generate::pixel_bar as bar;
use anyhow::{Context, Result, bail, ensure};
use clap::{Args, ValueEnum};
use igpt::checkpoint::{LoadedModel, RunConfig, RunDir};
use igpt::formats;
use igpt::inference::{self, Convention};
use igpt::model::Output;
use igpt::npy;
use std::path::PathBuf;

const MODEL_HELP: &str = "The model: an igpt run directory, a Hugging Face ImageGPT directory, \
an OpenAI TensorFlow checkpoint, or a hub name (openai/imagegpt-small, openai-tf/igpt-s-bert)";

#[derive(Args)]
pub struct LogitsArgs {
    #[arg(long, help = MODEL_HELP)]
    model: String,
    /// Integer token ids, `[N, T]` (.npy, any integer type).
    #[arg(long)]
    tokens: PathBuf,
    /// Where to write float32 outputs `[N, T, palette]` (or `[N, T, d]` with --hidden).
    #[arg(long)]
    out: PathBuf,
    /// Feed the ids exactly as given, as Hugging Face's model takes them (id = palette size
    /// is the start token; position i predicts id i+1). Default: the ids are pixels, the start
    /// token goes in front and position i predicts pixel i.
    #[arg(long)]
    raw: bool,
    /// Write this hidden state instead of logits, numbered as Hugging Face's
    /// output_hidden_states: 0 = embeddings, l = after block l-1, n_layer = after the final norm.
    #[arg(long)]
    hidden: Option<usize>,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    batch: usize,
}

pub fn logits(a: LogitsArgs, dev: &igpt::backend::Device) -> Result<()> {
    let m = formats::load_model(&a.model)?;
    let arr = npy::read(&a.tokens)?;
    let (n, t) = match arr.shape.as_slice() {
        [n, t] => (*n, *t),
        [t] => (1, *t),
        s => bail!(
            "{}: token ids must be [N, T], got shape {s:?}",
            a.tokens.display()
        ),
    };
    let ids = arr
        .to_i64()
        .with_context(|| format!("{}: token ids must be integers", a.tokens.display()))?;
    let output = match a.hidden {
        Some(l) => Output::Hidden(l),
        None => Output::Logits,
    };
    let convention = if a.raw {
        Convention::Raw
    } else {
        Convention::Pixels
    };
    // The engine takes the parameters over: a large model is held in memory once.
    let mut runner = inference::Runner::new(m, a.batch.clamp(1, n.max(1)), dev)?;
    let pb = bar(n as u64, "sequences");
    let out = runner.run(&ids, n, t, convention, output, |done| {
        pb.set_position(done as u64)
    })?;
    pb.finish_and_clear();
    let width = out.len() / (n * t);
    igpt::fsutil::write_atomic(&a.out, &npy::encode_f32(&[n, t, width], &out))?;
    println!(
        "{}: float32 [{n}, {t}, {width}] ({})",
        a.out.display(),
        match output {
            Output::Logits => "logits".to_string(),
            Output::Hidden(l) => format!("hidden state {l}"),
        }
    );
    Ok(())
}

#[derive(Args)]
pub struct EncodeArgs {
    #[arg(long, help = MODEL_HELP)]
    model: String,
    /// Image files (PNG, JPEG) or folders of them.
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Where to write the token ids, int64 `[N, side * side]`.
    #[arg(long)]
    out: PathBuf,
}

/// Images to token ids the way Hugging Face's ImageGPTImageProcessor makes them.
pub fn encode(a: EncodeArgs) -> Result<()> {
    let m = formats::load_model(&a.model)?;
    let files = super::generate::image_files(&a.images)?;
    let ids = encode_files(&m, &files)?;
    let t = m.model().n_ctx();
    let data: Vec<u8> = ids.iter().flat_map(|&x| (x as i64).to_le_bytes()).collect();
    igpt::fsutil::write_atomic(
        &a.out,
        &npy::encode(&[files.len(), t], npy::DType::I64, &data),
    )?;
    println!(
        "{}: int64 [{}, {t}] token ids of {} image(s)",
        a.out.display(),
        files.len(),
        files.len()
    );
    Ok(())
}

/// Token ids of image files, `[n, side * side]`, as every command makes them (the same
/// reading as `complete` and `score`, then the palette's quantiser): for RGB models, the ids of
/// Hugging Face's `ImageGPTImageProcessor`.
pub fn encode_files(m: &LoadedModel, files: &[PathBuf]) -> Result<Vec<u16>> {
    let (set, _) = super::generate::load_images(files, m)?;
    Ok(m.palette.encode(&set.pixels))
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Target {
    /// A Hugging Face ImageGPT directory (config.json, preprocessor_config.json,
    /// model.safetensors) that transformers loads.
    Hf,
    /// An igpt run directory (sample, complete, score, eval, or train --resume from it).
    Igpt,
}

#[derive(Args)]
pub struct ConvertArgs {
    #[arg(long, help = MODEL_HELP)]
    model: String,
    /// Output format.
    #[arg(long, value_enum)]
    to: Target,
    /// Output directory.
    out: PathBuf,
}

pub fn convert(a: ConvertArgs) -> Result<()> {
    let m = formats::load_model(&a.model)?;
    ensure!(
        !a.out.exists() || a.out.read_dir().is_ok_and(|mut d| d.next().is_none()),
        "{} exists and is not empty; choose a new directory",
        a.out.display()
    );
    match a.to {
        Target::Hf => formats::hf::export(&m, &a.out)?,
        Target::Igpt => {
            let run = RunDir::create(&a.out)?;
            run.save_config(&RunConfig {
                data: format!("converted from {}", a.model),
                ..m.config.clone()
            })?;
            run.save_palette(&m.palette)?;
            run.save_model(m.model(), &m.params)?;
        }
    }
    println!(
        "{} ({} layers, d={}, {} colours) -> {}",
        a.model,
        m.model().n_layer,
        m.model().n_embd,
        m.model().n_vocab,
        a.out.display()
    );
    Ok(())
}
