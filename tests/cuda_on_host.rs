//! `--device cuda` run on this machine, without a GPU: the real CUDA backend of the `igpt`
//! binary (its cudarc calls, launches, cuBLAS products and CUDA graphs) against the host CUDA
//! driver of `tests/cuda_host/driver.cpp`, which runs kernels.cu on the CPU and refuses what
//! a GPU's driver would refuse. What this cannot show: speed, PTX compiled by nvcc behaving
//! as the C++ build of the same source does, and work ordered between streams.

mod common;

use common::cuda_host::{compile, driver_dir, root};
use common::{s, stderr, tempdir};
use std::path::Path;
use std::process::{Command, Output};

const IMAGES: &str = "data/fashion-mnist/t10k-images-idx3-ubyte.gz";

/// `igpt --threads 2 ARGS` with the host driver where the CUDA libraries are looked for.
fn igpt_on_host_driver(args: &[&str], env: &[(&str, &str)]) -> Output {
    let dir = driver_dir();
    let path = match std::env::var("LD_LIBRARY_PATH") {
        Ok(old) if !old.is_empty() => format!("{}:{old}", dir.display()),
        _ => dir.display().to_string(),
    };
    Command::new(env!("CARGO_BIN_EXE_igpt"))
        .current_dir(root())
        .env("LD_LIBRARY_PATH", path)
        .envs(env.iter().copied())
        .args(["--threads", "2"])
        .args(args)
        .output()
        .expect("run igpt")
}

fn succeeded(o: &Output, what: &str) -> String {
    let err = stderr(o);
    assert!(
        o.status.success(),
        "{what} failed ({}):\n{}{err}",
        o.status,
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(!err.contains("panicked"), "{what} panicked:\n{err}");
    err
}

#[test]
fn the_host_driver_refuses_what_a_gpu_would() {
    let dir = driver_dir();
    let exe = dir.join("driver_rules");
    let include = dir.to_str().expect("a UTF-8 target folder");
    compile(
        &root().join("tests/cuda_host/driver_rules.cpp"),
        &exe,
        &["-I", include],
    );
    let run = Command::new(&exe).output().expect("run the driver's rules");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "a rule of the host driver does not hold:\n{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let passed = stdout.lines().filter(|l| l.ends_with(" PASS")).count();
    assert!(passed >= 40, "only {passed} rules checked:\n{stdout}");
}

#[test]
fn the_selftest_passes_on_the_cuda_backend() {
    let dir = tempdir("cuda-host-selftest");
    let (json, launches) = (dir.join("selftest.json"), dir.join("launches.log"));
    let out = igpt_on_host_driver(
        &[
            "--device",
            "cuda",
            "selftest",
            "--quick",
            "--json",
            s(&json),
        ],
        &[("CUDA_HOST_LAUNCH_LOG", s(&launches))],
    );
    succeeded(&out, "igpt --device cuda selftest --quick");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("read the report"))
            .expect("parse the report");
    let checks = report["checks"].as_array().expect("a list of checks");
    assert!(checks.len() >= 60, "only {} checks", checks.len());
    let ran = |name: &str| {
        checks
            .iter()
            .any(|c| c["name"] == name && c["skipped"] == false && c["passed"] == true)
    };
    for c in checks {
        let name = c["name"].as_str().unwrap_or("?");
        let skipped = c["skipped"].as_bool() == Some(true);
        // --quick skips the 200-step loss curve. Attention stores bf16 only in its flash
        // kernels, which exact f32 products do not run: those checks run with bf16 products.
        let bf16_attention = (name.starts_with("attention_forward")
            || name.starts_with("attention_backward"))
            && name.ends_with(", bf16 in and out)");
        let expected = name.starts_with("bf16 training") || bf16_attention;
        assert_eq!(skipped, expected, "{c}");
        assert!(skipped || c["passed"].as_bool() == Some(true), "{c}");
        if bf16_attention {
            assert!(ran(&format!("{name} [bf16 products]")), "{name}");
        }
    }
    // The CUDA graph path ran (on the CPU backend this check is skipped).
    assert!(
        checks.iter().any(
            |c| c["name"] == "decoder: replayed steps vs call by call" && c["skipped"] == false
        ),
        "no replay check ran"
    );
    // Tokens drawn on the emulated GPU, in replayed steps, are those drawn on the host.
    let draws = checks
        .iter()
        .find(|c| c["name"] == "decoder: tokens drawn on the device vs on the host")
        .expect("the device draws check ran");
    let detail = draws["detail"].as_str().unwrap_or("");
    assert!(
        draws["max_error"] == 0.0 && detail.contains("replayed from recordings"),
        "{draws}"
    );
    // The decoder checks over 256 positions split each head's keys among blocks (2 images x
    // 2 heads leave most of the emulated 132 multiprocessors idle) into 4 runs of 64 keys at
    // the full context: f32 caches and output, and bf16 caches and output (the bf16 decoder
    // stores the products' inputs as bf16).
    let launches = std::fs::read_to_string(&launches).expect("read the launch log");
    for (kernel, grid) in [
        ("attend_f32 ", "grid 2 2 4"),
        ("attend_combine_f32 ", "grid 2 2 1"),
        ("attend_bf16_to_bf16 ", "grid 2 2 4"),
        ("attend_combine_to_bf16 ", "grid 2 2 1"),
    ] {
        assert!(
            launches
                .lines()
                .any(|l| l.starts_with(kernel) && l.ends_with(grid)),
            "no launch of {kernel}with {grid}"
        );
    }
    // The RMS norm's forward takes one warp a row, eight rows a block: the norm check's 40
    // rows (2 sequences of 20) are 5 blocks, not 40.
    for kernel in ["rmsnorm_forward ", "rmsnorm_forward_bf16 "] {
        let grids: Vec<&str> = launches.lines().filter(|l| l.starts_with(kernel)).collect();
        assert!(
            grids.iter().any(|l| l.ends_with("grid 5 1 1"))
                && !grids.iter().any(|l| l.ends_with("grid 40 1 1")),
            "{kernel}launches: {grids:?}"
        );
    }
}

