//! Data-parallel training and evaluation, with ranks as threads of this process
//! (`igpt::parallel::threads`): the same code paths `mpirun` drives (sharding, bucketed sums
//! during the backward pass, rank 0 writing alone), checked without an MPI library. The MPI
//! runs themselves are in `tests/mpi.rs` (`--features mpi`).

mod common;
use common::tempdir;

use igpt::backend::Device;
use igpt::config::{ModelConfig, Objective};
use igpt::data::TokenSet;
use igpt::model::Engine;
use igpt::parallel::{Single, Team, threads};
use igpt::train::{TrainConfig, Trainer};

fn model(objective: Objective) -> ModelConfig {
    ModelConfig {
        n_layer: 3,
        n_embd: 32,
        n_head: 2,
        n_vocab: 8,
        side: 6,
        channels: 1,
        objective,
    }
}

fn data(n: usize, t: usize) -> TokenSet {
    let tokens: Vec<u16> = (0..n * t)
        .map(|i| ((i * i / 7 + i / t + i % 5) % 8) as u16)
        .collect();
    TokenSet::from_tokens(tokens, t, 8, None).unwrap()
}

/// Runs `f(rank's team)` on one thread per rank, each with its own thread pool (as each MPI
/// process has: ranks waiting on each other must not hold the workers the others' kernels
/// need); returns the results in rank order.
fn on_ranks<T: Send>(teams: Vec<Team>, f: impl Fn(Team) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let handles: Vec<_> = teams
            .into_iter()
            .map(|team| {
                let f = &f;
                s.spawn(move || {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(1)
                        .build()
                        .unwrap();
                    pool.install(|| f(team))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Largest difference of `b` from `a`, relative to the largest magnitude in `a`.
fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(0f64, |m, &x| m.max(x.abs() as f64));
    let worst = a
        .iter()
        .zip(b)
        .fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    worst / scale
}

#[test]
fn ranks_together_take_the_steps_one_process_takes_on_the_whole_batch() {
    for objective in [Objective::Autoregressive, Objective::Bert] {
        let model = model(objective);
        let set = data(30, model.n_ctx());
        let params = igpt::model::init_params(&model, 3);
        let cfg = TrainConfig {
            steps: 8,
            batch: 12,
            micro_batch: 2,
            lr: 3e-3,
            warmup: 2,
            seed: 5,
            ..TrainConfig::default()
        };
        let train = |team: Team| {
            let mut tr =
                Trainer::with_team(&model, cfg.clone(), &params, &Device::Cpu, team).unwrap();
            let mut losses = vec![tr.step(&set).unwrap().loss];
            let after_one = tr.engine.params();
            losses.extend((1..8).map(|_| tr.step(&set).unwrap().loss));
            (losses, tr.engine.params(), tr.state.clone(), after_one)
        };
        let (one_losses, one_params, one_state, one_first) = train(Single::team());
        for world in [2, 3] {
            let runs = on_ranks(threads::group(world), train);
            for (rank, (losses, params, state, _)) in runs.iter().enumerate() {
                // Every rank holds the same parameters, to the bit.
                assert_eq!(
                    params, &runs[0].1,
                    "{objective}: rank {rank} of {world} drifted"
                );
                assert_eq!(
                    state, &one_state,
                    "{objective}: the data order moved on alike"
                );
                for (s, (a, b)) in one_losses.iter().zip(losses).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-6 * a.abs(),
                        "{objective}, {world} ranks, step {}: loss {b} against {a}",
                        s + 1
                    );
                }
            }
            // Sums in another order differ in the last bits; Adam's normalised steps let such
            // differences grow over steps, so the bound after one step is tighter.
            let d = rel_diff(&one_first, &runs[0].3);
            assert!(
                d <= 1e-6,
                "{objective}, {world} ranks: step 1's parameters differ by {d:e}"
            );
            let d = rel_diff(&one_params, &runs[0].1);
            assert!(
                d <= 2e-5,
                "{objective}, {world} ranks: parameters differ by {d:e}"
            );
            assert!(runs[0].1 != params, "the parameters moved");
        }
    }
}

#[test]
fn a_rank_that_fails_stops_the_others_instead_of_leaving_them_waiting() {
    let model = model(Objective::Autoregressive);
    let set = data(12, model.n_ctx());
    let wrong = data(12, model.n_ctx() + 1);
    let params = igpt::model::init_params(&model, 3);
    let cfg = TrainConfig {
        batch: 4,
        micro_batch: 2,
        ..TrainConfig::default()
    };
    let started = std::time::Instant::now();
    let results = on_ranks(threads::group(2), |team: Team| {
        let rank = team.rank();
        let mut tr = Trainer::with_team(&model, cfg.clone(), &params, &Device::Cpu, team).unwrap();
        tr.step(&set).unwrap();
        // Rank 1 is handed data that does not fit and fails; rank 0 must not wait for it.
        let r = tr.step(if rank == 1 { &wrong } else { &set });
        r.map(|_| ()).map_err(|e| e.to_string())
    });
    assert!(started.elapsed().as_secs() < 30);
    let e1 = results[1].as_ref().unwrap_err();
    assert!(e1.contains("does not fit"), "{e1}");
    let e0 = results[0].as_ref().unwrap_err();
    assert!(e0.contains("rank 1") && e0.contains("left"), "{e0}");
}

#[test]
fn eval_score_and_features_split_over_ranks_equal_one_process_to_the_bit() {
    use igpt::parallel::TeamExt;
    for objective in [Objective::Autoregressive, Objective::Bert] {
        let model = model(objective);
        let t = model.n_ctx();
        // 23 images in batches of 4: the ranks get unequal shares and a short last batch.
        let set = data(23, t);
        let mut params = igpt::model::init_params(&model, 8);
        for (i, p) in params.iter_mut().enumerate() {
            *p += ((i * 31 % 97) as f32 - 48.0) * 1e-3;
        }
        let masks = if objective == Objective::Bert { 2 } else { 0 };
        let run = |mut team: Team| {
            let mut engine = Engine::new(&model, 4, false, &Device::Cpu).unwrap();
            engine.set_params(&params).unwrap();
            let team = team.as_mut();
            let mut buf = Vec::new();
            let nats =
                igpt::eval::evaluate_shared(team, &mut engine, &set, 0, masks.max(1), &mut buf)
                    .unwrap();
            let scores = (objective == Objective::Autoregressive)
                .then(|| igpt::eval::score_images_shared(team, &mut engine, &set, |_| {}).unwrap());
            let layers = [1, 3];
            let features = igpt::probe::extract_features_shared(
                team,
                &mut engine,
                &set,
                &layers,
                masks,
                |_| {},
            )
            .unwrap();
            (team.leads(), nats, scores.flatten(), features)
        };
        // Kernels split work by thread count, so compare with one process on one thread too.
        let alone = on_ranks(vec![Single::team()], run).pop().unwrap();
        for world in [2, 3] {
            for (rank, got) in on_ranks(threads::group(world), run).into_iter().enumerate() {
                if rank == 0 {
                    assert_eq!(got.1.unwrap().to_bits(), alone.1.unwrap().to_bits());
                    assert_eq!(got.2, alone.2, "{objective}: scores on {world} ranks");
                    assert_eq!(got.3, alone.3, "{objective}: features on {world} ranks");
                } else {
                    assert!(!got.0 && got.1.is_none() && got.2.is_none() && got.3.is_none());
                }
            }
        }
    }
}

#[test]
fn a_run_written_by_some_ranks_resumes_on_any_number_and_continues_the_same_run() {
    use igpt::train::job::{ModelChoice, TrainSettings, new_run, resume_run};
    use igpt::train::run::Quiet;
    let dir = tempdir("dp-resume");
    let settings = TrainSettings {
        data: "fashion-mnist".into(),
        limit: Some(60),
        side: Some(6),
        palette_size: Some(8),
        model: ModelChoice {
            layers: Some(2),
            embd: Some(32),
            heads: Some(2),
            ..ModelChoice::default()
        },
        steps: Some(9),
        batch: 6,
        micro_batch: Some(1),
        eval_every: 3,
        checkpoint_every: 3,
        seed: 4,
        ..TrainSettings::default()
    };
    // One process, straight through.
    let straight = dir.join("straight");
    let whole = new_run(
        &straight,
        &settings,
        &Device::Cpu,
        Single::team(),
        &mut Quiet,
    )
    .unwrap();
    // The same run: 2 ranks for 3 steps, then 3 ranks for 3, then 1 process to the end.
    let parts = dir.join("parts");
    let first = TrainSettings {
        stop_after: Some(3),
        ..settings.clone()
    };
    let ranks = on_ranks(threads::group(2), |team| {
        new_run(&parts, &first, &Device::Cpu, team, &mut Quiet).unwrap()
    });
    let second = on_ranks(threads::group(3), |team| {
        resume_run(&parts, &first, &Device::Cpu, team, &mut Quiet).unwrap()
    });
    let last = resume_run(&parts, &settings, &Device::Cpu, Single::team(), &mut Quiet).unwrap();
    let pieced: Vec<f64> = [&ranks[0].losses, &second[0].losses, &last.losses]
        .into_iter()
        .flatten()
        .copied()
        .collect();
    assert_eq!(pieced.len(), 9);
    for (s, (a, b)) in whole.losses.iter().zip(&pieced).enumerate() {
        assert!(
            (a - b).abs() <= 1e-6 * a.abs(),
            "step {}: {b} pieced against {a} straight",
            s + 1
        );
    }
    // Every rank saw the same losses as rank 0.
    assert_eq!(ranks[0].losses, ranks[1].losses);
    assert_eq!(second[0].losses, second[2].losses);
    let load = |d: &std::path::Path| igpt::checkpoint::LoadedModel::open(d).unwrap().params;
    let d = rel_diff(&load(&straight), &load(&parts));
    assert!(d <= 1e-6, "the pieced run's parameters differ by {d:e}");
    // Rank 0 alone wrote the metrics: one line per step, and the validations.
    let metrics = std::fs::read_to_string(parts.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("loss").is_some())
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=9).collect::<Vec<_>>());
    assert!(metrics.contains("\"ranks\":3") && metrics.contains("\"ranks\":2"));
}

