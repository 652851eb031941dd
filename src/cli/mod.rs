//! Argument parsing and the command implementations.

mod bench;
mod finetune;
mod generate;
mod interop;
mod probe;
mod progress;
mod selftest;
mod serve;

use anyhow::{Context, Result, ensure};
use clap::{Args, Parser, Subcommand};
use igpt::backend::{Device, Precision};
use igpt::checkpoint::RunDir;
use igpt::config::ModelConfig;
use igpt::data::{self, Format, TokenSet};
use igpt::model::Engine;
use igpt::palette::{FitOptions, Palette};
use igpt::parallel::{Single, Team, TeamExt};
use igpt::train::TrainConfig;
use igpt::train::job::{self, ModelChoice, TrainSettings};
use igpt::train::run::{self, DataSpec, PaletteSpec};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "igpt", version, about = "Image GPT: train, evaluate and run autoregressive pixel models", long_about = None)]
struct Cli {
    /// Worker threads (default: every core; under mpirun, the cores divided among the ranks
    /// on each machine).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Where the model computes: cpu, or cuda / cuda:N (an NVIDIA GPU, compute capability
    /// 8.0 or newer, with CUDA 13's driver and cuBLAS).
    #[arg(long, global = true, default_value = "cpu")]
    device: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// The main job: fit a palette on the shipped Fashion-MNIST split, train a small Image GPT
    /// on 9,000 images, evaluate on the other 1,000, write the run directory and loss curve.
    Demo(DemoArgs),
    /// Train a model on a data set (or continue one with --resume).
    Train(Box<TrainArgs>),
    /// Mean negative log-likelihood of a data set under a model, in nats and bits per token.
    Eval(EvalArgs),
    /// Fit a palette by k-means, or quantise an image with one to preview it.
    #[command(subcommand)]
    Palette(PaletteCmd),
    /// Generate images from a model (written as a PNG grid).
    Sample(generate::SampleArgs),
    /// Complete images from their top rows: originals, kept parts and completions in a grid.
    Complete(generate::CompleteArgs),
    /// Per-image likelihood (nats/token), most likely first: rank images or spot outliers.
    Score(generate::ScoreArgs),
    /// Raw outputs for token ids: logits over the palette, or a hidden state (.npy).
    Logits(interop::LogitsArgs),
    /// Images to token ids exactly as Hugging Face's ImageGPTImageProcessor makes them.
    Encode(interop::EncodeArgs),
    /// Write a model in another format: a Hugging Face directory or an igpt run directory.
    Convert(interop::ConvertArgs),
    /// Linear-probe features of chosen layers for a labelled data set (safetensors).
    Features(probe::FeaturesArgs),
    /// Linear probes: logistic regression on each layer's features, against raw pixels.
    Probe(probe::ProbeArgs),
    /// Fine-tune a model with a linear classification head (L_GEN + L_CLF, early stopping).
    Finetune(Box<finetune::FinetuneArgs>),
    /// Classify images with a fine-tuned model.
    Classify(finetune::ClassifyArgs),
    /// Print a model's shape and size (and a run's training state).
    Info {
        /// The model: an igpt run directory, a Hugging Face ImageGPT directory, an OpenAI
        /// TensorFlow checkpoint, or a hub name (openai/imagegpt-small, openai-tf/igpt-s-bert).
        #[arg(long)]
        model: String,
    },
    /// A web page (and JSON API) on localhost that completes your images row by row as the
    /// model writes them, samples, and scores.
    Serve(serve::ServeArgs),
    /// Benchmarks against the PyTorch baseline in scripts/.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Prove --device against the CPU: every kernel, a training step, the decoder, and bf16
    /// training where the device has it. Fails naming the checks that did not pass.
    Selftest(selftest::SelftestArgs),
}

#[derive(Args)]
struct DemoArgs {
    /// Run directory to write.
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// Optimizer steps (the default finishes in about ten minutes on two cores).
    #[arg(long, default_value_t = 400)]
    steps: u64,
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// Model size preset: tiny (8 layers, d=256, 8 heads; the default), s, m or l.
    /// Overridden by the flags below.
    #[arg(long)]
    preset: Option<String>,
    /// Transformer blocks.
    #[arg(long)]
    layers: Option<usize>,
    /// Embedding width d.
    #[arg(long)]
    embd: Option<usize>,
    /// Attention heads (must divide d).
    #[arg(long)]
    heads: Option<usize>,
    /// Training objective: next pixel (autoregressive, the default) or masked pixels (bert:
    /// 15% of each image hidden, bidirectional attention, loss over the hidden pixels).
    #[arg(long)]
    objective: Option<igpt::config::Objective>,
}

