//! Every kernel of the [`Backend`] trait, on every device this build can open: forward passes
//! against naive references, backward passes against finite differences of the backend's own
//! forward pass, decoding steps against the full forward pass. The checks go through the trait
//! only, so a new backend runs the same ones as the CPU.

use igpt::backend::{
    AdamStep, Arena, ArenaSizes, AttnShape, Backend, DType, Device, DrawSizes, LogitGradient, Op,
    Update, View,
};
use igpt::sample::{SampleOptions, SampleScratch, choose_token};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn rand_vec(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| (r.random::<f32>() * 2.0 - 1.0) * scale)
        .collect()
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-6);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
        / scale
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// Central finite difference of `f` with respect to `x[i]`, in f64.
fn fd(x: &mut [f32], i: usize, h: f32, f: &mut dyn FnMut(&[f32]) -> f64) -> f64 {
    let orig = x[i];
    x[i] = orig + h;
    let up = f(x);
    x[i] = orig - h;
    let down = f(x);
    x[i] = orig;
    (up - down) / (2.0 * h as f64)
}

/// Checks an analytic gradient against finite differences at a spread of coordinates.
fn check_grad(name: &str, x: &mut [f32], analytic: &[f32], f: &mut dyn FnMut(&[f32]) -> f64) {
    let n = x.len();
    assert_eq!(analytic.len(), n, "{name}: gradient length");
    let step = (n / 23).max(1);
    let scale = analytic.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
    for i in (0..n).step_by(step) {
        let num = fd(x, i, 1e-2, f);
        let err = (num - analytic[i] as f64).abs();
        assert!(
            err <= 2e-3 * scale.max(1e-3) + 1e-4,
            "{name}[{i}]: analytic {} vs numeric {num}",
            analytic[i]
        );
    }
}

/// Positions each rig's rows can draw tokens at.
const DRAW_POSITIONS: usize = 8;

/// Elements of 16-bit storage (and of bf16 product scratch) every rig has.
const HALF: usize = 1 << 16;

/// A backend opened on one device, handing out consecutive views of its activation arena.
struct Rig {
    b: Box<dyn Backend>,
    acts: usize,
    next: usize,
    /// Elements of the 16-bit arena, and the next free one.
    half: usize,
    next_half: usize,
}

impl Rig {
    /// `acts` floats of activations, `tokens` token slots, row-wise kernels up to
    /// `rows x width`.
    fn new(device: Device, acts: usize, tokens: usize, rows: usize, width: usize) -> Self {
        Self::with_params(device, 0, acts, tokens, rows, width)
    }

    /// As [`Rig::new`], with `params` floats of parameters (and as many of gradients and of
    /// each Adam moment).
    fn with_params(
        device: Device,
        params: usize,
        acts: usize,
        tokens: usize,
        rows: usize,
        width: usize,
    ) -> Self {
        let mut b = device
            .open()
            .unwrap_or_else(|e| panic!("{device}: open: {e}"));
        b.allocate(ArenaSizes {
            params,
            grads: params,
            acts,
            half: HALF,
            max_packed_input: HALF,
            tokens,
            max_rows: rows,
            max_width: width,
            // Every vocabulary these tests use, and its start token.
            embedding_rows: 64,
            draws: DrawSizes {
                rows: tokens,
                positions: DRAW_POSITIONS,
                width: 64,
            },
        })
        .unwrap_or_else(|e| panic!("{device}: allocate: {e}"));
        Self {
            b,
            acts,
            next: 0,
            half: HALF,
            next_half: 0,
        }
    }

    /// The next `n` elements of the 16-bit arena.
    fn half_view(&mut self, n: usize) -> View {
        let v = View::bf16(self.next_half, n);
        self.next_half += n.next_multiple_of(32);
        assert!(
            self.next_half <= self.half,
            "test rig: 16-bit arena too small"
        );
        v
    }

    /// The next `n` floats of the activation arena (offsets aligned to 16 floats, as the
    /// engine plans them).
    fn view(&mut self, n: usize) -> View {
        let v = View::new(Arena::Acts, self.next, n);
        self.next += n.next_multiple_of(16);
        assert!(
            self.next <= self.acts,
            "test rig: {} floats of activations planned, {} used",
            self.acts,
            self.next
        );
        v
    }

    /// A fresh view holding `data`.
    fn put(&mut self, data: &[f32]) -> View {
        let v = self.view(data.len());
        self.b.upload(v, data);
        v
    }

    fn set(&mut self, v: View, data: &[f32]) {
        self.b.upload(v, data);
    }

    fn get(&self, v: View) -> Vec<f32> {
        let mut out = vec![0.0; v.len];
        self.b.download(v, &mut out);
        out
    }

    /// Hands the whole activation arena out again.
    fn reset(&mut self) {
        self.next = 0;
        self.next_half = 0;
    }
}

fn naive_matmul(a: &[f32], ta: Op, b: &[f32], tb: Op, m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f64;
            for p in 0..k {
                let av = match ta {
                    Op::N => a[i * k + p],
                    Op::T => a[p * m + i],
                };
                let bv = match tb {
                    Op::N => b[p * n + j],
                    Op::T => b[j * k + p],
                };
                s += (av * bv) as f64;
            }
            out[i * n + j] = s as f32;
        }
    }
    out
}

