//! The unlabeled stream as the training loop sees it: an endless sequence of per-rank batches over a
//! sharded split, with its own epochs independent of the labeled stream's. Semi-supervised methods take
//! μ·b unlabeled samples per b labeled ones, so the two streams finish their epochs at different steps.
//! The cursor (epoch, step within the epoch) is all it takes to resume at the same sample with the same
//! augmentation.

use crate::assign::{Period, ShardedOrder};
use crate::loader::{LoadedBatch, LoaderSpec, StreamLoader, ViewMaker};
use crate::{Error, Result};
use std::sync::Arc;

/// Where a stream is: the epoch, and the steps already taken in it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    pub epoch: u64,
    pub step: u64,
}

/// The shard cache must hold every shard a shuffle window draws from, or the loader re-reads (and
/// re-verifies) shards for nearly every sample: with 1000-sample shards, a 10,000-sample window and the
/// default 4-shard cache, streaming ran at 4.8k instead of ~270k samples/s. A window spans at most
/// ⌈window / smallest shard⌉ + 1 shards; batches in flight (prefetch, several threads) may straddle two
/// windows, hence twice that plus one per thread.
pub fn cache_for_window(configured: usize, window: usize, sizes: &[u64], threads: usize) -> usize {
    let smallest = sizes.iter().copied().filter(|&n| n > 0).min().unwrap_or(1);
    let span = (window.max(1) as u64).div_ceil(smallest) as usize + 1;
    let needed = (2 * span + threads).min(sizes.len().max(1));
    if needed > configured {
        tracing::debug!(
            configured,
            needed,
            "shard cache enlarged to cover the shuffle window"
        );
    }
    configured.max(needed)
}

pub struct UnlabeledStream {
    spec: LoaderSpec,
    sizes: Vec<u64>,
    seed: u64,
    shuffle_window: usize,
    world: u32,
    rank: u32,
    views: Arc<dyn ViewMaker>,
    cursor: Cursor,
    /// Earlier membership periods of the cursor's epoch (another world size consumed part of it).
    history: Vec<Period>,
    steps_in_epoch: u64,
    loader: Option<StreamLoader>,
}

impl UnlabeledStream {
    /// `spec.batch` is this rank's unlabeled batch (μ times the labeled one); `spec.epoch` is ignored in
    /// favour of `from.epoch`. `history` holds the periods of `from.epoch` that other world sizes
    /// consumed (empty unless the job changed its world mid-epoch); `from.step` counts this period's
    /// steps.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        spec: LoaderSpec,
        seed: u64,
        shuffle_window: usize,
        world: u32,
        rank: u32,
        views: Arc<dyn ViewMaker>,
        from: Cursor,
        history: Vec<Period>,
    ) -> Result<Self> {
        let split =
            spec.manifest.splits.get(&spec.split).ok_or_else(|| {
                Error::Loader(format!("no split {:?} in the manifest", spec.split))
            })?;
        if split.num_samples < world as u64 {
            return Err(Error::Loader(format!(
                "split {:?} has {} samples, fewer than the {world} ranks",
                spec.split, split.num_samples
            )));
        }
        let sizes: Vec<u64> = split.shards.iter().map(|s| s.num_samples).collect();
        let mut spec = spec;
        spec.cache_shards =
            cache_for_window(spec.cache_shards, shuffle_window, &sizes, spec.threads);
        let mut s = UnlabeledStream {
            spec,
            sizes,
            seed,
            shuffle_window,
            world,
            rank,
            views,
            cursor: from,
            history,
            steps_in_epoch: 0,
            loader: None,
        };
        s.open()?;
        Ok(s)
    }

    /// The order of the cursor's epoch, after its earlier membership periods.
    fn order(&self) -> ShardedOrder<'_> {
        ShardedOrder {
            shard_sizes: &self.sizes,
            seed: self.seed,
            epoch: self.cursor.epoch,
            shuffle_window: self.shuffle_window,
            history: &self.history,
        }
    }

    /// The cursor's epoch as membership periods: the earlier ones and the current one up to the
    /// cursor (each rank of this world consumed `step × batch` samples of its sequence, or all of a
    /// shorter one). A job that goes on with another world size opens the stream with these as its
    /// history, so each unconsumed sample of the epoch comes exactly once.
    pub fn periods(&self) -> Vec<Period> {
        let order = self.order();
        let taken = self.cursor.step * self.spec.batch as u64;
        let consumed = (0..self.world)
            .map(|r| taken.min(order.rank_sequence(self.world, r).len()))
            .collect();
        let mut all = self.history.clone();
        all.push(Period {
            world: self.world,
            consumed,
        });
        all
    }

    fn open(&mut self) -> Result<()> {
        let order = self.order();
        let steps = order.steps(self.world, self.spec.batch as u64);
        let sequence = Arc::new(order.rank_sequence(self.world, self.rank));
        self.steps_in_epoch = steps;
        let spec = LoaderSpec {
            epoch: self.cursor.epoch,
            ..self.spec.clone()
        };
        self.loader = Some(StreamLoader::start(
            spec,
            sequence,
            self.cursor.step,
            self.steps_in_epoch,
            self.views.clone(),
        )?);
        Ok(())
    }

    /// Steps in one epoch of this stream (the same every epoch: the layout does not change).
    pub fn steps_per_epoch(&self) -> u64 {
        self.steps_in_epoch
    }

    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// The next batch, moving to the next epoch (a new order) when this one is exhausted, and the number
    /// of samples all ranks together hold at that step (an epoch's last batch may be short and uneven).
    pub fn next_batch(&mut self) -> Result<(LoadedBatch, u64)> {
        if self.cursor.step >= self.steps_in_epoch {
            self.cursor = Cursor {
                epoch: self.cursor.epoch + 1,
                step: 0,
            };
            self.history.clear();
            self.open()?;
        }
        let order = self.order();
        let global = order.global_batch_len(self.world, self.cursor.step, self.spec.batch as u64);
        let batch = self
            .loader
            .as_mut()
            .and_then(|l| l.next())
            .ok_or_else(|| {
                Error::Loader("the unlabeled loader ended before its planned steps".into())
            })??;
        self.cursor.step += 1;
        Ok((batch, global))
    }
}

#[cfg(test)]
mod tests {
    use super::cache_for_window;

    #[test]
    fn the_cache_covers_the_shards_a_window_spans() {
        // 1000-sample shards, 10,000-sample window: 11 shards per window, 2 windows + 1 thread.
        assert_eq!(cache_for_window(4, 10_000, &[1000; 100], 1), 23);
        // Big shards: the configured cache already covers a window.
        assert_eq!(cache_for_window(4, 10_000, &[10_000; 10], 1), 5);
        assert_eq!(cache_for_window(8, 10_000, &[10_000; 10], 1), 8);
        // Never more than the split has.
        assert_eq!(cache_for_window(4, 10_000, &[1000; 6], 2), 6);
    }
}
