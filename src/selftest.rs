//! Proves a device's backend against the CPU's: every kernel of [`Backend`] on the same random
//! inputs, one whole training step, the decoder against the full forward pass, and (where the
//! device trains in bfloat16) a short bf16 training run against f32.
//!
//! The kernel checks take backends rather than devices, so a deliberately faulty backend can be
//! handed in to show that the harness notices it. Only outputs whose meaning the trait defines
//! are compared: a backend's attention scratch, the log-sum-exp it passes from the forward to
//! the backward pass, its cache layout and its packed weights are its own business.

use crate::backend::{
    AdamStep, Arena, ArenaSizes, AttnShape, Backend, DType, Device, DrawSizes, LogitGradient, Op,
    Precision, Update, View,
};
use crate::config::ModelConfig;
use crate::data::TokenSet;
use crate::model::{Decoder, Engine};
use crate::sample::{self, ImageSpec, SampleOptions};
use crate::train::{TrainConfig, Trainer};
use anyhow::Context;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// Largest error each kind of computation may show against the reference, relative to the
/// output's scale.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerances {
    /// Kernels that compute each element from a few inputs (norms, activations, embeddings,
    /// the optimizer, copies).
    pub f32_elementwise: f64,
    /// Products and reductions in f32: the summation order may differ between backends.
    pub f32_products: f64,
    /// Products whose operands the device rounds to bfloat16 (tensor cores).
    pub bf16_products: f64,
    /// Products from bfloat16-stored operands (packed weights, bf16 key/value caches): both
    /// backends round the same way, so only the accumulation order differs.
    pub bf16_storage: f64,
    /// The tested device's precision of products: picks `f32_products` or `bf16_products`
    /// for matrix products and attention.
    pub products: Precision,
}

impl Tolerances {
    /// The tolerances for a device whose products run at `products`.
    pub fn for_products(products: Precision) -> Self {
        Self {
            f32_elementwise: 1e-5,
            f32_products: 1e-4,
            bf16_products: 2e-2,
            bf16_storage: 1e-2,
            products,
        }
    }

    /// The tolerance of matrix products and attention on the tested device.
    pub fn products(&self) -> f64 {
        match self.products {
            Precision::F32 => self.f32_products,
            Precision::Bf16 => self.bf16_products,
        }
    }
}

impl Default for Tolerances {
    fn default() -> Self {
        Self::for_products(Precision::F32)
    }
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    pub name: String,
    /// Largest error found, relative to the reference's scale (NaN when an output held NaN).
    pub max_error: f64,
    pub tolerance: f64,
    pub passed: bool,
    /// Not run on this device (or not asked for); `detail` says why. A skipped check is not a
    /// failure.
    pub skipped: bool,
    pub detail: String,
}

impl Check {
    /// A check of `error` against `tolerance`; NaN never passes.
    pub fn measured(name: &str, error: f64, tolerance: f64, detail: String) -> Self {
        Self {
            name: name.to_string(),
            max_error: error,
            tolerance,
            passed: error <= tolerance,
            skipped: false,
            detail,
        }
    }

    /// A check that was not run, and why.
    pub fn skipped(name: &str, why: &str) -> Self {
        Self {
            name: name.to_string(),
            max_error: 0.0,
            tolerance: 0.0,
            passed: true,
            skipped: true,
            detail: why.to_string(),
        }
    }

    /// A check that could not be run because something failed on the way.
    fn failed(name: &str, error: &anyhow::Error) -> Self {
        Self {
            name: name.to_string(),
            max_error: f64::NAN,
            tolerance: 0.0,
            passed: false,
            skipped: false,
            detail: format!("{error:#}"),
        }
    }

    /// `pass`, `FAIL` or `skipped`.
    pub fn result(&self) -> &'static str {
        match (self.skipped, self.passed) {
            (true, _) => "skipped",
            (false, true) => "pass",
            (false, false) => "FAIL",
        }
    }
}

/// max |tested - reference| / (max |reference| + tiny); NaN if either holds a NaN (an output
/// left unwritten keeps its NaN poison) or the lengths differ.
pub fn relative_error(tested: &[f32], reference: &[f32]) -> f64 {
    if tested.len() != reference.len() {
        return f64::NAN;
    }
    let mut scale = 0.0f64;
    let mut worst = 0.0f64;
    for (&t, &r) in tested.iter().zip(reference) {
        if t.is_nan() || r.is_nan() {
            return f64::NAN;
        }
        scale = scale.max((r as f64).abs());
        worst = worst.max((t as f64 - r as f64).abs());
    }
    worst / (scale + 1e-30)
}

/// The worse of two errors, NaN being worst of all.
fn worse(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// Shapes of the kernel checks: small, but not multiples of any tile (t 20 is not a multiple of
/// 16, the vocabulary is odd) and with more than one sequence and head. Heads of 16 columns
/// are what a GPU's tensor-core attention takes, so its bf16 pass checks that kernel.
const BATCH: usize = 2;
const T: usize = 20;
const D: usize = 48;
const HEADS: usize = 3;
const VOCAB: usize = 37;
const ROWS: usize = BATCH * T;
/// Rows of the packed products (odd, off every register tile).
const PACKED_ROWS: usize = 13;
/// Elements of the AdamW test's arenas, and the tensor inside them (with neighbours on both
/// sides that the update must leave alone).
const ADAM_TOTAL: usize = 1200;
const ADAM_AT: usize = 48;
const ADAM_LEN: usize = 1000;
/// What an unwritten output holds: any comparison with it fails.
const POISON: f32 = f32::NAN;

/// What bf16 outputs start as: finite, so an element left unwritten differs from the rounding
/// of any output, even a NaN where the f32 output was left unwritten too.
const STORED_POISON: f32 = 1.0e30;

fn attn_shape(causal: bool) -> AttnShape {
    AttnShape {
        batch: BATCH,
        t: T,
        n_head: HEADS,
        head_dim: D / HEADS,
        causal,
    }
}

/// Columns of the one head of the attention checks' second shape: wider than 64, as iGPT-L's
/// heads are, so a GPU's kernels for wide heads run too.
const WIDE_HEAD: usize = 96;

/// Positions of the attention checks' longer shapes: several steps of a GPU's flash kernels
/// (64 keys forward, 32 backward) and a partial last one, so their two-stage tile copies
/// alternate buffers.
const LONG_T: usize = 150;

/// Two sequences of one wide head.
fn wide_attn_shape(causal: bool) -> AttnShape {
    AttnShape {
        batch: 2,
        t: LONG_T,
        n_head: 1,
        head_dim: WIDE_HEAD,
        causal,
    }
}

/// One sequence of two heads of iGPT-S's width over [`LONG_T`] positions: a GPU's kernels for
/// heads up to 64, through many steps.
fn long_attn_shape(causal: bool) -> AttnShape {
    AttnShape {
        batch: 1,
        t: LONG_T,
        n_head: 2,
        head_dim: 64,
        causal,
    }
}

/// A shape of the attention checks (causal or not), and the suffix of their names.
type NamedShape = (fn(bool) -> AttnShape, &'static str);

fn attn_shapes() -> [NamedShape; 3] {
    [
        (attn_shape, ""),
        (wide_attn_shape, ", wide head"),
        (long_attn_shape, ", long"),
    ]
}

/// Consecutive regions of one arena, the same offsets on both backends. A region whose size
/// differs between the backends (scratch, caches, packed weights) takes the larger, and each
/// backend is handed its own length.
struct Bump {
    next: usize,
    cap: usize,
    arena: Arena,
    dtype: DType,
}

impl Bump {
    fn new(arena: Arena, dtype: DType, cap: usize) -> Self {
        Self {
            next: 0,
            cap,
            arena,
            dtype,
        }
    }

    /// Regions of `lens[0]` elements for the reference and `lens[1]` for the tested backend.
    fn each(&mut self, lens: [usize; 2]) -> [View; 2] {
        let offset = self.next;
        // Aligned as the engine plans its buffers.
        self.next += lens[0].max(lens[1]).next_multiple_of(32);
        assert!(
            self.next <= self.cap,
            "selftest: {} elements of {:?} planned, {} needed",
            self.cap,
            self.arena,
            self.next
        );
        lens.map(|len| View {
            arena: self.arena,
            offset,
            len,
            dtype: self.dtype,
        })
    }

    fn take(&mut self, len: usize) -> View {
        self.each([len, len])[0]
    }
}

/// The two backends under test, with the regions of their arenas handed out per check.
struct Pair<'a> {
    b: [&'a mut dyn Backend; 2],
    acts: Bump,
    half: Bump,
    rng: ChaCha8Rng,
    tol: Tolerances,
    checks: Vec<Check>,
}

impl Pair<'_> {
    /// Hands every region out again (each check starts from a fresh plan).
    fn reset(&mut self) {
        self.acts.next = 0;
        self.half.next = 0;
    }

    /// `n` uniform values in ±`scale`, never exactly zero.
    fn random(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let u: f32 = self.rng.random::<f32>() * 2.0 - 1.0;
                let u = if u == 0.0 { 0.5 } else { u };
                u * scale
            })
            .collect()
    }

    fn view(&mut self, n: usize) -> View {
        self.acts.take(n)
    }

    /// A fresh region holding `data` on both backends.
    fn put(&mut self, data: &[f32]) -> View {
        let v = self.view(data.len());
        self.set(v, data);
        v
    }

    /// A fresh region of `n` random values (the same on both backends).
    fn put_random(&mut self, n: usize, scale: f32) -> View {
        let data = self.random(n, scale);
        self.put(&data)
    }

    /// A fresh output region, poisoned on both backends.
    fn out(&mut self, n: usize) -> View {
        let v = self.view(n);
        self.poison(v);
        v
    }

    fn poison(&mut self, v: View) {
        for b in self.b.iter_mut() {
            b.fill(v, POISON);
        }
    }

    fn set(&mut self, v: View, data: &[f32]) {
        for b in self.b.iter_mut() {
            b.upload(v, data);
        }
    }

    fn both(&mut self, mut f: impl FnMut(&mut dyn Backend)) {
        for b in self.b.iter_mut() {
            f(&mut **b);
        }
    }

    /// `f` on each backend with its own view of a region whose size is the backend's.
    fn each(&mut self, views: &[[View; 2]], mut f: impl FnMut(&mut dyn Backend, &[View])) {
        for (k, b) in self.b.iter_mut().enumerate() {
            let own: Vec<View> = views.iter().map(|v| v[k]).collect();
            f(&mut **b, &own);
        }
    }

    /// Error of `v` on the tested backend against the reference.
    fn error(&self, v: View) -> f64 {
        let [r, t] = [0, 1].map(|k| {
            let mut out = vec![0.0; v.len];
            self.b[k].download(v, &mut out);
            out
        });
        relative_error(&t, &r)
    }

    /// Elements of `stored` (a bfloat16 view) that are not, on each backend, that backend's own
    /// `f32` output rounded: a kernel that stores bf16 must store exactly that.
    fn rounding_misses(&self, f32_out: View, stored: View) -> usize {
        use crate::backend::cpu::bf16::{from_bf16, to_bf16};
        self.misses(f32_out, stored, |w| from_bf16(to_bf16(w)))
    }

    /// Elements of `got` that are not, on each backend, the bits of that backend's `want`.
    fn bit_misses(&self, want: View, got: View) -> usize {
        self.misses(want, got, |w| w)
    }

    /// Elements where `got` is not `expect(want)`, bit for bit, summed over both backends.
    fn misses(&self, want: View, got: View, expect: impl Fn(f32) -> f32) -> usize {
        let mut misses = 0;
        for b in &self.b {
            let (mut w, mut o) = (vec![0.0; want.len], vec![0.0; got.len]);
            b.download(want, &mut w);
            b.download(got, &mut o);
            misses += w
                .iter()
                .zip(&o)
                .filter(|&(w, o)| expect(*w).to_bits() != o.to_bits())
                .count();
        }
        misses
    }

    /// Records a check that `misses` elements, over both backends, were not their f32
    /// output rounded (see [`Pair::rounding_misses`]).
    fn record_rounding(&mut self, name: &str, misses: usize) {
        self.checks.push(Check::measured(
            name,
            misses as f64,
            0.0,
            "elements not the f32 output rounded, on either backend".to_string(),
        ));
    }

    /// Records a check over the outputs `outs` (named for the detail): the worst of them.
    fn record(&mut self, name: &str, tolerance: f64, outs: &[(&str, View)]) {
        let mut worst = 0.0;
        let mut worst_name = outs.first().map_or("", |o| o.0);
        for &(what, v) in outs {
            let e = self.error(v);
            if e.is_nan() || e > worst {
                worst_name = what;
            }
            worst = worse(worst, e);
            if worst.is_nan() {
                break;
            }
        }
        let detail = if worst.is_nan() {
            format!("{worst_name}: NaN (an element left unwritten, or not a number)")
        } else {
            format!("worst output: {worst_name}")
        };
        self.checks
            .push(Check::measured(name, worst, tolerance, detail));
    }
}

