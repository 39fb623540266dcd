//! The data order, as a pure function of (seed, epoch, world size): `torch.utils.data.DistributedSampler`
//! semantics with butler's own seeded permutation, so that the coordinator, every worker and any resumed
//! run compute the same order without ever exchanging index lists.
//!
//! The permutation of `0..len` for an epoch is a Fisher–Yates shuffle driven by SplitMix64 seeded with
//! `mix(seed, epoch)`. Rank `r` of `w` takes positions `start + r, start + r + w, …` — strided, with no
//! padding, so every sample is seen exactly once per epoch. With a per-rank batch of `b`, step `k` of all
//! ranks together covers the global positions `start + k·b·w .. start + (k+1)·b·w` — exactly the batch a
//! single worker with batch `b·w` takes at step `k`, which is what makes data-parallel training equal to
//! single-process training. Ranks may hold one sample more or less than each other; every rank runs the
//! same number of steps, and a short (even empty) last batch is weighted by its size when gradients are
//! averaged (`global_batch_len`).
//!
//! `start` is the global position where the current membership period of the epoch began: after `k`
//! synchronous steps the consumed samples are exactly the positions before `start + k·b·w`, so a resumed
//! or re-sharded job (a different world size) continues from there and still sees each sample once.

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, statistically fine for shuffling, and simple enough
/// to reimplement anywhere, which keeps the order a documented function rather than a library detail.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` without modulo bias (Lemire's multiply-and-reject).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0) has no value");
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = (self.next_u64() as u128) * (n as u128);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }
}

/// Derives an independent stream for (seed, epoch) — also used for other (seed, key) pairs.
pub fn mix(seed: u64, key: u64) -> u64 {
    let mut g = SplitMix64::new(seed ^ key.wrapping_mul(0xD1B5_4A32_D192_ED03));
    g.next_u64()
}

/// The shuffled order of `0..len` for one epoch.
pub fn epoch_permutation(len: u64, seed: u64, epoch: u64, shuffle: bool) -> Vec<u64> {
    let mut order: Vec<u64> = (0..len).collect();
    if shuffle {
        let mut g = SplitMix64::new(mix(seed, epoch));
        for i in (1..order.len()).rev() {
            let j = g.below(i as u64 + 1) as usize;
            order.swap(i, j);
        }
    }
    order
}

/// What one rank reads in one epoch of one split. Plain data: it crosses the wire as an
/// `AssignmentResponse` and is rebuilt on the worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DistributedSampler {
    pub dataset_len: u64,
    pub seed: u64,
    pub epoch: u64,
    pub shuffle: bool,
    pub world_size: u32,
    pub rank: u32,
    /// Global position where this membership period of the epoch starts (0 for a fresh epoch).
    pub start: u64,
}

impl DistributedSampler {
    fn w(&self) -> u64 {
        self.world_size.max(1) as u64
    }

    fn remaining(&self) -> u64 {
        self.dataset_len.saturating_sub(self.start)
    }

    /// Samples this rank reads in the rest of the epoch.
    pub fn samples_for_rank(&self) -> u64 {
        let (rem, w, r) = (self.remaining(), self.w(), self.rank as u64);
        rem / w + u64::from(r < rem % w)
    }

    /// Steps every rank runs in the rest of the epoch with per-rank batch `b`.
    pub fn steps(&self, b: u64) -> u64 {
        self.remaining().div_ceil(self.w()).div_ceil(b.max(1))
    }

    /// Samples all ranks together take at step `k` (the last global batch may be short).
    pub fn global_batch_len(&self, k: u64, b: u64) -> u64 {
        let lo = k * b * self.w();
        self.remaining().min(lo + b * self.w()).saturating_sub(lo)
    }

    /// Global position consumed after `k` synchronous steps: where a resumed period starts.
    pub fn position_after(&self, k: u64, b: u64) -> u64 {
        (self.start + k * b * self.w()).min(self.dataset_len)
    }

    /// This rank's batches for the rest of the epoch: `steps(b)` lists of split indices (the last ones may
    /// be shorter or empty on some ranks).
    pub fn batches(&self, b: u64) -> Vec<Vec<u64>> {
        let perm = epoch_permutation(self.dataset_len, self.seed, self.epoch, self.shuffle);
        let (w, r) = (self.w(), self.rank as u64);
        (0..self.steps(b))
            .map(|k| {
                (0..b)
                    .map(|j| self.start + (k * b + j) * w + r)
                    .take_while(|&pos| pos < self.dataset_len)
                    .map(|pos| perm[pos as usize])
                    .collect()
            })
            .collect()
    }

    /// All of this rank's indices for the rest of the epoch, in order.
    pub fn indices(&self) -> Vec<u64> {
        let perm = epoch_permutation(self.dataset_len, self.seed, self.epoch, self.shuffle);
        (self.start + self.rank as u64..self.dataset_len)
            .step_by(self.w() as usize)
            .map(|p| perm[p as usize])
            .collect()
    }
}

/// Size of the labeled subset that keeps `per_class` samples of each class (all of a smaller class).
pub fn subset_len(class_counts: &[u64], per_class: u64) -> u64 {
    class_counts.iter().map(|&c| c.min(per_class)).sum()
}

