//! Forward and backward passes of the whole model over planned buffers.
//!
//! Every activation has a fixed place in one arena, decided by [`ActPlan`] from the config and
//! the batch size. A training step therefore allocates nothing: it only runs kernels.

use super::ParamLayout;
use super::block::{
    BlockIo, PackJob, Weights, block_forward, head_backward, head_forward, linear_backward,
};
use super::replay::{self, Replays};
use crate::backend::{
    Arena, ArenaSizes, AttnShape, Backend, DType, Device, LogitGradient, Precision, Update, View,
};
use crate::config::ModelConfig;
use crate::memory::Bf16Inputs;

/// Activations one block keeps for its backward pass: offsets in [`Arena::Acts`], and as views
/// the buffers that may be bfloat16 (see [`ActPlan::new`]).
#[derive(Debug, Clone, Copy)]
struct BlockActs {
    ln1: View,
    rstd1: usize,
    qkv: View,
    att: View,
    lse: usize,
    mid: usize,
    ln2: View,
    rstd2: usize,
    /// The MLP's pre-activation (bf16 with bf16 inputs).
    fc: View,
}

/// Where every activation lies for a given config and batch: offsets in [`Arena::Acts`],
/// and views for the buffers that may be bfloat16 instead.
#[derive(Debug, Clone)]
pub struct ActPlan {
    /// Residual stream entering block l (l = n_layer: entering the final norm).
    resid: Vec<usize>,
    blocks: Vec<BlockActs>,
    /// The final norm's output: f32, or bfloat16 in training with bfloat16 inputs (the head's
    /// products then read it, and the logits' gradient, as bfloat16).
    lnf: View,
    rstdf: usize,
    logits: usize,
    losses: usize,
    // Scratch shared by all layers.
    fc_act: View,
    /// A product's output gradient rounded for the bfloat16 products of its backward pass
    /// (wide enough for the MLP's `4d` columns and the logits); only with bfloat16 inputs in
    /// training. The logits' gradient waits here from the forward pass's loss to the head's
    /// backward products.
    dy_half: Option<View>,
    /// Whether attention reads and writes bfloat16 (with bfloat16 inputs, where the backend's
    /// attention can): Q, K, V, its output and their gradients.
    attention_bf16: bool,
    d_resid: usize,
    /// The final norm's output gradient (the head's and a classification head's, which adds
    /// to it), f32; and an f32 scratch for features outside a backward pass.
    d_ln: usize,
    /// The blocks' norms' output gradient: `d_ln`, or bf16 with bf16 inputs (the products
    /// that write it store it rounded, and the norms' backward passes read it so).
    d_norm: View,
    /// The gradients of attention's output and of Q, K, V: f32, or bfloat16 (`d_qkv` then
    /// in `dy_half`, free by the time attention's backward pass writes it).
    d_att: View,
    d_qkv: View,
    /// The activation's gradient: f32 (the pre-activation's gradient then replaces it in
    /// place), or bf16 with bf16 inputs (the product that writes it stores it rounded).
    d_fc_act: View,
    attn_scratch: usize,
    attn_scratch_len: usize,
    pub total: usize,
}

impl ActPlan {
    /// With `training`, every block keeps its activations; without, blocks share one set and
    /// the residual stream ping-pongs between two buffers. With `half`, the inputs of the
    /// blocks' products that a norm or the activation writes (`ln1`, `ln2`, `fc_act`), the
    /// MLP's pre-activation `fc` and in training its activation's gradient and `d_norm` are
    /// bfloat16 in [`Arena::Half`] from `*half` on (which advances), as are `dy_half` and,
    /// where [`Bf16Inputs::attention`] says (the backend's attention stores bf16), what
    /// attention reads and writes (Q, K, V, `att` and their gradients): a GPU's products then
    /// read bfloat16 operands as stored, and write `fc`, the activation's gradient, the
    /// blocks' norms' output gradient (`d_norm`) and (with bf16 attention) Q, K, V and `att`'s
    /// gradient as bfloat16.
    pub fn new(
        cfg: &ModelConfig,
        batch: usize,
        training: bool,
        backend: &dyn Backend,
        half: Option<(&mut usize, Bf16Inputs)>,
    ) -> Self {
        let (d, t, v) = (cfg.n_embd, cfg.n_ctx(), cfg.n_vocab);
        let rows = batch * t;
        let mut off = 0;
        let mut take = |n: usize| {
            let at = off;
            // Keep every buffer 64-byte aligned relative to the arena start.
            off += n.next_multiple_of(16);
            at
        };
        let bf16_inputs = half.is_some();
        let attention_bf16 = half.as_ref().is_some_and(|h| h.1.attention);
        let mut half = half.map(|h| h.0);
        let shape = AttnShape {
            batch,
            t,
            n_head: cfg.n_head,
            head_dim: cfg.head_dim(),
            causal: cfg.causal(),
        };
        // A buffer of `len` elements: bf16 where `bf16` and the plan has bf16 inputs.
        let mut place = |take: &mut dyn FnMut(usize) -> usize, len: usize, bf16: bool| match (
            &mut half, bf16,
        ) {
            (Some(used), true) => {
                let view = View::bf16(**used, len);
                **used += len.next_multiple_of(32);
                view
            }
            _ => act(take(len), len),
        };
        let n_resid = if training { cfg.n_layer + 1 } else { 2 };
        let resid_bufs: Vec<usize> = (0..n_resid).map(|_| take(rows * d)).collect();
        let resid = (0..=cfg.n_layer).map(|l| resid_bufs[l % n_resid]).collect();
        let n_block = if training { cfg.n_layer } else { 1 };
        let block_bufs: Vec<BlockActs> = (0..n_block)
            .map(|_| BlockActs {
                ln1: place(&mut take, rows * d, true),
                rstd1: take(rows),
                qkv: place(&mut take, rows * 3 * d, attention_bf16),
                att: place(&mut take, rows * d, attention_bf16),
                lse: take(batch * cfg.n_head * t),
                mid: take(rows * d),
                ln2: place(&mut take, rows * d, true),
                rstd2: take(rows),
                fc: place(&mut take, rows * 4 * d, true),
            })
            .collect();
        let blocks = (0..cfg.n_layer).map(|l| block_bufs[l % n_block]).collect();
        // bf16 for training's head products; f32 where only features and logits read it.
        let lnf = place(&mut take, rows * d, training);
        let rstdf = take(rows);
        let logits = take(rows * v);
        let losses = take(rows);
        let fc_act = place(&mut take, rows * 4 * d, true);
        let dy_half =
            (training && bf16_inputs).then(|| place(&mut take, rows * (4 * d).max(v), true));
        let (d_resid, d_ln, d_att, d_qkv, d_fc_act) = if training {
            let d_att = place(&mut take, rows * d, attention_bf16);
            let d_qkv = match dy_half {
                Some(half) if attention_bf16 => first(half, rows * 3 * d),
                _ => act(take(rows * 3 * d), rows * 3 * d),
            };
            (
                take(rows * d),
                take(rows * d),
                d_att,
                d_qkv,
                place(&mut take, rows * 4 * d, true),
            )
        } else {
            (0, 0, act(0, 0), act(0, 0), act(0, 0))
        };
        let d_norm = match dy_half {
            Some(_) => place(&mut take, rows * d, true),
            None => act(d_ln, rows * d),
        };
        let attn_scratch_len = backend.attention_scratch_len(shape);
        let attn_scratch = take(attn_scratch_len);
        Self {
            resid,
            blocks,
            lnf,
            rstdf,
            logits,
            losses,
            fc_act,
            dy_half,
            attention_bf16,
            d_resid,
            d_ln,
            d_norm,
            d_att,
            d_qkv,
            d_fc_act,
            attn_scratch,
            attn_scratch_len,
            total: off,
        }
    }

