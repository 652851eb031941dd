use igpt::backend::cpu::{attention::*, matmul::*};
use std::time::Instant;

fn main() {
    let (b, t, h, hd) = (8, 1024, 8, 32);
    let d = h * hd;
    let rows = b * t;
    let qkv: Vec<f32> = (0..rows * 3 * d)
        .map(|i| ((i % 97) as f32 - 48.0) / 100.0)
        .collect();
    let mut out = vec![0.0; rows * d];
    let mut lse = vec![0.0; b * h * t];
    let s = AttnShape {
        batch: b,
        t,
        n_head: h,
        head_dim: hd,
        causal: true,
    };
    let mut scratch = vec![0.0; s.scratch_len(rayon::current_num_threads())];
    let t0 = Instant::now();
    attention_forward(&mut out, &mut lse, &qkv, &mut scratch, s);
    let fa = t0.elapsed().as_secs_f64();
    let mut dqkv = vec![0.0; rows * 3 * d];
    let dout = out.clone();
    let t0 = Instant::now();
    attention_backward(&mut dqkv, &dout, &out, &lse, &qkv, &mut scratch, s);
    let ba = t0.elapsed().as_secs_f64();
    let att_flops = 2.0 * (t * t) as f64 * d as f64 * b as f64; // causal QK + PV
    println!(
        "attention fwd {fa:.3}s ({:.0} GF/s) bwd {ba:.3}s ({:.0} GF/s)",
        att_flops / fa / 1e9,
        2.5 * att_flops / ba / 1e9
    );
    for (m, k, n, ta, tb) in [
        (rows, d, 3 * d, Op::N, Op::N),
        (rows, d, 4 * d, Op::N, Op::N),
        (rows, 4 * d, d, Op::N, Op::N),
        (d, rows, 4 * d, Op::T, Op::N),
        (rows, 4 * d, d, Op::N, Op::T),
        (rows, d, 512, Op::N, Op::T),
    ] {
        let a = vec![0.5f32; m * k];
        let bb = vec![0.25f32; k * n];
        let mut o = vec![0.0f32; m * n];
        matmul(&mut o, &a, ta, &bb, tb, m, k, n, false);
        let t0 = Instant::now();
        for _ in 0..3 {
            matmul(&mut o, &a, ta, &bb, tb, m, k, n, true);
        }
        let e = t0.elapsed().as_secs_f64() / 3.0;
        println!(
            "matmul {m}x{k}x{n} {ta:?}{tb:?}: {:.1} ms, {:.0} GF/s",
            e * 1e3,
            2.0 * (m * n * k) as f64 / e / 1e9
        );
    }
}
