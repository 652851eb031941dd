//! Summing a step's gradients over the team while the backward pass is still running.
//!
//! The gradient arena follows the parameter layout (embeddings, blocks 0..L, final norm, head),
//! and the backward pass finishes it from the end: the head first, then each block from the
//! last, the embeddings last. So the arena is cut into buckets of whole tensors from the end,
//! and each bucket's sum starts as soon as the backward pass has passed its start, while the
//! earlier layers are still being differentiated.

use super::{Collective, Team};
use crate::model::{Engine, FinishedGrads, ParamLayout};
use anyhow::Result;
use std::ops::Range;
use std::time::{Duration, Instant};

/// Elements per bucket: large enough that each sum is one efficient message, small enough that
/// the first starts early in the backward pass.
pub const BUCKET_LEN: usize = 1 << 20;

/// A job's team and the bucketed sum of its gradients.
pub struct Reducer {
    team: Team,
    /// Ranges of the gradient arena, in the order the backward pass finishes them.
    buckets: Vec<Range<usize>>,
    /// Buckets whose sum has started this step.
    started: usize,
    staging: Vec<f32>,
    /// Time spent in the team's calls (and the copies they need) since last asked.
    comm: Duration,
}

impl Reducer {
    /// A reducer for a model of `layout` on `team`, in buckets of about `bucket_len` elements.
    pub fn new(team: Team, layout: &ParamLayout, bucket_len: usize) -> Self {
        let mut buckets = Vec::new();
        let mut end = layout.total;
        let mut start = end;
        for t in layout.tensors.iter().rev() {
            start = t.offset;
            if end - start >= bucket_len.max(1) {
                buckets.push(start..end);
                end = start;
            }
        }
        if start < end {
            buckets.push(start..end);
        }
        Self {
            team,
            buckets,
            started: 0,
            staging: Vec::new(),
            comm: Duration::ZERO,
        }
    }

    /// One process alone: nothing to sum.
    pub fn alone(&self) -> bool {
        self.team.world() == 1
    }

    pub fn team(&mut self) -> &mut dyn Collective {
        self.team.as_mut()
    }

    /// The buckets, in the order their sums start.
    pub fn buckets(&self) -> &[Range<usize>] {
        &self.buckets
    }

    /// Seconds spent communicating since the last call.
    pub fn take_comm_seconds(&mut self) -> f64 {
        std::mem::take(&mut self.comm).as_secs_f64()
    }

    /// Called by the last backward pass of a step as it finishes gradients: starts the sums of
    /// the buckets it has passed.
    pub fn finished(&mut self, grads: &FinishedGrads) -> Result<()> {
        if self.alone() {
            return Ok(());
        }
        let t0 = Instant::now();
        while let Some(r) = self.buckets.get(self.started) {
            if r.start < grads.from {
                break;
            }
            self.staging.resize(r.len(), 0.0);
            grads.read(r.clone(), &mut self.staging);
            self.team.start_sum(self.started, &self.staging)?;
            self.started += 1;
        }
        self.team.progress();
        self.comm += t0.elapsed();
        Ok(())
    }

    /// Completes the step's sums: the model's gradients (starting any bucket not yet started),
    /// then the caller's host-held gradients and the loss, in one more sum.
    pub fn finish(
        &mut self,
        engine: &mut Engine,
        host_grads: &mut [&mut [f32]],
        loss_sum: &mut f64,
    ) -> Result<()> {
        if self.alone() {
            return Ok(());
        }
        let t0 = Instant::now();
        for id in self.started..self.buckets.len() {
            let r = self.buckets[id].clone();
            self.staging.resize(r.len(), 0.0);
            engine.read_grads(r, &mut self.staging);
            self.team.start_sum(id, &self.staging)?;
        }
        self.started = 0;
        for id in 0..self.buckets.len() {
            let r = self.buckets[id].clone();
            self.staging.resize(r.len(), 0.0);
            self.team.finish_sum(id, &mut self.staging)?;
            engine.write_grads(r, &self.staging);
        }
        // Host-held gradients (a classification head) are small: one plain sum, with the loss.
        let host: usize = host_grads.iter().map(|g| g.len()).sum();
        self.staging.clear();
        self.staging.reserve(host);
        for g in host_grads.iter() {
            self.staging.extend_from_slice(g);
        }
        if host > 0 {
            self.team.sum_f32(&mut self.staging)?;
            let mut at = 0;
            for g in host_grads.iter_mut() {
                g.copy_from_slice(&self.staging[at..at + g.len()]);
                at += g.len();
            }
        }
        let mut loss = [*loss_sum];
        self.team.sum_f64(&mut loss)?;
        *loss_sum = loss[0];
        self.comm += t0.elapsed();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::parallel::Single;

    #[test]
    fn buckets_are_whole_tensors_from_the_end_and_cover_the_arena() {
        let cfg = ModelConfig::preset("tiny", 16, 8, 1).unwrap();
        let layout = ParamLayout::new(&cfg);
        for len in [1, 1000, 50_000, usize::MAX / 2] {
            let r = Reducer::new(Single::team(), &layout, len);
            let b = r.buckets();
            assert_eq!(b[0].end, layout.total);
            assert_eq!(b.last().unwrap().start, 0);
            for w in b.windows(2) {
                assert_eq!(w[0].start, w[1].end, "contiguous, from the end");
            }
            for r in b {
                assert!(layout.tensors.iter().any(|t| t.offset == r.start));
            }
            if len == 1 {
                assert_eq!(b.len(), layout.tensors.len());
            }
            if len == usize::MAX / 2 {
                assert_eq!(b.len(), 1);
            }
        }
    }
}
