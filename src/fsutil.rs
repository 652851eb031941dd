//! Crash-safe file writing.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` so that a crash at any moment leaves either the old file or the
/// new one, never a torn mix: write a temporary file beside it, fsync, rename over, fsync
/// the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| Ok(w.write_all(bytes)?))
}

/// [`write_atomic`] with the contents streamed by `write` (through a buffer), so a large file
/// never needs a second copy in memory.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let result = (|| -> Result<()> {
        let f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        write(&mut w)
            .and_then(|()| Ok(w.flush()?))
            .with_context(|| format!("cannot write {} (is the disk full?)", tmp.display()))?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()
            .with_context(|| format!("cannot flush {} to disk", tmp.display()))?;
        drop(f);
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Refuses anything but a regular file (a FIFO or a device such as `/dev/zero` would be read
/// forever), following symbolic links.
pub fn ensure_regular_file(path: &Path) -> Result<()> {
    let md = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    anyhow::ensure!(
        md.is_file(),
        "{} is not a regular file (a directory, FIFO or device cannot be read as one)",
        path.display()
    );
    Ok(())
}

/// A model, data set or file named by the user that is not there (the Python bindings raise
/// `FileNotFoundError` for it).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct NotFound {
    pub path: std::path::PathBuf,
    pub message: String,
}

impl NotFound {
    /// "`path` does not exist", with `what` in front (`"data set "`) and `more` after.
    pub fn new(what: &str, path: &Path, more: &str) -> Self {
        Self {
            path: path.to_path_buf(),
            message: format!("{what}{} does not exist{more}", path.display()),
        }
    }
}

/// The whole of a regular file ([`ensure_regular_file`]).
pub fn read_regular(path: &Path) -> Result<Vec<u8>> {
    ensure_regular_file(path)?;
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// An exclusive lock on a run directory, held until dropped (or the process ends, however it
/// ends: the kernel releases it). The lock file names the holder.
#[derive(Debug)]
pub struct DirLock {
    _file: std::sync::Arc<std::fs::File>,
}

/// Locks this process holds, by directory: a second handle on a directory shares the lock
/// (`flock` would refuse a second file descriptor even in the same process).
static HELD: std::sync::Mutex<Vec<(std::path::PathBuf, std::sync::Weak<std::fs::File>)>> =
    std::sync::Mutex::new(Vec::new());

/// A run directory another process is writing.
#[derive(Debug, thiserror::Error)]
#[error("{} is in use by another igpt process ({holder}): wait for it to finish or stop it", .dir.display())]
pub struct Locked {
    pub dir: std::path::PathBuf,
    pub holder: String,
}

impl DirLock {
    pub const FILE: &str = ".lock";

    /// Takes the lock of `dir` without waiting: another holder is an error naming it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        let key = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
        held.retain(|(_, w)| w.strong_count() > 0);
        if let Some(f) = held
            .iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, w)| w.upgrade())
        {
            return Ok(Self { _file: f });
        }
        let p = dir.join(Self::FILE);
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&p)
            .with_context(|| format!("cannot open the lock file {}", p.display()))?;
        match f.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&p)
                    .ok()
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "holder unknown".to_string());
                return Err(Locked {
                    dir: dir.to_path_buf(),
                    holder,
                }
                .into());
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", p.display()));
            }
        }
        f.set_len(0)?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        writeln!(f, "pid {} on {host}", std::process::id())?;
        let f = std::sync::Arc::new(f);
        held.push((key, std::sync::Arc::downgrade(&f)));
        Ok(Self { _file: f })
    }
}

/// The environment settings igpt reads as numbers (memory and image-decoder limits).
pub const NUMERIC_ENV: [&str; 3] = [
    "IGPT_MEMORY_LIMIT",
    "IGPT_MAX_IMAGE_SIDE",
    "IGPT_MAX_IMAGE_MB",
];

/// Refuses an environment setting of [`NUMERIC_ENV`] that is set but not a whole number (the
/// readers would otherwise fall back to their defaults without a word).
pub fn check_numeric_env() -> anyhow::Result<()> {
    for name in NUMERIC_ENV {
        if let Some(v) = std::env::var_os(name) {
            let ok = v.to_str().is_some_and(|s| s.trim().parse::<u64>().is_ok());
            anyhow::ensure!(
                ok,
                "{name}={v:?} is not a whole number; unset it or give a number"
            );
        }
    }
    Ok(())
}
