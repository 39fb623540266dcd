//! The streaming loader: background threads read shards, pick this rank's samples in its planned order
//! (`crate::assign`), make the augmented views, and hand finished batches to the training
//! thread ahead of the step — with bounded memory whatever the size of the pool.
//!
//! Memory is bounded by `cache_shards` decoded shards plus `threads × prefetch` batches. Batches come out in
//! step order: thread `t` builds steps `t, t + T, …` into its own bounded channel and the consumer reads
//! the channels round-robin. Loader threads never touch libtorch; the training thread turns a batch into
//! tensors.
//!
//! A corrupt sample is skipped and reported in its batch (policy `Skip`, the training thread logs a
//! warning naming shard and index) or fails the stream (policy `Fail`); a corrupt or truncated shard always
//! fails it, with an error naming the file.

use crate::assign::RankSequence;
use crate::manifest::Manifest;
use crate::shard::{read_shard_checked, CorruptPolicy, ShardData, SkippedSample};
use crate::{Error, Result};
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

/// Makes the views a method trains on from one raw sample: one view (identity), weak/strong for
/// consistency methods, two views for contrastive ones. Randomness must come from (epoch, id) only, so
/// any batch can be reproduced whichever thread or worker builds it.
pub trait ViewMaker: Send + Sync {
    fn num_views(&self) -> usize;
    fn views(&self, x: &[f32], shape: &[usize], epoch: u64, id: u64) -> Vec<Vec<f32>>;
}

/// The raw sample as the only view.
pub struct Identity;

impl ViewMaker for Identity {
    fn num_views(&self) -> usize {
        1
    }
    fn views(&self, x: &[f32], _shape: &[usize], _epoch: u64, _id: u64) -> Vec<Vec<f32>> {
        vec![x.to_vec()]
    }
}

#[derive(Clone, Debug)]
pub struct LoaderSpec {
    /// The manifest's directory (shard paths are relative to it).
    pub dir: PathBuf,
    pub manifest: Arc<Manifest>,
    pub split: String,
    pub epoch: u64,
    /// Per-rank batch size.
    pub batch: usize,
    pub threads: usize,
    /// Batches each thread may build ahead.
    pub prefetch: usize,
    /// Decoded shards kept in memory.
    pub cache_shards: usize,
    pub policy: CorruptPolicy,
    /// How long the consumer waits for a batch before declaring the loader stuck.
    pub timeout: Duration,
}

/// One step's samples on this rank, as flat f32 views.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadedBatch {
    pub step: u64,
    pub ids: Vec<u64>,
    /// Present for labeled splits.
    pub labels: Option<Vec<i64>>,
    /// `views[v]` holds view `v` of every sample, concatenated (`len() × sample numel` values).
    pub views: Vec<Vec<f32>>,
    /// Samples of this batch that were corrupt and left out.
    pub skipped: Vec<SkippedSample>,
}

impl LoadedBatch {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// A decoded shard plus where each original sample index landed (samples may have been skipped).
struct CachedShard {
    data: ShardData,
    first_id: u64,
    position: HashMap<u64, usize>,
    skipped: HashMap<usize, SkippedSample>,
}

type Slot = Arc<OnceLock<std::result::Result<Arc<CachedShard>, String>>>;

/// Least-recently-used cache of decoded shards shared by the loader threads; each shard is read once even
/// when several threads want it at the same time.
struct ShardCache {
    spec: LoaderSpec,
    labeled: bool,
    inner: Mutex<(HashMap<u32, Slot>, VecDeque<u32>)>,
}

impl ShardCache {
    fn get(&self, shard: u32) -> Result<Arc<CachedShard>> {
        let slot = {
            let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            let (map, lru) = &mut *guard;
            let slot = map.entry(shard).or_default().clone();
            lru.retain(|&s| s != shard);
            lru.push_back(shard);
            while lru.len() > self.spec.cache_shards.max(1) {
                if let Some(old) = lru.pop_front() {
                    map.remove(&old);
                }
            }
            slot
        };
        let loaded = slot.get_or_init(|| self.read(shard).map(Arc::new).map_err(|e| e.to_string()));
        loaded.clone().map_err(Error::Loader)
    }

