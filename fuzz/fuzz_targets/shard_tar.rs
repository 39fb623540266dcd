#![no_main]
//! See docs/fuzzing.md: run with `scripts/fuzz.sh` (bounded) or `cargo +nightly fuzz run TARGET`.
use butler_data::manifest::{
    Manifest, ShardEntry, ShardFormat, Split, MANIFEST_FORMAT, MANIFEST_VERSION,
};
use butler_data::shard::{parse_shard, CorruptPolicy};
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;
use std::path::Path;

fn manifest(shape: Vec<usize>, entry: &ShardEntry) -> Manifest {
    let mut splits = BTreeMap::new();
    splits.insert(
        "train".to_string(),
        Split {
            num_samples: entry.num_samples,
            labeled: true,
            shards: vec![entry.clone()],
            class_counts: None,
        },
    );
    Manifest {
        format: MANIFEST_FORMAT.into(),
        version: MANIFEST_VERSION,
        name: "fuzz".into(),
        sample_shape: shape,
        dtype: "f32".into(),
        classes: vec!["a".into(), "b".into(), "c".into()],
        splits,
        source: BTreeMap::new(),
    }
}

// The first byte picks the sample count, labeled and policy; the rest is the tar.
fuzz_target!(|data: &[u8]| {
    let Some((&ctl, bytes)) = data.split_first() else {
        return;
    };
    let entry = ShardEntry {
        path: "s.tar".into(),
        format: ShardFormat::Tar,
        num_samples: (ctl & 0x0f) as u64,
        sha256: String::new(),
        first_id: 100,
    };
    let m = manifest(vec![1, 3, 3], &entry);
    let policy = if ctl & 0x20 == 0 {
        CorruptPolicy::Fail
    } else {
        CorruptPolicy::Skip
    };
    if let Ok((d, skipped)) =
        parse_shard(Path::new("s"), bytes, &m, &entry, ctl & 0x10 != 0, policy)
    {
        assert_eq!(d.x.len(), d.ids.len() * 9);
        assert_eq!(d.ids.len() + skipped.len(), entry.num_samples as usize);
    }
});
