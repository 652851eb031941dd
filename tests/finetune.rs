//! Fine-tuning: the head's gradients against finite differences, L_GEN + L_CLF gradients equal
//! the sum of the two, augmentation, and the commands.

mod common;

use common::{igpt, s, stderr, tempdir};
use igpt::backend::Arena;
use igpt::backend::Device;
use igpt::config::{ModelConfig, Objective};
use igpt::finetune::{Head, augment};
use igpt::model::{Engine, init_params};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn rand_vec(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| scale * (r.random::<f32>() - 0.5)).collect()
}

/// A training pass with a classification head, as a fine-tuning step takes it: forward, the
/// head's gradient on the final norm's output, backward. Returns the generative loss.
fn with_head(
    e: &mut Engine,
    tokens: &[u16],
    mask: Option<&[bool]>,
    gen_scale: f32,
    head: impl FnOnce(&[f32], &mut [f32]),
) -> anyhow::Result<f64> {
    let loss = e.forward_train(tokens, mask, gen_scale)?;
    let mut lnf = Vec::new();
    e.final_norm_output(&mut lnf);
    let mut d = vec![0.0; lnf.len()];
    head(&lnf, &mut d);
    e.backward(Some(&d))?;
    Ok(loss)
}

#[test]
fn head_gradients_match_finite_differences() {
    let (n, t, d, c) = (3, 5, 4, 3);
    let mut head = Head::new(d, c, vec![]);
    head.w = rand_vec(d * c, 1, 2.0);
    head.b = rand_vec(c, 2, 1.0);
    let lnf = rand_vec(n * t * d, 3, 2.0);
    let labels = [0u32, 2, 1];
    let (mut gw, mut gb, mut dl) = (vec![0.0; d * c], vec![0.0; c], vec![0.0; n * t * d]);
    head.loss_and_grads(&lnf, &labels, t, 1.0, &mut gw, &mut gb, &mut dl);
    let loss = |h: &Head, x: &[f32]| -> f64 {
        let (mut a, mut b, mut e) = (vec![0.0; d * c], vec![0.0; c], vec![0.0; n * t * d]);
        h.loss_and_grads(x, &labels, t, 1.0, &mut a, &mut b, &mut e)
    };
    let eps = 1e-2f32;
    let check = |fd: f64, g: f32, what: &str| {
        assert!(
            (fd - g as f64).abs() < 1e-2 * fd.abs().max(0.05),
            "{what}: finite difference {fd}, analytic {g}"
        );
    };
    for i in [0, 5, d * c - 1] {
        let (mut up, mut down) = (head.clone(), head.clone());
        up.w[i] += eps;
        down.w[i] -= eps;
        check(
            (loss(&up, &lnf) - loss(&down, &lnf)) / (2.0 * eps as f64),
            gw[i],
            "w",
        );
    }
    for (k, &g) in gb.iter().enumerate() {
        let (mut up, mut down) = (head.clone(), head.clone());
        up.b[k] += eps;
        down.b[k] -= eps;
        check(
            (loss(&up, &lnf) - loss(&down, &lnf)) / (2.0 * eps as f64),
            g,
            "b",
        );
    }
    for i in [0, 7, n * t * d - 1] {
        let (mut up, mut down) = (lnf.clone(), lnf.clone());
        up[i] += eps;
        down[i] -= eps;
        check(
            (loss(&head, &up) - loss(&head, &down)) / (2.0 * eps as f64),
            dl[i],
            "lnf",
        );
    }
}

