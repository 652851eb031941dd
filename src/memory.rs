//! What a command will hold in memory, estimated from the shapes before anything large is
//! allocated, and checked against what the system has.
//!
//! With memory overcommit a too-large allocation "succeeds" and the kernel kills the process
//! later; an allocation whose size overflows aborts. Every size here is computed in `u128`
//! from the configuration alone, so an absurd shape gives an error, never either of those.

use crate::config::ModelConfig;

/// Bytes of memory available to this process: `IGPT_MEMORY_LIMIT` (bytes) when set, else
/// Linux's `MemAvailable`, else unknown.
pub fn available() -> Option<u128> {
    if let Some(v) = std::env::var_os("IGPT_MEMORY_LIMIT") {
        return v.to_str().and_then(|s| s.trim().parse().ok());
    }
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u128 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Which setting a refused estimate depends on, so a front end can name the right flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// The model itself (parameters and what goes with them) does not fit.
    Model,
    /// The model fits, but not with this many images per pass.
    Batch,
    /// The outputs asked for (images generated, completions) do not fit.
    Count,
}

/// An estimate that does not fit in the memory available.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "{what} needs about {} ({}) but only {} {}",
    gb(*.need), .parts, gb(*.available), .place
)]
pub struct OutOfMemory {
    pub what: String,
    /// Whose memory: "of memory is available" (the host's) or "of the GPU's memory is free".
    pub place: &'static str,
    pub need: u128,
    pub available: u128,
    /// The parts of the estimate, for the message.
    pub parts: String,
    pub scale: Scale,
}

fn gb(bytes: u128) -> String {
    let g = bytes as f64 / 1e9;
    if g >= 0.1 {
        format!("{g:.2} GB")
    } else {
        format!("{:.1} MB", bytes as f64 / 1e6)
    }
}

/// Bytes by part. Parts whose size depends on the batch are marked, to tell a model too large
/// from a batch too large.
#[derive(Debug, Clone, Default)]
pub struct Estimate {
    pub parts: Vec<(&'static str, u128, Scale)>,
}

impl Estimate {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(mut self, what: &'static str, bytes: u128, scale: Scale) -> Self {
        if bytes > 0 {
            self.parts.push((what, bytes, scale));
        }
        self
    }

    pub fn total(&self) -> u128 {
        self.parts.iter().map(|p| p.1).sum()
    }

    /// Refuses, with the estimate and the memory available, when the total does not fit.
    pub fn check(&self, what: &str) -> Result<(), OutOfMemory> {
        self.check_in(what, None)
    }

    /// As [`Estimate::check`], against `device_free` bytes when the memory is a device's.
    pub fn check_in(&self, what: &str, device_free: Option<u128>) -> Result<(), OutOfMemory> {
        match device_free {
            Some(free) => self.check_against(what, free).map_err(|e| OutOfMemory {
                place: "of the GPU's memory is free",
                ..e
            }),
            None => match available() {
                Some(available) => self.check_against(what, available),
                None => Ok(()),
            },
        }
    }

