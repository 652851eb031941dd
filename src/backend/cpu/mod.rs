//! The CPU backend: host arenas, `gemm` products, `rayon` threads.

pub mod activation;
pub mod attention;
pub mod bf16;
pub mod embedding;
pub mod loss;
pub mod matmul;
pub mod norm;
pub mod optim;
pub mod simd;

use super::{Arena, ArenaSizes, AttnShape, Backend, DType, LogitGradient, Op, Update, View};

/// Bytes of memory available to this process (Linux: `MemAvailable`), if known.
fn available_memory() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Elements of the bf16 split of the largest packed product's input (high and low parts, rows
/// padded to an even length), as [`bf16::matmul`] needs it.
pub(crate) fn packed_input_len(s: &ArenaSizes) -> usize {
    if s.max_packed_input > 0 {
        2 * (s.max_packed_input + s.max_rows)
    } else {
        0
    }
}

/// `n` zeros, or an error naming `what` (and the `total` bytes planned) if the memory is not
/// there.
fn zeroed<T: Clone + Default>(n: usize, what: &str, total: usize) -> anyhow::Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| {
        anyhow::anyhow!(
            "cannot allocate {:.2} GB for {what} ({:.2} GB planned in all): use fewer images \
             per forward pass or a smaller model",
            (n * std::mem::size_of::<T>()) as f64 * 1e-9,
            total as f64 * 1e-9
        )
    })?;
    v.resize(n, T::default());
    Ok(v)
}

