//! butler's native shard: one safetensors file holding `x` (f32, `[n, ...sample_shape]`), `id` (u64, `[n]`,
//! stable per-sample ids) and, for labeled splits, `y` (i64, `[n]`). Reading also dispatches to the
//! WebDataset tar shards of [`crate::webdataset`], and applies the corrupt-sample policy.

use crate::manifest::{Manifest, ShardEntry, ShardFormat};
pub use crate::samples::{CorruptPolicy, ShardData, SkippedSample};
use crate::{Error, Result};
use butler_common::fsutil;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use sha2::{Digest, Sha256};
use std::path::Path;

fn to_le_bytes<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    v.iter().flat_map(|&e| f(e)).collect()
}

/// Writes one shard atomically and returns its hex SHA-256.
pub fn write_shard(path: &Path, sample_shape: &[usize], data: &ShardData) -> Result<String> {
    let n = data.len();
    let numel: usize = sample_shape.iter().product();
    if data.x.len() != n * numel {
        return Err(Error::Shard {
            path: path.into(),
            message: format!("x has {} values, expected {n}×{numel}", data.x.len()),
        });
    }
    let mut x_shape = vec![n];
    x_shape.extend_from_slice(sample_shape);
    let x_bytes = to_le_bytes(&data.x, f32::to_le_bytes);
    let id_bytes = to_le_bytes(&data.ids, u64::to_le_bytes);
    let y_bytes = data.y.as_ref().map(|y| to_le_bytes(y, i64::to_le_bytes));
    fn view<'a>(
        path: &Path,
        dtype: Dtype,
        shape: Vec<usize>,
        bytes: &'a [u8],
    ) -> Result<TensorView<'a>> {
        TensorView::new(dtype, shape, bytes).map_err(|e| Error::Shard {
            path: path.into(),
            message: e.to_string(),
        })
    }
    let mut tensors = vec![
        ("x".to_string(), view(path, Dtype::F32, x_shape, &x_bytes)?),
        (
            "id".to_string(),
            view(path, Dtype::U64, vec![n], &id_bytes)?,
        ),
    ];
    if let Some(y) = &y_bytes {
        tensors.push(("y".to_string(), view(path, Dtype::I64, vec![n], y)?));
    }
    let bytes = safetensors::serialize(tensors, None).map_err(|e| Error::Shard {
        path: path.into(),
        message: e.to_string(),
    })?;
    fsutil::write_atomic(path, &bytes)?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

/// Reads one shard listed in `manifest`, verifying its checksum, tensor names, dtypes and shapes.
/// Every error names the shard file. A corrupt sample is an error (see [`read_shard_checked`]).
pub fn read_shard(
    dir: &Path,
    manifest: &Manifest,
    entry: &ShardEntry,
    labeled: bool,
) -> Result<ShardData> {
    read_shard_checked(dir, manifest, entry, labeled, CorruptPolicy::Fail).map(|(d, _)| d)
}

/// Reads one shard of either format (safetensors or WebDataset tar, as the entry says), verifying
/// its checksum against the manifest first. Corrupt samples are handled by `policy`; the skipped ones
/// are returned (always empty under [`CorruptPolicy::Fail`]). The kept samples keep their ids.
pub fn read_shard_checked(
    dir: &Path,
    manifest: &Manifest,
    entry: &ShardEntry,
    labeled: bool,
    policy: CorruptPolicy,
) -> Result<(ShardData, Vec<SkippedSample>)> {
    let path = dir.join(&entry.path);
    let bytes = read_verified(&path, entry)?;
    parse_shard(&path, &bytes, manifest, entry, labeled, policy)
}

/// Parses a shard's bytes (of the entry's format) without touching the file system or the checksum:
/// what [`read_shard_checked`] does after verifying the file. `path` is only for messages. Hostile
/// bytes give an error, never a panic or an allocation sized by a length field.
pub fn parse_shard(
    path: &Path,
    bytes: &[u8],
    manifest: &Manifest,
    entry: &ShardEntry,
    labeled: bool,
    policy: CorruptPolicy,
) -> Result<(ShardData, Vec<SkippedSample>)> {
    if entry.first_id.checked_add(entry.num_samples).is_none() {
        return Err(Error::Shard {
            path: path.to_path_buf(),
            message: "first_id + num_samples is past 2^64".into(),
        });
    }
    match entry.format {
        ShardFormat::Safetensors => read_safetensors(path, bytes, manifest, entry, labeled, policy),
        ShardFormat::Tar => {
            crate::webdataset::read_tar_shard(path, bytes, manifest, entry, labeled, policy)
        }
    }
}

/// The shard's bytes, once their SHA-256 matches the manifest's.
fn read_verified(path: &Path, entry: &ShardEntry) -> Result<Vec<u8>> {
    let bad = |message: String| Error::Shard {
        path: path.to_path_buf(),
        message,
    };
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(bad("listed in the manifest but missing on disk".into()))
        }
        Err(e) => return Err(bad(format!("cannot read: {e}"))),
    };
    let digest = hex::encode(Sha256::digest(&bytes));
    if digest != entry.sha256 {
        return Err(bad(format!(
            "checksum mismatch: manifest says {}, file has {digest} (corrupt or replaced)",
            entry.sha256
        )));
    }
    Ok(bytes)
}

