//! `igpt.train`, `igpt.finetune` and `igpt.load_data`: the library's jobs with the command
//! line's settings (`igpt::train::job::TrainSettings`, `igpt::finetune::FinetuneSettings`).

use crate::run::{self, Job};
use anyhow::{Context, Result};
use igpt::backend::Device;
use igpt::checkpoint::LoadedModel;
use igpt::data::{self, Format, TokenSet};
use igpt::finetune::{self as ft, FinetuneProgress, FinetuneSettings, FinetuneStats, Head};
use igpt::stop::Stopped;
use igpt::train::StepStats;
use igpt::train::job::{self, ModelChoice, TrainSettings};
use igpt::train::run::{Progress, Summary};
use numpy::IntoPyArray;
use numpy::ndarray::{Array1, ArrayD, IxDyn};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::path::{Path, PathBuf};

/// Reports a job to Python: `callback(step, loss, tokens_per_s)` after each step, and with
/// `verbose`, its messages through `print`.
struct Reporter<'a> {
    job: &'a Job,
    callback: Option<Py<PyAny>>,
    verbose: bool,
    /// Fine-tuning on the classification loss alone: the callback hears L_CLF.
    clf_only: bool,
}

impl Reporter<'_> {
    fn call(&self, step: u64, loss: f64, tokens_per_s: f64) {
        if let Some(cb) = &self.callback {
            Python::attach(|py| {
                if let Err(e) = cb.call1(py, (step, loss, tokens_per_s)) {
                    self.job.fail(e);
                }
            });
        }
    }

    fn say(&self, msg: &str) {
        if self.verbose {
            Python::attach(|py| {
                let printed = PyModule::import(py, "builtins")
                    .and_then(|b| b.getattr("print"))
                    .and_then(|p| p.call1((msg,)));
                if let Err(e) = printed {
                    self.job.fail(e);
                }
            });
        }
    }
}

impl Progress for Reporter<'_> {
    fn message(&mut self, msg: &str) {
        self.say(msg);
    }
    fn step(&mut self, s: &StepStats, tokens_per_s: f64) {
        self.call(s.step, s.loss, tokens_per_s);
    }
    fn validated(&mut self, step: u64, nats: f64) {
        self.say(&format!("step {step}: validation {nats:.4} nats/token"));
    }
    fn keep_going(&mut self) -> Result<(), Stopped> {
        self.job.check()
    }
}

impl FinetuneProgress for Reporter<'_> {
    fn message(&mut self, msg: &str) {
        self.say(msg);
    }
    fn step(&mut self, step: u64, s: &FinetuneStats, tokens_per_s: f64) {
        // The loss being minimised: L_CLF alone when fine-tuning on the classification loss only.
        let loss = if self.clf_only {
            s.clf_loss
        } else {
            s.gen_loss + s.clf_loss
        };
        self.call(step, loss, tokens_per_s);
    }
    fn keep_going(&mut self) -> Result<(), Stopped> {
        self.job.check()
    }
    fn validated(&mut self, step: u64, _stats: Option<&FinetuneStats>, accuracy: f64, best: bool) {
        let mark = if best { " (best: saved)" } else { "" };
        self.say(&format!(
            "step {step}: validation accuracy {:.2}%{mark}",
            100.0 * accuracy
        ));
    }
}

/// Refuses a callback that cannot be called before any work starts.
fn check_callable(py: Python<'_>, callback: &Option<Py<PyAny>>) -> PyResult<()> {
    match callback {
        Some(cb) if !cb.bind(py).is_callable() => {
            Err(PyValueError::new_err("callback must be callable"))
        }
        _ => Ok(()),
    }
}

fn parse<T: std::str::FromStr>(what: &str, s: &str) -> PyResult<T>
where
    T::Err: std::fmt::Display,
{
    s.parse::<T>()
        .map_err(|e| PyValueError::new_err(format!("{what} {s:?}: {e}")))
}

