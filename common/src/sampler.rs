//! The data order, as a pure function of (seed, epoch, world size): `torch.utils.data.DistributedSampler`
//! semantics with butler's own seeded permutation, so that the coordinator, every worker and any resumed
//! run compute the same order without ever exchanging index lists.
//!
//! The permutation of `0..len` for an epoch is a Fisher–Yates shuffle driven by SplitMix64 seeded with
//! `mix(seed, epoch)`. It is padded by wrapping around to a multiple of the world size (every rank gets the
//! same number of samples, as DistributedSampler does), and rank `r` takes positions `r, r + w, r + 2w, …`.
//! With a per-rank batch of `b`, step `k` of all ranks together covers global positions
//! `k·b·w .. (k+1)·b·w` — exactly the batch a single worker with batch `b·w` takes at step `k`, which is
//! what makes data-parallel training equal to single-process training.

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
}

impl DistributedSampler {
    /// ceil(len / world): every rank takes the same number of samples.
    pub fn samples_per_rank(&self) -> u64 {
        self.dataset_len.div_ceil(self.world_size.max(1) as u64)
    }

    /// This rank's sample indices for the epoch, starting at `cursor` (a position in this rank's own
    /// sequence, so that a resumed run continues where it stopped).
    pub fn indices_from(&self, cursor: u64) -> Vec<u64> {
        if self.dataset_len == 0 {
            return Vec::new();
        }
        let perm = epoch_permutation(self.dataset_len, self.seed, self.epoch, self.shuffle);
        let w = self.world_size as u64;
        let total = self.samples_per_rank() * w;
        (cursor..self.samples_per_rank())
            .map(|i| i * w + self.rank as u64)
            .map(|pos| perm[(pos % total.max(1) % self.dataset_len) as usize])
            .collect()
    }

    pub fn indices(&self) -> Vec<u64> {
        self.indices_from(0)
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
    use std::collections::BTreeMap;

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

    #[test]
    fn ranks_cover_every_sample_with_equal_counts() {
        for world in 1..=4u32 {
            for len in [1u64, 2, 3, 7, 100, 101] {
                let mut seen = BTreeMap::new();
                let mut counts = Vec::new();
                for rank in 0..world {
                    let s = DistributedSampler {
                        dataset_len: len,
                        seed: 3,
                        epoch: 2,
                        shuffle: true,
                        world_size: world,
                        rank,
                    };
                    let idx = s.indices();
                    counts.push(idx.len());
                    for i in idx {
                        *seen.entry(i).or_insert(0) += 1;
                    }
                }
                assert!(
                    counts.iter().all(|&c| c == counts[0]),
                    "unequal counts {counts:?}"
                );
                assert_eq!(seen.len() as u64, len, "world {world} len {len}");
                let padding: u64 = seen.values().map(|&c| c - 1).sum();
                assert!(
                    padding < world as u64,
                    "padding {padding} for world {world} len {len}"
                );
            }
        }
    }

    #[test]
    fn per_rank_batches_union_to_the_single_worker_batch() {
        let (len, world, b) = (96u64, 3u32, 4usize);
        let single = DistributedSampler {
            dataset_len: len,
            seed: 1,
            epoch: 5,
            shuffle: true,
            world_size: 1,
            rank: 0,
        }
        .indices();
        let per_rank: Vec<Vec<u64>> = (0..world)
            .map(|rank| {
                DistributedSampler {
                    dataset_len: len,
                    seed: 1,
                    epoch: 5,
                    shuffle: true,
                    world_size: world,
                    rank,
                }
                .indices()
            })
            .collect();
        for step in 0..(len as usize / (b * world as usize)) {
            let mut union: Vec<u64> = per_rank
                .iter()
                .flat_map(|r| r[step * b..(step + 1) * b].to_vec())
                .collect();
            let mut want =
                single[step * b * world as usize..(step + 1) * b * world as usize].to_vec();
            union.sort();
            want.sort();
            assert_eq!(union, want, "step {step}");
        }
    }

    #[test]
    fn cursor_resumes_the_same_sequence() {
        let s = DistributedSampler {
            dataset_len: 50,
            seed: 9,
            epoch: 1,
            shuffle: true,
            world_size: 2,
            rank: 1,
        };
        assert_eq!(s.indices()[10..], s.indices_from(10)[..]);
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