fn read_safetensors(
    path: &Path,
    bytes: &[u8],
    manifest: &Manifest,
    entry: &ShardEntry,
    labeled: bool,
    policy: CorruptPolicy,
) -> Result<(ShardData, Vec<SkippedSample>)> {
    let bad = |message: String| Error::Shard {
        path: path.to_path_buf(),
        message,
    };
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    let n = entry.num_samples as usize;
    let tensor = |name: &str, dtype: Dtype, shape: &[usize]| -> Result<Vec<u8>> {
        let t = st
            .tensor(name)
            .map_err(|_| bad(format!("has no tensor {name:?}")))?;
        if t.dtype() != dtype || t.shape() != shape {
            return Err(bad(format!(
                "tensor {name:?} is {:?}{:?}, expected {dtype:?}{shape:?}",
                t.dtype(),
                t.shape()
            )));
        }
        Ok(t.data().to_vec())
    };
    let mut x_shape = vec![n];
    x_shape.extend_from_slice(&manifest.sample_shape);
    let mut x: Vec<f32> = tensor("x", Dtype::F32, &x_shape)?
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("chunks_exact(4) yields 4 bytes")))
        .collect();
    let mut ids: Vec<u64> = tensor("id", Dtype::U64, &[n])?
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("chunks_exact(8) yields 8 bytes")))
        .collect();
    // The manifest promises sample i of the shard has id first_id + i; readers index by it.
    if let Some(i) = (0..n).find(|&i| entry.first_id.checked_add(i as u64) != Some(ids[i])) {
        return Err(bad(format!(
            "sample {i} has id {} but the manifest's first_id {} says {}",
            ids[i],
            entry.first_id,
            entry.first_id.saturating_add(i as u64)
        )));
    }
    if !labeled {
        return Ok((ShardData { x, y: None, ids }, Vec::new()));
    }
    let mut y: Vec<i64> = tensor("y", Dtype::I64, &[n])?
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("chunks_exact(8) yields 8 bytes")))
        .collect();
    let k = manifest.num_classes() as i64;
    let bad_rows: Vec<usize> = (0..n).filter(|&i| y[i] < 0 || y[i] >= k).collect();
    let mut skipped = Vec::new();
    if let Some(&first) = bad_rows.first() {
        if policy == CorruptPolicy::Fail {
            return Err(bad(format!(
                "sample {first}: label {} outside 0..{k}",
                y[first]
            )));
        }
        let numel = manifest.sample_numel();
        let (mut kx, mut ky, mut kid) = (Vec::new(), Vec::new(), Vec::new());
        let mut next_bad = bad_rows.iter().peekable();
        for i in 0..n {
            if next_bad.next_if_eq(&&i).is_some() {
                skipped.push(SkippedSample {
                    shard: path.to_path_buf(),
                    index: i,
                    reason: format!("label {} outside 0..{k}", y[i]),
                });
                continue;
            }
            kx.extend_from_slice(&x[i * numel..(i + 1) * numel]);
            ky.push(y[i]);
            kid.push(ids[i]);
        }
        (x, y, ids) = (kx, ky, kid);
    }
    Ok((ShardData { x, y: Some(y), ids }, skipped))
}

/// Reads every shard of a split into memory, in manifest order; a corrupt sample is an error.
pub fn read_split(manifest_file: &Path, manifest: &Manifest, split: &str) -> Result<ShardData> {
    read_split_checked(manifest_file, manifest, split, CorruptPolicy::Fail).map(|(d, _)| d)
}

