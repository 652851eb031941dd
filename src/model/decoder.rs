//! Incremental decoding with a key/value cache: each new position costs one token's work per
//! layer, and known tokens (the kept part of an image to complete) go through the blocks many
//! positions at a time (a prefill) instead. Buffers, including the caches for the whole context,
//! are planned once for (model, batch, precision); a step allocates nothing. Where the
//! backend records calls (a GPU: CUDA graphs), a step's few hundred kernel calls are recorded
//! once per number of sequences and replayed at every position.

use super::ParamLayout;
use super::block::{BlockIo, PackJob, Weights, block_forward, head_forward};
use super::replay::{self, Replays};
use crate::backend::{Arena, ArenaSizes, AttnShape, Backend, Device, DrawSizes, Precision, View};
use crate::config::ModelConfig;
use crate::sample::SampleOptions;

/// Rows (sequences x positions) one prefill chunk runs through the blocks at once: enough for
/// efficient products, few enough that the chunk's activations stay small.
const PREFILL_ROWS: usize = 256;

/// Recorded steps a decoder keeps (one per number of sequences it has stepped): sampling steps
/// at one batch size, shrinking as images finish, so a few cover nearly every step.
const KEPT_RECORDINGS: usize = 8;

/// The step buffers (sized for a prefill chunk's rows: each use takes its first rows) and the
/// caches, in [`Arena::Acts`]. The inputs of the packed products (`ln1`, `att`, `ln2`,
/// `fc_act`, `lnf`) are bfloat16 in [`Arena::Half`] instead where the backend would round them
/// to bfloat16 anyway ([`Backend::rounds_packed_inputs`]), so each producer stores them
/// rounded and the product reads them as they are, one pass fewer per product.
struct StepPlan {
    /// The residual stream, which every block adds to in place (nothing decoding needs a
    /// block's input after it).
    resid: View,
    ln1: View,
    rstd1: View,
    qkv: View,
    att: View,
    ln2: View,
    rstd2: View,
    fc: View,
    fc_act: View,
    lnf: View,
    rstdf: View,
    logits: View,
    scores: View,
    /// Positions each cache holds (the backend's [`Backend::decode_cache_len`]).
    cache_len: usize,
    /// Positions one prefill chunk feeds per sequence.
    chunk: usize,
    /// Per layer: K and V caches of `batch * cache_len * d` elements each (f32 in the
    /// activation arena, or bfloat16 in the half arena).
    caches: Vec<(View, View)>,
    acts: usize,
}

impl StepPlan {
    fn new(
        cfg: &ModelConfig,
        batch: usize,
        precision: Precision,
        backend: &dyn Backend,
        half_used: &mut usize,
    ) -> Self {
        let d = cfg.n_embd;
        let t = backend.decode_cache_len(cfg.n_ctx());
        let chunk = Self::chunk(cfg, batch);
        let rows = batch * chunk;
        let mut off = 0;
        let mut take = |n: usize| {
            let at = off;
            off += n.next_multiple_of(16);
            act(at, n)
        };
        let rounded_inputs = precision == Precision::Bf16 && backend.rounds_packed_inputs();
        let mut product_input = |take: &mut dyn FnMut(usize) -> View, len: usize| {
            if rounded_inputs {
                let v = View::bf16(*half_used, len);
                *half_used += len.next_multiple_of(32);
                v
            } else {
                take(len)
            }
        };
        let resid = take(rows * d);
        let ln1 = product_input(&mut take, rows * d);
        let rstd1 = take(rows);
        let qkv = take(rows * 3 * d);
        let att = product_input(&mut take, rows * d);
        let ln2 = product_input(&mut take, rows * d);
        let rstd2 = take(rows);
        let fc = take(rows * 4 * d);
        let fc_act = product_input(&mut take, rows * 4 * d);
        let lnf = product_input(&mut take, batch * d);
        let rstdf = take(batch);
        let logits = take(batch * cfg.n_vocab);
        let scores = take(batch * cfg.n_head * t);
        let per_cache = batch * t * d;
        let caches = (0..cfg.n_layer)
            .map(|_| match precision {
                Precision::F32 => (take(per_cache), take(per_cache)),
                Precision::Bf16 => {
                    let k = View::bf16(*half_used, per_cache);
                    let v = View::bf16(*half_used + per_cache.next_multiple_of(32), per_cache);
                    *half_used += 2 * per_cache.next_multiple_of(32);
                    (k, v)
                }
            })
            .collect();
        Self {
            resid,
            ln1,
            rstd1,
            qkv,
            att,
            ln2,
            rstd2,
            fc,
            fc_act,
            lnf,
            rstdf,
            logits,
            scores,
            cache_len: t,
            chunk,
            caches,
            acts: off,
        }
    }

    /// Positions one prefill chunk feeds per sequence.
    fn chunk(cfg: &ModelConfig, batch: usize) -> usize {
        (PREFILL_ROWS / batch).clamp(1, cfg.n_ctx())
    }

    /// The block buffers for `rows` rows (the same for every layer).
    fn io(&self, rows: usize, d: usize) -> BlockIo {
        BlockIo {
            x: first(self.resid, rows * d),
            ln1: first(self.ln1, rows * d),
            rstd1: first(self.rstd1, rows),
            qkv: first(self.qkv, rows * 3 * d),
            att: first(self.att, rows * d),
            mid: first(self.resid, rows * d),
            ln2: first(self.ln2, rows * d),
            rstd2: first(self.rstd2, rows),
            fc: first(self.fc, rows * 4 * d),
            fc_act: first(self.fc_act, rows * 4 * d),
            out: first(self.resid, rows * d),
        }
    }

    /// Layer `l`'s caches of the first `seqs` sequences.
    fn caches(&self, l: usize, seqs: usize, d: usize) -> (View, View) {
        let (mut k, mut v) = self.caches[l];
        k.len = seqs * self.cache_len * d;
        v.len = k.len;
        (k, v)
    }
}

fn act(offset: usize, len: usize) -> View {
    View::new(Arena::Acts, offset, len)
}

/// The first `len` elements of a planned buffer.
fn first(v: View, len: usize) -> View {
    debug_assert!(len <= v.len);
    View { len, ..v }
}

