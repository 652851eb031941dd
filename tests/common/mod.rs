//! Helpers shared by the integration tests (each test binary uses some of them).
#![allow(dead_code)]

pub mod cuda_host;
pub mod server;

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

/// An f32 tensor of a safetensors fixture.
pub fn f32s(st: &safetensors::SafeTensors, name: &str) -> Vec<f32> {
    let t = st
        .tensor(name)
        .unwrap_or_else(|e| panic!("fixture lacks {name}: {e}"));
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// The model shape a fixture written by scripts/make_fixtures.py records in its metadata.
pub fn fixture_config(bytes: &[u8]) -> igpt::config::ModelConfig {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    let get = |k: &str| meta[k].parse::<usize>().unwrap();
    igpt::config::ModelConfig {
        n_layer: get("n_layer"),
        n_embd: get("n_embd"),
        n_head: get("n_head"),
        n_vocab: get("n_vocab"),
        side: get("side"),
        channels: get("channels"),
        objective: Default::default(),
    }
}

/// Writes `n` gray `side` x `side` images as `dir/imgs.npy`; pixel `i` (over all images in
/// order) is `pixel(i)`.
pub fn gray_npy(dir: &Path, n: usize, side: usize, pixel: impl Fn(usize) -> u8) -> PathBuf {
    let px: Vec<u8> = (0..n * side * side).map(pixel).collect();
    let p = dir.join("imgs.npy");
    std::fs::write(
        &p,
        igpt::npy::encode(&[n, side, side], igpt::npy::DType::U8, &px),
    )
    .unwrap();
    p
}

/// An IDX array: element type `elem` (8: u8), these dimensions, then `body`.
pub fn idx_bytes(dims: &[u32], body: &[u8], elem: u8) -> Vec<u8> {
    let mut v = vec![0, 0, elem, dims.len() as u8];
    for d in dims {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend_from_slice(body);
    v
}

/// A small fixed-seed xorshift generator for test data and mutations.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A value in [-1, 1].
    pub fn unit(&mut self) -> f32 {
        (self.next() % 2_000_001) as f32 / 1_000_000.0 - 1.0
    }

    /// `good` with one to four bytes from `from` on replaced, and one time in five cut short.
    pub fn mutate(&mut self, good: &[u8], from: usize) -> Vec<u8> {
        let mut m = good.to_vec();
        for _ in 0..1 + self.next() % 4 {
            let i = from + (self.next() as usize) % (m.len() - from);
            m[i] = self.next() as u8;
        }
        if self.next().is_multiple_of(5) {
            m.truncate((self.next() as usize) % m.len());
        }
        m
    }
}