#[test]
fn matmul_matches_naive_for_every_layout() {
    let cases: [(usize, usize, usize); 4] =
        [(1, 1, 1), (37, 19, 23), (130, 64, 48), (16, 300, 200)];
    let cap = cases
        .iter()
        .map(|&(m, k, n)| (m * k + k * n + m * n).next_multiple_of(16) + 32)
        .max()
        .unwrap();
    for device in Device::available() {
        let mut r = Rig::new(device, cap, 0, 1, 1);
        for &(m, k, n) in &cases {
            for ta in [Op::N, Op::T] {
                for tb in [Op::N, Op::T] {
                    r.reset();
                    let a = rand_vec(m * k, 1, 1.0);
                    let b = rand_vec(k * n, 2, 1.0);
                    let want = naive_matmul(&a, ta, &b, tb, m, k, n);
                    let (av, bv) = (r.put(&a), r.put(&b));
                    // Without accumulate, what was in the output is overwritten.
                    let out = r.put(&vec![7.0; m * n]);
                    r.b.matmul(out, av, ta, bv, tb, m, k, n, false);
                    let e = max_rel(&r.get(out), &want);
                    assert!(e < 1e-5, "{device} matmul {m}x{k}x{n} {ta:?}{tb:?}: {e}");
                    // Accumulating adds onto what is there.
                    r.set(out, &vec![1.0; m * n]);
                    r.b.matmul(out, av, ta, bv, tb, m, k, n, true);
                    let want1: Vec<f32> = want.iter().map(|v| v + 1.0).collect();
                    let e = max_rel(&r.get(out), &want1);
                    assert!(
                        e < 1e-5,
                        "{device} matmul {m}x{k}x{n} {ta:?}{tb:?} accumulate: {e}"
                    );
                }
            }
        }
    }
}

/// Products with bfloat16 weights: the backend's packed product equals the f64 product of the
/// inputs and the bf16-rounded weights (the inputs keep at least 16 bits), for row counts that
/// hit every register tile, odd `k`, and `n` off the 16-column panels.
#[test]
fn packed_bf16_matmul_matches_the_rounded_product() {
    use igpt::backend::cpu::bf16::{from_bf16, to_bf16};
    let round = |x: &[f32]| -> Vec<f32> { x.iter().map(|&v| from_bf16(to_bf16(v))).collect() };
    let cases: [(usize, usize, usize); 7] = [
        (1, 64, 48),
        (2, 5, 7),
        (3, 33, 100),
        (5, 64, 64),
        (8, 31, 80),
        (13, 48, 33),
        (70, 40, 130),
    ];
    let cap = cases
        .iter()
        .map(|&(m, k, n)| (2 * m * n + m * k + k * n).next_multiple_of(16) + 64)
        .max()
        .unwrap();
    for device in Device::available() {
        let mut r = Rig::new(device, cap, 0, 1, 1);
        for &(m, k, n) in &cases {
            for op in [Op::N, Op::T] {
                r.reset();
                let a = rand_vec(m * k, 11, 1.0);
                let w = rand_vec(k * n, 12, 1.0);
                let want = naive_matmul(&a, Op::N, &round(&w), op, m, k, n);
                let (av, wv) = (r.put(&a), r.put(&w));
                let packed = r.half_view(r.b.packed_len(k, n));
                r.b.pack_weight(packed, wv, op, k, n);
                let out = r.put(&vec![7.0; m * n]);
                r.b.matmul_packed(out, av, packed, m, k, n, false);
                let e = max_rel(&r.get(out), &want);
                assert!(e < 1e-5, "{device} packed {m}x{k}x{n} {op:?}: {e}");
                r.set(out, &vec![1.0; m * n]);
                r.b.matmul_packed(out, av, packed, m, k, n, true);
                let want1: Vec<f32> = want.iter().map(|v| v + 1.0).collect();
                let e = max_rel(&r.get(out), &want1);
                assert!(
                    e < 1e-5,
                    "{device} packed {m}x{k}x{n} {op:?} accumulate: {e}"
                );
            }
        }
    }
}

/// Each value rounded to bfloat16 and widened back.
fn rounded(x: &[f32]) -> Vec<f32> {
    use igpt::backend::cpu::bf16::{from_bf16, to_bf16};
    x.iter().map(|&v| from_bf16(to_bf16(v))).collect()
}

