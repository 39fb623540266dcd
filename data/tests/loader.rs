//! The streaming loader over a sharded split: the planned order, resume from a cursor, augmentation
//! seeded per sample, and corrupt samples or shards.

use butler_data::assign::ShardedOrder;
use butler_data::loader::{Identity, LoadedBatch, LoaderSpec, StreamLoader, ViewMaker};
use butler_data::manifest::{Manifest, ShardEntry, Split, MANIFEST_FORMAT, MANIFEST_VERSION};
use butler_data::rng::MixRng;
use butler_data::shard::{write_shard, CorruptPolicy, ShardData};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const NUMEL: usize = 6;

/// Writes a split whose sample `id` holds the values `id, id + 0.5, …`, so a batch proves its own content.
fn dataset(dir: &Path, sizes: &[u64], labels: Option<&dyn Fn(u64) -> i64>) -> Manifest {
    let mut shards = Vec::new();
    let mut id = 0u64;
    for (k, &n) in sizes.iter().enumerate() {
        let ids: Vec<u64> = (id..id + n).collect();
        let x = ids
            .iter()
            .flat_map(|&i| (0..NUMEL).map(move |j| i as f32 + j as f32 * 0.5))
            .collect();
        let y = labels.map(|f| ids.iter().map(|&i| f(i)).collect());
        let name = format!("pool-{k:05}.safetensors");
        let sha256 = write_shard(&dir.join(&name), &[NUMEL], &ShardData { x, y, ids }).unwrap();
        shards.push(ShardEntry {
            path: name,
            num_samples: n,
            sha256,
            first_id: id,
            ..entry_defaults()
        });
        id += n;
    }
    let mut splits = BTreeMap::new();
    splits.insert(
        "pool".to_string(),
        Split {
            num_samples: id,
            labeled: labels.is_some(),
            shards,
            class_counts: None,
        },
    );
    Manifest {
        format: MANIFEST_FORMAT.into(),
        version: MANIFEST_VERSION,
        name: "t".into(),
        sample_shape: vec![NUMEL],
        dtype: "f32".into(),
        classes: (0..10).map(|c| c.to_string()).collect(),
        splits,
        source: BTreeMap::new(),
    }
}