/// Runs every kernel of [`Backend`] on `reference` and `tested` with the same random inputs
/// (drawn from `seed`) and compares their outputs. Allocates both backends' arenas (anything
/// they held is gone). One check per kernel and variant, named `kernel (variant)`.
pub fn check_kernels(
    reference: &mut dyn Backend,
    tested: &mut dyn Backend,
    tolerances: Tolerances,
    seed: u64,
) -> Vec<Check> {
    let both = [&*reference, &*tested];
    let max = |f: &dyn Fn(&dyn Backend) -> usize| both.iter().map(|b| f(*b)).max().unwrap_or(0);
    let scratch = max(&|b| {
        attn_shapes()
            .iter()
            .flat_map(|(shape, _)| [shape(true), shape(false)])
            .map(|s| b.attention_scratch_len(s))
            .max()
            .unwrap_or(0)
    });
    // Attention's checks hold Q, K, V, the output, its gradient, dQKV (8 rows of d) and the
    // log-sum-exp, in f32 and again in bf16.
    let attention = attn_shapes()
        .iter()
        .map(|(shape, _)| {
            let s = shape(true);
            let rows = s.batch * s.t;
            8 * rows * s.n_head * s.head_dim + s.batch * s.n_head * s.t + 8 * 32
        })
        .max()
        .unwrap_or(0);
    let cache = BATCH * HEADS * max(&|b| b.decode_cache_len(T)) * (D / HEADS);
    // The packed checks' widest weight: [D, VOCAB], or the residual product's [D, D].
    let packed = max(&|b| b.packed_len(D, VOCAB).max(b.packed_len(D, D)));
    // The largest check (attention_step) holds two caches and its step buffers; the backward
    // pass of attention holds its scratch and five row buffers.
    let acts = 2 * cache + scratch + (16 * ROWS * 3 * D).max(attention);
    // The half arena holds the bf16 caches and packed weights, or the bf16 buffers of one
    // check: the widest output (quick-GELU's) and a step's attention output beside the
    // caches, or attention's Q, K, V, output and their gradients.
    let half = 2 * cache + 2 * packed + (ROWS * 4 * D + BATCH * T * D).max(attention) + 256;
    let sizes = ArenaSizes {
        params: ADAM_TOTAL,
        grads: ADAM_TOTAL,
        acts,
        half,
        max_packed_input: PACKED_ROWS * D,
        tokens: ROWS,
        max_rows: ROWS,
        max_width: 4 * D,
        embedding_rows: VOCAB + 1,
        draws: DrawSizes {
            rows: ROWS,
            positions: T,
            width: VOCAB,
        },
    };
    let mut p = Pair {
        b: [reference, tested],
        acts: Bump::new(Arena::Acts, DType::F32, acts),
        half: Bump::new(Arena::Half, DType::Bf16, half),
        rng: ChaCha8Rng::seed_from_u64(seed),
        tol: tolerances,
        checks: Vec::new(),
    };
    for (k, b) in p.b.iter_mut().enumerate() {
        if let Err(e) = b.allocate(sizes) {
            let who = if k == 0 { "reference" } else { "tested" };
            let e = e.context(format!("allocating the {who} backend ({})", b.name()));
            return vec![Check::failed("allocate", &e)];
        }
    }
    memory_kernels(&mut p);
    embedding_kernels(&mut p);
    norm_kernels(&mut p);
    product_kernels(&mut p);
    attention_kernels(&mut p);
    decoding_kernels(&mut p);
    sampling_kernels(&mut p);
    activation_kernels(&mut p);
    loss_kernels(&mut p);
    optimizer_kernels(&mut p);
    p.checks
}

