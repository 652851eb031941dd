//! A training run from data on disk to a run directory: data preparation, the loop,
//! validation, metrics, checkpoints and the loss chart.

use super::{StepStats, TrainConfig, TrainState, Trainer};
use crate::backend::Device;
use crate::checkpoint::{RunConfig, RunDir};
use crate::config::ModelConfig;
use crate::data::{self, Format, TokenSet};
use crate::palette::{FitOptions, Palette};
use crate::parallel::{Team, TeamExt};
use crate::stop::Stopped;
use anyhow::{Context, Result, ensure};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

/// Which images to train on and how to shape them.
#[derive(Debug, Clone)]
pub struct DataSpec {
    /// A path, or `fashion-mnist` for the shipped split.
    pub data: String,
    pub format: Format,
    /// Image side for the model (default: the data's own, which must then be square).
    pub side: Option<usize>,
    /// Channels for the model (default: the palette's, else the data's).
    pub channels: Option<usize>,
    /// A separate validation set; otherwise `val_fraction` of the data is held out.
    pub val_data: Option<String>,
    pub val_fraction: f64,
    /// Use at most this many images (before splitting).
    pub limit: Option<usize>,
    pub seed: u64,
}

/// Where the palette comes from.
#[derive(Debug, Clone)]
pub enum PaletteSpec {
    File(PathBuf),
    /// Fit on the training split; `k = 0` picks 16 colours for grayscale, 512 for colour.
    Fit(FitOptions),
}

/// Quantised data and its palette.
pub struct Prepared {
    pub palette: Palette,
    pub train: TokenSet,
    pub val: TokenSet,
    pub side: usize,
    pub channels: usize,
}

/// Receives what a run does, for a progress bar or a log.
pub trait Progress: Send {
    fn message(&mut self, _msg: &str) {}
    fn start(&mut self, _total_steps: u64, _done: u64) {}
    fn step(&mut self, _s: &StepStats, _tokens_per_s: f64) {}
    fn validated(&mut self, _step: u64, _nats: f64) {}
    fn finish(&mut self) {}
    /// Asked after each step: `Err(Stopped)` ends the run there, with a checkpoint of that
    /// step (so the run can be resumed), and the run's result is that error.
    fn keep_going(&mut self) -> Result<(), Stopped> {
        Ok(())
    }
}

/// A [`Progress`] that ignores everything.
pub struct Quiet;
impl Progress for Quiet {}

/// Loads, shapes, splits and quantises the data; fits the palette if asked; writes the token
/// sets into `run/data/` and maps them back.
pub fn prepare(
    run: &RunDir,
    spec: &DataSpec,
    palette: &PaletteSpec,
    progress: &mut dyn Progress,
) -> Result<Prepared> {
    let given = match palette {
        PaletteSpec::File(p) => Some(Palette::load(p)?),
        PaletteSpec::Fit(_) => None,
    };
    let channels = spec.channels.or(given.as_ref().map(|p| p.channels));
    if let (Some(p), Some(c)) = (&given, channels) {
        ensure!(
            p.channels == c,
            "the palette has {} channel(s) but the model is asked for {c}",
            p.channels
        );
    }
    // The one image-to-pixels path (`preprocess::shape`), as `complete` and `encode` take it.
    let set = data::load_shaped(
        &spec.data,
        spec.format,
        spec.limit.map(|l| 0..l),
        spec.side,
        channels,
    )?;
    let (side, channels) = (set.height, set.channels);
    progress.message(&format!(
        "data: {} images from {}, shaped to {side}x{side}x{channels}",
        set.len(),
        spec.data
    ));
    let (train, val) = match &spec.val_data {
        Some(v) => (
            set,
            data::load_shaped(v, spec.format, None, Some(side), Some(channels))?,
        ),
        None => set.split(spec.val_fraction, spec.seed),
    };
    ensure!(
        !train.is_empty(),
        "no training images left after the validation split"
    );
    ensure!(
        !val.is_empty(),
        "no validation images: hold out a larger fraction or give separate validation data"
    );
    let palette = match (given, palette) {
        (Some(p), _) => p,
        (None, PaletteSpec::Fit(opts)) => {
            let mut opts = opts.clone();
            if opts.k == 0 {
                opts.k = if channels == 1 { 16 } else { 512 };
            }
            let opts = &opts;
            progress.message(&format!(
                "palette: fitting {} colours by k-means on the training split",
                opts.k
            ));
            Palette::fit(&train.pixels, channels, opts)?
        }
        (None, PaletteSpec::File(_)) => unreachable!("loaded above"),
    };
    let train_path = run.file("data/train.tokens");
    let val_path = run.file("data/val.tokens");
    TokenSet::quantise(&train, &palette, &spec.data)?.save(&train_path)?;
    TokenSet::quantise(
        &val,
        &palette,
        spec.val_data.as_deref().unwrap_or(&spec.data),
    )?
    .save(&val_path)?;
    progress.message(&format!(
        "tokens: {} training and {} validation images of {} tokens, cached in {}",
        train.len(),
        val.len(),
        side * side,
        run.file("data").display()
    ));
    Ok(Prepared {
        palette,
        train: TokenSet::open(&train_path)?,
        val: TokenSet::open(&val_path)?,
        side,
        channels,
    })
}