/// A model that generates `batch` images one position at a time.
pub struct Decoder {
    pub cfg: ModelConfig,
    pub layout: ParamLayout,
    pub batch: usize,
    pub precision: Precision,
    plan: StepPlan,
    weights: Weights,
    pack_jobs: Vec<PackJob>,
    backend: Box<dyn Backend>,
    /// Next position to feed.
    pos: usize,
    /// Sequences being decoded (the first `rows` of the batch; see [`Decoder::prefill_rows`]).
    rows: usize,
    /// Recorded steps, by number of sequences and whether the step draws its tokens.
    replays: Replays<(usize, bool)>,
    host_logits: Vec<f32>,
    /// Whether the backend's draws are set for the current sequences ([`Decoder::set_draws`];
    /// moving sequences, by [`Decoder::retain`] or a prefill, unsets them).
    draws_set: bool,
    /// Positions drawn on the backend with the current rows, in order, the last being the
    /// last position fed: its tokens are the backend's stored tokens, the next step's inputs.
    drawn: std::ops::Range<usize>,
    host_drawn: Vec<u16>,
}

impl Decoder {
    /// An f32 decoder on `device` with zero parameters (set them with [`Decoder::set_params`]).
    pub fn new(cfg: &ModelConfig, batch: usize, device: &Device) -> anyhow::Result<Self> {
        Self::build(cfg, batch, device, &mut None, Precision::F32)
    }

    /// An f32 decoder that takes ownership of `params` (a large model is held once).
    pub fn with_params(
        cfg: &ModelConfig,
        batch: usize,
        device: &Device,
        params: Vec<f32>,
    ) -> anyhow::Result<Self> {
        Self::build(cfg, batch, device, &mut Some(params), Precision::F32)
    }

    /// A decoder whose weights and caches are held at `precision` ([`Precision::Bf16`] packs
    /// every matrix once, here).
    pub fn with_precision(
        cfg: &ModelConfig,
        batch: usize,
        device: &Device,
        params: Vec<f32>,
        precision: Precision,
    ) -> anyhow::Result<Self> {
        Self::build(cfg, batch, device, &mut Some(params), precision)
    }

    /// As [`Decoder::with_precision`], taking the parameters out of `params` only once the
    /// decoder is built: on an error (too little memory, say) they stay where they were.
    pub fn adopting(
        cfg: &ModelConfig,
        batch: usize,
        device: &Device,
        params: &mut Vec<f32>,
        precision: Precision,
    ) -> anyhow::Result<Self> {
        let mut slot = Some(std::mem::take(params));
        let built = Self::build(cfg, batch, device, &mut slot, precision);
        if let Some(p) = slot {
            *params = p;
        }
        built
    }

    /// The parameters, handed back without a copy where the device holds them in host memory
    /// (the decoder is spent).
    pub fn into_params(mut self) -> Vec<f32> {
        self.backend.release_params(self.layout.total)
    }

    fn build(
        cfg: &ModelConfig,
        batch: usize,
        device: &Device,
        params: &mut Option<Vec<f32>>,
        precision: Precision,
    ) -> anyhow::Result<Self> {
        cfg.validate()?;
        anyhow::ensure!(
            cfg.causal(),
            "this is a BERT (masked-objective) model: it fills in masked pixels but does not \
             generate images pixel by pixel; use an autoregressive model"
        );
        anyhow::ensure!(batch >= 1, "batch size must be at least 1");
        Self::build_on(device.open()?, cfg, batch, params, precision)
    }

    /// [`Decoder::build`] on an opened backend (`cfg` and `batch` checked).
    fn build_on(
        mut backend: Box<dyn Backend>,
        cfg: &ModelConfig,
        batch: usize,
        params: &mut Option<Vec<f32>>,
        precision: Precision,
    ) -> anyhow::Result<Self> {
        let limit = backend.decode_context_limit(cfg.head_dim());
        anyhow::ensure!(
            cfg.n_ctx() <= limit,
            "this model's context of {} positions is more than the {} backend decodes (at most \
             {limit} for heads of {} columns): sample, complete or serve it with --device cpu",
            cfg.n_ctx(),
            backend.name(),
            cfg.head_dim()
        );
        // Checked from the shape alone, before the layout or the plan computes a size.
        let cache_len = backend.decode_cache_len(cfg.n_ctx());
        // Adopted parameters cost nothing more on the host; a device copies them into its own.
        let device_free = backend.device_memory_free();
        let own = if params.is_none() || device_free.is_some() {
            4 * crate::memory::param_count(cfg)
        } else {
            0
        };
        crate::memory::Estimate::new()
            .add("parameters", own, crate::memory::Scale::Model)
            .add(
                "key/value caches and step buffers",
                crate::memory::decoder_bytes(
                    cfg,
                    batch,
                    batch * StepPlan::chunk(cfg, batch),
                    cache_len,
                    precision,
                ),
                crate::memory::Scale::Batch,
            )
            .check_in("generating with this model and batch", device_free)?;
        let layout = ParamLayout::new(cfg);
        if let Some(p) = params.as_ref() {
            layout.check_len(p.len())?;
        }
        let (plan, weights, pack_jobs, sizes) = Self::plan(
            cfg,
            &layout,
            batch,
            precision,
            params.is_none(),
            backend.as_ref(),
        );
        backend.allocate(sizes)?;
        if let Some(p) = params.take() {
            backend.adopt_params(p)?;
        }
        Weights::pack(backend.as_mut(), &pack_jobs);
        Ok(Self {
            cfg: cfg.clone(),
            layout,
            batch,
            precision,
            plan,
            weights,
            pack_jobs,
            backend,
            pos: 0,
            rows: batch,
            replays: Replays::new(KEPT_RECORDINGS),
            host_logits: vec![0.0; batch * cfg.n_vocab],
            draws_set: false,
            drawn: 0..0,
            host_drawn: vec![0; batch * cfg.n_ctx()],
        })
    }