    /// Where a training pass's loss writes the logits' gradient for the head's backward
    /// products: over the logits, or bfloat16 into `dy_half` where those products read
    /// bfloat16 (the final norm's output is then bfloat16 too).
    fn dlogits(&self, rows: usize, v: usize) -> View {
        match self.dy_half {
            Some(half) => first(half, rows * v),
            None => act(self.logits, rows * v),
        }
    }

    /// An f32 buffer of `len` for a norm's output read on the host (features): the final
    /// norm's own, or where that is bf16 (training's, for the head's products) the norm
    /// gradient's, free outside a backward pass.
    fn f32_norm(&self, len: usize) -> View {
        match self.lnf.dtype {
            DType::F32 => first(self.lnf, len),
            DType::Bf16 => act(self.d_ln, len),
        }
    }
}

/// What [`Engine::infer`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Logits,
    /// Hidden state `l`, numbered as Hugging Face does: 0 is the embedding output, `l` the
    /// residual stream after block `l - 1`, and `n_layer` the output of the final norm.
    Hidden(usize),
}

/// A model bound to a device with buffers planned for `batch` sequences.
pub struct Engine {
    pub cfg: ModelConfig,
    pub layout: ParamLayout,
    pub batch: usize,
    pub training: bool,
    plan: ActPlan,
    /// What the products read: the parameters, or their packed bfloat16 copies (the forward
    /// pass's, and in bf16 training the backward pass's `dx` products too).
    weights: Weights,
    /// How to refresh the packed copies when the parameters change.
    pack_jobs: Vec<PackJob>,
    pub precision: Precision,
    backend: Box<dyn Backend>,
    /// Host copy of per-position losses, allocated once.
    host_losses: Vec<f32>,
    /// Sequences in the last forward pass.
    n_seq: usize,
    /// Masked-objective inputs and loss weights, allocated once.
    masked_inputs: Vec<u16>,
    mask_weights: Vec<f32>,
    /// Whether the last pass was a training forward pass whose gradient is still unused.
    backward_ready: bool,
    /// Every parameter tensor and whether weight decay applies to it, for the update.
    update_views: Vec<(View, bool)>,
    /// Recorded training passes (see [`Engine::train_pass`]) and updates (one kind).
    replays: Replays<PassKey>,
    update_replays: Replays<()>,
}

/// What shapes a training pass's calls: the sequences, the objective (the masked one weighs
/// its loss) and the gradient's scale (a kernel argument).
#[derive(Debug, Clone, Copy, PartialEq)]
struct PassKey {
    n_seq: usize,
    masked: bool,
    loss_scale: f32,
}

/// Training passes an engine keeps recorded: a run uses one or two sizes (the micro-batch,
/// and a last smaller one).
const KEPT_PASSES: usize = 4;

/// The first `len` elements of a planned buffer: a pass of fewer sequences than planned uses
/// the start of each.
fn first(planned: View, len: usize) -> View {
    assert!(len <= planned.len, "{len} elements of {planned:?}");
    View { len, ..planned }
}

fn act(offset: usize, len: usize) -> View {
    View::new(Arena::Acts, offset, len)
}

impl Engine {
    /// An engine on `device` with zero parameters (set them with [`Engine::set_params`]);
    /// `training` plans gradients, optimizer moments and every layer's activations.
    pub fn new(
        cfg: &ModelConfig,
        batch: usize,
        training: bool,
        device: &Device,
    ) -> anyhow::Result<Self> {
        Self::build(cfg, batch, training, device, &mut None, Precision::F32)
    }

    /// An inference engine that takes ownership of `params` rather than copying them, so a
    /// large model is held in memory once.
    pub fn with_params(
        cfg: &ModelConfig,
        batch: usize,
        device: &Device,
        params: Vec<f32>,
    ) -> anyhow::Result<Self> {
        Self::build(cfg, batch, false, device, &mut Some(params), Precision::F32)
    }

    /// As [`Engine::with_params`], with the forward pass's products at `precision`
    /// ([`Precision::Bf16`] packs every matrix once, here).
    pub fn with_precision(
        cfg: &ModelConfig,
        batch: usize,
        device: &Device,
        params: Vec<f32>,
        precision: Precision,
    ) -> anyhow::Result<Self> {
        Self::build(cfg, batch, false, device, &mut Some(params), precision)
    }

