//! Linear probes: features against a direct computation, logistic regression against an
//! independent solver, the validation-only choice of L2, and bad inputs.

mod common;

use common::{igpt, s, stderr, tempdir};
use igpt::backend::Device;
use igpt::config::ModelConfig;
use igpt::model::{Engine, Output, init_params};
use igpt::probe::{self, LbfgsOptions};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn tiny() -> ModelConfig {
    ModelConfig {
        n_layer: 3,
        n_embd: 16,
        n_head: 2,
        n_vocab: 7,
        side: 4,
        channels: 1,
        objective: Default::default(),
    }
}

#[test]
fn features_are_the_mean_normalised_block_input() {
    let cfg = tiny();
    let (d, t, v) = (cfg.n_embd, cfg.n_ctx(), cfg.n_vocab);
    let mut params = init_params(&cfg, 3);
    // Non-trivial gains and a non-zero head, so every term matters.
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for p in params.iter_mut() {
        *p += 0.05 * (rng.random::<f32>() - 0.5);
    }
    let layout = igpt::model::ParamLayout::new(&cfg);
    let tokens: Vec<u16> = (0..2 * t).map(|i| ((i * 5 + 3) % v) as u16).collect();
    let mut engine = Engine::new(&cfg, 2, false, &Device::Cpu).unwrap();
    engine.set_params(&params).unwrap();
    let layers = [0, cfg.n_layer - 1, cfg.n_layer];
    let mut feats = Vec::new();
    engine
        .probe_features(&tokens, None, &layers, &mut feats)
        .unwrap();
    assert_eq!(feats.len(), 2 * layers.len() * d);

    // Direct: the residual stream entering block l is hidden state l of a raw pass over
    // [start, x_0, ..., x_{n-2}]; normalise it with that block's gain and average positions.
    let mut raw = Vec::new();
    for img in tokens.chunks(t) {
        raw.push(v as u16);
        raw.extend_from_slice(&img[..t - 1]);
    }
    for (j, &l) in layers.iter().enumerate() {
        let mut h = Vec::new();
        if l < cfg.n_layer {
            engine.infer(&raw, Output::Hidden(l), &mut h).unwrap();
            let g = &params[layout.blocks[l].ln_1..layout.blocks[l].ln_1 + d];
            for row in h.chunks_mut(d) {
                let ms = row.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / d as f64;
                let r = 1.0 / (ms + 1e-5).sqrt();
                for (x, gi) in row.iter_mut().zip(g) {
                    *x = (*x as f64 * r) as f32 * gi;
                }
            }
        } else {
            // The last "layer" is the final norm's output, which is hidden state n_layer.
            engine.infer(&raw, Output::Hidden(l), &mut h).unwrap();
        }
        for sq in 0..2 {
            for k in 0..d {
                let mean: f32 = (0..t).map(|p| h[(sq * t + p) * d + k]).sum::<f32>() / t as f32;
                let got = feats[(sq * layers.len() + j) * d + k];
                assert!(
                    (got - mean).abs() < 1e-5,
                    "layer {l}, sequence {sq}, feature {k}: {got} vs {mean}"
                );
            }
        }
    }
    // Layers beyond the model are refused.
    let err = engine
        .probe_features(&tokens, None, &[cfg.n_layer + 1], &mut feats)
        .unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
}