/// What a finished (or stopped) run reports.
#[derive(Debug, Clone)]
pub struct Summary {
    pub steps: u64,
    pub final_train_loss: f64,
    pub val_loss: Option<f64>,
    pub seconds: f64,
    pub tokens_per_s: f64,
    /// Training losses of the steps run in this invocation.
    pub losses: Vec<f64>,
    /// Why training passes or updates ran call by call on a device that replays them (CUDA
    /// graphs).
    pub replay_failure: Option<String>,
}

/// Starts a new run in `run` with freshly initialised parameters.
#[allow(clippy::too_many_arguments)]
pub fn start(
    run: &RunDir,
    model: &ModelConfig,
    train_cfg: &TrainConfig,
    prepared: &Prepared,
    data_desc: &str,
    stop_after: Option<u64>,
    device: &Device,
    team: Team,
    progress: &mut dyn Progress,
) -> Result<Summary> {
    ensure!(
        model.n_vocab == prepared.palette.len() && model.channels == prepared.palette.channels,
        "the model expects a palette of {} colours x {} channel(s) but the palette has {} x {}",
        model.n_vocab,
        model.channels,
        prepared.palette.len(),
        prepared.palette.channels
    );
    ensure!(
        model.side == prepared.side,
        "the model's side {} differs from the data's {}",
        model.side,
        prepared.side
    );
    let cfg = RunConfig {
        model: model.clone(),
        train: train_cfg.clone(),
        data: data_desc.to_string(),
        igpt_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    train_cfg.validate()?;
    model.validate()?;
    // Everything the run will hold in host memory, checked before the first large allocation
    // (a GPU's own memory is checked by the engine).
    let on_host = if device.has_own_memory() {
        crate::memory::training_on_host(model, train_cfg.micro_batch)
    } else {
        let scratch = attention_scratch(device, model, train_cfg.micro_batch)?;
        crate::memory::training(model, train_cfg.micro_batch, scratch)
    };
    on_host.check("training this model with this many images per pass")?;
    if team.leads() {
        run.lock()?;
        run.save_config(&cfg)?;
        run.save_palette(&prepared.palette)?;
        run.clear_metrics()?;
    }
    let params = crate::model::init_params(model, train_cfg.seed);
    let mut trainer = Trainer::with_team(model, train_cfg.clone(), &params, device, team)?;
    trainer
        .team()
        .check_same("initial parameters", crate::parallel::checksum(&params))?;
    drop(params);
    train_loop(
        run,
        &mut trainer,
        &prepared.train,
        &prepared.val,
        stop_after,
        progress,
    )
}

/// Continues the run in `run` exactly where its last checkpoint left it. `steps` may raise the
/// run's total; `expected`, when given, must equal the saved model (a resume never changes it).
pub fn resume(
    run: &RunDir,
    steps: Option<u64>,
    stop_after: Option<u64>,
    expected: Option<&ModelConfig>,
    device: &Device,
    team: Team,
    progress: &mut dyn Progress,
) -> Result<Summary> {
    if team.leads() {
        run.lock()?;
    }
    let mut cfg = run.load_config()?;
    if let Some(want) = expected {
        check_same_model(run, &cfg.model, want)?;
    }
    if let Some(s) = steps {
        cfg.train.steps = s;
        cfg.train.validate()?;
    }
    if !run.file("trainer.safetensors").exists() {
        // Killed before its first checkpoint: the settings and the data are there, so the run
        // starts again from step 0 exactly as it first would have.
        return restart(run, cfg, stop_after, device, team, progress);
    }
    let palette = run.load_palette()?;
    ensure!(
        palette.len() == cfg.model.n_vocab,
        "palette.json has {} colours but the model was built for {}",
        palette.len(),
        cfg.model.n_vocab
    );
    // The training engine (its host share, on a GPU), and the saved state (parameters and
    // both moments) read beside it.
    let engine = if device.has_own_memory() {
        crate::memory::engine_on_host(&cfg.model, cfg.train.micro_batch)
    } else {
        let scratch = attention_scratch(device, &cfg.model, cfg.train.micro_batch)?;
        crate::memory::engine(&cfg.model, cfg.train.micro_batch, true, true, scratch)
    };
    engine
        .add(
            "the saved training state",
            3 * 4 * crate::memory::param_count(&cfg.model),
            crate::memory::Scale::Model,
        )
        .check("resuming this run")?;
    let (state, params, m, v) =
        run.load_trainer(crate::model::ParamLayout::new(&cfg.model).total)?;
    let train = TokenSet::open(&run.file("data/train.tokens"))?;
    let val = TokenSet::open(&run.file("data/val.tokens"))?;
    ensure!(
        state.cursor < train.len().max(1) && state.step <= cfg.train.steps,
        "{}: the saved state (step {}, image {} of an epoch) does not fit the run's {} steps \
         and the {} training images of {}: the checkpoint does not belong to this run (a \
         resume may extend a run, never shorten it)",
        run.file("trainer.safetensors").display(),
        state.step,
        state.cursor,
        cfg.train.steps,
        train.len(),
        run.file("data/train.tokens").display()
    );
    if steps.is_some() && team.leads() {
        // Only once the checkpoint is known to fit: a refused resume changes nothing.
        run.save_config(&cfg)?;
    }
    let mut trainer = Trainer::with_team(&cfg.model, cfg.train.clone(), &params, device, team)?;
    // Every rank read the checkpoint itself: make sure they read the same one.
    let sum = crate::parallel::checksum(&params) ^ crate::parallel::checksum(&m).rotate_left(1);
    let sum = sum ^ crate::parallel::checksum(&v).rotate_left(2) ^ state.step;
    trainer.team().check_same("checkpoint", sum)?;
    drop(params);
    trainer.restore(state, &m, &v);
    drop((m, v));
    if trainer.team().leads() {
        truncate_metrics(run, trainer.state.step)?;
        progress.message(&format!(
            "resuming {} at step {} of {}",
            run.path.display(),
            trainer.state.step,
            cfg.train.steps
        ));
    }
    train_loop(run, &mut trainer, &train, &val, stop_after, progress)
}

/// Elements of attention scratch the training engine on `device` will plan for `micro_batch`
/// sequences of `model`.
fn attention_scratch(device: &Device, model: &ModelConfig, micro_batch: usize) -> Result<u128> {
    let shape = crate::backend::AttnShape {
        batch: micro_batch,
        t: model.n_ctx(),
        n_head: model.n_head,
        head_dim: model.head_dim(),
        causal: model.causal(),
    };
    Ok(device.open()?.attention_scratch_len(shape) as u128)
}

/// Refuses a resume that asks for another model than the run's.
fn check_same_model(run: &RunDir, saved: &ModelConfig, want: &ModelConfig) -> Result<()> {
    let saved = serde_json::to_value(saved)?;
    let asked = serde_json::to_value(want)?;
    let diffs: Vec<String> = saved
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, v)| asked.get(k.as_str()) != Some(v))
        .map(|(k, v)| format!("{k} = {v} (asked {})", asked[k.as_str()]))
        .collect();
    ensure!(
        diffs.is_empty(),
        "cannot resume {} with a different model: the run has {}; resume it as it is or start a new run",
        run.path.display(),
        diffs.join(", ")
    );
    Ok(())
}

