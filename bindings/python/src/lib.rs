//! `igpt._igpt`: the Python module over the igpt library (re-exported by `igpt/__init__.py`).
//!
//! Every call that computes runs on a worker thread with the GIL released; the calling thread
//! waits, checking for signals, and Ctrl-C stops the work at its next batch, row or step
//! ([`igpt::stop`]) and raises `KeyboardInterrupt`. Errors become `FileNotFoundError`,
//! `MemoryError` or `ValueError` with igpt's message; a panic becomes a `RuntimeError`.

mod jobs;
mod model;

use pyo3::prelude::*;

#[pymodule]
fn _igpt(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<model::Model>()?;
    m.add_function(wrap_pyfunction!(jobs::train, m)?)?;
    m.add_function(wrap_pyfunction!(jobs::finetune, m)?)?;
    m.add_function(wrap_pyfunction!(jobs::load_data, m)?)?;
    m.add_function(wrap_pyfunction!(jobs::train_defaults, m)?)?;
    m.add_function(wrap_pyfunction!(jobs::finetune_defaults, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

pub(crate) mod run {
    //! Running library work off the calling thread, and its errors as Python exceptions.

    use igpt::stop::Stopped;
    use pyo3::exceptions::{
        PyFileNotFoundError, PyKeyboardInterrupt, PyMemoryError, PyOSError, PyPermissionError,
        PyRuntimeError, PyValueError,
    };
    use pyo3::prelude::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Condvar, Mutex};
    use std::time::Duration;

    /// What a running job shares with the thread that waits for it: whether to stop, and why.
    #[derive(Default)]
    pub struct Job {
        stop: AtomicBool,
        error: Mutex<Option<PyErr>>,
    }

    impl Job {
        /// Stops the job at its next check, with `e` as its result.
        pub fn fail(&self, e: PyErr) {
            let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
            if slot.is_none() {
                *slot = Some(e);
            }
            self.stop.store(true, Ordering::Relaxed);
        }

        /// For the library's callbacks: `Err(Stopped)` once the job is to stop.
        pub fn check(&self) -> Result<(), Stopped> {
            igpt::stop::check(&self.stop)
        }

        fn take_error(&self) -> Option<PyErr> {
            self.error.lock().unwrap_or_else(|p| p.into_inner()).take()
        }
    }

    /// Runs `work` on a new thread with the GIL released, checking for signals (Ctrl-C) on
    /// this thread every 50 ms; a signal stops the work at its next check and is raised.
    pub fn run<T: Send>(
        py: Python<'_>,
        work: impl FnOnce(&Job) -> anyhow::Result<T> + Send,
    ) -> PyResult<T> {
        let job = Job::default();
        let done = (Mutex::new(false), Condvar::new());
        let outcome = std::thread::scope(|s| {
            let worker = s.spawn(|| {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(&job)));
                *done.0.lock().unwrap_or_else(|p| p.into_inner()) = true;
                done.1.notify_all();
                r
            });
            loop {
                let finished = py.detach(|| {
                    let guard = done.0.lock().unwrap_or_else(|p| p.into_inner());
                    let (guard, _) = done
                        .1
                        .wait_timeout_while(guard, Duration::from_millis(50), |d| !*d)
                        .unwrap_or_else(|p| p.into_inner());
                    *guard
                });
                if finished {
                    break;
                }
                if let Err(e) = py.check_signals() {
                    job.fail(e);
                }
            }
            worker.join()
        });
        let result = match outcome {
            Ok(Ok(r)) => r,
            Ok(Err(panic)) | Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                return Err(PyRuntimeError::new_err(format!(
                    "igpt internal error: {msg}"
                )));
            }
        };
        // A signal or a failing callback wins over the work's own result.
        if let Some(e) = job.take_error() {
            return Err(e);
        }
        result.map_err(to_py)
    }

    /// An igpt error as the natural Python exception, with igpt's whole message.
    pub fn to_py(e: anyhow::Error) -> PyErr {
        let msg = format!("{e:#}");
        for cause in e.chain() {
            if cause.is::<Stopped>() {
                return PyKeyboardInterrupt::new_err(msg);
            }
            if cause.is::<igpt::fsutil::NotFound>() {
                return PyFileNotFoundError::new_err(msg);
            }
            if cause.is::<igpt::memory::OutOfMemory>() {
                return PyMemoryError::new_err(msg);
            }
            if let Some(io) = cause.downcast_ref::<std::io::Error>() {
                use std::io::ErrorKind as K;
                return match io.kind() {
                    K::NotFound => PyFileNotFoundError::new_err(msg),
                    K::PermissionDenied => PyPermissionError::new_err(msg),
                    K::OutOfMemory => PyMemoryError::new_err(msg),
                    // A file that is there but not what it should be is bad input.
                    K::InvalidData | K::InvalidInput | K::UnexpectedEof => {
                        PyValueError::new_err(msg)
                    }
                    _ => PyOSError::new_err(msg),
                };
            }
        }
        PyValueError::new_err(msg)
    }

    /// `to_py` for results computed on the calling thread.
    pub fn here<T>(r: anyhow::Result<T>) -> PyResult<T> {
        r.map_err(to_py)
    }
}
