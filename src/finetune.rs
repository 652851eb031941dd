//! Fine-tuning (REFERENCE.md §6): a linear classifier on the mean over positions of the final
//! norm's output, trained together with the model on `L_GEN + L_CLF` (or `L_CLF` alone).

use crate::backend::Device;
use crate::bert;
use crate::checkpoint::{LoadedModel, RunConfig, RunDir};
use crate::data::TokenSet;
use crate::model::Engine;
use crate::parallel::reduce::{BUCKET_LEN, Reducer};
use crate::parallel::{Single, Team, TeamExt};
use crate::stop::{Fallible, Stopped};
use crate::train::loader::Shard;
use crate::train::optim::{AdamW, HostMoments, HostRows, finish_step};
use anyhow::{Context, Result, ensure};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;

/// The classification head: `logits = mean_t(ln_f(x)) @ w + b`, `w: [d, classes]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Head {
    pub d: usize,
    pub classes: usize,
    pub w: Vec<f32>,
    pub b: Vec<f32>,
    pub class_names: Vec<String>,
    /// Per input feature, a factor on the head's Adam steps during fine-tuning (ones unless the
    /// head came from a probe; see [`Finetuner::set_head_step_scale`]). Saved with the head so
    /// that continuing a fine-tuned model steps it the same way.
    pub step_scale: Vec<f32>,
}

impl Head {
    /// A zero head (the first steps then train it from the features, as a probe would).
    pub fn new(d: usize, classes: usize, class_names: Vec<String>) -> Self {
        Self {
            d,
            classes,
            w: vec![0.0; d * classes],
            b: vec![0.0; classes],
            class_names,
            step_scale: vec![1.0; d],
        }
    }

    /// A head fitted as a linear probe on `pooled` (`[n, d]` means of the final norm's output,
    /// what the head reads) with labels `y`: the L2 strength chosen on a validation split of
    /// them, then a fit on all of them, folded back to unstandardised features. Fine-tuning that
    /// starts here starts at the probe's accuracy rather than at chance.
    pub fn from_probe(
        pooled: &[f32],
        y: &[u32],
        d: usize,
        classes: usize,
        class_names: Vec<String>,
    ) -> Result<ProbeHead> {
        let fitted = crate::probe::fit_chosen_l2(pooled, y, d, classes, 0.1, 0)?;
        let st = &fitted.standardiser;
        let (w, b) = fitted.model.unstandardised(st);
        Ok(ProbeHead {
            head: Self {
                d,
                classes,
                w,
                b,
                class_names,
                step_scale: st.inv_std().iter().map(|&v| v as f32).collect(),
            },
            val_accuracy: fitted.val_accuracy,
        })
    }

    /// Mean over positions: `lnf: [n, t, d]` -> `[n, d]`.
    pub fn pool(lnf: &[f32], t: usize, d: usize) -> Vec<f32> {
        let mut out = Vec::new();
        Self::pool_into(lnf, t, d, &mut out);
        out
    }

    fn pool_into(lnf: &[f32], t: usize, d: usize, out: &mut Vec<f32>) {
        out.clear();
        out.resize(lnf.len() / t, 0.0);
        for (m, seq) in out.chunks_exact_mut(d).zip(lnf.chunks_exact(t * d)) {
            for row in seq.chunks_exact(d) {
                m.iter_mut().zip(row).for_each(|(a, x)| *a += x);
            }
            m.iter_mut().for_each(|a| *a /= t as f32);
        }
    }

    pub fn logits(&self, pooled: &[f32]) -> Vec<f32> {
        let mut out = Vec::new();
        self.logits_into(pooled, &mut out);
        out
    }

    fn logits_into(&self, pooled: &[f32], out: &mut Vec<f32>) {
        let c = self.classes;
        out.clear();
        out.resize(pooled.len() / self.d * c, 0.0);
        for (z, p) in out.chunks_exact_mut(c).zip(pooled.chunks_exact(self.d)) {
            for (k, zk) in z.iter_mut().enumerate() {
                *zk = self.b[k]
                    + p.iter()
                        .enumerate()
                        .map(|(j, x)| x * self.w[j * c + k])
                        .sum::<f32>();
            }
        }
    }

    pub fn predict(&self, pooled: &[f32]) -> Vec<u32> {
        self.logits(pooled)
            .chunks_exact(self.classes)
            .map(crate::probe::argmax)
            .collect()
    }

    /// Summed cross-entropy of `labels` given the final norm's output `lnf: [n, t, d]`;
    /// adds `scale *` its gradient into `gw`, `gb` and `d_lnf` (same shape as `lnf`).
    #[allow(clippy::too_many_arguments)]
    pub fn loss_and_grads(
        &self,
        lnf: &[f32],
        labels: &[u32],
        t: usize,
        scale: f32,
        gw: &mut [f32],
        gb: &mut [f32],
        d_lnf: &mut [f32],
    ) -> f64 {
        let mut scratch = HeadScratch::default();
        self.loss_grads_predict(lnf, labels, t, scale, gw, gb, d_lnf, &mut scratch)
    }