    fn read(&self, shard: u32) -> Result<CachedShard> {
        let split = self
            .spec
            .manifest
            .splits
            .get(&self.spec.split)
            .ok_or_else(|| Error::Loader(format!("no split {:?}", self.spec.split)))?;
        let entry = split.shards.get(shard as usize).ok_or_else(|| {
            Error::Loader(format!("split {:?} has no shard #{shard}", self.spec.split))
        })?;
        let (data, skipped) = read_shard_checked(
            &self.spec.dir,
            &self.spec.manifest,
            entry,
            self.labeled,
            self.spec.policy,
        )?;
        let position = data
            .ids
            .iter()
            .enumerate()
            .filter_map(|(pos, &id)| Some((id.checked_sub(entry.first_id)?, pos)))
            .collect();
        let skipped = skipped.into_iter().map(|s| (s.index, s)).collect();
        Ok(CachedShard {
            data,
            first_id: entry.first_id,
            position,
            skipped,
        })
    }
}

pub struct StreamLoader {
    receivers: Vec<Receiver<Result<LoadedBatch>>>,
    next: u64,
    from: u64,
    end: u64,
    timeout: Duration,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl StreamLoader {
    /// Streams steps `from..steps` of this rank's `sequence` (step `k` = `sequence[k·b..(k+1)·b]`,
    /// short or empty at the end).
    pub fn start(
        spec: LoaderSpec,
        sequence: Arc<RankSequence>,
        from: u64,
        steps: u64,
        views: Arc<dyn ViewMaker>,
    ) -> Result<StreamLoader> {
        let labeled = spec
            .manifest
            .splits
            .get(&spec.split)
            .map(|s| s.labeled)
            .ok_or_else(|| Error::Loader(format!("no split {:?} in the manifest", spec.split)))?;
        let threads_n = spec.threads.max(1);
        let stop = Arc::new(AtomicBool::new(false));
        let cache = Arc::new(ShardCache {
            spec: spec.clone(),
            labeled,
            inner: Mutex::new((HashMap::new(), VecDeque::new())),
        });
        let mut receivers = Vec::with_capacity(threads_n);
        let mut threads = Vec::with_capacity(threads_n);
        for t in 0..threads_n as u64 {
            let (tx, rx) = sync_channel(spec.prefetch.max(1));
            receivers.push(rx);
            let (cache, sequence, views, stop) =
                (cache.clone(), sequence.clone(), views.clone(), stop.clone());
            let spec = spec.clone();
            let handle = std::thread::Builder::new()
                .name(format!("loader-{t}"))
                .spawn(move || {
                    let mut step = from + t;
                    while step < steps && !stop.load(Ordering::Relaxed) {
                        let batch = build(&spec, &cache, &sequence, step, views.as_ref(), labeled);
                        let failed = batch.is_err();
                        if tx.send(batch).is_err() || failed {
                            return;
                        }
                        step += threads_n as u64;
                    }
                })
                .map_err(|e| Error::Loader(format!("cannot start a loader thread: {e}")))?;
            threads.push(handle);
        }
        Ok(StreamLoader {
            receivers,
            next: from,
            from,
            end: steps,
            timeout: spec.timeout,
            stop,
            threads,
        })
    }
}

fn build(
    spec: &LoaderSpec,
    cache: &ShardCache,
    sequence: &RankSequence,
    step: u64,
    views: &dyn ViewMaker,
    labeled: bool,
) -> Result<LoadedBatch> {
    let b = spec.batch as u64;
    let refs = sequence.slice(
        step.saturating_mul(b),
        step.saturating_mul(b).saturating_add(b),
    );
    let shape = &spec.manifest.sample_shape;
    let numel = spec.manifest.sample_numel();
    let mut out = LoadedBatch {
        step,
        ids: Vec::with_capacity(refs.len()),
        labels: labeled.then(Vec::new),
        views: vec![Vec::with_capacity(refs.len() * numel); views.num_views()],
        skipped: Vec::new(),
    };
    for s in &refs {
        let shard = cache.get(s.shard)?;
        let Some(&pos) = shard.position.get(&(s.index as u64)) else {
            // Only a sample the reader skipped under the Skip policy may be absent; anything else means
            // the shard does not hold what the manifest says, which must not pass silently.
            match shard.skipped.get(&(s.index as usize)) {
                Some(reason) => out.skipped.push(reason.clone()),
                None => {
                    return Err(Error::Loader(format!(
                        "shard #{} of split {:?} has no sample {} although the manifest lists it",
                        s.shard, spec.split, s.index
                    )))
                }
            }
            continue;
        };
        let id = shard.first_id + s.index as u64;
        let x = &shard.data.x[pos * numel..(pos + 1) * numel];
        for (v, view) in views
            .views(x, shape, spec.epoch, id)
            .into_iter()
            .enumerate()
        {
            out.views[v].extend_from_slice(&view);
        }
        out.ids.push(id);
        if let (Some(labels), Some(y)) = (out.labels.as_mut(), shard.data.y.as_ref()) {
            labels.push(y[pos]);
        }
    }
    Ok(out)
}

impl Iterator for StreamLoader {
    type Item = Result<LoadedBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.end {
            return None;
        }
        let rx = &self.receivers[((self.next - self.from) % self.receivers.len() as u64) as usize];
        self.next += 1;
        Some(match rx.recv_timeout(self.timeout) {
            Ok(batch) => batch,
            Err(RecvTimeoutError::Timeout) => Err(Error::Loader(format!(
                "the data loader produced no batch within {:?}",
                self.timeout
            ))),
            Err(RecvTimeoutError::Disconnected) => Err(Error::Loader(
                "a data loader thread stopped unexpectedly".into(),
            )),
        })
    }
}

impl Drop for StreamLoader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receivers unblocks threads waiting to send; then they see `stop` and exit.
        self.receivers.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Weak and strong views (consistency methods: UDA, FixMatch), seeded per (job seed, epoch, sample id).
pub struct WeakStrongViews {
    pub seed: u64,
    pub aug: crate::augment::WeakStrong,
}

impl ViewMaker for WeakStrongViews {
    fn num_views(&self) -> usize {
        2
    }
    fn views(&self, x: &[f32], shape: &[usize], epoch: u64, id: u64) -> Vec<Vec<f32>> {
        let (weak, strong) = self.aug.views(
            x,
            shape,
            crate::augment::SampleKey::new(self.seed, epoch, id),
        );
        vec![weak, strong]
    }
}

/// One augmented view per sample (the distillation stage's student input), view `view` of the sample's
/// generator seeded per (job seed, epoch, id).
pub struct OneView {
    pub seed: u64,
    pub pipeline: crate::augment::Pipeline,
    pub view: u64,
}

impl ViewMaker for OneView {
    fn num_views(&self) -> usize {
        1
    }
    fn views(&self, x: &[f32], shape: &[usize], epoch: u64, id: u64) -> Vec<Vec<f32>> {
        vec![self.pipeline.apply_seeded(
            x,
            shape,
            crate::augment::SampleKey::new(self.seed, epoch, id),
            self.view,
        )]
    }
}

/// Two independently augmented views (contrastive methods: SimCLR), seeded per (job seed, epoch, id).
pub struct ContrastiveViews {
    pub seed: u64,
    pub aug: crate::augment::TwoViews,
}

impl ViewMaker for ContrastiveViews {
    fn num_views(&self) -> usize {
        2
    }
    fn views(&self, x: &[f32], shape: &[usize], epoch: u64, id: u64) -> Vec<Vec<f32>> {
        let (a, b) = self.aug.views(
            x,
            shape,
            crate::augment::SampleKey::new(self.seed, epoch, id),
        );
        vec![a, b]
    }
}

#[cfg(test)]
mod one_view_tests {
    use super::*;
    use crate::augment::{Pipeline, SampleKey, WeakStrong};

    #[test]
    fn one_view_is_the_seeded_pipeline_view_and_varies_with_the_sample() {
        let x: Vec<f32> = (0..40).map(|i| (i as f32 * 0.3).sin()).collect();
        let aug = WeakStrong::default_1d(40);
        let v = OneView {
            seed: 7,
            pipeline: aug.strong,
            view: 2,
        };
        assert_eq!(v.num_views(), 1);
        let a = v.views(&x, &[40], 3, 11);
        assert_eq!(a.len(), 1);
        assert_eq!(
            a[0],
            v.pipeline
                .apply_seeded(&x, &[40], SampleKey::new(7, 3, 11), 2)
        );
        assert_ne!(a[0], x, "the strong pipeline changes the sample");
        assert_eq!(v.views(&x, &[40], 3, 11), a, "reproducible");
        assert_ne!(
            v.views(&x, &[40], 3, 12),
            a,
            "another sample id, another draw"
        );
        assert_ne!(v.views(&x, &[40], 4, 11), a, "another epoch, another draw");
        let clean = OneView {
            seed: 7,
            pipeline: Pipeline::new(),
            view: 2,
        };
        assert_eq!(clean.views(&x, &[40], 3, 11), vec![x.clone()]);
    }
}