    pub fn check_against(&self, what: &str, available: u128) -> Result<(), OutOfMemory> {
        let need = self.total();
        if need <= available {
            return Ok(());
        }
        let of = |s: Scale| -> u128 { self.parts.iter().filter(|p| p.2 == s).map(|p| p.1).sum() };
        // The setting to change: the smallest kind whose removal would make it fit, else the
        // model.
        let scale = if of(Scale::Model) > available {
            Scale::Model
        } else if of(Scale::Count) >= of(Scale::Batch) {
            Scale::Count
        } else {
            Scale::Batch
        };
        let parts = self
            .parts
            .iter()
            .map(|(w, b, _)| format!("{w} {}", gb(*b)))
            .collect::<Vec<_>>()
            .join(", ");
        Err(OutOfMemory {
            what: what.to_string(),
            place: "of memory is available",
            need,
            available,
            parts,
            scale,
        })
    }
}

/// Parameters of a model of this shape, computed without overflow (REFERENCE.md §3: no biases).
pub fn param_count(cfg: &ModelConfig) -> u128 {
    let (l, d, v, t) = (
        cfg.n_layer as u128,
        cfg.n_embd as u128,
        cfg.n_vocab as u128,
        cfg.side as u128 * cfg.side as u128,
    );
    // wte, wtet; wpe; sos, ln_f; per block two gains and 3d^2 + d^2 + 4d^2 + 4d^2.
    2 * v * d + t * d + 2 * d + l * (12 * d * d + 2 * d)
}

/// Floats of the engine's activation arena (the same arithmetic as `ActPlan`, in `u128`;
/// a test keeps the two equal), given the attention scratch the backend asks for.
pub fn activation_floats(
    cfg: &ModelConfig,
    batch: usize,
    training: bool,
    attn_scratch: u128,
) -> u128 {
    activations(cfg, batch, training, attn_scratch, None).0
}

/// Which activations a GPU's bf16 training stores as bf16 in the half arena (`ActPlan::new`
/// with `half`): the normalised inputs, the MLP's pre-activation, activation and (training)
/// activation gradient, the blocks' norms' output gradient (training) and the gradient
/// scratch always, and what attention reads and writes
/// (Q, K, V, its output and their gradients) where `attention` (the backend's attention stores
/// bf16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bf16Inputs {
    pub attention: bool,
}

/// The engine's activations as ActPlan lays them out: f32 floats of the activation arena, and
/// bf16 elements of the half arena (none without `bf16`).
pub fn activations(
    cfg: &ModelConfig,
    batch: usize,
    training: bool,
    attn_scratch: u128,
    bf16: Option<Bf16Inputs>,
) -> (u128, u128) {
    let r16 = |n: u128| n.div_ceil(16) * 16;
    let r32 = |n: u128| n.div_ceil(32) * 32;
    let (d, t, v, h, l) = (
        cfg.n_embd as u128,
        cfg.side as u128 * cfg.side as u128,
        cfg.n_vocab as u128,
        cfg.n_head as u128,
        cfg.n_layer as u128,
    );
    let b = batch as u128;
    let rows = b * t;
    let n_resid = if training { l + 1 } else { 2 };
    let n_block = if training { l } else { 1 };
    // Per block: ln1, att, mid, ln2 ([rows, d]), two rstd, qkv, lse, fc; then the final
    // norm's output and fc_act, shared. The MLP's buffers are counted together below.
    let (mut f32_rows_d, mut half) = (4 * n_block + 1, 0);
    // The MLP's `[rows, 4d]` buffers: each block's fc, the shared fc_act and (training) its
    // gradient.
    let (mut mlp_f32, mut attention_f32) = (true, true);
    if let Some(inputs) = bf16 {
        // A block's moved buffers, and in training the final norm's output.
        let per_block = if inputs.attention { 3 } else { 2 };
        let moved = per_block * n_block + u128::from(training);
        f32_rows_d -= moved;
        half = moved * r32(rows * d);
        mlp_f32 = false;
        half += (n_block + 1 + u128::from(training)) * r32(rows * 4 * d);
        if training {
            // dy_half: a product's output gradient, or the logits'; the blocks' norms' output
            // gradient.
            half += r32(rows * (4 * d).max(v)) + r32(rows * d);
        }
        if inputs.attention {
            // Q, K, V per block; the output's gradient (Q, K and V's lies in the scratch).
            attention_f32 = false;
            half += n_block * r32(rows * 3 * d);
            if training {
                half += r32(rows * d);
            }
        }
    }
    let qkv_f32 = if attention_f32 { r16(rows * 3 * d) } else { 0 };
    let block = 2 * r16(rows) + qkv_f32 + r16(b * h * t);
    let mut total = n_resid * r16(rows * d) + n_block * block + f32_rows_d * r16(rows * d);
    total += r16(rows) + r16(rows * v) + r16(rows);
    if mlp_f32 {
        total += (n_block + 1 + u128::from(training)) * r16(rows * 4 * d);
    }
    if training {
        // The gradients of the stream and a norm's output; attention's output, Q, K and V.
        total += 2 * r16(rows * d);
        if attention_f32 {
            total += r16(rows * d) + r16(rows * 3 * d);
        }
    }
    (total + r16(attn_scratch), half)
}

