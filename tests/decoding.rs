//! Incremental decoding with the key/value cache gives the full forward pass's logits, on every
//! device this build can open.

use igpt::backend::Device;
use igpt::config::ModelConfig;
use igpt::model::{Decoder, Engine};
use rand::{Rng, SeedableRng};

fn model_and_params() -> (ModelConfig, Vec<f32>) {
    let cfg = ModelConfig {
        n_layer: 2,
        n_embd: 32,
        n_head: 4,
        n_vocab: 11,
        side: 12,
        channels: 1,
        objective: Default::default(),
    };
    let mut params = igpt::model::init_params(&cfg, 9);
    // A non-zero head and larger weights, so the logits carry real information.
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(4);
    for p in params.iter_mut() {
        *p += (r.random::<f32>() - 0.5) * 0.2;
    }
    (cfg, params)
}

fn check_batch(batch: usize) {
    for device in Device::available() {
        check_batch_on(batch, &device);
    }
}

fn check_batch_on(batch: usize, device: &Device) {
    let (cfg, params) = model_and_params();
    let (t, v) = (cfg.n_ctx(), cfg.n_vocab);
    let tokens: Vec<u16> = (0..batch * t)
        .map(|i| ((i * 7 + i / 5) % v) as u16)
        .collect();
    let mut engine = Engine::new(&cfg, batch, false, device).unwrap();
    engine.set_params(&params).unwrap();
    engine.forward(&tokens).unwrap();
    let mut full = Vec::new();
    engine.logits(&mut full);

    let mut dec = Decoder::new(&cfg, batch, device).unwrap();
    dec.set_params(&params).unwrap();
    let mut worst = 0.0f32;
    for pos in 0..t {
        let prev: Vec<u16> = (0..batch)
            .map(|b| if pos == 0 { 0 } else { tokens[b * t + pos - 1] })
            .collect();
        let logits = dec.step(&prev).unwrap();
        for b in 0..batch {
            let want = &full[(b * t + pos) * v..(b * t + pos + 1) * v];
            let got = &logits[b * v..(b + 1) * v];
            let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-6);
            for (g, w) in got.iter().zip(want) {
                worst = worst.max((g - w).abs() / scale);
            }
        }
    }
    assert!(
        worst < 1e-4,
        "{device}, batch {batch}: incremental logits differ by {worst} (relative)"
    );
    // Past the context, the decoder refuses.
    assert!(dec.step(&vec![0; batch]).is_err());
    dec.reset();
    assert_eq!(dec.position(), 0);
}

#[test]
fn incremental_logits_equal_the_full_pass_for_batch_1() {
    check_batch(1);
}

#[test]
fn incremental_logits_equal_the_full_pass_for_batch_3() {
    check_batch(3);
}