    /// [`Head::loss_and_grads`] with its working buffers kept by the caller (so that a
    /// fine-tuning step allocates nothing once they have grown); leaves each image's predicted
    /// class in `scratch.predicted`.
    #[allow(clippy::too_many_arguments)]
    fn loss_grads_predict(
        &self,
        lnf: &[f32],
        labels: &[u32],
        t: usize,
        scale: f32,
        gw: &mut [f32],
        gb: &mut [f32],
        d_lnf: &mut [f32],
        scratch: &mut HeadScratch,
    ) -> f64 {
        let (d, c) = (self.d, self.classes);
        let HeadScratch {
            pooled,
            logits,
            dz,
            dp,
            predicted,
        } = scratch;
        Self::pool_into(lnf, t, d, pooled);
        self.logits_into(pooled, logits);
        dz.resize(c, 0.0);
        dp.resize(d, 0.0);
        predicted.clear();
        let mut loss = 0.0f64;
        for (s, (z, &y)) in logits.chunks_exact(c).zip(labels).enumerate() {
            predicted.push(crate::probe::argmax(z));
            let max = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = z.iter().map(|v| (v - max).exp()).sum();
            loss += (max + sum.ln() - z[y as usize]) as f64;
            let p = &pooled[s * d..(s + 1) * d];
            for (k, g) in dz.iter_mut().enumerate() {
                let target = if k == y as usize { 1.0 } else { 0.0 };
                *g = scale * ((z[k] - max).exp() / sum - target);
            }
            for k in 0..c {
                gb[k] += dz[k];
                for j in 0..d {
                    gw[j * c + k] += p[j] * dz[k];
                }
            }
            // d pooled = w dz, spread evenly over the positions that were averaged.
            for (j, g) in dp.iter_mut().enumerate() {
                *g = (0..c).map(|k| self.w[j * c + k] * dz[k]).sum::<f32>() / t as f32;
            }
            for row in d_lnf[s * t * d..(s + 1) * t * d].chunks_exact_mut(d) {
                row.iter_mut().zip(dp.iter()).for_each(|(a, g)| *a += g);
            }
        }
        loss
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        let (wb, bb, sb) = (bytes(&self.w), bytes(&self.b), bytes(&self.step_scale));
        let mut views = vec![
            (
                "w",
                TensorView::new(Dtype::F32, vec![self.d, self.classes], &wb)?,
            ),
            ("b", TensorView::new(Dtype::F32, vec![self.classes], &bb)?),
        ];
        if self.step_scale.iter().any(|&v| v != 1.0) {
            views.push((
                "step_scale",
                TensorView::new(Dtype::F32, vec![self.d], &sb)?,
            ));
        }
        let meta = HashMap::from([(
            "class_names".to_string(),
            serde_json::to_string(&self.class_names)?,
        )]);
        crate::fsutil::write_atomic(path, &safetensors::serialize(views, Some(meta))?)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| {
            format!(
                "cannot read {} (is this a fine-tuned model?)",
                path.display()
            )
        })?;
        let st = SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
        let (_, meta) = SafeTensors::read_metadata(&bytes)?;
        let names: Vec<String> = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("class_names"))
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default();
        let w = st
            .tensor("w")
            .with_context(|| format!("{}: no w", path.display()))?;
        let b = st
            .tensor("b")
            .with_context(|| format!("{}: no b", path.display()))?;
        ensure!(
            w.shape().len() == 2 && b.shape() == [w.shape()[1]] && w.dtype() == Dtype::F32,
            "{}: head tensors have shapes {:?} and {:?}",
            path.display(),
            w.shape(),
            b.shape()
        );
        let f = |d: &[u8]| -> Vec<f32> {
            d.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        let d = w.shape()[0];
        // Heads saved before step scales existed (or never scaled) step plainly.
        let step_scale = match st.tensor("step_scale") {
            Ok(s) => {
                ensure!(
                    s.shape() == [d] && s.dtype() == Dtype::F32,
                    "{}: step_scale has shape {:?}, expected [{d}]",
                    path.display(),
                    s.shape()
                );
                f(s.data())
            }
            Err(_) => vec![1.0; d],
        };
        Ok(Self {
            d,
            classes: w.shape()[1],
            w: f(w.data()),
            b: f(b.data()),
            class_names: names,
            step_scale,
        })
    }
}

/// A head fitted as a linear probe ([`Head::from_probe`]).
pub struct ProbeHead {
    pub head: Head,
    /// The probe's accuracy on its own validation split. The head's `step_scale` is one over
    /// each pooled feature's standard deviation ([`Finetuner::set_head_step_scale`]).
    pub val_accuracy: f64,
}

