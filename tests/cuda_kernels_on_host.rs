//! The CUDA kernels (`src/backend/cuda/kernels.cu`), run on the CPU and checked against the
//! CPU backend's semantics.
//!
//! No GPU is needed: `tests/cuda_host/shim.h` turns the CUDA source into plain C++ (each
//! CUDA thread a fiber, `__shared__` memory per block, barriers, warp shuffles and atomics
//! emulated), and `tests/cuda_host/check.cpp` runs every kernel with the launch
//! configuration of `src/backend/cuda/mod.rs` against a reference. This test builds that
//! program with `g++`, runs it, and requires a passing line for every kernel the source
//! defines, so a kernel added without a check fails here.

mod common;

use common::cuda_host::{compile, cuda_kernels, kernel_names, root};
use std::path::Path;
use std::process::Command;

/// Builds `tests/cuda_host/<source>` and runs it; its output, once it has passed.
fn run_host_check(source: &str) -> String {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cuda_host");
    std::fs::create_dir_all(&dir).expect("create the build folder");
    let exe = dir.join(source.trim_end_matches(".cpp"));
    compile(&root().join("tests/cuda_host").join(source), &exe, &[]);
    let run = Command::new(&exe)
        .output()
        .unwrap_or_else(|e| panic!("run {source}: {e}"));
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    println!("{stdout}");
    assert!(
        run.status.success(),
        "{source} failed ({}):\n{stdout}{}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
    stdout
}

/// Whether a line of `stdout` ("name  max-error  tolerance  PASS|FAIL ...") passes `name`.
fn passes(stdout: &str, name: &str) -> bool {
    stdout.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.first() == Some(&name) && fields.get(3) == Some(&"PASS")
    })
}

#[test]
fn every_cuda_kernel_matches_the_cpu_semantics_when_run_on_the_host() {
    let stdout = run_host_check("check.cpp");
    for name in &cuda_kernels() {
        assert!(
            passes(&stdout, name),
            "kernel {name} has no passing check in tests/cuda_host/check.cpp:\n{stdout}"
        );
    }
}

#[test]
fn flash_attention_holds_over_the_longest_context() {
    let stdout = run_host_check("long_context.cpp");
    // Each width's three kernels, at 4,096 positions.
    for kernel in ["forward", "backward_q", "backward_kv"] {
        for width in [64, 128] {
            let name = format!("flash_attention_{kernel}_{width}");
            assert!(
                passes(&stdout, &name),
                "{name} has no passing line:\n{stdout}"
            );
        }
    }
}

#[test]
fn kernel_names_are_read_from_their_declarations() {
    let source = "extern \"C\" __global__ void fill_f32(float* x) {\n\
                  __device__ float helper(float v);\n\
                  extern \"C\" __global__ void attend_bf16(float* out,\n\
                  extern \"C\" __global__ void __launch_bounds__(256, 4) norm_backward(\n";
    assert_eq!(
        kernel_names(source),
        ["fill_f32", "attend_bf16", "norm_backward"]
    );
}