#[test]
fn bert_features_average_the_masked_views() {
    let cfg = ModelConfig {
        objective: igpt::config::Objective::Bert,
        ..tiny()
    };
    let (d, t, v) = (cfg.n_embd, cfg.n_ctx(), cfg.n_vocab);
    let mut params = init_params(&cfg, 5);
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for p in params.iter_mut() {
        *p += 0.05 * (rng.random::<f32>() - 0.5);
    }
    let layout = igpt::model::ParamLayout::new(&cfg);
    let n = 5;
    let ids: Vec<u16> = (0..n * t).map(|i| ((i * 3 + 1) % v) as u16).collect();
    let tokens = igpt::data::TokenSet::from_tokens(ids.clone(), t, v, None).unwrap();
    // Batches of 2 over 5 images: masks must follow the image, not its place in a batch.
    let mut engine = Engine::new(&cfg, 2, false, &Device::Cpu).unwrap();
    engine.set_params(&params).unwrap();
    let layers = [0, 2, cfg.n_layer];
    let whole = probe::extract_features(&mut engine, &tokens, &layers, 0, |_| {}).unwrap();
    let masked = probe::extract_features(&mut engine, &tokens, &layers, 3, |_| {}).unwrap();
    let again = probe::extract_features(&mut engine, &tokens, &layers, 3, |_| {}).unwrap();
    assert_eq!(masked, again, "evaluation masks are fixed");
    assert!(
        whole.iter().zip(&masked).any(|(a, b)| (a - b).abs() > 1e-4),
        "hiding pixels changes the features"
    );

    // Direct: for each image and mask, hide the pixels (mask id v + 1), run the model on the
    // ids as given, normalise hidden state l with block l's gain, average positions, then
    // average over the masks.
    let mut one = Engine::new(&cfg, 1, false, &Device::Cpu).unwrap();
    one.set_params(&params).unwrap();
    let (mut perm, mut flags) = (Vec::new(), vec![false; t]);
    let mut hidden_total = 0;
    for img in 0..n {
        for (j, &l) in layers.iter().enumerate() {
            let mut want = vec![0.0f32; d];
            for k in 0..3 {
                igpt::bert::eval_masks(img, 1, t, 3, k, &mut perm, &mut flags);
                hidden_total += flags.iter().filter(|&&f| f).count();
                let raw: Vec<u16> = ids[img * t..(img + 1) * t]
                    .iter()
                    .zip(&flags)
                    .map(|(&x, &m)| if m { v as u16 + 1 } else { x })
                    .collect();
                let mut h = Vec::new();
                one.infer(&raw, Output::Hidden(l), &mut h).unwrap();
                if l < cfg.n_layer {
                    let g = &params[layout.blocks[l].ln_1..layout.blocks[l].ln_1 + d];
                    for row in h.chunks_mut(d) {
                        let ms = row.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / d as f64;
                        let r = 1.0 / (ms + 1e-5).sqrt();
                        for (x, gi) in row.iter_mut().zip(g) {
                            *x = (*x as f64 * r) as f32 * gi;
                        }
                    }
                }
                for row in h.chunks(d) {
                    for (w, x) in want.iter_mut().zip(row) {
                        *w += x / (t * 3) as f32;
                    }
                }
            }
            let got = &masked[(img * layers.len() + j) * d..][..d];
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "image {img}, layer {l}: {a} vs {b}");
            }
        }
    }
    // Each view hides 15% of the pixels (16 -> 2).
    assert_eq!(hidden_total, n * layers.len() * 3 * 2);

    // Autoregressive models have no masks.
    let mut ar = Engine::new(&tiny(), 2, false, &Device::Cpu).unwrap();
    ar.set_params(&init_params(&tiny(), 5)).unwrap();
    let err = probe::extract_features(&mut ar, &tokens, &layers, 2, |_| {}).unwrap_err();
    assert!(err.to_string().contains("autoregressive"), "{err}");
    let err = ar
        .probe_features(&ids[..t], Some(&flags), &layers, &mut Vec::new())
        .unwrap_err();
    assert!(err.to_string().contains("autoregressive"), "{err}");
}

/// Gaussian blobs: `per` points per class around well-separated centres.
fn blobs(classes: usize, per: usize, f: usize, spread: f32, seed: u64) -> (Vec<f32>, Vec<u32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut x = Vec::new();
    let mut y = Vec::new();
    for i in 0..classes * per {
        let c = i % classes;
        for j in 0..f {
            let centre = if j == c % f { 4.0 } else { 0.0 } + if j == 0 { c as f32 } else { 0.0 };
            x.push(centre + spread * igpt::model::standard_normal(&mut rng));
        }
        y.push(c as u32);
    }
    (x, y)
}

#[test]
fn separable_problems_are_recovered() {
    let (x, y) = blobs(3, 100, 4, 0.3, 1);
    let (tx, ty) = blobs(3, 50, 4, 0.3, 2);
    let r = probe::probe(&x, &y, &tx, &ty, 4, 3, 0.1, 0).unwrap();
    assert_eq!(r.test_accuracy, 1.0, "{r:?}");
    assert!(r.report.converged, "{r:?}");
}

/// The objective the probe minimises, written independently: mean cross-entropy plus
/// l2/2 |W|^2 on standardised inputs, with an unpenalised bias.
fn reference_objective(x: &[f64], y: &[u32], f: usize, c: usize, l2: f64, w: &[f64]) -> f64 {
    let n = y.len();
    let mut total = 0.0;
    for (row, &label) in x.chunks(f).zip(y) {
        let z: Vec<f64> = (0..c)
            .map(|k| w[f * c + k] + (0..f).map(|j| row[j] * w[j * c + k]).sum::<f64>())
            .collect();
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        total += lse - z[label as usize];
    }
    total / n as f64 + 0.5 * l2 * w[..f * c].iter().map(|v| v * v).sum::<f64>()
}

