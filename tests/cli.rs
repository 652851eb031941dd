//! The `igpt` binary end to end: a small run, evaluation, and bad inputs that must fail with a
//! clear message and leave nothing changed on disk.

mod common;
use common::{igpt, s, stderr, tempdir};

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// 40 small grayscale images as .npy, with labels.
fn small_npy(dir: &Path) -> PathBuf {
    common::gray_npy(dir, 40, 6, |i| ((i * 37 + i / 36 * 11) % 256) as u8)
}

const SMALL: &[&str] = &[
    "--layers",
    "1",
    "--embd",
    "16",
    "--heads",
    "2",
    "--palette-size",
    "8",
    "--batch",
    "4",
    "--warmup",
    "2",
];

fn train_small(data: &Path, out: &Path, steps: &str) -> Output {
    let mut args = vec![
        "train",
        "--data",
        s(data),
        "--out",
        s(out),
        "--steps",
        steps,
        "--eval-every",
        "3",
    ];
    args.extend_from_slice(SMALL);
    igpt(&args)
}

#[test]
fn train_eval_info_and_palette_commands_work() {
    let dir = tempdir("ok");
    let data = small_npy(&dir);
    let run = dir.join("run");
    let o = train_small(&data, &run, "6");
    assert!(o.status.success(), "{}", stderr(&o));
    for f in [
        "config.json",
        "palette.json",
        "model.safetensors",
        "trainer.safetensors",
        "metrics.jsonl",
        "loss.png",
        "data/train.tokens",
        "data/val.tokens",
    ] {
        assert!(run.join(f).exists(), "missing {f}");
    }
    let png = image::open(run.join("loss.png")).expect("loss.png decodes");
    assert!(png.width() > 100);
    let o = igpt(&["eval", "--model", s(&run), "--data", s(&data)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("nats/token") && out.contains("bits/token"),
        "{out}"
    );
    // The value printed is a real loss: close to ln(8) for a barely trained 8-colour model.
    let nats: f64 = out
        .split("tokens each: ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(nats > 0.5 && nats < 3.0, "{out}");
    let o = igpt(&["info", "--model", s(&run)]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("step 6"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    // Extending a finished run continues it.
    let o = igpt(&["train", "--resume", s(&run), "--steps", "8"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("step 8"));

    let pal = dir.join("pal.npy");
    let o = igpt(&[
        "palette",
        "fit",
        "--data",
        s(&data),
        "--k",
        "5",
        "--out",
        s(&pal),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let img = dir.join("in.png");
    image::RgbImage::from_fn(10, 7, |x, y| {
        image::Rgb([(x * 25) as u8, (y * 30) as u8, 90])
    })
    .save(&img)
    .unwrap();
    let o = igpt(&[
        "palette",
        "apply",
        "--palette",
        s(&pal),
        "--image",
        s(&img),
        "--out",
        s(&dir.join("q.png")),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let q = image::open(dir.join("q.png")).unwrap().to_luma8();
    let distinct: std::collections::BTreeSet<u8> = q.pixels().map(|p| p.0[0]).collect();
    assert!(
        distinct.len() <= 5,
        "quantised to at most 5 levels, found {}",
        distinct.len()
    );
}

/// Runs a failing `igpt train` and checks the message and that `out` was not left behind.
fn refused(args: &[&str], out: &Path, expect: &str) {
    let o = igpt(args);
    assert!(!o.status.success(), "igpt {args:?} should have failed");
    let e = stderr(&o);
    assert!(
        e.contains(expect),
        "igpt {args:?}: expected '{expect}' in: {e}"
    );
    assert!(!e.contains("panicked"), "igpt {args:?} panicked: {e}");
    assert!(!out.exists(), "a failed run left {} behind", out.display());
}

#[test]
fn bad_data_files_are_refused_and_leave_nothing() {
    let dir = tempdir("bad");
    let out = dir.join("run");
    let o = s(&out);
    // Truncated IDX.
    let idx = common::idx_bytes(&[10, 28, 28], &[0u8; 500], 8);
    let p = dir.join("t-images-idx3-ubyte");
    std::fs::write(&p, &idx).unwrap();
    refused(
        &["train", "--data", s(&p), "--out", o],
        &out,
        "truncated IDX data",
    );
    // Wrong magic.
    let p = dir.join("m-images-idx3-ubyte");
    std::fs::write(&p, b"\x1f\x00\x08\x03garbage").unwrap();
    refused(&["train", "--data", s(&p), "--out", o], &out, "wrong magic");
    // Corrupt gzip.
    let p = dir.join("z-images-idx3-ubyte.gz");
    std::fs::write(&p, b"\x1f\x8b\x08\x00broken").unwrap();
    refused(&["train", "--data", s(&p), "--out", o], &out, "gzip");
    // Undecodable image in a folder.
    let f = dir.join("imgs");
    std::fs::create_dir_all(&f).unwrap();
    std::fs::write(f.join("a.png"), b"\x89PNG\r\n\x1a\nnope").unwrap();
    refused(
        &["train", "--data", s(&f), "--out", o],
        &out,
        "cannot decode image",
    );
    // NPY of the wrong dtype.
    let p = dir.join("f.npy");
    std::fs::write(&p, igpt::npy::encode_f32(&[2, 4, 4], &[0.5; 32])).unwrap();
    refused(&["train", "--data", s(&p), "--out", o], &out, "uint8");
    // A palette with more channels than the images / an unreadable palette.
    let data = small_npy(&dir);
    let pal = dir.join("p.json");
    std::fs::write(&pal, "[[0.1, 0.2], [0.3]]").unwrap();
    refused(
        &[
            "train",
            "--data",
            s(&data),
            "--palette",
            s(&pal),
            "--out",
            o,
        ],
        &out,
        "different lengths",
    );
    // An unwritable run directory (its parent is a file).
    let blocker = dir.join("file");
    std::fs::write(&blocker, b"x").unwrap();
    let inside = blocker.join("run");
    refused(
        &["train", "--data", s(&data), "--out", s(&inside)],
        &inside,
        "cannot create run directory",
    );
}

#[test]
fn mismatched_palettes_tokens_and_configs_are_refused() {
    let dir = tempdir("mismatch");
    let data = small_npy(&dir);
    let run = dir.join("run");
    let o = train_small(&data, &run, "4");
    assert!(o.status.success(), "{}", stderr(&o));
    let snapshot = |p: &Path| -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = std::fs::read_dir(p)
            .unwrap()
            .filter_map(|e| e.ok())
            // The lock file names whoever last held the run; it is not part of the run.
            .filter(|e| e.path().is_file() && e.file_name() != ".lock")
            .map(|e| {
                (
                    e.file_name().to_string_lossy().to_string(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let before = snapshot(&run);

    // Resume with a different model.
    let o = igpt(&["train", "--resume", s(&run), "--layers", "3"]);
    assert!(
        !o.status.success() && stderr(&o).contains("cannot resume"),
        "{}",
        stderr(&o)
    );
    // Resume with a palette of another size.
    let pal = dir.join("p12.json");
    igpt::palette::Palette::uniform_gray(12)
        .unwrap()
        .save(&pal)
        .unwrap();
    let o = igpt(&["train", "--resume", s(&run), "--palette", s(&pal)]);
    assert!(
        !o.status.success() && stderr(&o).contains("n_vocab"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        before,
        snapshot(&run),
        "a refused resume changed the run directory"
    );

    // Token ids beyond the model's palette.
    let toks = igpt::data::TokenSet::from_tokens(vec![11; 2 * 36], 36, 12, None).unwrap();
    let tp = dir.join("big.tokens");
    toks.save(&tp).unwrap();
    let o = igpt(&["eval", "--model", s(&run), "--data", s(&tp)]);
    assert!(
        !o.status.success() && stderr(&o).contains("does not fit the model"),
        "{}",
        stderr(&o)
    );

    // A palette file swapped for one of another size.
    let other = dir.join("copy");
    std::fs::create_dir_all(&other).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(run.join(f), other.join(f)).unwrap();
    }
    igpt::palette::Palette::uniform_gray(12)
        .unwrap()
        .save(&other.join("palette.json"))
        .unwrap();
    let o = igpt(&["eval", "--model", s(&other), "--data", s(&data)]);
    assert!(
        !o.status.success() && stderr(&o).contains("the palette has 12 colours"),
        "{}",
        stderr(&o)
    );

    // A corrupt model file.
    std::fs::write(
        other.join("model.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":1}",
    )
    .unwrap();
    let o = igpt(&["eval", "--model", s(&other), "--data", s(&data)]);
    assert!(
        !o.status.success() && stderr(&o).contains("not a valid safetensors"),
        "{}",
        stderr(&o)
    );

    // Starting a new run over an existing one is refused (it would overwrite it).
    let o = train_small(&data, &run, "4");
    assert!(
        !o.status.success() && stderr(&o).contains("--resume"),
        "{}",
        stderr(&o)
    );
    assert_eq!(before, snapshot(&run));
}

#[test]
fn a_killed_run_keeps_a_readable_checkpoint_and_resumes() {
    let dir = tempdir("kill");
    let data = small_npy(&dir);
    let run = dir.join("run");
    let mut args: Vec<&str> = vec![
        "--threads",
        "2",
        "train",
        "--data",
        s(&data),
        "--out",
        s(&run),
        "--steps",
        "100000",
    ];
    args.extend_from_slice(&["--checkpoint-every", "1", "--eval-every", "0"]);
    args.extend_from_slice(SMALL);
    let mut child = Command::new(env!("CARGO_BIN_EXE_igpt"))
        .args(&args)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait for the first checkpoint, then kill the run at several moments.
    let t0 = std::time::Instant::now();
    while !run.join("trainer.safetensors").exists() {
        assert!(t0.elapsed().as_secs() < 60, "no checkpoint appeared");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    for delay_ms in [3u64, 17, 41] {
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        child.kill().unwrap();
        child.wait().unwrap();
        // Whatever moment it died at, the checkpoint loads and the run continues.
        let o = igpt(&["info", "--model", s(&run)]);
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("checkpoint: step"),
            "{}",
            stderr(&o)
        );
        let mut resume: Vec<&str> = vec!["--threads", "2", "train", "--resume", s(&run)];
        resume.extend_from_slice(&["--stop-after", "1000000"]);
        child = Command::new(env!("CARGO_BIN_EXE_igpt"))
            .args(&resume)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let o = igpt(&["train", "--resume", s(&run), "--stop-after", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn library_errors_describe_values_and_the_command_names_the_flag() {
    let dir = tempdir("hints");
    // A data path whose name tells no format.
    let odd = dir.join("images.xyz");
    std::fs::write(&odd, b"not images").unwrap();
    let o = igpt(&[
        "palette",
        "fit",
        "--data",
        s(&odd),
        "--k",
        "4",
        "--out",
        s(&dir.join("p.json")),
    ]);
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(err.contains("cannot tell the format of"), "{err}");
    assert!(err.contains("hint: name the format with --format"), "{err}");
    // A training setting that cannot work is reported with the flags that set it.
    let data = small_npy(&dir);
    let o = igpt(&[
        "train",
        "--data",
        s(&data),
        "--out",
        s(&dir.join("run")),
        "--batch",
        "6",
        "--micro-batch",
        "4",
    ]);
    assert!(
        !o.status.success()
            && stderr(&o).contains("--batch (6) must be a multiple of --micro-batch (4)"),
        "{}",
        stderr(&o)
    );
    assert!(
        !dir.join("run").exists(),
        "a refused run leaves nothing behind"
    );
    // Images that are not square, with no side chosen.
    let wide = dir.join("wide.npy");
    let px = vec![7u8; 10 * 4 * 6];
    std::fs::write(
        &wide,
        igpt::npy::encode(&[10, 4, 6], igpt::npy::DType::U8, &px),
    )
    .unwrap();
    let o = igpt(&["train", "--data", s(&wide), "--out", s(&dir.join("w"))]);
    let err = stderr(&o);
    assert!(err.contains("4x6, not square"), "{err}");
    assert!(
        err.contains("hint: choose the model's image side with --side"),
        "{err}"
    );
    // No images at all (a panic before), from a file and from a folder.
    let folder = dir.join("folder");
    std::fs::create_dir_all(&folder).unwrap();
    image::GrayImage::from_pixel(5, 3, image::Luma([9u8]))
        .save(folder.join("a.png"))
        .unwrap();
    for src in [&data, &folder] {
        let o = igpt(&[
            "train",
            "--data",
            s(src),
            "--limit",
            "0",
            "--out",
            s(&dir.join("z")),
        ]);
        let err = stderr(&o);
        assert!(!o.status.success() && !err.contains("panicked"), "{err}");
        assert!(err.contains("hint: --limit must be at least 1"), "{err}");
    }
    // Evaluation masks on an autoregressive model.
    let run = dir.join("ar");
    assert!(train_small(&data, &run, "2").status.success());
    let o = igpt(&[
        "eval",
        "--model",
        s(&run),
        "--data",
        s(&data),
        "--masks",
        "2",
    ]);
    let err = stderr(&o);
    assert!(err.contains("autoregressive"), "{err}");
    assert!(err.contains("hint: leave out --masks"), "{err}");
    // An unknown device is refused by name.
    let o = igpt(&["--device", "tpu", "info", "--model", s(&dir)]);
    assert!(
        !o.status.success() && stderr(&o).contains("unknown device 'tpu'"),
        "{}",
        stderr(&o)
    );
}

/// Runs igpt and checks that it failed cleanly (exit 1, no panic) with `expect` in its errors.
fn fails_with(args: &[&str], expect: &[&str]) {
    let o = igpt(args);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "igpt {args:?}: {e}");
    assert!(!e.contains("panicked"), "igpt {args:?} panicked: {e}");
    for x in expect {
        assert!(e.contains(x), "igpt {args:?}: expected '{x}' in: {e}");
    }
}

#[test]
fn absurd_flags_and_configs_are_refused_by_name_before_anything_is_allocated() {
    let dir = tempdir("absurd");
    let data = small_npy(&dir);
    let run = dir.join("run");
    assert!(train_small(&data, &run, "2").status.success());
    let (d, r) = (s(&data), s(&run));
    let out = dir.join("x.png");
    let o = s(&out);
    fails_with(
        &[
            "palette",
            "fit",
            "--data",
            d,
            "--k",
            "0",
            "--out",
            s(&dir.join("p.json")),
        ],
        &["--k must be between 1 and 65536"],
    );
    for n in ["1000000000000000000", "100000000"] {
        fails_with(
            &["sample", "--model", r, "--n", n, "--out", o],
            &["memory is available", "hint: ask for fewer images (--n"],
        );
    }
    fails_with(
        &[
            "complete",
            "--model",
            r,
            "--data",
            d,
            "--k",
            "1000000000",
            "--out",
            o,
        ],
        &["memory is available", "--k"],
    );
    let t_dir = dir.join("t");
    let t = s(&t_dir);
    for (flag, value, expect) in [
        ("--layers", "100000000", "n_layer 100000000"),
        ("--embd", "1000000", "n_embd 1000000"),
        ("--side", "100000", "image side of 100000"),
        ("--palette-size", "0", "--palette-size must be at least 2"),
        ("--side", "0", "--side must be at least 1"),
        ("--stop-after", "0", "--stop-after must be at least 1"),
    ] {
        fails_with(&["train", "--data", d, "--out", t, flag, value], &[expect]);
        assert!(!dir.join("t").exists(), "{flag} {value} left a run behind");
    }
    // A model too large for the memory there is: the estimate, what is available, the flag.
    let o = Command::new(env!("CARGO_BIN_EXE_igpt"))
        .args(["--threads", "2", "train", "--data", d, "--out", t])
        .args(["--layers", "4", "--embd", "512", "--palette-size", "8"])
        .env("IGPT_MEMORY_LIMIT", "100000000")
        .output()
        .unwrap();
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("needs about") && e.contains("Adam moments") && e.contains("only 0.10 GB"),
        "{e}"
    );
    assert!(e.contains("hint: the model alone does not fit"), "{e}");
    // The objective is part of the model: a resume that asks for another is refused.
    fails_with(
        &["train", "--resume", r, "--objective", "bert"],
        &["cannot resume", "objective"],
    );
    // A run's config.json with absurd sizes names the file.
    for (field, value) in [
        ("side", "1000000000"),
        ("n_layer", "1000000000000"),
        ("n_embd", "1099511627776"),
    ] {
        let bad = dir.join(format!("bad-{field}"));
        std::fs::create_dir_all(&bad).unwrap();
        for f in ["palette.json", "model.safetensors"] {
            std::fs::copy(run.join(f), bad.join(f)).unwrap();
        }
        let mut cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(run.join("config.json")).unwrap()).unwrap();
        cfg["model"][field] = serde_json::json!(value.parse::<u64>().unwrap());
        std::fs::write(bad.join("config.json"), cfg.to_string()).unwrap();
        fails_with(
            &["eval", "--model", s(&bad), "--data", d],
            &["config.json", value],
        );
    }
}

#[test]
fn one_writer_per_run_directory() {
    let dir = tempdir("lock");
    let data = small_npy(&dir);
    let run = dir.join("run");
    let mut args: Vec<&str> = vec![
        "--threads",
        "1",
        "train",
        "--data",
        s(&data),
        "--out",
        s(&run),
    ];
    args.extend_from_slice(&[
        "--steps",
        "100000",
        "--checkpoint-every",
        "1",
        "--eval-every",
        "0",
    ]);
    args.extend_from_slice(SMALL);
    let mut child = Command::new(env!("CARGO_BIN_EXE_igpt"))
        .args(&args)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !run.join("trainer.safetensors").exists() {
        assert!(t0.elapsed().as_secs() < 60, "no checkpoint appeared");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // A second writer is refused and told who holds the run, whichever way it comes in.
    let holder = format!("pid {}", child.id());
    fails_with(
        &["train", "--resume", s(&run), "--stop-after", "1"],
        &["in use by another igpt process", &holder],
    );
    let mut again: Vec<&str> = vec!["train", "--data", s(&data), "--out", s(&run)];
    again.extend_from_slice(SMALL);
    fails_with(&again, &["--resume"]);
    // Readers are not writers: they go on while it trains.
    let o = igpt(&["info", "--model", s(&run)]);
    assert!(o.status.success(), "{}", stderr(&o));
    child.kill().unwrap();
    child.wait().unwrap();
    // The kernel released the lock with the process.
    let o = igpt(&["train", "--resume", s(&run), "--stop-after", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn a_run_stopped_before_its_first_checkpoint_can_be_resumed_or_started_again() {
    let dir = tempdir("early");
    let data = small_npy(&dir);
    let run = dir.join("run");
    assert!(train_small(&data, &run, "2").status.success());
    let first = std::fs::read(run.join("model.safetensors")).unwrap();
    // What a kill before the first checkpoint leaves: settings, palette and data, no weights.
    for f in ["model.safetensors", "trainer.safetensors", "metrics.jsonl"] {
        std::fs::remove_file(run.join(f)).unwrap();
    }
    let o = igpt(&["train", "--resume", s(&run)]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Started again from step 0 with the same settings: the same model, bit for bit.
    assert_eq!(std::fs::read(run.join("model.safetensors")).unwrap(), first);
    for f in ["model.safetensors", "trainer.safetensors"] {
        std::fs::remove_file(run.join(f)).unwrap();
    }
    let o = train_small(&data, &run, "2");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(run.join("model.safetensors")).unwrap(), first);
    // Killed before even its settings were written: --resume says how to start it again.
    let bare = dir.join("bare");
    std::fs::create_dir_all(bare.join("data")).unwrap();
    fails_with(
        &["train", "--resume", s(&bare)],
        &["stopped before training began", "--out"],
    );
}

/// An IDX array of u8 with these dimensions, element `i` being `fill(i)`.
fn idx_bytes(dims: &[u32], fill: impl Fn(usize) -> u8) -> Vec<u8> {
    let n: usize = dims.iter().map(|&d| d as usize).product();
    common::idx_bytes(dims, &(0..n).map(fill).collect::<Vec<u8>>(), 8)
}

#[test]
fn labels_of_idx_data_can_be_named_and_a_wrong_file_is_refused_by_name() {
    let dir = tempdir("labels");
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/small-a");
    let m = s(&model);
    // Three 8x8 images, with their labels under a name no MNIST naming would find.
    let images = dir.join("digits-images-idx3-ubyte");
    std::fs::write(&images, idx_bytes(&[3, 8, 8], |i| (i * 7 % 256) as u8)).unwrap();
    let good = dir.join("answers.bin");
    std::fs::write(&good, idx_bytes(&[3], |i| [4, 0, 6][i])).unwrap();
    let img = s(&images);
    let out = dir.join("f.safetensors");

    // Without --labels there are none; with it, the features carry them.
    let o = igpt(&["features", "--model", m, "--data", img, "--out", s(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("no labels"));
    let with = ["features", "--model", m, "--data", img, "--out", s(&out)];
    let o = igpt(&[&with[..], &["--labels", s(&good)]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let labels: Vec<i64> = st
        .tensor("labels")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(labels, vec![4, 0, 6]);

    // Missing, miscounted, not labels, not IDX at all: each named, with the flag.
    let short = dir.join("short.bin");
    std::fs::write(&short, idx_bytes(&[2], |i| i as u8)).unwrap();
    let images_as_labels = dir.join("pics.bin");
    std::fs::write(&images_as_labels, idx_bytes(&[3, 2, 2], |_| 1)).unwrap();
    let text = dir.join("labels.txt");
    std::fs::write(&text, "4\n0\n6\n").unwrap();
    let missing = dir.join("none.bin");
    for (file, why) in [
        (&missing, "cannot read"),
        (&short, "2 labels for the 3 images"),
        (&images_as_labels, "not a labels file"),
        (&text, "not an IDX file"),
    ] {
        fails_with(
            &[&with[..], &["--labels", s(file)]].concat(),
            &["--labels", s(file), why],
        );
    }
    // A labels file for data that carries its own labels is refused, not ignored.
    let npy = small_npy(&dir);
    fails_with(
        &[
            "features",
            "--model",
            m,
            "--data",
            s(&npy),
            "--out",
            s(&out),
            "--labels",
            s(&good),
        ],
        &["--labels", s(&good), "goes with IDX images"],
    );
    // probe names the flag of the set whose labels are wrong.
    fails_with(
        &[
            "probe",
            "--model",
            m,
            "--data",
            img,
            "--labels",
            s(&good),
            "--test-data",
            img,
            "--test-labels",
            s(&short),
            "--chart",
            s(&dir.join("p.png")),
        ],
        &["--test-labels", s(&short), "2 labels for the 3 images"],
    );
    // And a missing labels file says what was tried and which flag names one.
    fails_with(
        &[
            "probe",
            "--model",
            m,
            "--data",
            img,
            "--test-data",
            img,
            "--chart",
            s(&dir.join("p.png")),
        ],
        &["has no labels", "digits-labels-idx1-ubyte", "--labels"],
    );
}