impl ModelArgs {
    fn choice(&self) -> ModelChoice {
        ModelChoice {
            preset: self.preset.clone(),
            layers: self.layers,
            embd: self.embd,
            heads: self.heads,
            objective: self.objective,
        }
    }
}

/// Data formats on the command line (`igpt::data::Format`).
#[derive(Clone, Copy, clap::ValueEnum)]
enum FormatArg {
    Auto,
    Idx,
    Cifar10,
    Cifar100,
    Folder,
    Npy,
}

impl From<FormatArg> for Format {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Auto => Format::Auto,
            FormatArg::Idx => Format::Idx,
            FormatArg::Cifar10 => Format::Cifar10,
            FormatArg::Cifar100 => Format::Cifar100,
            FormatArg::Folder => Format::Folder,
            FormatArg::Npy => Format::Npy,
        }
    }
}

#[derive(Args)]
struct TrainArgs {
    /// Training data: a path (IDX, CIFAR .bin, image folder, .npy) or `fashion-mnist`.
    #[arg(long, default_value = data::BUILTIN_FASHION)]
    data: String,
    /// Data format (default: decided from the path).
    #[arg(long, value_enum, default_value_t = FormatArg::Auto)]
    format: FormatArg,
    /// Separate validation data (default: hold out --val-fraction of --data).
    #[arg(long)]
    val_data: Option<String>,
    /// Fraction of --data held out for validation (a fixed shuffle by --seed).
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// Use only the first N images.
    #[arg(long)]
    limit: Option<usize>,
    /// Run directory to create.
    #[arg(long, default_value = "runs/train")]
    out: PathBuf,
    /// Continue the run in this directory from its last checkpoint. Data and optimizer flags
    /// are taken from the run; model flags, if given, must match it; --steps may extend it.
    #[arg(long, conflicts_with = "out")]
    resume: Option<PathBuf>,
    /// Stop after this many steps in this invocation (the run can be resumed).
    #[arg(long)]
    stop_after: Option<u64>,
    #[command(flatten)]
    model: ModelArgs,
    /// Image side the model sees (images are resized); default: the data's own.
    #[arg(long)]
    side: Option<usize>,
    /// Colour channels (1 or 3); default: the palette's, else the data's.
    #[arg(long)]
    channels: Option<usize>,
    /// Palette file (.npy or .json); default: fit one on the training split.
    #[arg(long)]
    palette: Option<PathBuf>,
    /// Colours in a fitted palette (default: 16 for grayscale, 512 for colour, as the paper).
    #[arg(long)]
    palette_size: Option<usize>,
    /// Optimizer steps in the run (default 1000); the schedule spans them.
    #[arg(long)]
    steps: Option<u64>,
    /// Precision of the matrix products: bf16 (tensor cores, f32 accumulation; the default
    /// on a GPU) or f32 (exact; the CPU's only one). Weights, moments, norms and the loss stay
    /// f32 either way.
    #[arg(long)]
    precision: Option<Precision>,
    /// Images per optimizer step.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Images per forward pass (gradient accumulation when smaller than --batch).
    #[arg(long)]
    micro_batch: Option<usize>,
    /// Peak learning rate (reached after --warmup steps, then cosine decay to 0).
    #[arg(long, default_value_t = 3e-3)]
    lr: f32,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 100)]
    warmup: u64,
    /// Adam beta1.
    #[arg(long, default_value_t = 0.9)]
    beta1: f32,
    /// Adam beta2 (0.95 as the paper).
    #[arg(long, default_value_t = 0.95)]
    beta2: f32,
    /// Decoupled weight decay, applied to weight matrices only.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    /// Gradient-norm clipping threshold (0: off).
    #[arg(long, default_value_t = 1.0)]
    clip: f32,
    /// Validate every N steps.
    #[arg(long, default_value_t = 100)]
    eval_every: u64,
    /// Validation images per evaluation (0: all).
    #[arg(long, default_value_t = 0)]
    eval_images: usize,
    /// Write a checkpoint every N steps (and always at the end).
    #[arg(long, default_value_t = 100)]
    checkpoint_every: u64,
    /// Seed for initialisation, the data order and the validation split.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct EvalArgs {
    /// The model: an igpt run directory, a Hugging Face ImageGPT directory, an OpenAI
    /// TensorFlow checkpoint, or a hub name (openai/imagegpt-small, openai-tf/igpt-s-bert).
    #[arg(long)]
    model: String,
    /// Data to score: a path, `fashion-mnist`, or an igpt `.tokens` file.
    #[arg(long)]
    data: String,
    /// Data format (default: decided from the path).
    #[arg(long, value_enum, default_value_t = FormatArg::Auto)]
    format: FormatArg,
    /// Images per forward pass.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Score only the first N images.
    #[arg(long)]
    limit: Option<usize>,
    /// BERT models: average the loss per hidden pixel over this many fixed masks per image
    /// (1, the default, is the mask the training validation uses).
    #[arg(long)]
    masks: Option<usize>,
}

