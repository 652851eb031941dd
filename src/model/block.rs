//! One transformer block's forward pass, shared by full-sequence passes and by the
//! one-token-at-a-time decoder: only the attention call differs between them.

use super::BlockOffsets;
use crate::backend::{Arena, Backend, Op, View};

/// The buffers one block reads and writes, each `rows` rows wide.
pub(crate) struct BlockIo {
    /// Residual stream in.
    pub x: View,
    pub ln1: View,
    pub rstd1: View,
    pub qkv: View,
    /// Attention output (before its projection).
    pub att: View,
    /// Residual stream after the attention branch.
    pub mid: View,
    pub ln2: View,
    pub rstd2: View,
    /// MLP pre-activation.
    pub fc: View,
    /// MLP activation (scratch).
    pub fc_act: View,
    /// Residual stream out.
    pub out: View,
}

/// `a = x + attn(norm_1(x))`, `out = a + mlp(norm_2(a))`; `attend(backend, qkv, att)` fills
/// the attention output from the projected Q, K, V.
pub(crate) fn block_forward(
    b: &mut dyn Backend,
    po: &BlockOffsets,
    io: &BlockIo,
    rows: usize,
    d: usize,
    attend: impl FnOnce(&mut dyn Backend, View, View),
) {
    let pv = |o: usize, n: usize| View::new(Arena::Params, o, n);
    b.rmsnorm_forward(io.ln1, io.rstd1, io.x, pv(po.ln_1, d), d);
    b.matmul(
        io.qkv,
        io.ln1,
        Op::N,
        pv(po.c_attn, d * 3 * d),
        Op::N,
        rows,
        d,
        3 * d,
        false,
    );
    attend(b, io.qkv, io.att);
    b.copy(io.mid, io.x);
    b.matmul(
        io.mid,
        io.att,
        Op::N,
        pv(po.attn_proj, d * d),
        Op::N,
        rows,
        d,
        d,
        true,
    );
    b.rmsnorm_forward(io.ln2, io.rstd2, io.mid, pv(po.ln_2, d), d);
    b.matmul(
        io.fc,
        io.ln2,
        Op::N,
        pv(po.c_fc, d * 4 * d),
        Op::N,
        rows,
        d,
        4 * d,
        false,
    );
    b.gelu_forward(io.fc_act, io.fc);
    b.copy(io.out, io.mid);
    b.matmul(
        io.out,
        io.fc_act,
        Op::N,
        pv(po.mlp_proj, 4 * d * d),
        Op::N,
        rows,
        4 * d,
        d,
        true,
    );
}

/// The final norm and the output head: `logits = norm_f(x) @ wtet^T` over `rows` rows.
#[allow(clippy::too_many_arguments)]
pub(crate) fn head_forward(
    b: &mut dyn Backend,
    layout: &super::ParamLayout,
    x: View,
    lnf: View,
    rstdf: View,
    logits: View,
    rows: usize,
    d: usize,
    v: usize,
) {
    let pv = |o: usize, n: usize| View::new(Arena::Params, o, n);
    b.rmsnorm_forward(lnf, rstdf, x, pv(layout.ln_f, d), d);
    b.matmul(
        logits,
        lnf,
        Op::N,
        pv(layout.wtet, v * d),
        Op::T,
        rows,
        d,
        v,
        false,
    );
}

/// Backward of `y = x @ W` for the weight at `w` (`[n_in, n_out]`): adds `x^T dy` to its
/// gradient and writes `dx = dy W^T`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_backward(
    b: &mut dyn Backend,
    dx: View,
    w: usize,
    x: View,
    dy: View,
    rows: usize,
    n_in: usize,
    n_out: usize,
) {
    let n = n_in * n_out;
    b.matmul(
        View::new(Arena::Grads, w, n),
        x,
        Op::T,
        dy,
        Op::N,
        n_in,
        rows,
        n_out,
        true,
    );
    b.matmul(
        dx,
        dy,
        Op::N,
        View::new(Arena::Params, w, n),
        Op::T,
        rows,
        n_out,
        n_in,
        false,
    );
}
