//! Building the host emulation of CUDA (`tests/cuda_host/`) with g++: the kernel checks, the
//! host CUDA driver and the test of its rules.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The names of the `extern "C" __global__ void NAME(...)` kernels of a CUDA source (with or
/// without `__launch_bounds__(...)` before the name).
pub fn kernel_names(source: &str) -> Vec<String> {
    source
        .lines()
        .filter_map(|line| {
            let rest = line.trim_start().strip_prefix("extern \"C\"")?;
            let rest = rest.trim_start().strip_prefix("__global__")?;
            let rest = rest.trim_start().strip_prefix("void")?.trim_start();
            // A register bound, `__launch_bounds__(THREADS, BLOCKS)`, may precede the name.
            let rest = match rest.strip_prefix("__launch_bounds__") {
                Some(bounds) => bounds.split_once(')')?.1,
                None => rest,
            };
            let name = rest.split('(').next()?.trim();
            (!name.is_empty()).then(|| name.to_string())
        })
        .collect()
}

/// The kernels of `src/backend/cuda/kernels.cu`.
pub fn cuda_kernels() -> Vec<String> {
    let source = std::fs::read_to_string(root().join("src/backend/cuda/kernels.cu"))
        .expect("read src/backend/cuda/kernels.cu");
    let kernels = kernel_names(&source);
    assert!(
        kernels.len() >= 20,
        "found only {kernels:?} in kernels.cu: has the declaration style changed?"
    );
    kernels
}

/// `g++ -std=c++17 -O2 -pthread -fno-extern-tls-init EXTRA -o OUT SOURCE`, panicking with
/// the compiler's message on failure.
///
/// -fno-extern-tls-init: `extern __shared__` becomes a block-scope `extern thread_local` (see
/// shim.h), for which GCC calls a TLS initialiser that does not exist inside a function
/// template.
pub fn compile(source: &Path, out: &Path, extra: &[&str]) {
    let build = Command::new("g++")
        .args(["-std=c++17", "-O2", "-pthread", "-fno-extern-tls-init"])
        .args(extra)
        .arg("-o")
        .arg(out)
        .arg(source)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run g++ ({e}): this test compiles the CUDA kernels for the CPU and needs \
                 a C++17 compiler on PATH; install it (Debian/Ubuntu: apt-get install g++)"
            )
        });
    assert!(
        build.status.success(),
        "compiling {} failed:\n{}",
        source.display(),
        String::from_utf8_lossy(&build.stderr)
    );
}

/// A folder holding the host CUDA driver (`tests/cuda_host/driver.cpp`) under the names the
/// CUDA backend opens (libcuda.so, libcublasLt.so) and the `kernel_list.inc`
/// it was built with. Built once per test binary.
pub fn driver_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cuda_host_driver");
        std::fs::create_dir_all(&dir).expect("create the driver's folder");
        let list: String = cuda_kernels()
            .iter()
            .map(|k| format!("KERNEL({k})\n"))
            .collect();
        std::fs::write(dir.join("kernel_list.inc"), list).expect("write kernel_list.inc");
        // Built beside and renamed, so a process still using an older build keeps its file.
        let built = dir.join("libcuda.so.new");
        let include = dir.to_str().expect("a UTF-8 target folder");
        compile(
            &root().join("tests/cuda_host/driver.cpp"),
            &built,
            &["-fPIC", "-shared", "-I", include],
        );
        std::fs::rename(&built, dir.join("libcuda.so")).expect("install libcuda.so");
        let link = dir.join("libcublasLt.so");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("libcuda.so", &link).expect("link the cuBLASLt name");
        dir
    })
}