/// upload, download, fill and copy, f32 and bfloat16. The bf16 ones are seen through packed
/// products, the only way the trait reads 16-bit storage back whatever its layout.
fn memory_kernels(p: &mut Pair) {
    let tol = p.tol;
    p.reset();
    let v = p.put_random(ROWS * D + 5, 3.0);
    p.record("upload/download", tol.f32_elementwise, &[("data", v)]);

    p.reset();
    let v = p.out(ROWS * D + 7);
    p.both(|b| b.fill(v, 0.75));
    p.record("fill", tol.f32_elementwise, &[("filled", v)]);

    p.reset();
    let src = p.put_random(ROWS * D + 3, 2.0);
    let dst = p.out(src.len);
    p.both(|b| b.copy(dst, src));
    p.record("copy", tol.f32_elementwise, &[("copy", dst)]);

    p.reset();
    let src = p.put_random(ROWS * D + 3, 3.0);
    let stored = p.half.take(src.len);
    p.both(|b| {
        b.fill(stored, STORED_POISON);
        b.round_to_bf16(stored, src)
    });
    let misses = p.rounding_misses(src, stored);
    p.record_rounding("round_to_bf16", misses);

    // A packed weight whose every element is the same value is that value in any layout.
    let (m, k, n) = (PACKED_ROWS, D, VOCAB);
    p.reset();
    let a = p.put_random(m * k, 1.0);
    let packed = p.half.each([0, 1].map(|i| p.b[i].packed_len(k, n)));
    let out = p.out(m * n);
    p.each(&[packed], |b, v| {
        b.fill(v[0], f32::NAN);
        b.fill(v[0], 0.375);
        b.matmul_packed(out, a, v[0], m, k, n, false);
    });
    p.record("fill (bf16)", tol.bf16_storage, &[("product", out)]);

    p.reset();
    let a = p.put_random(m * k, 1.0);
    let w = p.put_random(k * n, 1.0);
    let src = p.half.each([0, 1].map(|i| p.b[i].packed_len(k, n)));
    let dst = p.half.each([0, 1].map(|i| p.b[i].packed_len(k, n)));
    let out = p.out(m * n);
    p.each(&[src, dst], |b, v| {
        b.pack_weight(v[0], w, Op::N, k, n);
        b.fill(v[1], f32::NAN);
        b.copy(v[1], v[0]);
        // The source is spoilt afterwards, so a product that read it instead would fail.
        b.fill(v[0], f32::NAN);
        b.matmul_packed(out, a, v[1], m, k, n, false);
    });
    p.record("copy (bf16)", tol.bf16_storage, &[("product", out)]);
}

/// Token ids for a batch: palette colours, or with `direct` the start (`VOCAB`) and masked
/// (`VOCAB + 1`) ids among them.
fn tokens(rng: &mut ChaCha8Rng, n: usize, direct: bool) -> Vec<u16> {
    let ids = if direct { VOCAB + 2 } else { VOCAB };
    let mut t: Vec<u16> = (0..n).map(|_| rng.random_range(0..ids) as u16).collect();
    if direct {
        t[1] = VOCAB as u16;
        t[2] = VOCAB as u16 + 1;
    }
    t
}

fn embedding_kernels(p: &mut Pair) {
    let tol = p.tol;
    for direct in [false, true] {
        let mode = if direct { "direct" } else { "shifted" };
        p.reset();
        let ids = tokens(&mut p.rng, ROWS, direct);
        p.both(|b| b.set_tokens(&ids));
        let wte = p.put_random(VOCAB * D, 1.0);
        let wpe = p.put_random(T * D, 1.0);
        let sos = p.put_random(D, 1.0);
        let out = p.out(ROWS * D);
        p.both(|b| b.embed_forward(out, wte, wpe, sos, T, D, direct));
        p.record(
            &format!("embed_forward ({mode})"),
            tol.f32_elementwise,
            &[("out", out)],
        );

        // The backward pass adds into the gradients: they start from the same values.
        let dout = p.put_random(ROWS * D, 1.0);
        let dwte = p.put_random(VOCAB * D, 1.0);
        let dwpe = p.put_random(T * D, 1.0);
        let dsos = p.put_random(D, 1.0);
        p.both(|b| b.embed_backward(dwte, dwpe, dsos, dout, T, D, direct));
        p.record(
            &format!("embed_backward ({mode})"),
            tol.f32_products,
            &[("dwte", dwte), ("dwpe", dwpe), ("dsos", dsos)],
        );
    }
}

fn norm_kernels(p: &mut Pair) {
    let tol = p.tol;
    p.reset();
    let x = p.put_random(ROWS * D, 2.0);
    let g = p.put_random(D, 1.5);
    let out = p.out(ROWS * D);
    let rstd = p.out(ROWS);
    p.both(|b| b.rmsnorm_forward(out, rstd, x, g, D));
    p.record(
        "rmsnorm_forward",
        tol.f32_elementwise,
        &[("out", out), ("rstd", rstd)],
    );
    // Stored as bfloat16 (a product's input): each backend's own output, rounded.
    let stored = p.half.take(ROWS * D);
    let rstd16 = p.out(ROWS);
    p.both(|b| {
        b.fill(stored, STORED_POISON);
        b.rmsnorm_forward(stored, rstd16, x, g, D)
    });
    let misses = p.rounding_misses(out, stored);
    p.record_rounding("rmsnorm_forward (bf16 out)", misses);

    // The backward pass reads the reference's rstd on both, so it is checked on its own.
    let mut r = vec![0.0; ROWS];
    p.b[0].download(rstd, &mut r);
    let rstd = p.put(&r);
    let dout = p.put_random(ROWS * D, 1.0);
    let dx = p.put_random(ROWS * D, 1.0);
    let dg = p.put_random(D, 1.0);
    p.both(|b| b.rmsnorm_backward(dx, None, dg, dout, x, rstd, g, D));
    p.record(
        "rmsnorm_backward",
        tol.f32_products,
        &[("dx", dx), ("dg", dg)],
    );
    let stored = p.half.take(ROWS * D);
    p.both(|b| {
        b.fill(stored, STORED_POISON);
        b.rmsnorm_backward(dx, Some(stored), dg, dout, x, rstd, g, D)
    });
    let misses = p.rounding_misses(dx, stored);
    p.record_rounding("rmsnorm_backward (bf16 copy)", misses);

    // From a bf16 dout (as a GPU's bf16 training stores the norms' output gradient): from the
    // same values, each backend's dx and dg must be the bits of its f32 pass.
    let values = bf16_values(&p.random(ROWS * D, 1.0));
    let dout = p.put(&values);
    let dout16 = p.half.take(ROWS * D);
    p.set(dout16, &values);
    let start = [p.random(ROWS * D, 1.0), p.random(D, 1.0)];
    let [dx, dg, dx16, dg16] = [&start[0], &start[1], &start[0], &start[1]].map(|v| p.put(v));
    p.both(|b| {
        b.rmsnorm_backward(dx, None, dg, dout, x, rstd, g, D);
        b.rmsnorm_backward(dx16, None, dg16, dout16, x, rstd, g, D)
    });
    let misses = p.bit_misses(dx, dx16) + p.bit_misses(dg, dg16);
    p.checks.push(Check::measured(
        "rmsnorm_backward (bf16 dout)",
        misses as f64,
        0.0,
        "elements of dx and dg not the f32 pass's bits, on either backend".to_string(),
    ));
}

fn op_name(op: Op) -> &'static str {
    match op {
        Op::N => "N",
        Op::T => "T",
    }
}

fn product_kernels(p: &mut Pair) {
    let tol = p.tol;
    for ta in [Op::N, Op::T] {
        for tb in [Op::N, Op::T] {
            for accumulate in [false, true] {
                matmul_check(p, [ta, tb], accumulate, false);
            }
        }
    }
    // Two bf16 operands, as a GPU's training reads them in the backward pass: a stored input
    // with a rounded gradient (T,N) for a weight's gradient, a gradient with a packed weight
    // (N,T) for the input's.
    matmul_check(p, [Op::T, Op::N], true, true);
    matmul_check(p, [Op::N, Op::T], false, true);
    bf16_result_checks(p);

    let (m, k, n) = (PACKED_ROWS, D, VOCAB);
    for op in [Op::N, Op::T] {
        for accumulate in [false, true] {
            p.reset();
            let a = p.put_random(m * k, 1.0);
            let w = p.put_random(k * n, 1.0);
            let packed = p.half.each([0, 1].map(|i| p.b[i].packed_len(k, n)));
            let out = if accumulate {
                p.put_random(m * n, 1.0)
            } else {
                p.out(m * n)
            };
            p.each(&[packed], |b, v| {
                b.fill(v[0], f32::NAN);
                b.pack_weight(v[0], w, op, k, n);
                b.matmul_packed(out, a, v[0], m, k, n, accumulate);
            });
            let acc = if accumulate { ", accumulate" } else { "" };
            p.record(
                &format!("pack_weight + matmul_packed ({}{acc})", op_name(op)),
                tol.bf16_storage,
                &[("out", out)],
            );
        }
    }

    // The residual stream's products: the sum into another buffer, the addend left as it was.
    let (m, k, n) = (ROWS, D, D);
    p.reset();
    let a = p.put_random(m * k, 1.0);
    let w = p.put_random(k * n, 1.0);
    let addend = p.put_random(m * n, 1.0);
    let out = p.out(m * n);
    p.both(|be| be.matmul_onto(out, addend, a, Op::N, w, Op::N, m, k, n));
    p.record(
        "matmul_onto (N,N)",
        tol.products(),
        &[("out", out), ("addend", addend)],
    );
    p.reset();
    let m = PACKED_ROWS;
    let a = p.put_random(m * k, 1.0);
    let w = p.put_random(k * n, 1.0);
    let packed = p.half.each([0, 1].map(|i| p.b[i].packed_len(k, n)));
    let addend = p.put_random(m * n, 1.0);
    let out = p.out(m * n);
    p.each(&[packed], |b, v| {
        b.fill(v[0], f32::NAN);
        b.pack_weight(v[0], w, Op::N, k, n);
        b.matmul_packed_onto(out, addend, a, v[0], m, k, n);
    });
    p.record(
        "pack_weight + matmul_packed_onto (N)",
        tol.bf16_storage,
        &[("out", out), ("addend", addend)],
    );
}

