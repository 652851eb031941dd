//! The kernel interface the model is written against.
//!
//! The engine plans every buffer once and refers to tensors as [`View`]s: an arena plus an
//! offset, a length and an element type. A backend owns the arenas (host memory for the CPU,
//! device memory for a GPU backend) and runs each kernel on the views it is given, so the model
//! code never touches memory directly and a new backend needs no change to it. The model never
//! names a backend: it is handed one by [`Device::open`].

pub mod cpu;
pub mod cuda;
mod device;
pub mod profile;

pub use device::{Device, Gpu};

use crate::sample::SampleOptions;

/// Layout of a matrix operand: `N` as stored (`[rows, cols]` row-major), `T` stored transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    N,
    T,
}

/// Shape of an attention call. `qkv` is `[batch * t, 3d]` with columns Q, K, V, each split into
/// `n_head` contiguous groups of `head_dim`; the output is `[batch * t, d]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    pub batch: usize,
    pub t: usize,
    pub n_head: usize,
    pub head_dim: usize,
    /// Autoregressive (causal) or bidirectional attention.
    pub causal: bool,
}

/// Hyper-parameters of one AdamW step. `step` counts from 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub step: u64,
    /// Multiplies the gradient first (gradient clipping).
    pub grad_scale: f32,
}

impl AdamStep {
    /// Adam's bias corrections of the two moments at this step: `1 - beta^step`.
    pub fn bias_corrections(&self) -> (f32, f32) {
        let step = self.step as i32;
        (1.0 - self.beta1.powi(step), 1.0 - self.beta2.powi(step))
    }
}

/// The step a [`Backend::clipped_update`] takes: AdamW's, and the largest global gradient norm
/// (0: no clipping).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Update {
    pub adam: AdamStep,
    pub clip: f32,
}

impl Update {
    /// The factor on the gradient that brings a global norm of `norm` down to the clip (1 when
    /// it is within it, clipping is off, or the norm is not a number).
    pub fn clip_factor(&self, norm: f64) -> f32 {
        if self.clip > 0.0 && norm > self.clip as f64 {
            (self.clip as f64 / norm) as f32
        } else {
            1.0
        }
    }
}

/// Where [`Backend::cross_entropy`] writes `scale * dloss/dlogits`: over the logits
/// themselves (`out` is the f32 logits view), or into a bfloat16 view of their length, stored
/// rounded for the head's bfloat16 products while the logits stay as they were.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogitGradient {
    pub scale: f32,
    pub out: View,
}

/// One AdamW step on parameters held in host memory (a classification head, which stays on the
/// host whatever the device): the same update the backends apply to the model.
pub use cpu::optim::adamw as adamw_host;

/// Element type of a view: f32 everywhere but in [`Arena::Half`], which holds bfloat16.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum DType {
    #[default]
    F32,
    Bf16,
}

/// Precision of inference products and caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 weights, activations and caches (exact against the reference).
    #[default]
    F32,
    /// Weights and key/value caches stored as bfloat16, products accumulated in f32.
    Bf16,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        })
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(format!(
                "unknown precision {other:?} (expected f32 or bf16)"
            )),
        }
    }
}

/// The separately allocated regions a backend holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arena {
    Params,
    Grads,
    AdamM,
    AdamV,
    Acts,
    /// 16-bit storage: packed inference weights and bfloat16 key/value caches.
    Half,
}

/// A contiguous run of `len` elements of type `dtype` at `offset` (in elements) in one arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    pub arena: Arena,
    pub offset: usize,
    pub len: usize,
    pub dtype: DType,
}

impl View {
    /// An f32 view.
    pub fn new(arena: Arena, offset: usize, len: usize) -> Self {
        Self {
            arena,
            offset,
            len,
            dtype: DType::F32,
        }
    }
    /// A bfloat16 view in [`Arena::Half`].
    pub fn bf16(offset: usize, len: usize) -> Self {
        Self {
            arena: Arena::Half,
            offset,
            len,
            dtype: DType::Bf16,
        }
    }
    pub fn overlaps(&self, other: &View) -> bool {
        self.arena == other.arena
            && self.offset < other.offset + other.len
            && other.offset < self.offset + self.len
    }
}