fn summary<'py>(py: Python<'py>, s: &Summary) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("steps", s.steps)?;
    d.set_item("final_train_loss", s.final_train_loss)?;
    d.set_item("val_loss", s.val_loss)?;
    d.set_item("seconds", s.seconds)?;
    d.set_item("tokens_per_s", s.tokens_per_s)?;
    d.set_item("losses", s.losses.clone())?;
    Ok(d)
}

/// Trains a new run in `out`, or continues the run `resume` (see the stub).
#[pyfunction]
#[pyo3(signature = (
    out = None, *, resume = None, data = None, format = None, val_data = None,
    val_fraction = None, limit = None, preset = None, layers = None, embd = None, heads = None,
    objective = None, side = None, channels = None, palette = None, palette_size = None,
    steps = None, batch = None, micro_batch = None, lr = None, warmup = None, beta1 = None,
    beta2 = None, weight_decay = None, clip = None, eval_every = None, eval_images = None,
    checkpoint_every = None, seed = None, stop_after = None, callback = None, verbose = false,
    device = "cpu",
))]
#[allow(clippy::too_many_arguments)]
pub fn train<'py>(
    py: Python<'py>,
    out: Option<PathBuf>,
    resume: Option<PathBuf>,
    data: Option<String>,
    format: Option<String>,
    val_data: Option<String>,
    val_fraction: Option<f64>,
    limit: Option<usize>,
    preset: Option<String>,
    layers: Option<usize>,
    embd: Option<usize>,
    heads: Option<usize>,
    objective: Option<String>,
    side: Option<usize>,
    channels: Option<usize>,
    palette: Option<PathBuf>,
    palette_size: Option<usize>,
    steps: Option<u64>,
    batch: Option<usize>,
    micro_batch: Option<usize>,
    lr: Option<f32>,
    warmup: Option<u64>,
    beta1: Option<f32>,
    beta2: Option<f32>,
    weight_decay: Option<f32>,
    clip: Option<f32>,
    eval_every: Option<u64>,
    eval_images: Option<usize>,
    checkpoint_every: Option<u64>,
    seed: Option<u64>,
    stop_after: Option<u64>,
    callback: Option<Py<PyAny>>,
    verbose: bool,
    device: &str,
) -> PyResult<Bound<'py, PyDict>> {
    let d = TrainSettings::default();
    let s = TrainSettings {
        data: data.unwrap_or(d.data),
        format: match format {
            Some(f) => parse::<Format>("format", &f)?,
            None => d.format,
        },
        val_data,
        val_fraction: val_fraction.unwrap_or(d.val_fraction),
        limit,
        model: ModelChoice {
            preset,
            layers,
            embd,
            heads,
            objective: objective.map(|o| parse("objective", &o)).transpose()?,
        },
        side,
        channels,
        palette,
        palette_size,
        steps,
        batch: batch.unwrap_or(d.batch),
        micro_batch,
        lr: lr.unwrap_or(d.lr),
        warmup: warmup.unwrap_or(d.warmup),
        beta1: beta1.unwrap_or(d.beta1),
        beta2: beta2.unwrap_or(d.beta2),
        weight_decay: weight_decay.unwrap_or(d.weight_decay),
        clip: clip.unwrap_or(d.clip),
        eval_every: eval_every.unwrap_or(d.eval_every),
        eval_images: eval_images.unwrap_or(d.eval_images),
        checkpoint_every: checkpoint_every.unwrap_or(d.checkpoint_every),
        seed: seed.unwrap_or(d.seed),
        stop_after,
    };
    let device: Device = parse("device", device)?;
    check_callable(py, &callback)?;
    let sum = run::run(py, |job| {
        let mut r = Reporter {
            job,
            callback,
            verbose,
            clf_only: false,
        };
        match (&out, &resume) {
            (Some(o), None) => job::new_run(o, &s, &device, igpt::parallel::Single::team(), &mut r),
            (None, Some(dir)) => {
                job::resume_run(dir, &s, &device, igpt::parallel::Single::team(), &mut r)
            }
            _ => anyhow::bail!(
                "give the directory of a new run (out) or of a run to continue (resume), not both"
            ),
        }
    })?;
    summary(py, &sum)
}

