//! The order training images are drawn in, and each process's share of every batch.

use crate::data::TokenSet;
use rand::SeedableRng;
use rand::seq::SliceRandom;

/// Which share of every batch this process trains on: of a batch of `B` images, rank `r` of
/// `world` takes images `r * B / world .. (r + 1) * B / world`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
}

impl Shard {
    /// The whole batch (one process).
    pub const WHOLE: Shard = Shard { rank: 0, world: 1 };

    /// Images of a batch of `batch` this shard takes, and where they start in it.
    pub fn share(&self, batch: usize) -> anyhow::Result<(usize, usize)> {
        anyhow::ensure!(
            self.world >= 1 && self.rank < self.world,
            "rank {} of {} processes does not exist",
            self.rank,
            self.world
        );
        anyhow::ensure!(
            batch.is_multiple_of(self.world),
            "a batch of {batch} images does not split evenly over {} processes",
            self.world
        );
        let per = batch / self.world;
        Ok((per, self.rank * per))
    }

    /// Images per forward pass of this shard: its share of a batch of `batch`, in passes of at
    /// most `micro_batch` (a memory limit), which must divide the share evenly.
    pub fn pass(&self, batch: usize, micro_batch: usize) -> anyhow::Result<usize> {
        let (per, _) = self.share(batch)?;
        let pass = micro_batch.clamp(1, per.max(1));
        anyhow::ensure!(
            per.is_multiple_of(pass),
            "each of the {} processes takes {per} images of a batch of {batch}, which do not \
             split into passes of {pass}: choose a micro-batch that divides {per}",
            self.world
        );
        Ok(pass)
    }
}

/// A place in the data: the epoch, and the position in that epoch's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub epoch: u64,
    pub cursor: usize,
}

impl Position {
    /// The position `k` images further on, in a data set of `n` images.
    pub fn advanced(self, k: usize, n: usize) -> Position {
        let at = self.cursor + k;
        Position {
            epoch: self.epoch + (at / n) as u64,
            cursor: at % n,
        }
    }
}

/// Epoch orders: each epoch a fixed shuffle by `(seed, epoch)`, so a run resumed from any
/// position, with any number of processes, draws the same images.
#[derive(Debug, Default)]
pub struct Loader {
    seed: u64,
    order: Vec<usize>,
    order_epoch: Option<u64>,
}

impl Loader {
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            order: Vec::new(),
            order_epoch: None,
        }
    }

    /// The image at `at` in a data set of `n` images. Refills the order in place when the
    /// epoch changes (no allocation once it has grown).
    pub fn image_at(&mut self, at: Position, n: usize) -> usize {
        if self.order_epoch != Some(at.epoch) || self.order.len() != n {
            self.order.clear();
            self.order.extend(0..n);
            let seed = self.seed ^ (at.epoch.wrapping_add(1)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            self.order
                .shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
            self.order_epoch = Some(at.epoch);
        }
        self.order[at.cursor]
    }

    /// Copies `dst.len() / t` consecutive images of the order, starting at `from`, into `dst`.
    pub fn fill(&mut self, data: &TokenSet, from: Position, dst: &mut [u16]) {
        let (t, n) = (data.header.t, data.len());
        for (k, img) in dst.chunks_exact_mut(t).enumerate() {
            let idx = self.image_at(from.advanced(k, n), n);
            data.copy_image(idx, img);
        }
    }
}
