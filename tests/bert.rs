//! The masked (BERT) objective: mask rate, loss over masked positions only, no causal mask,
//! gradients against finite differences, and training from the command line.

mod common;

use common::{igpt, s, stderr, tempdir};
use igpt::backend::Arena;
use igpt::backend::Device;
use igpt::bert::{mask as bert_mask, mask_count};
use igpt::config::{ModelConfig, Objective};
use igpt::model::{Engine, Output, ParamLayout, init_params};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn bert_cfg() -> ModelConfig {
    ModelConfig {
        n_layer: 2,
        n_embd: 16,
        n_head: 2,
        n_vocab: 6,
        side: 4,
        channels: 1,
        objective: Objective::Bert,
    }
}

fn params(cfg: &ModelConfig, seed: u64) -> Vec<f32> {
    let mut p = init_params(cfg, seed);
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 1);
    // A non-zero head and uneven weights, so every path carries gradient.
    for x in p.iter_mut() {
        *x += 0.2 * (rng.random::<f32>() - 0.5);
    }
    p
}

#[test]
fn masks_hide_fifteen_percent_uniformly_and_reproducibly() {
    assert_eq!(mask_count(784), 118);
    assert_eq!(mask_count(1024), 154);
    assert_eq!(mask_count(4), 1);
    let t = 100;
    let (mut perm, mut m) = (Vec::new(), vec![false; t]);
    let mut hits = vec![0u32; t];
    for key in 0..4000 {
        bert_mask(7, key, &mut perm, &mut m);
        assert_eq!(m.iter().filter(|&&x| x).count(), 15);
        for (h, &x) in hits.iter_mut().zip(&m) {
            *h += x as u32;
        }
    }
    // Every position is hidden about 15% of the time (600 of 4000; binomial sd ~23).
    for (i, &h) in hits.iter().enumerate() {
        assert!((480..=720).contains(&h), "position {i} hidden {h} times");
    }
    let mut again = vec![false; t];
    bert_mask(7, 12, &mut perm, &mut m);
    bert_mask(7, 12, &mut perm, &mut again);
    assert_eq!(m, again);
    bert_mask(8, 12, &mut perm, &mut again);
    assert_ne!(m, again);
}

#[test]
fn loss_counts_only_masked_positions() {
    let cfg = bert_cfg();
    let (t, v) = (cfg.n_ctx(), cfg.n_vocab);
    let p = params(&cfg, 1);
    let mut e = Engine::new(&cfg, 2, false, &Device::Cpu).unwrap();
    e.set_params(&p).unwrap();
    let tokens: Vec<u16> = (0..2 * t).map(|i| ((i * 7 + 1) % v) as u16).collect();
    let mut masked = vec![false; 2 * t];
    for i in [1, 5, 6, t + 2, t + 9] {
        masked[i] = true;
    }
    let loss = e.forward_masked(&tokens, &masked).unwrap();
    // The same inputs through a plain inference pass (mask id = palette size + 1).
    let inputs: Vec<u16> = tokens
        .iter()
        .zip(&masked)
        .map(|(&x, &m)| if m { v as u16 + 1 } else { x })
        .collect();
    let mut logits = Vec::new();
    e.infer(&inputs, Output::Logits, &mut logits).unwrap();
    let mut want = 0.0f64;
    for i in (0..2 * t).filter(|&i| masked[i]) {
        let z = &logits[i * v..(i + 1) * v];
        let m = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = m + z.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        want += lse - z[tokens[i] as usize] as f64;
    }
    assert!(
        (loss - want).abs() < 1e-4 * want.abs().max(1.0),
        "{loss} vs {want}"
    );
    // A visible pixel's value enters only as input; the hidden ones are what is scored.
    let mut other = tokens.clone();
    other[5] = (other[5] + 1) % v as u16; // masked: its target changes, its input does not
    let changed = e.forward_masked(&other, &masked).unwrap();
    assert!((changed - loss).abs() > 1e-4);
}

#[test]
fn held_out_loss_averages_over_fixed_masks() {
    use igpt::eval::{evaluate, evaluate_masks};
    let cfg = bert_cfg();
    let (t, v) = (cfg.n_ctx(), cfg.n_vocab);
    let p = params(&cfg, 4);
    // Batches of 2 over 5 images, so masks are keyed across batch boundaries.
    let mut e = Engine::new(&cfg, 2, false, &Device::Cpu).unwrap();
    e.set_params(&p).unwrap();
    let ids: Vec<u16> = (0..5 * t).map(|i| ((i * 5 + i / 7) % v) as u16).collect();
    let data = igpt::data::TokenSet::from_tokens(ids.clone(), t, v, None).unwrap();
    let mut buf = Vec::new();
    let three = evaluate_masks(&mut e, &data, 0, 3, &mut buf).unwrap();
    // Directly: every image under each of its three masks, one image at a time.
    let mut one = Engine::new(&cfg, 1, false, &Device::Cpu).unwrap();
    one.set_params(&p).unwrap();
    let (mut perm, mut mask) = (Vec::new(), vec![false; t]);
    let mut sum = 0.0;
    for img in 0..5 {
        for k in 0..3 {
            igpt::bert::eval_masks(img, 1, t, 3, k, &mut perm, &mut mask);
            sum += one
                .forward_masked(&ids[img * t..(img + 1) * t], &mask)
                .unwrap();
        }
    }
    let want = sum / (5 * 3 * mask_count(t)) as f64;
    assert!((three - want).abs() < 1e-5, "{three} vs {want}");
    // One mask is the training evaluation's; different masks give a different number.
    let single = evaluate_masks(&mut e, &data, 0, 1, &mut buf).unwrap();
    assert_eq!(single, evaluate(&mut e, &data, 0, &mut buf).unwrap());
    assert!((single - three).abs() > 1e-6);
}