/// Reads every shard of a split into memory, in manifest order, handling corrupt samples by `policy`
/// and returning the skipped ones.
pub fn read_split_checked(
    manifest_file: &Path,
    manifest: &Manifest,
    split: &str,
    policy: CorruptPolicy,
) -> Result<(ShardData, Vec<SkippedSample>)> {
    let dir = manifest_file.parent().unwrap_or(Path::new("."));
    let s = manifest.split(split, manifest_file)?;
    let mut out = ShardData {
        y: s.labeled.then(Vec::new),
        ..Default::default()
    };
    let mut skipped = Vec::new();
    for entry in &s.shards {
        let (d, sk) = read_shard_checked(dir, manifest, entry, s.labeled, policy)?;
        out.x.extend_from_slice(&d.x);
        out.ids.extend_from_slice(&d.ids);
        if let (Some(all), Some(y)) = (out.y.as_mut(), d.y) {
            all.extend(y);
        }
        skipped.extend(sk);
    }
    Ok((out, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest_for(entry: ShardEntry) -> Manifest {
        Manifest::single_shard(vec![3], 2, entry, true)
    }

    fn sample() -> ShardData {
        ShardData {
            x: (0..6).map(|v| v as f32).collect(),
            y: Some(vec![0, 1]),
            ids: vec![10, 11],
        }
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let sha = write_shard(&dir.path().join("s0.safetensors"), &[3], &sample()).unwrap();
        let entry = ShardEntry {
            path: "s0.safetensors".into(),
            format: ShardFormat::Safetensors,
            num_samples: 2,
            sha256: sha,
            first_id: 10,
        };
        let m = manifest_for(entry.clone());
        assert_eq!(read_shard(dir.path(), &m, &entry, true).unwrap(), sample());
    }

    #[test]
    fn ids_that_disagree_with_first_id_name_the_shard() {
        let dir = tempfile::tempdir().unwrap();
        let sha = write_shard(&dir.path().join("s0.safetensors"), &[3], &sample()).unwrap();
        // The shard stores ids 10, 11; a manifest claiming first_id 12 is inconsistent.
        let entry = ShardEntry {
            path: "s0.safetensors".into(),
            format: ShardFormat::Safetensors,
            num_samples: 2,
            sha256: sha,
            first_id: 12,
        };
        let m = manifest_for(entry.clone());
        let e = read_shard(dir.path(), &m, &entry, true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("s0.safetensors") && e.contains("sample 0 has id 10"),
            "{e}"
        );
    }

    #[test]
    fn missing_corrupt_and_misshapen_shards_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let sha = write_shard(&dir.path().join("s0.safetensors"), &[3], &sample()).unwrap();
        let entry = ShardEntry {
            path: "s0.safetensors".into(),
            format: ShardFormat::Safetensors,
            num_samples: 2,
            sha256: sha.clone(),
            first_id: 10,
        };
        let m = manifest_for(entry.clone());

        let missing = ShardEntry {
            path: "gone.safetensors".into(),
            ..entry.clone()
        };
        let e = read_shard(dir.path(), &m, &missing, true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("gone.safetensors") && e.contains("missing"),
            "{e}"
        );

        let p = dir.path().join("s0.safetensors");
        let mut bytes = std::fs::read(&p).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&p, &bytes).unwrap();
        let e = read_shard(dir.path(), &m, &entry, true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("s0.safetensors") && e.contains("checksum mismatch"),
            "{e}"
        );

        let sha = write_shard(&p, &[3], &sample()).unwrap();
        let mut m2 = manifest_for(ShardEntry {
            sha256: sha.clone(),
            ..entry.clone()
        });
        m2.sample_shape = vec![4];
        let e = read_shard(
            dir.path(),
            &m2,
            &ShardEntry {
                sha256: sha,
                ..entry
            },
            true,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("s0.safetensors") && e.contains("expected F32[2, 4]"),
            "{e}"
        );
    }

    #[test]
    fn out_of_range_labels_are_skipped_or_fail() {
        let dir = tempfile::tempdir().unwrap();
        let data = ShardData {
            x: (0..9).map(|v| v as f32).collect(),
            y: Some(vec![0, 5, 1]),
            ids: vec![10, 11, 12],
        };
        let sha = write_shard(&dir.path().join("s0.safetensors"), &[3], &data).unwrap();
        let entry = ShardEntry {
            path: "s0.safetensors".into(),
            format: ShardFormat::Safetensors,
            num_samples: 3,
            sha256: sha,
            first_id: 10,
        };
        let m = manifest_for(entry.clone());
        let (d, skipped) =
            read_shard_checked(dir.path(), &m, &entry, true, CorruptPolicy::Skip).unwrap();
        assert_eq!(d.x, vec![0., 1., 2., 6., 7., 8.]);
        assert_eq!(d.y, Some(vec![0, 1]));
        assert_eq!(d.ids, vec![10, 12]);
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].index, 1);
        assert_eq!(skipped[0].shard, dir.path().join("s0.safetensors"));
        assert!(skipped[0].reason.contains("label 5 outside 0..2"));
        let e = read_shard(dir.path(), &m, &entry, true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("s0.safetensors") && e.contains("sample 1"),
            "{e}"
        );
        // Unlabeled reading never looks at labels.
        let d = read_shard(dir.path(), &m, &entry, false).unwrap();
        assert_eq!((d.len(), d.y), (3, None));

        let file = dir.path().join("manifest.json");
        let (all, skipped) = read_split_checked(&file, &m, "train", CorruptPolicy::Skip).unwrap();
        assert_eq!((all.len(), skipped.len()), (2, 1));
        assert!(read_split(&file, &m, "train").is_err());
    }

    #[test]
    fn unlabeled_shards_round_trip_without_y() {
        let dir = tempfile::tempdir().unwrap();
        let data = ShardData {
            y: None,
            ..sample()
        };
        let sha = write_shard(&dir.path().join("u.safetensors"), &[3], &data).unwrap();
        let entry = ShardEntry {
            path: "u.safetensors".into(),
            format: ShardFormat::Safetensors,
            num_samples: 2,
            sha256: sha,
            first_id: 10,
        };
        let mut m = manifest_for(entry.clone());
        m.splits.get_mut("train").unwrap().labeled = false;
        assert_eq!(read_shard(dir.path(), &m, &entry, false).unwrap(), data);
        // Reading it as labeled names the missing tensor.
        let e = read_shard(dir.path(), &m, &entry, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("u.safetensors") && e.contains("\"y\""), "{e}");
    }
}
