//! The CPU backend: host arenas, `gemm` products, `rayon` threads.

pub mod activation;
pub mod attention;
pub mod embedding;
pub mod loss;
pub mod matmul;
pub mod norm;
pub mod optim;
pub mod simd;

use super::{Arena, ArenaSizes, AttnShape, Backend, Op, View};
use crate::backend::AdamStep;

/// Bytes of memory available to this process (Linux: `MemAvailable`), if known.
fn available_memory() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Host memory for every arena.
#[derive(Default)]
pub struct CpuBackend {
    params: Vec<f32>,
    grads: Vec<f32>,
    adam_m: Vec<f32>,
    adam_v: Vec<f32>,
    acts: Vec<f32>,
    tokens: Vec<u16>,
    n_tokens: usize,
    /// Per-block partial sums of the norm-gain gradient.
    norm_scratch: Vec<f32>,
}

impl CpuBackend {
    pub fn new() -> Self {
        Self::default()
    }

    fn arena(&self, a: Arena) -> &Vec<f32> {
        match a {
            Arena::Params => &self.params,
            Arena::Grads => &self.grads,
            Arena::AdamM => &self.adam_m,
            Arena::AdamV => &self.adam_v,
            Arena::Acts => &self.acts,
        }
    }

    fn base(&mut self, a: Arena) -> *mut f32 {
        match a {
            Arena::Params => self.params.as_mut_ptr(),
            Arena::Grads => self.grads.as_mut_ptr(),
            Arena::AdamM => self.adam_m.as_mut_ptr(),
            Arena::AdamV => self.adam_v.as_mut_ptr(),
            Arena::Acts => self.acts.as_mut_ptr(),
        }
    }

    /// Resolves one output view and several input views to slices.
    ///
    /// Panics (always, not only in debug builds) if a view is out of bounds or the output
    /// overlaps an input: that would be a planning bug, and silently aliasing memory is worse.
    fn io<const N: usize>(&mut self, out: View, inputs: [View; N]) -> (&mut [f32], [&[f32]; N]) {
        for v in inputs.iter().chain(std::iter::once(&out)) {
            let len = self.arena(v.arena).len();
            assert!(
                v.offset + v.len <= len,
                "view {v:?} is outside its arena of {len} floats"
            );
        }
        for v in &inputs {
            assert!(
                !out.overlaps(v),
                "kernel output {out:?} overlaps input {v:?}"
            );
        }
        let ptrs = inputs.map(|v| self.base(v.arena).wrapping_add(v.offset) as *const f32);
        let out_ptr = self.base(out.arena).wrapping_add(out.offset);
        // SAFETY: each view was checked to lie inside its arena; the output overlaps no input,
        // so the one mutable slice aliases none of the shared ones; the arenas are not resized
        // while these borrows (tied to `&mut self`) live.
        unsafe {
            let ins = std::array::from_fn(|i| std::slice::from_raw_parts(ptrs[i], inputs[i].len));
            (std::slice::from_raw_parts_mut(out_ptr, out.len), ins)
        }
    }

    /// Two disjoint outputs and several inputs.
    fn io2<const N: usize>(
        &mut self,
        o1: View,
        o2: View,
        inputs: [View; N],
    ) -> (&mut [f32], &mut [f32], [&[f32]; N]) {
        assert!(
            !o1.overlaps(&o2),
            "kernel outputs {o1:?} and {o2:?} overlap"
        );
        for v in &inputs {
            assert!(!o2.overlaps(v), "kernel output {o2:?} overlaps input {v:?}");
        }
        let len2 = self.arena(o2.arena).len();
        assert!(
            o2.offset + o2.len <= len2,
            "view {o2:?} is outside its arena of {len2} floats"
        );
        let p2 = self.base(o2.arena).wrapping_add(o2.offset);
        let (a, ins) = self.io(o1, inputs);
        // SAFETY: o2 is in bounds, disjoint from o1 and from every input (checked above).
        let b = unsafe { std::slice::from_raw_parts_mut(p2, o2.len) };
        (a, b, ins)
    }