/// Host memory for every arena.
#[derive(Default)]
pub struct CpuBackend {
    params: Vec<f32>,
    grads: Vec<f32>,
    adam_m: Vec<f32>,
    adam_v: Vec<f32>,
    acts: Vec<f32>,
    /// bfloat16 bits: packed weights and 16-bit caches.
    half: Vec<u16>,
    /// The bf16 copy of a packed product's input.
    packed_input: Vec<u16>,
    tokens: Vec<u16>,
    n_tokens: usize,
    /// Separate targets and loss weights (masked-objective training), when set.
    targets: Vec<u16>,
    weights: Vec<f32>,
    weighted: bool,
    /// Per-block partial sums of the norm-gain gradient.
    norm_scratch: Vec<f32>,
    /// The step [`Backend::clipped_update`] takes, and the norm it last measured.
    update: Option<Update>,
    update_grad_norm: f64,
    /// [`Backend::set_draws`]'s options and numbers (`[rows, positions]`), and the tokens
    /// drawn (`[positions, rows]`).
    draws: crate::backend::DrawSizes,
    draw_options: Vec<crate::sample::SampleOptions>,
    draw_numbers: Vec<f32>,
    drawn: Vec<u16>,
    /// One step's draws, before they are stored.
    step_draws: Vec<u16>,
    /// f32 values on their way to or from a bfloat16 view (outputs stored as bf16, bf16
    /// inputs of a packed product).
    staging: Vec<f32>,
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
            Arena::Half => panic!("the half arena holds bf16, not f32"),
        }
    }

    /// A bfloat16 view's bounds-checked range in [`Arena::Half`].
    fn half_range(&self, v: View) -> std::ops::Range<usize> {
        assert!(
            v.arena == Arena::Half && v.dtype == DType::Bf16,
            "expected a bf16 view of the half arena, got {v:?}"
        );
        assert!(
            v.offset + v.len <= self.half.len(),
            "view {v:?} is outside the half arena of {} elements",
            self.half.len()
        );
        v.offset..v.offset + v.len
    }

    fn base(&mut self, a: Arena) -> *mut f32 {
        match a {
            Arena::Params => self.params.as_mut_ptr(),
            Arena::Grads => self.grads.as_mut_ptr(),
            Arena::AdamM => self.adam_m.as_mut_ptr(),
            Arena::AdamV => self.adam_v.as_mut_ptr(),
            Arena::Acts => self.acts.as_mut_ptr(),
            Arena::Half => panic!("the half arena holds bf16, not f32"),
        }
    }

    /// A view read in place; panics on a planning bug, as [`CpuBackend::views`] does.
    fn slice(&self, v: View) -> &[f32] {
        assert_eq!(v.dtype, DType::F32, "the CPU arenas hold f32, not {v:?}");
        &self.arena(v.arena)[v.offset..v.offset + v.len]
    }

    /// Resolves output views (written) and input views (read) to slices.
    ///
    /// Panics (always, not only in debug builds) if a view is out of bounds, two outputs
    /// overlap, or an output overlaps an input: that would be a planning bug, and silently
    /// aliasing memory is worse.
    fn views<const O: usize, const I: usize>(
        &mut self,
        outs: [View; O],
        ins: [View; I],
    ) -> ([&mut [f32]; O], [&[f32]; I]) {
        for v in outs.iter().chain(&ins) {
            assert_eq!(v.dtype, DType::F32, "the CPU arenas hold f32, not {v:?}");
            let len = self.arena(v.arena).len();
            assert!(
                v.offset + v.len <= len,
                "view {v:?} is outside its arena of {len} floats"
            );
        }
        for (k, o) in outs.iter().enumerate() {
            for other in outs[k + 1..].iter().chain(&ins) {
                assert!(!o.overlaps(other), "kernel output {o:?} overlaps {other:?}");
            }
        }
        let out_ptrs = outs.map(|v| self.base(v.arena).wrapping_add(v.offset));
        let in_ptrs = ins.map(|v| self.base(v.arena).wrapping_add(v.offset) as *const f32);
        // SAFETY: every view lies inside its arena; no output overlaps another output or any
        // input, so the mutable slices alias nothing; the arenas are not resized while these
        // borrows (tied to `&mut self`) live.
        unsafe {
            (
                std::array::from_fn(|k| std::slice::from_raw_parts_mut(out_ptrs[k], outs[k].len)),
                std::array::from_fn(|k| std::slice::from_raw_parts(in_ptrs[k], ins[k].len)),
            )
        }
    }

    /// One output and several inputs.
    fn io<const N: usize>(&mut self, out: View, inputs: [View; N]) -> (&mut [f32], [&[f32]; N]) {
        let ([o], ins) = self.views([out], inputs);
        (o, ins)
    }

    /// A copy of `v` as f32 (exact for bf16), for the calls off this backend's own paths.
    fn widened(&self, v: View) -> Vec<f32> {
        let mut x = vec![0.0; v.len];
        self.download(v, &mut x);
        x
    }

    /// Runs `kernel` on an f32 output of `out.len` values and stores them, rounded, in `out`,
    /// a bfloat16 view. The staging buffer grows once, to the largest such output.
    fn stored_as_bf16(&mut self, out: View, kernel: impl FnOnce(&mut Self, &mut [f32])) {
        let range = self.half_range(out);
        let mut staged = std::mem::take(&mut self.staging);
        if staged.len() < out.len {
            staged.resize(out.len, 0.0);
        }
        kernel(self, &mut staged[..out.len]);
        for (h, &x) in self.half[range].iter_mut().zip(&staged) {
            *h = bf16::to_bf16(x);
        }
        self.staging = staged;
    }

    /// [`Backend::attention_step`] into `staged` (an output on its way to a bf16 view) or,
    /// where None, into `out`.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &mut self,
        staged: Option<&mut [f32]>,
        out: View,
        k_cache: View,
        v_cache: View,
        qkv: View,
        scores: View,
        shape: AttnShape,
        pos: usize,
        len: usize,
    ) {
        let n_ctx = attention::decode_cache_len(shape.t);
        let (batch, nh, hd) = (shape.batch, shape.n_head, shape.head_dim);
        if k_cache.dtype != DType::Bf16 {
            match staged {
                Some(o) => {
                    let ([k, v, s], [q]) = self.views([k_cache, v_cache, scores], [qkv]);
                    attention::attention_step(o, k, v, q, s, batch, nh, hd, n_ctx, pos, len);
                }
                None => {
                    let ([o, k, v, s], [q]) = self.views([out, k_cache, v_cache, scores], [qkv]);
                    attention::attention_step(o, k, v, q, s, batch, nh, hd, n_ctx, pos, len);
                }
            }
            return;
        }
        let (kr, vr) = (self.half_range(k_cache), self.half_range(v_cache));
        assert!(
            kr.end <= vr.start || vr.end <= kr.start,
            "the K and V caches overlap"
        );
        let mut half = std::mem::take(&mut self.half);
        let (kc, vc) = if kr.start < vr.start {
            let (lo, hi) = half.split_at_mut(vr.start);
            (&mut lo[kr], &mut hi[..vr.len()])
        } else {
            let (lo, hi) = half.split_at_mut(kr.start);
            (&mut hi[..kr.len()], &mut lo[vr])
        };
        match staged {
            Some(o) => {
                let ([s], [q]) = self.views([scores], [qkv]);
                attention::attention_step(o, kc, vc, q, s, batch, nh, hd, n_ctx, pos, len);
            }
            None => {
                let ([o, s], [q]) = self.views([out, scores], [qkv]);
                attention::attention_step(o, kc, vc, q, s, batch, nh, hd, n_ctx, pos, len);
            }
        }
        self.half = half;
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn attention_scratch_len(&self, shape: AttnShape) -> usize {
        // One set of tiles per worker thread of the pool the kernels will run on.
        shape.scratch_len(rayon::current_num_threads())
    }

    fn decode_cache_len(&self, n_ctx: usize) -> usize {
        attention::decode_cache_len(n_ctx)
    }

    fn native_bf16(&self) -> bool {
        bf16::native()
    }

    fn packed_len(&self, k: usize, n: usize) -> usize {
        bf16::packed_len(k, n)
    }

    fn attention_stores_bf16(&self, _shape: AttnShape) -> bool {
        true
    }

    fn adopt_params(&mut self, params: Vec<f32>) -> anyhow::Result<()> {
        self.params = params;
        Ok(())
    }

    fn release_params(&mut self, len: usize) -> Vec<f32> {
        let mut p = std::mem::take(&mut self.params);
        p.truncate(len);
        p
    }

    fn allocate(&mut self, s: ArenaSizes) -> anyhow::Result<()> {
        let total =
            4 * (s.params + 3 * s.grads + s.acts) + 2 * (s.tokens + s.half + packed_input_len(&s));
        let zeros = |n: usize, what: &str| zeroed(n, what, total);
        // Release the old arenas first, so re-planning does not need both at once.
        *self = Self::default();
        // With memory overcommit a too-large allocation "succeeds" and the process is killed
        // later; check against what the system says is available instead.
        if let Some(avail) = available_memory() {
            anyhow::ensure!(
                total <= avail,
                "this model and batch need {:.2} GB but only {:.2} GB of memory is available: use \
                 fewer images per forward pass or a smaller model",
                total as f64 * 1e-9,
                avail as f64 * 1e-9
            );
        }
        self.params = zeros(s.params, "parameters")?;
        self.grads = zeros(s.grads, "gradients")?;
        self.adam_m = zeros(s.grads, "optimizer moments")?;
        self.adam_v = zeros(s.grads, "optimizer moments")?;
        self.acts = zeros(s.acts, "activations")?;
        self.half = zeroed(s.half, "16-bit weights and caches", total)?;
        self.packed_input = zeroed(packed_input_len(&s), "scratch", total)?;
        self.tokens = vec![0; s.tokens];
        self.targets = vec![0; s.tokens];
        self.weights = zeros(s.tokens, "loss weights")?;
        self.norm_scratch = zeros(
            norm::rmsnorm_backward_scratch(s.max_rows, s.max_width),
            "scratch",
        )?;
        self.draws = s.draws;
        self.draw_numbers = Vec::with_capacity(s.draws.rows * s.draws.positions);
        self.draw_options = Vec::with_capacity(s.draws.rows);
        self.drawn = vec![0; s.draws.positions * s.draws.rows];
        self.step_draws = Vec::with_capacity(s.draws.rows);
        self.n_tokens = 0;
        Ok(())
    }

    fn upload(&mut self, dst: View, src: &[f32]) {
        assert_eq!(dst.len, src.len(), "upload: size mismatch");
        if dst.dtype == DType::Bf16 {
            let r = self.half_range(dst);
            for (h, &x) in self.half[r].iter_mut().zip(src) {
                *h = bf16::to_bf16(x);
            }
            return;
        }
        let (d, []) = self.io(dst, []);
        d.copy_from_slice(src);
    }

    fn download(&self, src: View, dst: &mut [f32]) {
        assert_eq!(src.len, dst.len(), "download: size mismatch");
        if src.dtype == DType::Bf16 {
            for (x, &h) in dst.iter_mut().zip(&self.half[self.half_range(src)]) {
                *x = bf16::from_bf16(h);
            }
            return;
        }
        dst.copy_from_slice(self.slice(src));
    }

    fn fill(&mut self, dst: View, value: f32) {
        if dst.dtype == DType::Bf16 {
            let r = self.half_range(dst);
            self.half[r].fill(bf16::to_bf16(value));
            return;
        }
        let (d, []) = self.io(dst, []);
        d.fill(value);
    }

    fn copy(&mut self, dst: View, src: View) {
        if dst.dtype == DType::Bf16 || src.dtype == DType::Bf16 {
            let (d, s) = (self.half_range(dst), self.half_range(src));
            assert!(
                d.len() == s.len() && !dst.overlaps(&src),
                "copy: {src:?} does not fit {dst:?}"
            );
            self.half.copy_within(s, d.start);
            return;
        }
        let (d, [s]) = self.io(dst, [src]);
        d.copy_from_slice(s);
    }

    fn round_to_bf16(&mut self, dst: View, src: View) {
        assert_eq!(
            dst.len, src.len,
            "round_to_bf16: {src:?} does not fit {dst:?}"
        );
        self.stored_as_bf16(dst, |b, out| {
            let ([], [s]) = b.views([], [src]);
            out.copy_from_slice(s);
        });
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
        self.weighted = false;
    }

    fn set_draws(&mut self, options: &[crate::sample::SampleOptions], numbers: &[f32]) {
        self.draws.check_fits(options.len(), numbers.len());
        self.draw_options.clear();
        self.draw_options.extend_from_slice(options);
        self.draw_numbers.clear();
        self.draw_numbers.extend_from_slice(numbers);
    }

    fn draw_tokens(&mut self, logits: View, v: usize, pos: usize) {
        let rows = self.draw_options.len();
        assert!(
            logits.len == rows * v && pos < self.draws.positions && rows <= self.tokens.len(),
            "draw_tokens: {logits:?} is not {rows} rows of {v} at a planned position ({pos})"
        );
        let mut step = std::mem::take(&mut self.step_draws);
        let z = self.slice(logits);
        let (options, numbers, t) = (&self.draw_options, &self.draw_numbers, self.draws.positions);
        let draw = |r: usize, scratch: &mut crate::sample::SampleScratch| {
            let row = &z[r * v..(r + 1) * v];
            crate::sample::choose_token(row, &options[r], numbers[r * t + pos], scratch)
        };
        crate::sample::for_each_row(rows, draw, &mut step);
        self.tokens[..rows].copy_from_slice(&step);
        self.drawn[pos * rows..(pos + 1) * rows].copy_from_slice(&step);
        self.step_draws = step;
        self.n_tokens = rows;
        self.weighted = false;
    }

    fn drawn_tokens(&self, from: usize, to: usize, out: &mut [u16]) {
        let at = self
            .draws
            .drawn_range(self.draw_options.len(), from, to, out.len());
        out.copy_from_slice(&self.drawn[at]);
    }

    fn embed_forward(
        &mut self,
        out: View,
        wte: View,
        wpe: View,
        sos: View,
        t: usize,
        d: usize,
        direct: bool,
    ) {
        // The ids move out for the call, since the views borrow the backend mutably.
        let toks = std::mem::take(&mut self.tokens);
        let ids = &toks[..self.n_tokens];
        let (o, [wte, wpe, sos]) = self.io(out, [wte, wpe, sos]);
        if direct {
            embedding::embed_direct(o, ids, wte, wpe, sos, t, d);
        } else {
            embedding::embed_forward(o, ids, wte, wpe, sos, t, d);
        }
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
        direct: bool,
    ) {
        let toks = std::mem::take(&mut self.tokens);
        let ids = &toks[..self.n_tokens];
        let ([a, b, c], [g]) = self.views([dwte, dwpe, dsos], [dout]);
        if direct {
            embedding::embed_direct_backward(a, b, c, g, ids, t, d);
        } else {
            embedding::embed_backward(a, b, c, g, ids, t, d);
        }
        self.tokens = toks;
    }

    fn set_targets(&mut self, targets: &[u16], weights: &[f32]) {
        assert!(targets.len() == self.n_tokens && weights.len() == self.n_tokens);
        self.targets[..targets.len()].copy_from_slice(targets);
        self.weights[..weights.len()].copy_from_slice(weights);
        self.weighted = true;
    }

    fn rmsnorm_forward(&mut self, out: View, rstd: View, x: View, g: View, d: usize) {
        if out.dtype == DType::Bf16 {
            return self.stored_as_bf16(out, |b, o| {
                let ([r], [x, g]) = b.views([rstd], [x, g]);
                norm::rmsnorm_forward(o, r, x, g, d, 1e-5);
            });
        }
        let ([o, r], [x, g]) = self.views([out, rstd], [x, g]);
        norm::rmsnorm_forward(o, r, x, g, d, 1e-5);
    }

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
    ) {
        let mut scratch = std::mem::take(&mut self.norm_scratch);
        if dout.dtype == DType::Bf16 {
            // Off the CPU's own paths: through an f32 copy of the gradient.
            let dout = self.widened(dout);
            let ([gx, gg], [x, rstd, g]) = self.views([dx, dg], [x, rstd, g]);
            norm::rmsnorm_backward(gx, gg, &dout, x, rstd, g, d, &mut scratch);
        } else {
            let ([gx, gg], [dout, x, rstd, g]) = self.views([dx, dg], [dout, x, rstd, g]);
            norm::rmsnorm_backward(gx, gg, dout, x, rstd, g, d, &mut scratch);
        }
        self.norm_scratch = scratch;
        if let Some(rounded) = dx_rounded {
            self.round_to_bf16(rounded, dx);
        }
    }

    fn pack_weight(&mut self, dst: View, w: View, op: Op, k: usize, n: usize) {
        let r = self.half_range(dst);
        let mut half = std::mem::take(&mut self.half);
        bf16::pack(&mut half[r], self.slice(w), op, k, n);
        self.half = half;
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
        if out.dtype == DType::Bf16 {
            // Off this backend's own paths (a GPU's training stores Q, K, V so): into an f32
            // copy, rounded once as `upload` stores it.
            assert!(!accumulate, "matmul_packed: accumulating into bf16 {out:?}");
            let mut product = vec![0.0; out.len];
            let r = self.half_range(w);
            let mut scratch = std::mem::take(&mut self.packed_input);
            let a = self.widened(a);
            let native = bf16::native();
            bf16::matmul(
                &mut product,
                &a,
                &self.half[r],
                &mut scratch,
                m,
                k,
                n,
                false,
                native,
            );
            self.packed_input = scratch;
            return self.upload(out, &product);
        }
        let r = self.half_range(w);
        // A bf16 input is widened exactly; the product then splits it into itself and a zero
        // remainder.
        let mut widened = std::mem::take(&mut self.staging);
        let bf16_input = a.dtype == DType::Bf16;
        if bf16_input {
            let range = self.half_range(a);
            widened.clear();
            widened.extend(self.half[range].iter().map(|&h| bf16::from_bf16(h)));
        }
        let (half, mut scratch) = (
            std::mem::take(&mut self.half),
            std::mem::take(&mut self.packed_input),
        );
        let (o, a) = if bf16_input {
            let ([o], []) = self.views([out], []);
            (o, &widened[..])
        } else {
            let (o, [a]) = self.io(out, [a]);
            (o, a)
        };
        bf16::matmul(
            o,
            a,
            &half[r],
            &mut scratch,
            m,
            k,
            n,
            accumulate,
            bf16::native(),
        );
        self.half = half;
        self.packed_input = scratch;
        self.staging = widened;
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
        if a.dtype == DType::Bf16 || b.dtype == DType::Bf16 {
            assert!(
                a.dtype == b.dtype,
                "matmul: operands of two types ({a:?}, {b:?})"
            );
            // Off every path of this backend's own (its packed products read bfloat16 in
            // their layout): the operands widened, exactly, then multiplied in f32; a bf16
            // result rounded once.
            let (a, b) = (self.widened(a), self.widened(b));
            if out.dtype == DType::Bf16 {
                assert!(!accumulate, "matmul: accumulating into bf16 {out:?}");
                let mut product = vec![0.0; out.len];
                matmul::matmul(&mut product, &a, ta, &b, tb, m, k, n, false);
                return self.upload(out, &product);
            }
            let (o, []) = self.io(out, []);
            return matmul::matmul(o, &a, ta, &b, tb, m, k, n, accumulate);
        }
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
        if out.dtype == DType::Bf16 || qkv.dtype == DType::Bf16 {
            // Off this backend's own paths (a GPU's training stores these as bf16): through
            // f32 copies, the output rounded as `upload` stores it.
            let q = self.widened(qkv);
            let mut o = vec![0.0; out.len];
            let ([l, sc], []) = self.views([lse, scratch], []);
            attention::attention_forward(&mut o, l, &q, sc, shape);
            return self.upload(out, &o);
        }
        let ([o, l, sc], [q]) = self.views([out, lse, scratch], [qkv]);
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
        let views = [dqkv, dout, out, qkv];
        if views.iter().any(|v| v.dtype == DType::Bf16) {
            // Off this backend's own paths (a GPU's training stores these as bf16): through
            // f32 copies, the gradient rounded as `upload` stores it.
            let [dout, out, qkv] = [dout, out, qkv].map(|v| self.widened(v));
            let mut gradient = vec![0.0; dqkv.len];
            let ([sc], [lse]) = self.views([scratch], [lse]);
            attention::attention_backward(&mut gradient, &dout, &out, lse, &qkv, sc, shape);
            return self.upload(dqkv, &gradient);
        }
        let ([dq, sc], [dout, out, lse, qkv]) = self.views([dqkv, scratch], [dout, out, lse, qkv]);
        attention::attention_backward(dq, dout, out, lse, qkv, sc, shape);
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
        let toks = std::mem::take(&mut self.tokens);
        let n = self.n_tokens;
        let (o, [wte, wpe, sos]) = self.io(out, [wte, wpe, sos]);
        embedding::embed_step(o, &toks[..n], wte, wpe, sos, pos, len, d);
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
        len: usize,
    ) {
        if out.dtype == DType::Bf16 {
            assert!(
                !(out.overlaps(&k_cache) || out.overlaps(&v_cache)),
                "the output overlaps a cache"
            );
            return self.stored_as_bf16(out, |b, o| {
                b.attend(Some(o), out, k_cache, v_cache, qkv, scores, shape, pos, len)
            });
        }
        self.attend(None, out, k_cache, v_cache, qkv, scores, shape, pos, len);
    }

    fn gelu_forward(&mut self, out: View, x: View) {
        if x.dtype == DType::Bf16 {
            // Off the CPU's own paths: through an f32 copy of the input.
            assert_eq!(
                out.dtype,
                DType::Bf16,
                "gelu_forward: bf16 {x:?} into {out:?}"
            );
            let x = self.widened(x);
            return self.stored_as_bf16(out, |_, o| activation::quick_gelu_forward(o, &x));
        }
        if out.dtype == DType::Bf16 {
            return self.stored_as_bf16(out, |b, o| {
                let ([], [x]) = b.views([], [x]);
                activation::quick_gelu_forward(o, x);
            });
        }
        let (o, [x]) = self.io(out, [x]);
        activation::quick_gelu_forward(o, x);
    }

    fn gelu_backward(&mut self, dx: View, dout: View, x: View) {
        let gradient = |dx: &mut [f32], [dout, x]: [&[f32]; 2]| {
            dx.copy_from_slice(dout);
            activation::quick_gelu_backward_inplace(dx, x);
        };
        if x.dtype == DType::Bf16 {
            // Off the CPU's own paths: through f32 copies of the inputs (in place too).
            assert!(
                dout.dtype == DType::Bf16 && dx.dtype == DType::Bf16,
                "gelu_backward: bf16 {x:?} with {dout:?} into {dx:?}"
            );
            let (dout, x) = (self.widened(dout), self.widened(x));
            return self.stored_as_bf16(dx, |_, out| gradient(out, [&dout, &x]));
        }
        if dx == dout {
            let (d, [x]) = self.io(dout, [x]);
            return activation::quick_gelu_backward_inplace(d, x);
        }
        if dx.dtype == DType::Bf16 {
            return self.stored_as_bf16(dx, |b, out| gradient(out, b.views([], [dout, x]).1));
        }
        let (d, inputs) = self.io(dx, [dout, x]);
        gradient(d, inputs);
    }

    fn cross_entropy(
        &mut self,
        logits: View,
        losses: View,
        v: usize,
        gradient: Option<LogitGradient>,
    ) {
        let n = self.n_tokens;
        let tokens = std::mem::take(&mut self.tokens);
        let targets = std::mem::take(&mut self.targets);
        let weights = std::mem::take(&mut self.weights);
        let weighted = self.weighted.then(|| (&targets[..n], &weights[..n]));
        let loss = |z: &mut [f32], l: &mut [f32], scale| match weighted {
            Some((t, w)) => loss::cross_entropy_weighted(z, l, t, w, v, scale),
            None => loss::cross_entropy(z, l, &tokens[..n], v, scale),
        };
        match gradient {
            Some(g) if g.out != logits => {
                assert!(
                    g.out.dtype == DType::Bf16 && g.out.len == logits.len,
                    "cross_entropy: a gradient apart from {logits:?} is bf16 of its length, \
                     not {:?}",
                    g.out
                );
                // Off the CPU's own training path: the gradient of a copy of the logits,
                // stored rounded.
                self.stored_as_bf16(g.out, |b, staged| {
                    staged.copy_from_slice(b.slice(logits));
                    let ([l], []) = b.views([losses], []);
                    loss(staged, l, Some(g.scale));
                });
            }
            _ => {
                let ([z, l], []) = self.views([logits, losses], []);
                loss(z, l, gradient.map(|g| g.scale));
            }
        }
        self.tokens = tokens;
        self.targets = targets;
        self.weights = weights;
    }

    fn sum_squares(&self, x: View) -> f64 {
        optim::sum_squares(self.slice(x))
    }

    fn set_update(&mut self, update: Update) {
        self.update = Some(update);
    }

    fn clipped_update(&mut self, tensors: &[(View, bool)], grads: View) {
        let update = self.update.expect("set_update before clipped_update");
        let norm = self.sum_squares(grads).sqrt();
        let mut adam = update.adam;
        adam.grad_scale *= update.clip_factor(norm);
        for &(params, decay) in tensors {
            assert_eq!(params.arena, Arena::Params);
            self.slice(params);
            let r = params.offset..params.offset + params.len;
            optim::adamw(
                &mut self.params[r.clone()],
                &self.grads[r.clone()],
                &mut self.adam_m[r.clone()],
                &mut self.adam_v[r],
                adam,
                decay,
            );
        }
        self.update_grad_norm = norm;
    }

    fn update_grad_norm(&self) -> f64 {
        self.update_grad_norm
    }
}
