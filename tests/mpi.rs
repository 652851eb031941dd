//! `mpirun -np N igpt ...` against one process: built and run with `--features mpi` (as
//! `.ci/run` does), with OpenMPI's `mpirun` on the PATH. Every process runs one thread, and so
//! does the single process compared with, since kernels split work by thread count.
#![cfg(feature = "mpi")]

mod common;
use common::{s, stderr, tempdir};

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_igpt");

fn mpirun_cmd(np: usize, args: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "-np",
        &np.to_string(),
    ])
    .arg(BIN)
    .args(["--threads", "1"])
    .args(args);
    c
}

fn mpirun(np: usize, args: &[&str]) -> Output {
    mpirun_cmd(np, args)
        .output()
        .expect("mpirun runs (install OpenMPI: apt-get install openmpi-bin libopenmpi-dev)")
}

/// One process on one thread, as each rank runs.
fn alone(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(["--threads", "1"])
        .args(args)
        .output()
        .unwrap()
}

/// One MPI job at a time: several at once on two cores would mostly wait on each other.
fn one_job_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static JOBS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    JOBS.lock().unwrap_or_else(|e| e.into_inner())
}

fn ok(o: Output, what: &str) -> Output {
    assert!(
        o.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        stderr(&o)
    );
    o
}

/// The training losses of a run, by step.
fn losses(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("loss").is_some())
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

fn params(run: &Path) -> Vec<f32> {
    igpt::checkpoint::LoadedModel::open(run).unwrap().params
}

fn assert_same_run(a: &Path, b: &Path, what: &str) {
    let (la, lb) = (losses(a), losses(b));
    assert_eq!(la.len(), lb.len(), "{what}: steps logged");
    for ((s, x), (t, y)) in la.iter().zip(&lb) {
        assert_eq!(s, t);
        assert!(
            (x - y).abs() <= 1e-6 * x.abs(),
            "{what}, step {s}: {y} against {x}"
        );
    }
    let (pa, pb) = (params(a), params(b));
    let scale = pa.iter().fold(0f32, |m, x| m.max(x.abs()));
    let worst = pa
        .iter()
        .zip(&pb)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        worst <= 2e-5 * scale,
        "{what}: parameters differ by {:e}",
        worst / scale
    );
}

const TRAIN: &[&str] = &[
    "train",
    "--data",
    "fashion-mnist",
    "--limit",
    "120",
    "--side",
    "8",
    "--palette-size",
    "8",
    "--layers",
    "2",
    "--embd",
    "32",
    "--heads",
    "2",
    "--batch",
    "6",
    "--micro-batch",
    "1",
    "--steps",
    "6",
    "--eval-every",
    "3",
    "--checkpoint-every",
    "3",
    "--seed",
    "2",
];

fn train_args<'a>(out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = TRAIN.to_vec();
    a.extend_from_slice(&["--out", out]);
    a.extend_from_slice(extra);
    a
}

#[test]
fn two_and_three_ranks_train_the_model_one_process_trains() {
    let _one = one_job_at_a_time();
    let dir = tempdir("mpi-train");
    let one = dir.join("one");
    ok(alone(&train_args(s(&one), &[])), "one process");
    for np in [2, 3] {
        let run = dir.join(format!("np{np}"));
        let o = ok(mpirun(np, &train_args(s(&run), &[])), "mpirun");
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains(&format!("{np} processes (mpi)")), "{out}");
        // Rank 0 alone reports: one summary line.
        assert_eq!(out.matches("run directory:").count(), 1, "{out}");
        assert_same_run(&one, &run, &format!("{np} ranks"));
    }
}

#[test]
fn ranks_on_one_machine_share_its_cores_unless_told_otherwise() {
    let _one = one_job_at_a_time();
    let dir = tempdir("mpi-threads");
    let run = dir.join("run");
    let mut args = train_args(s(&run), &[]);
    let steps = args.iter().position(|a| *a == "--steps").unwrap();
    args[steps + 1] = "1";
    // Without --threads: each of 2 ranks takes half the cores.
    let o = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "2", BIN])
        .args(&args)
        .output()
        .unwrap();
    let o = ok(o, "mpirun without --threads");
    let cores = std::thread::available_parallelism().unwrap().get();
    let want = format!("on {} thread(s)", (cores / 2).max(1));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains(&want), "{want} in {out}");
}

#[test]
fn a_run_resumes_on_another_number_of_ranks_and_continues_the_same_run() {
    let _one = one_job_at_a_time();
    let dir = tempdir("mpi-resume");
    let one = dir.join("one");
    ok(alone(&train_args(s(&one), &[])), "one process");
    let run = dir.join("pieced");
    ok(
        mpirun(2, &train_args(s(&run), &["--stop-after", "2"])),
        "2 ranks, steps 1-2",
    );
    // Resumed mid-interval: from the step-2 checkpoint `--stop-after` wrote.
    ok(
        mpirun(3, &["train", "--resume", s(&run), "--stop-after", "2"]),
        "3 ranks, steps 3-4",
    );
    ok(
        alone(&["train", "--resume", s(&run)]),
        "one process, steps 5-6",
    );
    assert_same_run(&one, &run, "2, then 3 ranks, then 1");
}

