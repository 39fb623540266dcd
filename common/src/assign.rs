//! The order of a sharded stream (the unlabeled pool, or any split too large to hold in memory), as a pure
//! function of (seed, epoch, world size, membership history): a two-level seeded shuffle.
//!
//! 1. The epoch's shards are permuted (`mix(seed, epoch)`), and their samples concatenated in shard order:
//!    the *global sequence*.
//! 2. The sequence is cut into `world` contiguous parts whose sizes differ by at most one, so each rank
//!    reads whole shards except at its two ends, and every sample belongs to exactly one rank.
//! 3. Each rank shuffles its part through a bounded shuffle buffer (seeded per epoch, period and rank), as
//!    streaming loaders do: memory stays O(buffer) however large the pool.
//!
//! Every rank runs the same number of steps; ranks whose part is one sample shorter get a shorter last
//! batch. A **cursor** is what a rank consumed of its sequence. When the world size changes mid-epoch
//! (a [`Period`] ends), the samples not yet consumed — in global-sequence order — are cut and shuffled again
//! for the new world, so the rest of the epoch still covers every unseen sample exactly once.

use crate::sampler::{epoch_permutation, mix, SplitMix64};
use std::collections::HashSet;

/// One sample of a sharded split: shard index in the manifest's list, index within the shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SampleRef {
    pub shard: u32,
    pub index: u32,
}

/// A finished membership period of the current epoch: its world size and, per rank, how many samples of
/// its sequence that rank consumed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Period {
    pub world: u32,
    pub consumed: Vec<u64>,
}

/// The order of one epoch of one sharded stream.
#[derive(Clone, Debug)]
pub struct ShardedOrder<'a> {
    /// Samples per shard, in manifest order.
    pub shard_sizes: &'a [u64],
    pub seed: u64,
    pub epoch: u64,
    /// Within-rank shuffle buffer in samples (0 or 1: no within-rank shuffle).
    pub shuffle_buffer: usize,
    /// Earlier membership periods of this epoch, oldest first (empty for a fresh epoch).
    pub history: &'a [Period],
}

/// Bounds of part `rank` when `len` items are cut into `world` contiguous parts of near-equal size.
pub fn part_bounds(len: u64, world: u32, rank: u32) -> (u64, u64) {
    let (w, r) = (world.max(1) as u64, rank as u64);
    let (q, rem) = (len / w, len % w);
    let lo = r * q + r.min(rem);
    (lo, lo + q + u64::from(r < rem))
}

/// Streaming shuffle with a buffer of `size`: fill the buffer, then for every further item emit a random
/// buffered one and put the new item in its place; drain the rest in random order at the end.
pub fn buffer_shuffle(items: Vec<SampleRef>, size: usize, rng: &mut SplitMix64) -> Vec<SampleRef> {
    if size <= 1 {
        return items;
    }
    let mut out = Vec::with_capacity(items.len());
    let mut buf: Vec<SampleRef> = Vec::with_capacity(size);
    for item in items {
        if buf.len() < size {
            buf.push(item);
            continue;
        }
        let j = rng.below(buf.len() as u64) as usize;
        out.push(std::mem::replace(&mut buf[j], item));
    }
    while !buf.is_empty() {
        let j = rng.below(buf.len() as u64) as usize;
        out.push(buf.swap_remove(j));
    }
    out
}

