//! Training behaviour: it learns, it is reproducible, and it resumes exactly.

mod common;
use common::tempdir;

use igpt::backend::Device;
use igpt::checkpoint::RunDir;
use igpt::config::ModelConfig;
use igpt::data::{Format, ImageSet, TokenSet};
use igpt::palette::FitOptions;
use igpt::train::run::{self, DataSpec, PaletteSpec, Quiet};
use igpt::train::{TrainConfig, Trainer};

fn tiny_model() -> ModelConfig {
    ModelConfig {
        n_layer: 2,
        n_embd: 32,
        n_head: 2,
        n_vocab: 8,
        side: 6,
        channels: 1,
        objective: Default::default(),
    }
}

#[test]
fn loss_falls_close_to_zero_on_a_few_images() {
    let model = tiny_model();
    let t = model.n_ctx();
    // Four fixed images; each is memorised after enough steps.
    let tokens: Vec<u16> = (0..4 * t).map(|i| ((i * 5 + i / t) % 8) as u16).collect();
    let data = TokenSet::from_tokens(tokens, t, 8, None).unwrap();
    let cfg = TrainConfig {
        steps: 300,
        batch: 4,
        micro_batch: 4,
        lr: 1e-2,
        warmup: 10,
        clip: 1.0,
        ..TrainConfig::default()
    };
    let params = igpt::model::init_params(&model, 0);
    let mut trainer = Trainer::new(&model, cfg, &params, &Device::Cpu).unwrap();
    let first = trainer.step(&data).unwrap().loss;
    assert!(
        (first - (8f64).ln()).abs() < 0.05,
        "an untrained model (zero head) predicts uniformly: {first}"
    );
    let mut last = first;
    for _ in 1..300 {
        last = trainer.step(&data).unwrap().loss;
    }
    assert!(last < 0.05, "loss only fell from {first} to {last}");
}

#[test]
fn accumulation_equals_one_large_batch() {
    let model = tiny_model();
    let t = model.n_ctx();
    let tokens: Vec<u16> = (0..8 * t).map(|i| ((i * 3 + i / 5) % 8) as u16).collect();
    let data = TokenSet::from_tokens(tokens, t, 8, None).unwrap();
    let params = igpt::model::init_params(&model, 3);
    let run = |micro: usize| {
        let cfg = TrainConfig {
            steps: 10,
            batch: 8,
            micro_batch: micro,
            seed: 5,
            ..TrainConfig::default()
        };
        let mut tr = Trainer::new(&model, cfg, &params, &Device::Cpu).unwrap();
        (0..4)
            .map(|_| tr.step(&data).unwrap().loss)
            .collect::<Vec<_>>()
    };
    let (full, accum) = (run(8), run(2));
    for (a, b) in full.iter().zip(&accum) {
        assert!(
            (a - b).abs() < 1e-5,
            "full batch {full:?} vs accumulated {accum:?}"
        );
    }
}

fn fake_images(n: usize, side: usize) -> ImageSet {
    let mut pixels = Vec::with_capacity(n * side * side);
    for i in 0..n {
        for y in 0..side {
            for x in 0..side {
                pixels.push(if (x + y + i) % 3 == 0 {
                    230
                } else {
                    ((x * 40 + y * 13 + i * 7) % 200) as u8
                });
            }
        }
    }
    ImageSet {
        height: side,
        width: side,
        channels: 1,
        pixels,
        labels: Some((0..n as u32).map(|i| i % 3).collect()),
        class_names: vec![],
    }
}

/// Writes `set` as an .npy data set in `dir` and returns its path.
fn write_npy(dir: &std::path::Path, set: &ImageSet) -> String {
    let p = dir.join("images.npy");
    std::fs::write(
        &p,
        igpt::npy::encode(
            &[set.len(), set.height, set.width],
            igpt::npy::DType::U8,
            &set.pixels,
        ),
    )
    .unwrap();
    p.to_string_lossy().to_string()
}

fn spec(data: String) -> DataSpec {
    DataSpec {
        data,
        format: Format::Auto,
        side: None,
        channels: None,
        val_data: None,
        val_fraction: 0.2,
        limit: None,
        seed: 1,
    }
}

