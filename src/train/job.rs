//! A training run as a user asks for it: [`TrainSettings`] says in values what `igpt train`'s
//! flags (or the Python bindings' keyword arguments) say, and [`new_run`] / [`resume_run`] turn
//! it into a run. The command line and the bindings share this one mapping; neither builds
//! [`TrainConfig`], [`DataSpec`] or [`ModelConfig`] itself.

use super::TrainConfig;
use super::run::{self, DataSpec, PaletteSpec, Progress, Summary};
use crate::backend::Device;
use crate::checkpoint::RunDir;
use crate::config::{ModelConfig, Objective};
use crate::data::TokenSet;
use crate::data::{BUILTIN_FASHION, Format};
use crate::palette::{FitOptions, Palette};
use crate::parallel::{Team, TeamExt};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// A model's shape as a user chooses it: a preset (`tiny` when none is named), with any of its
/// numbers replaced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelChoice {
    /// `tiny`, `s`, `m` or `l` ([`ModelConfig::preset`]).
    pub preset: Option<String>,
    pub layers: Option<usize>,
    pub embd: Option<usize>,
    pub heads: Option<usize>,
    pub objective: Option<Objective>,
}

impl ModelChoice {
    /// The model for a palette of `n_vocab` colours and images of `side` x `side` x `channels`.
    pub fn build(&self, n_vocab: usize, side: usize, channels: usize) -> Result<ModelConfig> {
        let mut cfg = ModelConfig::preset(
            self.preset.as_deref().unwrap_or("tiny"),
            n_vocab,
            side,
            channels,
        )
        .context(Setting::Preset)?;
        cfg.n_layer = self.layers.unwrap_or(cfg.n_layer);
        cfg.n_embd = self.embd.unwrap_or(cfg.n_embd);
        cfg.n_head = self.heads.unwrap_or(cfg.n_head);
        cfg.objective = self.objective.unwrap_or_default();
        cfg.validate().context(Setting::Shape)?;
        Ok(cfg)
    }

    /// `saved` with what this choice names replaced: what a resume asking for it expects.
    pub fn over(&self, saved: &ModelConfig) -> Result<ModelConfig> {
        let mut want = saved.clone();
        if let Some(p) = &self.preset {
            let pc = ModelConfig::preset(p, saved.n_vocab, saved.side, saved.channels)?;
            (want.n_layer, want.n_embd, want.n_head) = (pc.n_layer, pc.n_embd, pc.n_head);
        }
        want.n_layer = self.layers.unwrap_or(want.n_layer);
        want.n_embd = self.embd.unwrap_or(want.n_embd);
        want.n_head = self.heads.unwrap_or(want.n_head);
        want.objective = self.objective.unwrap_or(want.objective);
        Ok(want)
    }
}

/// Everything a training run can be asked for, with `igpt train`'s defaults
/// ([`TrainSettings::default`]).
#[derive(Debug, Clone)]
pub struct TrainSettings {
    /// Training data: a path, or `fashion-mnist` for the shipped split.
    pub data: String,
    pub format: Format,
    /// Separate validation data; otherwise `val_fraction` of `data` is held out.
    pub val_data: Option<String>,
    pub val_fraction: f64,
    /// Use only the first this many images.
    pub limit: Option<usize>,
    pub model: ModelChoice,
    /// Image side the model sees (default: the data's own).
    pub side: Option<usize>,
    /// Colour channels (default: the palette's, else the data's).
    pub channels: Option<usize>,
    /// A palette file; otherwise one is fitted on the training split.
    pub palette: Option<PathBuf>,
    /// Colours of a fitted palette (default: 16 for grayscale, 512 for colour).
    pub palette_size: Option<usize>,
    /// Steps in the run (default 1000 for a new run; a resume keeps the run's unless given).
    pub steps: Option<u64>,
    pub batch: usize,
    /// Images per forward pass (default: the whole batch).
    pub micro_batch: Option<usize>,
    pub lr: f32,
    pub warmup: u64,
    pub beta1: f32,
    pub beta2: f32,
    pub weight_decay: f32,
    pub clip: f32,
    pub eval_every: u64,
    pub eval_images: usize,
    pub checkpoint_every: u64,
    /// Seeds the initialisation, the data order, the validation split and the palette fit.
    pub seed: u64,
    /// Stop after this many steps of this call (the run can be resumed).
    pub stop_after: Option<u64>,
}