    /// As [`Engine::with_precision`], taking the parameters out of `params` only once the
    /// engine is built: on an error (too little memory, say) they stay where they were.
    pub fn adopting(
        cfg: &ModelConfig,
        batch: usize,
        device: &Device,
        params: &mut Vec<f32>,
        precision: Precision,
    ) -> anyhow::Result<Self> {
        let mut slot = Some(std::mem::take(params));
        let built = Self::build(cfg, batch, false, device, &mut slot, precision);
        if let Some(p) = slot {
            *params = p;
        }
        built
    }

    /// The parameters, handed back without a copy where the device holds them in host memory
    /// (the engine is spent).
    pub fn into_params(mut self) -> Vec<f32> {
        self.backend.release_params(self.layout.total)
    }

    fn build(
        cfg: &ModelConfig,
        batch: usize,
        training: bool,
        device: &Device,
        params: &mut Option<Vec<f32>>,
        precision: Precision,
    ) -> anyhow::Result<Self> {
        cfg.validate()?;
        anyhow::ensure!(batch >= 1, "batch size must be at least 1");
        let mut backend = device.open()?;
        // Checked from the shape alone, before the layout or the plan computes a size.
        let shape = AttnShape {
            batch,
            t: cfg.n_ctx(),
            n_head: cfg.n_head,
            head_dim: cfg.head_dim(),
            causal: cfg.causal(),
        };
        let scratch = backend.attention_scratch_len(shape);
        // Training's products on a device whose products round to bfloat16 anyway (a GPU):
        // they read bfloat16 weights, packed again after each update, and bfloat16 inputs, as
        // stored by the kernels that write them; parameters, gradients, moments, the
        // residual stream and every sum stay f32.
        let bf16_operands = training
            && device.training_precision() == Precision::Bf16
            && backend.rounds_packed_inputs();
        anyhow::ensure!(
            !training || precision == Precision::F32,
            "a training engine packs its own weights (as its device's products need)"
        );
        let packs = precision == Precision::Bf16 || bf16_operands;
        // Inference's packed copies; training's, with its bf16 activations, are counted with
        // them (the same arithmetic as the plan's).
        let packed = if precision == Precision::Bf16 {
            crate::memory::packed_bytes(cfg, batch.saturating_mul(cfg.n_ctx()))
        } else {
            0
        };
        let bf16_inputs = bf16_operands.then(|| Bf16Inputs {
            attention: backend.attention_stores_bf16(shape),
        });
        // Adopted parameters cost nothing more on the host; a device copies them into its own.
        let device_free = backend.device_memory_free();
        let own_params = params.is_none() || device_free.is_some();
        let scratch = scratch as u128;
        crate::memory::engine_with(cfg, batch, training, own_params, scratch, bf16_inputs)
            .add(
                "bf16 weights and scratch",
                packed,
                crate::memory::Scale::Model,
            )
            .check_in(
                if training {
                    "training this model with this many images per pass"
                } else {
                    "running this model with this many images per pass"
                },
                device_free,
            )?;
        let layout = ParamLayout::new(cfg);
        if let Some(p) = params.as_ref() {
            layout.check_len(p.len())?;
        }
        let (d, v, rows) = (cfg.n_embd, cfg.n_vocab, batch * cfg.n_ctx());
        let mut half = 0;
        let (weights, pack_jobs) = if packs {
            Weights::packed(&layout, d, v, backend.as_ref(), &mut half)
        } else {
            (Weights::f32(&layout, d, v), Vec::new())
        };
        let half_inputs = bf16_inputs.map(|inputs| (&mut half, inputs));
        let plan = ActPlan::new(cfg, batch, training, backend.as_ref(), half_inputs);
        // The f32 inputs a packed product rounds: all of them, or (training) the attention
        // output where attention stores f32 (as `memory::engine_with` counts them).
        let max_packed_input = match (packs, bf16_inputs) {
            (false, _) => 0,
            (true, None) => rows * 4 * d,
            (true, Some(inputs)) if inputs.attention => 0,
            (true, Some(_)) => rows * d,
        };
        backend.allocate(ArenaSizes {
            // Adopted parameters replace the arena, so it is not allocated as well.
            params: if params.is_some() { 0 } else { layout.total },
            grads: if training { layout.total } else { 0 },
            acts: plan.total,
            half,
            max_packed_input,
            tokens: rows,
            max_rows: rows,
            max_width: d,
            embedding_rows: if training { v + 1 } else { 0 },
            draws: Default::default(),
        })?;
        if let Some(p) = params.take() {
            backend.adopt_params(p)?;
        }
        Weights::pack(backend.as_mut(), &pack_jobs);
        let update_views = layout
            .tensors
            .iter()
            .map(|t| (View::new(Arena::Params, t.offset, t.len), t.decay))
            .collect();
        Ok(Self {
            cfg: cfg.clone(),
            layout,
            batch,
            training,
            plan,
            weights,
            pack_jobs,
            precision,
            backend,
            host_losses: vec![0.0; rows],
            n_seq: 0,
            masked_inputs: vec![0; rows],
            mask_weights: vec![0.0; rows],
            backward_ready: false,
            update_views,
            replays: Replays::new(KEPT_PASSES),
            update_replays: Replays::new(1),
        })
    }

    fn p(&self, offset: usize, len: usize) -> View {
        View::new(Arena::Params, offset, len)
    }

    fn g(&self, offset: usize, len: usize) -> View {
        View::new(Arena::Grads, offset, len)
    }

    pub fn set_params(&mut self, params: &[f32]) -> anyhow::Result<()> {
        self.layout.check_len(params.len())?;
        let v = self.p(0, self.layout.total);
        self.backend.upload(v, params);
        Weights::pack(self.backend.as_mut(), &self.pack_jobs);
        Ok(())
    }