fn entry_defaults() -> ShardEntry {
    serde_json::from_str(r#"{"path":"","num_samples":0,"sha256":"","first_id":0}"#).unwrap()
}

fn spec(dir: &Path, m: &Manifest, batch: usize, policy: CorruptPolicy) -> LoaderSpec {
    LoaderSpec {
        dir: dir.to_path_buf(),
        manifest: Arc::new(m.clone()),
        split: "pool".into(),
        epoch: 3,
        batch,
        threads: 3,
        prefetch: 2,
        cache_shards: 2,
        policy,
        timeout: Duration::from_secs(20),
    }
}

/// An augmentation whose randomness comes only from (epoch, id), as the loader's contract requires.
struct Jitter;
impl ViewMaker for Jitter {
    fn num_views(&self) -> usize {
        2
    }
    fn views(&self, x: &[f32], _shape: &[usize], epoch: u64, id: u64) -> Vec<Vec<f32>> {
        (0..2)
            .map(|v| {
                let mut rng = MixRng::new(butler_common::sampler::mix(
                    butler_common::sampler::mix(epoch, id),
                    v,
                ));
                x.iter().map(|&a| a + rng.uniform() as f32).collect()
            })
            .collect()
    }
}

fn run(loader: StreamLoader) -> Vec<LoadedBatch> {
    loader.map(|b| b.unwrap()).collect()
}

#[test]
fn loader_follows_the_plan_and_covers_the_pool_once() {
    let dir = tempfile::tempdir().unwrap();
    let sizes = [17u64, 5, 0, 23, 9, 11];
    let m = dataset(dir.path(), &sizes, None);
    let world = 2;
    let order = ShardedOrder {
        shard_sizes: &sizes,
        seed: 1,
        epoch: 3,
        shuffle_window: 8,
        history: &[],
    };
    let b = 4;
    let steps = order.steps(world, b as u64);
    let mut seen = vec![0; 65];
    for rank in 0..world {
        let seq = Arc::new(order.rank_sequence(world, rank));
        let batches = run(StreamLoader::start(
            spec(dir.path(), &m, b, CorruptPolicy::Fail),
            seq.clone(),
            0,
            steps,
            Arc::new(Identity),
        )
        .unwrap());
        assert_eq!(
            batches.len() as u64,
            steps,
            "every rank runs the same number of steps"
        );
        let ids: Vec<u64> = batches.iter().flat_map(|b| b.ids.clone()).collect();
        let offsets = [0u64, 17, 22, 22, 45, 54];
        let planned: Vec<u64> = seq
            .to_vec()
            .iter()
            .map(|s| offsets[s.shard as usize] + s.index as u64)
            .collect();
        assert_eq!(ids, planned);
        for batch in &batches {
            for (i, &id) in batch.ids.iter().enumerate() {
                assert_eq!(
                    batch.views[0][i * NUMEL],
                    id as f32,
                    "sample content does not match its id"
                );
                seen[id as usize] += 1;
            }
        }
    }
    assert!(seen.iter().all(|&c| c == 1), "{seen:?}");
}

#[test]
fn resumed_stream_equals_the_uninterrupted_one_including_augmentation() {
    let dir = tempfile::tempdir().unwrap();
    let sizes = [30u64, 12, 25];
    let m = dataset(dir.path(), &sizes, None);
    let order = ShardedOrder {
        shard_sizes: &sizes,
        seed: 7,
        epoch: 3,
        shuffle_window: 16,
        history: &[],
    };
    let seq = Arc::new(order.rank_sequence(2, 1));
    let steps = order.steps(2, 5);
    let full = run(StreamLoader::start(
        spec(dir.path(), &m, 5, CorruptPolicy::Fail),
        seq.clone(),
        0,
        steps,
        Arc::new(Jitter),
    )
    .unwrap());
    let k = 3; // the job stopped after 3 steps; the cursor says so
    let resumed = run(StreamLoader::start(
        spec(dir.path(), &m, 5, CorruptPolicy::Fail),
        seq,
        k,
        steps,
        Arc::new(Jitter),
    )
    .unwrap());
    assert_eq!(resumed, full[k as usize..].to_vec());
    assert_ne!(
        full[0].views[0], full[0].views[1],
        "the two views must differ"
    );
}

#[test]
fn corrupt_sample_is_skipped_and_named_or_fails_by_policy() {
    let dir = tempfile::tempdir().unwrap();
    let sizes = [8u64, 8];
    // Sample 11 (shard 1, index 3) carries a label outside the 10 classes: a corrupt sample.
    let m = dataset(
        dir.path(),
        &sizes,
        Some(&|id| if id == 11 { 42 } else { (id % 10) as i64 }),
    );
    let order = ShardedOrder {
        shard_sizes: &sizes,
        seed: 2,
        epoch: 3,
        shuffle_window: 0,
        history: &[],
    };
    let seq = Arc::new(order.rank_sequence(1, 0));
    let steps = order.steps(1, 4);
    let batches = run(StreamLoader::start(
        spec(dir.path(), &m, 4, CorruptPolicy::Skip),
        seq.clone(),
        0,
        steps,
        Arc::new(Identity),
    )
    .unwrap());
    let skipped: Vec<_> = batches.iter().flat_map(|b| b.skipped.clone()).collect();
    assert_eq!(skipped.len(), 1);
    assert!(
        skipped[0].shard.ends_with("pool-00001.safetensors") && skipped[0].index == 3,
        "{:?}",
        skipped[0]
    );
    assert_eq!(batches.iter().map(|b| b.len()).sum::<usize>(), 15);
    assert!(batches
        .iter()
        .all(|b| b.labels.as_ref().unwrap().iter().all(|&l| l < 10)));

    let err = StreamLoader::start(
        spec(dir.path(), &m, 4, CorruptPolicy::Fail),
        seq,
        0,
        steps,
        Arc::new(Identity),
    )
    .unwrap()
    .find_map(|b| b.err())
    .expect("the Fail policy must fail the stream")
    .to_string();
    assert!(
        err.contains("pool-00001.safetensors") && err.contains("sample 3"),
        "{err}"
    );
}

#[test]
fn corrupt_shard_fails_the_stream_naming_the_file_under_any_policy() {
    let dir = tempfile::tempdir().unwrap();
    let sizes = [8u64, 8];
    let m = dataset(dir.path(), &sizes, None);
    let p = dir.path().join("pool-00000.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes.truncate(bytes.len() - 7);
    std::fs::write(&p, bytes).unwrap();
    let order = ShardedOrder {
        shard_sizes: &sizes,
        seed: 2,
        epoch: 3,
        shuffle_window: 0,
        history: &[],
    };
    let seq = Arc::new(order.rank_sequence(1, 0));
    for policy in [CorruptPolicy::Skip, CorruptPolicy::Fail] {
        let err = StreamLoader::start(
            spec(dir.path(), &m, 4, policy),
            seq.clone(),
            0,
            order.steps(1, 4),
            Arc::new(Identity),
        )
        .unwrap()
        .find_map(|b| b.err())
        .expect("a truncated shard must fail the stream")
        .to_string();
        assert!(err.contains("pool-00000.safetensors"), "{err}");
    }
}

#[test]
fn unlabeled_stream_rolls_epochs_and_resumes_from_its_cursor() {
    use butler_data::streams::{Cursor, UnlabeledStream};
    let dir = tempfile::tempdir().unwrap();
    let sizes = [13u64, 9, 20];
    let m = dataset(dir.path(), &sizes, None);
    let stream = |from| {
        UnlabeledStream::new(
            spec(dir.path(), &m, 4, CorruptPolicy::Fail),
            5,
            8,
            2,
            0,
            Arc::new(Jitter),
            from,
            Vec::new(),
        )
        .unwrap()
    };
    let mut s = stream(Cursor::default());
    // Rank 0 of 2 holds 21 of the 42 samples: 6 steps of 4 per epoch (the last one short).
    let mut per_epoch: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let mut batches = Vec::new();
    for _ in 0..15 {
        let epoch = s.cursor().epoch + u64::from(s.cursor().step == 6);
        let (b, _) = s.next_batch().unwrap();
        per_epoch
            .entry(epoch)
            .or_default()
            .extend(b.ids.iter().copied());
        batches.push(b);
    }
    assert_eq!(s.cursor(), Cursor { epoch: 2, step: 3 });
    for epoch in [0, 1] {
        let mut ids = per_epoch[&epoch].clone();
        assert_eq!(ids.len(), 21, "epoch {epoch}");
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 21, "a sample repeated within epoch {epoch}");
    }
    assert_ne!(
        batches[0].ids, batches[6].ids,
        "each epoch has its own order"
    );
    // Resume mid-epoch 1 from a cursor: the same batches follow.
    let mut resumed = stream(Cursor { epoch: 1, step: 2 });
    for want in &batches[8..15] {
        assert_eq!(&resumed.next_batch().unwrap().0, want);
    }
}
