//! Several processes working as one: data-parallel training, and evaluation split over them.
//!
//! A [`Collective`] is this process's handle on the group (its *team*): its rank, the world
//! size, and the few operations the jobs need (sums, a broadcast from rank 0, a gather on rank
//! 0). Three implementations: [`Single`] (one process, today's behaviour), MPI (`mpirun`,
//! cargo feature `mpi`) and [`threads`] (ranks as threads of one process, so the data-parallel
//! path is tested without an MPI library). The command line chooses one with [`launch`], once;
//! the library never asks how it was started.
//!
//! The rules every job follows: all ranks make the same calls in the same order; rank 0 alone
//! writes files and reports; every other rank only reads. A rank that fails ends the job: under
//! MPI the command line aborts the whole world ([`abort`]); a thread rank that leaves makes the
//! others' next call fail.

#[cfg(feature = "mpi")]
mod mpi;
pub mod reduce;
pub mod threads;

use anyhow::Result;
use std::ops::Range;

/// The operations a data-parallel job needs from its group of processes. Every rank must
/// call the same operations in the same order; results are the same on every rank unless the
/// method says otherwise.
pub trait Collective: Send {
    /// This process's rank, from 0.
    fn rank(&self) -> usize;
    /// Processes in the group.
    fn world(&self) -> usize;
    /// What carries the group (`single`, `mpi`, `threads`), for messages.
    fn kind(&self) -> &'static str;
    /// Replaces `buf` with its elementwise sum over all ranks.
    fn sum_f32(&mut self, buf: &mut [f32]) -> Result<()>;
    /// Replaces `buf` with its elementwise sum over all ranks.
    fn sum_f64(&mut self, buf: &mut [f64]) -> Result<()>;
    /// Replaces `bytes` on every rank with rank 0's.
    fn broadcast(&mut self, bytes: &mut Vec<u8>) -> Result<()>;
    /// Every rank's `bytes`, in rank order, on rank 0; an empty list elsewhere.
    fn gather(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// Starts summing `values` over all ranks in the background as bucket `id` (one sum per
    /// bucket at a time; ids are small and reused every step). [`Collective::finish_sum`] gives
    /// the result.
    fn start_sum(&mut self, id: usize, values: &[f32]) -> Result<()>;
    /// Lets background sums move on (called between pieces of other work).
    fn progress(&mut self) {}
    /// Waits for bucket `id`'s sum and writes it to `out` (as long as the values given).
    fn finish_sum(&mut self, id: usize, out: &mut [f32]) -> Result<()>;
}

/// A team as jobs hold it.
pub type Team = Box<dyn Collective>;

/// One process alone: every operation is the identity.
#[derive(Debug, Default)]
pub struct Single {
    pending: HeldSums,
}

/// Copies of the values of background sums, by bucket id, for teams whose sums run when they
/// finish (one process alone, thread ranks).
#[derive(Debug, Default)]
struct HeldSums(Vec<Vec<f32>>);

impl HeldSums {
    fn put(&mut self, id: usize, values: &[f32]) {
        if self.0.len() <= id {
            self.0.resize_with(id + 1, Vec::new);
        }
        self.0[id].clear();
        self.0[id].extend_from_slice(values);
    }

    /// Bucket `id`'s values, which must be `len` long.
    fn get(&mut self, id: usize, len: usize) -> Result<&mut Vec<f32>> {
        self.0
            .get_mut(id)
            .filter(|v| v.len() == len)
            .ok_or_else(|| anyhow::anyhow!("no background sum {id} of {len} values was started"))
    }
}

impl Single {
    pub fn team() -> Team {
        Box::new(Single::default())
    }
}

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn kind(&self) -> &'static str {
        "single"
    }
    fn sum_f32(&mut self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn sum_f64(&mut self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&mut self, _: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }
    fn gather(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![bytes.to_vec()])
    }
    fn start_sum(&mut self, id: usize, values: &[f32]) -> Result<()> {
        self.pending.put(id, values);
        Ok(())
    }
    fn finish_sum(&mut self, id: usize, out: &mut [f32]) -> Result<()> {
        // Alone, the sum is the values themselves.
        out.copy_from_slice(self.pending.get(id, out.len())?);
        Ok(())
    }
}

