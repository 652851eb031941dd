//! Where every parameter lives in the one flat buffer, and how it is initialised.
//!
//! Parameters, gradients and the optimizer's moments all share this layout, so one offset
//! names the same tensor in each of them.

use crate::config::ModelConfig;

/// How a tensor is initialised (REFERENCE.md §3, the official code).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Normal(f32),
    Ones,
    Zeros,
}

/// One named tensor: its place in the flat buffer, its shape, and whether weight decay applies.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub len: usize,
    pub init: Init,
    /// Weight decay applies to matrices only, not to gains or embeddings.
    pub decay: bool,
}

impl TensorSpec {
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len
    }
}

/// Offsets of one transformer block's tensors.
#[derive(Debug, Clone, Copy)]
pub struct BlockOffsets {
    pub ln_1: usize,
    /// `[d, 3d]`, `[in, out]`; columns are Q, K, V, each split into heads contiguously.
    pub c_attn: usize,
    /// `[d, d]`, `[in, out]`.
    pub attn_proj: usize,
    pub ln_2: usize,
    /// `[d, 4d]`, `[in, out]`.
    pub c_fc: usize,
    /// `[4d, d]`, `[in, out]`.
    pub mlp_proj: usize,
}

/// The full parameter layout of a model.
#[derive(Debug, Clone)]
pub struct ParamLayout {
    pub tensors: Vec<TensorSpec>,
    /// `[n_vocab, d]` token embeddings.
    pub wte: usize,
    /// `[n_ctx, d]` position embeddings.
    pub wpe: usize,
    /// `[d]` start-of-sequence vector.
    pub sos: usize,
    pub blocks: Vec<BlockOffsets>,
    /// `[d]` final norm gain.
    pub ln_f: usize,
    /// `[n_vocab, d]` untied output head.
    pub wtet: usize,
    pub total: usize,
}

impl ParamLayout {
    /// Refuses a parameter buffer of `len` floats that is not this layout's.
    pub fn check_len(&self, len: usize) -> anyhow::Result<()> {
        anyhow::ensure!(
            len == self.total,
            "parameter buffer holds {len} floats, the model needs {}",
            self.total
        );
        Ok(())
    }

    pub fn new(cfg: &ModelConfig) -> Self {
        let d = cfg.n_embd;
        let v = cfg.n_vocab;
        let mut tensors = Vec::new();
        let mut offset = 0;
        let mut push = |name: String, shape: Vec<usize>, init: Init, decay: bool| -> usize {
            let len = shape.iter().product();
            let at = offset;
            tensors.push(TensorSpec {
                name,
                shape,
                offset: at,
                len,
                init,
                decay,
            });
            offset += len;
            at
        };
        let qkv_std = 1.0 / (d as f32).sqrt();
        let proj_std = 1.0 / ((d * cfg.n_layer) as f32).sqrt();
        let wte = push("wte".into(), vec![v, d], Init::Normal(0.02), false);
        let wpe = push(
            "wpe".into(),
            vec![cfg.n_ctx(), d],
            Init::Normal(0.01),
            false,
        );
        let sos = push("sos".into(), vec![d], Init::Normal(0.02), false);
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let p = |s: &str| format!("h.{i}.{s}");
            blocks.push(BlockOffsets {
                ln_1: push(p("ln_1.g"), vec![d], Init::Ones, false),
                c_attn: push(
                    p("attn.c_attn.w"),
                    vec![d, 3 * d],
                    Init::Normal(qkv_std),
                    true,
                ),
                attn_proj: push(p("attn.c_proj.w"), vec![d, d], Init::Normal(proj_std), true),
                ln_2: push(p("ln_2.g"), vec![d], Init::Ones, false),
                c_fc: push(p("mlp.c_fc.w"), vec![d, 4 * d], Init::Normal(0.02), true),
                mlp_proj: push(p("mlp.c_proj.w"), vec![4 * d, d], Init::Normal(0.02), true),
            });
        }
        let ln_f = push("ln_f.g".into(), vec![d], Init::Ones, false);
        let wtet = push("wtet".into(), vec![v, d], Init::Zeros, true);
        Self {
            tensors,
            wte,
            wpe,
            sos,
            blocks,
            ln_f,
            wtet,
            total: offset,
        }
    }

    pub fn get(&self, name: &str) -> Option<&TensorSpec> {
        self.tensors.iter().find(|t| t.name == name)
    }
}