/// Bytes of a decoder's own buffers: step buffers for `rows` rows (a prefill chunk), the
/// logits of `batch` rows, the key/value caches of `cache_len` positions (f32 or bf16) and,
/// in bf16, the packed weight matrices and the split copy of a product's input. The products'
/// inputs are counted as f32 even where the backend stores them as bf16 (half the bytes).
pub fn decoder_bytes(
    cfg: &ModelConfig,
    batch: usize,
    rows: usize,
    cache_len: usize,
    precision: crate::backend::Precision,
) -> u128 {
    let r16 = |n: u128| n.div_ceil(16) * 16;
    let (d, v, h, l) = (
        cfg.n_embd as u128,
        cfg.n_vocab as u128,
        cfg.n_head as u128,
        cfg.n_layer as u128,
    );
    let (b, r, t) = (batch as u128, rows as u128, cache_len as u128);
    let draws = crate::backend::DrawSizes {
        rows: batch,
        positions: cfg.n_ctx(),
        width: cfg.n_vocab,
    }
    .bytes();
    let steps = draws
        + 4 * (4 * r16(r * d)
            + 2 * r16(r)
            + r16(r * 3 * d)
            + 2 * r16(r * 4 * d)
            + r16(b * d)
            + r16(b)
            + r16(b * v)
            + r16(b * h * t));
    match precision {
        crate::backend::Precision::F32 => steps + 4 * l * 2 * r16(b * t * d),
        crate::backend::Precision::Bf16 => {
            let r32 = |n: u128| n.div_ceil(32) * 32;
            steps + 2 * l * 2 * r32(b * t * d) + packed_bytes(cfg, rows)
        }
    }
}

/// Bytes of the bf16 inference copies: every weight matrix packed for products, and the split
/// input of the widest product (`[rows, 4d]`: two bf16 parts, rows padded to an even length).
pub fn packed_bytes(cfg: &ModelConfig, rows: usize) -> u128 {
    2 * (packed_matrices(cfg) + 2 * (rows as u128 * 4 * cfg.n_embd as u128 + rows as u128))
}

/// Elements of every weight matrix packed as bf16 (at most: a GPU packs them plainly, the
/// CPU in panels of 16 columns, as counted here), each in a 32-aligned slot.
pub fn packed_matrices(cfg: &ModelConfig) -> u128 {
    let (d, v, l) = (cfg.n_embd as u128, cfg.n_vocab as u128, cfg.n_layer as u128);
    // A packed `[k, n]` matrix holds pairs of rows in panels of 16 columns (the CPU backend's
    // `packed_len`).
    let r16 = |n: u128| n.div_ceil(16) * 16;
    let r32 = |n: u128| n.div_ceil(32) * 32;
    let packed = |k: u128, n: u128| r32(k.div_ceil(2) * 2 * r16(n));
    let block = packed(d, 3 * d) + packed(d, d) + packed(d, 4 * d) + packed(4 * d, d);
    l * block + packed(d, v)
}

/// The engine's own memory: parameters (unless adopted), gradients and both Adam moments when
/// training, activations, and the host buffers of one batch.
pub fn engine(
    cfg: &ModelConfig,
    batch: usize,
    training: bool,
    own_params: bool,
    attn_scratch: u128,
) -> Estimate {
    engine_with(cfg, batch, training, own_params, attn_scratch, None)
}