/// Sizes of every arena, fixed when the engine is planned.
#[derive(Debug, Clone, Copy, Default)]
pub struct ArenaSizes {
    pub params: usize,
    /// Gradients and both Adam moments (zero when the engine only runs inference).
    pub grads: usize,
    pub acts: usize,
    /// Elements of [`Arena::Half`] (packed weights and 16-bit caches).
    pub half: usize,
    /// Elements (`rows * k`) of the largest input of [`Backend::matmul_packed`] (its 16-bit
    /// split is scratch); its row count is at most `max_rows`.
    pub max_packed_input: usize,
    /// Token slots: the batch's inputs and targets.
    pub tokens: usize,
    /// Largest row count and row width any row-wise kernel will see.
    pub max_rows: usize,
    pub max_width: usize,
    /// Rows of the content embedding whose gradient [`Backend::embed_backward`] sums (the
    /// table's and the start token's, `n_vocab + 1`; zero when nothing trains): the CUDA
    /// backend keeps partial sums of each in scratch.
    pub embedding_rows: usize,
    /// What a decoder draws tokens with on the backend (all zero when nothing decodes).
    pub draws: DrawSizes,
}

/// The buffers of [`Backend::draw_tokens`]: `rows` sequences, each drawing at up to
/// `positions` positions from `width` colours.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrawSizes {
    pub rows: usize,
    pub positions: usize,
    pub width: usize,
}

impl DrawSizes {
    /// Bytes a backend may allocate for them (the CUDA backend's, which the CPU backend's are
    /// fewer than): each row's options and numbers, the drawn tokens, and per row a float per
    /// colour and a 64-bit sort key per colour, padded to a power of two.
    pub fn bytes(&self) -> u128 {
        let (r, p, w) = (
            self.rows as u128,
            self.positions as u128,
            self.width as u128,
        );
        16 * r + 4 * r * p + 2 * p * r + 4 * r * w + 8 * r * w.next_power_of_two()
    }

    /// Panics unless `rows` rows' options and `numbers` numbers (`[rows, positions]`) fit
    /// these buffers: a planning bug (the decoder checks what users give it first).
    pub fn check_fits(&self, rows: usize, numbers: usize) {
        assert!(
            rows <= self.rows && numbers == rows * self.positions,
            "set_draws: {rows} rows of {numbers} numbers, planned {} of {}",
            self.rows,
            self.positions
        );
    }

    /// Where the tokens of `rows` rows drawn at positions `from..to` lie in the drawn tokens
    /// (`[positions, rows]`), as element indices; panics unless they fit and `out_len` holds
    /// them.
    pub fn drawn_range(
        &self,
        rows: usize,
        from: usize,
        to: usize,
        out_len: usize,
    ) -> std::ops::Range<usize> {
        assert!(
            from <= to && to <= self.positions && out_len == (to - from) * rows,
            "drawn_tokens: positions {from}..{to} of {rows} rows into {out_len}"
        );
        from * rows..to * rows
    }
}