/// Reflection-pads a token image by `pad` on every side, crops a random `side x side` window,
/// and mirrors it left-right when `flip` (CIFAR's augmentation; off where mirroring changes the
/// class). `scratch` holds the padded image.
pub fn augment(
    img: &mut [u16],
    side: usize,
    pad: usize,
    flip: bool,
    rng: &mut impl Rng,
    scratch: &mut Vec<u16>,
) {
    let p = side + 2 * pad;
    let reflect = |i: isize| -> usize {
        let s = side as isize;
        let mut i = i;
        if i < 0 {
            i = -i;
        }
        if i >= s {
            i = 2 * (s - 1) - i;
        }
        i.clamp(0, s - 1) as usize
    };
    scratch.clear();
    for y in 0..p {
        for x in 0..p {
            let (sy, sx) = (
                reflect(y as isize - pad as isize),
                reflect(x as isize - pad as isize),
            );
            scratch.push(img[sy * side + sx]);
        }
    }
    let (oy, ox) = (rng.random_range(0..=2 * pad), rng.random_range(0..=2 * pad));
    let mirror = flip && rng.random::<bool>();
    for y in 0..side {
        for x in 0..side {
            let sx = if mirror { side - 1 - x } else { x };
            img[y * side + x] = scratch[(y + oy) * p + sx + ox];
        }
    }
}

/// The learning rate of fine-tuning step `step` (from 1): ramped linearly up to `lr` over the
/// first `warmup` steps, then constant (fine-tuning has no decay).
pub fn warmup_lr(lr: f32, step: u64, warmup: u64) -> f32 {
    if step < warmup {
        lr * step as f32 / warmup as f32
    } else {
        lr
    }
}

/// The head's working buffers during a step.
#[derive(Debug, Default)]
struct HeadScratch {
    pooled: Vec<f32>,
    logits: Vec<f32>,
    dz: Vec<f32>,
    dp: Vec<f32>,
    predicted: Vec<u32>,
}

/// A model and its head, trained together.
pub struct Finetuner {
    pub engine: Engine,
    pub head: Head,
    /// The optimizer of both the model and the head.
    pub adamw: AdamW,
    head_w_moments: HostMoments,
    head_b_moments: HostMoments,
    step: u64,
    /// Buffers kept across steps.
    lnf: Vec<f32>,
    d_lnf: Vec<f32>,
    grad_w: Vec<f32>,
    grad_b: Vec<f32>,
    /// A BERT model's training masks (fresh ones every step, as in pre-training).
    mask: Vec<bool>,
    perm: Vec<usize>,
    mask_seed: u64,
    scratch: HeadScratch,
    /// This process's share of every batch, and the team gradients are summed over.
    shard: Shard,
    reducer: Reducer,
}

/// One fine-tuning step's losses (means per image / per token) and batch accuracy.
#[derive(Debug, Clone, Copy)]
pub struct FinetuneStats {
    pub gen_loss: f64,
    pub clf_loss: f64,
    pub accuracy: f64,
    /// The model's gradient norm (fine-tuning does not clip).
    pub grad_norm: f64,
}

impl Finetuner {
    /// `mask_seed` seeds a BERT model's training masks (unused for autoregressive models).
    pub fn new(engine: Engine, head: Head, mask_seed: u64) -> Self {
        Self {
            reducer: Reducer::new(Single::team(), &engine.layout, BUCKET_LEN),
            shard: Shard::WHOLE,
            mask: Vec::new(),
            perm: Vec::new(),
            mask_seed,
            scratch: HeadScratch::default(),
            engine,
            adamw: AdamW::default(),
            head_w_moments: HostMoments::zeros(head.w.len()),
            head_b_moments: HostMoments::zeros(head.b.len()),
            head,
            step: 0,
            lnf: Vec::new(),
            d_lnf: Vec::new(),
            grad_w: Vec::new(),
            grad_b: Vec::new(),
        }
    }

    /// Trains as one rank of `team`: each step this process runs its share of the batch, and
    /// the gradients (model and head), losses and counts are summed over the team.
    pub fn join(&mut self, team: Team) {
        self.shard = Shard {
            rank: team.rank(),
            world: team.world(),
        };
        self.reducer = Reducer::new(team, &self.engine.layout, BUCKET_LEN);
    }

    /// Refuses to go on unless every rank holds the same model and head.
    pub fn check_same_everywhere(&mut self, what: &str) -> Result<()> {
        if self.reducer.alone() {
            return Ok(());
        }
        let params = self.engine.params();
        let sum = crate::parallel::checksum(&params)
            ^ crate::parallel::checksum(&self.head.w).rotate_left(1)
            ^ crate::parallel::checksum(&self.head.b).rotate_left(2);
        self.reducer.team().check_same(what, sum)
    }

    /// The team this fine-tuner belongs to.
    pub fn team(&mut self) -> &mut dyn crate::parallel::Collective {
        self.reducer.team()
    }

    /// Accuracy on labelled `val` images, computed by the team together (every rank gets it).
    pub fn accuracy(&mut self, val: &TokenSet, labels: &[u32], masks: usize) -> Result<f64> {
        let team = self.reducer.team();
        let pred = classify_shared(team, &mut self.engine, &self.head, val, masks)?;
        let mut acc = vec![pred.map_or(0.0, |p| crate::probe::accuracy(&p, labels))];
        team.broadcast_values(&mut acc)?;
        Ok(acc[0])
    }