impl ShardedOrder<'_> {
    pub fn total(&self) -> u64 {
        self.shard_sizes.iter().sum()
    }

    fn shard_order(&self) -> Vec<u64> {
        epoch_permutation(self.shard_sizes.len() as u64, self.seed, self.epoch, true)
    }

    /// Items `lo..hi` of the global sequence, without building the whole sequence.
    fn global_range(&self, lo: u64, hi: u64) -> Vec<SampleRef> {
        let mut out = Vec::with_capacity((hi - lo) as usize);
        let mut offset = 0u64;
        for s in self.shard_order() {
            let n = self.shard_sizes[s as usize];
            let (a, b) = (lo.max(offset), hi.min(offset + n));
            out.extend((a..b.max(a)).map(|g| SampleRef {
                shard: s as u32,
                index: (g - offset) as u32,
            }));
            offset += n;
            if offset >= hi {
                break;
            }
        }
        out
    }

    fn shuffle_part(&self, part: Vec<SampleRef>, period: usize, rank: u32) -> Vec<SampleRef> {
        let mut rng = SplitMix64::new(mix(
            mix(mix(self.seed, self.epoch), period as u64 + 1),
            rank as u64,
        ));
        buffer_shuffle(part, self.shuffle_buffer, &mut rng)
    }

    /// What is left of the global sequence after the recorded periods, in global-sequence order.
    fn remaining_after_history(&self) -> Vec<SampleRef> {
        let mut rem = self.global_range(0, self.total());
        for (p, period) in self.history.iter().enumerate() {
            let mut consumed = HashSet::new();
            for r in 0..period.world {
                let (lo, hi) = part_bounds(rem.len() as u64, period.world, r);
                let seq = self.shuffle_part(rem[lo as usize..hi as usize].to_vec(), p, r);
                let c = period
                    .consumed
                    .get(r as usize)
                    .copied()
                    .unwrap_or(0)
                    .min(seq.len() as u64);
                consumed.extend(seq[..c as usize].iter().copied());
            }
            rem.retain(|s| !consumed.contains(s));
        }
        rem
    }

    /// Rank `rank`'s sequence for the current period (world size `world`), from its start.
    pub fn rank_sequence(&self, world: u32, rank: u32) -> Vec<SampleRef> {
        let part = if self.history.is_empty() {
            let (lo, hi) = part_bounds(self.total(), world, rank);
            self.global_range(lo, hi)
        } else {
            let rem = self.remaining_after_history();
            let (lo, hi) = part_bounds(rem.len() as u64, world, rank);
            rem[lo as usize..hi as usize].to_vec()
        };
        self.shuffle_part(part, self.history.len(), rank)
    }

    /// Samples left for the current period, over all ranks.
    pub fn remaining(&self) -> u64 {
        if self.history.is_empty() {
            self.total()
        } else {
            self.remaining_after_history().len() as u64
        }
    }

    /// Steps of the current period with per-rank batch `b` (the same for every rank).
    pub fn steps(&self, world: u32, b: u64) -> u64 {
        self.remaining()
            .div_ceil(world.max(1) as u64)
            .div_ceil(b.max(1))
    }

    /// Samples all ranks together take at step `k` of the current period.
    pub fn global_batch_len(&self, world: u32, k: u64, b: u64) -> u64 {
        let rem = self.remaining();
        (0..world)
            .map(|r| {
                let (lo, hi) = part_bounds(rem, world, r);
                (hi - lo).saturating_sub(k * b).min(b)
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(rng: &mut SplitMix64) -> Vec<u64> {
        let shards = 1 + rng.below(12) as usize;
        (0..shards).map(|_| rng.below(40)).collect()
    }

    fn count(seen: &mut [u32], sizes: &[u64], refs: &[SampleRef]) {
        let offsets: Vec<u64> = sizes
            .iter()
            .scan(0, |acc, &n| {
                let o = *acc;
                *acc += n;
                Some(o)
            })
            .collect();
        for s in refs {
            assert!(
                (s.index as u64) < sizes[s.shard as usize],
                "{s:?} outside its shard"
            );
            seen[(offsets[s.shard as usize] + s.index as u64) as usize] += 1;
        }
    }

    /// Property: for world sizes 1–4 and random shard layouts, every sample appears exactly once per epoch
    /// across ranks, and every rank runs the same number of steps.
    #[test]
    fn every_sample_exactly_once_per_epoch() {
        let mut rng = SplitMix64::new(1);
        for case in 0..200 {
            let sizes = layout(&mut rng);
            let total: u64 = sizes.iter().sum();
            let world = 1 + (case % 4) as u32;
            let order = ShardedOrder {
                shard_sizes: &sizes,
                seed: case,
                epoch: case % 3,
                shuffle_buffer: (case % 17) as usize,
                history: &[],
            };
            let mut seen = vec![0u32; total as usize];
            let b = 1 + rng.below(7);
            let steps = order.steps(world, b);
            let mut longest = 0;
            for r in 0..world {
                let seq = order.rank_sequence(world, r);
                assert!(
                    seq.len() as u64 <= steps * b,
                    "rank {r} has more samples than its steps hold"
                );
                longest = longest.max(seq.len() as u64);
                count(&mut seen, &sizes, &seq);
            }
            assert!(
                steps == 0 || longest > (steps - 1) * b,
                "a step with no samples on any rank"
            );
            assert!(
                seen.iter().all(|&c| c == 1),
                "case {case} world {world} sizes {sizes:?}"
            );
            let per_step: u64 = (0..steps)
                .map(|k| order.global_batch_len(world, k, b))
                .sum();
            assert_eq!(per_step, total);
        }
    }

    /// Property: after a resize mid-epoch (random world sizes, random consumption), the rest of the epoch
    /// covers every unseen sample exactly once — also across two successive resizes.
    #[test]
    fn resize_mid_epoch_covers_the_unseen_exactly_once() {
        let mut rng = SplitMix64::new(2);
        for case in 0..150 {
            let sizes = layout(&mut rng);
            let total: u64 = sizes.iter().sum();
            let mut history: Vec<Period> = Vec::new();
            let mut seen = vec![0u32; total as usize];
            let resizes = 1 + (case % 2);
            for _ in 0..resizes {
                let world = 1 + rng.below(4) as u32;
                let order = ShardedOrder {
                    shard_sizes: &sizes,
                    seed: 9,
                    epoch: 1,
                    shuffle_buffer: 5,
                    history: &history,
                };
                // Synchronous training: every rank has taken the same number of steps k.
                let b = 1 + rng.below(5);
                let k = rng.below(order.steps(world, b) + 1);
                let mut consumed = Vec::new();
                for r in 0..world {
                    let seq = order.rank_sequence(world, r);
                    let c = (k * b).min(seq.len() as u64);
                    count(&mut seen, &sizes, &seq[..c as usize]);
                    consumed.push(c);
                }
                history.push(Period { world, consumed });
            }
            let world = 1 + rng.below(4) as u32;
            let order = ShardedOrder {
                shard_sizes: &sizes,
                seed: 9,
                epoch: 1,
                shuffle_buffer: 5,
                history: &history,
            };
            for r in 0..world {
                count(&mut seen, &sizes, &order.rank_sequence(world, r));
            }
            assert!(seen.iter().all(|&c| c == 1), "case {case}: {seen:?}");
        }
    }

    #[test]
    fn order_is_a_pure_function_and_changes_with_epoch() {
        let sizes = [10u64, 7, 0, 12, 3];
        let o = |epoch| {
            ShardedOrder {
                shard_sizes: &sizes,
                seed: 4,
                epoch,
                shuffle_buffer: 6,
                history: &[],
            }
            .rank_sequence(2, 1)
        };
        assert_eq!(o(0), o(0));
        assert_ne!(o(0), o(1));
    }

    #[test]
    fn shuffle_buffer_bounds_displacement() {
        let items: Vec<SampleRef> = (0..1000)
            .map(|i| SampleRef { shard: 0, index: i })
            .collect();
        let out = buffer_shuffle(items, 8, &mut SplitMix64::new(0));
        // An item can only be emitted after the 7 items before its buffer slot were filled: it never
        // appears more than (buffer - 1) positions early.
        for (pos, s) in out.iter().enumerate() {
            assert!(pos + 7 >= s.index as usize, "{s:?} emitted at {pos}");
        }
    }
}