/// Per-step training losses, validation losses and gradient norms from a run's metrics.jsonl.
fn losses(run: &Path) -> Vec<(String, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .expect("read metrics.jsonl")
        .lines()
        .flat_map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            let step = v["step"].as_u64().unwrap_or(0);
            // Pre-training's, then fine-tuning's (not their speeds, which vary run to run).
            #[rustfmt::skip]
            let keys = ["loss", "val_loss", "grad_norm",
                        "l_gen", "l_clf", "batch_accuracy", "val_accuracy"];
            keys.into_iter()
                .filter_map(move |k| v[k].as_f64().map(|x| (format!("step {step} {k}"), x)))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The logged values of [`losses`] as their bits, to compare runs that must agree exactly.
fn bits(logged: &[(String, f64)]) -> Vec<(String, u64)> {
    logged
        .iter()
        .map(|(n, x)| (n.clone(), x.to_bits()))
        .collect()
}

/// Trains the small model these tests share into `run`: f32, on the cuda backend when
/// `device` says so, with `extra` flags.
fn train_small(run: &Path, device: &[&str], extra: &[&str], env: &[(&str, &str)]) -> Output {
    train_small_in("f32", run, device, extra, env)
}

/// As [`train_small`], in `precision`.
fn train_small_in(
    precision: &str,
    run: &Path,
    device: &[&str],
    extra: &[&str],
    env: &[(&str, &str)],
) -> Output {
    train_small_wide(precision, "32", run, device, extra, env)
}

/// As [`train_small_in`], `embd` columns wide (2 heads).
fn train_small_wide(
    precision: &str,
    embd: &str,
    run: &Path,
    device: &[&str],
    extra: &[&str],
    env: &[(&str, &str)],
) -> Output {
    let mut args: Vec<&str> = device.to_vec();
    #[rustfmt::skip]
    args.extend([
        "train", "--data", IMAGES, "--limit", "200", "--side", "8", "--palette-size", "16",
        "--layers", "2", "--embd", embd, "--heads", "2", "--batch", "8", "--lr", "3e-3",
        "--warmup", "1", "--precision", precision, "--out", s(run),
    ]);
    args.extend(extra);
    igpt_on_host_driver(&args, env)
}

const CUDA: &[&str] = &["--device", "cuda"];

/// Trains the small model with `extra` on the emulated GPU into `gpu_run`, which must replay
/// its passes and updates as graphs, and on the CPU into `cpu_run`.
fn train_on_both(gpu_run: &Path, cpu_run: &Path, extra: &[&str]) {
    let err = succeeded(
        &train_small(gpu_run, CUDA, extra, &[]),
        "training with --device cuda",
    );
    assert!(
        !err.contains("without CUDA graphs"),
        "passes or updates were not replayed:\n{err}"
    );
    succeeded(
        &train_small(cpu_run, &[], extra, &[]),
        "training on the cpu",
    );
}

/// Asks the host driver to refuse every capture, as a driver whose graphs fail would.
const NO_GRAPHS: &[(&str, &str)] = &[("CUDA_HOST_REFUSE_CAPTURE", "1")];

/// Asserts equal per-step losses and gradient norms (within 1e-4) of two runs.
fn assert_same_losses(tested: &Path, reference: &Path, at_least: usize) {
    let (got, want) = (losses(tested), losses(reference));
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    assert!(got.len() >= at_least, "{got:?}");
    for ((name, g), (_, w)) in got.iter().zip(&want) {
        assert!((g - w).abs() <= 1e-4 * w.abs(), "{name}: cuda {g}, cpu {w}");
    }
}

#[test]
fn training_and_sampling_on_the_cuda_backend_match_the_cpu_and_runs_move_between_them() {
    let dir = tempdir("cuda-host-train");
    let (gpu_run, calls_run, cpu_run) = (dir.join("gpu"), dir.join("calls"), dir.join("cpu"));
    let steps = [
        "--steps",
        "6",
        "--eval-every",
        "3",
        "--checkpoint-every",
        "3",
    ];
    train_on_both(&gpu_run, &cpu_run, &steps);

    // f32 training on the two devices: the same losses and gradient norms, step by step.
    assert_same_losses(&gpu_run, &cpu_run, 8);
    // Every step's norm is above the default clip (1.0): each update compared was clipped, on
    // the device, by the replayed update.
    let norms: Vec<f64> = losses(&cpu_run)
        .into_iter()
        .filter(|(n, _)| n.ends_with(" grad_norm"))
        .map(|(_, g)| g)
        .collect();
    assert!(
        norms.len() == 6 && norms.iter().all(|&g| g > 1.0),
        "{norms:?}"
    );
    // The model learnt something (the comparison is not of two untouched models).
    let gpu = losses(&gpu_run);
    let first = gpu.first().expect("a loss").1;
    let last_train = gpu
        .iter()
        .rev()
        .find(|(n, _)| n.ends_with(" loss"))
        .expect("a loss")
        .1;
    assert!(last_train < first - 0.05, "loss {first} -> {last_train}");

    // Where graphs cannot be captured, passes run call by call, with the same losses, and
    // the run says so.
    let err = succeeded(
        &train_small(&calls_run, CUDA, &steps, NO_GRAPHS),
        "training with captures refused",
    );
    assert!(
        err.contains("without CUDA graphs"),
        "no note of the fallback:\n{err}"
    );
    assert_same_losses(&calls_run, &cpu_run, 8);

    // A run trained on the GPU continues on the CPU.
    let out = igpt_on_host_driver(&["train", "--resume", s(&gpu_run), "--steps", "8"], &[]);
    succeeded(&out, "resuming the cuda run on the cpu");
    assert_eq!(
        losses(&gpu_run)
            .iter()
            .filter(|(n, _)| n.ends_with(" loss"))
            .count(),
        8,
        "steps 7 and 8 were not logged"
    );

    // f32 samples on the GPU, decoded by replayed CUDA graphs (or call by call where captures
    // fail), are the CPU's pixels.
    let sample = |device: &[&str], precision: &str, png: &Path, env: &[(&str, &str)]| {
        let mut args: Vec<&str> = device.to_vec();
        #[rustfmt::skip]
        args.extend([
            "sample", "--model", s(&cpu_run), "--n", "3", "--seed", "5", "--precision",
            precision, "--out", s(png),
        ]);
        igpt_on_host_driver(&args, env)
    };
    let read = |png: &Path| std::fs::read(png).expect("read the samples");
    let (gpu_png, calls_png, cpu_png) = (
        dir.join("gpu.png"),
        dir.join("calls.png"),
        dir.join("cpu.png"),
    );
    let err = succeeded(&sample(CUDA, "f32", &gpu_png, &[]), "sampling on cuda");
    assert!(
        !err.contains("without CUDA graphs"),
        "graphs were not used:\n{err}"
    );
    succeeded(&sample(&[], "f32", &cpu_png, &[]), "sampling on the cpu");
    assert_eq!(
        read(&gpu_png),
        read(&cpu_png),
        "f32 samples differ between cuda and the cpu"
    );
    let err = succeeded(
        &sample(CUDA, "f32", &calls_png, NO_GRAPHS),
        "sampling with captures refused",
    );
    assert!(
        err.contains("without CUDA graphs"),
        "no note of the fallback:\n{err}"
    );
    assert_eq!(
        read(&calls_png),
        read(&cpu_png),
        "call-by-call samples differ"
    );
    let bf16_png = dir.join("bf16.png");
    let err = succeeded(
        &sample(CUDA, "bf16", &bf16_png, &[]),
        "bf16 sampling on cuda",
    );
    assert!(
        !err.contains("without CUDA graphs"),
        "graphs were not used:\n{err}"
    );
    assert!(bf16_png.exists());
}

#[test]
fn a_cublaslt_older_than_cuda_13s_is_refused_naming_what_to_install() {
    let out = igpt_on_host_driver(
        &["--device", "cuda", "selftest", "--quick"],
        &[("CUDA_HOST_CUBLASLT_VERSION", "120805")],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an old cuBLASLt was used:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("version 12.8") && err.contains("libcublasLt.so.13"),
        "{err}"
    );
}

#[test]
fn a_model_or_batch_larger_than_the_device_memory_is_refused_with_the_sizes() {
    let dir = tempdir("cuda-host-too-big");
    let train = |batch: &str, memory: &str| {
        igpt_on_host_driver(
            &[
                "--device",
                "cuda",
                "train",
                "--data",
                IMAGES,
                "--limit",
                "100",
                "--side",
                "16",
                "--palette-size",
                "16",
                "--layers",
                "4",
                "--embd",
                "256",
                "--heads",
                "4",
                "--steps",
                "1",
                "--batch",
                batch,
                "--out",
                s(&dir.join("run")),
            ],
            &[("CUDA_HOST_MEMORY_BYTES", memory)],
        )
    };
    // The model with its gradients and moments (52 MB) fits in 300 MB, 64 images of
    // activations (1.1 GB) do not: the message says which flag to change.
    let out = train("64", "300000000");
    let err = stderr(&out);
    assert!(
        !out.status.success(),
        "a batch too big for the device trained:\n{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("GB")
            && err.contains("of the GPU's memory is free")
            && err.contains("--micro-batch"),
        "the error does not give the sizes and what to do:\n{err}"
    );
    // 48 MB: not even the model.
    let out = train("8", "48000000");
    let err = stderr(&out);
    assert!(
        !out.status.success(),
        "a model too big for the device trained:\n{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("train a smaller one"), "{err}");
}

#[test]
fn training_passes_are_replayed_as_cuda_graphs_and_can_be_turned_off() {
    let dir = tempdir("cuda-host-bench-train");
    let json = dir.join("train.json");
    let out = igpt_on_host_driver(
        &[
            "bench",
            "train",
            "--device",
            "cuda",
            "--layers",
            "1",
            "--embd",
            "32",
            "--heads",
            "2",
            "--vocab",
            "16",
            "--side",
            "8",
            "--batch",
            "4",
            "--warmup",
            "2",
            "--steps",
            "1",
            "--no-torch",
            "--json",
            s(&json),
        ],
        &[],
    );
    succeeded(&out, "igpt bench train --device cuda");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("read the report"))
            .expect("parse the report");
    let runs = report["runs"].as_array().expect("runs");
    let run = |name: &str| {
        runs.iter()
            .find(|r| r["impl"] == name)
            .unwrap_or_else(|| panic!("no {name} run in {report}"))
    };
    // Recorded at the second step, replayed from then on; the comparison run issues calls.
    assert_eq!(run("igpt")["replayed"], true, "{report}");
    assert!(run("igpt")["replay_failure"].is_null(), "{report}");
    assert_eq!(run("igpt-calls")["replayed"], false, "{report}");
}

#[test]
fn bert_training_in_micro_batches_on_the_cuda_backend_matches_the_cpu() {
    let dir = tempdir("cuda-host-bert");
    // Two passes a step (both replayed from the second step on), the masked objective's
    // weighted loss and bidirectional attention.
    #[rustfmt::skip]
    let extra = [
        "--steps", "4", "--micro-batch", "4", "--objective", "bert", "--eval-every", "2",
    ];
    let (gpu_run, cpu_run) = (dir.join("gpu"), dir.join("cpu"));
    train_on_both(&gpu_run, &cpu_run, &extra);
    assert_same_losses(&gpu_run, &cpu_run, 6);
}

#[test]
fn training_on_the_cuda_backend_gives_the_same_bits_whatever_order_blocks_run_in() {
    // The second run of each case starts every kernel's blocks, and the threads of each, in
    // the other order. Sums that depended on that order (atomic adds) would change the losses
    // and the saved model. bf16 products run attention's flash kernels (causal for
    // pre-training, bidirectional for BERT, whose loss is weighted and whose steps here take
    // two passes); f32 runs attention through cuBLASLt and the softmax kernels.
    #[rustfmt::skip]
    let cases: [(&str, &[&str]); 3] = [
        ("bf16", &[]),
        ("bf16", &["--objective", "bert", "--micro-batch", "4"]),
        ("f32", &[]),
    ];
    for (case, (precision, extra)) in cases.iter().enumerate() {
        let dir = tempdir(&format!("cuda-host-same-bits-{case}"));
        let runs = [dir.join("ascending"), dir.join("descending")];
        for (run, env) in runs
            .iter()
            .zip([&[][..], &[("CUDA_HOST_REVERSE_ORDER", "1")][..]])
        {
            let flags = [
                &[
                    "--steps",
                    "4",
                    "--eval-every",
                    "2",
                    "--checkpoint-every",
                    "4",
                ][..],
                extra,
            ]
            .concat();
            succeeded(
                &train_small_in(precision, run, CUDA, &flags, env),
                "training with --device cuda",
            );
        }
        let what = format!("{precision} {extra:?}");
        let (a, b) = (losses(&runs[0]), losses(&runs[1]));
        assert!(a.len() >= 6, "{what}: {a:?}");
        assert_eq!(
            bits(&a),
            bits(&b),
            "{what}: losses differ between block orders"
        );
        for file in ["model.safetensors", "trainer.safetensors"] {
            let read = |run: &Path| std::fs::read(run.join(file)).expect("read the checkpoint");
            assert!(
                read(&runs[0]) == read(&runs[1]),
                "{what}: {file} differs between block orders"
            );
        }
    }
}

#[test]
fn fine_tuning_on_the_cuda_backend_matches_the_cpu_and_gives_the_same_bits_whatever_order_blocks_run_in()
 {
    let dir = tempdir("cuda-host-finetune");
    let model = dir.join("model");
    succeeded(
        &train_small(&model, &[], &["--steps", "2"], &[]),
        "pre-training on the cpu",
    );
    // A zero head, so the model's gradient comes from both losses from the first step; two
    // passes a step, so the passes' gradients add up on the device.
    let finetune = |device: &[&str], precision: &str, out: &Path, env: &[(&str, &str)]| {
        let mut args = device.to_vec();
        #[rustfmt::skip]
        args.extend([
            "finetune", "--model", s(&model), "--data", "fashion-mnist", "--limit", "100",
            "--steps", "4", "--batch", "8", "--micro-batch", "4", "--eval-every", "2",
            "--lr", "3e-3", "--zero-head", "--precision", precision, "--out", s(out),
        ]);
        succeeded(&igpt_on_host_driver(&args, env), "fine-tuning");
    };
    // bf16 products (flash attention) with every kernel's blocks in either order.
    let runs = [dir.join("ascending"), dir.join("descending")];
    finetune(CUDA, "bf16", &runs[0], &[]);
    finetune(CUDA, "bf16", &runs[1], &[("CUDA_HOST_REVERSE_ORDER", "1")]);
    let (a, b) = (losses(&runs[0]), losses(&runs[1]));
    // Per step L_GEN, L_CLF, the norm and the batch's accuracy; three validations. (The kept
    // model here is the starting point, which no later validation beats, so the losses, not
    // the saved files, carry the comparison.)
    assert_eq!(a.len(), 4 * 4 + 3, "{a:?}");
    assert_eq!(bits(&a), bits(&b), "losses differ between block orders");
    // f32 products against the CPU's fine-tuning of the same model.
    let (gpu, cpu) = (dir.join("gpu-f32"), dir.join("cpu-f32"));
    finetune(CUDA, "f32", &gpu, &[]);
    finetune(&[], "f32", &cpu, &[]);
    assert_same_losses(&gpu, &cpu, 4 * 4 + 3);
    // The bf16 run's classification losses follow the CPU's f32 ones (7e-6 apart, relative,
    // when written): the head reads the final norm's output, computed again in f32 where the
    // pass kept it as bf16 for the model's head. Reading a buffer the norm had not written, it
    // was 2e-2 off.
    let worst = a
        .iter()
        .zip(losses(&cpu))
        .filter(|((name, _), _)| name.ends_with(" l_clf"))
        .map(|((_, g), (_, w))| (g - w).abs() / w)
        .fold(0.0, f64::max);
    assert!(
        worst <= 1e-3,
        "bf16 classification losses {worst} from the cpu's f32"
    );
}

#[test]
fn a_decoding_step_issues_eight_calls_per_layer_and_nine_where_it_splits_its_keys() {
    // From the host driver's log of what was issued (kernels, products, copies): sampling one
    // image from a model of one layer and from one of two, every step issued call by call
    // (captures refused), the second's extra calls are one layer's per step.
    let dir = tempdir("cuda-host-calls-per-layer");
    let calls_per_layer = |side: &str| -> (usize, usize) {
        let mut issued = Vec::new();
        for layers in ["1", "2"] {
            let run = dir.join(format!("side{side}-layers{layers}"));
            #[rustfmt::skip]
            let train = [
                "train", "--data", IMAGES, "--limit", "40", "--side", side, "--palette-size", "16",
                "--layers", layers, "--embd", "32", "--heads", "2", "--batch", "4",
                "--steps", "1", "--out", s(&run),
            ];
            succeeded(&igpt_on_host_driver(&train, &[]), "training on the cpu");
            let (log, png) = (run.join("launches.log"), run.join("sample.png"));
            #[rustfmt::skip]
            let sample = [
                "--device", "cuda", "sample", "--model", s(&run), "--n", "1", "--seed", "3",
                "--precision", "bf16", "--out", s(&png),
            ];
            let env = [NO_GRAPHS[0], ("CUDA_HOST_LAUNCH_LOG", s(&log))];
            succeeded(&igpt_on_host_driver(&sample, &env), "sampling on cuda");
            issued.push(std::fs::read_to_string(&log).expect("read the launch log"));
        }
        // One embedding per step.
        let steps = issued[0]
            .lines()
            .filter(|l| l.starts_with("embed_step "))
            .count();
        let extra = issued[1].lines().count() - issued[0].lines().count();
        // Both loaded their weights once: four matrices packed per layer.
        let packs = |log: &str| log.lines().filter(|l| l.starts_with("pack_weight")).count();
        let per_step = extra - (packs(&issued[1]) - packs(&issued[0]));
        assert_eq!(per_step % steps, 0, "{per_step} calls over {steps} steps");
        (per_step / steps, steps)
    };
    // 64 positions: too few keys to split.
    assert_eq!(calls_per_layer("8"), (8, 64));
    // 256 positions, one image of 2 heads: the keys split into 4 runs, then combined.
    assert_eq!(calls_per_layer("16"), (9, 256));
}

#[test]
fn a_training_step_adds_each_block_onto_its_residual_stream_without_copying_it() {
    // The two residual products of a block read the stream where it lies and write their sum
    // to the next buffer (cuBLASLt's C and D apart): training issues no device copy, and a
    // model of two layers as many more products as its second layer's.
    let dir = tempdir("cuda-host-residual-copies");
    let issued: Vec<String> = ["1", "2"]
        .iter()
        .map(|layers| {
            let run = dir.join(format!("layers{layers}"));
            let log = run.with_extension("log");
            #[rustfmt::skip]
            let train = [
                "--device", "cuda", "train", "--data", IMAGES, "--limit", "40", "--side", "8",
                "--palette-size", "16", "--layers", layers, "--embd", "32", "--heads", "2",
                "--batch", "4", "--steps", "2", "--out", s(&run),
            ];
            let env = [NO_GRAPHS[0], ("CUDA_HOST_LAUNCH_LOG", s(&log))];
            succeeded(&igpt_on_host_driver(&train, &env), "training on cuda");
            std::fs::read_to_string(&log).expect("read the launch log")
        })
        .collect();
    let count = |log: &str, what: &str| log.lines().filter(|l| l.starts_with(what)).count();
    // No device copy at all, so none per layer either.
    for log in &issued {
        assert_eq!(count(log, "cuMemcpyDtoDAsync"), 0, "device copies");
    }
    // A layer's products: 4 forward and 8 backward in each of the 2 steps, then 4 in the final
    // evaluation.
    let products = count(&issued[1], "cublasLtMatmul") - count(&issued[0], "cublasLtMatmul");
    assert_eq!(products, 2 * 12 + 4);
}

#[test]
fn bf16_training_on_the_cuda_backend_multiplies_stored_bf16_operands_and_follows_the_f32_curve() {
    // The blocks' products read their inputs as the norms, the activation and attention stored
    // them (bf16), the weights packed again after each update and each output gradient stored
    // rounded once. Were the packed weights not refreshed, the forward pass would keep the
    // first step's model and the loss would not fall with the CPU's. Heads of 16 columns run
    // flash attention, which stores bf16 itself; heads of 24 run the f32 attention, whose
    // output and gradient are rounded for the products instead.
    for (embd, steps, flash) in [("32", "30", true), ("48", "10", false)] {
        let dir = tempdir(&format!("cuda-host-bf16-training-{embd}"));
        let (gpu_run, cpu_run) = (dir.join("gpu"), dir.join("cpu"));
        let log = dir.join("launches.log");
        let flags = ["--steps", steps, "--eval-every", "5"];
        let env = [("CUDA_HOST_LAUNCH_LOG", s(&log))];
        let err = succeeded(
            &train_small_wide("bf16", embd, &gpu_run, CUDA, &flags, &env),
            "training in bf16 with --device cuda",
        );
        assert!(!err.contains("without CUDA graphs"), "{err}");
        succeeded(
            &train_small_wide("f32", embd, &cpu_run, &[], &flags, &[]),
            "training on the cpu",
        );
        let (got, want) = (losses(&gpu_run), losses(&cpu_run));
        assert_eq!(got.len(), want.len());
        for ((name, g), (_, w)) in got.iter().zip(&want) {
            if name.ends_with(" loss") || name.ends_with(" val_loss") {
                assert!(
                    (g - w).abs() <= 0.02 * w,
                    "embd {embd}, {name}: cuda bf16 {g}, cpu f32 {w}"
                );
            }
        }
        if flash {
            let train_loss = |step: &str| {
                got.iter()
                    .find(|(n, _)| n == &format!("step {step} loss"))
                    .map(|&(_, x)| x)
                    .expect("a logged loss")
            };
            assert!(
                train_loss(steps) < train_loss("1") - 0.5,
                "bf16 training did not learn: {got:?}"
            );
        }
        assert_bf16_launches(
            &std::fs::read_to_string(&log).expect("read the launch log"),
            flash,
        );
    }
}

#[test]
fn wide_heads_train_in_one_stage_of_tiles_where_shared_memory_is_short_with_the_same_bits() {
    // Heads of 96 columns run the flash kernels of width 128. Their bf16 gradient kernels take
    // 64 KiB in two stages of tiles; on a GPU whose multiprocessors have 100 KiB (sm_86, sm_89)
    // two such blocks would not fit, and the backend runs their one-stage variants (48 KiB),
    // which must give the same bits.
    let dir = tempdir("cuda-host-one-stage");
    let flags = ["--steps", "2", "--eval-every", "2"];
    let mut runs = Vec::new();
    for (name, shared) in [("h200", "233472"), ("small", "102400")] {
        let (run, log) = (dir.join(name), dir.join(format!("{name}.log")));
        let env = [
            NO_GRAPHS[0],
            ("CUDA_HOST_LAUNCH_LOG", s(&log)),
            ("CUDA_HOST_SHARED_PER_SM", shared),
        ];
        succeeded(
            &train_small_wide("bf16", "192", &run, CUDA, &flags, &env),
            "training with heads of 96 columns",
        );
        let launches = std::fs::read_to_string(&log).expect("read the launch log");
        let count = |kernel: &str| {
            launches
                .lines()
                .filter(|l| l.split(' ').next() == Some(kernel))
                .count()
        };
        let (two, one) = (
            count("flash_attention_backward_kv_128_bf16")
                + count("flash_attention_backward_q_128_bf16"),
            count("flash_attention_backward_kv_128_bf16_one_stage")
                + count("flash_attention_backward_q_128_bf16_one_stage"),
        );
        assert_eq!(
            (two > 0, one > 0),
            (name == "h200", name == "small"),
            "{name}: {two} {one}"
        );
        runs.push(bits(&losses(&run)));
    }
    assert!(!runs[0].is_empty());
    assert_eq!(runs[0], runs[1]);
}

/// The launch log of a 2-layer bf16 training run holds the passes and updates issued or
/// captured (not the replays). With flash attention, no pass rounds anything on its own: the
/// norms (the final one's output for the head too), attention's kernels and the GELU's store
/// the activations the products read as bf16, and the backward kernels and the loss (of a
/// pass with a gradient: `cross_entropy_bf16`) the gradients. Without, attention's f32 output
/// is rounded for its projection in the forward pass (whose backward products then keep f32
/// operands), and the gradient of Q, K, V in the backward pass, once a layer each. Each update
/// packs the 9 weights (4 a layer and the head) right after AdamW.
fn assert_bf16_launches(launches: &str, flash: bool) {
    let kernels: Vec<&str> = launches
        .lines()
        .map(|l| l.split(' ').next().unwrap_or(""))
        .collect();
    let count = |kernel: &str| kernels.iter().filter(|&&k| k == kernel).count();
    // The MLP's pre-activation and its activation's gradient are bf16: the GELU reads them so,
    // once a layer in each forward pass and twice in each backward pass (recomputed).
    let backwards = count("gelu_backward_from_bf16") / 2;
    let forwards = count("cross_entropy") + backwards;
    assert!(forwards > backwards && backwards > 0, "{launches}");
    for f32_input in [
        "gelu_forward",
        "gelu_forward_bf16",
        "gelu_backward",
        "gelu_backward_bf16",
    ] {
        assert_eq!(count(f32_input), 0, "{f32_input}:\n{launches}");
    }
    assert_eq!(
        count("gelu_forward_from_bf16"),
        2 * (forwards + backwards),
        "{launches}"
    );
    // Each training pass's loss stores the logits' gradient as bf16; evaluation has none.
    assert_eq!(count("cross_entropy_bf16"), backwards, "{launches}");
    // The blocks' two norms read their output's gradient as bf16 (the products store it so);
    // the final norm's, from the head, stays f32.
    assert_eq!(
        (
            count("rmsnorm_backward_from_bf16"),
            count("rmsnorm_backward")
        ),
        (4 * backwards, backwards),
        "{launches}"
    );
    let flash_launches = kernels
        .iter()
        .filter(|k| k.starts_with("flash_attention"))
        .count();
    if flash {
        assert_eq!(count("round_bf16"), 0, "{launches}");
        for (kernel, per_pass) in [
            ("flash_attention_forward_64_bf16", forwards),
            ("flash_attention_backward_prepare_bf16", backwards),
            ("flash_attention_backward_kv_64_bf16", backwards),
            ("flash_attention_backward_q_64_bf16", backwards),
        ] {
            assert_eq!(count(kernel), 2 * per_pass, "{kernel}:\n{launches}");
        }
        assert_eq!(flash_launches, 2 * forwards + 6 * backwards, "{launches}");
    } else {
        assert_eq!(
            count("round_bf16"),
            2 * forwards + 2 * backwards,
            "{launches}"
        );
        assert!(
            flash_launches == 0 && count("attention_softmax") > 0,
            "{launches}"
        );
    }
    let updates: Vec<usize> = (0..kernels.len())
        .filter(|&i| kernels[i] == "adamw_tensors")
        .collect();
    assert!(!updates.is_empty(), "{launches}");
    for i in updates {
        let packs = kernels[i + 1..].iter().take_while(|&&k| k == "pack_weight");
        assert_eq!(packs.count(), 9, "after launch {i}:\n{launches}");
    }
}

#[test]
fn each_products_algorithm_is_chosen_once_however_often_it_runs() {
    // f32 (attention's products through cuBLASLt too), and bf16 with heads of 16 columns
    // (flash attention) and of 24 (attention's products through cuBLASLt, in f32).
    for (precision, embd) in [("f32", "32"), ("bf16", "32"), ("bf16", "48")] {
        let dir = tempdir(&format!("cuda-host-heuristics-{precision}-{embd}"));
        let log = dir.join("heuristics.log");
        // Without graphs every step issues its products again; each must reuse its plan.
        let env = [NO_GRAPHS[0], ("CUDA_HOST_HEURISTICS_LOG", s(&log))];
        let run = dir.join("run");
        let flags = ["--steps", "3", "--eval-every", "3"];
        succeeded(
            &train_small_wide(precision, embd, &run, CUDA, &flags, &env),
            "training with --device cuda",
        );
        let queries = std::fs::read_to_string(&log).expect("read the heuristics log");
        let lines: Vec<&str> = queries.lines().collect();
        // The block's four weight products and the head, each forward and backward: at least
        // a dozen distinct products.
        assert!(
            lines.len() >= 12,
            "{precision} {embd}: only {} queries:\n{queries}",
            lines.len()
        );
        // f32 operands with COMPUTE_32F (68) in f32. In bf16, bf16 operands (type 14) with
        // f32 sums, the head's two backward products too (the final norm's output and the
        // logits' gradient are stored bf16), except with heads of 24, where attention's
        // output is f32: the attention projection's two backward products read f32 operands
        // rounded inside, FAST_16BF (75), as do attention's own products there (scores and
        // P V, one per head: batch 2). With flash attention no product reads f32 operands.
        let count = |what: &str| lines.iter().filter(|l| l.contains(what)).count();
        if precision == "bf16" {
            let fast = count("type 0 compute 75");
            assert_eq!(count("type 14 compute 68") + fast, lines.len(), "{queries}");
            let (weights, per_head) =
                (count("type 0 compute 75 out 0 batch 1 "), count("batch 2 "));
            let f32_inputs = if embd == "32" { 0 } else { 2 };
            assert_eq!(weights, f32_inputs, "{queries}");
            assert_eq!(fast, weights + per_head, "{queries}");
            assert_eq!(per_head > 0, embd == "48", "{queries}");
            // Products that store bf16 (type 14) results, by columns and depth (m, k), with
            // either kind of heads: the MLP's pre-activation (c_fc's forward, 4d from d), its
            // activation's gradient (mlp_proj's dx, 4d from d) and the norms' output gradients
            // (c_fc's dx, d from 4d; c_attn's dx, d from 3d). With flash attention two more:
            // Q, K, V (c_attn's forward, 3d from d) and attention's output gradient
            // (attn_proj's dx, d from d). Each for every batch size it runs.
            let results: Vec<&str> = lines
                .iter()
                .copied()
                .filter(|l| l.contains(" out 14 "))
                .collect();
            let fields = |l: &str| -> Vec<String> {
                let w: Vec<&str> = l.split_whitespace().collect();
                [w[1], w[5], w[7], w[8]].map(String::from).to_vec()
            };
            let shapes: std::collections::BTreeSet<(String, String)> = results
                .iter()
                .map(|l| {
                    let f = fields(l);
                    (f[0].clone(), f[1].clone())
                })
                .collect();
            let want: &[(&str, &str)] = if embd == "32" {
                &[
                    ("128", "32"),
                    ("32", "128"),
                    ("32", "96"),
                    ("96", "32"),
                    ("32", "32"),
                ]
            } else {
                &[("192", "48"), ("48", "192"), ("48", "144")]
            };
            let want: std::collections::BTreeSet<(String, String)> = want
                .iter()
                .map(|&(m, k)| (m.to_string(), k.to_string()))
                .collect();
            assert_eq!(shapes, want, "{queries}");
            // One product a shape, told apart by its transposes too (the MLP's two have the
            // same columns and depth).
            let products: std::collections::BTreeSet<Vec<String>> =
                results.iter().map(|l| fields(l)).collect();
            assert_eq!(products.len(), want.len() + 1, "{queries}");
            assert!(
                results.iter().all(|l| l.contains("type 14 compute 68")),
                "{queries}"
            );
        } else {
            assert_eq!(count("type 0 compute 68 out 0 "), lines.len(), "{queries}");
        }
        let distinct: std::collections::HashSet<&str> = lines.iter().copied().collect();
        assert_eq!(
            distinct.len(),
            lines.len(),
            "{precision}: a product's algorithm was asked for more than once:\n{queries}"
        );
    }
}

#[test]
fn a_gpu_run_checks_host_memory_for_the_host_s_share_only() {
    // With 2 MB of host memory (IGPT_MEMORY_LIMIT), 64 images a pass of the small model need
    // more (~12 MB of activations) and the CPU refuses; on a GPU the activations are the
    // device's, and the host holds only the parameters' buffer and one batch's (~0.2 MB).
    let dir = tempdir("cuda-host-host-share");
    let train = |device: &[&str], run: &str| {
        let mut args = device.to_vec();
        let out = dir.join(run);
        #[rustfmt::skip]
        args.extend([
            "train", "--data", IMAGES, "--limit", "100", "--side", "8", "--palette-size", "16",
            "--layers", "2", "--embd", "32", "--heads", "2", "--batch", "64", "--steps", "1",
            "--out", s(&out),
        ]);
        igpt_on_host_driver(&args, &[("IGPT_MEMORY_LIMIT", "2000000")])
    };
    let cpu = train(&[], "cpu");
    let err = stderr(&cpu);
    assert!(
        !cpu.status.success() && err.contains("of memory is available"),
        "the CPU run was not refused for host memory:\n{err}"
    );
    succeeded(
        &train(CUDA, "gpu"),
        "training on cuda with little host memory",
    );
}
