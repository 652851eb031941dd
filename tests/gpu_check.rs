//! scripts/gpu_check.sh's control flow, with stand-ins for igpt, nvidia-smi and Python: the GPU
//! machine gets one try at it, so its syntax and its summary are checked here.

mod common;

use common::tempdir;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Stands in for igpt: logs its arguments and library path, writes a JSON report where
/// `--json` says or a run's two checkpoint files where `--out` does (their bytes differ from
/// run to run with FAKE_DIFFER), and fails (exit 3) on the subcommand named in FAKE_FAIL.
const FAKE_IGPT: &str = r#"#!/bin/sh
echo "args: $*"
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
json=""; run=""; prev=""; cmd=""
for a in "$@"; do
    [ "$prev" = "--json" ] && json=$a
    [ "$prev" = "--out" ] && run=$a
    case "$a" in selftest|train|generate) [ -z "$cmd" ] && cmd=$a ;; esac
    prev=$a
done
if [ "$cmd" = "${FAKE_FAIL:-}" ]; then echo "error: $cmd broke" >&2; exit 3; fi
if [ -n "$run" ]; then
    mkdir -p "$run"
    echo "weights ${FAKE_DIFFER:+$$}" >"$run/model.safetensors"
    echo "moments" >"$run/trainer.safetensors"
    exit 0
fi
printf '{"bench": "%s", "runs": [{"impl": "igpt", "tokens_per_s": 1000.0, "mfu": 0.25, "memory_bytes": 2000000000}]}\n' "$cmd" >"$json"
"#;

/// Stands in for Python: whatever program it is given, it answers one library folder.
const FAKE_PYTHON: &str = "#!/bin/sh\ncat >/dev/null\necho /fake/nvidia/cublas/lib\n";

const FAKE_SMI: &str = "#!/bin/sh\necho 'name, driver_version'\necho 'Fake GPU, 0.0'\n";