#[test]
fn lbfgs_solution_matches_plain_gradient_descent() {
    let (x, y) = blobs(3, 20, 2, 1.5, 5);
    let (f, c, l2) = (2, 3, 0.05);
    let st = probe::Standardiser::fit(&x, f);
    let xs32 = st.apply(&x);
    let xs: Vec<f64> = xs32.iter().map(|&v| v as f64).collect();
    let (m, report) = probe::fit(
        &xs32,
        &y,
        f,
        c,
        l2,
        None,
        LbfgsOptions {
            max_iterations: 1000,
            gradient_tolerance: 1e-9,
            memory: 10,
        },
    );
    assert!(report.converged);
    // Reference: gradient descent with numerical gradients of the independent objective.
    let mut w = vec![0.0f64; (f + 1) * c];
    for _ in 0..20000 {
        let base = reference_objective(&xs, &y, f, c, l2, &w);
        let mut g = vec![0.0; w.len()];
        for i in 0..w.len() {
            let mut wp = w.clone();
            wp[i] += 1e-6;
            g[i] = (reference_objective(&xs, &y, f, c, l2, &wp) - base) / 1e-6;
        }
        for (wi, gi) in w.iter_mut().zip(&g) {
            *wi -= 0.5 * gi;
        }
    }
    // Softmax weights are defined up to a per-feature constant across classes: compare
    // class differences.
    for j in 0..=f {
        for k in 1..c {
            let ours = m.w[j * c + k] - m.w[j * c];
            let theirs = w[j * c + k] - w[j * c];
            assert!(
                (ours - theirs).abs() < 2e-3,
                "w[{j}][{k}]: {ours} vs {theirs}"
            );
        }
    }
    let ours = reference_objective(&xs, &y, f, c, l2, &m.w);
    let theirs = reference_objective(&xs, &y, f, c, l2, &w);
    assert!(ours <= theirs + 1e-7, "{ours} vs {theirs}");
}

/// Strengths a sweep tried, weakest first, rounded to whole decades.
fn decades(sweep: &[(f64, f64)]) -> Vec<i32> {
    sweep.iter().map(|s| s.0.log10().round() as i32).collect()
}

#[test]
fn the_l2_sweep_goes_past_an_edge_that_wins_and_stops_inside() {
    // A score that peaks inside the grid: exactly the grid, its peak chosen.
    let (l2, sweep) = probe::sweep_l2(|l2| -(l2.log10() + 3.0).abs());
    assert_eq!(decades(&sweep), (-6..=0).collect::<Vec<_>>());
    assert!((l2.log10() + 3.0).abs() < 1e-9, "{l2}");
    // Peak two decades below the grid: the sweep goes one past the peak and stops there.
    let (l2, sweep) = probe::sweep_l2(|l2| -(l2.log10() + 8.0).abs());
    assert_eq!(decades(&sweep), (-9..=0).collect::<Vec<_>>());
    // Exact decades, so that tables print them as such.
    assert_eq!((sweep[0].0, l2), (1e-9, 1e-8));
    // Ever better with weaker penalties: at most L2_EXTRA_DECADES past the edge.
    let (l2, sweep) = probe::sweep_l2(|l2| -l2);
    let weakest = -6 - probe::L2_EXTRA_DECADES as i32;
    assert_eq!(decades(&sweep)[0], weakest);
    assert!((l2.log10() - weakest as f64).abs() < 1e-9, "{l2}");
    // Peak above the grid: the sweep climbs past 1.
    let (l2, sweep) = probe::sweep_l2(|l2| -(l2.log10() - 1.0).abs());
    assert_eq!(decades(&sweep), (-6..=2).collect::<Vec<_>>());
    assert!((l2.log10() - 1.0).abs() < 1e-9, "{l2}");
    // Ties go to the stronger penalty (here inside the grid, so nothing is extended).
    let (l2, sweep) = probe::sweep_l2(|l2| if l2 <= 1e-4 { 1.0 } else { 0.5 });
    assert_eq!(sweep.len(), probe::L2_GRID.len());
    assert!((l2.log10() + 4.0).abs() < 1e-9, "{l2}");
}