#[test]
fn eval_score_and_features_under_mpirun_write_what_one_process_writes() {
    let _one = one_job_at_a_time();
    let dir = tempdir("mpi-eval");
    let run = dir.join("run");
    ok(alone(&train_args(s(&run), &[])), "training");
    let data = ["--data", "fashion-mnist", "--limit", "37", "--batch", "4"];
    let eval = |o: Output| {
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        // The line without its timing.
        text.split(" (").next().unwrap().to_string()
    };
    let mut args = vec!["eval", "--model", s(&run)];
    args.extend_from_slice(&data);
    let want_eval = eval(ok(alone(&args), "eval"));
    let csv1 = dir.join("one.csv");
    let f1 = dir.join("one.safetensors");
    let score = |csv: &Path| {
        let mut a = vec!["score", "--model", s(&run), "--csv", s(csv)];
        a.extend_from_slice(&data);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let features = |out: &Path| {
        let mut a = vec![
            "features",
            "--model",
            s(&run),
            "--layers",
            "1,2",
            "--out",
            s(out),
        ];
        a.extend_from_slice(&data);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    ok(alone(&strs(&score(&csv1))), "score");
    ok(alone(&strs(&features(&f1))), "features");
    for np in [2, 3] {
        let got = eval(ok(mpirun(np, &args), "mpirun eval"));
        assert_eq!(got, want_eval, "{np} ranks");
        let csv = dir.join(format!("np{np}.csv"));
        ok(mpirun(np, &strs(&score(&csv))), "mpirun score");
        assert_eq!(std::fs::read(&csv).unwrap(), std::fs::read(&csv1).unwrap());
        let f = dir.join(format!("np{np}.safetensors"));
        ok(mpirun(np, &strs(&features(&f))), "mpirun features");
        assert_eq!(std::fs::read(&f).unwrap(), std::fs::read(&f1).unwrap());
    }
    // A command that runs in one process says so instead of running N times.
    let o = mpirun(
        2,
        &[
            "sample",
            "--model",
            s(&run),
            "--n",
            "1",
            "--out",
            s(&dir.join("x.png")),
        ],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("runs in one process"), "{}", stderr(&o));
}

fn strs(a: &[String]) -> Vec<&str> {
    a.iter().map(String::as_str).collect()
}

/// Pids of the processes of rank `rank` whose command line mentions `marker`.
fn rank_pids(marker: &str, rank: usize) -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
        let has = |hay: &[u8], s: &str| hay.windows(s.len()).any(|w| w == s.as_bytes());
        if has(&cmd, marker)
            && has(&cmd, "igpt")
            && !has(&cmd, "mpirun")
            && has(&env, &format!("OMPI_COMM_WORLD_RANK={rank}\0"))
        {
            pids.push(pid);
        }
    }
    pids
}

#[test]
fn a_rank_that_dies_ends_the_job_within_seconds_and_the_checkpoint_stays_loadable() {
    let _one = one_job_at_a_time();
    let dir = tempdir("mpi-kill");
    let run = dir.join("doomed-run");
    let mut args = train_args(s(&run), &[]);
    let steps = args.iter().position(|a| *a == "--steps").unwrap();
    args[steps + 1] = "100000";
    let every = args
        .iter()
        .position(|a| *a == "--checkpoint-every")
        .unwrap();
    args[every + 1] = "1";
    let mut child = mpirun_cmd(2, &args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !run.join("trainer.safetensors").exists() {
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            panic!("the job ended ({st}) before its first checkpoint: {err}");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no checkpoint written"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let pids = rank_pids(s(&run), 1);
    assert_eq!(pids.len(), 1, "rank 1's process");
    let killed = Command::new("kill")
        .args(["-KILL", &pids[0].to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let t1 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t1.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("mpirun still runs 20 s after rank 1 died");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "the job ends with an error");
    eprintln!(
        "the job ended {:.2} s after rank 1 was killed",
        t1.elapsed().as_secs_f64()
    );
    // Whatever step rank 0 was at, the last checkpoint loads and the run resumes.
    let o = ok(
        alone(&["train", "--resume", s(&run), "--stop-after", "1"]),
        "resume after the crash",
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("resuming"));
}

#[test]
fn fine_tuning_under_mpirun_reports_what_one_process_reports() {
    let _one = one_job_at_a_time();
    let dir = tempdir("mpi-finetune");
    let run = dir.join("run");
    ok(alone(&train_args(s(&run), &[])), "training");
    let args = |out: &Path| {
        [
            "finetune",
            "--model",
            s(&run),
            "--data",
            "fashion-mnist",
            "--limit",
            "120",
            "--steps",
            "8",
            "--batch",
            "6",
            "--eval-every",
            "4",
            "--out",
            s(out),
        ]
        .map(String::from)
        .to_vec()
    };
    // Every number of the step and validation lines (rank 0 alone prints them).
    let numbers = |o: &Output| -> Vec<f64> {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.starts_with("step "))
            .flat_map(|l| {
                l.split(|c: char| !(c.is_ascii_digit() || c == '.'))
                    .filter_map(|w| w.parse::<f64>().ok())
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let one = ok(alone(&strs(&args(&dir.join("one")))), "one process");
    let two = ok(mpirun(2, &strs(&args(&dir.join("two")))), "2 ranks");
    let (a, b) = (numbers(&one), numbers(&two));
    assert!(a.len() >= 9 && a.len() == b.len(), "{a:?} against {b:?}");
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 2e-4, "{a:?} against {b:?}");
    }
    assert!(dir.join("two/head.safetensors").exists());
}