/// Starts over a run that was stopped before its first checkpoint, from its saved settings and
/// token caches.
fn restart(
    run: &RunDir,
    cfg: RunConfig,
    stop_after: Option<u64>,
    device: &Device,
    team: Team,
    progress: &mut dyn Progress,
) -> Result<Summary> {
    let palette = run.load_palette()?;
    let open = |name: &str| {
        TokenSet::open(&run.file(name)).with_context(|| {
            format!(
                "{} stopped before its first checkpoint and its data is incomplete: start it \
                 again as a new run with the same --out",
                run.path.display()
            )
        })
    };
    let (train, val) = (open("data/train.tokens")?, open("data/val.tokens")?);
    if team.leads() {
        progress.message(&format!(
            "{} stopped before its first checkpoint: starting it again from step 0",
            run.path.display()
        ));
    }
    let side = cfg.model.side;
    let channels = palette.channels;
    let prepared = Prepared {
        palette,
        train,
        val,
        side,
        channels,
    };
    start(
        run, &cfg.model, &cfg.train, &prepared, &cfg.data, stop_after, device, team, progress,
    )
}

/// Drops metric lines logged after `step` (a run killed after its last checkpoint).
fn truncate_metrics(run: &RunDir, step: u64) -> Result<()> {
    let p = run.file("metrics.jsonl");
    let Ok(text) = std::fs::read_to_string(&p) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    crate::fsutil::write_atomic(&p, kept.as_bytes())
}

