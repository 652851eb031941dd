//! `igpt bench` on this machine: its arguments, its JSON, and `--device cuda` failing cleanly
//! where there is no GPU (the GPU numbers come from scripts/gpu_check.sh on a lent machine).

mod common;

use common::{igpt, stderr, tempdir};

/// A model small enough for a debug build: 1 layer, d=32, 8x8 pixels, 16 colours.
const TINY: [&str; 10] = [
    "--layers", "1", "--embd", "32", "--heads", "2", "--side", "8", "--vocab", "16",
];

fn no_gpu() -> bool {
    igpt::backend::cuda::probe().is_err()
}

#[test]
fn bench_on_cuda_without_a_driver_says_so_and_does_not_panic() {
    if !no_gpu() {
        return;
    }
    for bench in [
        &["bench", "train", "--batch", "1", "--no-torch"][..],
        &["bench", "generate", "--batches", "1", "--no-python"][..],
    ] {
        let args: Vec<&str> = ["--device", "cuda"]
            .iter()
            .chain(bench)
            .chain(TINY.iter())
            .copied()
            .collect();
        let o = igpt(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains("no CUDA driver found"), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn bench_train_refuses_bf16_on_the_cpu() {
    let mut args = vec!["bench", "train", "--no-torch", "--precision", "bf16"];
    args.extend(TINY);
    let o = igpt(&args);
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(err.contains("needs a GPU"), "{err}");
}

#[test]
fn bench_train_and_generate_write_their_numbers_as_json() {
    let dir = tempdir("bench-json");
    let train = dir.join("train.json");
    let mut args = vec![
        "bench",
        "train",
        "--batch",
        "2",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--no-torch",
        "--json",
        train.to_str().unwrap(),
    ];
    args.extend(TINY);
    let o = igpt(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&train).unwrap()).unwrap();
    assert_eq!(v["bench"], "train");
    assert_eq!(v["device"], "cpu");
    assert_eq!(v["precision"], "f32");
    assert_eq!(v["tokens_per_step"], 2.0 * 64.0);
    let run = &v["runs"][0];
    assert_eq!(run["impl"], "igpt");
    assert!(run["tokens_per_s"].as_f64().unwrap() > 0.0, "{v}");
    // MFU is against a GPU's peak: no number on the CPU.
    assert!(run["mfu"].is_null(), "{v}");
    assert!(v["flops_per_token"].as_f64().unwrap() > 0.0);

    let generate = dir.join("generate.json");
    let mut args = vec![
        "bench",
        "generate",
        "--batches",
        "1",
        "2",
        "--precisions",
        "f32",
        "--no-python",
        "--json",
        generate.to_str().unwrap(),
    ];
    args.extend(TINY);
    let o = igpt(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&generate).unwrap()).unwrap();
    let runs = v["runs"].as_array().unwrap();
    let batches: Vec<u64> = runs.iter().map(|r| r["batch"].as_u64().unwrap()).collect();
    assert_eq!(batches, [1, 2], "{v}");
    assert!(runs.iter().all(|r| r["impl"] == "igpt-f32"), "{v}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bench_train_profile_shares_the_step_among_the_kernels() {
    let dir = tempdir("bench-profile");
    let json = dir.join("train.json");
    let mut args = vec![
        "bench",
        "train",
        "--batch",
        "2",
        "--steps",
        "2",
        "--no-torch",
        "--profile",
        "--json",
        json.to_str().unwrap(),
    ];
    args.extend(TINY);
    let o = igpt(&args);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.contains("(outside kernels)"), "{out}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let p = &v["profile"];
    let kernels = p["kernels"].as_array().unwrap();
    let calls = |name: &str| {
        kernels
            .iter()
            .find(|k| k["kernel"] == name)
            .map(|k| k["calls"].as_u64().unwrap())
    };
    // Two steps of a one-layer model: per step, the block's four products forward (two of them
    // onto the residual stream) and eight backward plus the head's one and two, one attention
    // each way, one clipped update of all tensors (norm, clip and AdamW).
    assert_eq!(calls("attention_forward"), Some(2), "{p}");
    assert_eq!(calls("attention_backward"), Some(2), "{p}");
    assert_eq!(calls("matmul"), Some(2 * 13), "{p}");
    assert_eq!(calls("matmul_onto"), Some(2 * 2), "{p}");
    assert_eq!(calls("clipped_update"), Some(2), "{p}");
    assert_eq!(calls("update_grad_norm"), Some(2), "{p}");
    // The kernels' times are parts of the steps'.
    let in_kernels: f64 = kernels.iter().map(|k| k["seconds"].as_f64().unwrap()).sum();
    let steps_s = 2.0 * p["step_s"].as_f64().unwrap();
    assert!(
        in_kernels > 0.0 && in_kernels <= steps_s * 1.01,
        "{in_kernels} of {steps_s}: {p}"
    );
}