/// Products that store their result as bf16, as a GPU's training writes Q, K, V (`c_attn`'s
/// product of a stored bf16 input and a packed weight) and the gradient of attention's output
/// (a rounded gradient times a bf16 weight, read transposed): each backend's bf16 result must
/// be its own f32 result of the same product rounded, but for misses (on the two backends
/// together) of at most 1% of the elements: a GPU's library may choose another order of
/// summation for a bf16 result; a kernel that rounds wrongly misses far more.
fn bf16_result_checks(p: &mut Pair) {
    let detail = "share of elements not the f32 result rounded, both backends' misses together";
    let (m, k, n) = (PACKED_ROWS, D, 3 * D);
    p.reset();
    let [a, w] = [m * k, k * n].map(|len| p.put_random(len, 1.0));
    let a16 = p.half.take(m * k);
    p.both(|b| b.round_to_bf16(a16, a));
    let packed = p.half.each([0, 1].map(|i| p.b[i].packed_len(k, n)));
    let (out, out16) = (p.out(m * n), p.half.take(m * n));
    p.each(&[packed], |b, v| {
        b.fill(out16, STORED_POISON);
        b.pack_weight(v[0], w, Op::N, k, n);
        b.matmul_packed(out, a16, v[0], m, k, n, false);
        b.matmul_packed(out16, a16, v[0], m, k, n, false);
    });
    let share = p.rounding_misses(out, out16) as f64 / (m * n) as f64;
    let name = "pack_weight + matmul_packed (N, bf16 in and out)";
    p.checks
        .push(Check::measured(name, share, 0.01, detail.to_string()));

    let (m, k, n) = (ROWS, D, D);
    p.reset();
    let [dy, w] = [m * k, n * k].map(|len| {
        let values = p.random(len, 1.0);
        let stored = p.half.take(len);
        p.set(stored, &values);
        stored
    });
    let (out, out16) = (p.out(m * n), p.half.take(m * n));
    p.both(|b| {
        b.fill(out16, STORED_POISON);
        b.matmul(out, dy, Op::N, w, Op::T, m, k, n, false);
        b.matmul(out16, dy, Op::N, w, Op::T, m, k, n, false);
    });
    let share = p.rounding_misses(out, out16) as f64 / (m * n) as f64;
    let name = "matmul (bf16 operands, N,T, bf16 out)";
    p.checks
        .push(Check::measured(name, share, 0.01, detail.to_string()));
}

/// `matmul` with transposes `[ta, tb]`, from f32 operands or (`bf16`) bf16 ones, which the
/// reference multiplies as the same values in f32.
fn matmul_check(p: &mut Pair, [ta, tb]: [Op; 2], accumulate: bool, bf16: bool) {
    let (m, k, n) = (ROWS, D, VOCAB);
    p.reset();
    let [a, b] = [m * k, k * n].map(|len| {
        let values = p.random(len, 1.0);
        let v = if bf16 { p.half.take(len) } else { p.view(len) };
        p.set(v, &values);
        v
    });
    let out = if accumulate {
        p.put_random(m * n, 1.0)
    } else {
        p.out(m * n)
    };
    p.both(|be| be.matmul(out, a, ta, b, tb, m, k, n, accumulate));
    let (operands, tolerance) = match bf16 {
        true => ("bf16 operands, ", p.tol.bf16_storage),
        false => ("", p.tol.products()),
    };
    let acc = if accumulate { ", accumulate" } else { "" };
    let name = format!("matmul ({operands}{},{}{acc})", op_name(ta), op_name(tb));
    p.record(&name, tolerance, &[("out", out)]);
}

fn attention_kernels(p: &mut Pair) {
    let tol = p.tol;
    for (shape, heads) in attn_shapes() {
        for causal in [true, false] {
            let mode = if causal { "causal" } else { "bidirectional" };
            let s = shape(causal);
            let (rows, d) = (s.batch * s.t, s.n_head * s.head_dim);
            p.reset();
            // Values bf16 holds exactly, so that the bf16 check below reads the same ones.
            let qkv = p.random(rows * 3 * d, 1.5);
            let qkv = p.put(&bf16_values(&qkv));
            let out = p.out(rows * d);
            let lse = p.out(s.batch * s.n_head * s.t);
            let scratch = p.acts.each([0, 1].map(|i| p.b[i].attention_scratch_len(s)));
            p.each(&[scratch], |b, v| {
                b.attention_forward(out, lse, qkv, v[0], s)
            });
            p.record(
                &format!("attention_forward ({mode}{heads})"),
                tol.products(),
                &[("out", out)],
            );

            // Each backend's own forward pass (its lse is private) feeds its backward pass.
            let dout = p.random(rows * d, 1.0);
            let dout = p.put(&bf16_values(&dout));
            let dqkv = p.out(rows * 3 * d);
            p.each(&[scratch], |b, v| {
                b.attention_backward(dqkv, dout, out, lse, qkv, v[0], s)
            });
            p.record(
                &format!("attention_backward ({mode}{heads})"),
                tol.products(),
                &[("dqkv", dqkv)],
            );
            attention_stored_as_bf16(p, s, heads, [qkv, out, lse, dout], scratch);
        }
    }
}

/// Each value rounded to the nearest bfloat16, as f32.
fn bf16_values(values: &[f32]) -> Vec<f32> {
    use crate::backend::cpu::bf16::{from_bf16, to_bf16};
    values.iter().map(|&x| from_bf16(to_bf16(x))).collect()
}

/// Attention reading and storing bf16, as a GPU's training keeps Q, K, V, the output and
/// their gradients (where its attention can): from the same values as bf16, the output must
/// be each backend's f32 `out` rounded; the gradient, from that rounded output, is compared
/// with the reference's. `inputs`: the f32 check's `qkv`, `out`, `lse` and `dout`, whose
/// values bf16 holds exactly.
fn attention_stored_as_bf16(
    p: &mut Pair,
    s: AttnShape,
    heads: &str,
    inputs: [View; 4],
    scratch: [View; 2],
) {
    let mode = if s.causal { "causal" } else { "bidirectional" };
    let names = [
        format!("attention_forward ({mode}{heads}, bf16 in and out)"),
        format!("attention_backward ({mode}{heads}, bf16 in and out)"),
    ];
    if !p.b.iter().all(|b| b.attention_stores_bf16(s)) {
        for name in &names {
            p.checks.push(Check::skipped(
                name,
                "this device's attention stores f32 only (no flash attention with f32 products)",
            ));
        }
        return;
    }
    let [qkv, out, lse, dout] = inputs;
    let (rows, d) = (s.batch * s.t, s.n_head * s.head_dim);
    let [qkv16, dout16] = [qkv, dout].map(|v| {
        let stored = p.half.take(v.len);
        p.both(|b| b.round_to_bf16(stored, v));
        stored
    });
    let out16 = p.half.take(rows * d);
    p.each(&[scratch], |b, v| {
        b.fill(out16, STORED_POISON);
        b.attention_forward(out16, lse, qkv16, v[0], s)
    });
    let misses = p.rounding_misses(out, out16);
    p.record_rounding(&names[0], misses);
    let dqkv16 = p.half.take(rows * 3 * d);
    p.each(&[scratch], |b, v| {
        b.fill(dqkv16, STORED_POISON);
        b.attention_backward(dqkv16, dout16, out16, lse, qkv16, v[0], s)
    });
    let tol = p.tol.products();
    p.record(&names[1], tol, &[("dqkv", dqkv16)]);
}

/// Positions fed per call when decoding: a prefill of several, single steps, another short
/// prefill, then single steps to the end.
fn decoding_chunks() -> Vec<usize> {
    let mut chunks = vec![7, 1, 1, 5];
    let fed: usize = chunks.iter().sum();
    chunks.extend(std::iter::repeat_n(1, T - fed));
    chunks
}

