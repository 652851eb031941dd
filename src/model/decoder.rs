//! Incremental decoding with a key/value cache: each new position costs one token's work per
//! layer. Buffers (including the caches for the whole context) are planned once for
//! (model, batch); a step allocates nothing.

use super::ParamLayout;
use super::block::{BlockIo, block_forward, head_forward};
use crate::backend::{Arena, ArenaSizes, AttnShape, Backend, Device, View};
use crate::config::ModelConfig;

/// Offsets in [`Arena::Acts`] of one step's buffers and of the caches.
struct StepPlan {
    resid: [usize; 2],
    ln1: usize,
    rstd1: usize,
    qkv: usize,
    att: usize,
    mid: usize,
    ln2: usize,
    rstd2: usize,
    fc: usize,
    fc_act: usize,
    lnf: usize,
    rstdf: usize,
    logits: usize,
    scores: usize,
    /// Positions each cache holds (the backend's [`Backend::decode_cache_len`]).
    cache_len: usize,
    /// Per layer: K and V caches of `batch * cache_len * d` elements each.
    caches: Vec<(usize, usize)>,
    total: usize,
}

impl StepPlan {
    fn new(cfg: &ModelConfig, batch: usize, backend: &dyn Backend) -> Self {
        let d = cfg.n_embd;
        let t = backend.decode_cache_len(cfg.n_ctx());
        let mut off = 0;
        let mut take = |n: usize| {
            let at = off;
            off += n.next_multiple_of(16);
            at
        };
        let resid = [take(batch * d), take(batch * d)];
        let ln1 = take(batch * d);
        let rstd1 = take(batch);
        let qkv = take(batch * 3 * d);
        let att = take(batch * d);
        let mid = take(batch * d);
        let ln2 = take(batch * d);
        let rstd2 = take(batch);
        let fc = take(batch * 4 * d);
        let fc_act = take(batch * 4 * d);
        let lnf = take(batch * d);
        let rstdf = take(batch);
        let logits = take(batch * cfg.n_vocab);
        let scores = take(batch * cfg.n_head * t);
        let caches = (0..cfg.n_layer)
            .map(|_| (take(batch * t * d), take(batch * t * d)))
            .collect();
        Self {
            resid,
            ln1,
            rstd1,
            qkv,
            att,
            mid,
            ln2,
            rstd2,
            fc,
            fc_act,
            lnf,
            rstdf,
            logits,
            scores,
            cache_len: t,
            caches,
            total: off,
        }
    }
}

fn act(offset: usize, len: usize) -> View {
    View::new(Arena::Acts, offset, len)
}

/// A model that generates `batch` images one position at a time.
pub struct Decoder {
    pub cfg: ModelConfig,
    pub layout: ParamLayout,
    pub batch: usize,
    plan: StepPlan,
    backend: Box<dyn Backend>,
    /// Next position to feed.
    pos: usize,
    host_logits: Vec<f32>,
}

impl Decoder {
    /// A decoder on `device` with zero parameters (set them with [`Decoder::set_params`]).
    pub fn new(cfg: &ModelConfig, batch: usize, device: &Device) -> anyhow::Result<Self> {
        Self::build(cfg, batch, device, None)
    }

    /// A decoder that takes ownership of `params` (a large model is held once).
    pub fn with_params(
        cfg: &ModelConfig,
        batch: usize,
        device: &Device,
        params: Vec<f32>,
    ) -> anyhow::Result<Self> {
        Self::build(cfg, batch, device, Some(params))
    }

    fn build(
        cfg: &ModelConfig,
        batch: usize,
        device: &Device,
        params: Option<Vec<f32>>,
    ) -> anyhow::Result<Self> {
        cfg.validate()?;
        anyhow::ensure!(batch >= 1, "batch size must be at least 1");
        let mut backend = device.open()?;
        // Checked from the shape alone, before the layout or the plan computes a size.
        let cache_len = backend.decode_cache_len(cfg.n_ctx());
        let own = if params.is_none() {
            4 * crate::memory::param_count(cfg)
        } else {
            0
        };
        crate::memory::Estimate::new()
            .add("parameters", own, crate::memory::Scale::Model)
            .add(
                "key/value caches and step buffers",
                4 * crate::memory::decoder_floats(cfg, batch, cache_len),
                crate::memory::Scale::Batch,
            )
            .check("generating with this model and batch")?;
        let layout = ParamLayout::new(cfg);
        if let Some(p) = &params {
            anyhow::ensure!(
                p.len() == layout.total,
                "parameter buffer holds {} floats, the model needs {}",
                p.len(),
                layout.total
            );
        }
        let plan = StepPlan::new(cfg, batch, backend.as_ref());
        backend.allocate(ArenaSizes {
            params: if params.is_some() { 0 } else { layout.total },
            grads: 0,
            acts: plan.total,
            tokens: batch,
            max_rows: batch,
            max_width: cfg.n_embd,
        })?;
        if let Some(p) = params {
            backend.adopt_params(p);
        }
        Ok(Self {
            cfg: cfg.clone(),
            layout,
            batch,
            plan,
            backend,
            pos: 0,
            host_logits: vec![0.0; batch * cfg.n_vocab],
        })
    }