/// Labelled images of `spec` as tokens for `m`.
fn labelled_tokens(
    spec: &str,
    labels: Option<&Path>,
    limit: Option<usize>,
    m: &LoadedModel,
) -> Result<(TokenSet, Vec<String>)> {
    let set = data::load_shaped_labelled(
        spec,
        Format::Auto,
        labels,
        limit.map(|l| 0..l),
        Some(m.model().side),
        Some(m.model().channels),
    )?;
    let y = set.labels.clone().with_context(|| {
        format!(
            "{spec} has no labels: fine-tuning needs them{}; name an IDX labels file",
            data::labels_tried(spec)
        )
    })?;
    let tokens = TokenSet::from_tokens(
        m.palette.encode(&set.pixels),
        m.model().n_ctx(),
        m.model().n_vocab,
        Some(y),
    )?;
    Ok((tokens, set.class_names))
}

/// Fine-tunes `model` on labelled `data` into `out` (see the stub).
#[pyfunction]
#[pyo3(signature = (
    model, data, out, *, labels = None, test_data = None, test_labels = None, limit = None,
    test_limit = None, steps = None, batch = None, micro_batch = None, lr = None, warmup = None,
    head_lr = None, clf_only = false, zero_head = false, probe_images = None, pad_crop = None,
    flip = false, eval_every = None, patience = None, masks = None, val_fraction = None,
    seed = None, callback = None, verbose = false, device = "cpu",
))]
#[allow(clippy::too_many_arguments)]
pub fn finetune<'py>(
    py: Python<'py>,
    model: PathBuf,
    data: String,
    out: PathBuf,
    labels: Option<PathBuf>,
    test_data: Option<String>,
    test_labels: Option<PathBuf>,
    limit: Option<usize>,
    test_limit: Option<usize>,
    steps: Option<u64>,
    batch: Option<usize>,
    micro_batch: Option<usize>,
    lr: Option<f32>,
    warmup: Option<u64>,
    head_lr: Option<f32>,
    clf_only: bool,
    zero_head: bool,
    probe_images: Option<usize>,
    pad_crop: Option<usize>,
    flip: bool,
    eval_every: Option<u64>,
    patience: Option<usize>,
    masks: Option<usize>,
    val_fraction: Option<f64>,
    seed: Option<u64>,
    callback: Option<Py<PyAny>>,
    verbose: bool,
    device: &str,
) -> PyResult<Bound<'py, PyDict>> {
    let d = FinetuneSettings::default();
    let s = FinetuneSettings {
        steps: steps.unwrap_or(d.steps),
        batch: batch.unwrap_or(d.batch),
        micro_batch,
        lr: lr.unwrap_or(d.lr),
        warmup: warmup.unwrap_or(d.warmup),
        head_lr,
        clf_only,
        zero_head,
        probe_images: probe_images.unwrap_or(d.probe_images),
        pad_crop: pad_crop.unwrap_or(d.pad_crop),
        flip,
        eval_every: eval_every.unwrap_or(d.eval_every),
        patience: patience.unwrap_or(d.patience),
        masks,
        val_fraction: val_fraction.unwrap_or(d.val_fraction),
        seed: seed.unwrap_or(d.seed),
    };
    let device: Device = parse("device", device)?;
    check_callable(py, &callback)?;
    let spec = model.to_string_lossy().into_owned();
    let (sum, test_accuracy) = run::run(py, |job| {
        let mut r = Reporter {
            job,
            callback,
            verbose,
            clf_only,
        };
        s.base()?;
        let m = igpt::formats::load_model(&spec)?;
        let cfg = s.config(&m, &model)?;
        let (tokens, names) = labelled_tokens(&data, labels.as_deref(), limit, &m)?;
        let sum = ft::run(
            &m,
            &tokens,
            &data,
            names,
            &cfg,
            &out,
            &device,
            igpt::parallel::Single::team(),
            &mut r,
        )
        .with_context(|| format!("fine-tuning {spec} on {data}"))?;
        let acc = match &test_data {
            Some(test) => {
                let best = LoadedModel::open(&out)?;
                let head = Head::load(&out.join("head.safetensors"))?;
                let (tt, _) = labelled_tokens(test, test_labels.as_deref(), test_limit, &best)?;
                Some(
                    ft::test_accuracy(&best, &head, &tt, cfg.masks, &device)
                        .with_context(|| test.clone())?,
                )
            }
            None => None,
        };
        Ok((sum, acc))
    })?;
    let dict = PyDict::new(py);
    dict.set_item("best_val_accuracy", sum.best_val_accuracy)?;
    dict.set_item("best_step", sum.best_step)?;
    dict.set_item("steps_run", sum.steps_run)?;
    dict.set_item("early_stop", sum.early_stop)?;
    dict.set_item("train_images", sum.train_images)?;
    dict.set_item("val_images", sum.val_images)?;
    dict.set_item("test_accuracy", test_accuracy)?;
    Ok(dict)
}

