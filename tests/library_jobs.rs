//! Every job through the library alone, as a user of the crate runs it: no `igpt` binary, no
//! flags; the device is chosen once and handed to each job.

mod common;
use common::tempdir;

use igpt::backend::Device;
use igpt::checkpoint::{LoadedModel, RunDir};
use igpt::config::ModelConfig;
use igpt::data::Format;
use igpt::finetune::{self, FinetuneConfig, HeadStart, QuietFinetune};
use igpt::model::{Decoder, Engine};
use igpt::palette::FitOptions;
use igpt::sample::{self, SampleOptions};
use igpt::train::TrainConfig;
use igpt::train::run::{self, DataSpec, PaletteSpec, Quiet};

#[test]
fn train_score_sample_probe_and_finetune_without_the_cli() {
    let device = Device::available()[0];
    let dir = tempdir("library-jobs");
    let run_dir = RunDir::create(&dir.join("run")).unwrap();
    let spec = DataSpec {
        data: igpt::data::BUILTIN_FASHION.into(),
        format: Format::Auto,
        side: Some(8),
        channels: Some(1),
        val_data: None,
        val_fraction: 0.25,
        limit: Some(120),
        seed: 0,
    };
    let fit = PaletteSpec::Fit(FitOptions {
        k: 8,
        iterations: 5,
        sample: 0,
        seed: 0,
    });
    let prepared = run::prepare(&run_dir, &spec, &fit, &mut Quiet).unwrap();
    assert_eq!((prepared.train.len(), prepared.val.len()), (90, 30));
    let model = ModelConfig {
        n_layer: 2,
        n_embd: 16,
        n_head: 2,
        n_vocab: prepared.palette.len(),
        side: 8,
        channels: 1,
        objective: Default::default(),
    };
    let cfg = TrainConfig {
        steps: 6,
        batch: 8,
        micro_batch: 4,
        lr: 3e-3,
        warmup: 2,
        eval_every: 3,
        checkpoint_every: 3,
        ..TrainConfig::default()
    };
    let summary = run::start(
        &run_dir,
        &model,
        &cfg,
        &prepared,
        "fashion",
        None,
        &device,
        igpt::parallel::Single::team(),
        &mut Quiet,
    )
    .unwrap();
    assert_eq!(summary.steps, 6);
    let val_loss = summary.val_loss.unwrap();
    assert!(
        val_loss.is_finite() && val_loss < (8f64).ln() + 0.1,
        "{val_loss}"
    );

    // Scores of the held-out images average to the held-out loss.
    let m = LoadedModel::open(&run_dir.path).unwrap();
    let mut engine = Engine::new(&model, 8, false, &device).unwrap();
    engine.set_params(&m.params).unwrap();
    let scores = igpt::eval::score_images(&mut engine, &prepared.val, |_| {}).unwrap();
    assert_eq!(scores.len(), 30);
    let mean = scores.iter().sum::<f64>() / 30.0;
    assert!(
        (mean - val_loss).abs() < 1e-6 * val_loss,
        "{mean} vs {val_loss}"
    );

    // Samples stay in the palette; completions keep their kept rows.
    let mut dec = Decoder::new(&model, 3, &device).unwrap();
    dec.set_params(&m.params).unwrap();
    let t = model.n_ctx();
    let mut originals = vec![0u16; 2 * t];
    for (i, img) in originals.chunks_mut(t).enumerate() {
        prepared.val.copy_image(i, img);
    }
    let prefixes = sample::completion_prefixes(&originals, t, 32, 2);
    let opts = SampleOptions::default();
    let done = sample::generate_all(&mut dec, &prefixes, &opts, |_| {}).unwrap();
    assert!(done.iter().all(|&x| (x as usize) < model.n_vocab));
    assert_eq!(&done[3 * t..3 * t + 32], &originals[t..t + 32]);

    // The demo's probe: a result for the pixels and for every layer, the best one among them.
    let mut names = Vec::new();
    let q = igpt::probe::quick_probe(
        &m,
        &prepared.train,
        &prepared.val,
        60,
        &device,
        |_| {},
        |name, _| names.push(name.to_string()),
    )
    .unwrap();
    assert_eq!(names, ["pixels", "layer 0", "layer 1", "layer 2"]);
    assert_eq!(q.layers.layers.len(), 3);
    let (_, best) = q.layers.best();
    assert!(
        q.layers
            .layers
            .iter()
            .all(|(_, r)| r.val_accuracy <= best.val_accuracy)
    );

    // Fine-tuning keeps its best model and head in the output directory.
    let out = dir.join("ft");
    let ft_cfg = FinetuneConfig {
        steps: 4,
        batch: 8,
        micro_batch: 4,
        eval_every: 2,
        head_start: HeadStart::Probe(40),
        ..FinetuneConfig::default()
    };
    let names: Vec<String> = (0..10).map(|c| format!("class {c}")).collect();
    let s = finetune::run(
        &m,
        &prepared.train,
        "fashion",
        names,
        &ft_cfg,
        &out,
        &device,
        igpt::parallel::Single::team(),
        &mut QuietFinetune,
    )
    .unwrap();
    assert_eq!(s.steps_run, 4);
    assert_eq!(s.train_images + s.val_images, 90);
    let best_model = LoadedModel::open(&out).unwrap();
    let head = finetune::Head::load(&out.join("head.safetensors")).unwrap();
    assert_eq!((head.d, head.classes), (16, 10));
    let acc = finetune::test_accuracy(&best_model, &head, &prepared.val, 0, &device).unwrap();
    assert!((0.0..=1.0).contains(&acc));
    // A data set without labels is refused with a message, not a panic, and nothing is written.
    let unlabelled = igpt::data::TokenSet::from_tokens(vec![0; 4 * t], t, 8, None).unwrap();
    let nowhere = dir.join("not-written");
    let err = finetune::run(
        &m,
        &unlabelled,
        "unlabelled",
        vec![],
        &ft_cfg,
        &nowhere,
        &device,
        igpt::parallel::Single::team(),
        &mut QuietFinetune,
    )
    .unwrap_err();
    assert!(err.to_string().contains("no labels"), "{err}");
    assert!(!nowhere.exists());
}