/// Writes the run's checkpoint (rank 0), once every rank has shown it holds the same
/// parameters.
fn checkpoint(run: &RunDir, trainer: &mut Trainer) -> Result<()> {
    if trainer.team().world() > 1 {
        let mut params = vec![0.0; trainer.engine.layout.total];
        trainer
            .engine
            .read_arena(crate::backend::Arena::Params, &mut params);
        let what = format!("parameters at step {}", trainer.state.step);
        trainer
            .team()
            .check_same(&what, crate::parallel::checksum(&params))?;
    }
    if !trainer.team().leads() {
        return Ok(());
    }
    // The model first: once a trainer state exists, so does a model file (a run killed between
    // the two writes resumes from the trainer state, which is never older than the model).
    let params = trainer.engine.params();
    run.save_model(&trainer.engine.cfg, &params)?;
    drop(params);
    // One arena at a time through one buffer: a checkpoint costs one copy of the parameters.
    let n = trainer.engine.layout.total;
    run.save_trainer(&trainer.state, n, |i, buf| {
        buf.resize(n, 0.0);
        match i {
            0 => trainer
                .engine
                .read_arena(crate::backend::Arena::Params, buf),
            1 => trainer.engine.read_arena(crate::backend::Arena::AdamM, buf),
            _ => trainer.engine.read_arena(crate::backend::Arena::AdamV, buf),
        }
    })?;
    if let Err(e) =
        crate::plot::loss_curve_from_metrics(&run.file("metrics.jsonl"), &run.file("loss.png"))
    {
        eprintln!("warning: could not draw the loss curve: {e:#}");
    }
    Ok(())
}

/// Runs the loop on the thread pool: from a pool thread, each parallel kernel goes to the local
/// work queue instead of the global one, whose blocks would be allocated as it grows.
fn train_loop(
    run: &RunDir,
    trainer: &mut Trainer,
    train: &TokenSet,
    val: &TokenSet,
    stop_after: Option<u64>,
    progress: &mut dyn Progress,
) -> Result<Summary> {
    rayon::scope(|_| train_loop_on_pool(run, trainer, train, val, stop_after, progress))
}