/// The kernels that may store their output as bfloat16 store the f32 output rounded, and a
/// packed product reads a bf16 input as the f32 input of the same values.
#[test]
fn outputs_stored_as_bf16_are_the_f32_outputs_rounded() {
    let (rows, d, n) = (5, 48, 40);
    for device in Device::available() {
        let mut r = Rig::new(device, 4096, 0, rows, 4 * d);
        let (x, g) = (rand_vec(rows * d, 31, 2.0), rand_vec(d, 32, 1.0));
        let (xv, gv) = (r.put(&x), r.put(&g));
        let (out, rstd) = (r.view(rows * d), r.view(rows));
        r.b.rmsnorm_forward(out, rstd, xv, gv, d);
        let (out16, rstd16) = (r.half_view(rows * d), r.view(rows));
        r.b.rmsnorm_forward(out16, rstd16, xv, gv, d);
        let normed = rounded(&r.get(out));
        assert_ne!(
            normed,
            r.get(out),
            "{device}: the test needs values bf16 cannot hold"
        );
        assert_eq!(r.get(out16), normed, "{device} rmsnorm_forward into bf16");
        assert_eq!(
            r.get(rstd16),
            r.get(rstd),
            "{device} rmsnorm_forward's rstd"
        );

        let act = r.view(rows * d);
        r.b.gelu_forward(act, xv);
        let act16 = r.half_view(rows * d);
        r.b.gelu_forward(act16, xv);
        assert_eq!(
            r.get(act16),
            rounded(&r.get(act)),
            "{device} gelu_forward into bf16"
        );

        let wv = r.put(&rand_vec(d * n, 33, 1.0));
        let packed = r.half_view(r.b.packed_len(d, n));
        r.b.pack_weight(packed, wv, Op::N, d, n);
        let same_values = r.put(&normed);
        let (from16, from32) = (r.view(rows * n), r.view(rows * n));
        r.b.matmul_packed(from16, out16, packed, rows, d, n, false);
        r.b.matmul_packed(from32, same_values, packed, rows, d, n, false);
        assert_eq!(
            r.get(from16),
            r.get(from32),
            "{device} matmul_packed of a bf16 input"
        );
    }
}

/// The CPU's AVX-512 BF16 kernel and its portable loop compute the same products (where this
/// CPU has the instructions; elsewhere only the portable loop exists).
#[test]
fn native_and_portable_bf16_products_agree() {
    use igpt::backend::cpu::bf16;
    for &(m, k, n) in &[
        (1usize, 256usize, 768usize),
        (4, 77, 50),
        (9, 64, 40),
        (64, 30, 70),
    ] {
        let a = rand_vec(m * k, 21, 1.0);
        let w = rand_vec(k * n, 22, 1.0);
        let mut packed = vec![0u16; bf16::packed_len(k, n)];
        bf16::pack(&mut packed, &w, Op::N, k, n);
        let mut scratch = vec![0u16; bf16::input_scratch_len(m, k)];
        let run = |native: bool, scratch: &mut [u16]| {
            let mut out = vec![0.0f32; m * n];
            bf16::matmul(&mut out, &a, &packed, scratch, m, k, n, false, native);
            out
        };
        let portable = run(false, &mut scratch);
        let native = run(true, &mut scratch);
        let e = max_rel(&native, &portable);
        assert!(e < 1e-5, "{m}x{k}x{n}: native vs portable {e}");
        if !bf16::native() {
            assert_eq!(
                native, portable,
                "without AVX-512 BF16 both are the portable loop"
            );
        }
    }
}

