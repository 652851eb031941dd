//! Fine-tuning (REFERENCE.md §6): a linear classifier on the mean over positions of the final
//! norm's output, trained together with the model on `L_GEN + L_CLF` (or `L_CLF` alone).

use crate::backend::cpu::CpuBackend;
use crate::backend::{AdamStep, Arena, Backend, View};
use crate::model::Engine;
use anyhow::{Context, Result, ensure};
use rand::Rng;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
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
    pub engine: Engine<CpuBackend>,
    pub head: Head,
    head_m: Vec<f32>,
    head_v: Vec<f32>,
    step: u64,
    /// Gradient buffers kept across steps.
    d_lnf: Vec<f32>,
    grad_w: Vec<f32>,
    grad_b: Vec<f32>,
    /// A BERT model's training masks (fresh ones every step, as in pre-training).
    mask: Vec<bool>,
    perm: Vec<usize>,
    mask_seed: u64,
    scratch: HeadScratch,
}

/// One fine-tuning step's losses (means per image / per token) and batch accuracy.
#[derive(Debug, Clone, Copy)]
pub struct FinetuneStats {
    pub gen_loss: f64,
    pub clf_loss: f64,
    pub accuracy: f64,
}

impl Finetuner {
    /// `mask_seed` seeds a BERT model's training masks (unused for autoregressive models).
    pub fn new(engine: Engine<CpuBackend>, head: Head, mask_seed: u64) -> Self {
        let n = head.w.len() + head.b.len();
        Self {
            mask: Vec::new(),
            perm: Vec::new(),
            mask_seed,
            scratch: HeadScratch::default(),
            engine,
            head,
            head_m: vec![0.0; n],
            head_v: vec![0.0; n],
            step: 0,
            d_lnf: Vec::new(),
            grad_w: Vec::new(),
            grad_b: Vec::new(),
        }
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

    /// One Adam step on `L_CLF` (+ `L_GEN` when `with_gen`) for a batch of images, at rate
    /// `lr` for the model and `head_lr` for the head. The batch may be any multiple of the
    /// engine's batch: it goes through in passes of that many images whose gradients add up, so
    /// a large batch needs only one pass's memory. A BERT model sees each image with 15% of its
    /// pixels hidden (a fresh mask every step) and its `L_GEN` is the masked objective over
    /// them.
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
            "a batch of {n} images does not split into passes of {pass} (make the batch a \
             multiple of the micro-batch)"
        );
        self.engine.zero_grads();
        let (gw, gb) = (&mut self.grad_w, &mut self.grad_b);
        gw.clear();
        gw.resize(self.head.w.len(), 0.0);
        gb.clear();
        gb.resize(self.head.b.len(), 0.0);
        let mut clf = 0.0;
        let head = &self.head;
        let scratch = &mut self.scratch;
        let bert = !self.engine.cfg.causal();
        // Tokens the generative loss is averaged over.
        let scored = if bert {
            n * crate::train::mask_count(t)
        } else {
            n * t
        };
        if bert {
            self.mask.resize(n * t, false);
            for (i, m) in self.mask.chunks_exact_mut(t).enumerate() {
                let key = self.step * n as u64 + i as u64;
                crate::train::bert_mask(self.mask_seed, key, &mut self.perm, m);
            }
        }
        let gen_scale = if with_gen { 1.0 / scored as f32 } else { 0.0 };
        let (mut gen_sum, mut right) = (0.0, 0usize);
        for p in 0..n / pass {
            let images = p * pass..(p + 1) * pass;
            let pixels = images.start * t..images.end * t;
            let labels = &labels[images];
            gen_sum += self.engine.forward_backward_with_head(
                &tokens[pixels.clone()],
                bert.then(|| &self.mask[pixels]),
                gen_scale,
                &mut self.d_lnf,
                |lnf, d| {
                    clf +=
                        head.loss_grads_predict(lnf, labels, t, 1.0 / n as f32, gw, gb, d, scratch);
                },
            )?;
            right += scratch
                .predicted
                .iter()
                .zip(labels)
                .filter(|(p, y)| p == y)
                .count();
        }
        self.step += 1;
        let h = AdamStep {
            lr,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
            step: self.step,
            grad_scale: 1.0,
        };
        for i in 0..self.engine.layout.tensors.len() {
            let (off, len) = {
                let s = &self.engine.layout.tensors[i];
                (s.offset, s.len)
            };
            self.engine
                .backend_mut()
                .adamw(View::new(Arena::Params, off, len), h, false);
        }
        // The head's Adam on the host.
        let (b1, b2) = (0.9f32, 0.95f32);
        let (c1, c2) = (
            1.0 - b1.powi(self.step as i32),
            1.0 - b2.powi(self.step as i32),
        );
        let nw = self.head.w.len();
        for (i, g) in self.grad_w.iter().chain(&self.grad_b).enumerate() {
            self.head_m[i] = b1 * self.head_m[i] + (1.0 - b1) * g;
            self.head_v[i] = b2 * self.head_v[i] + (1.0 - b2) * g * g;
            let upd = head_lr * (self.head_m[i] / c1) / ((self.head_v[i] / c2).sqrt() + 1e-8);
            if i < nw {
                self.head.w[i] -= upd * self.head.step_scale[i / self.head.classes];
            } else {
                self.head.b[i - nw] -= upd;
            }
        }
        Ok(FinetuneStats {
            gen_loss: gen_sum / scored as f64,
            clf_loss: clf / n as f64,
            accuracy: right as f64 / n as f64,
        })
    }
}

/// Predicted classes of `tokens` (`[n, t]`) by an engine and head. A BERT model reads each
/// image whole (`masks = 0`) or with `masks` fixed random masks, averaging the class
/// probabilities over them; autoregressive models need `masks = 0`.
pub fn classify(
    engine: &mut Engine<CpuBackend>,
    head: &Head,
    tokens: &crate::data::TokenSet,
    masks: usize,
) -> Result<Vec<u32>> {
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
        "masks are for BERT models; this one is autoregressive (leave --masks at 0)"
    );
    let mut buf = vec![0u16; batch * t];
    let mut mask = vec![false; batch * t];
    let mut perm = Vec::new();
    let (mut lnf, mut probs) = (Vec::new(), Vec::new());
    let mut out = Vec::with_capacity(tokens.len());
    for start in (0..tokens.len()).step_by(batch) {
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
                    crate::probe::eval_masks(start, b, t, masks, k, &mut perm, &mut mask);
                }
                engine.forward_masked(&buf[..b * t], &mask[..b * t], None)?;
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
    Ok(out)
}