    pub fn set_params(&mut self, params: &[f32]) -> anyhow::Result<()> {
        anyhow::ensure!(
            params.len() == self.layout.total,
            "parameter buffer holds {} floats, the model needs {}",
            params.len(),
            self.layout.total
        );
        self.backend
            .upload(View::new(Arena::Params, 0, self.layout.total), params);
        Ok(())
    }

    /// Starts new sequences (the caches are overwritten as positions are fed again).
    pub fn reset(&mut self) {
        self.pos = 0;
    }

    /// The position the next [`Decoder::step`] feeds.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Feeds the next position. `prev[b]` is sequence b's token at the previous position
    /// (ignored at position 0, where the start vector is the input). Returns the logits
    /// `[batch, n_vocab]` that predict the token at this position.
    pub fn step(&mut self, prev: &[u16]) -> anyhow::Result<&[f32]> {
        let cfg = &self.cfg;
        let (d, t, v) = (cfg.n_embd, cfg.n_ctx(), cfg.n_vocab);
        anyhow::ensure!(
            self.pos < t,
            "all {t} positions have been generated; reset the decoder first"
        );
        anyhow::ensure!(
            prev.len() == self.batch,
            "expected {} previous tokens, got {}",
            self.batch,
            prev.len()
        );
        if self.pos > 0
            && let Some(&bad) = prev.iter().find(|&&x| x as usize >= v)
        {
            anyhow::bail!("token id {bad} is outside the palette of {v} colours");
        }
        let (plan, lay, b, rows, pos) = (
            &self.plan,
            &self.layout,
            self.backend.as_mut(),
            self.batch,
            self.pos,
        );
        let pv = |o: usize, n: usize| View::new(Arena::Params, o, n);
        let shape = AttnShape {
            batch: rows,
            t,
            n_head: cfg.n_head,
            head_dim: cfg.head_dim(),
            causal: true,
        };
        b.set_tokens(prev);
        b.embed_step(
            act(plan.resid[0], rows * d),
            pv(lay.wte, v * d),
            pv(lay.wpe, t * d),
            pv(lay.sos, d),
            pos,
            d,
        );
        for (l, po) in lay.blocks.iter().enumerate() {
            let io = BlockIo {
                x: act(plan.resid[l % 2], rows * d),
                ln1: act(plan.ln1, rows * d),
                rstd1: act(plan.rstd1, rows),
                qkv: act(plan.qkv, rows * 3 * d),
                att: act(plan.att, rows * d),
                mid: act(plan.mid, rows * d),
                ln2: act(plan.ln2, rows * d),
                rstd2: act(plan.rstd2, rows),
                fc: act(plan.fc, rows * 4 * d),
                fc_act: act(plan.fc_act, rows * 4 * d),
                out: act(plan.resid[(l + 1) % 2], rows * d),
            };
            let (kc, vc) = plan.caches[l];
            let tc = plan.cache_len;
            let (kc, vc) = (act(kc, rows * tc * d), act(vc, rows * tc * d));
            let scores = act(plan.scores, rows * cfg.n_head * tc);
            block_forward(b, po, &io, rows, d, |b, qkv, att| {
                b.attention_step(att, kc, vc, qkv, scores, shape, pos)
            });
        }
        let last = act(plan.resid[cfg.n_layer % 2], rows * d);
        let logits = act(plan.logits, rows * v);
        head_forward(
            b,
            lay,
            last,
            act(plan.lnf, rows * d),
            act(plan.rstdf, rows),
            logits,
            rows,
            d,
            v,
        );
        b.download(logits, &mut self.host_logits);
        self.pos += 1;
        Ok(&self.host_logits)
    }
}