    /// Everything a decoder of this shape lays out before allocating: the step plan, how the
    /// weights are read (and packed), and the arena sizes it asks the backend for.
    fn plan(
        cfg: &ModelConfig,
        layout: &ParamLayout,
        batch: usize,
        precision: Precision,
        own_params: bool,
        backend: &dyn Backend,
    ) -> (StepPlan, Weights, Vec<PackJob>, ArenaSizes) {
        let (d, v) = (cfg.n_embd, cfg.n_vocab);
        let mut half = 0;
        let (weights, pack_jobs) = match precision {
            Precision::F32 => (Weights::f32(layout, d, v), Vec::new()),
            Precision::Bf16 => Weights::packed(layout, d, v, backend, &mut half),
        };
        let plan = StepPlan::new(cfg, batch, precision, backend, &mut half);
        let rows = batch * plan.chunk;
        let sizes = ArenaSizes {
            params: if own_params { layout.total } else { 0 },
            grads: 0,
            acts: plan.acts,
            half,
            // The widest packed product's input: the MLP down-projection's `[rows, 4d]`.
            max_packed_input: if precision == Precision::Bf16 {
                rows * 4 * d
            } else {
                0
            },
            tokens: rows,
            max_rows: rows,
            max_width: d,
            embedding_rows: 0,
            draws: DrawSizes {
                rows: batch,
                positions: cfg.n_ctx(),
                width: v,
            },
        };
        (plan, weights, pack_jobs, sizes)
    }

    pub fn set_params(&mut self, params: &[f32]) -> anyhow::Result<()> {
        self.layout.check_len(params.len())?;
        self.backend
            .upload(View::new(Arena::Params, 0, self.layout.total), params);
        Weights::pack(self.backend.as_mut(), &self.pack_jobs);
        Ok(())
    }

    /// Starts new sequences (the caches are overwritten as positions are fed again).
    pub fn reset(&mut self) {
        self.pos = 0;
        self.rows = self.batch;
        self.draws_set = false;
        self.drawn = 0..0;
    }

    /// The position the next [`Decoder::step`] feeds.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Whether steps may be recorded and replayed where the backend records (on by default;
    /// off runs every step call by call, for comparisons).
    pub fn set_replay(&mut self, on: bool) {
        self.replays.set_on(on, self.backend.as_mut());
    }

    /// Whether steps are replayed from recordings: the backend records, recording has not
    /// failed, and a step has been recorded.
    pub fn replaying(&self) -> bool {
        self.replays.replaying()
    }

    /// Why steps are not replayed on a backend that records: recording or a replay failed
    /// (steps then run call by call, with the same results; [`Decoder::set_replay`] retries).
    pub fn replay_failure(&self) -> Option<&str> {
        self.replays.failure()
    }

    /// Starts new sequences whose first `len` tokens are known: `known` is `[batch, len]`.
    /// Positions `0..len` go through the blocks `chunk` positions at a time, filling the
    /// caches; sequences with the same known tokens are computed once. Afterwards
    /// [`Decoder::position`] is `len` and the next [`Decoder::step`] takes each sequence's
    /// token at `len - 1`. No logits are computed: every token they would predict is known.
    pub fn prefill(&mut self, known: &[u16], len: usize) -> anyhow::Result<()> {
        self.prefill_rows(self.batch, known, len)
    }

    /// [`Decoder::prefill`] for the first `rows` sequences of the batch only (`known` is
    /// `[rows, len]`): until the next prefill, steps take and return `rows` sequences, so a
    /// batch that is not full costs only its own rows.
    pub fn prefill_rows(&mut self, rows: usize, known: &[u16], len: usize) -> anyhow::Result<()> {
        anyhow::ensure!(
            (1..=self.batch).contains(&rows),
            "{rows} sequences for a decoder of batch {}",
            self.batch
        );
        self.rows = rows;
        self.draws_set = false;
        self.drawn = 0..0;
        let cfg = &self.cfg;
        let (t, v) = (cfg.n_ctx(), cfg.n_vocab);
        anyhow::ensure!(
            len <= t,
            "a prefix of {len} pixels is longer than the image ({t} pixels)"
        );
        anyhow::ensure!(
            known.len() == rows * len,
            "expected {} known tokens ({rows} sequences of {len}), got {}",
            rows * len,
            known.len()
        );
        if let Some(&bad) = known.iter().find(|&&x| x as usize >= v) {
            anyhow::bail!("token id {bad} is outside the palette of {v} colours");
        }
        self.pos = 0;
        if len == 0 {
            return Ok(());
        }
        // The distinct prefixes, in order of first appearance (completions of one image share
        // theirs).
        let mut firsts: Vec<usize> = Vec::new();
        let mut prefix_of = vec![0; rows];
        for b in 0..rows {
            let row = &known[b * len..(b + 1) * len];
            prefix_of[b] = match firsts
                .iter()
                .position(|&f| &known[f * len..(f + 1) * len] == row)
            {
                Some(i) => i,
                None => {
                    firsts.push(b);
                    firsts.len() - 1
                }
            };
        }
        let seqs = firsts.len();
        let chunk = (self.plan.chunk * self.batch / seqs).min(t);
        let mut inputs = Vec::with_capacity(seqs * chunk);
        for c0 in (0..len).step_by(chunk) {
            let n = chunk.min(len - c0);
            inputs.clear();
            for &f in &firsts {
                inputs
                    .extend((c0..c0 + n).map(|p| if p == 0 { 0 } else { known[f * len + p - 1] }));
            }
            self.backend.set_tokens(&inputs);
            self.feed(seqs, c0, n);
        }
        // Sequence s takes distinct prefix i <= s, computed in cache row i: filling rows from
        // the last down never overwrites a row still to be read.
        for s in (0..rows).rev() {
            if prefix_of[s] != s {
                self.copy_cache_row(s, prefix_of[s]);
            }
        }
        self.pos = len;
        Ok(())
    }

    /// Goes on with only the sequences `keep` (ascending indices among the current ones), which
    /// become sequences `0..keep.len()`: their caches move down, and later steps take and
    /// return `keep.len()` sequences. Dropping the images nobody waits for any more frees
    /// their share of every later step.
    pub fn retain(&mut self, keep: &[usize]) -> anyhow::Result<()> {
        anyhow::ensure!(
            keep.windows(2).all(|w| w[0] < w[1]) && keep.last().is_none_or(|&k| k < self.rows),
            "sequences to keep must be ascending indices below {}",
            self.rows
        );
        anyhow::ensure!(!keep.is_empty(), "at least one sequence must be kept");
        // keep[i] >= i: moving rows up from the first never overwrites a row still to be read.
        for (i, &s) in keep.iter().enumerate() {
            if i != s && self.pos > 0 {
                self.copy_cache_row(i, s);
            }
        }
        self.rows = keep.len();
        self.draws_set = false;
        self.drawn = 0..0;
        Ok(())
    }