/// The classification loss's gradient reaches every kind of model parameter correctly: for a
/// few entries of each tensor, the gradient through the final norm and the blocks equals a
/// finite difference of the head's loss on the model's output.
#[test]
fn classification_gradients_of_the_model_match_finite_differences() {
    for objective in [Objective::Autoregressive, Objective::Bert] {
        let cfg = ModelConfig {
            n_layer: 2,
            n_embd: 8,
            n_head: 2,
            n_vocab: 5,
            side: 3,
            channels: 1,
            objective,
        };
        let t = cfg.n_ctx();
        let mut p = init_params(&cfg, 7);
        let noise = rand_vec(p.len(), 8, 0.3);
        p.iter_mut().zip(noise).for_each(|(a, b)| *a += b);
        let tokens: Vec<u16> = (0..2 * t).map(|i| ((i * 3 + i / 4) % 5) as u16).collect();
        let masked: Vec<bool> = (0..2 * t).map(|i| i % t == 2 || i % t == 7).collect();
        let bert = objective == Objective::Bert;
        let labels = [1u32, 2];
        let mut head = Head::new(8, 3, vec![]);
        head.w = rand_vec(24, 9, 4.0);
        let mut e = Engine::new(&cfg, 2, true, &Device::Cpu).unwrap();
        e.set_params(&p).unwrap();
        e.zero_grads();
        with_head(
            &mut e,
            &tokens,
            bert.then_some(&masked[..]),
            0.0,
            |lnf, dl| {
                let (mut gw, mut gb) = (vec![0.0; 24], vec![0.0; 3]);
                head.loss_and_grads(lnf, &labels, t, 1.0, &mut gw, &mut gb, dl);
            },
        )
        .unwrap();
        let mut grads = vec![0.0; e.layout.total];
        e.read_arena(Arena::Grads, &mut grads);
        let mut probe = Engine::new(&cfg, 2, false, &Device::Cpu).unwrap();
        let mut clf_loss = |params: &[f32]| -> f64 {
            probe.set_params(params).unwrap();
            if bert {
                probe.forward_masked(&tokens, &masked).unwrap();
            } else {
                probe.forward(&tokens).unwrap();
            }
            let mut lnf = Vec::new();
            probe.final_norm_output(&mut lnf);
            let (mut gw, mut gb, mut dl) = (vec![0.0; 24], vec![0.0; 3], vec![0.0; lnf.len()]);
            head.loss_and_grads(&lnf, &labels, t, 1.0, &mut gw, &mut gb, &mut dl)
        };
        let eps = 1e-2f32;
        let mut checked = 0;
        for spec in e.layout.tensors.clone() {
            for i in [
                spec.offset,
                spec.offset + spec.len / 2,
                spec.offset + spec.len - 1,
            ] {
                let (mut up, mut down) = (p.clone(), p.clone());
                up[i] += eps;
                down[i] -= eps;
                let fd = (clf_loss(&up) - clf_loss(&down)) / (2.0 * eps as f64);
                let g = grads[i] as f64;
                assert!(
                    (fd - g).abs() < 3e-2 * fd.abs().max(0.05),
                    "{objective:?} {} [{}]: finite difference {fd}, analytic {g}",
                    spec.name,
                    i - spec.offset
                );
                checked += 1;
            }
        }
        assert!(checked >= 12);
    }
}

#[test]
fn joint_gradients_are_the_sum_of_generative_and_classification() {
    joint_gradients_for(Objective::Autoregressive);
}

#[test]
fn bert_joint_gradients_are_the_sum_of_masked_and_classification() {
    joint_gradients_for(Objective::Bert);
}