fn rmsnorm_naive(x: &[f32], g: &[f32], d: usize) -> Vec<f32> {
    x.chunks(d)
        .flat_map(|r| {
            let ms = r.iter().map(|v| (v * v) as f64).sum::<f64>() / d as f64;
            let s = 1.0 / (ms + 1e-5).sqrt();
            r.iter()
                .zip(g)
                .map(move |(v, gv)| (*v as f64 * s * *gv as f64) as f32)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn rmsnorm_forward_and_backward() {
    let (rows, d) = (300, 40);
    for device in Device::available() {
        let mut r = Rig::new(device, 4 * rows * d + 2 * rows + 4 * d + 128, 0, rows, d);
        let x = rand_vec(rows * d, 3, 2.0);
        let mut g = rand_vec(d, 4, 1.0);
        let w = rand_vec(rows * d, 5, 1.0); // loss = sum(out * w)
        let (xv, gv, wv) = (r.put(&x), r.put(&g), r.put(&w));
        let (out, rstd) = (r.view(rows * d), r.view(rows));
        r.b.rmsnorm_forward(out, rstd, xv, gv, d);
        let e = max_rel(&r.get(out), &rmsnorm_naive(&x, &g, d));
        assert!(e < 1e-5, "{device} rmsnorm_forward: {e}");

        // The backward pass adds into dx and dg: start them from something other than zero.
        let (dx0, dg0) = (rand_vec(rows * d, 19, 1.0), rand_vec(d, 20, 1.0));
        let (dxv, dgv) = (r.put(&dx0), r.put(&dg0));
        r.b.rmsnorm_backward(dxv, None, dgv, wv, xv, rstd, gv, d);
        let sub =
            |a: Vec<f32>, b: &[f32]| -> Vec<f32> { a.iter().zip(b).map(|(x, y)| x - y).collect() };
        let dx = sub(r.get(dxv), &dx0);
        let dg = sub(r.get(dgv), &dg0);

        let loss = |r: &mut Rig, xx: &[f32], gg: &[f32]| -> f64 {
            r.set(xv, xx);
            r.set(gv, gg);
            r.b.rmsnorm_forward(out, rstd, xv, gv, d);
            dot(&r.get(out), &w)
        };
        let g0 = g.clone();
        check_grad(
            &format!("{device} rmsnorm_backward dx (added)"),
            &mut x.clone(),
            &dx,
            &mut |xx| loss(&mut r, xx, &g0),
        );
        check_grad(
            &format!("{device} rmsnorm_backward dg (added)"),
            &mut g,
            &dg,
            &mut |gg| loss(&mut r, &x, gg),
        );
    }
}

fn attention_naive(qkv: &[f32], s: AttnShape) -> Vec<f32> {
    let (t, h, hd) = (s.t, s.n_head, s.head_dim);
    let d = h * hd;
    let mut out = vec![0.0; s.batch * t * d];
    for b in 0..s.batch {
        for hh in 0..h {
            for i in 0..t {
                let q = |c: usize| qkv[(b * t + i) * 3 * d + hh * hd + c] as f64;
                let keys = if s.causal { i + 1 } else { t };
                let scores: Vec<f64> = (0..keys)
                    .map(|j| {
                        (0..hd)
                            .map(|c| q(c) * qkv[(b * t + j) * 3 * d + d + hh * hd + c] as f64)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|v| (v - m).exp()).sum();
                for c in 0..hd {
                    let v: f64 = (0..keys)
                        .map(|j| {
                            (scores[j] - m).exp() / z
                                * qkv[(b * t + j) * 3 * d + 2 * d + hh * hd + c] as f64
                        })
                        .sum();
                    out[(b * t + i) * d + hh * hd + c] = v as f32;
                }
            }
        }
    }
    out
}

/// Longer than one query tile of the CPU kernel (128 rows) and not a multiple of it, and not a
/// multiple of the decoding cache's blocks of 16 either.
const T_TILES: usize = 128 + 37;

/// Views for one attention call: qkv, out, lse, scratch.
fn attention_views(r: &mut Rig, s: AttnShape) -> (View, View, View, View) {
    let d = s.n_head * s.head_dim;
    let rows = s.batch * s.t;
    let scratch = r.b.attention_scratch_len(s);
    (
        r.view(rows * 3 * d),
        r.view(rows * d),
        r.view(s.batch * s.n_head * s.t),
        r.view(scratch),
    )
}

/// Activation floats [`attention_views`] and a gradient of the same shapes need, with room.
fn attention_capacity(device: Device, s: AttnShape) -> usize {
    let d = s.n_head * s.head_dim;
    let rows = s.batch * s.t;
    let scratch = device.open().unwrap().attention_scratch_len(s);
    2 * (rows * 3 * d + 2 * rows * d + s.batch * s.n_head * s.t) + scratch + 256
}

#[test]
fn attention_forward_matches_naive_across_tiles() {
    for device in Device::available() {
        for causal in [true, false] {
            let s = AttnShape {
                batch: 2,
                t: T_TILES,
                n_head: 3,
                head_dim: 8,
                causal,
            };
            let d = 24;
            let rows = s.batch * s.t;
            let mut r = Rig::new(device, attention_capacity(device, s), rows, rows, 3 * d);
            let qkv = rand_vec(rows * 3 * d, 6, 1.5);
            let (qv, out, lse, scratch) = attention_views(&mut r, s);
            r.set(qv, &qkv);
            r.b.attention_forward(out, lse, qv, scratch, s);
            let e = max_rel(&r.get(out), &attention_naive(&qkv, s));
            assert!(e < 1e-5, "{device} attention_forward causal={causal}: {e}");
        }
    }
}

#[test]
fn attention_backward_matches_finite_differences() {
    for device in Device::available() {
        for causal in [true, false] {
            let s = AttnShape {
                batch: 1,
                t: 128 + 5,
                n_head: 2,
                head_dim: 4,
                causal,
            };
            let d = 8;
            let rows = s.t;
            let mut r = Rig::new(device, attention_capacity(device, s), rows, rows, 3 * d);
            let mut qkv = rand_vec(rows * 3 * d, 7, 1.0);
            let w = rand_vec(rows * d, 8, 1.0);
            let (qv, out, lse, scratch) = attention_views(&mut r, s);
            let wv = r.put(&w);
            r.set(qv, &qkv);
            r.b.attention_forward(out, lse, qv, scratch, s);
            let e = max_rel(&r.get(out), &attention_naive(&qkv, s));
            assert!(e < 1e-5, "{device} attention_forward causal={causal}: {e}");
            // The gradient overwrites whatever its buffer held.
            let dqkv = r.put(&vec![7.0; qkv.len()]);
            r.b.attention_backward(dqkv, wv, out, lse, qv, scratch, s);
            let analytic = r.get(dqkv);
            check_grad(
                &format!("{device} attention_backward causal={causal} dqkv"),
                &mut qkv,
                &analytic,
                &mut |x| {
                    r.set(qv, x);
                    r.b.attention_forward(out, lse, qv, scratch, s);
                    dot(&r.get(out), &w)
                },
            );
        }
    }
}

#[test]
fn quick_gelu_forward_and_backward() {
    for device in Device::available() {
        let n = 5000;
        let mut r = Rig::new(device, 3 * n + 64, 0, 1, 1);
        let mut x = rand_vec(n, 9, 6.0);
        let w = rand_vec(n, 21, 1.0); // loss = sum(gelu(x) * w)
        let (xv, out) = (r.put(&x), r.view(n));
        r.b.gelu_forward(out, xv);
        let naive: Vec<f32> = x.iter().map(|&v| v / (1.0 + (-1.702 * v).exp())).collect();
        let e = max_rel(&r.get(out), &naive);
        assert!(e < 1e-5, "{device} gelu_forward: {e}");
        let dv = r.put(&w);
        r.b.gelu_backward(dv, dv, xv);
        let analytic = r.get(dv);
        check_grad(
            &format!("{device} gelu_backward"),
            &mut x,
            &analytic,
            &mut |xx| {
                r.set(xv, xx);
                r.b.gelu_forward(out, xv);
                dot(&r.get(out), &w)
            },
        );
    }
}

/// The embedding the backend should compute: shifted (position 0 the start token, position
/// p the content of id p-1) or direct (id `v` the start token, id `v + 1` no content).
#[allow(clippy::too_many_arguments)]
fn embed_naive(
    ids: &[u16],
    wte: &[f32],
    wpe: &[f32],
    sos: &[f32],
    t: usize,
    d: usize,
    direct: bool,
) -> Vec<f32> {
    let v = wte.len() / d;
    let mut o = vec![0.0; ids.len() * d];
    for (row, out) in o.chunks_mut(d).enumerate() {
        let (b, p) = (row / t, row % t);
        let id = if direct {
            Some(ids[row] as usize)
        } else if p == 0 {
            None
        } else {
            Some(ids[b * t + p - 1] as usize)
        };
        for c in 0..d {
            let content = match id {
                None => sos[c],
                Some(i) if i < v => wte[i * d + c],
                Some(i) if i == v => sos[c],
                Some(i) => {
                    assert_eq!(i, v + 1);
                    0.0
                }
            };
            out[c] = content + wpe[p * d + c];
        }
    }
    o
}

#[test]
fn embedding_forward_and_backward() {
    let (v, t, d, batch) = (11, 9, 6, 3);
    for device in Device::available() {
        for direct in [false, true] {
            // Direct ids cover the start token (v) and the masked position (v + 1) too.
            let n_ids = if direct { v + 2 } else { v };
            let tokens: Vec<u16> = (0..batch * t)
                .map(|i| ((i * 7 + 3) % n_ids) as u16)
                .collect();
            if direct {
                assert!(tokens.contains(&(v as u16)) && tokens.contains(&(v as u16 + 1)));
            }
            let mode = if direct { "direct" } else { "shifted" };
            let mut r = Rig::new(
                device,
                4 * (v + t + 1 + batch * t) * d + 256,
                batch * t,
                1,
                d,
            );
            let wte = rand_vec(v * d, 10, 1.0);
            let wpe = rand_vec(t * d, 11, 1.0);
            let sos = rand_vec(d, 12, 1.0);
            let (wtev, wpev, sosv) = (r.put(&wte), r.put(&wpe), r.put(&sos));
            let out = r.view(batch * t * d);
            r.b.set_tokens(&tokens);
            r.b.embed_forward(out, wtev, wpev, sosv, t, d, direct);
            assert_eq!(
                r.get(out),
                embed_naive(&tokens, &wte, &wpe, &sos, t, d, direct),
                "{device} embed_forward {mode}"
            );

            // The backward pass adds into the gradients: start them from something else than
            // zero.
            let w = rand_vec(batch * t * d, 13, 1.0);
            let base = [
                rand_vec(v * d, 22, 1.0),
                rand_vec(t * d, 23, 1.0),
                rand_vec(d, 24, 1.0),
            ];
            let wv = r.put(&w);
            let grads = [r.put(&base[0]), r.put(&base[1]), r.put(&base[2])];
            r.b.embed_backward(grads[0], grads[1], grads[2], wv, t, d, direct);
            let [dwte, dwpe, dsos]: [Vec<f32>; 3] = std::array::from_fn(|k| {
                let got = r.get(grads[k]);
                got.iter().zip(&base[k]).map(|(a, b)| a - b).collect()
            });
            let loss = |r: &mut Rig, view: View, x: &[f32]| -> f64 {
                r.set(view, x);
                r.b.embed_forward(out, wtev, wpev, sosv, t, d, direct);
                dot(&r.get(out), &w)
            };
            for (name, view, x, analytic) in [
                ("dwte", wtev, &wte, &dwte),
                ("dwpe", wpev, &wpe, &dwpe),
                ("dsos", sosv, &sos, &dsos),
            ] {
                let mut xx = x.clone();
                check_grad(
                    &format!("{device} embed_backward {mode} {name} (added)"),
                    &mut xx,
                    analytic,
                    &mut |p| loss(&mut r, view, p),
                );
                r.set(view, x);
            }
        }
    }
}

#[test]
fn decoding_steps_match_the_full_forward_pass() {
    let (v, d, n_head, head_dim, batch, t) = (11, 24, 3, 8, 2, T_TILES);
    let s = AttnShape {
        batch,
        t,
        n_head,
        head_dim,
        causal: true,
    };
    for device in Device::available() {
        let probe = device.open().unwrap();
        let cache_len = probe.decode_cache_len(t);
        assert!(
            cache_len >= t,
            "{device} decode_cache_len({t}) = {cache_len}"
        );
        let cache = batch * n_head * cache_len * head_dim;
        let cap = attention_capacity(device, s)
            + (v + t + 1 + batch * t) * d
            + 3 * cache
            + batch * n_head * cache_len
            + 8 * batch * CHUNK * d
            + 512;
        let mut r = Rig::new(device, cap, batch * t, batch * t, 3 * d);

        // The full passes: shifted embedding and causal attention.
        let tokens: Vec<u16> = (0..batch * t).map(|i| ((i * 5 + 1) % v) as u16).collect();
        let wte = rand_vec(v * d, 25, 1.0);
        let wpe = rand_vec(t * d, 26, 1.0);
        let sos = rand_vec(d, 27, 1.0);
        let (wtev, wpev, sosv) = (r.put(&wte), r.put(&wpe), r.put(&sos));
        let emb = r.view(batch * t * d);
        r.b.set_tokens(&tokens);
        r.b.embed_forward(emb, wtev, wpev, sosv, t, d, false);
        let emb_full = r.get(emb);
        let qkv = rand_vec(batch * t * 3 * d, 28, 1.5);
        let (qv, out, lse, scratch) = attention_views(&mut r, s);
        r.set(qv, &qkv);
        r.b.attention_forward(out, lse, qv, scratch, s);
        let att_full = r.get(out);

        // One position at a time, then several at a time (a prefill), with f32 and bf16
        // caches. The caches start with stale values (a decoder reuses them for the next
        // image), which no step may read beyond its positions.
        let scores = r.view(batch * n_head * cache_len);
        let (emb_step, qkv_step, att_step) = (
            r.view(batch * CHUNK * d),
            r.view(batch * CHUNK * 3 * d),
            r.view(batch * CHUNK * d),
        );
        let f32_caches = (r.view(cache), r.view(cache));
        let bf16_caches = (r.half_view(cache), r.half_view(cache));
        let att_step_bf16 = r.half_view(batch * CHUNK * d);
        for (kc, vc) in [f32_caches, bf16_caches] {
            let tol = if kc.dtype == DType::Bf16 {
                1.5e-2
            } else {
                1e-5
            };
            for chunk in [1, CHUNK] {
                r.b.fill(kc, 50.0);
                r.b.fill(vc, 50.0);
                let mut pos = 0;
                while pos < t {
                    let n = chunk.min(t - pos);
                    // Rows (sequence, position) of a full-pass tensor for positions pos..pos+n.
                    let rows = |x: &[f32], w: usize| -> Vec<f32> {
                        (0..batch)
                            .flat_map(|b| x[(b * t + pos) * w..(b * t + pos + n) * w].to_vec())
                            .collect()
                    };
                    // Each position's previous token; at position 0 it is ignored, whatever it is.
                    let toks = &tokens;
                    let prev: Vec<u16> = (0..batch)
                        .flat_map(|b| {
                            (pos..pos + n).map(move |p| {
                                if p == 0 {
                                    u16::MAX
                                } else {
                                    toks[b * t + p - 1]
                                }
                            })
                        })
                        .collect();
                    let (emb, qkv_n, att) = (
                        View {
                            len: batch * n * d,
                            ..emb_step
                        },
                        View {
                            len: batch * n * 3 * d,
                            ..qkv_step
                        },
                        View {
                            len: batch * n * d,
                            ..att_step
                        },
                    );
                    r.b.set_tokens(&prev);
                    r.b.embed_step(emb, wtev, wpev, sosv, pos, n, d);
                    assert_eq!(
                        r.get(emb),
                        rows(&emb_full, d),
                        "{device} embed_step at positions {pos}..{}",
                        pos + n
                    );
                    r.set(qkv_n, &rows(&qkv, 3 * d));
                    r.b.attention_step(att, kc, vc, qkv_n, scores, s, pos, n);
                    let e = max_rel(&r.get(att), &rows(&att_full, d));
                    assert!(
                        e < tol,
                        "{device} attention_step ({:?} caches) at positions {pos}..{}: {e}",
                        kc.dtype,
                        pos + n
                    );
                    // The same step again (storing the same keys and values), its output
                    // stored as bfloat16: the f32 output, rounded.
                    let att16 = View {
                        len: batch * n * d,
                        ..att_step_bf16
                    };
                    r.b.attention_step(att16, kc, vc, qkv_n, scores, s, pos, n);
                    assert_eq!(
                        r.get(att16),
                        rounded(&r.get(att)),
                        "{device} attention_step ({:?} caches) into bf16 at {pos}",
                        kc.dtype
                    );
                    pos += n;
                }
            }
        }
    }
}

/// Positions per prefill chunk in the decoding test (uneven, so the last chunk is short).
const CHUNK: usize = 7;

fn cross_entropy_naive(z: &[f32], targets: &[u16], v: usize) -> Vec<f64> {
    z.chunks(v)
        .zip(targets)
        .map(|(r, &t)| {
            let m = r.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lz = m + r.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            lz - r[t as usize] as f64
        })
        .collect()
}

#[test]
fn cross_entropy_loss_and_gradient() {
    let (rows, v) = (20, 13);
    for device in Device::available() {
        let mut r = Rig::new(device, 2 * rows * v + 2 * rows + 64, rows, rows, v);
        let logits = rand_vec(rows * v, 14, 4.0);
        let tokens: Vec<u16> = (0..rows).map(|i| (i * 5 % v) as u16).collect();
        // Weighted mode: separate targets, weights 1, 0 and 0.5; the stored tokens (a masked
        // input id here, outside the palette) are then not what is scored.
        let targets: Vec<u16> = (0..rows).map(|i| ((i * 3 + 2) % v) as u16).collect();
        let weights: Vec<f32> = (0..rows).map(|i| [1.0, 0.0, 0.5][i % 3]).collect();
        let inputs = vec![v as u16 + 1; rows];
        let (zv, lv) = (r.view(rows * v), r.view(rows));
        for weighted in [false, true] {
            let mode = if weighted { "weighted" } else { "tokens" };
            let set = |r: &mut Rig| {
                if weighted {
                    r.b.set_tokens(&inputs);
                    r.b.set_targets(&targets, &weights);
                } else {
                    r.b.set_tokens(&tokens);
                }
            };
            let naive = |z: &[f32]| -> Vec<f64> {
                if weighted {
                    cross_entropy_naive(z, &targets, v)
                        .iter()
                        .zip(&weights)
                        .map(|(l, &w)| l * w as f64)
                        .collect()
                } else {
                    cross_entropy_naive(z, &tokens, v)
                }
            };
            set(&mut r);
            r.set(zv, &logits);
            r.b.cross_entropy(zv, lv, v, None);
            assert_eq!(
                r.get(zv),
                logits,
                "{device} cross_entropy {mode}: a pass without gradient leaves the logits alone"
            );
            for (i, (a, b)) in r.get(lv).iter().zip(naive(&logits)).enumerate() {
                assert!(
                    (*a as f64 - b).abs() < 1e-5,
                    "{device} cross_entropy {mode}: loss {i} is {a}, not {b}"
                );
            }
            let gradient = LogitGradient {
                scale: 0.5,
                out: zv,
            };
            r.b.cross_entropy(zv, lv, v, Some(gradient));
            let g = r.get(zv);
            for (i, (a, b)) in r.get(lv).iter().zip(naive(&logits)).enumerate() {
                assert!(
                    (*a as f64 - b).abs() < 1e-5,
                    "{device} cross_entropy {mode} with gradient: loss {i} is {a}, not {b}"
                );
            }
            check_grad(
                &format!("{device} cross_entropy {mode} gradient"),
                &mut logits.clone(),
                &g,
                &mut |z| {
                    r.set(zv, z);
                    r.b.cross_entropy(zv, lv, v, None);
                    0.5 * r.get(lv).iter().map(|&l| l as f64).sum::<f64>()
                },
            );
        }
        // set_tokens clears the targets: the stored tokens are scored again.
        r.b.set_tokens(&tokens);
        r.set(zv, &logits);
        r.b.cross_entropy(zv, lv, v, None);
        for (i, (a, b)) in r
            .get(lv)
            .iter()
            .zip(cross_entropy_naive(&logits, &tokens, v))
            .enumerate()
        {
            assert!(
                (*a as f64 - b).abs() < 1e-5,
                "{device} cross_entropy after set_tokens: loss {i} is {a}, not {b}"
            );
        }
    }
}

/// The model's update (unclipped) on one tensor inside the arenas: AdamW's formula.
#[test]
fn the_update_matches_the_adamw_formula() {
    let n = 100_000;
    // The tensor sits inside the arenas, with neighbours the update must leave alone.
    let (at, total) = (48, n + 96);
    let p0 = rand_vec(n, 15, 1.0);
    let g = rand_vec(n, 16, 1.0);
    let m0 = rand_vec(n, 17, 0.1);
    let v0: Vec<f32> = rand_vec(n, 18, 0.1).iter().map(|x| x.abs()).collect();
    let h = AdamStep {
        lr: 0.01,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 3,
        grad_scale: 0.5,
    };
    for device in Device::available() {
        let mut r = Rig::with_params(device, total, 16, 0, 1, 1);
        let whole = |a: Arena| View::new(a, 0, total);
        let part = |a: Arena| View::new(a, at, n);
        for decay in [true, false] {
            // Neighbours: parameters 3, gradients 1, moments 0.5.
            for (a, fill) in [
                (Arena::Params, 3.0),
                (Arena::Grads, 1.0),
                (Arena::AdamM, 0.5),
                (Arena::AdamV, 0.5),
            ] {
                r.b.fill(whole(a), fill);
            }
            r.b.upload(part(Arena::Params), &p0);
            r.b.upload(part(Arena::Grads), &g);
            r.b.upload(part(Arena::AdamM), &m0);
            r.b.upload(part(Arena::AdamV), &v0);
            r.b.set_update(Update { adam: h, clip: 0.0 });
            r.b.clipped_update(&[(part(Arena::Params), decay)], whole(Arena::Grads));
            let [p, gg, m, v] =
                [Arena::Params, Arena::Grads, Arena::AdamM, Arena::AdamV].map(|a| {
                    let mut out = vec![0.0; total];
                    r.b.download(whole(a), &mut out);
                    out
                });
            let wd = if decay { 0.1 } else { 0.0 };
            for i in (0..n).step_by(997).chain([n - 1]) {
                let gi = g[i] as f64 * 0.5;
                let mi = 0.9 * m0[i] as f64 + 0.1 * gi;
                let vi = 0.95 * v0[i] as f64 + 0.05 * gi * gi;
                let mh = mi / (1.0 - 0.9f64.powi(3));
                let vh = vi / (1.0 - 0.95f64.powi(3));
                let pi = p0[i] as f64 - 0.01 * (mh / (vh.sqrt() + 1e-8) + wd * p0[i] as f64);
                let j = at + i;
                assert!(
                    (p[j] as f64 - pi).abs() < 1e-5,
                    "{device} adamw decay={decay}: param {i}: {} vs {pi}",
                    p[j]
                );
                assert!(
                    (m[j] as f64 - mi).abs() < 1e-6 && (v[j] as f64 - vi).abs() < 1e-6,
                    "{device} adamw decay={decay}: moments {i}: ({}, {}) vs ({mi}, {vi})",
                    m[j],
                    v[j]
                );
            }
            assert_eq!(
                &gg[at..at + n],
                &g[..],
                "{device} adamw decay={decay}: the gradient is left as it is"
            );
            for j in (0..at).chain(at + n..total) {
                assert!(
                    p[j] == 3.0 && gg[j] == 1.0 && m[j] == 0.5 && v[j] == 0.5,
                    "{device} adamw decay={decay}: element {j} outside the view changed"
                );
            }
        }
    }
}

#[test]
fn sum_squares_matches_f64() {
    let n = 100_003;
    let x = rand_vec(n, 29, 2.0);
    let want: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
    for device in Device::available() {
        let mut r = Rig::with_params(device, n + 64, n + 64, 0, 1, 1);
        // Neighbours that must not count.
        r.b.fill(View::new(Arena::Acts, 0, n + 64), 100.0);
        r.b.fill(View::new(Arena::Grads, 0, n + 64), 100.0);
        for arena in [Arena::Acts, Arena::Grads] {
            let v = View::new(arena, 32, n);
            r.b.upload(v, &x);
            let got = r.b.sum_squares(v);
            assert!(
                (got - want).abs() <= 1e-5 * want,
                "{device} sum_squares on {arena:?}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn draw_tokens_draws_what_choose_token_draws_and_feeds_them_to_the_next_step() {
    let (rows, v, d) = (12, 37, 8);
    let options: Vec<SampleOptions> = (0..rows)
        .map(|r| SampleOptions {
            temperature: [1.0, 0.0, 0.8, 1.5][r % 4],
            top_k: [0, 4, 1][r % 3],
            top_p: [1.0, 0.85][r % 2],
            seed: 0,
        })
        .collect();
    let numbers = rand_vec(rows * DRAW_POSITIONS, 3, 1.0)
        .iter()
        .map(|u| u.abs().min(0.999))
        .collect::<Vec<f32>>();
    for device in Device::available() {
        let mut r = Rig::new(device, 4096, rows, rows, d);
        let logits = r.view(rows * v);
        let wte = r.put(&rand_vec(v * d, 4, 1.0));
        let wpe = r.put(&rand_vec(DRAW_POSITIONS * d, 5, 1.0));
        let sos = r.put(&rand_vec(d, 6, 1.0));
        let emb = r.view(rows * d);
        r.b.set_draws(&options, &numbers);
        let mut scratch = SampleScratch::default();
        let mut all = Vec::new();
        for pos in 0..DRAW_POSITIONS {
            let mut z = rand_vec(rows * v, 10 + pos as u64, 3.0);
            for row in z.chunks_mut(v) {
                row[5] = row[2];
                row[9] = f32::NEG_INFINITY;
            }
            r.set(logits, &z);
            r.b.draw_tokens(logits, v, pos);
            let want: Vec<u16> = (0..rows)
                .map(|k| {
                    let u = numbers[k * DRAW_POSITIONS + pos];
                    choose_token(&z[k * v..(k + 1) * v], &options[k], u, &mut scratch)
                })
                .collect();
            let mut got = vec![0; rows];
            r.b.drawn_tokens(pos, pos + 1, &mut got);
            assert_eq!(got, want, "{device}: tokens drawn at position {pos}");
            // The drawn tokens are the next step's inputs.
            r.b.embed_step(emb, wte, wpe, sos, 1, 1, d);
            let (wte_h, wpe_h) = (r.get(wte), r.get(wpe));
            let expect: Vec<f32> = want
                .iter()
                .flat_map(|&t| (0..d).map(move |c| (t as usize, c)))
                .map(|(t, c)| wte_h[t * d + c] + wpe_h[d + c])
                .collect();
            assert_eq!(r.get(emb), expect, "{device}: inputs after position {pos}");
            all.extend(want);
        }
        let mut every = vec![0; rows * DRAW_POSITIONS];
        r.b.drawn_tokens(0, DRAW_POSITIONS, &mut every);
        assert_eq!(
            every, all,
            "{device}: every position's tokens, position-major"
        );
        assert!(
            all.iter().any(|&t| t != all[0]),
            "{device}: the draws should not all be one colour"
        );
    }
}