    /// Copies sequence `src`'s keys and values, in every layer, over sequence `dst`'s. Whole
    /// rows move: how a backend lays positions out inside a row is its own.
    fn copy_cache_row(&mut self, dst: usize, src: usize) {
        let (plan, b) = (&self.plan, self.backend.as_mut());
        let row_len = plan.cache_len * self.cfg.n_embd;
        for &(k, v) in &plan.caches {
            for cache in [k, v] {
                let at = |r: usize| View {
                    offset: cache.offset + r * row_len,
                    len: row_len,
                    ..cache
                };
                b.copy(at(dst), at(src));
            }
        }
    }

    /// Runs positions `pos..pos + n` of the first `seqs` sequences through the embedding and
    /// every block, appending their keys and values to the caches. The input tokens are set
    /// (sequence-major, each position's previous token); the last block's output is left in
    /// `resid`.
    fn feed(&mut self, seqs: usize, pos: usize, n: usize) {
        let cfg = &self.cfg;
        let (d, t, v) = (cfg.n_embd, cfg.n_ctx(), cfg.n_vocab);
        let (plan, lay, b) = (&self.plan, &self.layout, self.backend.as_mut());
        let rows = seqs * n;
        let shape = AttnShape {
            batch: seqs,
            t,
            n_head: cfg.n_head,
            head_dim: cfg.head_dim(),
            causal: true,
        };
        b.embed_step(
            first(plan.resid, rows * d),
            View::new(Arena::Params, lay.wte, v * d),
            View::new(Arena::Params, lay.wpe, t * d),
            View::new(Arena::Params, lay.sos, d),
            pos,
            n,
            d,
        );
        for (l, w) in self.weights.blocks.iter().enumerate() {
            let (kc, vc) = plan.caches(l, seqs, d);
            let scores = first(plan.scores, seqs * cfg.n_head * plan.cache_len);
            block_forward(b, w, &plan.io(rows, d), rows, d, |b, qkv, att| {
                b.attention_step(att, kc, vc, qkv, scores, shape, pos, n)
            });
        }
    }

    /// Feeds the next position. `prev[b]` is sequence b's token at the previous position
    /// (ignored at position 0, where the start vector is the input). Returns the logits
    /// `[rows, n_vocab]` that predict the token at this position (rows: [`Decoder::rows`]).
    pub fn step(&mut self, prev: &[u16]) -> anyhow::Result<&[f32]> {
        self.feed_step(Some(prev), false)?;
        let v = self.cfg.n_vocab;
        let rows = self.rows;
        let logits = first(self.plan.logits, rows * v);
        let host = &mut self.host_logits[..rows * v];
        self.backend.download(logits, host);
        Ok(host)
    }

    /// Sets how [`Decoder::step_drawing`] draws each sequence's token: its options (one per
    /// sequence) and `numbers` (`[rows, n_ctx]`, in `[0, 1)`), the number each draws with at
    /// each position (see [`crate::sample::draw_numbers`]).
    pub fn set_draws(&mut self, options: &[SampleOptions], numbers: &[f32]) -> anyhow::Result<()> {
        let (rows, t) = (self.rows, self.cfg.n_ctx());
        anyhow::ensure!(
            options.len() == rows && numbers.len() == rows * t,
            "expected the options of {rows} sequences and {} numbers ({rows} x {t}), got {} and {}",
            rows * t,
            options.len(),
            numbers.len()
        );
        for o in options {
            o.validate()?;
        }
        if let Some(bad) = numbers.iter().find(|u| !(0.0..1.0).contains(*u)) {
            anyhow::bail!("a number to draw with is {bad}, outside [0, 1)");
        }
        self.backend.set_draws(options, numbers);
        self.draws_set = true;
        self.drawn = 0..0;
        Ok(())
    }

    /// Feeds the next position as [`Decoder::step`] does, then draws each sequence's token on
    /// the backend with the draws [`Decoder::set_draws`] gave, instead of returning the
    /// logits: the tokens stay there as the next step's inputs, and [`Decoder::drawn`] fetches
    /// them. `prev` gives the inputs as [`Decoder::step`] takes them; None takes the tokens
    /// the step before drew (which must have been a drawing step of the same sequences).
    pub fn step_drawing(&mut self, prev: Option<&[u16]>) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.draws_set,
            "set the draws of these {} sequences before drawing (set_draws)",
            self.rows
        );
        let pos = self.pos;
        if prev.is_none() {
            anyhow::ensure!(
                pos > 0 && self.drawn.end == pos,
                "position {pos}: the step before drew no tokens to feed; pass them"
            );
        }
        self.feed_step(prev, true)?;
        if self.drawn.end != pos {
            self.drawn = pos..pos;
        }
        self.drawn.end = pos + 1;
        Ok(())
    }

    /// The tokens drawn at positions `from..to` (all drawn by [`Decoder::step_drawing`] since
    /// the draws were set), position-major: `[to - from, rows]`. Waits for them.
    pub fn drawn(&mut self, from: usize, to: usize) -> anyhow::Result<&[u16]> {
        anyhow::ensure!(
            from < to && self.drawn.start <= from && to <= self.drawn.end,
            "positions {from}..{to} were not all drawn (drawn: {:?})",
            self.drawn
        );
        let out = &mut self.host_drawn[..(to - from) * self.rows];
        self.backend.drawn_tokens(from, to, out);
        Ok(out)
    }

    /// Runs the next position's step, its inputs being `prev` (set on the backend) or, None,
    /// the tokens the backend holds; with `draw`, the step ends by drawing the next tokens.
    fn feed_step(&mut self, prev: Option<&[u16]>, draw: bool) -> anyhow::Result<()> {
        let cfg = &self.cfg;
        let (t, v) = (cfg.n_ctx(), cfg.n_vocab);
        anyhow::ensure!(
            self.pos < t,
            "all {t} positions have been generated; reset the decoder first"
        );
        if let Some(prev) = prev {
            anyhow::ensure!(
                prev.len() == self.rows,
                "expected {} previous tokens, got {}",
                self.rows,
                prev.len()
            );
            if self.pos > 0
                && let Some(&bad) = prev.iter().find(|&&x| x as usize >= v)
            {
                anyhow::bail!("token id {bad} is outside the palette of {v} colours");
            }
            self.backend.set_tokens(prev);
        }
        let (rows, pos) = (self.rows, self.pos);
        replay::run(
            self,
            |d| &mut d.replays,
            |d| d.backend.as_mut(),
            (rows, draw),
            pos,
            |d| d.compute_step(rows, pos, draw),
        );
        if !draw {
            self.drawn = 0..0;
        }
        self.pos += 1;
        Ok(())
    }

    /// One step's calls for `rows` sequences at `pos`, from the set tokens to the logits, and
    /// with `draw` on to the next tokens.
    fn compute_step(&mut self, rows: usize, pos: usize, draw: bool) {
        self.feed(rows, pos, 1);
        let cfg = &self.cfg;
        let (d, v) = (cfg.n_embd, cfg.n_vocab);
        let (plan, b) = (&self.plan, self.backend.as_mut());
        head_forward(
            b,
            &self.weights,
            first(plan.resid, rows * d),
            first(plan.lnf, rows * d),
            first(plan.rstdf, rows),
            first(plan.logits, rows * v),
            rows,
            d,
            v,
        );
        if draw {
            b.draw_tokens(first(plan.logits, rows * v), v, pos);
        }
    }
}