#[derive(Subcommand)]
enum PaletteCmd {
    /// Fit a palette by k-means (k-means++ seeding) over pixels in [-1, 1] space.
    Fit {
        #[arg(long, default_value = data::BUILTIN_FASHION)]
        data: String,
        #[arg(long, value_enum, default_value_t = FormatArg::Auto)]
        format: FormatArg,
        /// Number of colours.
        #[arg(long, default_value_t = 512)]
        k: usize,
        /// Channels of the palette (default: the data's).
        #[arg(long)]
        channels: Option<usize>,
        #[arg(long, default_value_t = 30)]
        iterations: usize,
        /// Pixels sampled before clustering (0: all).
        #[arg(long, default_value_t = 1_000_000)]
        sample: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output: .json (list of colours) or .npy (float32 [k, c], like kmeans_centers.npy).
        #[arg(long)]
        out: PathBuf,
    },
    /// Quantise an image with a palette and write the result, to see what a model sees.
    Apply {
        #[arg(long)]
        palette: PathBuf,
        #[arg(long)]
        image: PathBuf,
        /// Resize to this side first.
        #[arg(long)]
        side: Option<usize>,
        #[arg(long)]
        out: PathBuf,
    },
}

/// What the user should change, in terms of flags, for a library error: the library speaks of
/// values, and this is the one place that names flags for them.
pub fn flag_hint(e: &anyhow::Error) -> Option<String> {
    // The most specific hint first; which group of settings an error is about only after.
    specific_hint(e).or_else(|| {
        e.chain().find_map(|cause| {
            use igpt::train::job::Setting;
            cause.downcast_ref::<Setting>().map(|s| {
                match s {
                    Setting::Data => {
                        "check --data, --side, --channels, --val-fraction and --val-data"
                    }
                    Setting::Preset => "check --preset, --side, --palette and --palette-size",
                    Setting::Shape => "check --preset, --layers, --embd, --heads and --side",
                }
                .to_string()
            })
        })
    })
}

