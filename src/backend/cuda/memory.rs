//! What a benchmark asks of a GPU from outside the backend: how much of its memory is in use,
//! and waiting for its queued work.
//!
//! Both act on the device's primary context, the one [`super::CudaBackend`] opens, so they see
//! its allocations and its queue without a handle to the backend.

use anyhow::{Context, Result, anyhow};
use cudarc::driver::CudaContext;
use std::sync::Arc;

/// The primary context of GPU `ordinal`, after [`super::probe`]: cudarc panics where the
/// driver is missing, so the probe's error comes first.
fn primary(ordinal: usize) -> Result<Arc<CudaContext>> {
    let count = super::probe()?;
    anyhow::ensure!(
        ordinal < count,
        "there is no GPU cuda:{ordinal} on this machine: it has {count}"
    );
    std::panic::catch_unwind(|| CudaContext::new(ordinal))
        .map_err(|_| anyhow!("cannot start cuda:{ordinal}"))?
        .map_err(|e| anyhow!("{e:?}"))
        .with_context(|| format!("cannot start cuda:{ordinal}"))
}

/// Bytes of GPU `ordinal`'s memory in use now, as the driver counts them (total minus free):
/// every context on the device, this process's own included. igpt allocates its arenas once
/// per engine, so read while an engine is alive this is also its peak. `None` where there is no
/// such GPU or no driver.
pub fn memory_in_use(ordinal: usize) -> Option<usize> {
    let ctx = primary(ordinal).ok()?;
    let (free, total) = ctx.mem_get_info().ok()?;
    Some(total.saturating_sub(free))
}

/// Waits until every kernel and copy queued on GPU `ordinal` by this process has finished, so
/// that a host clock read next covers them (a step's last kernels, such as the optimizer's,
/// are queued after its last download).
pub fn synchronize(ordinal: usize) -> Result<()> {
    primary(ordinal)?
        .synchronize()
        .map_err(|e| anyhow!("{e:?}"))
        .with_context(|| format!("cannot synchronise cuda:{ordinal}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn without_a_gpu_there_is_no_memory_to_report_and_no_panic() {
        if super::super::probe().is_err() {
            assert_eq!(super::memory_in_use(0), None);
            let err = format!("{:#}", super::synchronize(0).unwrap_err());
            assert!(err.contains("CUDA") || err.contains("GPU"), "{err}");
        } else {
            // On a GPU machine the context and its allocations take some memory.
            assert!(super::memory_in_use(0).unwrap() > 0);
            super::synchronize(0).unwrap();
        }
    }
}
