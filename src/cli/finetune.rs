//! `igpt finetune` and `igpt classify`.

use anyhow::{Context, Result, ensure};
use clap::Args;
use igpt::backend::cpu::CpuBackend;
use igpt::checkpoint::{LoadedModel, RunConfig, RunDir};
use igpt::data::{self, Format, TokenSet};
use igpt::finetune::{self, Finetuner, Head};
use igpt::model::Engine;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;

#[derive(Args)]
pub struct FinetuneArgs {
    /// The pre-trained model (autoregressive or BERT), or a fine-tuned one to continue.
    #[arg(long)]
    model: String,
    /// Labelled training images; --val-fraction of them choose when to stop.
    #[arg(long)]
    data: String,
    /// Labelled test images for the final accuracy.
    #[arg(long)]
    test_data: Option<String>,
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
    /// image; 0 reads whole images. Default: `igpt::probe::BERT_EVAL_MASKS` for BERT models.
    #[arg(long)]
    masks: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Labelled images as tokens for the model.
fn labelled_tokens(
    spec: &str,
    limit: Option<usize>,
    m: &LoadedModel,
) -> Result<(TokenSet, Vec<u32>, Vec<String>)> {
    let set = data::load_shaped(
        spec,
        Format::Auto,
        limit.map(|l| 0..l),
        Some(m.model().side),
        Some(m.model().channels),
    )?;
    let labels = set.labels.clone().with_context(|| {
        format!("{spec} has no labels: fine-tuning and classification accuracy need them")
    })?;
    let names = set.class_names.clone();
    let tokens = TokenSet::from_tokens(
        m.palette.encode(&set.pixels),
        m.model().n_ctx(),
        m.model().n_vocab,
        Some(labels.clone()),
    )?;
    Ok((tokens, labels, names))
}

fn check_classes(head: &Head, labels: &[u32], what: &str) -> Result<()> {
    if let Some(&bad) = labels.iter().find(|&&l| l as usize >= head.classes) {
        anyhow::bail!(
            "{what} has class {bad}, but the model's head has {} classes",
            head.classes
        );
    }
    Ok(())
}

pub fn finetune(a: FinetuneArgs) -> Result<()> {
    ensure!(a.batch >= 1, "--batch must be at least 1");
    let micro_batch = a.micro_batch.unwrap_or(a.batch);
    ensure!(
        micro_batch >= 1 && a.batch.is_multiple_of(micro_batch),
        "--batch ({}) must be a multiple of --micro-batch ({micro_batch})",
        a.batch
    );
    let m = igpt::formats::load_model(&a.model)?;
    let masks = igpt::probe::masks_for(m.model(), a.masks)?;
    let (tokens, labels, names) = labelled_tokens(&a.data, a.limit, &m)?;
    let classes = labels
        .iter()
        .max()
        .map_or(0, |&c| c as usize + 1)
        .max(names.len());
    let existing = PathBuf::from(&a.model).join("head.safetensors");
    let head = if existing.exists() {
        let h = Head::load(&existing)?;
        ensure!(
            h.classes == classes,
            "the model's head has {} classes but {} has {classes}",
            h.classes,
            a.data
        );
        Some(h)
    } else {
        None
    };
    ensure!(
        head.as_ref().is_none_or(|h| h.d == m.model().n_embd),
        "the head reads {} features but the model has d = {}",
        head.as_ref().map_or(0, |h| h.d),
        m.model().n_embd
    );
    let t = m.model().n_ctx();
    let n = labels.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(a.seed));
    let n_val = ((n as f64 * a.val_fraction).round() as usize).clamp(1, n - 1);
    let (val_idx, train_idx) = order.split_at(n_val);
    let subset = |idx: &[usize]| -> Result<TokenSet> {
        let mut v = vec![0u16; idx.len() * t];
        for (k, &i) in idx.iter().enumerate() {
            tokens.copy_image(i, &mut v[k * t..(k + 1) * t]);
        }
        TokenSet::from_tokens(
            v,
            t,
            m.model().n_vocab,
            Some(idx.iter().map(|&i| labels[i]).collect()),
        )
    };
    let val = subset(val_idx)?;
    let val_y: Vec<u32> = val_idx.iter().map(|&i| labels[i]).collect();

