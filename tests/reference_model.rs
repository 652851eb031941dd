//! The whole model against fixtures from an independent PyTorch implementation
//! (scripts/make_fixtures.py): logits, loss and every parameter gradient.

use igpt::backend::{AdamStep, Arena, Device, Update, adamw_host};
use igpt::model::Engine;
use safetensors::SafeTensors;

mod common;
use common::{f32s, fixture_config};

/// max |a - b| / max |b|: relative to the tensor's scale, so tiny entries do not dominate.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-12);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
        / scale
}

#[test]
fn logits_loss_and_gradients_match_pytorch() {
    let bytes = std::fs::read("tests/fixtures/reference_small.safetensors").unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let cfg = fixture_config(&bytes);
    let tok_t = st.tensor("tokens").unwrap();
    let tokens: Vec<u16> = tok_t
        .data()
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as u16)
        .collect();
    let batch = tok_t.shape()[0];
    // The fixture's context is longer than a 128-row attention tile (the CPU backend's), so a
    // tiled attention path is exercised across tiles.
    assert!(cfg.n_ctx() > 128);

    for device in Device::available() {
        let mut engine = Engine::new(&cfg, batch, true, &device).unwrap();
        let mut params = vec![0.0f32; engine.layout.total];
        for t in &engine.layout.tensors {
            let src = f32s(&st, &t.name);
            assert_eq!(src.len(), t.len, "{}", t.name);
            params[t.range()].copy_from_slice(&src);
        }
        engine.set_params(&params).unwrap();

        // Logits from an inference pass.
        let sum = engine.forward(&tokens).unwrap();
        let mut logits = Vec::new();
        engine.logits(&mut logits);
        let e = rel_err(&logits, &f32s(&st, "logits"));
        assert!(e < 1e-5, "{device}: logits differ: relative error {e}");
        let n = tokens.len() as f64;
        let loss_ref = f32s(&st, "loss")[0] as f64;
        assert!(
            ((sum / n) - loss_ref).abs() / loss_ref < 1e-5,
            "{device}: loss {} vs {loss_ref}",
            sum / n
        );

        // Gradients of the mean loss.
        engine.zero_grads();
        let train_sum = engine.forward_train(&tokens, None, 1.0 / n as f32).unwrap();
        assert!(
            (train_sum - sum).abs() / sum < 1e-6,
            "{device}: training pass loss {train_sum} vs inference pass {sum}"
        );
        engine.backward(None).unwrap();
        let mut grads = vec![0.0f32; engine.layout.total];
        engine.read_arena(Arena::Grads, &mut grads);
        for t in &engine.layout.tensors {
            let e = rel_err(&grads[t.range()], &f32s(&st, &format!("grad.{}", t.name)));
            assert!(
                e < 1e-4,
                "{device}: gradient of {} differs: relative error {e}",
                t.name
            );
        }
        let norm = grads
            .iter()
            .map(|&g| g as f64 * g as f64)
            .sum::<f64>()
            .sqrt();
        // One AdamW step from zero moments: the host update of the same parameters and
        // gradients, tensor by tensor with its own weight decay.
        let step = AdamStep {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            step: 1,
            grad_scale: 0.5,
        };
        let norm_measured = engine.update(Update {
            adam: step,
            clip: 0.0,
        });
        let e = (norm_measured - norm).abs() / norm;
        assert!(
            e < 1e-6,
            "{device}: the update's norm is off by {e} (relative)"
        );
        let mut want = params.clone();
        let (mut m, mut v) = (vec![0.0f32; want.len()], vec![0.0f32; want.len()]);
        for t in &engine.layout.tensors {
            let r = t.range();
            adamw_host(
                &mut want[r.clone()],
                &grads[r.clone()],
                &mut m[r.clone()],
                &mut v[r],
                step,
                t.decay,
            );
        }
        let got = engine.params();
        for t in &engine.layout.tensors {
            let e = rel_err(&got[t.range()], &want[t.range()]);
            assert!(
                e < 1e-5,
                "{device}: AdamW update of {} differs: relative error {e}",
                t.name
            );
        }
        assert_ne!(got, params, "{device}: the update changed nothing");
    }
}
