//! Every CPU kernel: forward against a naive reference, backward against finite differences.

use igpt::backend::cpu::{activation, attention, embedding, loss, matmul, norm, optim};
use igpt::backend::{AdamStep, AttnShape, Op};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn rand_vec(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| (r.random::<f32>() * 2.0 - 1.0) * scale)
        .collect()
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-6);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
        / scale
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
    for &(m, k, n) in &[(1, 1, 1), (37, 19, 23), (130, 64, 48), (16, 300, 200)] {
        for ta in [Op::N, Op::T] {
            for tb in [Op::N, Op::T] {
                let a = rand_vec(m * k, 1, 1.0);
                let b = rand_vec(k * n, 2, 1.0);
                let want = naive_matmul(&a, ta, &b, tb, m, k, n);
                let mut out = vec![7.0; m * n];
                matmul::matmul(&mut out, &a, ta, &b, tb, m, k, n, false);
                assert!(max_rel(&out, &want) < 1e-5, "{m}x{k}x{n} {ta:?}{tb:?}");
                // Accumulating adds onto what is there.
                let mut acc = vec![1.0; m * n];
                matmul::matmul(&mut acc, &a, ta, &b, tb, m, k, n, true);
                let want1: Vec<f32> = want.iter().map(|v| v + 1.0).collect();
                assert!(max_rel(&acc, &want1) < 1e-5);
            }
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
    let mut x = rand_vec(rows * d, 3, 2.0);
    let mut g = rand_vec(d, 4, 1.0);
    let w = rand_vec(rows * d, 5, 1.0); // loss = sum(out * w)
    let mut out = vec![0.0; rows * d];
    let mut rstd = vec![0.0; rows];
    norm::rmsnorm_forward(&mut out, &mut rstd, &x, &g, d, 1e-5);
    assert!(max_rel(&out, &rmsnorm_naive(&x, &g, d)) < 1e-5);
    let mut dx = vec![0.0; rows * d];
    let mut dg = vec![0.0; d];
    let mut scratch = vec![0.0; norm::rmsnorm_backward_scratch(rows, d)];
    norm::rmsnorm_backward(&mut dx, &mut dg, &w, &x, &rstd, &g, d, &mut scratch);
    let loss = |x: &[f32], g: &[f32]| -> f64 {
        rmsnorm_naive(x, g, d)
            .iter()
            .zip(&w)
            .map(|(a, b)| (a * b) as f64)
            .sum()
    };
    let g0 = g.clone();
    check_grad("rmsnorm dx", &mut x.clone(), &dx, &mut |xx| loss(xx, &g0));
    check_grad("rmsnorm dg", &mut g, &dg, &mut |gg| loss(&x, gg));
    x[0] += 0.0;
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

#[test]
fn attention_forward_matches_naive_across_tiles() {
    // t larger than one query tile, and not a multiple of it.
    for causal in [true, false] {
        let s = AttnShape {
            batch: 2,
            t: attention::QUERY_BLOCK + 37,
            n_head: 3,
            head_dim: 8,
            causal,
        };
        let d = 24;
        let qkv = rand_vec(s.batch * s.t * 3 * d, 6, 1.5);
        let mut out = vec![0.0; s.batch * s.t * d];
        let mut lse = vec![0.0; s.batch * s.n_head * s.t];
        let mut scratch = vec![0.0; s.scratch_len(rayon::current_num_threads())];
        attention::attention_forward(&mut out, &mut lse, &qkv, &mut scratch, s);
        assert!(
            max_rel(&out, &attention_naive(&qkv, s)) < 1e-5,
            "causal={causal}"
        );
    }
}

#[test]
fn attention_backward_matches_finite_differences() {
    for causal in [true, false] {
        let s = AttnShape {
            batch: 1,
            t: attention::QUERY_BLOCK + 5,
            n_head: 2,
            head_dim: 4,
            causal,
        };
        let d = 8;
        let mut qkv = rand_vec(s.t * 3 * d, 7, 1.0);
        let w = rand_vec(s.t * d, 8, 1.0);
        let mut out = vec![0.0; s.t * d];
        let mut lse = vec![0.0; s.n_head * s.t];
        let mut scratch = vec![0.0; s.scratch_len(2)];
        attention::attention_forward(&mut out, &mut lse, &qkv, &mut scratch, s);
        let mut dqkv = vec![0.0; qkv.len()];
        attention::attention_backward(&mut dqkv, &w, &out, &lse, &qkv, &mut scratch, s);
        check_grad("attention dqkv", &mut qkv, &dqkv, &mut |x| {
            attention_naive(x, s)
                .iter()
                .zip(&w)
                .map(|(a, b)| (a * b) as f64)
                .sum()
        });
    }
}

#[test]
fn quick_gelu_forward_and_backward() {
    let mut x = rand_vec(5000, 9, 6.0);
    let mut out = vec![0.0; x.len()];
    activation::quick_gelu_forward(&mut out, &x);
    let naive: Vec<f32> = x.iter().map(|&v| v / (1.0 + (-1.702 * v).exp())).collect();
    assert!(max_rel(&out, &naive) < 1e-5);
    let mut d = vec![1.0; x.len()];
    activation::quick_gelu_backward_inplace(&mut d, &x);
    check_grad("gelu", &mut x, &d, &mut |x| {
        x.iter()
            .map(|&v| (v as f64) / (1.0 + (-1.702 * v as f64).exp()))
            .sum()
    });
}

#[test]
fn embedding_forward_and_backward() {
    let (v, t, d, batch) = (11, 9, 6, 3);
    let tokens: Vec<u16> = (0..batch * t).map(|i| ((i * 7 + 3) % v) as u16).collect();
    let wte = rand_vec(v * d, 10, 1.0);
    let wpe = rand_vec(t * d, 11, 1.0);
    let sos = rand_vec(d, 12, 1.0);
    let naive = |wte: &[f32], wpe: &[f32], sos: &[f32]| -> Vec<f32> {
        let mut o = vec![0.0; batch * t * d];
        for b in 0..batch {
            for p in 0..t {
                for c in 0..d {
                    let content = if p == 0 {
                        sos[c]
                    } else {
                        wte[tokens[b * t + p - 1] as usize * d + c]
                    };
                    o[(b * t + p) * d + c] = content + wpe[p * d + c];
                }
            }
        }
        o
    };
    let mut out = vec![0.0; batch * t * d];
    embedding::embed_forward(&mut out, &tokens, &wte, &wpe, &sos, t, d);
    assert_eq!(out, naive(&wte, &wpe, &sos));
    let w = rand_vec(batch * t * d, 13, 1.0);
    let (mut dwte, mut dwpe, mut dsos) = (vec![0.0; v * d], vec![0.0; t * d], vec![0.0; d]);
    embedding::embed_backward(&mut dwte, &mut dwpe, &mut dsos, &w, &tokens, t, d);
    let dot = |o: Vec<f32>| o.iter().zip(&w).map(|(a, b)| (a * b) as f64).sum::<f64>();
    check_grad("dwte", &mut wte.clone(), &dwte, &mut |x| {
        dot(naive(x, &wpe, &sos))
    });
    check_grad("dwpe", &mut wpe.clone(), &dwpe, &mut |x| {
        dot(naive(&wte, x, &sos))
    });
    check_grad("dsos", &mut sos.clone(), &dsos, &mut |x| {
        dot(naive(&wte, &wpe, x))
    });
}

#[test]
fn cross_entropy_loss_and_gradient() {
    let (rows, v) = (20, 13);
    let mut logits = rand_vec(rows * v, 14, 4.0);
    let targets: Vec<u16> = (0..rows).map(|i| (i * 5 % v) as u16).collect();
    let naive = |z: &[f32]| -> Vec<f64> {
        z.chunks(v)
            .zip(&targets)
            .map(|(r, &t)| {
                let m = r.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
                let lz = m + r.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
                lz - r[t as usize] as f64
            })
            .collect()
    };
    let mut losses = vec![0.0; rows];
    let mut z = logits.clone();
    loss::cross_entropy(&mut z, &mut losses, &targets, v, None);
    assert_eq!(z, logits, "a pass without gradient leaves the logits alone");
    for (a, b) in losses.iter().zip(naive(&logits)) {
        assert!((*a as f64 - b).abs() < 1e-5);
    }
    let mut g = logits.clone();
    loss::cross_entropy(&mut g, &mut losses, &targets, v, Some(0.5));
    check_grad("cross-entropy", &mut logits, &g, &mut |z| {
        0.5 * naive(z).iter().sum::<f64>()
    });
}

#[test]
fn adamw_matches_the_formula() {
    let n = 100_000;
    let mut p = rand_vec(n, 15, 1.0);
    let g = rand_vec(n, 16, 1.0);
    let (mut m, mut v) = (
        rand_vec(n, 17, 0.1),
        rand_vec(n, 18, 0.1)
            .iter()
            .map(|x| x.abs())
            .collect::<Vec<_>>(),
    );
    let h = AdamStep {
        lr: 0.01,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 3,
        grad_scale: 0.5,
    };
    let (p0, m0, v0) = (p.clone(), m.clone(), v.clone());
    optim::adamw(&mut p, &g, &mut m, &mut v, h, true);
    for i in (0..n).step_by(997) {
        let gi = g[i] as f64 * 0.5;
        let mi = 0.9 * m0[i] as f64 + 0.1 * gi;
        let vi = 0.95 * v0[i] as f64 + 0.05 * gi * gi;
        let mh = mi / (1.0 - 0.9f64.powi(3));
        let vh = vi / (1.0 - 0.95f64.powi(3));
        let pi = p0[i] as f64 - 0.01 * (mh / (vh.sqrt() + 1e-8) + 0.1 * p0[i] as f64);
        assert!(
            (p[i] as f64 - pi).abs() < 1e-5,
            "param {i}: {} vs {pi}",
            p[i]
        );
        assert!((m[i] as f64 - mi).abs() < 1e-6 && (v[i] as f64 - vi).abs() < 1e-6);
    }
    let mut q = p0.clone();
    let (mut m2, mut v2) = (m0.clone(), v0.clone());
    optim::adamw(&mut q, &g, &mut m2, &mut v2, h, false);
    let i = 5;
    let mh = (0.9 * m0[i] as f64 + 0.1 * g[i] as f64 * 0.5) / (1.0 - 0.9f64.powi(3));
    let vh = (0.95 * v0[i] as f64 + 0.05 * (g[i] as f64 * 0.5).powi(2)) / (1.0 - 0.95f64.powi(3));
    assert!(
        (q[i] as f64 - (p0[i] as f64 - 0.01 * mh / (vh.sqrt() + 1e-8))).abs() < 1e-5,
        "no decay when off"
    );
}