fn joint_gradients_for(objective: Objective) {
    let cfg = ModelConfig {
        n_layer: 2,
        n_embd: 16,
        n_head: 2,
        n_vocab: 5,
        side: 3,
        channels: 1,
        objective,
    };
    let bert = objective == Objective::Bert;
    let t = cfg.n_ctx();
    let mut p = init_params(&cfg, 4);
    let noise = rand_vec(p.len(), 5, 0.2);
    p.iter_mut().zip(noise).for_each(|(a, b)| *a += b);
    let tokens: Vec<u16> = (0..2 * t).map(|i| (i * 3 % 5) as u16).collect();
    let labels = [1u32, 0];
    let mut head = Head::new(16, 2, vec![]);
    head.w = rand_vec(32, 6, 2.0);
    // Two hidden pixels in each image.
    let masked: Vec<bool> = (0..2 * t).map(|i| i % t == 1 || i % t == 6).collect();
    let mask = bert.then_some(&masked[..]);
    let mut e = Engine::new(&cfg, 2, true, &Device::Cpu).unwrap();
    e.set_params(&p).unwrap();
    let n = e.layout.total;
    let grads = |e: &mut Engine, gen_scale: f32, clf: bool| -> Vec<f32> {
        e.zero_grads();
        with_head(e, &tokens, mask, gen_scale, |lnf, dl| {
            if clf {
                let (mut gw, mut gb) = (vec![0.0; 32], vec![0.0; 2]);
                head.loss_and_grads(lnf, &labels, t, 0.5, &mut gw, &mut gb, dl);
            }
        })
        .unwrap();
        let mut g = vec![0.0; n];
        e.read_arena(Arena::Grads, &mut g);
        g
    };
    let both = grads(&mut e, 0.1, true);
    let gen_only = grads(&mut e, 0.1, false);
    let clf_only = grads(&mut e, 0.0, true);
    // The plain generative pass gives the same gradient as the head path without a head.
    e.zero_grads();
    if bert {
        e.forward_train(&tokens, Some(&masked), 0.1).unwrap();
    } else {
        e.forward_train(&tokens, None, 0.1).unwrap();
    }
    e.backward(None).unwrap();
    // The wrong kind of input for the model is refused.
    let wrong = if bert { None } else { Some(&masked[..]) };
    assert!(with_head(&mut e, &tokens, wrong, 0.1, |_, _| {}).is_err());
    let mut plain = vec![0.0; n];
    e.read_arena(Arena::Grads, &mut plain);
    let mut worst = 0.0f32;
    for i in 0..n {
        worst = worst.max((both[i] - gen_only[i] - clf_only[i]).abs());
        assert!((gen_only[i] - plain[i]).abs() <= 1e-6 * plain[i].abs().max(1.0));
    }
    let scale = both.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    assert!(worst <= 1e-5 * scale.max(1.0), "{worst} vs {scale}");
    assert!(clf_only.iter().any(|&x| x != 0.0));
}

#[test]
fn a_head_from_a_probe_scores_raw_features_as_the_probe_scores_standardised_ones() {
    use igpt::probe::{LbfgsOptions, Standardiser, fit, select_l2};
    let (n, d, c) = (300, 6, 3);
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    // Features on very different scales and offsets, so the folding of the standardisation
    // into the head matters.
    let (scale, offset) = (
        [0.01f32, 1.0, 50.0, 3.0, 0.5, 7.0],
        [5.0f32, -2.0, 100.0, 0.0, 1.0, -30.0],
    );
    let y: Vec<u32> = (0..n).map(|i| (i % c) as u32).collect();
    let x: Vec<f32> = (0..n * d)
        .map(|k| {
            let (i, j) = (k / d, k % d);
            let signal = if j % c == y[i] as usize { 1.5 } else { 0.0 };
            offset[j] + scale[j] * (signal + rng.random::<f32>() - 0.5)
        })
        .collect();
    let p = Head::from_probe(&x, &y, d, c, vec!["a".into(); 3]).unwrap();
    let (head, val) = (p.head, p.val_accuracy);
    // The step scale is one over each feature's spread.
    for (j, &sc) in head.step_scale.iter().enumerate() {
        let ratio = sc * scale[j];
        assert!(ratio > 1.0 && ratio < 6.0, "feature {j}: scale {sc}");
    }
    assert!(val > 0.9, "validation accuracy {val}");
    let opts = LbfgsOptions::default();
    let (l2, _) = select_l2(&x, &y, d, c, 0.1, 0, opts).unwrap();
    let st = Standardiser::fit(&x, d);
    let (m, _) = fit(&st.apply(&x), &y, d, c, l2, None, opts);
    let want = m.scores(&st.apply(&x));
    let got = head.logits(&x);
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() < 1e-3 * b.abs().max(1.0), "{a} vs {b}");
    }
    let acc = igpt::probe::accuracy(&head.predict(&x), &y);
    assert!(acc > 0.9, "training accuracy {acc}");
}

/// One block, d = 8, on 3x3 images of 5 tokens: small enough to step in a blink.
fn one_block_model() -> ModelConfig {
    ModelConfig {
        n_layer: 1,
        n_embd: 8,
        n_head: 2,
        n_vocab: 5,
        side: 3,
        channels: 1,
        objective: Objective::Autoregressive,
    }
}