    /// Scales the head's Adam steps per input feature. A head folded from a probe on
    /// standardised features has weights of size 1/std; stepping them by `scale = 1/std` is
    /// Adam on the standardised weights, so the head keeps pace with the features as they move
    /// (with plain steps it would barely move where features vary little).
    pub fn set_head_step_scale(&mut self, scale: Vec<f32>) -> Result<()> {
        ensure!(
            scale.len() == self.head.d,
            "{} step scales for a head of {} features",
            scale.len(),
            self.head.d
        );
        self.head.step_scale = scale;
        Ok(())
    }

    /// One AdamW step on `L_CLF` (+ `L_GEN` when `with_gen`) for a batch of images, at rate
    /// `lr` for the model and `head_lr` for the head. The batch may be any multiple of the
    /// engine's batch: it goes through in passes of that many images whose gradients add up, so
    /// a large batch needs only one pass's memory. A BERT model sees each image with 15% of its
    /// pixels hidden (a fresh mask every step) and its `L_GEN` is the masked objective over
    /// them. The step is pre-training's: forward and backward per pass, then
    /// [`finish_step`].
    pub fn step(
        &mut self,
        tokens: &[u16],
        labels: &[u32],
        lr: f32,
        head_lr: f32,
        with_gen: bool,
    ) -> Result<FinetuneStats> {
        let t = self.engine.cfg.n_ctx();
        let n = labels.len();
        let pass = self.engine.batch;
        ensure!(tokens.len() == n * t, "one label per image");
        ensure!(
            n > 0 && n.is_multiple_of(pass),
            "a batch of {n} images does not split into passes of {pass}"
        );
        let (per, first) = self.shard.share(n)?;
        ensure!(
            per.is_multiple_of(pass),
            "each of the {} processes takes {per} images of a batch of {n}, which do not split \
             into passes of {pass}",
            self.shard.world
        );
        let passes = first / pass..(first + per) / pass;
        self.engine.zero_grads();
        let (gw, gb) = (&mut self.grad_w, &mut self.grad_b);
        gw.clear();
        gw.resize(self.head.w.len(), 0.0);
        gb.clear();
        gb.resize(self.head.b.len(), 0.0);
        let bert = !self.engine.cfg.causal();
        // Tokens the generative loss is averaged over.
        let scored = if bert { n * bert::mask_count(t) } else { n * t };
        if bert {
            self.mask.resize(n * t, false);
            let key = self.step * n as u64;
            bert::training_masks(self.mask_seed, key, t, &mut self.perm, &mut self.mask);
        }
        let gen_scale = if with_gen { 1.0 / scored as f32 } else { 0.0 };
        let (mut gen_sum, mut clf, mut right) = (0.0, 0.0, 0usize);
        let last_pass = passes.end - 1;
        for p in passes {
            let images = p * pass..(p + 1) * pass;
            let pixels = images.start * t..images.end * t;
            let labels = &labels[images];
            let mask = bert.then(|| &self.mask[pixels.clone()]);
            gen_sum += self
                .engine
                .forward_train(&tokens[pixels], mask, gen_scale)?;
            self.engine.final_norm_output(&mut self.lnf);
            self.d_lnf.clear();
            self.d_lnf.resize(self.lnf.len(), 0.0);
            clf += self.head.loss_grads_predict(
                &self.lnf,
                labels,
                t,
                1.0 / n as f32,
                gw,
                gb,
                &mut self.d_lnf,
                &mut self.scratch,
            );
            if p == last_pass {
                let reducer = &mut self.reducer;
                self.engine
                    .backward_reporting(Some(&self.d_lnf), &mut |g| reducer.finished(g))?;
            } else {
                self.engine.backward(Some(&self.d_lnf))?;
            }
            right += self
                .scratch
                .predicted
                .iter()
                .zip(labels)
                .filter(|(p, y)| p == y)
                .count();
        }
        self.step += 1;
        let done = finish_step(
            &mut self.engine,
            &mut self.reducer,
            &mut [&mut gw[..], &mut gb[..]],
            gen_sum,
            &self.adamw,
            lr,
            self.step,
            0.0,
        )?;
        // The classifier's loss and hits, of every process's share.
        let mut counts = [clf, right as f64];
        self.reducer.team().sum_f64(&mut counts)?;
        let (clf, right) = (counts[0], counts[1] as usize);
        let c = self.head.classes;
        let (head, adamw) = (&mut self.head, &self.adamw);
        // The weights are a matrix (decayed when weight decay is on); the biases are not.
        let w_rows = HostRows {
            len: c,
            lr_scale: &head.step_scale,
            decay: true,
        };
        let (w, b) = (&mut head.w, &mut head.b);
        adamw.update_host(w, gw, &mut self.head_w_moments, head_lr, self.step, w_rows);
        let b_rows = HostRows {
            len: c,
            lr_scale: &[],
            decay: false,
        };
        adamw.update_host(b, gb, &mut self.head_b_moments, head_lr, self.step, b_rows);
        Ok(FinetuneStats {
            gen_loss: done.loss_sum / scored as f64,
            clf_loss: clf / n as f64,
            accuracy: right as f64 / n as f64,
            grad_norm: done.grad_norm,
        })
    }
}

