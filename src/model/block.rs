//! One transformer block's forward pass, shared by full-sequence passes and by the
//! one-token-at-a-time decoder: only the attention call differs between them.

use super::ParamLayout;
use crate::backend::{Arena, Backend, DType, Op, View};

/// The buffers one block reads and writes, each `rows` rows wide.
pub(crate) struct BlockIo {
    /// Residual stream in.
    pub x: View,
    pub ln1: View,
    pub rstd1: View,
    pub qkv: View,
    /// Attention output (before its projection).
    pub att: View,
    /// Residual stream after the attention branch. May be `x` itself, and `out` too, where no
    /// backward pass needs the block's input (decoding): the stream then accumulates in place.
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

/// A weight matrix as the forward pass reads it: f32 in the parameter arena (stored as `op`
/// says), or a bfloat16 copy packed by [`Backend::pack_weight`] (once for inference, after
/// every update in training).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Weight {
    F32(View, Op),
    Packed(View),
}

/// `out[rows, n] (+)= x[rows, k] @ w`.
#[allow(clippy::too_many_arguments)]
fn linear(
    b: &mut dyn Backend,
    out: View,
    x: View,
    w: Weight,
    rows: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) {
    match w {
        Weight::F32(w, op) => b.matmul(out, x, Op::N, w, op, rows, k, n, accumulate),
        Weight::Packed(w) => b.matmul_packed(out, x, w, rows, k, n, accumulate),
    }
}

/// `out[rows, n] = addend + x[rows, k] @ w`, in place where `out` is `addend`.
#[allow(clippy::too_many_arguments)]
fn linear_onto(
    b: &mut dyn Backend,
    out: View,
    addend: View,
    x: View,
    w: Weight,
    rows: usize,
    k: usize,
    n: usize,
) {
    if out == addend {
        return linear(b, out, x, w, rows, k, n, true);
    }
    match w {
        Weight::F32(w, op) => b.matmul_onto(out, addend, x, Op::N, w, op, rows, k, n),
        Weight::Packed(w) => b.matmul_packed_onto(out, addend, x, w, rows, k, n),
    }
}

/// One block's parameters for the forward pass.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlockWeights {
    pub ln_1: View,
    pub c_attn: Weight,
    pub attn_proj: Weight,
    pub ln_2: View,
    pub c_fc: Weight,
    pub mlp_proj: Weight,
}

/// The weights the forward pass reads, in f32 or with every matrix packed as bfloat16.
pub(crate) struct Weights {
    pub blocks: Vec<BlockWeights>,
    pub ln_f: View,
    /// The output head `wtet` (`[n_vocab, d]`, read transposed).
    pub head: Weight,
}

/// A weight to pack: destination, f32 source, its layout, and its `[k, n]` shape.
pub(crate) struct PackJob {
    dst: View,
    src: View,
    op: Op,
    k: usize,
    n: usize,
}

impl Weights {
    /// Every weight read in f32 from the parameter arena.
    pub fn f32(layout: &ParamLayout, d: usize, v: usize) -> Self {
        Self::plan(layout, d, v, |src, op, _, _| Weight::F32(src, op))
    }

    /// Every matrix packed as bfloat16 into [`Arena::Half`] from `*half_used` on (which
    /// advances); returns the weights and the packing to run once the parameters are in place.
    pub fn packed(
        layout: &ParamLayout,
        d: usize,
        v: usize,
        backend: &dyn Backend,
        half_used: &mut usize,
    ) -> (Self, Vec<PackJob>) {
        let mut jobs = Vec::new();
        let weights = Self::plan(layout, d, v, |src, op, k, n| {
            let len = backend.packed_len(k, n);
            let dst = View::bf16(*half_used, len);
            *half_used += len.next_multiple_of(32);
            jobs.push(PackJob { dst, src, op, k, n });
            Weight::Packed(dst)
        });
        (weights, jobs)
    }

    /// Runs the packing planned by [`Weights::packed`].
    pub fn pack(b: &mut dyn Backend, jobs: &[PackJob]) {
        for j in jobs {
            b.pack_weight(j.dst, j.src, j.op, j.k, j.n);
        }
    }

    /// `matrix(source, op, k, n)` decides how each `[k, n]` matrix is read.
    fn plan(
        layout: &ParamLayout,
        d: usize,
        v: usize,
        mut matrix: impl FnMut(View, Op, usize, usize) -> Weight,
    ) -> Self {
        let pv = |o: usize, n: usize| View::new(Arena::Params, o, n);
        let blocks = layout
            .blocks
            .iter()
            .map(|po| BlockWeights {
                ln_1: pv(po.ln_1, d),
                c_attn: matrix(pv(po.c_attn, d * 3 * d), Op::N, d, 3 * d),
                attn_proj: matrix(pv(po.attn_proj, d * d), Op::N, d, d),
                ln_2: pv(po.ln_2, d),
                c_fc: matrix(pv(po.c_fc, d * 4 * d), Op::N, d, 4 * d),
                mlp_proj: matrix(pv(po.mlp_proj, 4 * d * d), Op::N, 4 * d, d),
            })
            .collect();
        let head = matrix(pv(layout.wtet, v * d), Op::T, d, v);
        Self {
            blocks,
            ln_f: pv(layout.ln_f, d),
            head,
        }
    }
}

