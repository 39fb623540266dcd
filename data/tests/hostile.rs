//! Hostile input never panics (issue 14): the manifest, safetensors and tar shard readers answer any
//! damage to a valid file with a value or an error — never a panic, never an allocation sized by a
//! length field. The same entry points are the `fuzz/` crate's targets (docs/fuzzing.md).

use butler_common::hostile::{mutated, mutated_text};
use butler_data::manifest::{Manifest, ShardEntry, ShardFormat, MAX_SAMPLE_NUMEL};
use butler_data::shard::{parse_shard, write_shard, CorruptPolicy, ShardData};
use butler_data::webdataset::TarShardWriter;
use proptest::prelude::*;
use std::path::Path;

const MANIFEST: &str = r#"{
  "format": "butler-shards", "version": 1, "name": "t", "sample_shape": [1, 3, 3], "dtype": "f32",
  "classes": ["a", "b", "c"],
  "splits": {
    "train": {"num_samples": 3, "labeled": true, "class_counts": [1, 1, 1],
              "shards": [{"path": "train-00000.safetensors", "num_samples": 3, "sha256": "00", "first_id": 0}]},
    "pool": {"num_samples": 2, "labeled": false,
             "shards": [{"path": "pool-00000.tar", "format": "tar", "num_samples": 2, "sha256": "00", "first_id": 3}]}
  },
  "source": {"generator": "test"}
}"#;

fn manifest(shape: Vec<usize>, entry: &ShardEntry) -> Manifest {
    Manifest::single_shard(shape, 3, entry.clone(), true)
}

fn entry(format: ShardFormat, n: u64) -> ShardEntry {
    ShardEntry {
        path: "s".into(),
        format,
        num_samples: n,
        sha256: String::new(),
        first_id: 10,
    }
}

fn safetensors_shard(n: usize) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.safetensors");
    let data = ShardData {
        x: (0..n * 3).map(|v| v as f32).collect(),
        y: Some((0..n as i64).map(|i| i % 3).collect()),
        ids: (10..10 + n as u64).collect(),
    };
    write_shard(&path, &[3], &data).unwrap();
    std::fs::read(path).unwrap()
}

fn png(seed: u8) -> Vec<u8> {
    let raw: Vec<u8> = (0..9u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(seed))
        .collect();
    let mut out = Vec::new();
    let enc = image::codecs::png::PngEncoder::new(&mut out);
    image::ImageEncoder::write_image(enc, &raw, 3, 3, image::ExtendedColorType::L8).unwrap();
    out
}

fn tar_shard(n: usize) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.tar");
    let mut w = TarShardWriter::create(&path).unwrap();
    for i in 0..n {
        w.append(&format!("{i:04}"), "png", &png(i as u8), Some(i as i64 % 3))
            .unwrap();
    }
    w.finish().unwrap();
    std::fs::read(path).unwrap()
}

fn policy(skip: bool) -> CorruptPolicy {
    if skip {
        CorruptPolicy::Skip
    } else {
        CorruptPolicy::Fail
    }
}

#[test]
fn the_valid_inputs_parse() {
    let m = Manifest::parse(MANIFEST, Path::new("m.json")).unwrap();
    assert_eq!(m.sample_numel(), 9);
    let e = entry(ShardFormat::Safetensors, 2);
    let (d, _) = parse_shard(
        Path::new("s"),
        &safetensors_shard(2),
        &manifest(vec![3], &e),
        &e,
        true,
        CorruptPolicy::Fail,
    )
    .unwrap();
    assert_eq!(d.ids, vec![10, 11]);
    let e = entry(ShardFormat::Tar, 2);
    let (d, _) = parse_shard(
        Path::new("s"),
        &tar_shard(2),
        &manifest(vec![1, 3, 3], &e),
        &e,
        true,
        CorruptPolicy::Fail,
    )
    .unwrap();
    assert_eq!((d.ids, d.y), (vec![10, 11], Some(vec![0, 1])));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    // A damaged manifest: an error naming the file, or a manifest whose sizes are bounded and which
    // re-parses to itself.
    #[test]
    fn manifest_text_never_panics(text in mutated_text(MANIFEST.to_string())) {
        match Manifest::parse(&text, Path::new("m.json")) {
            Ok(m) => {
                prop_assert!(m.sample_numel() <= MAX_SAMPLE_NUMEL);
                let again = serde_json::to_string(&m).unwrap();
                prop_assert_eq!(Manifest::parse(&again, Path::new("m.json")).unwrap(), m);
            }
            Err(e) => prop_assert!(e.to_string().contains("m.json"), "{}", e),
        }
    }

    // A damaged safetensors shard, read as labeled or not, under either policy.
    #[test]
    fn safetensors_shard_bytes_never_panic(
        (n, bytes) in (0..4usize).prop_flat_map(|n| (Just(n), mutated(safetensors_shard(n)))),
        claimed in 0..5u64,
        labeled in any::<bool>(),
        skip in any::<bool>(),
    ) {
        let e = entry(ShardFormat::Safetensors, if claimed == 4 { n as u64 } else { claimed });
        let m = manifest(vec![3], &e);
        if let Ok((d, skipped)) = parse_shard(Path::new("s"), &bytes, &m, &e, labeled, policy(skip)) {
            prop_assert_eq!(d.x.len(), d.ids.len() * 3);
            prop_assert_eq!(d.ids.len() + skipped.len(), e.num_samples as usize);
        }
    }

    // A damaged WebDataset tar shard (headers, sizes, PNG chunks, labels).
    #[test]
    fn tar_shard_bytes_never_panic(
        (n, bytes) in (0..3usize).prop_flat_map(|n| (Just(n), mutated(tar_shard(n)))),
        labeled in any::<bool>(),
        skip in any::<bool>(),
    ) {
        let e = entry(ShardFormat::Tar, n as u64);
        let m = manifest(vec![1, 3, 3], &e);
        if let Ok((d, skipped)) = parse_shard(Path::new("s"), &bytes, &m, &e, labeled, policy(skip)) {
            prop_assert_eq!(d.x.len(), d.ids.len() * 9);
            prop_assert_eq!(d.ids.len() + skipped.len(), n);
        }
    }
}