/// Predicted classes of `tokens` (`[n, t]`) by an engine and head. A BERT model reads each
/// image whole (`masks = 0`) or with `masks` fixed random masks, averaging the class
/// probabilities over them; autoregressive models need `masks = 0`.
pub fn classify(
    engine: &mut Engine,
    head: &Head,
    tokens: &crate::data::TokenSet,
    masks: usize,
) -> Result<Vec<u32>> {
    let alone = &mut Single::default();
    let pred = classify_shared(alone, engine, head, tokens, masks)?;
    Ok(pred.expect("a process alone leads"))
}

/// [`classify`] with the images split over `team` (whole batches each): every prediction on
/// rank 0, `None` on the other ranks.
pub fn classify_shared(
    team: &mut dyn crate::parallel::Collective,
    engine: &mut Engine,
    head: &Head,
    tokens: &crate::data::TokenSet,
    masks: usize,
) -> Result<Option<Vec<u32>>> {
    let (t, batch, c) = (engine.cfg.n_ctx(), engine.batch, head.classes);
    ensure!(
        head.d == engine.cfg.n_embd,
        "the head reads {} features but the model has d = {}",
        head.d,
        engine.cfg.n_embd
    );
    let bert = !engine.cfg.causal();
    ensure!(
        masks == 0 || bert,
        "evaluation masks are for BERT models; this one is autoregressive"
    );
    let mut buf = vec![0u16; batch * t];
    let mut mask = vec![false; batch * t];
    let mut perm = Vec::new();
    let (mut lnf, mut probs) = (Vec::new(), Vec::new());
    let mine = team.share(tokens.len(), batch);
    let mut out = Vec::with_capacity(mine.len());
    for start in mine.step_by(batch) {
        let b = batch.min(tokens.len() - start);
        for i in 0..b {
            tokens.copy_image(start + i, &mut buf[i * t..(i + 1) * t]);
        }
        probs.clear();
        probs.resize(b * c, 0.0f32);
        for k in 0..masks.max(1) {
            if !bert {
                engine.forward(&buf[..b * t])?;
            } else {
                if masks > 0 {
                    bert::eval_masks(start, b, t, masks, k, &mut perm, &mut mask);
                }
                engine.forward_masked(&buf[..b * t], &mask[..b * t])?;
            }
            engine.final_norm_output(&mut lnf);
            let z = head.logits(&Head::pool(&lnf, t, head.d));
            for (p, z) in probs.chunks_exact_mut(c).zip(z.chunks_exact(c)) {
                let max = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = z.iter().map(|v| (v - max).exp()).sum();
                p.iter_mut()
                    .zip(z)
                    .for_each(|(p, v)| *p += (v - max).exp() / sum);
            }
        }
        out.extend(probs.chunks_exact(c).map(crate::probe::argmax));
    }
    team.gather_values(&out)
}

/// How a fine-tuning run starts its head.
#[derive(Debug, Clone, PartialEq)]
pub enum HeadStart {
    /// At zero: the first steps train it from the features.
    Zero,
    /// A linear probe of the final norm's output on this many training images (the default):
    /// fine-tuning starts at the probe's accuracy rather than at chance.
    Probe(usize),
    /// A head saved by an earlier fine-tuning run (continuing it).
    Saved(Head),
}

/// Settings of a fine-tuning run ([`run`]).
#[derive(Debug, Clone)]
pub struct FinetuneConfig {
    /// Most optimizer steps (training stops earlier when validation accuracy stalls).
    pub steps: u64,
    /// Images per step, and per forward pass (`batch` must be a multiple of it).
    pub batch: usize,
    pub micro_batch: usize,
    /// The model's rate: constant after a linear ramp over `warmup` steps.
    pub lr: f32,
    pub warmup: u64,
    /// The head's constant rate (`None`: the model's, ramped with it).
    pub head_lr: Option<f32>,
    /// `L_GEN + L_CLF` (true) or `L_CLF` alone.
    pub with_gen: bool,
    pub head_start: HeadStart,
    /// Augmentation: reflection padding for random crops (0: none), and random mirroring.
    pub pad_crop: usize,
    pub flip: bool,
    /// Validate every this many steps; stop after `patience` validations without a better one.
    pub eval_every: u64,
    pub patience: usize,
    /// BERT models: evaluation masks per image (see [`bert::masks_for`]); 0 otherwise.
    pub masks: usize,
    /// Fraction of the labelled images held out to choose when to stop.
    pub val_fraction: f64,
    pub seed: u64,
    pub adamw: AdamW,
}

