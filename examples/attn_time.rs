use igpt::backend::cpu::attention::*;
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
    let mut dqkv = vec![0.0; rows * 3 * d];
    let dout = qkv[..rows * d].to_vec();
    for _ in 0..12 {
        let t0 = Instant::now();
        attention_forward(&mut out, &mut lse, &qkv, &mut scratch, s);
        let fa = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        attention_backward(&mut dqkv, &dout, &out, &lse, &qkv, &mut scratch, s);
        println!("fwd {fa:.3} bwd {:.3}", t0.elapsed().as_secs_f64());
    }
}