    pub fn tokens(&self) -> &[u16] {
        &self.tokens[..self.n_tokens]
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn allocate(&mut self, s: ArenaSizes) -> anyhow::Result<()> {
        let total = 4 * (s.params + 3 * s.grads + s.acts) + 2 * s.tokens;
        let zeros = |n: usize, what: &str| -> anyhow::Result<Vec<f32>> {
            let mut v = Vec::new();
            v.try_reserve_exact(n).map_err(|_| {
                anyhow::anyhow!(
                    "cannot allocate {:.2} GB for {what} ({:.2} GB planned in all): use a smaller batch \
                     (--micro-batch) or model",
                    n as f64 * 4e-9,
                    total as f64 * 1e-9
                )
            })?;
            v.resize(n, 0.0);
            Ok(v)
        };
        // Release the old arenas first, so re-planning does not need both at once.
        *self = Self::default();
        // With memory overcommit a too-large allocation "succeeds" and the process is killed
        // later; check against what the system says is available instead.
        if let Some(avail) = available_memory() {
            anyhow::ensure!(
                total <= avail,
                "this model and batch need {:.2} GB but only {:.2} GB of memory is available: use a smaller \
                 batch (--micro-batch) or model",
                total as f64 * 1e-9,
                avail as f64 * 1e-9
            );
        }
        self.params = zeros(s.params, "parameters")?;
        self.grads = zeros(s.grads, "gradients")?;
        self.adam_m = zeros(s.grads, "optimizer moments")?;
        self.adam_v = zeros(s.grads, "optimizer moments")?;
        self.acts = zeros(s.acts, "activations")?;
        self.tokens = vec![0; s.tokens];
        self.norm_scratch = zeros(
            norm::rmsnorm_backward_scratch(s.max_rows, s.max_width),
            "scratch",
        )?;
        self.n_tokens = 0;
        Ok(())
    }

    fn bytes(&self) -> usize {
        4 * (self.params.len()
            + self.grads.len()
            + self.adam_m.len()
            + self.adam_v.len()
            + self.acts.len())
            + 2 * self.tokens.len()
    }

    fn upload(&mut self, dst: View, src: &[f32]) {
        assert_eq!(dst.len, src.len(), "upload: size mismatch");
        let (d, []) = self.io(dst, []);
        d.copy_from_slice(src);
    }

    fn download(&self, src: View, dst: &mut [f32]) {
        assert_eq!(src.len, dst.len(), "download: size mismatch");
        dst.copy_from_slice(&self.arena(src.arena)[src.offset..src.offset + src.len]);
    }

    fn fill(&mut self, dst: View, value: f32) {
        let (d, []) = self.io(dst, []);
        d.fill(value);
    }

    fn copy(&mut self, dst: View, src: View) {
        let (d, [s]) = self.io(dst, [src]);
        d.copy_from_slice(s);
    }

    fn set_tokens(&mut self, tokens: &[u16]) {
        assert!(
            tokens.len() <= self.tokens.len(),
            "batch of {} tokens exceeds the planned {}",
            tokens.len(),
            self.tokens.len()
        );
        self.tokens[..tokens.len()].copy_from_slice(tokens);
        self.n_tokens = tokens.len();
    }

    fn embed_forward(&mut self, out: View, wte: View, wpe: View, sos: View, t: usize, d: usize) {
        let toks = std::mem::take(&mut self.tokens);
        let n = self.n_tokens;
        let (o, [wte, wpe, sos]) = self.io(out, [wte, wpe, sos]);
        embedding::embed_forward(o, &toks[..n], wte, wpe, sos, t, d);
        self.tokens = toks;
    }

    fn embed_backward(
        &mut self,
        dwte: View,
        dwpe: View,
        dsos: View,
        dout: View,
        t: usize,
        d: usize,
    ) {
        let toks = std::mem::take(&mut self.tokens);
        let n = self.n_tokens;
        assert!(!dwte.overlaps(&dsos) && !dwpe.overlaps(&dsos));
        let len = self.grads.len();
        assert!(dsos.offset + dsos.len <= len);
        let ps = self.base(dsos.arena).wrapping_add(dsos.offset);
        let (a, b, [g]) = self.io2(dwte, dwpe, [dout]);
        // SAFETY: dsos is in bounds and disjoint from dwte, dwpe (asserted) and from dout
        // (a different arena or checked by io2's caller contract below).
        assert!(!dsos.overlaps(&dout));
        let c = unsafe { std::slice::from_raw_parts_mut(ps, dsos.len) };
        embedding::embed_backward(a, b, c, g, &toks[..n], t, d);
        self.tokens = toks;
    }

    fn rmsnorm_forward(&mut self, out: View, rstd: View, x: View, g: View, d: usize) {
        let (o, r, [x, g]) = self.io2(out, rstd, [x, g]);
        norm::rmsnorm_forward(o, r, x, g, d, 1e-5);
    }

    fn rmsnorm_backward(
        &mut self,
        dx: View,
        dg: View,
        dout: View,
        x: View,
        rstd: View,
        g: View,
        d: usize,
    ) {
        let mut scratch = std::mem::take(&mut self.norm_scratch);
        let (dx, dg, [dout, x, rstd, g]) = self.io2(dx, dg, [dout, x, rstd, g]);
        norm::rmsnorm_backward(dx, dg, dout, x, rstd, g, d, &mut scratch);
        self.norm_scratch = scratch;
    }

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
    ) {
        let (o, [a, b]) = self.io(out, [a, b]);
        matmul::matmul(o, a, ta, b, tb, m, k, n, accumulate);
    }