impl FinetuneConfig {
    /// Refuses settings that cannot work (before any model or data is loaded).
    pub fn validate(&self) -> Result<(), crate::train::TrainConfigError> {
        crate::train::check_step(self.batch, self.micro_batch, self.lr)?;
        if self.eval_every < 1 {
            return Err(crate::train::TrainConfigError::NoValidation);
        }
        Ok(())
    }
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        Self {
            steps: 2000,
            batch: 16,
            micro_batch: 16,
            lr: 3e-4,
            warmup: 0,
            head_lr: None,
            with_gen: true,
            head_start: HeadStart::Probe(10_000),
            pad_crop: 0,
            flip: false,
            eval_every: 100,
            patience: 5,
            masks: 0,
            val_fraction: 0.1,
            seed: 0,
            adamw: AdamW::default(),
        }
    }
}

/// What a fine-tuning run tells as it goes.
pub trait FinetuneProgress: Send {
    fn message(&mut self, _msg: &str) {}
    /// Images of the initial probe whose features are done, of `total`.
    fn probing(&mut self, _done: usize, _total: usize) {}
    /// An optimizer step done, and its speed in tokens per second.
    fn step(&mut self, _step: u64, _stats: &FinetuneStats, _tokens_per_s: f64) {}
    /// Asked after each step and each batch of probe images: `Err(Stopped)` ends the run there
    /// (the best model so far stays saved), and the run's result is that error.
    fn keep_going(&mut self) -> Result<(), Stopped> {
        Ok(())
    }
    /// A validation after `step` (0: the starting point), and whether it was kept as the best.
    fn validated(
        &mut self,
        _step: u64,
        _stats: Option<&FinetuneStats>,
        _accuracy: f64,
        _best: bool,
    ) {
    }
}

/// A [`FinetuneProgress`] that ignores everything.
pub struct QuietFinetune;
impl FinetuneProgress for QuietFinetune {}

/// What a finished fine-tuning run reports.
#[derive(Debug, Clone)]
pub struct FinetuneSummary {
    pub best_val_accuracy: f64,
    /// The step whose model was kept (0: the starting point).
    pub best_step: u64,
    pub steps_run: u64,
    pub early_stop: bool,
    pub train_images: usize,
    pub val_images: usize,
}

