//! Training: AdamW with warm-up and cosine decay, clipping, accumulation, and exact resume.
//!
//! A step is named calls on the engine: for each pass, [`Engine::forward_train`] and
//! [`Engine::backward`] (together as [`Engine::train_pass`] where no other process waits on
//! the gradients); then [`optim::finish_step`] (reduce, clip, update). Fine-tuning
//! ([`crate::finetune`]) takes the same steps.

pub mod job;
pub mod loader;
pub mod optim;
pub mod run;

use crate::backend::{Arena, Device};
use crate::bert;
use crate::config::ModelConfig;
use crate::data::TokenSet;
use crate::model::Engine;
use crate::parallel::reduce::{BUCKET_LEN, Reducer};
use crate::parallel::{Single, Team};
use loader::{Loader, Position, Shard};
use optim::AdamW;
use serde::{Deserialize, Serialize};

/// Training settings (saved in `config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Optimizer steps in the whole run (the schedule spans them).
    pub steps: u64,
    /// Images per optimizer step.
    pub batch: usize,
    /// Images per forward pass; `batch / micro_batch` passes are accumulated per step.
    pub micro_batch: usize,
    pub lr: f32,
    pub warmup: u64,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Largest global gradient norm (0 turns clipping off).
    pub clip: f32,
    /// Validate every this many steps (0: only at the end).
    pub eval_every: u64,
    /// Validation images per evaluation (0: all).
    pub eval_images: usize,
    pub checkpoint_every: u64,
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 1000,
            batch: 8,
            micro_batch: 8,
            lr: 3e-3,
            warmup: 100,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
            clip: 1.0,
            eval_every: 100,
            eval_images: 0,
            checkpoint_every: 100,
            seed: 0,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<(), TrainConfigError> {
        use TrainConfigError as E;
        if self.steps < 1 {
            return Err(E::NoSteps);
        }
        check_step(self.batch, self.micro_batch, self.lr)?;
        if !((0.0..1.0).contains(&self.beta1) && (0.0..1.0).contains(&self.beta2)) {
            return Err(E::Betas(self.beta1, self.beta2));
        }
        Ok(())
    }

    /// The optimizer these settings describe.
    pub fn adamw(&self) -> AdamW {
        AdamW {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }

    /// Learning rate for optimizer step `step` (1-based): linear warm-up, then cosine to 0.
    pub fn lr_at(&self, step: u64) -> f32 {
        if self.warmup > 0 && step <= self.warmup {
            return self.lr * step as f32 / self.warmup as f32;
        }
        let span = self.steps.saturating_sub(self.warmup).max(1);
        let progress = ((step - self.warmup.min(step)) as f64 / span as f64).min(1.0);
        (self.lr as f64 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())) as f32
    }
}

/// A training setting that cannot work. The messages describe values; a front end names its
/// own flags for them.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TrainConfigError {
    #[error("a run needs at least 1 step")]
    NoSteps,
    #[error("a batch must hold at least 1 image")]
    EmptyBatch,
    #[error("a batch of {batch} images does not split into passes of {micro_batch}")]
    BatchSplit { batch: usize, micro_batch: usize },
    #[error("the learning rate must be positive (got {0})")]
    LearningRate(f32),
    #[error("Adam's betas must be in [0, 1) (got {0} and {1})")]
    Betas(f32, f32),
    #[error("validation must come every so many steps, at least every 1")]
    NoValidation,
}

/// The settings every optimizer step shares, pre-training's and fine-tuning's: a batch of
/// `batch` images in passes of `micro_batch`, at a positive rate `lr`.
pub fn check_step(batch: usize, micro_batch: usize, lr: f32) -> Result<(), TrainConfigError> {
    use TrainConfigError as E;
    if batch < 1 || micro_batch < 1 {
        return Err(E::EmptyBatch);
    }
    if !batch.is_multiple_of(micro_batch) {
        return Err(E::BatchSplit { batch, micro_batch });
    }
    if !(lr > 0.0 && lr.is_finite()) {
        return Err(E::LearningRate(lr));
    }
    Ok(())
}