#[test]
fn the_test_split_never_influences_the_choice_of_l2() {
    let (x, y) = blobs(4, 60, 6, 2.0, 7);
    let (tx, ty) = blobs(4, 30, 6, 2.0, 8);
    let clean = probe::probe(&x, &y, &tx, &ty, 6, 4, 0.2, 3).unwrap();
    // The same training data with poisoned test features: same penalty, same validation score.
    let poisoned: Vec<f32> = tx.iter().map(|v| v * -50.0 + 7.0).collect();
    let other = probe::probe(&x, &y, &poisoned, &ty, 6, 4, 0.2, 3).unwrap();
    assert_eq!(clean.l2, other.l2);
    assert_eq!(clean.val_accuracy, other.val_accuracy);
    assert_ne!(clean.test_accuracy, other.test_accuracy);
    // And the choice is what the training-only selection gives.
    let (l2, sweep) = probe::select_l2(&x, &y, 6, 4, 0.2, 3, LbfgsOptions::default()).unwrap();
    assert_eq!(l2, clean.l2);
    for l2 in probe::L2_GRID {
        assert!(
            sweep.iter().any(|s| s.0 == l2),
            "{l2} missing from {sweep:?}"
        );
    }
    // Mismatched widths and labels out of range are refused.
    assert!(probe::probe(&x, &y, &tx[..tx.len() - 1], &ty, 6, 4, 0.2, 3).is_err());
    let err = probe::probe(&x, &y, &tx, &ty, 6, 3, 0.2, 3).unwrap_err();
    assert!(err.to_string().contains("outside the 3 classes"), "{err}");
}

#[test]
fn probe_command_reports_layers_baseline_and_bad_inputs() {
    let dir = tempdir("probe-cli");
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
        "3",
        "--batch",
        "4",
        "--palette-size",
        "8",
        "--out",
        s(&run),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let chart = dir.join("probe.png");
    let o = igpt(&[
        "probe",
        "--model",
        s(&run),
        "--data",
        "fashion-mnist",
        "--limit",
        "200",
        "--test-data",
        "fashion-mnist",
        "--test-limit",
        "60",
        "--chart",
        s(&chart),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for want in ["pixels", "layer 0", "layer 2", "best layer by validation"] {
        assert!(out.contains(want), "{want}: {out}");
    }
    assert!(chart.exists());

    let feats = dir.join("f.safetensors");
    let o = igpt(&[
        "features",
        "--model",
        s(&run),
        "--data",
        "fashion-mnist",
        "--limit",
        "10",
        "--layers",
        "0,2",
        "--out",
        s(&feats),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = std::fs::read(&feats).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("layer_2").unwrap().shape(), &[10, 16]);
    assert_eq!(st.tensor("features").unwrap().shape(), &[10, 32]);
    assert_eq!(st.tensor("labels").unwrap().shape(), &[10]);
    // The same as .npy: the concatenated features, equal to the safetensors ones, and the labels.
    let as_npy = dir.join("f.npy");
    let o = igpt(&[
        "features",
        "--model",
        s(&run),
        "--data",
        "fashion-mnist",
        "--limit",
        "10",
        "--layers",
        "0,2",
        "--out",
        s(&as_npy),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let arr = igpt::npy::read(&as_npy).unwrap();
    assert_eq!(arr.shape, vec![10, 32]);
    let want: Vec<f64> = st
        .tensor("features")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
        .collect();
    assert_eq!(arr.to_f64(), want);
    let labels = igpt::npy::read(&dir.join("f.labels.npy")).unwrap();
    assert_eq!(labels.shape, vec![10]);
    assert_eq!(labels.to_i64().unwrap().len(), 10);

    // A layer that does not exist, and data without labels.
    let o = igpt(&[
        "features",
        "--model",
        s(&run),
        "--data",
        "fashion-mnist",
        "--limit",
        "10",
        "--layers",
        "5",
        "--out",
        s(&feats),
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("layer 5 does not exist"),
        "{}",
        stderr(&o)
    );
    let npy = dir.join("unlabelled.npy");
    std::fs::write(
        &npy,
        igpt::npy::encode(&[4, 8, 8], igpt::npy::DType::U8, &[7u8; 256]),
    )
    .unwrap();
    let o = igpt(&[
        "probe",
        "--model",
        s(&run),
        "--data",
        s(&npy),
        "--test-data",
        "fashion-mnist",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("has no labels"), "{}", stderr(&o));
}