#[test]
fn head_steps_scale_per_input_feature() {
    let cfg = one_block_model();
    let t = cfg.n_ctx();
    let params = init_params(&cfg, 1);
    let tokens: Vec<u16> = (0..2 * t).map(|i| (i * 2 % 5) as u16).collect();
    let labels = [1u32, 0];
    let mut start = Head::new(8, 2, vec![]);
    start.w = rand_vec(16, 3, 1.0);
    let scale: Vec<f32> = (0..8).map(|j| 0.5 + j as f32).collect();
    let step_with = |scale: Option<Vec<f32>>| -> Head {
        let mut e = Engine::new(&cfg, 2, true, &Device::Cpu).unwrap();
        e.set_params(&params).unwrap();
        let mut ft = igpt::finetune::Finetuner::new(e, start.clone(), 0);
        if let Some(s) = scale {
            ft.set_head_step_scale(s).unwrap();
        }
        ft.step(&tokens, &labels, 1e-3, 1e-3, true).unwrap();
        ft.head
    };
    let (plain, scaled) = (step_with(None), step_with(Some(scale.clone())));
    for i in 0..16 {
        let (dp, ds) = (plain.w[i] - start.w[i], scaled.w[i] - start.w[i]);
        assert!(dp.abs() > 1e-5, "weight {i} did not move");
        assert!(
            (ds - scale[i / 2] * dp).abs() < 1e-6,
            "weight {i}: {ds} vs {dp}"
        );
    }
    assert_eq!(plain.b, scaled.b, "biases step as before");
    let mut e = Engine::new(&cfg, 2, true, &Device::Cpu).unwrap();
    e.set_params(&params).unwrap();
    let mut ft = igpt::finetune::Finetuner::new(e, start.clone(), 0);
    assert!(ft.set_head_step_scale(vec![1.0; 3]).is_err());

    // The scale travels with the saved head, so continuing a fine-tuned model steps it the
    // same way; a head that was never scaled loads with ones.
    let path = tempdir("head-step-scale").join("head.safetensors");
    let mut saved = start.clone();
    saved.step_scale = scale.clone();
    saved.save(&path).unwrap();
    assert_eq!(Head::load(&path).unwrap(), saved);
    start.save(&path).unwrap();
    assert_eq!(Head::load(&path).unwrap().step_scale, vec![1.0; 8]);
    let mut e = Engine::new(&cfg, 2, true, &Device::Cpu).unwrap();
    e.set_params(&params).unwrap();
    let mut ft = igpt::finetune::Finetuner::new(e, saved, 0);
    ft.step(&tokens, &labels, 1e-3, 1e-3, true).unwrap();
    let scaled = step_with(Some(scale));
    assert_eq!(
        ft.head.w, scaled.w,
        "a loaded scaled head steps as a freshly scaled one"
    );
}