/// A small random model of `cfg`'s shape.
fn tiny() -> (ModelConfig, Vec<f32>) {
    let cfg = ModelConfig {
        n_layer: 1,
        n_embd: 16,
        n_head: 2,
        n_vocab: 6,
        side: 4,
        channels: 1,
        objective: Default::default(),
    };
    let params = igpt::model::init_params(&cfg, 3);
    (cfg, params)
}

#[test]
fn engines_and_decoders_hand_their_parameters_back_and_keep_them_on_failure() {
    use igpt::backend::Precision;
    let (cfg, params) = tiny();
    let dev = Device::Cpu;
    for precision in [Precision::F32, Precision::Bf16] {
        let mut p = params.clone();
        let e = Engine::adopting(&cfg, 2, &dev, &mut p, precision).unwrap();
        assert!(p.is_empty(), "adopted, not copied");
        assert_eq!(e.into_params(), params);
        let mut p = params.clone();
        let d = Decoder::adopting(&cfg, 2, &dev, &mut p, precision).unwrap();
        assert!(p.is_empty());
        assert_eq!(d.into_params(), params);
    }
    // A batch that cannot fit is refused, and the parameters stay where they were.
    let mut p = params.clone();
    let Err(err) = Engine::adopting(&cfg, 1 << 40, &dev, &mut p, Precision::F32) else {
        panic!("an engine of 2^40 sequences was built")
    };
    assert!(format!("{err:#}").contains("memory"), "{err:#}");
    assert_eq!(p, params);
    let Err(err) = Decoder::adopting(&cfg, 1 << 40, &dev, &mut p, Precision::F32) else {
        panic!("a decoder of 2^40 images was built")
    };
    assert!(format!("{err:#}").contains("memory"), "{err:#}");
    assert_eq!(p, params);
}

#[test]
fn a_callback_can_stop_generation_scores_and_training() {
    use igpt::stop::{Fallible, Stopped};
    let (cfg, params) = tiny();
    let dev = Device::Cpu;
    // Generation stops at the first row it is told to.
    let mut dec = Decoder::with_params(&cfg, 2, &dev, params.clone()).unwrap();
    let mut rows = 0;
    let err = sample::generate_all(
        &mut dec,
        &vec![Vec::new(); 4],
        &SampleOptions::default(),
        Fallible(|_| {
            rows += 1;
            if rows == 2 { Err(Stopped) } else { Ok(()) }
        }),
    )
    .unwrap_err();
    assert!(err.is::<Stopped>() && rows == 2);
    // Scores stop after the first batch.
    let tokens = igpt::data::TokenSet::from_tokens(vec![1; 5 * 16], 16, 6, None).unwrap();
    let mut e = Engine::with_params(&cfg, 2, &dev, params).unwrap();
    let err = igpt::eval::score_images(&mut e, &tokens, Fallible(|_| Err(Stopped))).unwrap_err();
    assert!(err.is::<Stopped>());

    // Training stops after the step it is told to, with a checkpoint of that step.
    struct StopAt(u64, u64);
    impl run::Progress for StopAt {
        fn step(&mut self, s: &igpt::train::StepStats, _: f64) {
            self.1 = s.step;
        }
        fn keep_going(&mut self) -> Result<(), Stopped> {
            if self.1 >= self.0 {
                Err(Stopped)
            } else {
                Ok(())
            }
        }
    }
    let dir = tempdir("library-stop");
    let settings = igpt::train::job::TrainSettings {
        limit: Some(40),
        side: Some(4),
        palette_size: Some(4),
        model: igpt::train::job::ModelChoice {
            layers: Some(1),
            embd: Some(16),
            heads: Some(2),
            ..Default::default()
        },
        steps: Some(10),
        batch: 2,
        ..Default::default()
    };
    let out = dir.join("run");
    let err = igpt::train::job::new_run(
        &out,
        &settings,
        &dev,
        igpt::parallel::Single::team(),
        &mut StopAt(3, 0),
    )
    .unwrap_err();
    assert!(err.is::<Stopped>());
    let (state, ..) = RunDir::open(&out)
        .unwrap()
        .load_trainer(
            igpt::model::ParamLayout::new(&LoadedModel::open(&out).unwrap().config.model).total,
        )
        .unwrap();
    assert_eq!(state.step, 3);
    // Resumed, it runs to the end.
    let s = igpt::train::job::resume_run(
        &out,
        &settings,
        &dev,
        igpt::parallel::Single::team(),
        &mut Quiet,
    )
    .unwrap();
    assert_eq!(s.steps, 10);
}