/// [`engine`], with the activations `bf16` says a GPU's bf16 training keeps as bf16, its
/// packed weights, and where attention stores f32, the scratch its products round that output
/// into (`[rows, d]`).
pub fn engine_with(
    cfg: &ModelConfig,
    batch: usize,
    training: bool,
    own_params: bool,
    attn_scratch: u128,
    bf16: Option<Bf16Inputs>,
) -> Estimate {
    let p = 4 * param_count(cfg);
    let rows = batch as u128 * cfg.side as u128 * cfg.side as u128;
    let e = Estimate::new().add("parameters", if own_params { p } else { 0 }, Scale::Model);
    let e = if training {
        e.add("gradients", p, Scale::Model)
            .add("Adam moments", 2 * p, Scale::Model)
    } else {
        e
    };
    let (floats, mut halves) = activations(cfg, batch, training, attn_scratch, bf16);
    let e = match bf16 {
        None => e,
        Some(inputs) => {
            // The scratch a packed product rounds an f32 input into: attention's output,
            // where attention stores f32 (the engine's `max_packed_input`).
            if !inputs.attention {
                halves += rows * cfg.n_embd as u128;
            }
            e.add("bf16 weights", 2 * packed_matrices(cfg), Scale::Model)
        }
    };
    e.add("activations", 4 * floats + 2 * halves, Scale::Batch)
        // Tokens, targets, loss weights and per-position losses, in the backend and the engine.
        .add("batch buffers", rows * 18, Scale::Batch)
}

/// A training run: the engine with `micro_batch` images per pass, the freshly initialised
/// parameters it is started from, and the buffer a checkpoint is written through.
pub fn training(cfg: &ModelConfig, micro_batch: usize, attn_scratch: u128) -> Estimate {
    engine(cfg, micro_batch, true, true, attn_scratch).add(
        "initial parameters and checkpoint buffer",
        4 * param_count(cfg),
        Scale::Model,
    )
}

/// What the host holds of an engine whose arenas are in a device's own memory (a GPU's, which
/// the engine checks itself when it is built): the host buffers of one batch.
pub fn engine_on_host(cfg: &ModelConfig, batch: usize) -> Estimate {
    let rows = batch as u128 * cfg.side as u128 * cfg.side as u128;
    Estimate::new().add("batch buffers", rows * 18, Scale::Batch)
}

/// [`training`]'s share on the host when the engine is in a device's own memory.
pub fn training_on_host(cfg: &ModelConfig, micro_batch: usize) -> Estimate {
    engine_on_host(cfg, micro_batch).add(
        "initial parameters and checkpoint buffer",
        4 * param_count(cfg),
        Scale::Model,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_is_checked_against_its_own_free_memory() {
        let e = Estimate::new().add("parameters", 5_000_000, Scale::Model);
        // Fits this host, not a device with 1 MB free.
        assert!(e.check("x").is_ok());
        let err = e.check_in("running", Some(1_000_000)).unwrap_err();
        assert_eq!((err.need, err.available), (5_000_000, 1_000_000));
        assert!(e.check_in("running", Some(6_000_000)).is_ok());
    }

    #[test]
    fn a_refusal_names_the_setting_that_does_not_fit() {
        let e = Estimate::new().add("parameters", 100, Scale::Model).add(
            "activations",
            900,
            Scale::Batch,
        );
        assert!(e.check_against("x", 1000).is_ok());
        let err = e.check_against("training", 999).unwrap_err();
        assert_eq!(err.scale, Scale::Batch);
        assert_eq!(err.need, 1000);
        let msg = err.to_string();
        assert!(
            msg.contains("training needs about") && msg.contains("parameters"),
            "{msg}"
        );
        assert_eq!(e.check_against("x", 50).unwrap_err().scale, Scale::Model);
        let c = Estimate::new()
            .add("parameters", 10, Scale::Model)
            .add("images", 500, Scale::Count)
            .add("activations", 100, Scale::Batch);
        assert_eq!(c.check_against("x", 200).unwrap_err().scale, Scale::Count);
    }
}