fn specific_hint(e: &anyhow::Error) -> Option<String> {
    use igpt::bert::MasksError;
    use igpt::train::TrainConfigError as Train;
    use igpt::train::job::{AlreadyARun, SettingsError};
    e.chain().find_map(|cause| {
        if let Some(s) = cause.downcast_ref::<SettingsError>() {
            return Some(
                match s {
                    SettingsError::StopAfter => {
                        "--stop-after must be at least 1 (leave it out to train to --steps)"
                    }
                    SettingsError::Side => "--side must be at least 1 pixel",
                    SettingsError::PaletteSize => {
                        "--palette-size must be at least 2 colours (leave it out for 16 gray \
                         levels or 512 colours)"
                    }
                }
                .to_string(),
            );
        }
        if let Some(AlreadyARun(p)) = cause.downcast_ref::<AlreadyARun>() {
            return Some(format!(
                "continue it with --resume {}, or choose another --out",
                p.display()
            ));
        }
        if let Some(t) = cause.downcast_ref::<Train>() {
            return Some(match t {
                Train::NoSteps => "--steps must be at least 1".to_string(),
                Train::EmptyBatch => "--batch and --micro-batch must be at least 1".to_string(),
                Train::BatchSplit { batch, micro_batch } => {
                    format!("--batch ({batch}) must be a multiple of --micro-batch ({micro_batch})")
                }
                Train::LearningRate(_) => "--lr must be positive".to_string(),
                Train::Betas(..) => "--beta1 and --beta2 must be in [0, 1)".to_string(),
                Train::NoValidation => "--eval-every must be at least 1".to_string(),
            });
        }
        if let Some(m) = cause.downcast_ref::<MasksError>() {
            return Some(
                match m {
                    MasksError::Autoregressive(_) => "leave out --masks for autoregressive models",
                    MasksError::NoMasks => {
                        "--masks must be at least 1 for a BERT model's likelihood"
                    }
                }
                .to_string(),
            );
        }
        if let Some(n) = cause.downcast_ref::<igpt::checkpoint::NotARun>() {
            return n.stopped_before_training().then(|| {
                format!(
                    "{} was stopped before training began; start it again with igpt train --out \
                     {} and the same flags",
                    n.path.display(),
                    n.path.display()
                )
            });
        }
        if let Some(m) = cause.downcast_ref::<igpt::memory::OutOfMemory>() {
            use igpt::memory::Scale;
            return Some(
                match m.scale {
                    Scale::Model => {
                        "the model alone does not fit: train a smaller one (--layers, --embd, \
                         --side) or use a machine with more memory"
                    }
                    Scale::Batch => {
                        "use fewer images per pass: --micro-batch when training, --batch for \
                         other commands"
                    }
                    Scale::Count => "ask for fewer images (--n, --k, --limit)",
                }
                .to_string(),
            );
        }
        let hint = if cause.is::<data::UnknownFormat>() {
            "name the format with --format"
        } else if cause.is::<data::NotSquare>() {
            "choose the model's image side with --side"
        } else if cause.is::<data::EmptySelection>() {
            "--limit must be at least 1"
        } else {
            return None;
        };
        Some(hint.to_string())
    })
}

/// Data named by a flag (`--data`) and the labels file another flag names (`--labels`), if any.
struct Source<'a> {
    spec: &'a str,
    labels: Option<&'a std::path::Path>,
    labels_flag: &'a str,
}

impl Source<'_> {
    /// The first `limit` images, shaped for the model; errors name the labels flag as well as
    /// the files.
    fn load_shaped(
        &self,
        limit: Option<usize>,
        m: &igpt::checkpoint::LoadedModel,
    ) -> Result<data::ImageSet> {
        let set = data::load_shaped_labelled(
            self.spec,
            Format::Auto,
            self.labels,
            limit.map(|l| 0..l),
            Some(m.model().side),
            Some(m.model().channels),
        );
        self.flag_context(set)
    }

    /// As [`Source::load_shaped`], for a job that needs labels (`why`: what needs them).
    fn load_labelled(
        &self,
        limit: Option<usize>,
        m: &igpt::checkpoint::LoadedModel,
        why: &str,
    ) -> Result<(data::ImageSet, Vec<u32>)> {
        let set = self.load_shaped(limit, m)?;
        let labels = set.labels.clone().with_context(|| {
            format!(
                "{} has no labels: {why}{}; name an IDX labels file with {}",
                self.spec,
                data::labels_tried(self.spec),
                self.labels_flag
            )
        })?;
        Ok((set, labels))
    }

    fn flag_context<T>(&self, r: Result<T>) -> Result<T> {
        match self.labels {
            Some(l) => r.with_context(|| format!("{} {}", self.labels_flag, l.display())),
            None => r,
        }
    }
}