#[test]
fn attention_is_bidirectional() {
    let cfg = bert_cfg();
    let (t, v) = (cfg.n_ctx(), cfg.n_vocab);
    let p = params(&cfg, 2);
    let mut ar = cfg.clone();
    ar.objective = Objective::Autoregressive;
    for (model, expect_change) in [(&cfg, true), (&ar, false)] {
        let mut e = Engine::new(model, 1, false, &Device::Cpu).unwrap();
        e.set_params(&p).unwrap();
        let a: Vec<u16> = (0..t).map(|i| (i % v) as u16).collect();
        let mut b = a.clone();
        b[t - 1] = (b[t - 1] + 1) % v as u16;
        let (mut la, mut lb) = (Vec::new(), Vec::new());
        e.infer(&a, Output::Logits, &mut la).unwrap();
        e.infer(&b, Output::Logits, &mut lb).unwrap();
        // Position 0's logits see the last pixel only without a causal mask.
        let diff = (0..v).map(|k| (la[k] - lb[k]).abs()).fold(0.0, f32::max);
        assert_eq!(diff > 1e-6, expect_change, "{:?}: {diff}", model.objective);
    }
}

#[test]
fn masked_gradients_match_finite_differences() {
    let cfg = bert_cfg();
    let (t, v) = (cfg.n_ctx(), cfg.n_vocab);
    let p = params(&cfg, 3);
    let layout = ParamLayout::new(&cfg);
    let tokens: Vec<u16> = (0..t).map(|i| ((i * 5 + 2) % v) as u16).collect();
    let mut masked = vec![false; t];
    for i in [0, 3, 7, 12] {
        masked[i] = true;
    }
    let mut e = Engine::new(&cfg, 1, true, &Device::Cpu).unwrap();
    e.set_params(&p).unwrap();
    e.zero_grads();
    e.forward_train(&tokens, Some(&masked), 1.0).unwrap();
    e.backward(None).unwrap();
    let mut grads = vec![0.0; layout.total];
    e.read_arena(Arena::Grads, &mut grads);
    // Entries of the token embedding (hidden and visible ids), positions, attention and head.
    let c_attn = layout.blocks[0].c_attn;
    let probes = [
        layout.wte + tokens[1] as usize * cfg.n_embd + 3,
        layout.wte + tokens[0] as usize * cfg.n_embd + 5,
        layout.wpe + 7 * cfg.n_embd + 2,
        c_attn + 17,
        c_attn + cfg.n_embd * 3 * 4 + 20,
        layout.wtet + 9,
    ];
    let mut inf = Engine::new(&cfg, 1, false, &Device::Cpu).unwrap();
    for &i in &probes {
        let eps = 1e-2f32;
        let mut q = p.clone();
        q[i] += eps;
        inf.set_params(&q).unwrap();
        let up = inf.forward_masked(&tokens, &masked).unwrap();
        q[i] -= 2.0 * eps;
        inf.set_params(&q).unwrap();
        let down = inf.forward_masked(&tokens, &masked).unwrap();
        let fd = (up - down) / (2.0 * eps as f64);
        let g = grads[i] as f64;
        assert!(
            (fd - g).abs() <= 2e-2 * fd.abs().max(g.abs()).max(1e-2),
            "parameter {i}: analytic {g}, finite difference {fd}"
        );
    }
    // Masked positions feed no content embedding, so a colour that is never visible gets no
    // embedding gradient, and every visible colour gets some.
    let visible: std::collections::BTreeSet<u16> = tokens
        .iter()
        .zip(&masked)
        .filter(|(_, m)| !**m)
        .map(|(&x, _)| x)
        .collect();
    for c in 0..v as u16 {
        let row = &grads[layout.wte + c as usize * cfg.n_embd..][..cfg.n_embd];
        let zero = row.iter().all(|&x| x == 0.0);
        assert_eq!(zero, !visible.contains(&c), "colour {c}");
    }
    // No start token in a BERT model.
    assert!(
        grads[layout.sos..layout.sos + cfg.n_embd]
            .iter()
            .all(|&x| x == 0.0)
    );
}