#[test]
fn micro_batched_steps_equal_one_pass_steps() {
    for objective in [Objective::Autoregressive, Objective::Bert] {
        let cfg = ModelConfig {
            objective,
            ..one_block_model()
        };
        let t = cfg.n_ctx();
        let params = init_params(&cfg, 4);
        let n = 8;
        let tokens: Vec<u16> = (0..n * t).map(|i| ((i * 7 + i / 5) % 5) as u16).collect();
        let labels: Vec<u32> = (0..n as u32).map(|i| i % 3).collect();
        let mut start = Head::new(8, 3, vec![]);
        start.w = rand_vec(24, 5, 1.0);
        // Two steps, so that the second reads parameters the first moved.
        let run = |pass: usize| {
            let mut e = Engine::new(&cfg, pass, true, &Device::Cpu).unwrap();
            e.set_params(&params).unwrap();
            let mut ft = igpt::finetune::Finetuner::new(e, start.clone(), 9);
            let stats: Vec<_> = (0..2)
                .map(|_| ft.step(&tokens, &labels, 1e-2, 1e-2, true).unwrap())
                .collect();
            (ft.engine.params(), ft.head, stats)
        };
        let (whole, whole_head, whole_stats) = run(n);
        for pass in [1, 2, 4] {
            let (p, head, stats) = run(pass);
            let moved = whole.iter().zip(&params).any(|(a, b)| (a - b).abs() > 1e-4);
            assert!(moved, "{objective:?}: the steps moved the model");
            for (i, (a, b)) in p.iter().zip(&whole).enumerate() {
                assert!(
                    (a - b).abs() < 1e-5,
                    "{objective:?} pass {pass}: param {i}: {a} vs {b}"
                );
            }
            for (a, b) in head
                .w
                .iter()
                .zip(&whole_head.w)
                .chain(head.b.iter().zip(&whole_head.b))
            {
                assert!(
                    (a - b).abs() < 1e-5,
                    "{objective:?} pass {pass}: head {a} vs {b}"
                );
            }
            for (s, w) in stats.iter().zip(&whole_stats) {
                assert!((s.gen_loss - w.gen_loss).abs() < 1e-5, "{s:?} vs {w:?}");
                assert!((s.clf_loss - w.clf_loss).abs() < 1e-5, "{s:?} vs {w:?}");
                assert_eq!(s.accuracy, w.accuracy);
            }
        }
        // A batch that does not split into whole passes is refused.
        let mut e = Engine::new(&cfg, 3, true, &Device::Cpu).unwrap();
        e.set_params(&params).unwrap();
        let mut ft = igpt::finetune::Finetuner::new(e, start.clone(), 9);
        let err = ft.step(&tokens, &labels, 1e-2, 1e-2, true).unwrap_err();
        assert!(
            err.to_string().contains("does not split into passes of 3"),
            "{err}"
        );
    }
}

#[test]
fn warmup_ramps_the_learning_rate_then_holds_it() {
    use igpt::finetune::warmup_lr;
    assert_eq!(
        warmup_lr(1e-3, 1, 0),
        1e-3,
        "no warm-up: full rate from the first step"
    );
    assert!((warmup_lr(1e-3, 1, 4) - 0.25e-3).abs() < 1e-9);
    assert!((warmup_lr(1e-3, 3, 4) - 0.75e-3).abs() < 1e-9);
    assert_eq!(warmup_lr(1e-3, 4, 4), 1e-3);
    assert_eq!(
        warmup_lr(1e-3, 500, 4),
        1e-3,
        "constant after the ramp, no decay"
    );
}

#[test]
fn augmentation_crops_a_window_of_the_reflected_image() {
    let side = 5;
    let img: Vec<u16> = (0..25).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut scratch = Vec::new();
    let mut saw_original = false;
    let mut saw_mirror = false;
    for _ in 0..200 {
        let mut a = img.clone();
        augment(&mut a, side, 2, true, &mut rng, &mut scratch);
        // A crop of the padded image: consecutive pixels of a row differ by one column.
        saw_original |= a == img;
        let mirrored: Vec<u16> = img
            .chunks(side)
            .flat_map(|r| r.iter().rev().copied())
            .collect();
        saw_mirror |= a == mirrored;
        for v in &a {
            assert!(*v < 25);
        }
    }
    assert!(saw_original && saw_mirror);
    // Without padding or flipping, nothing changes.
    let mut a = img.clone();
    augment(&mut a, side, 0, false, &mut rng, &mut scratch);
    assert_eq!(a, img);
}