fn losses_of(run: &RunDir) -> Vec<f64> {
    std::fs::read_to_string(run.file("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64())
        .collect()
}

#[test]
fn ten_steps_then_resume_equals_twenty_uninterrupted() {
    let tmp = tempdir("resume");
    let npy = write_npy(&tmp, &fake_images(30, 6));
    let model = tiny_model();
    let cfg = TrainConfig {
        steps: 20,
        batch: 4,
        micro_batch: 2,
        lr: 5e-3,
        warmup: 5,
        eval_every: 5,
        checkpoint_every: 3,
        ..TrainConfig::default()
    };
    let pal = PaletteSpec::Fit(FitOptions {
        k: 8,
        iterations: 10,
        sample: 0,
        seed: 0,
    });

    let whole = RunDir::create(&tmp.join("whole")).unwrap();
    let prep = run::prepare(&whole, &spec(npy.clone()), &pal, &mut Quiet).unwrap();
    let s = run::start(
        &whole,
        &model,
        &cfg,
        &prep,
        "test",
        None,
        &Device::Cpu,
        igpt::parallel::Single::team(),
        &mut Quiet,
    )
    .unwrap();
    assert_eq!(s.losses.len(), 20);

    let split = RunDir::create(&tmp.join("split")).unwrap();
    let prep = run::prepare(&split, &spec(npy), &pal, &mut Quiet).unwrap();
    let a = run::start(
        &split,
        &model,
        &cfg,
        &prep,
        "test",
        Some(10),
        &Device::Cpu,
        igpt::parallel::Single::team(),
        &mut Quiet,
    )
    .unwrap();
    assert_eq!(a.steps, 10);
    let b = run::resume(
        &RunDir::open(&split.path).unwrap(),
        None,
        None,
        None,
        &Device::Cpu,
        igpt::parallel::Single::team(),
        &mut Quiet,
    )
    .unwrap();
    assert_eq!(b.steps, 20);

    let joined: Vec<f64> = a.losses.iter().chain(&b.losses).copied().collect();
    assert_eq!(
        joined, s.losses,
        "losses after resume differ from an uninterrupted run"
    );
    assert_eq!(losses_of(&split), losses_of(&whole), "metrics logs differ");
    let p1 = whole.load_model(&model).unwrap();
    let p2 = split.load_model(&model).unwrap();
    assert_eq!(p1, p2, "final parameters differ");
    let bytes = |r: &RunDir| std::fs::read(r.file("model.safetensors")).unwrap();
    assert_eq!(
        bytes(&whole),
        bytes(&split),
        "the same model should give the same file"
    );
}

#[test]
fn same_seed_same_losses_and_a_different_seed_differs() {
    let model = tiny_model();
    let t = model.n_ctx();
    let tokens: Vec<u16> = (0..16 * t).map(|i| ((i * 7 + i / 3) % 8) as u16).collect();
    let data = TokenSet::from_tokens(tokens, t, 8, None).unwrap();
    let run = |seed: u64| {
        let cfg = TrainConfig {
            steps: 10,
            batch: 4,
            micro_batch: 4,
            seed,
            ..TrainConfig::default()
        };
        let params = igpt::model::init_params(&model, seed);
        let mut tr = Trainer::new(&model, cfg, &params, &Device::Cpu).unwrap();
        (0..6)
            .map(|_| tr.step(&data).unwrap().loss)
            .collect::<Vec<_>>()
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
}

#[test]
fn resume_refuses_a_different_model() {
    let tmp = tempdir("resume-mismatch");
    let npy = write_npy(&tmp, &fake_images(12, 6));
    let model = tiny_model();
    let cfg = TrainConfig {
        steps: 6,
        batch: 2,
        micro_batch: 2,
        eval_every: 0,
        checkpoint_every: 2,
        ..TrainConfig::default()
    };
    let dir = RunDir::create(&tmp.join("r")).unwrap();
    let prep = run::prepare(
        &dir,
        &spec(npy),
        &PaletteSpec::Fit(FitOptions {
            k: 8,
            iterations: 5,
            sample: 0,
            seed: 0,
        }),
        &mut Quiet,
    )
    .unwrap();
    run::start(
        &dir,
        &model,
        &cfg,
        &prep,
        "test",
        Some(2),
        &Device::Cpu,
        igpt::parallel::Single::team(),
        &mut Quiet,
    )
    .unwrap();
    let before = std::fs::read(dir.file("trainer.safetensors")).unwrap();
    let other = ModelConfig {
        n_layer: 3,
        ..model.clone()
    };
    let err = run::resume(
        &dir,
        None,
        None,
        Some(&other),
        &Device::Cpu,
        igpt::parallel::Single::team(),
        &mut Quiet,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("n_layer") && err.contains("resume"), "{err}");
    assert_eq!(
        before,
        std::fs::read(dir.file("trainer.safetensors")).unwrap(),
        "a refused resume changed the checkpoint"
    );
}

#[test]
fn a_model_too_large_for_memory_is_refused_with_advice() {
    // A small model (well under 1 GB with its optimizer state) on huge images.
    let cfg = ModelConfig {
        n_layer: 2,
        n_embd: 256,
        n_head: 8,
        n_vocab: 512,
        side: 256,
        channels: 3,
        objective: Default::default(),
    };
    let err = igpt::model::Engine::new(&cfg, 64, true, &Device::Cpu)
        .err()
        .expect("over a hundred gigabytes of activations cannot be allocated");
    let msg = err.to_string();
    assert!(msg.contains("GB") && msg.contains("activations"), "{msg}");
    // The model itself fits; the images per pass do not: the advice is about the batch.
    let oom = err
        .downcast_ref::<igpt::memory::OutOfMemory>()
        .expect("a typed memory error");
    assert_eq!(oom.scale, igpt::memory::Scale::Batch);
}

#[test]
fn shares_that_do_not_split_into_passes_are_refused() {
    use igpt::train::loader::Shard;
    let shard = |rank, world| Shard { rank, world };
    assert_eq!(
        shard(0, 2).pass(8, 8).unwrap(),
        4,
        "passes never exceed the share"
    );
    assert_eq!(shard(1, 2).pass(8, 2).unwrap(), 2);
    assert!(
        shard(0, 2).pass(12, 4).is_err(),
        "6 images do not split into passes of 4"
    );
    assert!(
        shard(2, 2).pass(8, 4).is_err(),
        "rank 2 of 2 does not exist"
    );
    let err = shard(0, 3).pass(8, 4).unwrap_err().to_string();
    assert!(err.contains("3 processes"), "{err}");
}