#[test]
fn bert_models_train_from_the_command_line() {
    let dir = tempdir("bert-train");
    let run = dir.join("run");
    let o = igpt(&[
        "train",
        "--objective",
        "bert",
        "--limit",
        "200",
        "--side",
        "8",
        "--layers",
        "2",
        "--embd",
        "32",
        "--heads",
        "2",
        "--steps",
        "40",
        "--batch",
        "8",
        "--palette-size",
        "8",
        "--lr",
        "0.01",
        "--warmup",
        "5",
        "--eval-every",
        "40",
        "--out",
        s(&run),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("loss").and_then(|x| x.as_f64()))
        .collect();
    assert!(losses.len() >= 10);
    let first: f64 = losses[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = losses[losses.len() - 5..].iter().sum::<f64>() / 5.0;
    assert!(last < first, "loss did not fall: {first} -> {last}");
    // It remembers its objective, evaluates, probes, and refuses to sample.
    let info = igpt(&["info", "--model", s(&run)]);
    assert!(String::from_utf8_lossy(&info.stdout).contains("Bert"));
    let o = igpt(&[
        "eval",
        "--model",
        s(&run),
        "--data",
        "fashion-mnist",
        "--limit",
        "20",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let nats = |o: &std::process::Output| -> String {
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        text.split(" nats/token")
            .next()
            .unwrap()
            .rsplit(' ')
            .next()
            .unwrap()
            .to_string()
    };
    let one_mask = nats(&o);
    let o = igpt(&[
        "eval",
        "--model",
        s(&run),
        "--data",
        "fashion-mnist",
        "--limit",
        "20",
        "--masks",
        "4",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_ne!(nats(&o), one_mask, "four masks score other hidden pixels");
    let o = igpt(&[
        "eval",
        "--model",
        s(&run),
        "--data",
        "fashion-mnist",
        "--limit",
        "20",
        "--masks",
        "0",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("at least 1"), "{}", stderr(&o));
    let o = igpt(&["sample", "--model", s(&run), "--out", s(&dir.join("x.png"))]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("BERT"), "{}", stderr(&o));
    let o = igpt(&["serve", "--model", s(&run), "--port", "0"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("BERT"), "{}", stderr(&o));

    // Probes average features over masks, and fine-tuning trains on masked images.
    let o = igpt(&[
        "probe",
        "--model",
        s(&run),
        "--data",
        "fashion-mnist",
        "--limit",
        "80",
        "--test-data",
        "fashion-mnist",
        "--test-limit",
        "40",
        "--layers",
        "1",
        "--masks",
        "2",
        "--chart",
        s(&dir.join("probe.png")),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("averaged over 2 masks"), "{text}");
    assert!(text.contains("layer 1"), "{text}");
    let ft = dir.join("ft");
    let o = igpt(&[
        "finetune",
        "--model",
        s(&run),
        "--data",
        "fashion-mnist",
        "--limit",
        "100",
        "--test-data",
        "fashion-mnist",
        "--test-limit",
        "30",
        "--steps",
        "6",
        "--batch",
        "4",
        "--eval-every",
        "3",
        "--masks",
        "2",
        "--out",
        s(&ft),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("L_GEN"), "{text}");
    assert!(
        text.contains("test accuracy of the best checkpoint"),
        "{text}"
    );
    for masks in ["0", "3"] {
        let o = igpt(&[
            "classify",
            "--model",
            s(&ft),
            "--data",
            "fashion-mnist",
            "--limit",
            "20",
            "--masks",
            masks,
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(String::from_utf8_lossy(&o.stdout).contains("accuracy"));
    }
}

#[test]
fn masks_are_refused_for_autoregressive_models() {
    let mut ar = bert_cfg();
    ar.objective = Objective::Autoregressive;
    assert!(igpt::bert::masks_for(&ar, Some(2)).is_err());
    assert_eq!(igpt::bert::masks_for(&ar, None).unwrap(), 0);
    assert_eq!(igpt::bert::masks_for(&ar, Some(0)).unwrap(), 0);
    assert_eq!(
        igpt::bert::masks_for(&bert_cfg(), None).unwrap(),
        igpt::bert::EVAL_MASKS
    );
    assert_eq!(igpt::bert::masks_for(&bert_cfg(), Some(0)).unwrap(), 0);
    // Held-out loss: one mask unless asked; a BERT model needs at least one.
    use igpt::bert::loss_masks;
    assert!(loss_masks(&ar, Some(3)).is_err());
    assert!(loss_masks(&ar, Some(0)).is_ok() && loss_masks(&ar, None).is_ok());
    assert_eq!(loss_masks(&bert_cfg(), None).unwrap(), 1);
    assert_eq!(loss_masks(&bert_cfg(), Some(4)).unwrap(), 4);
    assert!(loss_masks(&bert_cfg(), Some(0)).is_err());
}