/// A data set's images, uint8 [N, H, W] (gray) or [N, H, W, 3], and its labels, int64 [N] or
/// None.
#[pyfunction]
#[pyo3(signature = (spec = "fashion-mnist", format = "auto", labels = None, limit = None))]
pub fn load_data<'py>(
    py: Python<'py>,
    spec: &str,
    format: &str,
    labels: Option<PathBuf>,
    limit: Option<usize>,
) -> PyResult<(Py<PyAny>, Py<PyAny>)> {
    let format: Format = parse("format", format)?;
    let spec_owned = spec.to_string();
    let set = run::run(py, move |_| {
        let set = data::load_labelled(&spec_owned, format, labels.as_deref())?;
        match limit {
            Some(l) => set.take(0..l),
            None => Ok(set),
        }
    })?;
    let mut shape = vec![set.len(), set.height, set.width];
    if set.channels != 1 {
        shape.push(set.channels);
    }
    let images = ArrayD::from_shape_vec(IxDyn(&shape), set.pixels)
        .expect("the images have their shape's length")
        .into_pyarray(py)
        .into_any()
        .unbind();
    let labels = match set.labels {
        Some(l) => Array1::from_vec(l.into_iter().map(i64::from).collect::<Vec<_>>())
            .into_pyarray(py)
            .into_any()
            .unbind(),
        None => py.None(),
    };
    Ok((images, labels))
}

/// `igpt.train`'s defaults (those of `igpt train`), from the library.
#[pyfunction]
pub fn train_defaults(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = TrainSettings::default();
    let t = d.train_config();
    let dict = PyDict::new(py);
    dict.set_item("data", d.data)?;
    dict.set_item("val_fraction", d.val_fraction)?;
    dict.set_item("preset", "tiny")?;
    dict.set_item("steps", t.steps)?;
    dict.set_item("batch", d.batch)?;
    dict.set_item("lr", d.lr)?;
    dict.set_item("warmup", d.warmup)?;
    dict.set_item("beta1", d.beta1)?;
    dict.set_item("beta2", d.beta2)?;
    dict.set_item("weight_decay", d.weight_decay)?;
    dict.set_item("clip", d.clip)?;
    dict.set_item("eval_every", d.eval_every)?;
    dict.set_item("eval_images", d.eval_images)?;
    dict.set_item("checkpoint_every", d.checkpoint_every)?;
    dict.set_item("seed", d.seed)?;
    Ok(dict)
}

/// `igpt.finetune`'s defaults (those of `igpt finetune`), from the library.
#[pyfunction]
pub fn finetune_defaults(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = FinetuneSettings::default();
    let dict = PyDict::new(py);
    dict.set_item("steps", d.steps)?;
    dict.set_item("batch", d.batch)?;
    dict.set_item("lr", d.lr)?;
    dict.set_item("warmup", d.warmup)?;
    dict.set_item("probe_images", d.probe_images)?;
    dict.set_item("pad_crop", d.pad_crop)?;
    dict.set_item("eval_every", d.eval_every)?;
    dict.set_item("patience", d.patience)?;
    dict.set_item("val_fraction", d.val_fraction)?;
    dict.set_item("seed", d.seed)?;
    Ok(dict)
}