/// Fine-tunes `model` with a linear head on the labelled `data` (REFERENCE.md §6): a fixed
/// split by `seed` holds out `val_fraction` of it; batches are drawn at random (augmented if
/// asked); every `eval_every` steps the validation accuracy decides whether the model and head
/// are kept in `out` (the starting point is a candidate too); `patience` validations without a
/// better one stop the run. `out` (created when the starting point is saved, so a run that fails
/// before leaves nothing) ends up holding the best model, its palette and `head.safetensors`; its
/// config names the data as `data_desc`.
#[allow(clippy::too_many_arguments)]
pub fn run(
    model: &LoadedModel,
    data: &TokenSet,
    data_desc: &str,
    class_names: Vec<String>,
    cfg: &FinetuneConfig,
    out: &Path,
    device: &Device,
    mut team: Team,
    progress: &mut dyn FinetuneProgress,
) -> Result<FinetuneSummary> {
    let mc = model.model();
    // Rank 0 alone reports and writes; every rank trains on its share of each batch.
    let leads = team.leads();
    let mut quiet = QuietFinetune;
    let progress = if leads { progress } else { &mut quiet };
    let t = mc.n_ctx();
    cfg.validate()?;
    // A pre-training run's directory keeps its model, its metrics and what resumes it.
    ensure!(
        !out.join("trainer.safetensors").exists(),
        "{} holds a pre-training run (trainer.safetensors): fine-tuning into it would overwrite \
         its model and metrics; fine-tune into another directory",
        out.display()
    );
    ensure!(
        data.header.t == t && data.header.n_vocab == mc.n_vocab,
        "the images ({} tokens, {} colours) do not fit the model ({t} tokens, {} colours)",
        data.header.t,
        data.header.n_vocab,
        mc.n_vocab
    );
    let labels = data
        .labels()
        .context("the images have no labels: fine-tuning needs them")?;
    let n = labels.len();
    ensure!(
        n >= 2,
        "fine-tuning needs at least 2 labelled images (one to train on, one to validate)"
    );
    let classes = labels
        .iter()
        .max()
        .map_or(0, |&c| c as usize + 1)
        .max(class_names.len());
    if let HeadStart::Saved(h) = &cfg.head_start {
        ensure!(
            h.classes == classes,
            "the model's head has {} classes but the data has {classes}",
            h.classes
        );
        ensure!(
            h.d == mc.n_embd,
            "the head reads {} features but the model has d = {}",
            h.d,
            mc.n_embd
        );
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(cfg.seed));
    let n_val = ((n as f64 * cfg.val_fraction).round() as usize).clamp(1, n - 1);
    let (val_idx, train_idx) = order.split_at(n_val);
    let val = data.select(val_idx)?;
    let val_y: Vec<u32> = val_idx.iter().map(|&i| labels[i]).collect();

    // Each rank's share of a batch goes through in passes of at most `micro_batch` images.
    let shard = Shard {
        rank: team.rank(),
        world: team.world(),
    };
    let pass = shard.pass(cfg.batch, cfg.micro_batch)?;
    let mut engine = Engine::new(mc, pass, true, device)?;
    engine.set_params(&model.params)?;
    let head = match &cfg.head_start {
        HeadStart::Saved(h) => h.clone(),
        HeadStart::Zero => Head::new(mc.n_embd, classes, class_names),
        HeadStart::Probe(images) => {
            // A linear probe on the features the head reads: the final norm's output.
            let n_probe = (*images).min(train_idx.len());
            let probe_set = data.select(&train_idx[..n_probe])?;
            let y: Vec<u32> = train_idx[..n_probe].iter().map(|&i| labels[i]).collect();
            let pooled = crate::probe::extract_features_shared(
                &mut *team,
                &mut engine,
                &probe_set,
                &[mc.n_layer],
                cfg.masks,
                Fallible(|k| {
                    progress.probing(k, n_probe);
                    progress.keep_going()
                }),
            )?;
            // Rank 0 fits the probe on everyone's features and hands the head to the others.
            let mut head = Head::new(mc.n_embd, classes, class_names.clone());
            if let Some(pooled) = pooled {
                let p = Head::from_probe(&pooled, &y, mc.n_embd, classes, class_names)?;
                progress.message(&format!(
                    "head initialised by a linear probe on {n_probe} training images \
                     ({:.2}% on its validation split)",
                    100.0 * p.val_accuracy
                ));
                head = p.head;
            }
            team.broadcast_values(&mut head.w)?;
            team.broadcast_values(&mut head.b)?;
            team.broadcast_values(&mut head.step_scale)?;
            head
        }
    };
    let mut ft = Finetuner::new(engine, head, cfg.seed ^ 0xb327);
    ft.adamw = cfg.adamw;
    ft.join(team);
    ft.check_same_everywhere("starting model and head")?;
    progress.message(&format!(
        "fine-tuning on {} images ({} for validation), {classes} classes, loss {}",
        train_idx.len(),
        val_idx.len(),
        if cfg.with_gen {
            "L_GEN + L_CLF"
        } else {
            "L_CLF"
        }
    ));
    let out = leads.then(|| RunDir::create(out)).transpose()?;
    let keep = |ft: &Finetuner| -> Result<()> {
        let Some(out) = &out else { return Ok(()) };
        out.save_config(&RunConfig {
            data: format!("fine-tuned on {data_desc}"),
            ..model.config.clone()
        })?;
        out.save_palette(&model.palette)?;
        out.save_model(mc, &ft.engine.params())?;
        ft.head.save(&out.file("head.safetensors"))
    };
    if let Some(out) = &out {
        out.clear_metrics()?;
    }
    let mut log = out.as_ref().map(|o| o.metrics_log()).transpose()?;
    let mut log_line = |line: serde_json::Value| log.as_mut().map_or(Ok(()), |l| l.write(&line));
    // The starting point is a candidate too: fine-tuning only keeps what beats it.
    let mut best = ft.accuracy(&val, &val_y, cfg.masks)?;
    let mut best_step = 0;
    keep(&ft)?;
    progress.validated(0, None, best, true);
    log_line(json!({"step": 0, "val_accuracy": best, "kept": true}))?;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0xf17e);
    let mut buf = vec![0u16; cfg.batch * t];
    let mut ys = vec![0u32; cfg.batch];
    let mut scratch = Vec::new();
    let (mut since_best, mut steps_run, mut early_stop) = (0usize, 0, false);
    for step in 1..=cfg.steps {
        for s in 0..cfg.batch {
            let i = train_idx[rng.random_range(0..train_idx.len())];
            let img = &mut buf[s * t..(s + 1) * t];
            data.copy_image(i, img);
            if cfg.pad_crop > 0 || cfg.flip {
                augment(img, mc.side, cfg.pad_crop, cfg.flip, &mut rng, &mut scratch);
            }
            ys[s] = labels[i];
        }
        let lr = warmup_lr(cfg.lr, step, cfg.warmup);
        let head_lr = cfg.head_lr.unwrap_or(lr);
        let started = std::time::Instant::now();
        let st = ft.step(&buf, &ys, lr, head_lr, cfg.with_gen)?;
        let tokens_per_s = (cfg.batch * t) as f64 / started.elapsed().as_secs_f64().max(1e-9);
        steps_run = step;
        ensure!(
            st.gen_loss.is_finite() && st.clf_loss.is_finite(),
            "fine-tuning diverged at step {step} (L_GEN {}, L_CLF {}): lower the learning rate",
            st.gen_loss,
            st.clf_loss
        );
        progress.step(step, &st, tokens_per_s);
        log_line(json!({
            "step": step, "l_gen": st.gen_loss, "l_clf": st.clf_loss,
            "batch_accuracy": st.accuracy, "grad_norm": st.grad_norm, "lr": lr,
            "head_lr": head_lr, "tokens_per_s": tokens_per_s,
        }))?;
        if step % cfg.eval_every == 0 || step == cfg.steps {
            let acc = ft.accuracy(&val, &val_y, cfg.masks)?;
            let better = acc > best;
            progress.validated(step, Some(&st), acc, better);
            log_line(json!({"step": step, "val_accuracy": acc, "kept": better}))?;
            if better {
                (best, best_step, since_best) = (acc, step, 0);
                ft.check_same_everywhere(&format!("model at step {step}"))?;
                keep(&ft)?;
            } else {
                since_best += 1;
                if since_best >= cfg.patience {
                    early_stop = true;
                    break;
                }
            }
        }
        let asked = progress.keep_going();
        if ft.team().any(asked.is_err())? {
            return Err(asked.err().unwrap_or(Stopped).into());
        }
    }
    Ok(FinetuneSummary {
        best_val_accuracy: best,
        best_step,
        steps_run,
        early_stop,
        train_images: train_idx.len(),
        val_images: val_idx.len(),
    })
}