/// The kernels of one model family. Every method reads and writes only the views it is given;
/// outputs never alias inputs unless the method says so (`*_inplace`).
pub trait Backend: Send {
    fn name(&self) -> &'static str;
    /// Elements of scratch [`Backend::attention_forward`] and [`Backend::attention_backward`]
    /// need for `shape` (asked once, when the engine plans its buffers).
    fn attention_scratch_len(&self, shape: AttnShape) -> usize;
    /// Positions each decoding cache holds for a context of `n_ctx` (at least `n_ctx`; a
    /// backend may round up to its tile size). Each cache holds `batch * n_head * len * head_dim`
    /// elements, laid out as the backend chooses.
    fn decode_cache_len(&self, n_ctx: usize) -> usize;
    /// The longest context this backend's decoding kernels take for heads of `head_dim`
    /// columns (a GPU's shared memory bounds it).
    fn decode_context_limit(&self, _head_dim: usize) -> usize {
        usize::MAX
    }
    /// Whether this device multiplies bfloat16 natively (so [`Precision::Bf16`] is the faster
    /// choice for inference, not only the smaller one).
    fn native_bf16(&self) -> bool;
    /// Whether [`Backend::matmul_packed`] rounds an f32 input to bfloat16 (so its producer may
    /// as well store it as bfloat16, saving a pass), rather than keeping more of it. Such a
    /// backend packs a `[k, n]` weight as the plain row-major bfloat16 matrix (`packed_len`
    /// is `k * n`), which [`Backend::matmul`] may read as a bfloat16 operand.
    fn rounds_packed_inputs(&self) -> bool {
        false
    }
    /// Whether attention of `shape` may keep what it reads and writes as bfloat16: Q, K, V
    /// and the output ([`Backend::attention_forward`]), and with them the output's gradient
    /// and `dqkv` ([`Backend::attention_backward`]), as bfloat16 products write and read them.
    fn attention_stores_bf16(&self, _shape: AttnShape) -> bool {
        false
    }
    /// Elements of [`Arena::Half`] a packed `[k, n]` weight takes (see [`Backend::pack_weight`]).
    fn packed_len(&self, k: usize, n: usize) -> usize;
    /// Bytes free in the memory this backend allocates from, where that is not the host's (a
    /// GPU's); `None` means host memory, which the planner checks itself.
    fn device_memory_free(&self) -> Option<u128> {
        None
    }
    /// Waits until every call made so far has finished (a GPU runs them asynchronously).
    fn synchronize(&self) {}
    /// Allocates every arena once (zero-filled). Called before any kernel. Fails, rather
    /// than aborting, when the memory is not there.
    fn allocate(&mut self, sizes: ArenaSizes) -> anyhow::Result<()>;
    /// Copies `src` from the host into `dst`; a bfloat16 view stores it rounded.
    fn upload(&mut self, dst: View, src: &[f32]);
    /// Makes `params` the parameter arena, after [`Backend::allocate`] was told to allocate
    /// none (`ArenaSizes::params` 0). A backend that keeps parameters in host memory takes
    /// the buffer as it is (no second copy of a large model); others allocate the arena and
    /// upload it, failing when the memory is not there.
    fn adopt_params(&mut self, params: Vec<f32>) -> anyhow::Result<()>;
    /// Hands the parameter arena (`len` elements) back to the host, leaving the backend without
    /// it: a backend that adopted the buffer returns it as it is; others download it.
    fn release_params(&mut self, len: usize) -> Vec<f32> {
        let mut out = vec![0.0; len];
        self.download(View::new(Arena::Params, 0, len), &mut out);
        out
    }
    /// Copies `src` to the host; a bfloat16 view is widened to f32 (exactly).
    fn download(&self, src: View, dst: &mut [f32]);
    /// Sets every element of `dst` (f32 or bfloat16) to `value`.
    fn fill(&mut self, dst: View, value: f32);
    /// Copies between views of the same element type.
    fn copy(&mut self, dst: View, src: View);
    /// `dst` (bfloat16) = `src` (f32, of the same length) rounded to nearest even: an operand
    /// stored once for the bfloat16 products that read it.
    fn round_to_bf16(&mut self, dst: View, src: View);
    /// Stores the batch's token ids `[batch, t]` (inputs and the targets, which are the same).
    fn set_tokens(&mut self, tokens: &[u16]);
    /// Sets how [`Backend::draw_tokens`] draws for each of `options.len()` rows: its
    /// options, and `numbers` (`[rows, positions]`, each in `[0, 1)`) the number each row
    /// draws with at each position. A transfer, made between steps.
    fn set_draws(&mut self, options: &[SampleOptions], numbers: &[f32]);
    /// Draws each row's next token from `logits` (`[rows, v]`) at decoding position `pos`, as
    /// [`crate::sample::choose_token`] does with the row's options and number there. The tokens
    /// become the stored tokens (as [`Backend::set_tokens`] would make them, so the next
    /// [`Backend::embed_step`] reads them) and are kept for [`Backend::drawn_tokens`]. Kernels
    /// only: recordable, `pos` being each replay's.
    fn draw_tokens(&mut self, logits: View, v: usize, pos: usize);
    /// The tokens [`Backend::draw_tokens`] drew at positions `from..to`, position-major
    /// (`out` is `[to - from, rows]`, `rows` as [`Backend::set_draws`] last set). Waits for them.
    fn drawn_tokens(&self, from: usize, to: usize, out: &mut [u16]);