    let batch = a.batch;
    let mut engine = Engine::new(m.model(), micro_batch, true, CpuBackend::new())?;
    engine.set_params(&m.params)?;
    let head = match head {
        Some(h) => h,
        None if a.zero_head => Head::new(m.model().n_embd, classes, names),
        None => {
            // A linear probe on the features the head reads: the final norm's output.
            let n_probe = a.probe_images.min(train_idx.len());
            let probe_set = subset(&train_idx[..n_probe])?;
            let y: Vec<u32> = train_idx[..n_probe].iter().map(|&i| labels[i]).collect();
            let bar = super::generate::pixel_bar(n_probe as u64, "probe images");
            let pooled = igpt::probe::extract_features(
                &mut engine,
                &probe_set,
                &[m.model().n_layer],
                masks,
                |k| bar.set_position(k as u64),
            )?;
            bar.finish_and_clear();
            let p = Head::from_probe(&pooled, &y, m.model().n_embd, classes, names.clone())?;
            let (h, acc) = (p.head, p.val_accuracy);
            println!(
                "head initialised by a linear probe on {n_probe} training images \
                 ({:.2}% on its validation split)",
                100.0 * acc
            );
            h
        }
    };
    let mut ft = Finetuner::new(engine, head, a.seed ^ 0xb327);
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed ^ 0xf17e);
    let mut buf = vec![0u16; batch * t];
    let mut ys = vec![0u32; batch];
    let mut scratch = Vec::new();
    let out = RunDir::create(&a.out)?;
    let mut since_best = 0usize;
    let mut best;
    println!(
        "fine-tuning on {} images ({} for validation), {classes} classes, loss {}",
        train_idx.len(),
        val_idx.len(),
        if a.clf_only { "L_CLF" } else { "L_GEN + L_CLF" }
    );
    let keep = |ft: &Finetuner| -> Result<()> {
        out.save_config(&RunConfig {
            data: format!("fine-tuned on {}", a.data),
            ..m.config.clone()
        })?;
        out.save_palette(&m.palette)?;
        out.save_model(m.model(), &ft.engine.params())?;
        ft.head.save(&out.file("head.safetensors"))
    };
    // The starting point is a candidate too: fine-tuning only keeps what beats it.
    let pred = finetune::classify(&mut ft.engine, &ft.head, &val, masks)?;
    best = igpt::probe::accuracy(&pred, &val_y);
    keep(&ft)?;
    println!(
        "step 0: validation accuracy {:.2}% (the starting point: saved)",
        100.0 * best
    );
    for step in 1..=a.steps {
        for s in 0..batch {
            let i = train_idx[rand::Rng::random_range(&mut rng, 0..train_idx.len())];
            let img = &mut buf[s * t..(s + 1) * t];
            tokens.copy_image(i, img);
            if a.pad_crop > 0 || a.flip {
                finetune::augment(
                    img,
                    m.model().side,
                    a.pad_crop,
                    a.flip,
                    &mut rng,
                    &mut scratch,
                );
            }
            ys[s] = labels[i];
        }
        let lr = finetune::warmup_lr(a.lr, step, a.warmup);
        let head_lr = a.head_lr.unwrap_or(lr);
        let st = ft.step(&buf, &ys, lr, head_lr, !a.clf_only)?;
        if step % a.eval_every == 0 || step == a.steps {
            let pred = finetune::classify(&mut ft.engine, &ft.head, &val, masks)?;
            let acc = igpt::probe::accuracy(&pred, &val_y);
            let mark = if acc > best { " (best: saved)" } else { "" };
            println!(
                "step {step}: L_GEN {:.4} nats/token, L_CLF {:.4}, batch accuracy {:.1}%, \
                 validation accuracy {:.2}%{mark}",
                st.gen_loss,
                st.clf_loss,
                100.0 * st.accuracy,
                100.0 * acc
            );
            if acc > best {
                best = acc;
                since_best = 0;
                keep(&ft)?;
            } else {
                since_best += 1;
                if since_best >= a.patience {
                    println!(
                        "early stop: no better validation accuracy in {} evaluations",
                        a.patience
                    );
                    break;
                }
            }
        }
    }
    println!(
        "best validation accuracy {:.2}%: {}",
        100.0 * best,
        a.out.display()
    );
    if let Some(test) = &a.test_data {
        let best_model = LoadedModel::open(&a.out)?;
        let head = Head::load(&out.file("head.safetensors"))?;
        let (tt, ty, _) = labelled_tokens(test, a.test_limit, &best_model)?;
        check_classes(&head, &ty, test)?;
        let mut e = Engine::new(best_model.model(), 32, false, CpuBackend::new())?;
        e.set_params(&best_model.params)?;
        let pred = finetune::classify(&mut e, &head, &tt, masks)?;
        println!(
            "test accuracy of the best checkpoint: {:.2}% on {} images",
            100.0 * igpt::probe::accuracy(&pred, &ty),
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
    #[arg(long)]
    limit: Option<usize>,
    /// BERT models: average class probabilities over this many random masks per image; 0 reads
    /// whole images. Default: `igpt::probe::BERT_EVAL_MASKS` for BERT models.
    #[arg(long)]
    masks: Option<usize>,
}

pub fn classify(a: ClassifyArgs) -> Result<()> {
    let m = igpt::formats::load_model(&a.model)?;
    let head = Head::load(&PathBuf::from(&a.model).join("head.safetensors"))?;
    let masks = igpt::probe::masks_for(m.model(), a.masks)?;
    let mut e = Engine::new(m.model(), 32, false, CpuBackend::new())?;
    e.set_params(&m.params)?;
    let name = |c: u32| -> String {
        head.class_names
            .get(c as usize)
            .cloned()
            .unwrap_or_else(|| format!("class {c}"))
    };
    if let Some(spec) = &a.data {
        let (tokens, labels, _) = labelled_tokens(spec, a.limit, &m)?;
        check_classes(&head, &labels, spec)?;
        let pred = finetune::classify(&mut e, &head, &tokens, masks)?;
        println!(
            "{} images: accuracy {:.2}%",
            labels.len(),
            100.0 * igpt::probe::accuracy(&pred, &labels)
        );
        return Ok(());
    }
    let files = super::generate::image_files(&a.images)?;
    let ids = super::interop::encode_files(&m, &files)?;
    let tokens = TokenSet::from_tokens(ids, m.model().n_ctx(), m.model().n_vocab, None)?;
    let pred = finetune::classify(&mut e, &head, &tokens, masks)?;
    for (f, p) in files.iter().zip(pred) {
        println!("{}\t{}", f.display(), name(p));
    }
    Ok(())
}