fn decoding_kernels(p: &mut Pair) {
    let tol = p.tol;
    let hd = D / HEADS;
    let s = attn_shape(true);
    let chunks = decoding_chunks();
    let widest = chunks.iter().copied().max().unwrap_or(1);

    // embed_step: the stored tokens are each position's previous token.
    p.reset();
    let wte = p.put_random(VOCAB * D, 1.0);
    let wpe = p.put_random(T * D, 1.0);
    let sos = p.put_random(D, 1.0);
    let out = p.view(BATCH * widest * D);
    let mut worst = 0.0;
    let mut pos = 0;
    for &n in &chunks {
        let prev = tokens(&mut p.rng, BATCH * n, false);
        let o = View {
            len: BATCH * n * D,
            ..out
        };
        p.poison(o);
        p.both(|b| {
            b.set_tokens(&prev);
            b.embed_step(o, wte, wpe, sos, pos, n, D);
        });
        worst = worse(worst, p.error(o));
        pos += n;
    }
    p.checks.push(Check::measured(
        "embed_step",
        worst,
        tol.f32_elementwise,
        format!("positions 0..{T} fed {chunks:?} at a time"),
    ));

    // attention_step with f32 and bf16 caches. The caches start stale (a decoder reuses them
    // for the next image), which no step may read beyond its positions.
    for bf16 in [false, true] {
        p.reset();
        let lens = [0, 1].map(|i| BATCH * HEADS * p.b[i].decode_cache_len(T) * hd);
        let bump = if bf16 { &mut p.half } else { &mut p.acts };
        let (kc, vc) = (bump.each(lens), bump.each(lens));
        let scores = p
            .acts
            .each([0, 1].map(|i| BATCH * HEADS * p.b[i].decode_cache_len(T)));
        let qkv = p.view(BATCH * widest * 3 * D);
        let out = p.view(BATCH * widest * D);
        let out16 = p.half.take(BATCH * widest * D);
        p.each(&[kc, vc], |b, v| {
            b.fill(v[0], 50.0);
            b.fill(v[1], 50.0);
        });
        let (mut worst, mut misses) = (0.0, 0);
        let mut pos = 0;
        for &n in &chunks {
            let q = View {
                len: BATCH * n * 3 * D,
                ..qkv
            };
            let o = View {
                len: BATCH * n * D,
                ..out
            };
            let data = p.random(q.len, 1.5);
            p.set(q, &data);
            p.poison(o);
            p.each(&[kc, vc, scores], |b, v| {
                b.attention_step(o, v[0], v[1], q, v[2], s, pos, n)
            });
            worst = worse(worst, p.error(o));
            // The same step again (storing the same keys and values), its output stored as
            // bfloat16.
            let o16 = View {
                len: BATCH * n * D,
                ..out16
            };
            p.each(&[kc, vc, scores], |b, v| {
                b.fill(o16, STORED_POISON);
                b.attention_step(o16, v[0], v[1], q, v[2], s, pos, n)
            });
            misses += p.rounding_misses(o, o16);
            pos += n;
        }
        let (name, tolerance, stored_name) = if bf16 {
            (
                "attention_step (bf16 cache)",
                tol.bf16_storage,
                "attention_step (bf16 cache, bf16 out)",
            )
        } else {
            (
                "attention_step (f32 cache)",
                tol.products(),
                "attention_step (f32 cache, bf16 out)",
            )
        };
        p.checks.push(Check::measured(
            name,
            worst,
            tolerance,
            format!("out at positions 0..{T} fed {chunks:?} at a time"),
        ));
        p.record_rounding(stored_name, misses);
    }
}

/// draw_tokens: every row with its own options (greedy, the whole palette, top-k, top-p, both;
/// cold and hot temperatures) and logits with ties and a masked colour, at every position. The
/// tokens must be the same on both backends (the error counts those that differ), and the next
/// embed_step must read them as its inputs.
fn sampling_kernels(p: &mut Pair) {
    p.reset();
    let options: Vec<SampleOptions> = (0..ROWS)
        .map(|r| SampleOptions {
            temperature: [1.0, 0.0, 0.7, 1.6][r % 4],
            top_k: [0, 5, 1, VOCAB - 1, VOCAB + 3][r % 5],
            top_p: [1.0, 0.9, 0.3][r % 3],
            seed: 0,
        })
        .collect();
    let numbers: Vec<f32> = (0..ROWS * T).map(|_| p.rng.random()).collect();
    p.both(|b| b.set_draws(&options, &numbers));
    let logits = p.view(ROWS * VOCAB);
    for pos in 0..T {
        let mut z = p.random(ROWS * VOCAB, 4.0);
        for row in z.chunks_mut(VOCAB) {
            row[3] = row[0];
            row[7] = f32::NEG_INFINITY;
        }
        p.set(logits, &z);
        p.both(|b| b.draw_tokens(logits, VOCAB, pos));
    }
    let [reference, tested] = [0, 1].map(|k| {
        let mut out = vec![0; T * ROWS];
        p.b[k].drawn_tokens(0, T, &mut out);
        out
    });
    let differ = reference
        .iter()
        .zip(&tested)
        .filter(|(a, b)| a != b)
        .count();
    let wte = p.put_random(VOCAB * D, 1.0);
    let wpe = p.put_random(T * D, 1.0);
    let sos = p.put_random(D, 1.0);
    let out = p.out(ROWS * D);
    p.both(|b| b.embed_step(out, wte, wpe, sos, 1, 1, D));
    let read = p.error(out);
    p.checks.push(Check::measured(
        "draw_tokens",
        worse(differ as f64, read),
        0.0,
        format!(
            "{differ} of {} tokens differ; the next step's inputs: error {read:.1e}",
            T * ROWS
        ),
    ));
}

fn activation_kernels(p: &mut Pair) {
    let tol = p.tol;
    p.reset();
    let n = ROWS * 4 * D;
    let x = p.put_random(n, 4.0);
    let out = p.out(n);
    p.both(|b| b.gelu_forward(out, x));
    p.record("gelu_forward", tol.f32_elementwise, &[("out", out)]);
    let stored = p.half.take(n);
    p.both(|b| {
        b.fill(stored, STORED_POISON);
        b.gelu_forward(stored, x)
    });
    let misses = p.rounding_misses(out, stored);
    p.record_rounding("gelu_forward (bf16 out)", misses);

    let dout = p.put_random(n, 1.0);
    let dx = p.out(n);
    p.both(|b| b.gelu_backward(dx, dout, x));
    p.record("gelu_backward", tol.f32_elementwise, &[("dx", dx)]);
    let stored = p.half.take(n);
    p.both(|b| {
        b.fill(stored, STORED_POISON);
        b.gelu_backward(stored, dout, x)
    });
    let misses = p.rounding_misses(dx, stored);
    p.record_rounding("gelu_backward (bf16 out)", misses);
    p.both(|b| b.gelu_backward(dout, dout, x));
    p.record(
        "gelu_backward (in place)",
        tol.f32_elementwise,
        &[("dx", dout)],
    );
    gelu_from_bf16(p);
}

/// The quick-GELU reading bf16, as a GPU's training stores the pre-activation and the
/// activation's gradient: from values bf16 holds exactly, each backend's bf16 results must be
/// its f32 kernels' results rounded.
fn gelu_from_bf16(p: &mut Pair) {
    p.reset();
    let n = ROWS * 4 * D;
    // The bf16 copies uploaded as they are (exact), not rounded by the backend under test.
    let [(x, x16), (dout, dout16)] = [4.0, 1.0].map(|scale| {
        let values = bf16_values(&p.random(n, scale));
        let stored = p.half.take(n);
        p.set(stored, &values);
        (p.put(&values), stored)
    });
    let (out, dx) = (p.out(n), p.out(n));
    p.both(|b| {
        b.gelu_forward(out, x);
        b.gelu_backward(dx, dout, x)
    });
    let (out16, dx16) = (p.half.take(n), p.half.take(n));
    p.both(|b| {
        b.fill(out16, STORED_POISON);
        b.fill(dx16, STORED_POISON);
        b.gelu_forward(out16, x16);
        b.gelu_backward(dx16, dout16, x16)
    });
    let misses = p.rounding_misses(out, out16);
    p.record_rounding("gelu_forward (bf16 in and out)", misses);
    let misses = p.rounding_misses(dx, dx16);
    p.record_rounding("gelu_backward (bf16 in and out)", misses);
}

fn loss_kernels(p: &mut Pair) {
    let tol = p.tol;
    for weighted in [false, true] {
        for gradient in [false, true] {
            p.reset();
            let ids = tokens(&mut p.rng, ROWS, weighted);
            let targets = tokens(&mut p.rng, ROWS, false);
            // Weights 1, 0 and a fraction, so a position that does not count is seen too.
            let weights: Vec<f32> = (0..ROWS).map(|i| [1.0, 0.0, 0.6][i % 3]).collect();
            p.both(|b| {
                b.set_tokens(&ids);
                if weighted {
                    b.set_targets(&targets, &weights);
                }
            });
            let data = p.random(ROWS * VOCAB, 4.0);
            let logits = p.put(&data);
            let losses = p.out(ROWS);
            let in_place = gradient.then_some(LogitGradient {
                scale: 0.3,
                out: logits,
            });
            p.both(|b| b.cross_entropy(logits, losses, VOCAB, in_place));
            let name = match (weighted, gradient) {
                (false, false) => "cross_entropy",
                (false, true) => "cross_entropy (gradient)",
                (true, false) => "cross_entropy (weighted)",
                (true, true) => "cross_entropy (weighted, gradient)",
            };
            // Without a gradient the logits must come back as they were.
            let what = if gradient { "dlogits" } else { "logits" };
            p.record(
                name,
                tol.f32_products,
                &[("losses", losses), (what, logits)],
            );
            if gradient {
                cross_entropy_into_bf16(p, &data, logits, losses, weighted);
            }
        }
    }
}