/// Helpers every job uses on its team.
pub trait TeamExt {
    /// Whether this rank writes files and reports (rank 0).
    fn leads(&self) -> bool;
    /// This rank's share of `n` items worked through in batches of `batch`: whole batches, dealt
    /// out in order (rank 0 the first ones), so every batch holds the items it would hold in one
    /// process and results gathered in rank order are in item order.
    fn share(&self, n: usize, batch: usize) -> Range<usize>;
    /// Every rank's `part`, concatenated in rank order, on rank 0 (`None` elsewhere).
    fn gather_values<T: Plain>(&mut self, part: &[T]) -> Result<Option<Vec<T>>>;
    /// Rank 0's `value` on every rank.
    fn broadcast_values<T: Plain>(&mut self, value: &mut Vec<T>) -> Result<()>;
    /// Whether any rank says `yes` (every rank gets the answer).
    fn any(&mut self, yes: bool) -> Result<bool>;
    /// Refuses to go on unless every rank holds the same `checksum` of `what` (parameters
    /// after loading, say): ranks that drifted apart would train different models silently.
    fn check_same(&mut self, what: &str, checksum: u64) -> Result<()>;
}

impl<C: Collective + ?Sized> TeamExt for C {
    fn leads(&self) -> bool {
        self.rank() == 0
    }

    fn share(&self, n: usize, batch: usize) -> Range<usize> {
        let batches = n.div_ceil(batch.max(1));
        let (r, w) = (self.rank(), self.world());
        let first = r * batches / w;
        let last = (r + 1) * batches / w;
        (first * batch).min(n)..(last * batch).min(n)
    }

    fn gather_values<T: Plain>(&mut self, part: &[T]) -> Result<Option<Vec<T>>> {
        let mut bytes = Vec::with_capacity(part.len() * T::SIZE);
        for v in part {
            v.put(&mut bytes);
        }
        let all = self.gather(&bytes)?;
        if !self.leads() {
            return Ok(None);
        }
        let mut out = Vec::new();
        for (rank, b) in all.iter().enumerate() {
            anyhow::ensure!(
                b.len().is_multiple_of(T::SIZE),
                "rank {rank} sent {} bytes, not whole values of {} bytes",
                b.len(),
                T::SIZE
            );
            out.extend(b.chunks_exact(T::SIZE).map(T::take));
        }
        Ok(Some(out))
    }

    fn broadcast_values<T: Plain>(&mut self, value: &mut Vec<T>) -> Result<()> {
        if self.world() == 1 {
            return Ok(());
        }
        let mut bytes = Vec::with_capacity(value.len() * T::SIZE);
        for v in value.iter() {
            v.put(&mut bytes);
        }
        self.broadcast(&mut bytes)?;
        anyhow::ensure!(
            bytes.len().is_multiple_of(T::SIZE),
            "rank 0 broadcast {} bytes, not whole values of {} bytes",
            bytes.len(),
            T::SIZE
        );
        value.clear();
        value.extend(bytes.chunks_exact(T::SIZE).map(T::take));
        Ok(())
    }

    fn any(&mut self, yes: bool) -> Result<bool> {
        let mut v = [if yes { 1.0 } else { 0.0 }];
        self.sum_f64(&mut v)?;
        Ok(v[0] > 0.0)
    }

    fn check_same(&mut self, what: &str, checksum: u64) -> Result<()> {
        if self.world() == 1 {
            return Ok(());
        }
        let mut lead = vec![checksum];
        self.broadcast_values(&mut lead)?;
        let differs = lead[0] != checksum;
        // Everyone learns whether anyone differs, so all ranks stop together.
        anyhow::ensure!(
            !self.any(differs)?,
            "the {} processes do not hold the same {what}{}: every rank must read the same run \
             directory and data (on a filesystem all machines share) and run the same igpt",
            self.world(),
            if differs {
                format!(" (rank {} differs from rank 0)", self.rank())
            } else {
                String::new()
            }
        );
        Ok(())
    }
}

/// A fixed-size value sent between ranks as little-endian bytes.
pub trait Plain: Copy {
    const SIZE: usize;
    fn put(&self, out: &mut Vec<u8>);
    fn take(bytes: &[u8]) -> Self;
}

macro_rules! plain {
    ($($t:ty),*) => {$(
        impl Plain for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn put(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            fn take(bytes: &[u8]) -> Self {
                <$t>::from_le_bytes(bytes.try_into().expect("chunks of SIZE bytes"))
            }
        }
    )*};
}
plain!(f32, f64, u64, u32);