    /// Input embedding of the stored ids into `out`. Shifted (`direct = false`, autoregressive
    /// models): position 0 gets the start token, position i the content of id i-1. Direct: the ids
    /// as given, id `n_vocab` being the start token and `n_vocab + 1` a masked position (zero
    /// content embedding).
    #[allow(clippy::too_many_arguments)]
    fn embed_forward(
        &mut self,
        out: View,
        wte: View,
        wpe: View,
        sos: View,
        t: usize,
        d: usize,
        direct: bool,
    );
    /// Backward of [`Backend::embed_forward`] in the same mode.
    #[allow(clippy::too_many_arguments)]
    fn embed_backward(
        &mut self,
        dwte: View,
        dwpe: View,
        dsos: View,
        dout: View,
        t: usize,
        d: usize,
        direct: bool,
    );
    /// Targets and per-position loss weights for the next [`Backend::cross_entropy`], which
    /// otherwise scores the stored tokens with weight 1. [`Backend::set_tokens`] clears them.
    fn set_targets(&mut self, targets: &[u16], weights: &[f32]);
    /// `out` may be bfloat16 (the f32 values rounded as stored); `rstd` is f32.
    fn rmsnorm_forward(&mut self, out: View, rstd: View, x: View, g: View, d: usize);
    /// Adds the input gradient into `dx` and the gain gradient into `dg`; with `dx_rounded`
    /// (bfloat16, `dx`'s length), also stores the resulting `dx` there rounded, for the
    /// bfloat16 products that read the residual stream's gradient next. `dout` may be
    /// bfloat16 (as bfloat16 products store it); everything else is f32.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward(
        &mut self,
        dx: View,
        dx_rounded: Option<View>,
        dg: View,
        dout: View,
        x: View,
        rstd: View,
        g: View,
        d: usize,
    );
    /// Converts the f32 weight `w` (`[k, n]`, or `[n, k]` with `Op::T`) into `dst`, a
    /// bfloat16 view of [`Backend::packed_len`] elements, in this backend's layout for
    /// [`Backend::matmul_packed`].
    fn pack_weight(&mut self, dst: View, w: View, op: Op, k: usize, n: usize);
    /// `out[m, n] (+)= a[m, k] @ w` with `w` packed by [`Backend::pack_weight`], the products
    /// accumulated in f32. `a` is f32 (which a backend rounds to bfloat16, or splits into a
    /// bfloat16 and a remainder: see [`Backend::rounds_packed_inputs`]) or bfloat16. `out` is
    /// f32, or bfloat16 (the f32 result rounded once; not `accumulate`) where `a` is too.
    #[allow(clippy::too_many_arguments)]
    fn matmul_packed(
        &mut self,
        out: View,
        a: View,
        w: View,
        m: usize,
        k: usize,
        n: usize,
        accumulate: bool,
    );
    /// `out[m, n] (+)= a @ b` with optional transposes (see [`Op`]). `a` and `b` are both f32
    /// or both bfloat16 (their products then accumulate in f32; the CPU widens them first, its
    /// own products reading bfloat16 only packed). `out` is f32, or with bfloat16 operands
    /// bfloat16 (the f32 result rounded once; not `accumulate`).
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &mut self,
        out: View,
        a: View,
        ta: Op,
        b: View,
        tb: Op,
        m: usize,
        k: usize,
        n: usize,
        accumulate: bool,
    );
    /// `out = addend + a @ w`: [`Backend::matmul_packed`] adding to another buffer of `out`'s
    /// shape (a block's residual stream, which the backward pass needs unchanged) rather than
    /// to `out`. `out` may be `addend` itself (in place) but must not otherwise overlap it. A
    /// backend whose products read the addend where it lies saves the copy this default makes.
    #[allow(clippy::too_many_arguments)]
    fn matmul_packed_onto(
        &mut self,
        out: View,
        addend: View,
        a: View,
        w: View,
        m: usize,
        k: usize,
        n: usize,
    ) {
        if out != addend {
            self.copy(out, addend);
        }
        self.matmul_packed(out, a, w, m, k, n, true);
    }
    /// `out = addend + a @ b`: [`Backend::matmul`] onto another buffer, as
    /// [`Backend::matmul_packed_onto`].
    #[allow(clippy::too_many_arguments)]
    fn matmul_onto(
        &mut self,
        out: View,
        addend: View,
        a: View,
        ta: Op,
        b: View,
        tb: Op,
        m: usize,
        k: usize,
        n: usize,
    ) {
        if out != addend {
            self.copy(out, addend);
        }
        self.matmul(out, a, ta, b, tb, m, k, n, true);
    }
    /// Attention's output `[batch * t, d]` and each row's log-sum-exp from `qkv`
    /// (`[batch * t, 3d]`, Q | K | V). `qkv` and `out` are both f32, or (where
    /// [`Backend::attention_stores_bf16`]) both bfloat16.
    fn attention_forward(
        &mut self,
        out: View,
        lse: View,
        qkv: View,
        scratch: View,
        shape: AttnShape,
    );
    /// `dqkv` from the output's gradient `dout`, recomputing from the saved log-sum-exp.
    /// `dqkv`, `dout`, `out` and `qkv` are all f32, or all bfloat16 as
    /// [`Backend::attention_forward`]'s.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &mut self,
        dqkv: View,
        dout: View,
        out: View,
        lse: View,
        qkv: View,
        scratch: View,
        shape: AttnShape,
    );
    /// The input embeddings of positions `pos..pos + len` for each sequence (`[batch * len, d]`);
    /// the stored tokens are, for each of those positions, the sequence's previous token
    /// (ignored at position 0, where `sos` is the input).
    #[allow(clippy::too_many_arguments)]
    fn embed_step(
        &mut self,
        out: View,
        wte: View,
        wpe: View,
        sos: View,
        pos: usize,
        len: usize,
        d: usize,
    );
    /// Decoding positions `pos..pos + len` of every sequence: appends their K, V (from
    /// `qkv: [batch * len, 3d]`) to the caches (sized by [`Backend::decode_cache_len`], f32 or
    /// bfloat16 views) and attends from each over the positions up to itself. `len` 1 is one
    /// generation step; more is a prefill of known tokens. `out` may be bfloat16 (rounded as
    /// stored).
    #[allow(clippy::too_many_arguments)]
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
    );
    /// `out` may be bfloat16 (rounded as stored); it must be where `x` is bfloat16.
    fn gelu_forward(&mut self, out: View, x: View);
    /// The pre-activation gradient from the activation's, `dx = dout * gelu'(x)`: `dx` is
    /// `dout` itself (in place) or a separate view, f32 or bfloat16 (the gradient stored
    /// rounded for the bfloat16 products that read it). `dout` and `x` are both f32, or both
    /// bfloat16 with a bfloat16 `dx`.
    fn gelu_backward(&mut self, dx: View, dout: View, x: View);
    /// Per-position losses against the stored tokens; with `gradient`, also the logits'
    /// gradient as [`LogitGradient`] says.
    fn cross_entropy(
        &mut self,
        logits: View,
        losses: View,
        v: usize,
        gradient: Option<LogitGradient>,
    );
    fn sum_squares(&self, x: View) -> f64;
    /// Sets the step the next [`Backend::clipped_update`]s take. A transfer, not a kernel, so
    /// a recorded update replays with each step's rate and count.
    fn set_update(&mut self, update: Update);
    /// One optimizer step of the model, on the device: the global norm of `grads` (the whole
    /// gradient arena), the factor that clips it, and AdamW on each parameter view with its
    /// decay flag (each view's gradient and moments sit at the same offsets of [`Arena::Grads`],
    /// [`Arena::AdamM`] and [`Arena::AdamV`]), its gradient multiplied by
    /// `grad_scale * clip_factor(norm)`. Kernels only, so it can be recorded; the norm stays
    /// on the device until [`Backend::update_grad_norm`]. Needs [`Backend::set_update`] first.
    fn clipped_update(&mut self, tensors: &[(View, bool)], grads: View);
    /// The gradient norm the last [`Backend::clipped_update`] measured (waits for it).
    fn update_grad_norm(&self) -> f64;
    /// Starts a recording: the kernel calls that follow, up to [`Backend::end_recording`],
    /// are kept to be run by [`Backend::replay`] instead of now. Only kernels may be recorded,
    /// not transfers to or from the host; the decoding kernels' positions (`pos` of
    /// [`Backend::embed_step`] and [`Backend::attention_step`]) are each replay's. Ok(false),
    /// recording nothing, where the backend does not record: on a CPU a call costs nothing
    /// to issue, on a GPU each launch costs microseconds, which a recording pays once.
    fn begin_recording(&mut self) -> anyhow::Result<bool> {
        Ok(false)
    }
    /// Ends the recording begun by [`Backend::begin_recording`]: a handle to replay it, or why
    /// it cannot be replayed. Its calls have not run either way.
    fn end_recording(&mut self) -> anyhow::Result<Recording> {
        anyhow::bail!("the {} backend does not record", self.name())
    }
    /// Queues a recording's calls again, at position `pos`. Recordings last until
    /// [`Backend::forget`] or the next [`Backend::allocate`].
    fn replay(&mut self, recording: Recording, pos: usize) -> anyhow::Result<()> {
        let _ = (recording, pos);
        anyhow::bail!("the {} backend does not record", self.name())
    }
    /// Frees a recording.
    fn forget(&mut self, recording: Recording) {
        let _ = recording;
    }
}

/// A backend's handle to recorded calls (see [`Backend::begin_recording`]): where the backend
/// keeps the recording, and its number, unique for the backend's life (so a handle to a
/// forgotten recording never replays the one kept in its place).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recording {
    pub index: usize,
    pub id: u64,
}