/// Accuracy of a model and its classification head on labelled images.
pub fn test_accuracy(
    model: &LoadedModel,
    head: &Head,
    data: &TokenSet,
    masks: usize,
    device: &Device,
) -> Result<f64> {
    let labels = data.labels().context("the test images have no labels")?;
    check_classes(head, &labels)?;
    let mut e = Engine::new(model.model(), 32, false, device)?;
    e.set_params(&model.params)?;
    let pred = classify(&mut e, head, data, masks)?;
    Ok(crate::probe::accuracy(&pred, &labels))
}

/// Refuses labels the head has no class for.
fn check_classes(head: &Head, labels: &[u32]) -> Result<()> {
    if let Some(&bad) = labels.iter().find(|&&l| l as usize >= head.classes) {
        anyhow::bail!(
            "the images have class {bad}, but the model's head has {} classes",
            head.classes
        );
    }
    Ok(())
}

/// A fine-tuning run as a user asks for it: what `igpt finetune`'s flags (or the Python
/// bindings' keyword arguments) say, in values, with the command's defaults
/// ([`FinetuneSettings::default`]). [`FinetuneSettings::config`] makes the run's
/// [`FinetuneConfig`] for a model; the command line and the bindings share it.
#[derive(Debug, Clone, PartialEq)]
pub struct FinetuneSettings {
    pub steps: u64,
    pub batch: usize,
    /// Images per forward pass (default: the whole batch).
    pub micro_batch: Option<usize>,
    pub lr: f32,
    pub warmup: u64,
    /// The head's rate (default: the model's, ramped with it).
    pub head_lr: Option<f32>,
    /// Train on the classification loss alone (default: generative + classification).
    pub clf_only: bool,
    /// Start the head at zero instead of at a linear probe.
    pub zero_head: bool,
    /// Training images the initial linear probe is fitted on.
    pub probe_images: usize,
    pub pad_crop: usize,
    pub flip: bool,
    pub eval_every: u64,
    pub patience: usize,
    /// BERT models' evaluation masks (default: [`bert::EVAL_MASKS`] for BERT models).
    pub masks: Option<usize>,
    pub val_fraction: f64,
    pub seed: u64,
}

impl Default for FinetuneSettings {
    fn default() -> Self {
        let c = FinetuneConfig::default();
        Self {
            steps: c.steps,
            batch: c.batch,
            micro_batch: None,
            lr: c.lr,
            warmup: c.warmup,
            head_lr: c.head_lr,
            clf_only: !c.with_gen,
            zero_head: false,
            probe_images: match c.head_start {
                HeadStart::Probe(n) => n,
                _ => 10_000,
            },
            pad_crop: c.pad_crop,
            flip: c.flip,
            eval_every: c.eval_every,
            patience: c.patience,
            masks: None,
            val_fraction: c.val_fraction,
            seed: c.seed,
        }
    }
}

impl FinetuneSettings {
    /// The settings alone, checked before any model or data is loaded (the head starts at zero
    /// and no masks are set: [`FinetuneSettings::config`] decides those for a model).
    pub fn base(&self) -> Result<FinetuneConfig> {
        let cfg = FinetuneConfig {
            steps: self.steps,
            batch: self.batch,
            micro_batch: self.micro_batch.unwrap_or(self.batch),
            lr: self.lr,
            warmup: self.warmup,
            head_lr: self.head_lr,
            with_gen: !self.clf_only,
            head_start: HeadStart::Zero,
            pad_crop: self.pad_crop,
            flip: self.flip,
            eval_every: self.eval_every,
            patience: self.patience,
            val_fraction: self.val_fraction,
            seed: self.seed,
            ..FinetuneConfig::default()
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The run's settings for `model`, loaded from `model_dir`: its evaluation masks, and its
    /// head's start (the head saved beside a fine-tuned model, continuing it; else zero when
    /// asked; else a linear probe).
    pub fn config(&self, model: &LoadedModel, model_dir: &Path) -> Result<FinetuneConfig> {
        let mut cfg = self.base()?;
        cfg.masks = bert::masks_for(model.model(), self.masks)?;
        let existing = model_dir.join("head.safetensors");
        cfg.head_start = if existing.exists() {
            HeadStart::Saved(Head::load(&existing)?)
        } else if self.zero_head {
            HeadStart::Zero
        } else {
            HeadStart::Probe(self.probe_images)
        };
        Ok(cfg)
    }
}