#[test]
fn finetune_and_classify_commands() {
    let dir = tempdir("finetune");
    let run = dir.join("run");
    let o = igpt(&[
        "train",
        "--limit",
        "300",
        "--side",
        "8",
        "--layers",
        "2",
        "--embd",
        "16",
        "--heads",
        "2",
        "--steps",
        "5",
        "--batch",
        "4",
        "--palette-size",
        "8",
        "--out",
        s(&run),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.join("ft");
    let o = igpt(&[
        "finetune",
        "--model",
        s(&run),
        "--data",
        "fashion-mnist",
        "--limit",
        "300",
        "--test-data",
        "fashion-mnist",
        "--test-limit",
        "100",
        "--steps",
        "30",
        "--batch",
        "8",
        "--micro-batch",
        "4",
        "--eval-every",
        "10",
        "--lr",
        "0.003",
        "--warmup",
        "5",
        "--pad-crop",
        "1",
        "--out",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("validation accuracy"), "{text}");
    assert!(
        text.contains("head initialised by a linear probe"),
        "{text}"
    );
    assert!(text.contains("step 0: validation accuracy"), "{text}");
    assert!(
        text.contains("test accuracy of the best checkpoint"),
        "{text}"
    );
    // metrics.jsonl: each step's losses and norm, and each validation, in order.
    let logged = |run: &std::path::Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .expect("read metrics.jsonl")
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    };
    let lines = logged(&out);
    let steps_with = |lines: &[serde_json::Value], key: &str| -> Vec<u64> {
        lines
            .iter()
            .filter(|v| v.get(key).is_some())
            .map(|v| v["step"].as_u64().expect("a step"))
            .collect()
    };
    assert_eq!(steps_with(&lines, "l_gen"), (1..=30).collect::<Vec<_>>());
    assert_eq!(steps_with(&lines, "val_accuracy"), [0, 10, 20, 30]);
    for v in lines.iter().filter(|v| v.get("l_gen").is_some()) {
        for key in ["l_gen", "l_clf", "grad_norm", "lr"] {
            let x = v[key].as_f64().unwrap_or(f64::NAN);
            assert!(x.is_finite() && x > 0.0, "{key} in {v}");
        }
    }
    let o = igpt(&[
        "finetune",
        "--model",
        s(&run),
        "--data",
        "fashion-mnist",
        "--limit",
        "300",
        "--batch",
        "6",
        "--micro-batch",
        "4",
        "--out",
        s(&dir.join("ft-bad")),
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--batch (6) must be a multiple of --micro-batch (4)"),
        "{}",
        stderr(&o)
    );
    assert!(
        !dir.join("ft-bad").exists(),
        "nothing written for a refused run"
    );
    let saved = Head::load(&out.join("head.safetensors")).unwrap();
    assert!(
        saved.step_scale.iter().any(|&v| v != 1.0),
        "the probe head's step scale is saved with it"
    );
    let o = igpt(&[
        "classify",
        "--model",
        s(&out),
        "--data",
        "fashion-mnist",
        "--limit",
        "50",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("accuracy"));

    // Not into the pre-training run's directory, whose model and metrics it would overwrite.
    let metrics_before = std::fs::read(run.join("metrics.jsonl")).unwrap();
    #[rustfmt::skip]
    let o = igpt(&[
        "finetune", "--model", s(&run), "--data", "fashion-mnist", "--limit", "100",
        "--steps", "2", "--batch", "4", "--out", s(&run),
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("holds a pre-training run") && stderr(&o).contains(s(&run)),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::read(run.join("metrics.jsonl")).unwrap(),
        metrics_before
    );

    // Fine-tuning again into the same directory starts its log afresh.
    #[rustfmt::skip]
    let o = igpt(&[
        "finetune", "--model", s(&run), "--data", "fashion-mnist", "--limit", "100",
        "--steps", "2", "--batch", "4", "--eval-every", "2", "--out", s(&out),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines = logged(&out);
    assert_eq!(steps_with(&lines, "l_gen"), [1, 2], "{lines:?}");

    // A head for fewer classes than the data has is refused, in both commands.
    Head::new(16, 3, vec![])
        .save(&out.join("head.safetensors"))
        .unwrap();
    let o = igpt(&[
        "classify",
        "--model",
        s(&out),
        "--data",
        "fashion-mnist",
        "--limit",
        "50",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("head has 3 classes"), "{}", stderr(&o));
    let o = igpt(&[
        "finetune",
        "--model",
        s(&out),
        "--data",
        "fashion-mnist",
        "--limit",
        "50",
        "--out",
        s(&dir.join("again")),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("head has 3 classes"), "{}", stderr(&o));
}

#[test]
fn model_and_head_step_at_their_own_rates() {
    let cfg = one_block_model();
    let t = cfg.n_ctx();
    let params = init_params(&cfg, 4);
    let tokens: Vec<u16> = (0..2 * t).map(|i| (i * 3 % 5) as u16).collect();
    let labels = [0u32, 1];
    let mut start = Head::new(8, 2, vec![]);
    start.w = rand_vec(16, 5, 1.0);
    let step = |lr: f32, head_lr: f32| -> (Vec<f32>, Head) {
        let mut e = Engine::new(&cfg, 2, true, &Device::Cpu).unwrap();
        e.set_params(&params).unwrap();
        let mut ft = igpt::finetune::Finetuner::new(e, start.clone(), 0);
        ft.step(&tokens, &labels, lr, head_lr, true).unwrap();
        (ft.engine.params(), ft.head)
    };
    let (body_only_params, body_only_head) = step(1e-3, 0.0);
    assert_eq!(body_only_head, start, "a zero head rate leaves the head");
    assert_ne!(body_only_params, params, "the model still moves");
    let (head_only_params, head_only_head) = step(0.0, 1e-3);
    assert_eq!(
        head_only_params, params,
        "a zero model rate leaves the model"
    );
    let (_, fast_head) = step(0.0, 4e-3);
    // Adam's first step is the rate times the gradient's sign (up to eps), so it scales with
    // the rate alone.
    for i in 0..16 {
        let (slow, fast) = (
            head_only_head.w[i] - start.w[i],
            fast_head.w[i] - start.w[i],
        );
        assert!(slow.abs() > 1e-5, "weight {i} did not move");
        assert!(
            (fast - 4.0 * slow).abs() < 1e-5,
            "weight {i}: {fast} vs {slow}"
        );
    }
}

#[test]
fn validation_during_fine_tuning_sees_the_stepped_model() {
    // `classify` on the fine-tuning engine must score exactly what a fresh engine holding the
    // stepped parameters scores: no stale copy of the weights on the evaluation path.
    let cfg = ModelConfig {
        n_layer: 2,
        n_embd: 16,
        n_head: 2,
        n_vocab: 6,
        side: 4,
        channels: 1,
        objective: Objective::Autoregressive,
    };
    let t = cfg.n_ctx();
    let params = init_params(&cfg, 9);
    let n = 12;
    let tokens: Vec<u16> = (0..n * t).map(|i| ((i * 7 + i / 5) % 6) as u16).collect();
    let labels: Vec<u32> = (0..n as u32).map(|i| i % 3).collect();
    let set =
        igpt::data::TokenSet::from_tokens(tokens.clone(), t, 6, Some(labels.clone())).unwrap();
    let mut e = Engine::new(&cfg, 4, true, &Device::Cpu).unwrap();
    e.set_params(&params).unwrap();
    let mut head = Head::new(16, 3, vec![]);
    head.w = rand_vec(48, 2, 1.0);
    let mut ft = igpt::finetune::Finetuner::new(e, head, 0);
    for k in 0..20 {
        let b = k % 3 * 4;
        ft.step(
            &tokens[b * t..(b + 4) * t],
            &labels[b..b + 4],
            3e-2,
            3e-2,
            true,
        )
        .unwrap();
    }
    let stepped = ft.engine.params();
    assert_ne!(stepped, params, "the model moved");
    let mut fresh = Engine::new(&cfg, 4, false, &Device::Cpu).unwrap();
    fresh.set_params(&stepped).unwrap();
    let mut lnf_a = Vec::new();
    let mut lnf_b = Vec::new();
    ft.engine.forward(&tokens[..4 * t]).unwrap();
    ft.engine.final_norm_output(&mut lnf_a);
    fresh.forward(&tokens[..4 * t]).unwrap();
    fresh.final_norm_output(&mut lnf_b);
    assert_eq!(
        lnf_a, lnf_b,
        "the fine-tuning engine's forward pass is stale"
    );
    let a = igpt::finetune::classify(&mut ft.engine, &ft.head, &set, 0).unwrap();
    let b = igpt::finetune::classify(&mut fresh, &ft.head, &set, 0).unwrap();
    assert_eq!(a, b);
    // And the head trains on the same features it is evaluated on.
    let mut seen = Vec::new();
    with_head(&mut ft.engine, &tokens[..4 * t], None, 1.0, |lnf, _| {
        seen = lnf.to_vec()
    })
    .unwrap();
    assert_eq!(
        seen, lnf_b,
        "training and evaluation read different features"
    );
}