pub fn main() -> Result<()> {
    let cli = Cli::parse();
    igpt::fsutil::check_numeric_env()?;
    // Several ranks on one machine share its cores unless told otherwise.
    if let Some(n) = cli.threads.or_else(igpt::parallel::threads_per_local_rank) {
        ensure!(n >= 1, "--threads must be at least 1");
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("cannot start the thread pool")?;
    }
    // The device is chosen here, once; every command computes on it.
    let device: Device = cli
        .device
        .parse()
        .with_context(|| format!("--device {}", cli.device))?;
    device
        .check()
        .with_context(|| format!("--device {}", cli.device))?;
    let dev = &device;
    let command = cli.command.unwrap_or(Command::Demo(DemoArgs {
        out: "runs/demo".into(),
        steps: 400,
    }));
    // The processes this one works with: itself alone, or an MPI world under mpirun.
    let team = igpt::parallel::launch()?;
    if team.world() > 1 {
        let spreads = matches!(
            command,
            Command::Train(_)
                | Command::Finetune(_)
                | Command::Eval(_)
                | Command::Score(_)
                | Command::Features(_)
        );
        ensure!(
            spreads,
            "this command runs in one process, but {} were started: of igpt's commands, train, \
             finetune, eval, score and features run under mpirun; start this one without it",
            team.world()
        );
    }
    match command {
        Command::Demo(a) => demo(a, dev),
        Command::Train(a) => train(*a, dev, team),
        Command::Eval(a) => eval(a, dev, team),
        Command::Palette(p) => palette(p),
        Command::Sample(a) => generate::sample(a, dev),
        Command::Complete(a) => generate::complete(a, dev),
        Command::Score(a) => generate::score(a, dev, team),
        Command::Info { model } => info(model),
        Command::Logits(a) => interop::logits(a, dev),
        Command::Features(a) => probe::features(a, dev, team),
        Command::Finetune(a) => finetune::finetune(*a, dev, team),
        Command::Classify(a) => finetune::classify(a, dev),
        Command::Probe(a) => probe::probe(a, dev),
        Command::Encode(a) => interop::encode(a),
        Command::Convert(a) => interop::convert(a),
        Command::Serve(a) => serve::serve(a, dev),
        Command::Bench(b) => bench::run(b, dev),
        Command::Selftest(a) => selftest::selftest(a, dev),
    }
}

fn demo(a: DemoArgs, dev: &Device) -> Result<()> {
    println!(
        "igpt demo: an Image GPT trained from scratch on Fashion-MNIST (the 10k test split shipped in data/)."
    );
    println!(
        "threads: {}   run directory: {}",
        rayon::current_num_threads(),
        a.out.display()
    );
    let run_dir = RunDir::create(&a.out)?;
    let mut bar = progress::Bar::new();
    let spec = DataSpec {
        data: data::BUILTIN_FASHION.into(),
        format: Format::Auto,
        side: Some(28),
        channels: Some(1),
        val_data: None,
        val_fraction: 0.1,
        limit: None,
        seed: 0,
    };
    let fit = FitOptions {
        k: 16,
        iterations: 30,
        sample: 0,
        seed: 0,
    };
    let prepared = run::prepare(&run_dir, &spec, &PaletteSpec::Fit(fit), &mut bar)?;
    let model = ModelConfig {
        n_layer: 4,
        n_embd: 128,
        n_head: 2,
        n_vocab: 16,
        side: prepared.side,
        channels: 1,
        objective: Default::default(),
    };
    let cfg = TrainConfig {
        steps: a.steps,
        batch: 16,
        micro_batch: 16,
        lr: 2e-3,
        warmup: 50,
        eval_every: 100,
        eval_images: 250,
        checkpoint_every: 100,
        ..TrainConfig::default()
    };
    println!("model: {}", model.summary());
    println!(
        "training: {} steps of {} images (lr {}, warm-up {}, cosine decay)",
        cfg.steps, cfg.batch, cfg.lr, cfg.warmup
    );
    let s = run::start(
        &run_dir,
        &model,
        &cfg,
        &prepared,
        "fashion-mnist (shipped t10k split)",
        None,
        dev,
        Single::team(),
        &mut bar,
    )?;
    let val = s.val_loss.unwrap_or(f64::NAN);
    println!();
    println!(
        "done in {:.0} s ({:.0} tokens/s)",
        s.seconds, s.tokens_per_s
    );
    println!(
        "held-out loss on {} images: {:.4} nats/token ({:.4} bits/token); last training loss {:.4}",
        prepared.val.len(),
        val,
        val / std::f64::consts::LN_2,
        s.final_train_loss
    );
    println!();
    println!(
        "drawing 16 samples, and 4 completions each of 6 held-out images from their top halves..."
    );
    generate::demo_pictures(&a.out, &prepared.val, dev)?;
    println!();
    println!(
        "linear probe (REFERENCE.md §6): features of every layer of 1,500 training images, \
         logistic regression, accuracy on the {} held-out images...",
        prepared.val.len()
    );
    probe::demo_probe(&a.out, &prepared.train, &prepared.val, 1500, dev)?;
    println!("files:");
    for f in [
        "config.json",
        "palette.json",
        "model.safetensors",
        "trainer.safetensors",
        "metrics.jsonl",
        "loss.png",
        "samples.png",
        "completions.png",
        "probe.png",
    ] {
        println!("  {}", run_dir.file(f).display());
    }
    let m = a.out.display();
    println!("next: igpt sample --model {m} --n 64 --out more-samples.png");
    println!("      igpt complete --model {m} --images YOUR.png --out yours.png");
    println!("      igpt train --resume {m} --steps 2000   (train on for a better model)");
    println!(
        "      igpt probe --model {m} --data fashion-mnist --limit 5000 --test-data TEST   (probe more)"
    );
    Ok(())
}