impl Default for TrainSettings {
    fn default() -> Self {
        let t = TrainConfig::default();
        Self {
            data: BUILTIN_FASHION.to_string(),
            format: Format::Auto,
            val_data: None,
            val_fraction: 0.1,
            limit: None,
            model: ModelChoice::default(),
            side: None,
            channels: None,
            palette: None,
            palette_size: None,
            steps: None,
            batch: t.batch,
            micro_batch: None,
            lr: t.lr,
            warmup: t.warmup,
            beta1: t.beta1,
            beta2: t.beta2,
            weight_decay: t.weight_decay,
            clip: t.clip,
            eval_every: t.eval_every,
            eval_images: t.eval_images,
            checkpoint_every: t.checkpoint_every,
            seed: t.seed,
            stop_after: None,
        }
    }
}

/// A setting that cannot work, refused before anything is read or written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    #[error("a run must stop after at least 1 step")]
    StopAfter,
    #[error("the image side must be at least 1 pixel")]
    Side,
    #[error("a fitted palette must have at least 2 colours")]
    PaletteSize,
}

/// A new run asked for in a directory that holds one.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{} already holds a run: resume it, or choose another directory", .0.display())]
pub struct AlreadyARun(pub PathBuf);

/// Which group of settings an error is about (a context on the error, for the command line's
/// hints).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Setting {
    #[error("preparing the data")]
    Data,
    #[error("the model's preset, side and palette")]
    Preset,
    #[error("the model's shape")]
    Shape,
}

impl TrainSettings {
    /// Refuses settings that cannot work.
    pub fn check(&self) -> Result<(), SettingsError> {
        if self.stop_after == Some(0) {
            return Err(SettingsError::StopAfter);
        }
        if self.side == Some(0) {
            return Err(SettingsError::Side);
        }
        if self.palette_size == Some(0) {
            return Err(SettingsError::PaletteSize);
        }
        Ok(())
    }

    /// The optimizer's settings of a new run.
    pub fn train_config(&self) -> TrainConfig {
        TrainConfig {
            steps: self.steps.unwrap_or(TrainConfig::default().steps),
            batch: self.batch,
            micro_batch: self.micro_batch.unwrap_or(self.batch),
            lr: self.lr,
            warmup: self.warmup,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: TrainConfig::default().eps,
            weight_decay: self.weight_decay,
            clip: self.clip,
            eval_every: self.eval_every,
            eval_images: self.eval_images,
            checkpoint_every: self.checkpoint_every,
            seed: self.seed,
        }
    }

    pub fn data_spec(&self) -> DataSpec {
        DataSpec {
            data: self.data.clone(),
            format: self.format,
            side: self.side,
            channels: self.channels,
            val_data: self.val_data.clone(),
            val_fraction: self.val_fraction,
            limit: self.limit,
            seed: self.seed,
        }
    }

    pub fn palette_spec(&self) -> PaletteSpec {
        match &self.palette {
            Some(p) => PaletteSpec::File(p.clone()),
            None => PaletteSpec::Fit(FitOptions {
                k: self.palette_size.unwrap_or(0),
                seed: self.seed,
                ..FitOptions::default()
            }),
        }
    }
}