/// Where training stands: enough to continue exactly.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: u64,
    /// Epoch of the data order and position in it.
    pub epoch: u64,
    pub cursor: usize,
    pub tokens_seen: u64,
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct StepStats {
    pub step: u64,
    /// Mean training loss of the step, nats per token.
    pub loss: f64,
    pub lr: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens of the whole batch (every process's share).
    pub tokens: u64,
    /// Processes sharing the step.
    pub ranks: usize,
    /// Seconds this process spent summing gradients across processes (0 alone).
    pub comm_s: f64,
}

/// A model, its optimizer state and its place in the data.
pub struct Trainer {
    pub engine: Engine,
    pub cfg: TrainConfig,
    pub state: TrainState,
    /// This process's share of every batch, and the team the gradients are summed over.
    shard: Shard,
    reducer: Reducer,
    loader: Loader,
    batch_tokens: Vec<u16>,
    /// Masked-objective flags and scratch, allocated once.
    mask: Vec<bool>,
    perm: Vec<usize>,
}

impl Trainer {
    pub fn new(
        model: &ModelConfig,
        cfg: TrainConfig,
        params: &[f32],
        device: &Device,
    ) -> anyhow::Result<Self> {
        Self::with_team(model, cfg, params, device, Single::team())
    }

    /// A trainer that is one rank of `team`: it takes its share of every batch, in passes of
    /// at most `micro_batch` images, and each step's gradients and loss are summed over the
    /// team before the update, so every rank takes the step one process would take on the
    /// whole batch.
    pub fn with_team(
        model: &ModelConfig,
        cfg: TrainConfig,
        params: &[f32],
        device: &Device,
        team: Team,
    ) -> anyhow::Result<Self> {
        cfg.validate()?;
        let shard = Shard {
            rank: team.rank(),
            world: team.world(),
        };
        let pass = shard.pass(cfg.batch, cfg.micro_batch)?;
        let mut engine = Engine::new(model, pass, true, device)?;
        engine.set_params(params)?;
        let reducer = Reducer::new(team, &engine.layout, BUCKET_LEN);
        Ok(Self {
            reducer,
            batch_tokens: vec![0; pass * model.n_ctx()],
            engine,
            loader: Loader::new(cfg.seed),
            cfg,
            state: TrainState::default(),
            shard,
            mask: vec![false; pass * model.n_ctx()],
            perm: Vec::with_capacity(model.n_ctx()),
        })
    }

    /// The team this trainer belongs to.
    pub fn team(&mut self) -> &mut dyn crate::parallel::Collective {
        self.reducer.team()
    }

    /// Restores optimizer moments and the data position (parameters via `new`).
    pub fn restore(&mut self, state: TrainState, adam_m: &[f32], adam_v: &[f32]) {
        self.engine.write_arena(Arena::AdamM, adam_m);
        self.engine.write_arena(Arena::AdamV, adam_v);
        self.state = state;
    }

    /// Parameters and both Adam moments, for a checkpoint.
    pub fn snapshot(&self) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let n = self.engine.layout.total;
        let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
        self.engine.read_arena(Arena::AdamM, &mut m);
        self.engine.read_arena(Arena::AdamV, &mut v);
        (self.engine.params(), m, v)
    }

    /// One optimizer step over `batch` images (this process's share of them): forward and
    /// backward pass by pass, then [`optim::finish_step`]. Allocates nothing once the epoch
    /// order exists.
    pub fn step(&mut self, data: &TokenSet) -> anyhow::Result<StepStats> {
        anyhow::ensure!(!data.is_empty(), "the training set is empty");
        anyhow::ensure!(
            data.header.t == self.engine.cfg.n_ctx()
                && data.header.n_vocab == self.engine.cfg.n_vocab,
            "the data ({} tokens per image, {} colours) does not fit the model ({} tokens, {} colours)",
            data.header.t,
            data.header.n_vocab,
            self.engine.cfg.n_ctx(),
            self.engine.cfg.n_vocab
        );
        anyhow::ensure!(
            self.state.cursor < data.len(),
            "the trainer's place in the data (image {} of the epoch) is beyond the {} training images",
            self.state.cursor,
            data.len()
        );
        let t = self.engine.cfg.n_ctx();
        let mb = self.engine.batch;
        let (per_shard, shard_start) = self.shard.share(self.cfg.batch)?;
        let tokens = (self.cfg.batch * t) as u64;
        let bert = !self.engine.cfg.causal();
        // The loss is a mean over the predicted pixels of the whole batch: all of them, or the
        // hidden ones.
        let scored = if bert {
            (self.cfg.batch * bert::mask_count(t)) as u64
        } else {
            tokens
        };
        let scale = 1.0 / scored as f32;
        let start = Position {
            epoch: self.state.epoch,
            cursor: self.state.cursor,
        };
        self.engine.zero_grads();
        let mut loss_sum = 0.0;
        let last_pass = shard_start + per_shard - mb;
        for first in (shard_start..shard_start + per_shard).step_by(mb) {
            self.loader.fill(
                data,
                start.advanced(first, data.len()),
                &mut self.batch_tokens,
            );
            let mask = if bert {
                let key = self.state.step * self.cfg.batch as u64 + first as u64;
                bert::training_masks(self.cfg.seed, key, t, &mut self.perm, &mut self.mask);
                Some(&self.mask[..])
            } else {
                None
            };
            if first == last_pass && !self.reducer.alone() {
                // The step's gradients become final layer by layer: sums start as they do.
                loss_sum += self.engine.forward_train(&self.batch_tokens, mask, scale)?;
                let reducer = &mut self.reducer;
                self.engine
                    .backward_reporting(None, &mut |g| reducer.finished(g))?;
            } else {
                // Forward and backward in one call, which a GPU replays as one graph.
                loss_sum += self.engine.train_pass(&self.batch_tokens, mask, scale)?;
            }
        }
        let step = self.state.step + 1;
        let lr = self.cfg.lr_at(step);
        let done = optim::finish_step(
            &mut self.engine,
            &mut self.reducer,
            &mut [],
            loss_sum,
            &self.cfg.adamw(),
            lr,
            step,
            self.cfg.clip,
        )?;
        let next = start.advanced(self.cfg.batch, data.len());
        self.state.epoch = next.epoch;
        self.state.cursor = next.cursor;
        self.state.step = step;
        self.state.tokens_seen += tokens;
        Ok(StepStats {
            step,
            loss: done.loss_sum / scored as f64,
            lr,
            grad_norm: done.grad_norm,
            tokens,
            ranks: self.shard.world,
            comm_s: self.reducer.take_comm_seconds(),
        })
    }

    /// Mean loss in nats per token over (the first `max_images` of) `data`.
    pub fn evaluate(&mut self, data: &TokenSet, max_images: usize) -> anyhow::Result<f64> {
        crate::eval::evaluate(&mut self.engine, data, max_images, &mut self.batch_tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::TrainConfig;

    #[test]
    fn schedule_warms_up_linearly_then_decays_to_zero() {
        let c = TrainConfig {
            steps: 110,
            warmup: 10,
            lr: 1.0,
            ..TrainConfig::default()
        };
        assert!((c.lr_at(1) - 0.1).abs() < 1e-6);
        assert!((c.lr_at(10) - 1.0).abs() < 1e-6);
        assert!((c.lr_at(60) - 0.5).abs() < 1e-6);
        assert!(c.lr_at(110).abs() < 1e-6);
        let mut prev = f32::INFINITY;
        for s in 10..=110 {
            assert!(c.lr_at(s) <= prev);
            prev = c.lr_at(s);
        }
    }
}