/// The pass `logits` and `losses` hold the f32 results of, again from the same `data` with the
/// gradient stored as bfloat16 apart from the logits: each backend's bf16 gradient must be its
/// f32 one rounded, its losses the same bits, and its logits left as they were.
fn cross_entropy_into_bf16(
    p: &mut Pair,
    data: &[f32],
    f32_grad: View,
    f32_losses: View,
    weighted: bool,
) {
    let logits = p.put(data);
    let losses = p.out(ROWS);
    let stored = p.half.take(ROWS * VOCAB);
    let gradient = LogitGradient {
        scale: 0.3,
        out: stored,
    };
    p.both(|b| {
        b.fill(stored, STORED_POISON);
        b.cross_entropy(logits, losses, VOCAB, Some(gradient))
    });
    let mut misses = p.rounding_misses(f32_grad, stored) + p.bit_misses(f32_losses, losses);
    for b in &p.b {
        let mut kept = vec![0.0; data.len()];
        b.download(logits, &mut kept);
        misses += kept
            .iter()
            .zip(data)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
    }
    let name = if weighted {
        "cross_entropy (weighted, gradient, bf16 out)"
    } else {
        "cross_entropy (gradient, bf16 out)"
    };
    p.checks.push(Check::measured(
        name,
        misses as f64,
        0.0,
        "elements not the f32 gradient rounded, losses not the f32 pass's bits or logits \
         changed, on either backend"
            .to_string(),
    ));
}

fn optimizer_kernels(p: &mut Pair) {
    let tol = p.tol;
    p.reset();
    let x = p.put_random(ROWS * D + 11, 2.0);
    let [r, t] = [0, 1].map(|k| p.b[k].sum_squares(x));
    let e = if r.is_nan() || t.is_nan() {
        f64::NAN
    } else {
        (t - r).abs() / (r.abs() + 1e-30)
    };
    p.checks.push(Check::measured(
        "sum_squares",
        e,
        tol.f32_products,
        format!("reference {r:.6}, tested {t:.6}"),
    ));

    let arenas = [Arena::Params, Arena::Grads, Arena::AdamM, Arena::AdamV];
    let whole = |a: Arena| View::new(a, 0, ADAM_TOTAL);
    // Whole arenas of random values (positive second moments): the views an update names
    // change, their neighbours must stay.
    let fill_arenas = |p: &mut Pair| {
        for a in arenas {
            let mut data = p.random(ADAM_TOTAL, 1.0);
            if a == Arena::AdamV {
                data.iter_mut().for_each(|v| *v = v.abs() * 0.1);
            }
            p.set(whole(a), &data);
        }
    };
    let outputs = [
        ("params", whole(Arena::Params)),
        ("grads", whole(Arena::Grads)),
        ("m", whole(Arena::AdamM)),
        ("v", whole(Arena::AdamV)),
    ];
    let adam = |step: u64, grad_scale: f32| AdamStep {
        lr: 0.01,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step,
        grad_scale,
    };
    // The model's update: several tensors in one call, with and without decay, with a gap
    // between them that neither names (only the tensors move), clipped to the global norm of
    // the whole gradient arena, gap included.
    let third = ADAM_LEN / 3;
    let tensors = [
        (View::new(Arena::Params, ADAM_AT, third), true),
        (View::new(Arena::Params, ADAM_AT + third, 1), false),
        (View::new(Arena::Params, ADAM_AT + third + 3, third), true),
    ];
    // Uniform gradients in (-1, 1) over 1,200 elements have a norm near 20.
    for (name, clip) in [
        ("clipped_update (clipped)", 2.0),
        ("clipped_update (within the clip)", 1e4),
    ] {
        fill_arenas(p);
        let adam = adam(5, 0.7);
        p.both(|b| {
            b.set_update(Update { adam, clip });
            b.clipped_update(&tensors, whole(Arena::Grads));
        });
        p.record(name, tol.f32_elementwise, &outputs);
        // The measured norm is the update's too.
        let [r, t] = [0, 1].map(|k| p.b[k].update_grad_norm());
        let e = (t - r).abs() / r.abs().max(1e-30);
        if e.is_nan() || e > tol.f32_products {
            let check = p.checks.last_mut().expect("just recorded");
            check.passed = false;
            check.max_error = worse(check.max_error, e);
            check.detail = format!("the measured gradient norm: reference {r:.6}, tested {t:.6}");
        }
    }
}

/// The small model the training-step and decoder checks run: two layers, several heads, an
/// odd palette and a context (25) that is not a multiple of 16.
fn tiny_model() -> ModelConfig {
    ModelConfig {
        n_layer: 2,
        n_embd: 32,
        n_head: 4,
        n_vocab: 13,
        side: 5,
        channels: 1,
        objective: Default::default(),
    }
}

/// Parameters of `cfg` from the usual initialisation, perturbed so none is exactly zero or one
/// (the initialisation's zeros and ones would hide a kernel that ignores a tensor).
fn random_params(cfg: &ModelConfig, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5e1f);
    crate::model::init_params(cfg, seed)
        .into_iter()
        .map(|v| v + 0.05 * crate::model::standard_normal(&mut rng))
        .collect()
}

fn random_tokens(n: usize, n_vocab: usize, seed: u64) -> Vec<u16> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| rng.random_range(0..n_vocab) as u16)
        .collect()
}

/// Parameters, gradients and both Adam moments after one step.
struct StepResult {
    loss: f64,
    arenas: [Vec<f32>; 4],
}

fn one_step(
    device: &Device,
    cfg: &ModelConfig,
    train: &TrainConfig,
    params: &[f32],
    data: &TokenSet,
) -> anyhow::Result<StepResult> {
    let mut trainer = Trainer::new(cfg, train.clone(), params, device)
        .with_context(|| format!("a trainer on {device}"))?;
    let stats = trainer
        .step(data)
        .with_context(|| format!("a training step on {device}"))?;
    let n = trainer.engine.layout.total;
    let arenas = [Arena::Params, Arena::Grads, Arena::AdamM, Arena::AdamV].map(|a| {
        let mut out = vec![0.0; n];
        trainer.engine.read_arena(a, &mut out);
        out
    });
    Ok(StepResult {
        loss: stats.loss,
        arenas,
    })
}

/// One whole training step (forward and backward passes in two accumulated passes, clipping,
/// AdamW with weight decay) of a tiny model on both devices, from the same parameters and
/// batch: the loss, the gradients, the updated parameters and the moments must agree within
/// `tolerance` (relative).
pub fn check_training_step(
    reference: &Device,
    tested: &Device,
    tolerance: f64,
    seed: u64,
) -> anyhow::Result<Vec<Check>> {
    let cfg = tiny_model();
    let params = random_params(&cfg, seed);
    let images = 4;
    let data = TokenSet::from_tokens(
        random_tokens(images * cfg.n_ctx(), cfg.n_vocab, seed + 1),
        cfg.n_ctx(),
        cfg.n_vocab,
        None,
    )?;
    let train = TrainConfig {
        steps: 10,
        batch: images,
        micro_batch: images / 2,
        lr: 1e-3,
        warmup: 1,
        // Large enough that a gradient near zero, whose sign is rounding noise, moves its
        // parameter by a fraction of the rate only.
        eps: 1e-6,
        weight_decay: 0.1,
        clip: 1.0,
        seed,
        ..TrainConfig::default()
    };
    let r = one_step(reference, &cfg, &train, &params, &data)?;
    let t = one_step(tested, &cfg, &train, &params, &data)?;
    let loss_err = if r.loss.is_nan() || t.loss.is_nan() {
        f64::NAN
    } else {
        (t.loss - r.loss).abs() / r.loss.abs().max(1e-30)
    };
    let mut checks = vec![Check::measured(
        "training step: loss",
        loss_err,
        tolerance,
        format!("reference {:.6}, tested {:.6} nats/token", r.loss, t.loss),
    )];
    for (k, what) in ["parameters", "gradients", "Adam m", "Adam v"]
        .iter()
        .enumerate()
    {
        let e = relative_error(&t.arenas[k], &r.arenas[k]);
        checks.push(Check::measured(
            &format!("training step: {what}"),
            e,
            tolerance,
            format!("{} values", r.arenas[k].len()),
        ));
    }
    Ok(checks)
}