/// A checksum of f32 values (their bits), for [`TeamExt::check_same`].
pub fn checksum(values: &[f32]) -> u64 {
    // FNV-1a over the bit patterns: cheap, and any flipped bit changes it.
    values.iter().fold(0xcbf2_9ce4_8422_2325, |h, v| {
        (h ^ v.to_bits() as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// How this process was started, read from the environment a launcher sets.
fn launched_ranks() -> Option<usize> {
    let var = |k: &str| std::env::var(k).ok()?.trim().parse::<usize>().ok();
    // OpenMPI's mpirun, MPICH's hydra, and Slurm's srun with a PMI plugin.
    var("OMPI_COMM_WORLD_SIZE")
        .or_else(|| var("PMI_SIZE"))
        .or_else(|| {
            (std::env::var_os("PMIX_RANK").is_some() || std::env::var_os("PMI_RANK").is_some())
                .then(|| var("SLURM_NTASKS"))
                .flatten()
        })
}

/// This process's rank when a launcher started several (for messages before or without MPI).
pub fn launched_rank() -> Option<usize> {
    launched_ranks().filter(|&n| n > 1)?;
    [
        "OMPI_COMM_WORLD_RANK",
        "PMI_RANK",
        "PMIX_RANK",
        "SLURM_PROCID",
    ]
    .iter()
    .find_map(|k| std::env::var(k).ok()?.trim().parse().ok())
}

/// Threads each process should run when a launcher started several on this machine: the
/// machine's cores shared out among them (`None` when alone on the machine).
pub fn threads_per_local_rank() -> Option<usize> {
    let var = |k: &str| std::env::var(k).ok()?.trim().parse::<usize>().ok();
    let local = var("OMPI_COMM_WORLD_LOCAL_SIZE").or_else(|| var("MPI_LOCALNRANKS"))?;
    if local <= 1 {
        return None;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Some((cores / local).max(1))
}

/// The team this process belongs to: MPI's world when started by `mpirun` (or `srun`) in a
/// build with the `mpi` feature, otherwise one process alone. Call once, at start-up; under
/// MPI, end with [`finish`] (or [`abort`] on an error).
pub fn launch() -> Result<Team> {
    match launched_ranks() {
        Some(n) if n > 1 => launch_mpi(n),
        _ => Ok(Single::team()),
    }
}

#[cfg(feature = "mpi")]
fn launch_mpi(_: usize) -> Result<Team> {
    mpi::init()
}

#[cfg(not(feature = "mpi"))]
fn launch_mpi(n: usize) -> Result<Team> {
    anyhow::bail!(
        "started as one of {n} MPI processes, but this igpt was built without MPI: each process \
         would work alone. Build it with `cargo build --release --features mpi` (needs an MPI \
         library and libclang; see docs/scaling.md)"
    )
}

/// Ends MPI cleanly once every rank is done (nothing to do in one process).
pub fn finish() {
    #[cfg(feature = "mpi")]
    mpi::finalize();
}

/// Ends every process of an MPI job at once after this one failed, so none waits forever on
/// a rank that is gone. Returns (doing nothing) when the process is alone.
pub fn abort(code: i32) {
    #[cfg(feature = "mpi")]
    mpi::abort(code);
    let _ = code;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_whole_batches_in_order_and_cover_everything() {
        for (n, batch, world) in [(10, 3, 2), (10, 3, 3), (7, 8, 2), (64, 8, 3), (5, 1, 4)] {
            let teams = threads::group(world);
            let mut covered = Vec::new();
            for t in &teams {
                let r = t.share(n, batch);
                assert!(r.start.is_multiple_of(batch) || r.start == n, "{r:?}");
                covered.extend(r);
            }
            assert_eq!(
                covered,
                (0..n).collect::<Vec<_>>(),
                "n {n} batch {batch} world {world}"
            );
        }
    }

    #[test]
    fn checksums_see_any_changed_bit() {
        let a = [1.0f32, -2.5, 3.25];
        let mut b = a;
        b[1] = f32::from_bits(b[1].to_bits() ^ 1);
        assert_ne!(checksum(&a), checksum(&b));
        assert_eq!(checksum(&a), checksum(&a.clone()));
    }
}