/// The labeled subset for few-label experiments: for each class, the first `per_class` of its samples
/// in a permutation seeded by `seed`. Returns sorted split indices. A pure function of (labels, seed), so
/// every worker selects the same subset without exchanging it.
pub fn labeled_subset(labels: &[i64], per_class: u64, seed: u64) -> Vec<u64> {
    let order = epoch_permutation(labels.len() as u64, seed, u64::MAX, true);
    let mut taken: std::collections::HashMap<i64, u64> = std::collections::HashMap::new();
    let mut keep: Vec<u64> = order
        .into_iter()
        .filter(|&i| {
            let n = taken.entry(labels[i as usize]).or_insert(0);
            *n += 1;
            *n <= per_class
        })
        .collect();
    keep.sort_unstable();
    keep
}

/// Contiguous, unpadded share of `0..len` for rank `r` (strided), used for evaluation where every sample
/// must be counted exactly once.
pub fn eval_indices(len: u64, world_size: u32, rank: u32) -> Vec<u64> {
    (rank as u64..len)
        .step_by(world_size.max(1) as usize)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_a_permutation_and_depends_on_epoch() {
        let a = epoch_permutation(1000, 7, 0, true);
        let b = epoch_permutation(1000, 7, 1, true);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..1000).collect::<Vec<_>>());
        assert_ne!(a, b);
        assert_eq!(a, epoch_permutation(1000, 7, 0, true));
        assert_eq!(epoch_permutation(5, 7, 0, false), vec![0, 1, 2, 3, 4]);
    }

    fn sampler(len: u64, world: u32, rank: u32, start: u64) -> DistributedSampler {
        DistributedSampler {
            dataset_len: len,
            seed: 3,
            epoch: 2,
            shuffle: true,
            world_size: world,
            rank,
            start,
        }
    }

    #[test]
    fn ranks_cover_every_sample_exactly_once_in_equal_steps() {
        for world in 1..=4u32 {
            for len in [0u64, 1, 2, 3, 7, 100, 101] {
                for b in [1u64, 3, 8] {
                    let mut seen = vec![0u32; len as usize];
                    let steps: Vec<_> = (0..world)
                        .map(|r| sampler(len, world, r, 0).batches(b).len())
                        .collect();
                    assert!(
                        steps.iter().all(|&s| s == steps[0]),
                        "unequal steps {steps:?}"
                    );
                    for rank in 0..world {
                        let s = sampler(len, world, rank, 0);
                        let batches = s.batches(b);
                        assert_eq!(batches.concat(), s.indices());
                        assert_eq!(s.indices().len() as u64, s.samples_for_rank());
                        for i in batches.concat() {
                            seen[i as usize] += 1;
                        }
                    }
                    assert!(
                        seen.iter().all(|&c| c == 1),
                        "world {world} len {len} b {b}: {seen:?}"
                    );
                    for k in 0..steps[0] as u64 {
                        let total: usize = (0..world)
                            .map(|r| sampler(len, world, r, 0).batches(b)[k as usize].len())
                            .sum();
                        assert_eq!(
                            total as u64,
                            sampler(len, world, 0, 0).global_batch_len(k, b)
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn per_rank_batches_union_to_the_single_worker_batch() {
        let (len, world, b) = (97u64, 3u32, 4u64);
        let single = sampler(len, 1, 0, 0).batches(b * world as u64);
        let per_rank: Vec<_> = (0..world)
            .map(|r| sampler(len, world, r, 0).batches(b))
            .collect();
        assert_eq!(single.len(), per_rank[0].len());
        for (k, want) in single.iter().enumerate() {
            let mut union: Vec<u64> = per_rank.iter().flat_map(|r| r[k].clone()).collect();
            let mut want = want.clone();
            union.sort();
            want.sort();
            assert_eq!(union, want, "step {k}");
        }
    }

    #[test]
    fn resharding_mid_epoch_keeps_exactly_once() {
        let (len, b) = (103u64, 4u64);
        for (w0, w1) in [(2u32, 3u32), (4, 1), (3, 2), (1, 4)] {
            let k = 5; // steps taken before the world changed
            let mut seen = vec![0u32; len as usize];
            for r in 0..w0 {
                for i in sampler(len, w0, r, 0)
                    .batches(b)
                    .into_iter()
                    .take(k)
                    .flatten()
                {
                    seen[i as usize] += 1;
                }
            }
            let start = sampler(len, w0, 0, 0).position_after(k as u64, b);
            for r in 0..w1 {
                for i in sampler(len, w1, r, start).indices() {
                    seen[i as usize] += 1;
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "{w0}→{w1}: {seen:?}");
        }
    }

    #[test]
    fn resuming_at_a_position_continues_the_same_sequence() {
        let (len, b) = (50u64, 5u64);
        let full = sampler(len, 2, 1, 0).batches(b);
        let start = sampler(len, 2, 1, 0).position_after(3, b);
        assert_eq!(sampler(len, 2, 1, start).batches(b), full[3..].to_vec());
    }

    #[test]
    fn labeled_subset_takes_per_class_and_is_deterministic() {
        let labels: Vec<i64> = (0..300)
            .map(|i| (i % 3) as i64)
            .chain(std::iter::repeat_n(3, 5))
            .collect();
        let a = labeled_subset(&labels, 10, 1);
        assert_eq!(a, labeled_subset(&labels, 10, 1));
        assert_ne!(a, labeled_subset(&labels, 10, 2));
        assert_eq!(a.len() as u64, subset_len(&[100, 100, 100, 5], 10));
        for class in 0..4 {
            let n = a.iter().filter(|&&i| labels[i as usize] == class).count();
            assert_eq!(n, if class == 3 { 5 } else { 10 });
        }
    }

    #[test]
    fn below_is_in_range() {
        let mut g = SplitMix64::new(0);
        for n in [1u64, 2, 3, 10, 1 << 40] {
            for _ in 0..1000 {
                assert!(g.below(n) < n);
            }
        }
    }
}