/// On `device`, the KV-cache decoder's logits at every position against the full forward
/// pass's logits for the same tokens: fed one position at a time, after a prefill of known
/// tokens, and with bfloat16 weights and caches (against the bf16 forward pass). Then over a
/// context of 256 positions, where a GPU with fewer than two of the step's blocks (images x
/// heads) per multiprocessor splits each head's keys among blocks (kernels.cu: attend,
/// attend_combine).
pub fn check_decoder(
    device: &Device,
    tolerances: Tolerances,
    seed: u64,
) -> anyhow::Result<Vec<Check>> {
    let long_context = ModelConfig {
        n_layer: 1,
        side: 16,
        n_head: 2,
        ..tiny_model()
    };
    let mut checks = Vec::new();
    for (cfg, precision, prefill, name, tolerance) in [
        (
            tiny_model(),
            Precision::F32,
            0,
            "decoder (f32)",
            tolerances.products(),
        ),
        (
            tiny_model(),
            Precision::F32,
            9,
            "decoder (f32, after a prefill)",
            tolerances.products(),
        ),
        (
            tiny_model(),
            Precision::Bf16,
            0,
            "decoder (bf16)",
            tolerances.bf16_products,
        ),
        (
            tiny_model(),
            Precision::Bf16,
            9,
            "decoder (bf16, after a prefill)",
            tolerances.bf16_products,
        ),
        (
            long_context.clone(),
            Precision::F32,
            0,
            "decoder (f32, 256 positions)",
            tolerances.products(),
        ),
        (
            long_context,
            Precision::Bf16,
            0,
            "decoder (bf16, 256 positions)",
            tolerances.bf16_products,
        ),
    ] {
        let (t, batch) = (cfg.n_ctx(), 2);
        let worst = decoder_against_forward(device, &cfg, precision, batch, prefill, seed)?;
        checks.push(Check::measured(
            name,
            worst,
            tolerance,
            format!("logits at positions {prefill}..{t} of {batch} images"),
        ));
    }
    Ok(checks)
}

/// The largest relative error of a decoder's logits at positions `prefill..` (the positions
/// before fed as one prefill) against the full forward pass's, over `batch` random images.
fn decoder_against_forward(
    device: &Device,
    cfg: &ModelConfig,
    precision: Precision,
    batch: usize,
    prefill: usize,
    seed: u64,
) -> anyhow::Result<f64> {
    let (t, v) = (cfg.n_ctx(), cfg.n_vocab);
    let params = random_params(cfg, seed + 2);
    let tokens = random_tokens(batch * t, v, seed + 3);
    let mut engine = Engine::with_precision(cfg, batch, device, params.clone(), precision)
        .with_context(|| format!("an engine on {device}"))?;
    engine.forward(&tokens)?;
    let mut full = Vec::new();
    engine.logits(&mut full);
    let mut dec = Decoder::with_precision(cfg, batch, device, params, precision)
        .with_context(|| format!("a decoder on {device}"))?;
    if prefill > 0 {
        let known: Vec<u16> = (0..batch)
            .flat_map(|b| tokens[b * t..b * t + prefill].to_vec())
            .collect();
        dec.prefill(&known, prefill)?;
    } else {
        dec.reset();
    }
    let mut worst = 0.0;
    for pos in prefill..t {
        let prev: Vec<u16> = (0..batch)
            .map(|b| if pos == 0 { 0 } else { tokens[b * t + pos - 1] })
            .collect();
        let got = dec.step(&prev)?;
        let want: Vec<f32> = (0..batch)
            .flat_map(|b| full[(b * t + pos) * v..(b * t + pos + 1) * v].to_vec())
            .collect();
        worst = worse(worst, relative_error(got, &want));
    }
    Ok(worst)
}

/// Name of the check of replayed decoding steps.
pub const DECODER_REPLAY: &str = "decoder: replayed steps vs call by call";

/// On `device`, a decoder whose steps are recorded once and replayed (CUDA graphs on a GPU)
/// against one that issues every call, both stepping the same tokens through a whole image,
/// f32 and bf16, with a sequence dropped halfway (a second recording). Skipped where the
/// device does not record.
pub fn check_replay(device: &Device, tolerances: Tolerances, seed: u64) -> anyhow::Result<Check> {
    let cfg = tiny_model();
    let (t, v, batch) = (cfg.n_ctx(), cfg.n_vocab, 3);
    let params = random_params(&cfg, seed + 4);
    let tokens = random_tokens(batch * t, v, seed + 5);
    let mut worst = 0.0;
    for precision in [Precision::F32, Precision::Bf16] {
        let open = || {
            Decoder::with_precision(&cfg, batch, device, params.clone(), precision)
                .with_context(|| format!("a decoder on {device}"))
        };
        let (mut replayed, mut direct) = (open()?, open()?);
        direct.set_replay(false);
        let mut kept: Vec<usize> = (0..batch).collect();
        for pos in 0..t {
            if pos == t / 2 {
                kept = vec![0, 2];
                replayed.retain(&kept)?;
                direct.retain(&kept)?;
            }
            let prev: Vec<u16> = kept
                .iter()
                .map(|&b| if pos == 0 { 0 } else { tokens[b * t + pos - 1] })
                .collect();
            let got = replayed.step(&prev)?.to_vec();
            let want = direct.step(&prev)?;
            worst = worse(worst, relative_error(&got, want));
        }
        if let Some(why) = replayed.replay_failure() {
            anyhow::bail!("recording a decoding step failed: {why}");
        }
        if !replayed.replaying() {
            return Ok(Check::skipped(
                DECODER_REPLAY,
                &format!("{device} does not record steps: each call is issued as it comes"),
            ));
        }
    }
    Ok(Check::measured(
        DECODER_REPLAY,
        worst,
        tolerances.f32_elementwise,
        format!("logits of {t} positions, f32 and bf16, replayed against issued call by call"),
    ))
}

/// Name of the check of tokens drawn on the device.
pub const DEVICE_DRAWS: &str = "decoder: tokens drawn on the device vs on the host";

/// On `device`, whole images generated with the tokens drawn on the device (each step's
/// tokens feed the next there; the host fetches them once a row) against a second decoder with
/// the same weights stepped with the tokens drawn on the host from downloaded logits: the same
/// numbers, so the same tokens. Three images with their own options (the whole palette, top-k
/// and top-p, a low temperature), one dropped after its second row; f32 and bf16. The error
/// counts the tokens that differ.
pub fn check_device_draws(device: &Device, seed: u64) -> anyhow::Result<Check> {
    let cfg = tiny_model();
    let (t, side, batch) = (cfg.n_ctx(), cfg.side, 3);
    let params = random_params(&cfg, seed + 6);
    let plain = SampleOptions {
        seed,
        ..Default::default()
    };
    let options = [
        plain,
        SampleOptions {
            top_k: 5,
            top_p: 0.9,
            ..plain
        },
        SampleOptions {
            temperature: 0.7,
            ..plain
        },
    ];
    let specs: Vec<ImageSpec> = (0..batch)
        .map(|i| ImageSpec {
            prefix: &[],
            opts: options[i],
            stream: i as u64,
        })
        .collect();
    let dropped_after = 2 * side;
    let (mut differ, mut replayed) = (0, true);
    for precision in [Precision::F32, Precision::Bf16] {
        let open = || {
            Decoder::with_precision(&cfg, batch, device, params.clone(), precision)
                .with_context(|| format!("a decoder on {device}"))
        };
        let mut on_device = open()?;
        let got = sample::generate_images(&mut on_device, &specs, 0, |row, _, wanted| {
            if (row + 1) * side == dropped_after {
                wanted[1] = false;
            }
        })?
        .tokens;
        if let Some(why) = on_device.replay_failure() {
            anyhow::bail!("recording a decoding step failed: {why}");
        }
        replayed &= on_device.replaying();
        // The host's way: logits downloaded every step, tokens drawn and fed back.
        let mut host = open()?;
        host.reset();
        let mut numbers = vec![0.0; batch * t];
        for (spec, row) in specs.iter().zip(numbers.chunks_mut(t)) {
            sample::draw_numbers(spec, row);
        }
        let (mut live, mut prev) = ((0..batch).collect::<Vec<_>>(), vec![0u16; batch]);
        let (mut want, mut drawn) = (vec![0u16; batch * t], Vec::new());
        for pos in 0..t {
            if pos == dropped_after {
                let keep = [0, 2];
                host.retain(&keep)?;
                live = keep.to_vec();
                prev = keep.iter().map(|&r| prev[r]).collect();
                numbers = keep
                    .iter()
                    .flat_map(|&r| numbers[r * t..(r + 1) * t].to_vec())
                    .collect();
            }
            let logits = host.step(&prev)?;
            sample::next_tokens(logits, &live, &specs, pos, &numbers, &mut drawn);
            for (r, &i) in live.iter().enumerate() {
                want[i * t + pos] = drawn[r].0;
                prev[r] = drawn[r].0;
            }
        }
        differ += got.iter().zip(&want).filter(|(a, b)| a != b).count();
    }
    Ok(Check::measured(
        DEVICE_DRAWS,
        differ as f64,
        0.0,
        format!(
            "{differ} of {} tokens differ ({batch} images of {t} pixels, f32 and bf16; steps {})",
            2 * batch * t,
            if replayed {
                "replayed from recordings"
            } else {
                "issued call by call"
            }
        ),
    ))
}