    pub fn params(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.layout.total];
        self.backend
            .download(View::new(Arena::Params, 0, self.layout.total), &mut out);
        out
    }

    /// Copies an arena of the same layout as the parameters (gradients, Adam moments) to host.
    pub fn read_arena(&self, arena: Arena, out: &mut [f32]) {
        self.backend
            .download(View::new(arena, 0, self.layout.total), out);
    }

    pub fn write_arena(&mut self, arena: Arena, src: &[f32]) {
        self.backend
            .upload(View::new(arena, 0, self.layout.total), src);
        if arena == Arena::Params {
            Weights::pack(self.backend.as_mut(), &self.pack_jobs);
        }
    }

    pub fn zero_grads(&mut self) {
        assert!(self.training, "gradients exist only in a training engine");
        let v = self.g(0, self.layout.total);
        self.backend.fill(v, 0.0);
    }

    fn check_tokens(&self, tokens: &[u16]) -> anyhow::Result<usize> {
        let t = self.cfg.n_ctx();
        anyhow::ensure!(
            !tokens.is_empty() && tokens.len().is_multiple_of(t),
            "a batch must hold whole images of {t} tokens (got {} tokens)",
            tokens.len()
        );
        let n_seq = tokens.len() / t;
        anyhow::ensure!(
            n_seq <= self.batch,
            "batch of {n_seq} images exceeds the planned {}",
            self.batch
        );
        if let Some(&bad) = tokens.iter().find(|&&x| x as usize >= self.cfg.n_vocab) {
            anyhow::bail!(
                "token id {bad} is outside the palette of {} colours",
                self.cfg.n_vocab
            );
        }
        Ok(n_seq)
    }

    /// Forward pass; returns the summed loss (nats) over all positions of `tokens`
    /// (`[n_seq, n_ctx]`, `n_seq <= batch`).
    pub fn forward(&mut self, tokens: &[u16]) -> anyhow::Result<f64> {
        anyhow::ensure!(
            self.cfg.causal(),
            "likelihood and training passes here are for autoregressive models; this one is BERT"
        );
        self.run_forward(tokens, None, None)
    }

    /// The masked (BERT) objective's loss: `masked[i]` hides position i (zero content
    /// embedding) and makes it a target; only hidden positions count. Returns the summed loss
    /// over them.
    pub fn forward_masked(&mut self, tokens: &[u16], masked: &[bool]) -> anyhow::Result<f64> {
        anyhow::ensure!(
            !self.cfg.causal(),
            "the masked objective is for BERT models; this one is autoregressive"
        );
        self.run_forward(tokens, Some(masked), None)
    }

    /// The forward pass of a training step over `tokens` (`[n_seq, n_ctx]`, `n_seq <= batch`):
    /// keeps every activation and leaves the gradient of `loss_scale * summed loss` for
    /// [`Engine::backward`]. BERT models need `masked` (the loss is then the masked
    /// objective's); autoregressive ones take `None`. Returns the summed loss.
    pub fn forward_train(
        &mut self,
        tokens: &[u16],
        masked: Option<&[bool]>,
        loss_scale: f32,
    ) -> anyhow::Result<f64> {
        self.check_training_objective(masked)?;
        let sum = self.run_forward(tokens, masked, Some(loss_scale))?;
        self.backward_ready = true;
        Ok(sum)
    }

    /// Adds the gradients of the last [`Engine::forward_train`] to the gradient arena (call
    /// [`Engine::zero_grads`] at the start of a step). `d_lnf`, when given, is an extra
    /// gradient `[n_seq, n_ctx, d]` on the final norm's output, from a head the caller ran on
    /// [`Engine::final_norm_output`].
    pub fn backward(&mut self, d_lnf: Option<&[f32]>) -> anyhow::Result<()> {
        self.backward_reporting(d_lnf, &mut |_| Ok(()))
    }

    /// One pass of a training step whose gradient stays on the device: [`Engine::forward_train`]
    /// then [`Engine::backward`] without a head's gradient, with the same results. Where the
    /// backend records (a GPU), the pass's calls are recorded the second time a pass of this
    /// shape comes and replayed after that, so a GPU launches them as one graph. Returns the
    /// summed loss.
    pub fn train_pass(
        &mut self,
        tokens: &[u16],
        masked: Option<&[bool]>,
        loss_scale: f32,
    ) -> anyhow::Result<f64> {
        self.check_training_objective(masked)?;
        self.backward_ready = false;
        self.set_pass_inputs(tokens, masked)?;
        let key = PassKey {
            n_seq: self.n_seq,
            masked: masked.is_some(),
            loss_scale,
        };
        replay::run(
            self,
            |e| &mut e.replays,
            |e| e.backend.as_mut(),
            key,
            0,
            |e| e.pass_calls(key),
        );
        Ok(self.summed_losses())
    }

    /// A training engine, and masks exactly for BERT models.
    fn check_training_objective(&self, masked: Option<&[bool]>) -> anyhow::Result<()> {
        anyhow::ensure!(self.training, "this engine was planned for inference only");
        match (masked, self.cfg.causal()) {
            (Some(_), true) => {
                anyhow::bail!("masks are for BERT models; this one is autoregressive")
            }
            (None, false) => anyhow::bail!("a BERT model trains on masked images: give the mask"),
            _ => Ok(()),
        }
    }

    /// The calls of a training pass, forward and backward, inputs set.
    fn pass_calls(&mut self, key: PassKey) {
        self.forward_calls(key.masked, Some(key.loss_scale));
        self.backward_with(None, &mut |_| {});
    }

    /// Whether [`Engine::train_pass`] and [`Engine::update`] may record and replay their calls
    /// where the backend records (on by default; off issues every call, for comparisons).
    pub fn set_replay(&mut self, on: bool) {
        self.replays.set_on(on, self.backend.as_mut());
        self.update_replays.set_on(on, self.backend.as_mut());
    }

    /// Whether training passes and updates are replayed from recordings.
    pub fn replaying(&self) -> bool {
        self.replays.replaying() && self.update_replays.replaying()
    }

    /// Why training passes or updates are issued call by call on a backend that records.
    pub fn replay_failure(&self) -> Option<&str> {
        self.replays.failure().or(self.update_replays.failure())
    }

    /// [`Engine::backward`], telling `on_finished` each time the gradients from some offset to
    /// the end of the arena are final for this pass (after the head, after each block, and at
    /// the end), so a data-parallel step can start summing them while the pass goes on. An
    /// error from `on_finished` stops further calls and is returned once the pass is done.
    pub fn backward_reporting(
        &mut self,
        d_lnf: Option<&[f32]>,
        on_finished: &mut dyn FnMut(&FinishedGrads) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.backward_ready,
            "backward needs a training forward pass first (forward_train)"
        );
        if let Some(g) = d_lnf {
            let want = self.n_seq * self.cfg.n_ctx() * self.cfg.n_embd;
            anyhow::ensure!(
                g.len() == want,
                "the head's gradient holds {} values, the final norm's output {want}",
                g.len()
            );
        }
        self.backward_ready = false;
        let mut failed = None;
        let mut report = |g: &FinishedGrads| {
            if failed.is_none() {
                failed = on_finished(g).err();
            }
        };
        self.backward_with(d_lnf, &mut report);
        failed.map_or(Ok(()), Err)
    }

    /// Copies `range` of the gradient arena to `out`.
    pub fn read_grads(&self, range: std::ops::Range<usize>, out: &mut [f32]) {
        assert!(self.training, "gradients exist only in a training engine");
        self.backend
            .download(View::new(Arena::Grads, range.start, range.len()), out);
    }

    /// Overwrites `range` of the gradient arena with `src`.
    pub fn write_grads(&mut self, range: std::ops::Range<usize>, src: &[f32]) {
        assert!(self.training, "gradients exist only in a training engine");
        self.backend
            .upload(View::new(Arena::Grads, range.start, range.len()), src);
    }

    /// One AdamW update of every parameter tensor from the gradient arena, its global norm
    /// clipped to `update.clip` first; weight decay applies to the tensors whose
    /// [`crate::model::TensorSpec::decay`] says so. Returns the norm before clipping. Where
    /// the backend records (a GPU), the update is recorded the second time and replayed after
    /// that: norm, clip, AdamW and (in bf16 training) the weights' packing as one graph, with no
    /// wait for the host between them.
    pub fn update(&mut self, update: Update) -> f64 {
        assert!(
            self.training,
            "optimizer state exists only in a training engine"
        );
        self.backend.set_update(update);
        let grads = View::new(Arena::Grads, 0, self.layout.total);
        replay::run(
            self,
            |e| &mut e.update_replays,
            |e| e.backend.as_mut(),
            (),
            0,
            |e| {
                e.backend.clipped_update(&e.update_views, grads);
                // The forward pass reads the new parameters through their packed copies.
                Weights::pack(e.backend.as_mut(), &e.pack_jobs);
            },
        );
        self.backend.update_grad_norm()
    }

    /// A loss-computing forward pass over `tokens` (the masked objective's with `masked`);
    /// with `grad_scale`, leaves the logits' gradient for the backward pass. Returns the
    /// summed loss.
    fn run_forward(
        &mut self,
        tokens: &[u16],
        masked: Option<&[bool]>,
        grad_scale: Option<f32>,
    ) -> anyhow::Result<f64> {
        self.backward_ready = false;
        self.set_pass_inputs(tokens, masked)?;
        self.forward_calls(masked.is_some(), grad_scale);
        Ok(self.summed_losses())
    }

    /// Checks `tokens` and hands the backend a pass's inputs: the ids, or with `masked` the
    /// masked objective's inputs, targets and loss weights.
    fn set_pass_inputs(&mut self, tokens: &[u16], masked: Option<&[bool]>) -> anyhow::Result<()> {
        self.n_seq = self.check_tokens(tokens)?;
        match masked {
            Some(m) => self.set_masked_targets(tokens, m),
            None => {
                self.backend.set_tokens(tokens);
                Ok(())
            }
        }
    }

    /// The inputs and loss weights of the masked objective for checked `tokens`.
    fn set_masked_targets(&mut self, tokens: &[u16], masked: &[bool]) -> anyhow::Result<()> {
        self.set_masked_inputs(tokens, Some(masked))?;
        let rows = tokens.len();
        for (w, &m) in self.mask_weights.iter_mut().zip(masked) {
            *w = if m { 1.0 } else { 0.0 };
        }
        self.backend.set_targets(tokens, &self.mask_weights[..rows]);
        Ok(())
    }

    /// The calls of a loss-computing forward pass over the `n_seq` sequences whose inputs are
    /// set, from the embedding to the per-position losses (and with `grad_scale`, the logits'
    /// gradient). `masked`: the masked objective's direct embedding. No transfers, so the
    /// calls can be recorded.
    fn forward_calls(&mut self, masked: bool, grad_scale: Option<f32>) {
        let n_seq = self.n_seq;
        let (d, t, v) = (self.cfg.n_embd, self.cfg.n_ctx(), self.cfg.n_vocab);
        let rows = n_seq * t;
        self.embed(rows, masked);
        self.run_blocks(n_seq, self.cfg.n_layer);
        let (plan, b) = (&self.plan, self.backend.as_mut());
        let logits = act(plan.logits, rows * v);
        head_forward(
            b,
            &self.weights,
            act(plan.resid[self.cfg.n_layer], rows * d),
            first(plan.lnf, rows * d),
            act(plan.rstdf, rows),
            logits,
            rows,
            d,
            v,
        );
        let gradient = grad_scale.map(|scale| LogitGradient {
            scale,
            out: plan.dlogits(rows, v),
        });
        b.cross_entropy(logits, act(plan.losses, rows), v, gradient);
    }

    /// The sum of the last forward pass's per-position losses.
    fn summed_losses(&mut self) -> f64 {
        let rows = self.n_seq * self.cfg.n_ctx();
        self.backend
            .download(act(self.plan.losses, rows), &mut self.host_losses[..rows]);
        self.host_losses[..rows].iter().map(|&x| x as f64).sum()
    }

    /// Hands the backend the input ids of checked `tokens`, with the mask id (a zero content
    /// embedding) where `masked` is set (BERT models only).
    fn set_masked_inputs(&mut self, tokens: &[u16], masked: Option<&[bool]>) -> anyhow::Result<()> {
        let Some(masked) = masked else {
            self.backend.set_tokens(tokens);
            return Ok(());
        };
        anyhow::ensure!(
            !self.cfg.causal(),
            "masks are for BERT models; this one is autoregressive"
        );
        anyhow::ensure!(masked.len() == tokens.len(), "one mask flag per token");
        let mask_id = self.cfg.n_vocab as u16 + 1;
        for ((dst, &x), &m) in self.masked_inputs.iter_mut().zip(tokens).zip(masked) {
            *dst = if m { mask_id } else { x };
        }
        self.backend.set_tokens(&self.masked_inputs[..tokens.len()]);
        Ok(())
    }

    /// Per-position losses of the last forward pass, `[n_seq * n_ctx]`.
    pub fn position_losses(&self) -> &[f32] {
        &self.host_losses[..self.n_seq * self.cfg.n_ctx()]
    }

    /// Logits of the last forward pass (`[n_seq, n_ctx, n_vocab]`); only valid after
    /// [`Engine::forward`] (a training pass whose products read f32 overwrites them with their
    /// gradient).
    pub fn logits(&self, out: &mut Vec<f32>) {
        let rows = self.n_seq * self.cfg.n_ctx();
        out.resize(rows * self.cfg.n_vocab, 0.0);
        self.backend
            .download(act(self.plan.logits, rows * self.cfg.n_vocab), out);
    }

    /// An inference pass over input ids fed as they are (no shift; see
    /// [`crate::backend::Backend::embed_forward`] for the start and mask ids), `[n_seq, n_ctx]`.
    /// Runs only as deep as `output` needs and copies it to `out`: logits
    /// `[n_seq, n_ctx, n_vocab]` or a hidden state `[n_seq, n_ctx, n_embd]`.
    pub fn infer(&mut self, ids: &[u16], output: Output, out: &mut Vec<f32>) -> anyhow::Result<()> {
        self.backward_ready = false;
        let (d, t, v) = (self.cfg.n_embd, self.cfg.n_ctx(), self.cfg.n_vocab);
        anyhow::ensure!(
            !ids.is_empty() && ids.len().is_multiple_of(t),
            "inputs must be whole sequences of {t} ids (got {})",
            ids.len()
        );
        let n_seq = ids.len() / t;
        anyhow::ensure!(
            n_seq <= self.batch,
            "batch of {n_seq} sequences exceeds the planned {}",
            self.batch
        );
        let max_id = if self.cfg.causal() { v } else { v + 1 };
        if let Some(&bad) = ids.iter().find(|&&x| x as usize > max_id) {
            anyhow::bail!("input id {bad} is beyond the largest valid id {max_id}");
        }
        let depth = match output {
            Output::Logits => self.cfg.n_layer,
            Output::Hidden(l) => {
                anyhow::ensure!(
                    l <= self.cfg.n_layer,
                    "hidden state {l} does not exist: the model has {} layers (0..={})",
                    self.cfg.n_layer,
                    self.cfg.n_layer
                );
                l
            }
        };
        self.n_seq = n_seq;
        let rows = n_seq * t;
        self.backend.set_tokens(ids);
        self.embed(rows, true);
        self.run_blocks(n_seq, depth);
        let src = match output {
            Output::Hidden(l) if l < self.cfg.n_layer => act(self.plan.resid[l], rows * d),
            Output::Hidden(_) => self.final_norm_f32(rows),
            Output::Logits => {
                let logits = act(self.plan.logits, rows * v);
                head_forward(
                    self.backend.as_mut(),
                    &self.weights,
                    act(self.plan.resid[depth], rows * d),
                    first(self.plan.lnf, rows * d),
                    act(self.plan.rstdf, rows),
                    logits,
                    rows,
                    d,
                    v,
                );
                logits
            }
        };
        out.resize(src.len, 0.0);
        self.backend.download(src, out);
        Ok(())
    }

    /// Linear-probe features (REFERENCE.md §6): for each layer `l` of `layers`, the mean over
    /// positions of block `l`'s normalised input (`norm_1` of the residual stream entering it);
    /// `l = n_layer` means the final norm's output. Runs only as deep as the deepest layer asked
    /// for. `tokens`: `[n_seq, n_ctx]` pixels, fed as in training; a BERT model may be given
    /// `masked` flags (one per token) to hide those pixels. `out`: `[n_seq, layers, d]`.
    pub fn probe_features(
        &mut self,
        tokens: &[u16],
        masked: Option<&[bool]>,
        layers: &[usize],
        out: &mut Vec<f32>,
    ) -> anyhow::Result<()> {
        self.backward_ready = false;
        let n_seq = self.check_tokens(tokens)?;
        let (d, t) = (self.cfg.n_embd, self.cfg.n_ctx());
        let n_layer = self.cfg.n_layer;
        if let Some(&bad) = layers.iter().find(|&&l| l > n_layer) {
            anyhow::bail!("layer {bad} does not exist: the model has layers 0..={n_layer}");
        }
        anyhow::ensure!(!layers.is_empty(), "no layers asked for");
        let rows = n_seq * t;
        self.n_seq = n_seq;
        out.clear();
        out.resize(n_seq * layers.len() * d, 0.0);
        let mut host = vec![0.0f32; rows * d];
        self.set_masked_inputs(tokens, masked)?;
        self.embed(rows, !self.cfg.causal());
        let deepest = *layers.iter().max().unwrap();
        for l in 0..=deepest {
            if layers.contains(&l) {
                let (plan, lay) = (&self.plan, &self.layout);
                // One f32 buffer serves every layer: a block's own may be bf16.
                let gain = if l < n_layer {
                    lay.blocks[l].ln_1
                } else {
                    lay.ln_f
                };
                let norm = plan.f32_norm(rows * d);
                let rstd = plan.rstdf;
                self.backend.rmsnorm_forward(
                    norm,
                    act(rstd, rows),
                    act(plan.resid[l], rows * d),
                    View::new(Arena::Params, gain, d),
                    d,
                );
                self.backend.download(norm, &mut host);
                for (j, &want) in layers.iter().enumerate() {
                    if want != l {
                        continue;
                    }
                    for s in 0..n_seq {
                        let dst = &mut out[(s * layers.len() + j) * d..][..d];
                        for row in host[s * t * d..(s + 1) * t * d].chunks_exact(d) {
                            for (o, x) in dst.iter_mut().zip(row) {
                                *o += x;
                            }
                        }
                        dst.iter_mut().for_each(|o| *o /= t as f32);
                    }
                }
            }
            if l < deepest && l < n_layer {
                self.run_blocks_range(n_seq, l, l + 1);
            }
        }
        Ok(())
    }

    /// Writes the input embedding of the stored tokens into `resid[0]`: shifted behind the start
    /// token (autoregressive training and scoring), or `direct` (ids as given; see
    /// [`Backend::embed_forward`]).
    fn embed(&mut self, rows: usize, direct: bool) {
        let (d, t, v) = (self.cfg.n_embd, self.cfg.n_ctx(), self.cfg.n_vocab);
        let (plan, lay) = (&self.plan, &self.layout);
        let out = act(plan.resid[0], rows * d);
        let wte = View::new(Arena::Params, lay.wte, v * d);
        let wpe = View::new(Arena::Params, lay.wpe, t * d);
        let sos = View::new(Arena::Params, lay.sos, d);
        self.backend.embed_forward(out, wte, wpe, sos, t, d, direct);
    }

    /// Runs blocks `0..depth` on the residual stream already in `resid[0]`.
    fn run_blocks(&mut self, n_seq: usize, depth: usize) {
        self.run_blocks_range(n_seq, 0, depth)
    }

    /// Runs blocks `from..to`, block l reading `resid[l]` and writing `resid[l + 1]`.
    fn run_blocks_range(&mut self, n_seq: usize, from: usize, to: usize) {
        let cfg = &self.cfg;
        let (d, t) = (cfg.n_embd, cfg.n_ctx());
        let rows = n_seq * t;
        let shape = AttnShape {
            batch: n_seq,
            t,
            n_head: cfg.n_head,
            head_dim: cfg.head_dim(),
            causal: cfg.causal(),
        };
        let plan = &self.plan;
        let b = self.backend.as_mut();
        let scratch = act(plan.attn_scratch, plan.attn_scratch_len);
        for (l, (ba, w)) in plan
            .blocks
            .iter()
            .zip(&self.weights.blocks)
            .enumerate()
            .take(to)
            .skip(from)
        {
            let io = BlockIo {
                x: act(plan.resid[l], rows * d),
                ln1: first(ba.ln1, rows * d),
                rstd1: act(ba.rstd1, rows),
                qkv: first(ba.qkv, rows * 3 * d),
                att: first(ba.att, rows * d),
                mid: act(ba.mid, rows * d),
                ln2: first(ba.ln2, rows * d),
                rstd2: act(ba.rstd2, rows),
                fc: first(ba.fc, rows * 4 * d),
                fc_act: first(plan.fc_act, rows * 4 * d),
                out: act(plan.resid[l + 1], rows * d),
            };
            let lse = act(ba.lse, n_seq * cfg.n_head * t);
            block_forward(b, w, &io, rows, d, |b, qkv, att| {
                b.attention_forward(att, lse, qkv, scratch, shape)
            });
        }
    }

    /// The final norm's output `[n_seq, n_ctx, d]` of the last forward pass (what a
    /// classification head reads), in f32.
    pub fn final_norm_output(&mut self, out: &mut Vec<f32>) {
        let rows = self.n_seq * self.cfg.n_ctx();
        let lnf = match self.plan.lnf.dtype {
            DType::F32 => first(self.plan.lnf, rows * self.cfg.n_embd),
            // The pass kept it as bf16 for the head's products: computed again in f32.
            DType::Bf16 => self.final_norm_f32(rows),
        };
        out.resize(lnf.len, 0.0);
        self.backend.download(lnf, out);
    }

    /// Computes the final norm of the residual stream's first `rows` rows into
    /// [`ActPlan::f32_norm`] and returns it. The row statistics it writes are the bits the
    /// forward pass wrote (one computation for both output types).
    fn final_norm_f32(&mut self, rows: usize) -> View {
        let (plan, d) = (&self.plan, self.cfg.n_embd);
        let out = plan.f32_norm(rows * d);
        self.backend.rmsnorm_forward(
            out,
            act(plan.rstdf, rows),
            act(plan.resid[self.cfg.n_layer], rows * d),
            self.weights.ln_f,
            d,
        );
        out
    }

    fn backward_with(
        &mut self,
        extra_dlnf: Option<&[f32]>,
        finished: &mut dyn FnMut(&FinishedGrads),
    ) {
        let cfg = self.cfg.clone();
        let (d, t, v) = (cfg.n_embd, cfg.n_ctx(), cfg.n_vocab);
        let n_seq = self.n_seq;
        let rows = n_seq * t;
        let shape = AttnShape {
            batch: n_seq,
            t,
            n_head: cfg.n_head,
            head_dim: cfg.head_dim(),
            causal: cfg.causal(),
        };
        let plan = &self.plan;
        let lay = &self.layout;
        let b = self.backend.as_mut();
        let pv = |o: usize, n: usize| View::new(Arena::Params, o, n);
        let gv = |o: usize, n: usize| View::new(Arena::Grads, o, n);
        let scratch = act(plan.attn_scratch, plan.attn_scratch_len);
        let dlogits = plan.dlogits(rows, v);
        let d_resid = act(plan.d_resid, rows * d);
        let d_ln = act(plan.d_ln, rows * d);
        let d_norm = first(plan.d_norm, rows * d);
        let d_att = first(plan.d_att, rows * d);
        let d_qkv = first(plan.d_qkv, rows * 3 * d);
        // The activation's gradient, then (in place, or bf16 into `dy_half`) its input's.
        let d_fc_act = first(plan.d_fc_act, rows * 4 * d);
        let fc_act = first(plan.fc_act, rows * 4 * d);
        let dy_half = plan.dy_half;

        // Head and final norm; a classification head's gradient, when given, is the start.
        if let Some(extra) = extra_dlnf {
            b.upload(d_ln, extra);
        }
        head_backward(
            b,
            (lay.wtet, self.weights.head),
            d_ln,
            dlogits,
            first(plan.lnf, rows * d),
            (rows, d, v),
            extra_dlnf.is_some(),
        );
        b.fill(d_resid, 0.0);
        // Where a product that adds to the stream reads bf16, the norm's backward pass before
        // it stores the stream's gradient rounded for it too (`resid_for`).
        let resid_rounded = dy_half.map(|half| first(half, rows * d));
        let resid_for = |bf16: bool| if bf16 { resid_rounded } else { None };
        let last = act(plan.resid[cfg.n_layer], rows * d);
        b.rmsnorm_backward(
            d_resid,
            resid_rounded,
            gv(lay.ln_f, d),
            d_ln,
            last,
            act(plan.rstdf, rows),
            pv(lay.ln_f, d),
            d,
        );
        finished(&FinishedGrads {
            from: lay.ln_f,
            backend: &*b,
        });

        for l in (0..cfg.n_layer).rev() {
            let (ba, po, w) = (&plan.blocks[l], &lay.blocks[l], &self.weights.blocks[l]);
            let fc = first(ba.fc, rows * 4 * d);
            // MLP branch: the activation output is recomputed rather than stored per layer.
            b.gelu_forward(fc_act, fc);
            let (mlp_proj, dy) = ((po.mlp_proj, w.mlp_proj), resid_rounded.unwrap_or(d_resid));
            linear_backward(b, d_fc_act, mlp_proj, fc_act, dy, dy_half, rows, 4 * d, d);
            let (c_fc, ln2) = ((po.c_fc, w.c_fc), first(ba.ln2, rows * d));
            // Where the products read bf16, the gradient is stored rounded for them at once.
            let d_fc = dy_half.map_or(d_fc_act, |half| first(half, rows * 4 * d));
            b.gelu_backward(d_fc, d_fc_act, fc);
            linear_backward(b, d_norm, c_fc, ln2, d_fc, dy_half, rows, d, 4 * d);
            let (mid, rstd2) = (act(ba.mid, rows * d), act(ba.rstd2, rows));
            let rounded = resid_for(plan.attention_bf16);
            let (gain, g2) = (gv(po.ln_2, d), pv(po.ln_2, d));
            b.rmsnorm_backward(d_resid, rounded, gain, d_norm, mid, rstd2, g2, d);
            // Attention branch.
            let att = first(ba.att, rows * d);
            let (attn_proj, dy) = ((po.attn_proj, w.attn_proj), rounded.unwrap_or(d_resid));
            linear_backward(b, d_att, attn_proj, att, dy, dy_half, rows, d, d);
            let (lse, qkv) = (
                act(ba.lse, n_seq * cfg.n_head * t),
                first(ba.qkv, rows * 3 * d),
            );
            b.attention_backward(d_qkv, d_att, att, lse, qkv, scratch, shape);
            let (c_attn, ln1) = ((po.c_attn, w.c_attn), first(ba.ln1, rows * d));
            linear_backward(b, d_norm, c_attn, ln1, d_qkv, dy_half, rows, d, 3 * d);
            let (x, rstd1) = (act(plan.resid[l], rows * d), act(ba.rstd1, rows));
            // For the MLP of the block below, if any.
            let rounded = resid_for(l > 0);
            let (gain, g1) = (gv(po.ln_1, d), pv(po.ln_1, d));
            b.rmsnorm_backward(d_resid, rounded, gain, d_norm, x, rstd1, g1, d);
            finished(&FinishedGrads {
                from: po.ln_1,
                backend: &*b,
            });
        }
        // Training passes embed shifted exactly when the model is autoregressive.
        b.embed_backward(
            gv(lay.wte, v * d),
            gv(lay.wpe, t * d),
            gv(lay.sos, d),
            d_resid,
            t,
            d,
            !cfg.causal(),
        );
        finished(&FinishedGrads {
            from: 0,
            backend: &*b,
        });
    }
}

