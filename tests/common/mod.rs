//! Helpers shared by the integration tests (each test binary uses some of them).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs the `igpt` binary with two threads.
pub fn igpt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_igpt"))
        .args(["--threads", "2"])
        .args(args)
        .output()
        .expect("run igpt")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// A fresh, empty directory for one test (unique per test binary run).
pub fn tempdir(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("igpt-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
