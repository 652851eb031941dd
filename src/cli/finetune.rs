//! `igpt finetune` and `igpt classify`.

use super::Source;
use anyhow::{Context, Result};
use clap::Args;
use igpt::backend::Device;
use igpt::checkpoint::LoadedModel;
use igpt::data::TokenSet;
use igpt::finetune::{self, FinetuneProgress, FinetuneSettings, FinetuneStats, Head};
use igpt::model::Engine;
use igpt::parallel::{Team, TeamExt};
use indicatif::ProgressBar;
use std::path::PathBuf;

#[derive(Args)]
pub struct FinetuneArgs {
    /// The pre-trained model (autoregressive or BERT), or a fine-tuned one to continue.
    #[arg(long)]
    model: String,
    /// Labelled training images; --val-fraction of them choose when to stop.
    #[arg(long)]
    data: String,
    /// Labels of IDX --data, when they are not beside the images under MNIST's names.
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Labelled test images for the final accuracy.
    #[arg(long)]
    test_data: Option<String>,
    /// Labels of IDX --test-data, when they are not beside the images.
    #[arg(long, requires = "test_data")]
    test_labels: Option<PathBuf>,
    #[arg(long)]
    limit: Option<usize>,
    #[arg(long)]
    test_limit: Option<usize>,
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// Directory for the best model and its head (head.safetensors).
    #[arg(long)]
    out: PathBuf,
    /// Most optimizer steps (training stops earlier when validation accuracy stalls).
    #[arg(long, default_value_t = 2000)]
    steps: u64,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Images per forward pass (default: the whole batch). A batch that is a multiple of it goes
    /// through in passes whose gradients add up: the same step in one pass's memory.
    #[arg(long)]
    micro_batch: Option<usize>,
    /// Precision of the matrix products: bf16 (the default on a GPU) or f32 (the CPU's only
    /// one).
    #[arg(long)]
    precision: Option<igpt::backend::Precision>,
    /// Constant learning rate (no cosine schedule; about 10x below pre-training works well).
    #[arg(long, default_value_t = 3e-4)]
    lr: f32,
    /// Ramp the learning rate up linearly over this many first steps (0: full rate at once).
    /// A probe-initialised head sends large gradients into the model at the start; a ramp
    /// keeps them from knocking the pre-trained features about before the head has adapted.
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    /// The head's learning rate, constant from the first step (default: --lr, ramped with it).
    /// The head's steps are in units of standardised features, so a rate well above the
    /// model's lets it follow the features as fine-tuning moves them.
    #[arg(long)]
    head_lr: Option<f32>,
    /// Train on the classification loss alone (default: generative + classification).
    #[arg(long)]
    clf_only: bool,
    /// Start the head at zero instead of at a linear probe of the pre-trained features.
    #[arg(long)]
    zero_head: bool,
    /// Training images the initial linear probe is fitted on.
    #[arg(long, default_value_t = 10_000)]
    probe_images: usize,
    /// Reflection-pad by this many pixels and crop at random (0: off).
    #[arg(long, default_value_t = 0)]
    pad_crop: usize,
    /// Mirror images left-right at random (leave off where that changes the class).
    #[arg(long)]
    flip: bool,
    #[arg(long, default_value_t = 100)]
    eval_every: u64,
    /// Stop after this many evaluations without a better validation accuracy.
    #[arg(long, default_value_t = 5)]
    patience: usize,
    /// BERT models: evaluate with class probabilities averaged over this many random masks per
    /// image; 0 reads whole images. Default: `igpt::bert::EVAL_MASKS` for BERT models.
    #[arg(long)]
    masks: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Labelled images as tokens for the model.
fn labelled_tokens(
    src: &Source,
    limit: Option<usize>,
    m: &LoadedModel,
) -> Result<(TokenSet, Vec<u32>, Vec<String>)> {
    let (set, labels) = src.load_labelled(
        limit,
        m,
        "fine-tuning and classification accuracy need them",
    )?;
    let names = set.class_names.clone();
    let tokens = TokenSet::from_tokens(
        m.palette.encode(&set.pixels),
        m.model().n_ctx(),
        m.model().n_vocab,
        Some(labels.clone()),
    )?;
    Ok((tokens, labels, names))
}

/// Prints a fine-tuning run as it goes.
struct Printer {
    bar: Option<ProgressBar>,
}

impl FinetuneProgress for Printer {
    fn message(&mut self, msg: &str) {
        println!("{msg}");
    }

    fn probing(&mut self, done: usize, total: usize) {
        let bar = self
            .bar
            .get_or_insert_with(|| super::generate::pixel_bar(total as u64, "probe images"));
        bar.set_position(done as u64);
        if done >= total {
            bar.finish_and_clear();
        }
    }