fn executable(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// Runs the script into `dir/out` with the stand-ins; `igpt` overrides the binary's path. No
/// earlier build unless the test gives one (`check_with`).
fn check(dir: &Path, fail: Option<&str>, igpt: Option<&Path>) -> (Output, serde_json::Value) {
    check_with(dir, fail, igpt, &dir.join("no-earlier-build"))
}

fn check_with(
    dir: &Path,
    fail: Option<&str>,
    igpt: Option<&Path>,
    before: &Path,
) -> (Output, serde_json::Value) {
    let fake = executable(dir, "igpt", FAKE_IGPT);
    let out = dir.join("out");
    let mut cmd = Command::new("bash");
    cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/gpu_check.sh"))
        .arg(&out)
        .env("IGPT_BIN", igpt.unwrap_or(&fake))
        .env("IGPT_BEFORE", before)
        .env("NVIDIA_SMI", executable(dir, "nvidia-smi", FAKE_SMI))
        .env("PYTHON", executable(dir, "python", FAKE_PYTHON))
        // The script runs under `set -u`: an unset library path must not stop it.
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("FAKE_FAIL");
    if let Some(f) = fail {
        cmd.env("FAKE_FAIL", f);
    }
    let o = cmd.output().expect("run bash");
    let text = std::fs::read_to_string(out.join("summary.json"))
        .unwrap_or_else(|e| panic!("no summary ({e}): {}", String::from_utf8_lossy(&o.stderr)));
    let summary = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    (o, summary)
}

/// The steps of a summary, in the order they ran.
fn step_names(summary: &serde_json::Value) -> Vec<&str> {
    summary["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect()
}

fn step<'a>(summary: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    summary["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {summary}"))
}

#[test]
fn a_failed_step_is_reported_and_the_next_ones_still_run() {
    let dir = tempdir("gpu-check-fail");
    let (o, summary) = check(&dir, Some("train"), None);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{stdout}");
    assert_eq!(summary["ok"], false);
    let names = step_names(&summary);
    assert_eq!(
        names,
        [
            "nvidia-smi",
            "libraries",
            "selftest",
            "same-bits",
            "train",
            "train-large",
            "generate",
            "gemm"
        ]
    );
    let train = step(&summary, "train");
    assert_eq!(train["exit_code"], 3, "{summary}");
    assert_eq!(train["timed_out"], false);
    assert!(train["json"].is_null(), "{summary}");
    // The step after the failure ran, and its JSON was gathered.
    let generate = step(&summary, "generate");
    assert_eq!(generate["exit_code"], 0, "{summary}");
    assert_eq!(generate["json"]["bench"], "generate");
    assert_eq!(step(&summary, "selftest")["json"]["bench"], "selftest");
    // The failure's own log holds its message; the table printed last names it.
    let log = std::fs::read_to_string(dir.join("out/train.log")).unwrap();
    assert!(log.contains("error: train broke"), "{log}");
    let table: Vec<&str> = stdout.lines().rev().take(7).collect();
    assert!(
        table
            .iter()
            .any(|l| l.split_whitespace().take(2).eq(["train", "3"])),
        "{stdout}"
    );
    assert!(stdout.trim_end().ends_with(&format!(
        "SOME STEPS FAILED; summary in {}/out/summary.json",
        dir.display()
    )));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_step_passing_gives_exit_code_zero_and_igpt_sees_the_libraries() {
    let dir = tempdir("gpu-check-pass");
    let (o, summary) = check(&dir, None, None);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{stdout}");
    assert_eq!(summary["ok"], true, "{summary}");
    assert_eq!(step(&summary, "nvidia-smi")["exit_code"], 0);
    // Two bf16 training runs on the GPU, compared.
    assert_eq!(step(&summary, "same-bits")["exit_code"], 0, "{summary}");
    let log = std::fs::read_to_string(dir.join("out/same-bits.log")).unwrap();
    assert_eq!(log.matches("args: --device cuda train").count(), 2, "{log}");
    assert!(log.contains("--precision bf16"), "{log}");
    assert!(log.contains("the two runs saved the same bytes"), "{log}");
    let train = step(&summary, "train");
    assert_eq!(train["json"]["runs"][0]["mfu"], 0.25, "{summary}");
    // igpt runs on the GPU, with the pip packages' CUDA libraries on its path.
    let log = std::fs::read_to_string(dir.join("out/train.log")).unwrap();
    assert!(
        log.contains("args: --device cuda bench train --shape small --batch 32"),
        "{log}"
    );
    assert!(
        log.contains("LD_LIBRARY_PATH=/fake/nvidia/cublas/lib"),
        "{log}"
    );
    // iGPT-L's shape, igpt alone.
    let log = std::fs::read_to_string(dir.join("out/train-large.log")).unwrap();
    assert!(
        log.contains("bench train --shape large") && log.contains("--no-torch"),
        "{log}"
    );
    assert_eq!(step(&summary, "train-large")["json"]["bench"], "train");
    let log = std::fs::read_to_string(dir.join("out/generate.log")).unwrap();
    assert!(log.contains("--batches 1 64"), "{log}");
    // The products' timing runs in PyTorch (the stand-in writes no JSON).
    assert_eq!(step(&summary, "gemm")["exit_code"], 0, "{summary}");
    assert!(stdout.contains("all steps passed"), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_earlier_build_times_the_same_training_step_and_sampling_in_the_same_call() {
    let dir = tempdir("gpu-check-before");
    let before = executable(&dir, "igpt-before", FAKE_IGPT);
    let (o, summary) = check_with(&dir, None, None, &before);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{stdout}");
    let names = step_names(&summary);
    let at = |n: &str| names.iter().position(|&x| x == n).unwrap();
    assert_eq!(at("train-before"), at("train") + 1, "{names:?}");
    let log = std::fs::read_to_string(dir.join("out/train-before.log")).unwrap();
    let train = std::fs::read_to_string(dir.join("out/train.log")).unwrap();
    // The same shape, batch, precision and profile as the train step's igpt row.
    for arg in [
        "--shape small",
        "--batch 32",
        "--precision bf16",
        "--profile",
    ] {
        assert!(log.contains(arg) && train.contains(arg), "{arg}: {log}");
    }
    assert!(log.contains("--no-torch"), "{log}");
    assert_eq!(step(&summary, "train-before")["json"]["bench"], "train");
    // And the same sampling, bf16, igpt alone, right after the generate step.
    assert_eq!(at("generate-before"), at("generate") + 1, "{names:?}");
    let log = std::fs::read_to_string(dir.join("out/generate-before.log")).unwrap();
    let generate = std::fs::read_to_string(dir.join("out/generate.log")).unwrap();
    for arg in ["bench generate --shape small", "--batches 1 64"] {
        assert!(log.contains(arg) && generate.contains(arg), "{arg}: {log}");
    }
    assert!(
        log.contains("--precisions bf16") && log.contains("--no-python"),
        "{log}"
    );
    assert_eq!(
        step(&summary, "generate-before")["json"]["bench"],
        "generate"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn training_runs_that_save_different_bytes_fail_the_same_bits_step() {
    let dir = tempdir("gpu-check-differ");
    let fake = executable(
        &dir,
        "igpt-differ",
        &FAKE_IGPT.replace("${FAKE_DIFFER:+$$}", "$$"),
    );
    let (o, summary) = check(&dir, None, Some(&fake));
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(step(&summary, "same-bits")["exit_code"], 1, "{summary}");
    let log = std::fs::read_to_string(dir.join("out/same-bits.log")).unwrap();
    assert!(log.contains("differ"), "{log}");
    assert_eq!(step(&summary, "train")["exit_code"], 0, "{summary}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_missing_binary_fails_every_igpt_step_but_still_writes_the_summary() {
    let dir = tempdir("gpu-check-missing");
    let (o, summary) = check(&dir, None, Some(&dir.join("no-such-igpt")));
    assert_eq!(o.status.code(), Some(1));
    for name in ["selftest", "same-bits", "train", "train-large", "generate"] {
        assert_eq!(step(&summary, name)["exit_code"], 127, "{summary}");
    }
    assert_eq!(step(&summary, "libraries")["exit_code"], 0, "{summary}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Stands in for ncu: logs its arguments; profiling (`--export NAME`) writes NAME.ncu-rep,
/// `--import` prints a details page in CSV for two kernels (base units, as `--csv --page
/// details --print-units base` does) followed by a warning line of another shape.
const FAKE_NCU: &str = r#"#!/bin/sh
echo "ncu args: $*" >&2
prev=""
for a in "$@"; do
    [ "$prev" = "--export" ] && echo report >"$a.ncu-rep"
    prev=$a
done
case " $* " in *" --import "*) ;; *) exit 0 ;; esac
echo '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"'
for id in 0 1 2; do
    name=rmsnorm_forward; dur=1000; sm=20.5; mem=80
    [ $id = 1 ] && name=flash_attention_forward_64 && dur=3,000 && sm=60 && mem=30
    echo "\"$id\",\"1\",\"igpt\",\"h\",\"$name\",\"1\",\"7\",\"(64, 1, 1)\",\"(32, 8, 32)\",\"0\",\"9.0\",\"GPU Speed Of Light Throughput\",\"Duration\",\"nsecond\",\"$dur\""
    echo "\"$id\",\"1\",\"igpt\",\"h\",\"$name\",\"1\",\"7\",\"(64, 1, 1)\",\"(32, 8, 32)\",\"0\",\"9.0\",\"GPU Speed Of Light Throughput\",\"Compute (SM) Throughput\",\"%\",\"$sm\""
    echo "\"$id\",\"1\",\"igpt\",\"h\",\"$name\",\"1\",\"7\",\"(64, 1, 1)\",\"(32, 8, 32)\",\"0\",\"9.0\",\"GPU Speed Of Light Throughput\",\"Memory Throughput\",\"%\",\"$mem\""
done
echo '==WARNING== a line of another shape'
"#;

/// Stands in for compute-sanitizer: logs its arguments and exits with FAKE_SANITIZER_EXIT.
const FAKE_SANITIZER: &str =
    "#!/bin/sh\necho \"sanitizer args: $*\"\nexit ${FAKE_SANITIZER_EXIT:-0}\n";

#[test]
fn the_inspection_runs_both_sanitizers_and_tables_ncu_by_kernel() {
    let dir = tempdir("gpu-inspect");
    let out = dir.join("out");
    let o = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/gpu_inspect.sh"
        ))
        .arg(&out)
        .env("IGPT_BIN", executable(&dir, "igpt", FAKE_IGPT))
        .env("PYTHON", "python3")
        .env("SANITIZER", executable(&dir, "sanitizer", FAKE_SANITIZER))
        .env("NCU", executable(&dir, "ncu", FAKE_NCU))
        .env("FAKE_SANITIZER_EXIT", "9")
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .expect("run bash");
    let stdout = String::from_utf8_lossy(&o.stdout);
    // The sanitizer reported errors (exit 9): the run fails, and says which step.
    assert_eq!(o.status.code(), Some(1), "{stdout}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(step(&summary, "memcheck")["exit_code"], 9, "{summary}");
    assert_eq!(step(&summary, "racecheck")["exit_code"], 9, "{summary}");
    assert_eq!(step(&summary, "ncu")["exit_code"], 0, "{summary}");
    let log = std::fs::read_to_string(out.join("racecheck.log")).unwrap();
    assert!(
        log.contains("--tool racecheck") && log.contains("--device cuda selftest --quick"),
        "{log}"
    );
    assert_eq!(step(&summary, "ncu-csv")["exit_code"], 0, "{summary}");
    let log = std::fs::read_to_string(out.join("ncu.log")).unwrap();
    assert!(
        log.contains("--clock-control none") && log.contains("--device cuda bench train"),
        "{log}"
    );
    assert!(out.join("igpt.ncu-rep").exists());
    let log = std::fs::read_to_string(out.join("ncu-csv.log")).unwrap();
    assert!(
        log.contains("--import") && log.contains("--print-units base"),
        "{log}"
    );
    // Per kernel: launches, share of the time (3,000 of 5,000 ns), mean throughputs.
    let table = std::fs::read_to_string(out.join("kernels.txt")).unwrap();
    let flash = table
        .lines()
        .find(|l| l.starts_with("flash_attention_forward_64"))
        .unwrap_or_else(|| panic!("{table}"));
    assert_eq!(
        flash.split_whitespace().collect::<Vec<_>>(),
        ["flash_attention_forward_64", "1", "60.0%", "60.0", "30.0"],
        "{table}"
    );
    let norm = table
        .lines()
        .find(|l| l.starts_with("rmsnorm_forward"))
        .unwrap_or_else(|| panic!("{table}"));
    assert_eq!(
        norm.split_whitespace().collect::<Vec<_>>(),
        ["rmsnorm_forward", "2", "40.0%", "20.5", "80.0"],
        "{table}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_step_killed_at_its_limit_still_leaves_the_call_within_ten_minutes() {
    let script = include_str!("../scripts/gpu_check.sh");
    let steps = include_str!("../scripts/gpu_steps.sh");
    // `step NAME LIMIT ...` lines, the before steps included (the worst case), and the
    // libraries step's `timeout -k 5 LIMIT` in gpu_steps.sh.
    let mut limits: Vec<(String, u64)> = script
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("step")).then_some(())?;
            let name = words.next()?.to_string();
            let limit = words.next()?.parse().ok()?;
            Some((name, limit))
        })
        .collect();
    let libraries = steps
        .lines()
        .find_map(|l| {
            let rest = l.split("timeout -k 5 ").nth(1)?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .expect("the libraries step's limit");
    limits.push(("libraries".into(), libraries));
    let names: Vec<&str> = limits.iter().map(|(n, _)| n.as_str()).collect();
    for want in [
        "nvidia-smi",
        "selftest",
        "train",
        "train-before",
        "generate-before",
        "gemm",
    ] {
        assert!(names.contains(&want), "no {want} step in {names:?}");
    }
    assert!(
        steps.contains("timeout -k 5 \"$limit\""),
        "steps are killed 5 s after their limit"
    );
    // 15 s are left for what runs after the steps (the summary and the headline table).
    let total: u64 = limits.iter().map(|(_, l)| l + 5).sum();
    assert!(total + 15 <= 600, "{total} s: {limits:?}");
}