    fn attention_forward(
        &mut self,
        out: View,
        lse: View,
        qkv: View,
        scratch: View,
        shape: AttnShape,
    ) {
        assert!(!scratch.overlaps(&out) && !scratch.overlaps(&lse) && !scratch.overlaps(&qkv));
        let ps = self.base(scratch.arena).wrapping_add(scratch.offset);
        assert!(scratch.offset + scratch.len <= self.arena(scratch.arena).len());
        let (o, l, [q]) = self.io2(out, lse, [qkv]);
        // SAFETY: scratch is in bounds and disjoint from every other view (asserted above).
        let sc = unsafe { std::slice::from_raw_parts_mut(ps, scratch.len) };
        attention::attention_forward(o, l, q, sc, shape);
    }

    fn attention_backward(
        &mut self,
        dqkv: View,
        dout: View,
        out: View,
        lse: View,
        qkv: View,
        scratch: View,
        shape: AttnShape,
    ) {
        for v in [&dqkv, &dout, &out, &lse, &qkv] {
            assert!(!scratch.overlaps(v), "attention scratch overlaps {v:?}");
        }
        let ps = self.base(scratch.arena).wrapping_add(scratch.offset);
        assert!(scratch.offset + scratch.len <= self.arena(scratch.arena).len());
        let (dq, [dout, out, lse, qkv]) = self.io(dqkv, [dout, out, lse, qkv]);
        // SAFETY: scratch is in bounds and disjoint from every other view (asserted above).
        let sc = unsafe { std::slice::from_raw_parts_mut(ps, scratch.len) };
        attention::attention_backward(dq, dout, out, lse, qkv, sc, shape);
    }

    fn embed_step(&mut self, out: View, wte: View, wpe: View, sos: View, pos: usize, d: usize) {
        let toks = std::mem::take(&mut self.tokens);
        let n = self.n_tokens;
        let (o, [wte, wpe, sos]) = self.io(out, [wte, wpe, sos]);
        embedding::embed_step(o, &toks[..n], wte, wpe, sos, pos, d);
        self.tokens = toks;
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
    ) {
        let views = [out, k_cache, v_cache, qkv, scores];
        for (i, a) in views.iter().enumerate() {
            let len = self.arena(a.arena).len();
            assert!(
                a.offset + a.len <= len,
                "view {a:?} is outside its arena of {len} floats"
            );
            for b in &views[i + 1..] {
                assert!(
                    !a.overlaps(b),
                    "attention step views {a:?} and {b:?} overlap"
                );
            }
        }
        let p = views.map(|v| self.base(v.arena).wrapping_add(v.offset));
        // SAFETY: every view is in bounds and no two overlap (checked above); the arenas are
        // not resized while these slices live.
        let [o, k, v, q, s] =
            unsafe { [0, 1, 2, 3, 4].map(|i| std::slice::from_raw_parts_mut(p[i], views[i].len)) };
        attention::attention_step(
            o,
            k,
            v,
            q,
            s,
            shape.batch,
            shape.n_head,
            shape.head_dim,
            attention::decode_cache_len(shape.t),
            pos,
        );
    }

    fn gelu_forward(&mut self, out: View, x: View) {
        let (o, [x]) = self.io(out, [x]);
        activation::quick_gelu_forward(o, x);
    }

    fn gelu_backward_inplace(&mut self, dout: View, x: View) {
        let (d, [x]) = self.io(dout, [x]);
        activation::quick_gelu_backward_inplace(d, x);
    }

    fn cross_entropy(&mut self, logits: View, losses: View, v: usize, grad_scale: Option<f32>) {
        let toks = std::mem::take(&mut self.tokens);
        let n = self.n_tokens;
        let (z, l, []) = self.io2(logits, losses, []);
        loss::cross_entropy(z, l, &toks[..n], v, grad_scale);
        self.tokens = toks;
    }

    fn sum_squares(&self, x: View) -> f64 {
        optim::sum_squares(&self.arena(x.arena)[x.offset..x.offset + x.len])
    }

    fn adamw(&mut self, params: View, step: AdamStep, decay: bool) {
        assert_eq!(params.arena, Arena::Params);
        let r = params.offset..params.offset + params.len;
        optim::adamw(
            &mut self.params[r.clone()],
            &self.grads[r.clone()],
            &mut self.adam_m[r.clone()],
            &mut self.adam_v[r],
            step,
            decay,
        );
    }
}