#[test]
fn fine_tuning_ranks_take_the_steps_one_process_takes() {
    use igpt::finetune::{Finetuner, Head};
    let model = model(Objective::Autoregressive);
    let t = model.n_ctx();
    let set = data(12, t);
    let mut tokens = vec![0u16; 12 * t];
    for i in 0..12 {
        set.copy_image(i, &mut tokens[i * t..(i + 1) * t]);
    }
    let labels: Vec<u32> = (0..12).map(|i| (i * 7 % 3) as u32).collect();
    let params = igpt::model::init_params(&model, 6);
    let tune = |team: Team| {
        let pass = 12 / team.world() / 2;
        let mut engine = Engine::new(&model, pass, true, &Device::Cpu).unwrap();
        engine.set_params(&params).unwrap();
        let mut ft = Finetuner::new(engine, Head::new(model.n_embd, 3, Vec::new()), 1);
        ft.join(team);
        let stats: Vec<_> = (0..4)
            .map(|_| ft.step(&tokens, &labels, 1e-3, 1e-2, true).unwrap())
            .collect();
        (stats, ft.engine.params(), ft.head.w.clone())
    };
    let (one, one_params, one_head) = tune(Single::team());
    for world in [2, 3] {
        let runs = on_ranks(threads::group(world), tune);
        for (rank, (stats, params, head)) in runs.iter().enumerate() {
            assert_eq!(params, &runs[0].1, "rank {rank} of {world}: model drifted");
            assert_eq!(head, &runs[0].2, "rank {rank} of {world}: head drifted");
            for (a, b) in one.iter().zip(stats) {
                assert!((a.gen_loss - b.gen_loss).abs() <= 1e-6 * a.gen_loss);
                assert!((a.clf_loss - b.clf_loss).abs() <= 1e-6 * a.clf_loss.max(1e-3));
                assert_eq!(a.accuracy, b.accuracy, "every rank counts every image");
            }
        }
        assert!(rel_diff(&one_params, &runs[0].1) <= 2e-5);
        assert!(rel_diff(&one_head, &runs[0].2) <= 2e-5);
    }
}
