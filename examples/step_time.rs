use igpt::backend::{Backend, cpu::CpuBackend};
use igpt::config::ModelConfig;
use igpt::model::{Engine, init_params};
use std::time::Instant;

fn main() {
    let cfg = ModelConfig::preset("tiny", 512, 32, 3).unwrap();
    let batch = 8;
    let mut e = Engine::new(&cfg, batch, true, CpuBackend::new()).unwrap();
    let mut p = init_params(&cfg, 0);
    // non-zero head so gradients flow everywhere
    for x in p[e.layout.wtet..e.layout.wtet + 512 * 256].iter_mut() {
        *x = 0.01;
    }
    e.set_params(&p).unwrap();
    let tokens: Vec<u16> = (0..batch * 1024).map(|i| (i * 7 % 512) as u16).collect();
    for it in 0..4 {
        let t0 = Instant::now();
        e.zero_grads();
        let l = e.forward_backward(&tokens, 1.0 / 8192.0).unwrap();
        let t1 = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        e.forward(&tokens).unwrap();
        println!(
            "step {it}: fwd+bwd {:.3}s, fwd {:.3}s loss {:.4} arena {:.0} MB",
            t1,
            t0.elapsed().as_secs_f64(),
            l / 8192.0,
            e.backend().bytes() as f64 / 1e6
        );
    }
}