    fn validated(&mut self, step: u64, stats: Option<&FinetuneStats>, accuracy: f64, best: bool) {
        let Some(st) = stats else {
            println!(
                "step {step}: validation accuracy {:.2}% (the starting point: saved)",
                100.0 * accuracy
            );
            return;
        };
        let mark = if best { " (best: saved)" } else { "" };
        println!(
            "step {step}: L_GEN {:.4} nats/token, L_CLF {:.4}, batch accuracy {:.1}%, \
             validation accuracy {:.2}%{mark}",
            st.gen_loss,
            st.clf_loss,
            100.0 * st.accuracy,
            100.0 * accuracy
        );
    }
}

impl FinetuneArgs {
    /// The flags as library settings (`igpt::finetune::FinetuneSettings`, which the Python
    /// bindings share).
    pub(super) fn settings(&self) -> FinetuneSettings {
        FinetuneSettings {
            steps: self.steps,
            batch: self.batch,
            micro_batch: self.micro_batch,
            lr: self.lr,
            warmup: self.warmup,
            head_lr: self.head_lr,
            clf_only: self.clf_only,
            zero_head: self.zero_head,
            probe_images: self.probe_images,
            pad_crop: self.pad_crop,
            flip: self.flip,
            eval_every: self.eval_every,
            patience: self.patience,
            masks: self.masks,
            val_fraction: self.val_fraction,
            seed: self.seed,
        }
    }
}

pub fn finetune(a: FinetuneArgs, dev: &Device, team: Team) -> Result<()> {
    let dev = &match a.precision {
        Some(p) => dev.with_training_precision(p).context("--precision")?,
        None => *dev,
    };
    let settings = a.settings();
    // Settings that cannot work are refused before anything is loaded.
    settings.base()?;
    let m = igpt::formats::load_model(&a.model)?;
    let cfg = settings.config(&m, &PathBuf::from(&a.model))?;
    let masks = cfg.masks;
    let src = Source {
        spec: &a.data,
        labels: a.labels.as_deref(),
        labels_flag: "--labels",
    };
    let (tokens, _, names) = labelled_tokens(&src, a.limit, &m)?;
    let mut printer = Printer { bar: None };
    let leads = team.leads();
    let summary = finetune::run(
        &m,
        &tokens,
        &a.data,
        names,
        &cfg,
        &a.out,
        dev,
        team,
        &mut printer,
    )
    .with_context(|| format!("fine-tuning {} on {}", a.model, a.data))?;
    if !leads {
        return Ok(());
    }
    if summary.early_stop {
        println!(
            "early stop: no better validation accuracy in {} evaluations",
            a.patience
        );
    }
    println!(
        "best validation accuracy {:.2}%: {}",
        100.0 * summary.best_val_accuracy,
        a.out.display()
    );
    if let Some(test) = &a.test_data {
        let best_model = LoadedModel::open(&a.out)?;
        let head = Head::load(&a.out.join("head.safetensors"))?;
        let src = Source {
            spec: test,
            labels: a.test_labels.as_deref(),
            labels_flag: "--test-labels",
        };
        let (tt, ty, _) = labelled_tokens(&src, a.test_limit, &best_model)?;
        let acc = finetune::test_accuracy(&best_model, &head, &tt, masks, dev)
            .with_context(|| test.clone())?;
        println!(
            "test accuracy of the best checkpoint: {:.2}% on {} images",
            100.0 * acc,
            ty.len()
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct ClassifyArgs {
    /// A fine-tuned model (a directory with head.safetensors).
    #[arg(long)]
    model: String,
    /// Image files or folders.
    images: Vec<PathBuf>,
    /// Or a data set (with labels, accuracy is reported).
    #[arg(long)]
    data: Option<String>,
    /// Labels of IDX --data, when they are not beside the images under MNIST's names.
    #[arg(long, requires = "data")]
    labels: Option<PathBuf>,
    #[arg(long)]
    limit: Option<usize>,
    /// BERT models: average class probabilities over this many random masks per image; 0 reads
    /// whole images. Default: `igpt::bert::EVAL_MASKS` for BERT models.
    #[arg(long)]
    masks: Option<usize>,
}

pub fn classify(a: ClassifyArgs, dev: &Device) -> Result<()> {
    let m = igpt::formats::load_model(&a.model)?;
    let head = Head::load(&PathBuf::from(&a.model).join("head.safetensors"))?;
    let masks = igpt::bert::masks_for(m.model(), a.masks)?;
    if let Some(spec) = &a.data {
        let src = Source {
            spec,
            labels: a.labels.as_deref(),
            labels_flag: "--labels",
        };
        let (tokens, labels, _) = labelled_tokens(&src, a.limit, &m)?;
        let acc = finetune::test_accuracy(&m, &head, &tokens, masks, dev)
            .with_context(|| spec.clone())?;
        println!("{} images: accuracy {:.2}%", labels.len(), 100.0 * acc);
        return Ok(());
    }
    let name = |c: u32| -> String {
        head.class_names
            .get(c as usize)
            .cloned()
            .unwrap_or_else(|| format!("class {c}"))
    };
    let files = super::generate::image_files(&a.images)?;
    let ids = super::interop::encode_files(&m, &files)?;
    let tokens = TokenSet::from_tokens(ids, m.model().n_ctx(), m.model().n_vocab, None)?;
    let mut e = Engine::new(m.model(), 32, false, dev)?;
    e.set_params(&m.params)?;
    let pred = finetune::classify(&mut e, &head, &tokens, masks)?;
    for (f, p) in files.iter().zip(pred) {
        println!("{}\t{}", f.display(), name(p));
    }
    Ok(())
}