/// The gradients a backward pass has finished: the arena from `from` to its end.
pub struct FinishedGrads<'a> {
    pub from: usize,
    backend: &'a dyn Backend,
}

impl FinishedGrads<'_> {
    /// Copies `range` (within the finished part) of the gradient arena to `out`.
    pub fn read(&self, range: std::ops::Range<usize>, out: &mut [f32]) {
        assert!(
            range.start >= self.from,
            "gradients before {} are not final yet",
            self.from
        );
        self.backend
            .download(View::new(Arena::Grads, range.start, range.len()), out);
    }
}

#[cfg(test)]
mod plan_tests {
    use super::*;
    use crate::config::Objective;

    #[test]
    fn the_memory_estimate_of_activations_is_the_plan_s() {
        let backend = crate::backend::cpu::CpuBackend::new();
        for (l, d, h, v, side, batch) in [
            (1, 16, 2, 8, 6, 4),
            (3, 48, 4, 17, 5, 1),
            (2, 64, 8, 512, 32, 3),
            (4, 128, 2, 16, 28, 16),
        ] {
            for objective in [Objective::Autoregressive, Objective::Bert] {
                let cfg = ModelConfig {
                    n_layer: l,
                    n_embd: d,
                    n_head: h,
                    n_vocab: v,
                    side,
                    channels: 1,
                    objective,
                };
                for training in [false, true] {
                    let plan = ActPlan::new(&cfg, batch, training, &backend, None);
                    let scratch = plan.attn_scratch_len as u128;
                    let floats = crate::memory::activation_floats(&cfg, batch, training, scratch);
                    assert_eq!(
                        floats, plan.total as u128,
                        "{cfg:?} batch {batch} training {training}"
                    );
                    // With bfloat16 inputs (a GPU's training), each arena's share.
                    for attention in [false, true] {
                        let mut half = 0;
                        let inputs = Bf16Inputs { attention };
                        let plan = ActPlan::new(
                            &cfg,
                            batch,
                            training,
                            &backend,
                            Some((&mut half, inputs)),
                        );
                        assert_eq!(
                            crate::memory::activations(
                                &cfg,
                                batch,
                                training,
                                scratch,
                                Some(inputs)
                            ),
                            (plan.total as u128, half as u128),
                            "{cfg:?} batch {batch} training {training}, {inputs:?}"
                        );
                        assert!(plan.total < floats as usize && half > 0, "{cfg:?}");
                    }
                }
            }
        }
    }
}
