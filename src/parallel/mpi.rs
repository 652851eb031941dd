//! The MPI team (cargo feature `mpi`): the world of `mpirun -np N igpt ...` or `srun`.
//!
//! MPI is started once per process with serialized threading (calls may come from any thread,
//! one at a time: a job's calls come from whichever pool thread runs its loop) and ended with
//! [`finalize`] or [`abort`]. Background sums are `MPI_Iallreduce` on buffers this module owns.

use super::{Collective, Team};
use anyhow::{Result, bail, ensure};
use mpi::Threading;
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::ffi;
use mpi::point_to_point::{Destination, Source};
use mpi::raw::AsRaw;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::{CommunicatorCollectives, Equivalence, Root};
use std::sync::Mutex;

/// The MPI environment; dropping it finalizes MPI, which [`finalize`] does at the end.
static UNIVERSE: Mutex<Option<Universe>> = Mutex::new(None);

/// Largest piece one point-to-point message or broadcast carries (MPI counts are `int`).
const PIECE: usize = 1 << 30;

pub(super) fn init() -> Result<Team> {
    let mut slot = UNIVERSE.lock().unwrap_or_else(|e| e.into_inner());
    ensure!(slot.is_none(), "MPI was already started in this process");
    let Some((universe, threading)) = mpi::initialize_with_threading(Threading::Serialized) else {
        bail!("MPI could not be started (was it already started and ended?)");
    };
    ensure!(
        threading >= Threading::Serialized,
        "this MPI library offers only {threading:?} threading; igpt needs Serialized (calls from \
         any one thread at a time): use an MPI built with thread support (OpenMPI and MPICH are)"
    );
    let world = universe.world();
    let (rank, size) = (world.rank() as usize, world.size() as usize);
    *slot = Some(universe);
    Ok(Box::new(Mpi {
        rank,
        world: size,
        scratch: Vec::new(),
        buckets: Vec::new(),
    }))
}

pub(super) fn finalize() {
    let mut slot = UNIVERSE.lock().unwrap_or_else(|e| e.into_inner());
    drop(slot.take());
}

pub(super) fn abort(code: i32) {
    let started = UNIVERSE.lock().map(|s| s.is_some()).unwrap_or(true);
    if started && SimpleCommunicator::world().size() > 1 {
        SimpleCommunicator::world().abort(code);
    }
}

/// A background sum: the values sent, the sum received, and MPI's handle on it.
struct Bucket {
    send: Vec<f32>,
    recv: Vec<f32>,
    request: ffi::MPI_Request,
    active: bool,
}

// SAFETY: an `MPI_Request` is a handle MPI lets any thread use when threading is Serialized
// (as `init` requires); the bucket is only touched through `&mut Mpi`, one call at a time.
unsafe impl Send for Bucket {}

struct Mpi {
    rank: usize,
    world: usize,
    scratch: Vec<f32>,
    buckets: Vec<Bucket>,
}

fn comm() -> SimpleCommunicator {
    SimpleCommunicator::world()
}

impl Mpi {
    fn wait(bucket: &mut Bucket) {
        if bucket.active {
            // SAFETY: the request came from `MPI_Iallreduce` in `start_sum` and has not been
            // completed; MPI sets it to the null request when done.
            unsafe { ffi::MPI_Wait(&mut bucket.request, ffi::RSMPI_STATUS_IGNORE) };
            bucket.active = false;
        }
    }
}

impl Drop for Mpi {
    fn drop(&mut self) {
        // A started sum writes into `recv` until it completes: wait before the buffers go.
        self.buckets.iter_mut().for_each(Mpi::wait);
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn kind(&self) -> &'static str {
        "mpi"
    }

    fn sum_f32(&mut self, buf: &mut [f32]) -> Result<()> {
        for piece in buf.chunks_mut(PIECE / 4) {
            self.scratch.clear();
            self.scratch.extend_from_slice(piece);
            comm().all_reduce_into(&self.scratch[..], piece, SystemOperation::sum());
        }
        Ok(())
    }

    fn sum_f64(&mut self, buf: &mut [f64]) -> Result<()> {
        let send = buf.to_vec();
        for (s, r) in send.chunks(PIECE / 8).zip(buf.chunks_mut(PIECE / 8)) {
            comm().all_reduce_into(s, r, SystemOperation::sum());
        }
        Ok(())
    }

    fn broadcast(&mut self, bytes: &mut Vec<u8>) -> Result<()> {
        let world = comm();
        let root = world.process_at_rank(0);
        let mut len = bytes.len() as u64;
        root.broadcast_into(&mut len);
        bytes.resize(len as usize, 0);
        for piece in bytes.chunks_mut(PIECE) {
            root.broadcast_into(piece);
        }
        Ok(())
    }

    fn gather(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let world = comm();
        if self.rank != 0 {
            let root = world.process_at_rank(0);
            root.send(&(bytes.len() as u64));
            for piece in bytes.chunks(PIECE) {
                root.send(piece);
            }
            return Ok(Vec::new());
        }
        let mut all = vec![bytes.to_vec()];
        for r in 1..self.world {
            let from = world.process_at_rank(r as i32);
            let (len, _) = from.receive::<u64>();
            let mut got = vec![0u8; len as usize];
            for piece in got.chunks_mut(PIECE) {
                from.receive_into(piece);
            }
            all.push(got);
        }
        Ok(all)
    }

    fn start_sum(&mut self, id: usize, values: &[f32]) -> Result<()> {
        ensure!(
            values.len() <= i32::MAX as usize,
            "a background sum of {} values is more than MPI counts",
            values.len()
        );
        if self.buckets.len() <= id {
            self.buckets.resize_with(id + 1, || Bucket {
                send: Vec::new(),
                recv: Vec::new(),
                // SAFETY: reading an MPI constant the library initialised at start-up.
                request: unsafe { ffi::RSMPI_REQUEST_NULL },
                active: false,
            });
        }
        let b = &mut self.buckets[id];
        Mpi::wait(b);
        b.send.clear();
        b.send.extend_from_slice(values);
        b.recv.resize(values.len(), 0.0);
        // SAFETY: `send` and `recv` belong to this bucket and are neither touched nor moved (the
        // bucket is only resized above, after its previous sum completed) until `wait` completes
        // the request, which `finish_sum`, the next `start_sum` of this id and `Drop` all do.
        unsafe {
            ffi::MPI_Iallreduce(
                b.send.as_ptr().cast(),
                b.recv.as_mut_ptr().cast(),
                b.send.len() as i32,
                f32::equivalent_datatype().as_raw(),
                SystemOperation::sum().as_raw(),
                comm().as_raw(),
                &mut b.request,
            );
        }
        b.active = true;
        Ok(())
    }

    fn progress(&mut self) {
        for b in self.buckets.iter_mut().filter(|b| b.active) {
            let mut done = 0;
            // SAFETY: an active request from `start_sum`; MPI_Test completes it when it can.
            unsafe { ffi::MPI_Test(&mut b.request, &mut done, ffi::RSMPI_STATUS_IGNORE) };
            if done != 0 {
                b.active = false;
            }
        }
    }

    fn finish_sum(&mut self, id: usize, out: &mut [f32]) -> Result<()> {
        let Some(b) = self.buckets.get_mut(id) else {
            bail!("no background sum {id} was started");
        };
        Mpi::wait(b);
        ensure!(
            b.recv.len() == out.len(),
            "background sum {id} holds {} values, not {}",
            b.recv.len(),
            out.len()
        );
        out.copy_from_slice(&b.recv);
        Ok(())
    }
}