/// A new run in `out` (which must not hold one): the data prepared, the model built, trained
/// to `steps` (or `stop_after` of them). A run that fails before its first checkpoint leaves
/// nothing behind. On a team of several processes, rank 0 prepares the data and writes the run;
/// the others read its token caches from `out` (which they must all see).
pub fn new_run(
    out: &Path,
    s: &TrainSettings,
    device: &Device,
    mut team: Team,
    progress: &mut dyn Progress,
) -> Result<Summary> {
    s.check()?;
    let cfg = s.train_config();
    cfg.validate()?;
    if !team.leads() {
        return follow_new(out, s, &cfg, device, team);
    }
    if out.join("trainer.safetensors").exists() {
        return Err(AlreadyARun(out.to_path_buf()).into());
    }
    let existed = out.exists();
    let result = prepare_new(out, s, progress).and_then(|(run_dir, prepared, model)| {
        // The model's shape, for the other ranks (which then read the data rank 0 wrote).
        let mut shape = serde_json::to_vec(&model)?;
        team.broadcast(&mut shape)?;
        run::start(
            &run_dir,
            &model,
            &cfg,
            &prepared,
            &s.data,
            s.stop_after,
            device,
            team,
            progress,
        )
    });
    if result.is_err() && !existed && !out.join("trainer.safetensors").exists() {
        let _ = std::fs::remove_dir_all(out);
    }
    result
}

fn prepare_new(
    out: &Path,
    s: &TrainSettings,
    progress: &mut dyn Progress,
) -> Result<(RunDir, run::Prepared, ModelConfig)> {
    let run_dir = RunDir::create(out)?;
    let prepared = run::prepare(&run_dir, &s.data_spec(), &s.palette_spec(), progress)
        .context(Setting::Data)?;
    let model = s
        .model
        .build(prepared.palette.len(), prepared.side, prepared.channels)?;
    progress.message(&format!("model: {}", model.summary()));
    // Written now, not only when training starts: the other ranks read it from here.
    run_dir.save_palette(&prepared.palette)?;
    Ok((run_dir, prepared, model))
}

/// A rank other than 0 of a new run: waits for rank 0 to prepare the run, then trains on the
/// data it wrote.
fn follow_new(
    out: &Path,
    s: &TrainSettings,
    cfg: &TrainConfig,
    device: &Device,
    mut team: Team,
) -> Result<Summary> {
    let mut shape = Vec::new();
    team.broadcast(&mut shape)?;
    let model: ModelConfig =
        serde_json::from_slice(&shape).context("rank 0 sent a model this rank cannot read")?;
    let unseen = |e: anyhow::Error| {
        e.context(format!(
            "rank {} cannot read the run rank 0 prepared in {}: every process must see the same \
             directory (on a filesystem all machines share)",
            team.rank(),
            out.display()
        ))
    };
    let run_dir = RunDir::written_by_another(out).map_err(unseen)?;
    let palette = run_dir.load_palette().map_err(unseen)?;
    let train = TokenSet::open(&run_dir.file("data/train.tokens")).map_err(unseen)?;
    let val = TokenSet::open(&run_dir.file("data/val.tokens")).map_err(unseen)?;
    let prepared = run::Prepared {
        channels: palette.channels,
        side: model.side,
        palette,
        train,
        val,
    };
    run::start(
        &run_dir,
        &model,
        cfg,
        &prepared,
        &s.data,
        s.stop_after,
        device,
        team,
        &mut run::Quiet,
    )
}

/// Continues the run in `dir` from its last checkpoint. Its data and optimizer settings are the
/// run's own; of `s`, only `steps` (which may extend the run) and `stop_after` are used, and the
/// model settings (`model`, `side`, `channels`, `palette`), where given, must agree with the
/// run's model. Any number of processes may resume a run written by any number.
pub fn resume_run(
    dir: &Path,
    s: &TrainSettings,
    device: &Device,
    team: Team,
    progress: &mut dyn Progress,
) -> Result<Summary> {
    s.check()?;
    let run_dir = RunDir::open(dir)?;
    let saved = run_dir.load_config()?.model;
    let mut want = s.model.over(&saved)?;
    want.side = s.side.unwrap_or(want.side);
    want.channels = s.channels.unwrap_or(want.channels);
    if let Some(p) = &s.palette {
        want.n_vocab = Palette::load(p)?.len();
    }
    let mut quiet = run::Quiet;
    let progress = if team.leads() { progress } else { &mut quiet };
    run::resume(
        &run_dir,
        s.steps,
        s.stop_after,
        Some(&want),
        device,
        team,
        progress,
    )
}