impl TrainArgs {
    /// The flags as library settings (`igpt::train::job`, which the Python bindings share).
    fn settings(&self) -> TrainSettings {
        TrainSettings {
            data: self.data.clone(),
            format: self.format.into(),
            val_data: self.val_data.clone(),
            val_fraction: self.val_fraction,
            limit: self.limit,
            model: self.model.choice(),
            side: self.side,
            channels: self.channels,
            palette: self.palette.clone(),
            palette_size: self.palette_size,
            steps: self.steps,
            batch: self.batch,
            micro_batch: self.micro_batch,
            lr: self.lr,
            warmup: self.warmup,
            beta1: self.beta1,
            beta2: self.beta2,
            weight_decay: self.weight_decay,
            clip: self.clip,
            eval_every: self.eval_every,
            eval_images: self.eval_images,
            checkpoint_every: self.checkpoint_every,
            seed: self.seed,
            stop_after: self.stop_after,
        }
    }
}

fn train(a: TrainArgs, dev: &Device, team: Team) -> Result<()> {
    let dev = &match a.precision {
        Some(p) => dev.with_training_precision(p).context("--precision")?,
        None => *dev,
    };
    let mut bar = progress::Bar::new();
    let settings = a.settings();
    let leads = team.leads();
    let (dir, s) = match &a.resume {
        Some(dir) => (dir, job::resume_run(dir, &settings, dev, team, &mut bar)?),
        None => (
            &a.out,
            job::new_run(&a.out, &settings, dev, team, &mut bar)?,
        ),
    };
    if !leads {
        return Ok(());
    }
    report(&RunDir::open(dir)?, &s)
}

fn report(run_dir: &RunDir, s: &run::Summary) -> Result<()> {
    println!(
        "step {}: last training loss {:.4} nats/token, {:.0} tokens/s",
        s.steps, s.final_train_loss, s.tokens_per_s
    );
    if let Some(v) = s.val_loss {
        println!(
            "validation: {:.4} nats/token ({:.4} bits/token)",
            v,
            v / std::f64::consts::LN_2
        );
    }
    println!(
        "run directory: {} (model.safetensors, metrics.jsonl, loss.png)",
        run_dir.path.display()
    );
    if let Some(why) = &s.replay_failure {
        eprintln!(
            "note: training passes or updates ran call by call, without CUDA graphs (same \
             steps, slower): {why}"
        );
    }
    Ok(())
}