/// Name of the bf16 training check.
pub const BF16_TRAINING: &str = "bf16 training vs f32 (loss curve)";

/// Steps per point of the smoothed loss curves.
const SMOOTHING: usize = 20;

/// Why `device` cannot train in bfloat16 (so the bf16 training check does not apply), or None
/// when it can.
pub fn bf16_training_unavailable(device: &Device) -> Option<String> {
    let f32 = device.with_training_precision(Precision::F32).ok();
    let bf16 = device.with_training_precision(Precision::Bf16).ok();
    if bf16.is_some() && bf16 != f32 {
        return None;
    }
    Some(match device {
        Device::Cpu => "the CPU trains in f32 only".to_string(),
        other => format!("{other} trains in f32 only"),
    })
}

/// The shipped Fashion-MNIST split as tokens of a 16-level gray palette, for
/// [`check_bf16_training`].
pub fn fashion_tokens() -> anyhow::Result<TokenSet> {
    let images = crate::data::builtin_fashion()?;
    let palette = crate::palette::Palette::uniform_gray(16)?;
    TokenSet::quantise(&images, &palette, crate::data::BUILTIN_FASHION)
}

/// `steps` training steps of a small model on `data` with bfloat16 products and with f32
/// products, on the same device from the same start: the bf16 loss curve (means of each 20
/// steps) must stay within 2% of the f32 one. Skipped where the device trains in f32 only.
pub fn check_bf16_training(device: &Device, data: &TokenSet, steps: u64) -> anyhow::Result<Check> {
    if let Some(why) = bf16_training_unavailable(device) {
        return Ok(Check::skipped(BF16_TRAINING, &why));
    }
    anyhow::ensure!(
        steps as usize >= SMOOTHING,
        "the bf16 training check needs at least {SMOOTHING} steps (got {steps})"
    );
    let side = (data.header.t as f64).sqrt().round() as usize;
    anyhow::ensure!(
        side * side == data.header.t,
        "the bf16 training check needs square images ({} tokens per image)",
        data.header.t
    );
    let cfg = ModelConfig {
        n_layer: 2,
        n_embd: 64,
        n_head: 2,
        n_vocab: data.header.n_vocab,
        side,
        channels: 1,
        objective: Default::default(),
    };
    let train = TrainConfig {
        steps,
        batch: 8,
        micro_batch: 8,
        lr: 2e-3,
        warmup: 20,
        ..TrainConfig::default()
    };
    let params = crate::model::init_params(&cfg, 0);
    let curve = |precision: Precision| -> anyhow::Result<Vec<f64>> {
        let dev = device.with_training_precision(precision)?;
        let mut trainer = Trainer::new(&cfg, train.clone(), &params, &dev)
            .with_context(|| format!("a trainer on {dev} with {precision} products"))?;
        let mut losses = Vec::with_capacity(steps as usize);
        for _ in 0..steps {
            losses.push(trainer.step(data)?.loss);
        }
        Ok(losses
            .chunks_exact(SMOOTHING)
            .map(|c| c.iter().sum::<f64>() / c.len() as f64)
            .collect())
    };
    let f32_curve = curve(Precision::F32)?;
    let bf16_curve = curve(Precision::Bf16)?;
    let mut worst = 0.0;
    for (b, f) in bf16_curve.iter().zip(&f32_curve) {
        worst = worse(worst, (b - f).abs() / f.abs().max(1e-30));
    }
    Ok(Check::measured(
        BF16_TRAINING,
        worst,
        0.02,
        format!(
            "{steps} steps; mean loss of the last {SMOOTHING}: f32 {:.4}, bf16 {:.4}",
            f32_curve.last().copied().unwrap_or(f64::NAN),
            bf16_curve.last().copied().unwrap_or(f64::NAN)
        ),
    ))
}

/// What [`run`] does besides the kernel, training-step and decoder checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Seed of every random input.
    pub seed: u64,
    /// Steps of the bf16-against-f32 training run; None skips it.
    pub bf16_steps: Option<u64>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            seed: 0,
            bf16_steps: Some(200),
        }
    }
}

/// Every check of one device against the CPU.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub device: String,
    pub reference: String,
    pub checks: Vec<Check>,
}

impl Report {
    /// Whether every check that ran passed.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }

    /// The checks that failed.
    pub fn failures(&self) -> Vec<&Check> {
        self.checks.iter().filter(|c| !c.passed).collect()
    }

    /// A plain text table: check | max error | tolerance | result, then the details of any
    /// failed or skipped check.
    pub fn table(&self) -> String {
        let width = self
            .checks
            .iter()
            .map(|c| c.name.len())
            .chain(["kernel".len()])
            .max()
            .unwrap_or(0);
        let mut s = format!(
            "{} against {}\n{:<width$} | {:>10} | {:>9} | result\n{}\n",
            self.device,
            self.reference,
            "kernel",
            "max error",
            "tolerance",
            "-".repeat(width + 33)
        );
        for c in &self.checks {
            let (err, tol) = if c.skipped {
                ("-".to_string(), "-".to_string())
            } else {
                (
                    format!("{:.3e}", c.max_error),
                    format!("{:.0e}", c.tolerance),
                )
            };
            s += &format!(
                "{:<width$} | {err:>10} | {tol:>9} | {}\n",
                c.name,
                c.result()
            );
        }
        for c in self.checks.iter().filter(|c| c.skipped || !c.passed) {
            s += &format!("{}: {} ({})\n", c.name, c.result(), c.detail);
        }
        let failed = self.failures().len();
        s += &if failed == 0 {
            format!("all {} checks passed\n", self.checks.len())
        } else {
            format!("{failed} of {} checks FAILED\n", self.checks.len())
        };
        s
    }

    pub fn to_json(&self) -> anyhow::Result<String> {
        serde_json::to_string_pretty(self).context("cannot write the self-test report as JSON")
    }
}

/// Proves `device` against the CPU: every kernel (with the device's precision of products),
/// one training step and the decoder (with f32 products, where results must agree closely),
/// and the bf16 training run as `options` ask.
pub fn run(device: &Device, options: &Options) -> anyhow::Result<Report> {
    let reference = Device::Cpu;
    let mut ref_backend = reference
        .open()
        .context("opening the reference backend (cpu)")?;
    let mut tested = device
        .open()
        .with_context(|| format!("opening {device} for its self-test"))?;
    // Every kernel with exact f32 products first, at f32 tolerances.
    let exact = device.with_training_precision(Precision::F32)?;
    let tol = Tolerances::for_products(Precision::F32);
    let mut exact_backend = exact
        .open()
        .with_context(|| format!("opening {device} for its self-test"))?;
    let mut checks = check_kernels(
        ref_backend.as_mut(),
        exact_backend.as_mut(),
        tol,
        options.seed,
    );
    drop(exact_backend);
    // Then, where the device's products are faster and rounder, the kernels that use them
    // again at their own tolerance.
    if device.training_precision() != Precision::F32 {
        let products = device.training_precision();
        let tol = Tolerances::for_products(products);
        let again = check_kernels(ref_backend.as_mut(), tested.as_mut(), tol, options.seed);
        checks.extend(
            again
                .into_iter()
                .filter(|c| c.name.starts_with("matmul") || c.name.starts_with("attention_"))
                .map(|mut c| {
                    c.name = format!("{} [{products} products]", c.name);
                    c
                }),
        );
    }
    // Release both backends' arenas before the models plan their own.
    drop((ref_backend, tested));

    let step = check_training_step(&reference, &exact, tol.f32_products, options.seed);
    checks.extend(step.unwrap_or_else(|e| vec![Check::failed("training step", &e)]));
    let exact_tol = Tolerances::for_products(Precision::F32);
    let dec = check_decoder(&exact, exact_tol, options.seed);
    checks.extend(dec.unwrap_or_else(|e| vec![Check::failed("decoder", &e)]));
    let replay = check_replay(device, exact_tol, options.seed);
    checks.push(replay.unwrap_or_else(|e| Check::failed(DECODER_REPLAY, &e)));
    let draws = check_device_draws(device, options.seed);
    checks.push(draws.unwrap_or_else(|e| Check::failed(DEVICE_DRAWS, &e)));

    let bf16 = match (options.bf16_steps, bf16_training_unavailable(device)) {
        (_, Some(why)) => Check::skipped(BF16_TRAINING, &why),
        (None, None) => Check::skipped(BF16_TRAINING, "not asked for in this run"),
        (Some(steps), None) => fashion_tokens()
            .and_then(|data| check_bf16_training(device, &data, steps))
            .unwrap_or_else(|e| Check::failed(BF16_TRAINING, &e)),
    };
    checks.push(bf16);
    Ok(Report {
        device: device.to_string(),
        reference: reference.to_string(),
        checks,
    })
}
