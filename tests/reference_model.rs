//! The whole model against fixtures from an independent PyTorch implementation
//! (scripts/make_fixtures.py): logits, loss and every parameter gradient.

use igpt::backend::Arena;
use igpt::backend::Device;
use igpt::config::ModelConfig;
use igpt::model::Engine;
use safetensors::SafeTensors;

fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    let t = st
        .tensor(name)
        .unwrap_or_else(|e| panic!("fixture lacks {name}: {e}"));
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

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
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    let get = |k: &str| meta[k].parse::<usize>().unwrap();
    let cfg = ModelConfig {
        n_layer: get("n_layer"),
        n_embd: get("n_embd"),
        n_head: get("n_head"),
        n_vocab: get("n_vocab"),
        side: get("side"),
        channels: get("channels"),
        objective: Default::default(),
    };
    let tok_t = st.tensor("tokens").unwrap();
    let tokens: Vec<u16> = tok_t
        .data()
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as u16)
        .collect();
    let batch = tok_t.shape()[0];
    // The fixture's context (81) is longer than one attention query block, so the blocked
    // attention path is exercised across tiles.
    assert!(cfg.n_ctx() > igpt::backend::cpu::attention::QUERY_BLOCK);

    let mut engine = Engine::new(&cfg, batch, true, &Device::Cpu).unwrap();
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
    assert!(e < 1e-5, "logits differ: relative error {e}");
    let n = tokens.len() as f64;
    let loss_ref = f32s(&st, "loss")[0] as f64;
    assert!(
        ((sum / n) - loss_ref).abs() / loss_ref < 1e-5,
        "loss {} vs {loss_ref}",
        sum / n
    );

    // Gradients of the mean loss.
    engine.zero_grads();
    engine.forward_train(&tokens, None, 1.0 / n as f32).unwrap();
    engine.backward(None).unwrap();
    let mut grads = vec![0.0f32; engine.layout.total];
    engine.read_arena(Arena::Grads, &mut grads);
    for t in &engine.layout.tensors {
        let e = rel_err(&grads[t.range()], &f32s(&st, &format!("grad.{}", t.name)));
        assert!(
            e < 1e-4,
            "gradient of {} differs: relative error {e}",
            t.name
        );
    }
}