fn train_loop_on_pool(
    run: &RunDir,
    trainer: &mut Trainer,
    train: &TokenSet,
    val: &TokenSet,
    stop_after: Option<u64>,
    progress: &mut dyn Progress,
) -> Result<Summary> {
    let total = trainer.cfg.steps;
    let first = trainer.state.step;
    let last = stop_after.map_or(total, |s| (first + s).min(total));
    // Rank 0 alone validates, logs, charts and writes checkpoints; the others only train.
    let leads = trainer.team().leads();
    let mut log = leads.then(|| run.metrics_log()).transpose()?;
    let ranks = trainer.team().world();
    if leads {
        if ranks > 1 {
            let kind = trainer.team().kind();
            progress.message(&format!(
                "data-parallel: {ranks} processes ({kind}), each taking {} of the {} images of \
                 every batch on {} thread(s)",
                trainer.cfg.batch / ranks,
                trainer.cfg.batch,
                rayon::current_num_threads()
            ));
        }
        progress.start(total, first);
    }
    let t0 = Instant::now();
    let mut losses = Vec::new();
    let mut val_loss = None;
    let mut tokens = 0u64;
    while trainer.state.step < last {
        let ts = Instant::now();
        let s = trainer.step(train)?;
        let tps = s.tokens as f64 / ts.elapsed().as_secs_f64();
        tokens += s.tokens;
        // The loss is summed over every rank: all of them stop here together.
        ensure!(
            s.loss.is_finite(),
            "training diverged at step {} (loss {}): lower the learning rate or warm up longer",
            s.step,
            s.loss
        );
        losses.push(s.loss);
        let at_end = s.step == total;
        let cfg = trainer.cfg.clone();
        let saved = at_end
            || s.step == last
            || (cfg.checkpoint_every > 0 && s.step % cfg.checkpoint_every == 0);
        if let Some(log) = &mut log {
            progress.step(&s, tps);
            let mut line = json!({"step": s.step, "loss": s.loss, "lr": s.lr, "grad_norm": s.grad_norm, "tokens_per_s": tps, "elapsed_s": t0.elapsed().as_secs_f64()});
            if ranks > 1 {
                line["ranks"] = json!(ranks);
                line["comm_s"] = json!(s.comm_s);
            }
            log.write(&line)?;
            if at_end || (cfg.eval_every > 0 && s.step % cfg.eval_every == 0) {
                // The final evaluation always covers the whole validation set.
                let v = trainer.evaluate(val, if at_end { 0 } else { cfg.eval_images })?;
                val_loss = Some(v);
                progress.validated(s.step, v);
                log.write(&json!({"step": s.step, "val_loss": v}))?;
            }
        }
        if saved {
            checkpoint(run, trainer)?;
        }
        // A stop asked of any rank (Ctrl-C reaches them all under mpirun) stops every rank
        // at the same step.
        let asked = progress.keep_going();
        if trainer.team().any(asked.is_err())? {
            if !saved {
                checkpoint(run, trainer)?;
            }
            if leads {
                progress.finish();
            }
            return Err(asked.err().unwrap_or(Stopped).into());
        }
    }
    if leads {
        if trainer.state.step == first {
            // Nothing to do (the run was already complete): still leave a chart.
            let _ = crate::plot::loss_curve_from_metrics(
                &run.file("metrics.jsonl"),
                &run.file("loss.png"),
            );
        }
        progress.finish();
    }
    let secs = t0.elapsed().as_secs_f64();
    Ok(Summary {
        steps: trainer.state.step,
        final_train_loss: losses.last().copied().unwrap_or(f64::NAN),
        val_loss,
        seconds: secs,
        tokens_per_s: tokens as f64 / secs.max(1e-9),
        losses,
        replay_failure: trainer.engine.replay_failure().map(str::to_string),
    })
}

impl TrainState {
    pub fn describe(&self) -> String {
        format!(
            "step {}, epoch {}, {} tokens seen",
            self.step, self.epoch, self.tokens_seen
        )
    }
}