#[cfg(test)]
mod plan_tests {
    use super::*;

    /// Bytes the backend allocates for a decoder's own arenas, from the sizes it is asked for:
    /// f32 step buffers (and f32 caches), the bf16 half arena (packed weights, bf16 caches), the
    /// split input of packed products (two bf16 parts, rows padded to an even length) and what
    /// drawing tokens may take.
    fn planned_bytes(s: &ArenaSizes) -> u128 {
        let split = crate::backend::cpu::packed_input_len(s);
        4 * s.acts as u128 + 2 * s.half as u128 + 2 * split as u128 + s.draws.bytes()
    }

    #[test]
    fn the_memory_estimate_of_a_decoder_is_its_plan_s() {
        let backend = crate::backend::cpu::CpuBackend::new();
        // (layers, width, heads, colours, side, batch): one-row and many-row prefill chunks,
        // a batch past the chunk's rows, widths that are and are not multiples of the panel.
        for (l, d, h, v, side, batch) in [
            (1, 16, 2, 8, 6, 1),
            (2, 48, 4, 17, 5, 3),
            (3, 64, 8, 512, 32, 4),
            (2, 128, 2, 16, 28, 16),
            (1, 40, 5, 9, 7, 300),
            (8, 256, 8, 16, 28, 8),
        ] {
            let cfg = ModelConfig {
                n_layer: l,
                n_embd: d,
                n_head: h,
                n_vocab: v,
                side,
                channels: 1,
                objective: Default::default(),
            };
            let layout = ParamLayout::new(&cfg);
            for precision in [Precision::F32, Precision::Bf16] {
                let (plan, _, _, sizes) =
                    Decoder::plan(&cfg, &layout, batch, precision, false, &backend);
                let planned = planned_bytes(&sizes);
                let estimate = crate::memory::decoder_bytes(
                    &cfg,
                    batch,
                    batch * plan.chunk,
                    plan.cache_len,
                    precision,
                );
                // Never below the plan, and at most 1% above it.
                assert!(
                    estimate >= planned && estimate * 100 <= planned * 101,
                    "{cfg:?} batch {batch} {precision:?}: estimate {estimate} bytes, plan {planned}"
                );
            }
        }
    }
}

