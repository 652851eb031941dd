//! Ranks as threads of one process: a [`Collective`] that exercises the data-parallel path
//! (sharding, reductions, rank 0 writing alone) without an MPI library, in tests and checks.
//!
//! Every operation is an exchange: each rank hands in its part, and once all have, each takes
//! what it needs from all the parts. Sums add the parts in rank order, so results are the same
//! on every rank and from run to run.

use super::{Collective, HeldSums, Team};
use anyhow::{Result, bail};
use std::sync::{Arc, Condvar, Mutex};

#[derive(Clone)]
enum Part {
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bytes(Vec<u8>),
}

struct Board {
    parts: Vec<Option<Part>>,
    arrived: usize,
    /// Completed exchanges; a waiting rank wakes when it moves on.
    round: u64,
    last: Arc<Vec<Part>>,
    /// A rank that left (finished or failed) while others may still call.
    left: Option<usize>,
}

struct Shared {
    world: usize,
    board: Mutex<Board>,
    changed: Condvar,
}

/// One rank of a thread group.
pub struct ThreadRank {
    rank: usize,
    shared: Arc<Shared>,
    pending: HeldSums,
}

/// `world` ranks, one per thread the caller starts (rank `i` is element `i`).
pub fn group(world: usize) -> Vec<Team> {
    assert!(world >= 1, "a group needs at least one rank");
    let shared = Arc::new(Shared {
        world,
        board: Mutex::new(Board {
            parts: vec![None; world],
            arrived: 0,
            round: 0,
            last: Arc::new(Vec::new()),
            left: None,
        }),
        changed: Condvar::new(),
    });
    (0..world)
        .map(|rank| {
            Box::new(ThreadRank {
                rank,
                shared: shared.clone(),
                pending: HeldSums::default(),
            }) as Team
        })
        .collect()
}

impl ThreadRank {
    /// Hands in `part`; returns every rank's, in rank order.
    fn exchange(&self, part: Part) -> Result<Arc<Vec<Part>>> {
        let s = &self.shared;
        let mut b = s.board.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = b.left {
            bail!("rank {r} of the thread group has left: the job cannot go on");
        }
        let round = b.round;
        b.parts[self.rank] = Some(part);
        b.arrived += 1;
        if b.arrived == s.world {
            let all: Vec<Part> = b
                .parts
                .iter_mut()
                .map(|p| p.take().expect("all arrived"))
                .collect();
            b.last = Arc::new(all);
            b.arrived = 0;
            b.round += 1;
            s.changed.notify_all();
            return Ok(b.last.clone());
        }
        while b.round == round {
            if let Some(r) = b.left {
                bail!("rank {r} of the thread group has left: the job cannot go on");
            }
            b = s.changed.wait(b).unwrap_or_else(|e| e.into_inner());
        }
        // No rank can complete another exchange before this one hands in its next part, so
        // `last` is still this round's.
        Ok(b.last.clone())
    }
}

impl Drop for ThreadRank {
    fn drop(&mut self) {
        let mut b = self.shared.board.lock().unwrap_or_else(|e| e.into_inner());
        b.left.get_or_insert(self.rank);
        self.shared.changed.notify_all();
    }
}

fn mismatch(what: &str) -> anyhow::Error {
    anyhow::anyhow!("the ranks of the thread group called different operations ({what})")
}

impl Collective for ThreadRank {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.shared.world
    }
    fn kind(&self) -> &'static str {
        "threads"
    }

    fn sum_f32(&mut self, buf: &mut [f32]) -> Result<()> {
        let all = self.exchange(Part::F32(buf.to_vec()))?;
        buf.fill(0.0);
        for p in all.iter() {
            let Part::F32(v) = p else {
                return Err(mismatch("sum_f32"));
            };
            if v.len() != buf.len() {
                return Err(mismatch("sums of different lengths"));
            }
            buf.iter_mut().zip(v).for_each(|(a, b)| *a += b);
        }
        Ok(())
    }

    fn sum_f64(&mut self, buf: &mut [f64]) -> Result<()> {
        let all = self.exchange(Part::F64(buf.to_vec()))?;
        buf.fill(0.0);
        for p in all.iter() {
            let Part::F64(v) = p else {
                return Err(mismatch("sum_f64"));
            };
            if v.len() != buf.len() {
                return Err(mismatch("sums of different lengths"));
            }
            buf.iter_mut().zip(v).for_each(|(a, b)| *a += b);
        }
        Ok(())
    }

    fn broadcast(&mut self, bytes: &mut Vec<u8>) -> Result<()> {
        let all = self.exchange(Part::Bytes(std::mem::take(bytes)))?;
        let Part::Bytes(root) = &all[0] else {
            return Err(mismatch("broadcast"));
        };
        bytes.extend_from_slice(root);
        Ok(())
    }

    fn gather(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let all = self.exchange(Part::Bytes(bytes.to_vec()))?;
        if self.rank != 0 {
            return Ok(Vec::new());
        }
        all.iter()
            .map(|p| match p {
                Part::Bytes(b) => Ok(b.clone()),
                _ => Err(mismatch("gather")),
            })
            .collect()
    }

    fn start_sum(&mut self, id: usize, values: &[f32]) -> Result<()> {
        self.pending.put(id, values);
        Ok(())
    }

    fn finish_sum(&mut self, id: usize, out: &mut [f32]) -> Result<()> {
        let mut v = std::mem::take(self.pending.get(id, out.len())?);
        // Buckets finish in the same order on every rank, so the exchanges line up.
        self.sum_f32(&mut v)?;
        out.copy_from_slice(&v);
        // The buffer goes back for the next step's sum of this bucket.
        self.pending.0[id] = v;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::TeamExt;

    #[test]
    fn sums_broadcasts_and_gathers_agree_across_ranks() {
        let teams = group(3);
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = teams
                .into_iter()
                .map(|mut t| {
                    s.spawn(move || {
                        let r = t.rank() as f32;
                        let mut v = vec![r, 10.0 * r];
                        t.sum_f32(&mut v).unwrap();
                        let mut b = vec![t.rank() as u8; 2];
                        t.broadcast(&mut b).unwrap();
                        let g = t.gather_values(&[t.rank() as f64; 2]).unwrap();
                        (v, b, g)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (rank, (v, b, g)) in results.iter().enumerate() {
            assert_eq!(v, &[3.0, 30.0]);
            assert_eq!(b, &[0, 0]);
            if rank == 0 {
                assert_eq!(g.as_deref(), Some(&[0.0, 0.0, 1.0, 1.0, 2.0, 2.0][..]));
            } else {
                assert!(g.is_none());
            }
        }
    }

    #[test]
    fn a_rank_that_leaves_makes_the_others_fail_instead_of_wait() {
        let mut teams = group(2);
        let gone = teams.pop().unwrap();
        let mut stays = teams.pop().unwrap();
        let waiter = std::thread::spawn(move || stays.sum_f32(&mut [1.0]).unwrap_err());
        std::thread::sleep(std::time::Duration::from_millis(50));
        drop(gone);
        let err = waiter.join().unwrap().to_string();
        assert!(err.contains("rank 1") && err.contains("left"), "{err}");
    }
}