/// `a = x + attn(norm_1(x))`, `out = a + mlp(norm_2(a))`; `attend(backend, qkv, att)` fills
/// the attention output from the projected Q, K, V.
pub(crate) fn block_forward(
    b: &mut dyn Backend,
    w: &BlockWeights,
    io: &BlockIo,
    rows: usize,
    d: usize,
    attend: impl FnOnce(&mut dyn Backend, View, View),
) {
    b.rmsnorm_forward(io.ln1, io.rstd1, io.x, w.ln_1, d);
    linear(b, io.qkv, io.ln1, w.c_attn, rows, d, 3 * d, false);
    attend(b, io.qkv, io.att);
    linear_onto(b, io.mid, io.x, io.att, w.attn_proj, rows, d, d);
    b.rmsnorm_forward(io.ln2, io.rstd2, io.mid, w.ln_2, d);
    linear(b, io.fc, io.ln2, w.c_fc, rows, d, 4 * d, false);
    b.gelu_forward(io.fc_act, io.fc);
    linear_onto(b, io.out, io.mid, io.fc_act, w.mlp_proj, rows, 4 * d, d);
}

/// The final norm and the output head: `logits = norm_f(x) @ wtet^T` over `rows` rows.
#[allow(clippy::too_many_arguments)]
pub(crate) fn head_forward(
    b: &mut dyn Backend,
    w: &Weights,
    x: View,
    lnf: View,
    rstdf: View,
    logits: View,
    rows: usize,
    d: usize,
    v: usize,
) {
    b.rmsnorm_forward(lnf, rstdf, x, w.ln_f, d);
    linear(b, logits, lnf, w.head, rows, d, v, false);
}

/// Backward of [`head_forward`]'s product for the head at `wtet` (`[v, d]`, read by the
/// forward pass as `read`): adds `dlogits^T lnf` to its gradient and writes `dx = dlogits wtet`
/// (adds it where `accumulate`). Where `lnf` is bfloat16 (training's bf16 products), so is
/// `dlogits`, and `dx` reads the packed head; otherwise all three are f32.
pub(crate) fn head_backward(
    b: &mut dyn Backend,
    (wtet, read): (usize, Weight),
    dx: View,
    dlogits: View,
    lnf: View,
    (rows, d, v): (usize, usize, usize),
    accumulate: bool,
) {
    let grad = View::new(Arena::Grads, wtet, v * d);
    match (lnf.dtype, read) {
        (DType::F32, _) => {
            let w = View::new(Arena::Params, wtet, v * d);
            b.matmul(dx, dlogits, Op::N, w, Op::N, rows, v, d, accumulate);
        }
        (DType::Bf16, Weight::Packed(packed)) => {
            assert_eq!(dlogits.dtype, DType::Bf16, "head_backward: {dlogits:?}");
            // Packed `[d, v]` plainly, row-major, by a backend that rounds packed inputs.
            b.matmul(dx, dlogits, Op::N, packed, Op::T, rows, v, d, accumulate);
        }
        _ => panic!("head_backward: a bf16 input {lnf:?} needs a packed head"),
    }
    b.matmul(grad, dlogits, Op::T, lnf, Op::N, v, rows, d, true);
}

/// Backward of `y = x @ W` for the weight at `w` (`[n_in, n_out]`, read by the forward pass
/// as `read`): adds `x^T dy` to its gradient and writes `dx = dy W^T`. Where `x` is bfloat16
/// (stored so for the forward product, whose weight is then packed), both products read
/// bfloat16 operands: `dy` as given if bfloat16, else rounded once into `dy_half`. Otherwise
/// both read f32 ones.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_backward(
    b: &mut dyn Backend,
    dx: View,
    (w, read): (usize, Weight),
    x: View,
    dy: View,
    dy_half: Option<View>,
    rows: usize,
    n_in: usize,
    n_out: usize,
) {
    let n = n_in * n_out;
    let grad = View::new(Arena::Grads, w, n);
    match (x.dtype, read) {
        (DType::F32, _) => {
            b.matmul(grad, x, Op::T, dy, Op::N, n_in, rows, n_out, true);
            let w = View::new(Arena::Params, w, n);
            b.matmul(dx, dy, Op::N, w, Op::T, rows, n_out, n_in, false);
        }
        (DType::Bf16, Weight::Packed(packed)) => {
            let dy = match (dy.dtype, dy_half) {
                (DType::Bf16, _) => dy,
                (DType::F32, Some(half)) => {
                    assert!(rows * n_out <= half.len, "dy_half holds {half:?}");
                    let rounded = View {
                        len: rows * n_out,
                        ..half
                    };
                    b.round_to_bf16(rounded, dy);
                    rounded
                }
                (DType::F32, None) => panic!("linear_backward: f32 {dy:?} and no dy_half"),
            };
            b.matmul(grad, x, Op::T, dy, Op::N, n_in, rows, n_out, true);
            // A backend that rounds packed inputs packs `[n_in, n_out]` plainly, row-major.
            b.matmul(dx, dy, Op::N, packed, Op::T, rows, n_out, n_in, false);
        }
        _ => panic!("linear_backward: a bf16 input {x:?} needs a packed weight"),
    }
}