#[cfg(test)]
mod replay_tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::backend::{DType, LogitGradient, Op, Recording};
    use std::sync::{Arc, Mutex};

    type Call = Box<dyn Fn(&mut dyn Backend, usize) + Send>;

    /// What a [`Recorder`] was asked to do.
    #[derive(Default)]
    struct Log {
        recorded: usize,
        replayed: Vec<usize>,
        forgotten: usize,
    }

    /// The CPU backend recording as the CUDA backend does: recorded calls do not run, and each
    /// replay runs them with its own position. The decoder's side of recording is then
    /// checked without a GPU.
    struct Recorder {
        inner: CpuBackend,
        recording: Option<Vec<Call>>,
        kept: Vec<Option<(u64, Vec<Call>)>>,
        next_id: u64,
        /// Whether `end_recording` fails (as a CUDA graph capture can).
        fail: bool,
        /// Whether `replay` fails.
        fail_replay: bool,
        /// Whether the next call recorded panics (once).
        panic_while_recording: bool,
        /// The longest context it says it decodes.
        context_limit: usize,
        /// What it says of [`Backend::rounds_packed_inputs`] (the CPU's answer is no).
        rounds_packed_inputs: bool,
        log: Arc<Mutex<Log>>,
    }

    impl Recorder {
        fn new(fail: bool) -> (Self, Arc<Mutex<Log>>) {
            Self::failing(fail, false)
        }

        fn failing(fail: bool, fail_replay: bool) -> (Self, Arc<Mutex<Log>>) {
            let log = Arc::new(Mutex::new(Log::default()));
            let r = Recorder {
                inner: CpuBackend::new(),
                recording: None,
                kept: Vec::new(),
                next_id: 0,
                fail,
                fail_replay,
                panic_while_recording: false,
                context_limit: usize::MAX,
                rounds_packed_inputs: false,
                log: log.clone(),
            };
            (r, log)
        }

        /// Runs a kernel call now at `pos`, or keeps it for replays.
        fn call(&mut self, pos: usize, f: impl Fn(&mut dyn Backend, usize) + Send + 'static) {
            match &mut self.recording {
                Some(_) if std::mem::take(&mut self.panic_while_recording) => {
                    panic!("a check failed while recording")
                }
                Some(calls) => calls.push(Box::new(f)),
                None => f(&mut self.inner, pos),
            }
        }

        fn direct(&self, what: &str) {
            assert!(self.recording.is_none(), "{what} while recording");
        }
    }

    impl Backend for Recorder {
        fn name(&self) -> &'static str {
            "recorder"
        }
        fn attention_scratch_len(&self, shape: AttnShape) -> usize {
            self.inner.attention_scratch_len(shape)
        }
        fn decode_cache_len(&self, n_ctx: usize) -> usize {
            self.inner.decode_cache_len(n_ctx)
        }
        fn decode_context_limit(&self, _head_dim: usize) -> usize {
            self.context_limit
        }
        fn native_bf16(&self) -> bool {
            self.inner.native_bf16()
        }
        fn rounds_packed_inputs(&self) -> bool {
            self.rounds_packed_inputs
        }
        fn attention_stores_bf16(&self, shape: AttnShape) -> bool {
            self.inner.attention_stores_bf16(shape)
        }
        fn packed_len(&self, k: usize, n: usize) -> usize {
            self.inner.packed_len(k, n)
        }
        fn allocate(&mut self, sizes: ArenaSizes) -> anyhow::Result<()> {
            self.direct("allocate");
            self.kept.clear();
            self.inner.allocate(sizes)
        }
        fn upload(&mut self, dst: View, src: &[f32]) {
            self.direct("upload");
            self.inner.upload(dst, src)
        }
        fn adopt_params(&mut self, params: Vec<f32>) -> anyhow::Result<()> {
            self.direct("adopt_params");
            self.inner.adopt_params(params)
        }
        fn release_params(&mut self, len: usize) -> Vec<f32> {
            self.inner.release_params(len)
        }
        fn download(&self, src: View, dst: &mut [f32]) {
            self.direct("download");
            self.inner.download(src, dst)
        }
        fn fill(&mut self, dst: View, value: f32) {
            self.call(0, move |b, _| b.fill(dst, value));
        }
        fn copy(&mut self, dst: View, src: View) {
            self.call(0, move |b, _| b.copy(dst, src));
        }
        fn round_to_bf16(&mut self, dst: View, src: View) {
            self.call(0, move |b, _| b.round_to_bf16(dst, src));
        }
        fn set_tokens(&mut self, tokens: &[u16]) {
            self.direct("set_tokens");
            self.inner.set_tokens(tokens)
        }
        fn set_draws(&mut self, options: &[SampleOptions], numbers: &[f32]) {
            self.direct("set_draws");
            self.inner.set_draws(options, numbers)
        }
        fn draw_tokens(&mut self, logits: View, v: usize, pos: usize) {
            self.call(pos, move |b, p| b.draw_tokens(logits, v, p));
        }
        fn drawn_tokens(&self, from: usize, to: usize, out: &mut [u16]) {
            self.direct("drawn_tokens");
            self.inner.drawn_tokens(from, to, out)
        }
        fn embed_forward(
            &mut self,
            _: View,
            _: View,
            _: View,
            _: View,
            _: usize,
            _: usize,
            _: bool,
        ) {
            unreachable!("the decoder does not train")
        }
        fn embed_backward(
            &mut self,
            _: View,
            _: View,
            _: View,
            _: View,
            _: usize,
            _: usize,
            _: bool,
        ) {
            unreachable!("the decoder does not train")
        }
        fn set_targets(&mut self, _: &[u16], _: &[f32]) {
            unreachable!("the decoder does not train")
        }
        fn rmsnorm_forward(&mut self, out: View, rstd: View, x: View, g: View, d: usize) {
            self.call(0, move |b, _| b.rmsnorm_forward(out, rstd, x, g, d));
        }
        fn rmsnorm_backward(
            &mut self,
            _: View,
            _: Option<View>,
            _: View,
            _: View,
            _: View,
            _: View,
            _: View,
            _: usize,
        ) {
            unreachable!("the decoder does not train")
        }
        fn pack_weight(&mut self, dst: View, w: View, op: Op, k: usize, n: usize) {
            self.call(0, move |b, _| b.pack_weight(dst, w, op, k, n));
        }
        fn matmul_packed(
            &mut self,
            out: View,
            a: View,
            w: View,
            m: usize,
            k: usize,
            n: usize,
            accumulate: bool,
        ) {
            self.call(0, move |b, _| {
                b.matmul_packed(out, a, w, m, k, n, accumulate)
            });
        }
        fn matmul(
            &mut self,
            out: View,
            a: View,
            ta: Op,
            w: View,
            tb: Op,
            m: usize,
            k: usize,
            n: usize,
            accumulate: bool,
        ) {
            self.call(0, move |b, _| {
                b.matmul(out, a, ta, w, tb, m, k, n, accumulate)
            });
        }
        fn attention_forward(&mut self, _: View, _: View, _: View, _: View, _: AttnShape) {
            unreachable!("the decoder runs attention_step")
        }
        fn attention_backward(
            &mut self,
            _: View,
            _: View,
            _: View,
            _: View,
            _: View,
            _: View,
            _: AttnShape,
        ) {
            unreachable!("the decoder does not train")
        }
        fn embed_step(
            &mut self,
            out: View,
            wte: View,
            wpe: View,
            sos: View,
            pos: usize,
            len: usize,
            d: usize,
        ) {
            self.call(pos, move |b, p| b.embed_step(out, wte, wpe, sos, p, len, d));
        }
        fn attention_step(
            &mut self,
            out: View,
            k_cache: View,
            v_cache: View,
            qkv: View,
            scores: View,
            shape: AttnShape,
            pos: usize,
            len: usize,
        ) {
            self.call(pos, move |b, p| {
                b.attention_step(out, k_cache, v_cache, qkv, scores, shape, p, len)
            });
        }
        fn gelu_forward(&mut self, out: View, x: View) {
            self.call(0, move |b, _| b.gelu_forward(out, x));
        }
        fn gelu_backward(&mut self, _: View, _: View, _: View) {
            unreachable!("the decoder does not train")
        }
        fn cross_entropy(&mut self, _: View, _: View, _: usize, _: Option<LogitGradient>) {
            unreachable!("the decoder does not train")
        }
        fn sum_squares(&self, _: View) -> f64 {
            unreachable!("the decoder does not train")
        }
        fn set_update(&mut self, _: crate::backend::Update) {
            unreachable!("the decoder does not train")
        }
        fn clipped_update(&mut self, _: &[(View, bool)], _: View) {
            unreachable!("the decoder does not train")
        }
        fn update_grad_norm(&self) -> f64 {
            unreachable!("the decoder does not train")
        }
        fn begin_recording(&mut self) -> anyhow::Result<bool> {
            self.direct("begin_recording");
            self.recording = Some(Vec::new());
            Ok(true)
        }
        fn end_recording(&mut self) -> anyhow::Result<Recording> {
            let calls = self.recording.take().expect("a recording was begun");
            anyhow::ensure!(!self.fail, "the recorder was told to fail");
            self.log.lock().unwrap().recorded += 1;
            self.next_id += 1;
            self.kept.push(Some((self.next_id, calls)));
            Ok(Recording {
                index: self.kept.len() - 1,
                id: self.next_id,
            })
        }
        fn replay(&mut self, r: Recording, pos: usize) -> anyhow::Result<()> {
            self.direct("replay");
            anyhow::ensure!(!self.fail_replay, "the recorder was told to fail replays");
            let Some((id, calls)) = &self.kept[r.index] else {
                panic!("replay of a forgotten recording")
            };
            assert_eq!(*id, r.id, "replay of a forgotten recording");
            for call in calls {
                call(&mut self.inner, pos);
            }
            self.log.lock().unwrap().replayed.push(pos);
            Ok(())
        }
        fn forget(&mut self, r: Recording) {
            self.kept[r.index] = None;
            self.log.lock().unwrap().forgotten += 1;
        }
    }

    fn model() -> ModelConfig {
        ModelConfig {
            n_layer: 2,
            n_embd: 32,
            n_head: 4,
            n_vocab: 13,
            side: 4,
            channels: 1,
            objective: Default::default(),
        }
    }

    fn decoder(backend: Box<dyn Backend>, precision: Precision) -> Decoder {
        let cfg = model();
        let params = crate::model::init_params(&cfg, 7)
            .into_iter()
            .enumerate()
            .map(|(i, v)| v + 0.03 * ((i * 7919 % 101) as f32 / 50.0 - 1.0))
            .collect();
        Decoder::build_on(backend, &cfg, 3, &mut Some(params), precision).unwrap()
    }

    #[test]
    fn a_context_beyond_the_backends_decoding_kernels_is_refused_with_the_way_out() {
        let cfg = model();
        let params = || Some(crate::model::init_params(&cfg, 7));
        let limited = |limit: usize| {
            let (mut r, _) = Recorder::failing(false, false);
            r.context_limit = limit;
            Box::new(r) as Box<dyn Backend>
        };
        let err = Decoder::build_on(
            limited(cfg.n_ctx() - 1),
            &cfg,
            3,
            &mut params(),
            Precision::F32,
        )
        .err()
        .expect("a context one past the limit is refused");
        let msg = err.to_string();
        assert!(
            msg.contains("context of 16 positions")
                && msg.contains("at most 15")
                && msg.contains("--device cpu"),
            "{msg}"
        );
        assert!(
            Decoder::build_on(limited(cfg.n_ctx()), &cfg, 3, &mut params(), Precision::F32).is_ok()
        );
    }

    /// Steps both decoders through a whole image with the same tokens, keeping only sequences
    /// 0 and 2 from position 6 on, and returns every step's logits from each.
    fn run_both(a: &mut Decoder, b: &mut Decoder) -> (Vec<f32>, Vec<f32>) {
        let (t, v) = (model().n_ctx(), model().n_vocab as u16);
        let (mut got, mut want) = (Vec::new(), Vec::new());
        a.reset();
        b.reset();
        for pos in 0..t {
            if pos == 6 {
                a.retain(&[0, 2]).unwrap();
                b.retain(&[0, 2]).unwrap();
            }
            let prev: Vec<u16> = (0..a.rows)
                .map(|s| ((pos * 5 + s * 3) as u16) % v)
                .collect();
            got.extend_from_slice(a.step(&prev).unwrap());
            want.extend_from_slice(b.step(&prev).unwrap());
        }
        (got, want)
    }

    #[test]
    fn replayed_steps_give_the_logits_of_steps_run_call_by_call() {
        for precision in [Precision::F32, Precision::Bf16] {
            let (recorder, log) = Recorder::new(false);
            let mut replayed = decoder(Box::new(recorder), precision);
            let mut direct = decoder(Box::new(CpuBackend::new()), precision);
            let (got, want) = run_both(&mut replayed, &mut direct);
            assert_eq!(got, want, "{precision:?}");
            assert!(replayed.replaying() && replayed.replay_failure().is_none());
            let log = log.lock().unwrap();
            // One recording per number of sequences (3, then 2), made at the second step of
            // each; every later step replayed at its own position.
            let t = model().n_ctx();
            assert_eq!(log.recorded, 2);
            let positions: Vec<usize> = (1..t).filter(|&p| p != 6).collect();
            assert_eq!(log.replayed, positions);
        }
    }

    #[test]
    fn product_inputs_are_stored_as_bf16_where_the_backend_would_round_them() {
        let rounding = || {
            let (mut r, _) = Recorder::new(false);
            r.rounds_packed_inputs = true;
            r
        };
        let mut replayed = decoder(Box::new(rounding()), Precision::Bf16);
        let mut direct = decoder(Box::new(rounding()), Precision::Bf16);
        direct.set_replay(false);
        let mut split = decoder(Box::new(CpuBackend::new()), Precision::Bf16);
        // The five product inputs move from the activations to the half arena.
        for (plan, want) in [(&replayed.plan, DType::Bf16), (&split.plan, DType::F32)] {
            for v in [plan.ln1, plan.att, plan.ln2, plan.fc_act, plan.lnf] {
                assert_eq!(v.dtype, want, "{v:?}");
            }
        }
        assert!(replayed.plan.acts < split.plan.acts);
        let (got, want) = run_both(&mut replayed, &mut direct);
        assert_eq!(got, want, "replayed against call by call");
        assert!(replayed.replaying());
        // The CPU splits an f32 input into bfloat16 and a remainder; a bf16 input has none,
        // so the logits move, by about bfloat16's rounding.
        let (reference, _) = run_both(&mut split, &mut direct);
        assert_ne!(got, reference);
        let worst = got
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 0.05, "logits moved by {worst}");
    }

    /// Draws a whole image on both decoders with the tokens left on the backend, keeping only
    /// sequences 0 and 2 from position 8 (a row boundary of the 4x4 model) on, fetched once a
    /// row as generation fetches them; returns every drawn token of each.
    fn draw_both(a: &mut Decoder, b: &mut Decoder) -> (Vec<u16>, Vec<u16>) {
        let t = model().n_ctx();
        let opts = |s: usize| SampleOptions {
            top_k: [0, 3, 0][s],
            temperature: [1.0, 1.0, 0.6][s],
            ..Default::default()
        };
        let mut out = (Vec::new(), Vec::new());
        for (d, out) in [(a, &mut out.0), (b, &mut out.1)] {
            d.reset();
            let mut rows = vec![0, 1, 2];
            let mut prev = vec![0u16; 3];
            for pos in 0..t {
                let fresh = pos == 0 || pos == 8;
                if pos == 8 {
                    d.retain(&[0, 2]).unwrap();
                    rows = vec![0, 2];
                    prev = vec![prev[0], prev[2]];
                }
                if fresh {
                    let options: Vec<SampleOptions> = rows.iter().map(|&s| opts(s)).collect();
                    let numbers: Vec<f32> = (0..rows.len() * t)
                        .map(|i| ((i * 37 + 11) % 100) as f32 / 100.0)
                        .collect();
                    d.set_draws(&options, &numbers).unwrap();
                }
                d.step_drawing(fresh.then_some(&prev[..])).unwrap();
                if (pos + 1) % 4 == 0 {
                    let got = d.drawn(pos - 3, pos + 1).unwrap().to_vec();
                    prev.copy_from_slice(&got[got.len() - rows.len()..]);
                    out.extend(got);
                }
            }
        }
        out
    }

    #[test]
    fn replayed_drawing_steps_draw_the_tokens_of_steps_run_call_by_call() {
        for precision in [Precision::F32, Precision::Bf16] {
            let (recorder, log) = Recorder::new(false);
            let mut replayed = decoder(Box::new(recorder), precision);
            let mut direct = decoder(Box::new(CpuBackend::new()), precision);
            let (got, want) = draw_both(&mut replayed, &mut direct);
            assert_eq!(got, want, "{precision:?}");
            assert!(got.iter().any(|&x| x != got[0]), "{got:?}");
            assert!(replayed.replaying() && replayed.replay_failure().is_none());
            // One recording of the drawing step per number of sequences.
            assert_eq!(log.lock().unwrap().recorded, 2);
        }
    }

    #[test]
    fn drawing_out_of_turn_is_an_error_not_a_panic() {
        let mut d = decoder(Box::new(CpuBackend::new()), Precision::F32);
        let t = model().n_ctx();
        let opts = vec![SampleOptions::default(); 3];
        d.reset();
        let e = d.step_drawing(Some(&[0, 0, 0])).unwrap_err().to_string();
        assert!(e.contains("set_draws"), "{e}");
        let e = d
            .set_draws(&opts, &vec![1.0; 3 * t])
            .unwrap_err()
            .to_string();
        assert!(e.contains("outside [0, 1)"), "{e}");
        let e = d
            .set_draws(&opts[..2], &vec![0.5; 2 * t])
            .unwrap_err()
            .to_string();
        assert!(e.contains("3 sequences"), "{e}");
        d.set_draws(&opts, &vec![0.5; 3 * t]).unwrap();
        let e = d.step_drawing(None).unwrap_err().to_string();
        assert!(e.contains("pass them"), "{e}");
        d.step_drawing(Some(&[0, 0, 0])).unwrap();
        d.step_drawing(None).unwrap();
        assert_eq!(d.drawn(0, 2).unwrap().len(), 6);
        let e = d.drawn(1, 3).unwrap_err().to_string();
        assert!(e.contains("not all drawn"), "{e}");
        // A plain step, or moving sequences, ends what the backend's tokens stand for.
        d.step(&[1, 2, 3]).unwrap();
        assert!(d.step_drawing(None).is_err());
        d.retain(&[0, 2]).unwrap();
        assert!(
            d.step_drawing(Some(&[1, 2])).is_err(),
            "draws of three sequences"
        );
        assert!(d.drawn(0, 1).is_err());
    }

    #[test]
    fn a_failed_recording_falls_back_to_running_each_call() {
        let (recorder, log) = Recorder::new(true);
        let mut replayed = decoder(Box::new(recorder), Precision::F32);
        let mut direct = decoder(Box::new(CpuBackend::new()), Precision::F32);
        let (got, want) = run_both(&mut replayed, &mut direct);
        assert_eq!(got, want);
        assert!(!replayed.replaying());
        assert!(
            replayed
                .replay_failure()
                .is_some_and(|e| e.contains("told to fail"))
        );
        let log = log.lock().unwrap();
        assert_eq!((log.recorded, log.replayed.len()), (0, 0));
    }

    #[test]
    fn a_failed_replay_falls_back_to_running_each_call() {
        let (recorder, log) = Recorder::failing(false, true);
        let mut replayed = decoder(Box::new(recorder), Precision::F32);
        let mut direct = decoder(Box::new(CpuBackend::new()), Precision::F32);
        let (got, want) = run_both(&mut replayed, &mut direct);
        assert_eq!(got, want);
        assert!(
            replayed
                .replay_failure()
                .is_some_and(|e| e.contains("fail replays"))
        );
        // Recorded once, then never again after the failed replay.
        assert_eq!(log.lock().unwrap().recorded, 1);
        replayed.set_replay(true);
        assert!(
            replayed.replay_failure().is_none(),
            "turning replays on retries"
        );
    }

    #[test]
    fn a_panic_while_recording_leaves_the_backend_issuing_calls() {
        let (mut recorder, log) = Recorder::new(false);
        recorder.panic_while_recording = true;
        let mut dec = decoder(Box::new(recorder), Precision::F32);
        dec.step(&[0; 3]).unwrap();
        // The second step records, and panics; a caller that survives it steps on.
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = dec.step(&[1; 3]);
        }));
        assert!(caught.is_err());
        dec.reset();
        let mut direct = decoder(Box::new(CpuBackend::new()), Precision::F32);
        let (got, want) = run_both(&mut dec, &mut direct);
        assert_eq!(got, want);
        // The interrupted recording is freed; the whole image makes two more.
        let log = log.lock().unwrap();
        assert_eq!((log.recorded, log.forgotten), (3, 1));
    }

    #[test]
    fn replays_can_be_turned_off_and_on() {
        let (recorder, log) = Recorder::new(false);
        let mut replayed = decoder(Box::new(recorder), Precision::F32);
        let mut direct = decoder(Box::new(CpuBackend::new()), Precision::F32);
        run_both(&mut replayed, &mut direct);
        replayed.set_replay(false);
        assert!(!replayed.replaying());
        let (got, want) = run_both(&mut replayed, &mut direct);
        assert_eq!(got, want);
        {
            let log = log.lock().unwrap();
            assert_eq!(log.forgotten, 2, "turning replays off frees the recordings");
            assert_eq!(log.replayed.len(), model().n_ctx() - 2);
        }
        replayed.set_replay(true);
        let (got, want) = run_both(&mut replayed, &mut direct);
        assert_eq!(got, want);
        assert_eq!(log.lock().unwrap().recorded, 4);
    }

    #[test]
    fn a_backend_that_does_not_record_runs_each_call() {
        let mut plain = decoder(Box::new(CpuBackend::new()), Precision::F32);
        let mut direct = decoder(Box::new(CpuBackend::new()), Precision::F32);
        run_both(&mut plain, &mut direct);
        assert!(!plain.replaying() && plain.replay_failure().is_none());
    }
}