fn eval(a: EvalArgs, dev: &Device, mut team: Team) -> Result<()> {
    let m = igpt::formats::load_model(&a.model)?;
    let (cfg, params, palette) = (&m.config, &m.params, &m.palette);
    let tokens = if a.data.ends_with(".tokens") {
        TokenSet::open(std::path::Path::new(&a.data))?
    } else {
        let set = data::load_shaped(
            &a.data,
            a.format.into(),
            a.limit.map(|l| 0..l),
            Some(cfg.model.side),
            Some(cfg.model.channels),
        )?;
        TokenSet::quantise(&set, palette, &a.data)?
    };
    let mut engine = Engine::new(&cfg.model, a.batch.max(1), false, dev)?;
    engine.set_params(params)?;
    let t0 = std::time::Instant::now();
    let masks = igpt::bert::loss_masks(&cfg.model, a.masks)?;
    let limit = a.limit.unwrap_or(0);
    let nats = igpt::eval::evaluate_shared(
        &mut *team,
        &mut engine,
        &tokens,
        limit,
        masks,
        &mut Vec::new(),
    )?;
    // Rank 0 alone has the result (every rank computed its share of the images).
    let Some(nats) = nats else { return Ok(()) };
    println!(
        "{} images, {} tokens each: {:.4} nats/token, {:.4} bits/token ({:.1} s)",
        a.limit.map_or(tokens.len(), |l| l.min(tokens.len())),
        cfg.model.n_ctx(),
        nats,
        nats / std::f64::consts::LN_2,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn palette(cmd: PaletteCmd) -> Result<()> {
    match cmd {
        PaletteCmd::Fit {
            data: d,
            format,
            k,
            channels,
            iterations,
            sample,
            seed,
            out,
        } => {
            ensure!(
                (1..=65536).contains(&k),
                "--k must be between 1 and 65536 colours (got {k})"
            );
            let set = data::load(&d, format.into())?;
            let c = channels.unwrap_or(set.channels);
            let set = set.with_channels(c)?;
            let t0 = std::time::Instant::now();
            let p = Palette::fit(
                &set.pixels,
                c,
                &FitOptions {
                    k,
                    iterations,
                    sample,
                    seed,
                },
            )?;
            p.save(&out)?;
            println!(
                "fitted {} colours x {} channel(s) on {} images in {:.1} s: {}",
                p.len(),
                c,
                set.len(),
                t0.elapsed().as_secs_f64(),
                out.display()
            );
            Ok(())
        }
        PaletteCmd::Apply {
            palette,
            image,
            side,
            out,
        } => {
            let p = Palette::load(&palette)?;
            let img = igpt::preprocess::decode_file(&image)?;
            let one = data::ImageSet {
                height: img.height,
                width: img.width,
                channels: 3,
                pixels: img.rgb,
                labels: None,
                class_names: vec![],
            };
            let one = match side {
                Some(s) => one.shaped(s, p.channels)?,
                None => one.with_channels(p.channels)?,
            };
            let rgb = p.decode(&p.encode(&one.pixels))?;
            let (w, h) = (one.width as u32, one.height as u32);
            let res = if p.channels == 1 {
                image::GrayImage::from_raw(w, h, rgb)
                    .context("image size")?
                    .save(&out)
            } else {
                image::RgbImage::from_raw(w, h, rgb)
                    .context("image size")?
                    .save(&out)
            };
            res.with_context(|| format!("cannot write {}", out.display()))?;
            println!("wrote {} ({}x{}, {} colours)", out.display(), w, h, p.len());
            Ok(())
        }
    }
}

fn info(model: String) -> Result<()> {
    let loaded = igpt::formats::load_model(&model)?;
    let cfg = &loaded.config;
    let m = &cfg.model;
    println!(
        "{}: {} layers, d={}, {} heads, {}x{} images ({} tokens), {} colours x {} channel(s), {:?}",
        model,
        m.n_layer,
        m.n_embd,
        m.n_head,
        m.side,
        m.side,
        m.n_ctx(),
        m.n_vocab,
        m.channels,
        m.objective
    );
    println!(
        "parameters: {} ({:.2} M)",
        m.n_params(),
        m.n_params() as f64 / 1e6
    );
    let Ok(igpt::formats::ModelSource::Run(dir)) =
        igpt::formats::detect(std::path::Path::new(&model))
    else {
        println!("source: {}", cfg.data);
        return Ok(());
    };
    println!(
        "training: {} steps planned, batch {}, lr {}, data {}",
        cfg.train.steps, cfg.train.batch, cfg.train.lr, cfg.data
    );
    let run_dir = RunDir::open(&dir)?;
    if let Ok((state, ..)) = run_dir.load_trainer(igpt::model::ParamLayout::new(m).total) {
        println!("checkpoint: {}", state.describe());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flags' defaults are the library's: `igpt train` and `igpt finetune` with no settings
    /// given are the Python package's `igpt.train` and `igpt.finetune` with none given.
    #[test]
    fn flag_defaults_are_the_library_s() {
        let cli = Cli::try_parse_from(["igpt", "train", "--data", "fashion-mnist", "--out", "r"])
            .unwrap();
        let Some(Command::Train(a)) = cli.command else {
            panic!("not a train command");
        };
        assert_eq!(
            format!("{:?}", a.settings()),
            format!("{:?}", TrainSettings::default())
        );
        let cli = Cli::try_parse_from([
            "igpt", "finetune", "--model", "m", "--data", "d", "--out", "o",
        ])
        .unwrap();
        let Some(Command::Finetune(a)) = cli.command else {
            panic!("not a finetune command");
        };
        assert_eq!(a.settings(), igpt::finetune::FinetuneSettings::default());
    }
}
