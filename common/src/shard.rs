//! butler's native shard: one safetensors file holding `x` (f32, `[n, ...sample_shape]`), `id` (u64, `[n]`,
//! stable per-sample ids) and, for labeled splits, `y` (i64, `[n]`).

use crate::manifest::{Manifest, ShardEntry};
use crate::{fsutil, Error, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use sha2::{Digest, Sha256};
use std::path::Path;

/// The samples of one shard (or of a whole split, once concatenated).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ShardData {
    pub x: Vec<f32>,
    pub y: Option<Vec<i64>>,
    pub ids: Vec<u64>,
}

impl ShardData {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

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
/// Every error names the shard file.
pub fn read_shard(
    dir: &Path,
    manifest: &Manifest,
    entry: &ShardEntry,
    labeled: bool,
) -> Result<ShardData> {
    let path = dir.join(&entry.path);
    let bad = |message: String| Error::Shard {
        path: path.clone(),
        message,
    };
    let bytes = match std::fs::read(&path) {
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
    let st = SafeTensors::deserialize(&bytes)
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
    let x = tensor("x", Dtype::F32, &x_shape)?
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("chunks_exact(4) yields 4 bytes")))
        .collect();
    let ids = tensor("id", Dtype::U64, &[n])?
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("chunks_exact(8) yields 8 bytes")))
        .collect();
    let y = if labeled {
        let y: Vec<i64> = tensor("y", Dtype::I64, &[n])?
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("chunks_exact(8) yields 8 bytes")))
            .collect();
        let k = manifest.num_classes() as i64;
        if let Some(bad_label) = y.iter().find(|&&l| l < 0 || l >= k) {
            return Err(bad(format!("label {bad_label} outside 0..{k}")));
        }
        Some(y)
    } else {
        None
    };
    Ok(ShardData { x, y, ids })
}

/// Reads every shard of a split into memory, in manifest order.
pub fn read_split(manifest_file: &Path, manifest: &Manifest, split: &str) -> Result<ShardData> {
    let dir = manifest_file.parent().unwrap_or(Path::new("."));
    let s = manifest.split(split, manifest_file)?;
    let mut out = ShardData {
        y: s.labeled.then(Vec::new),
        ..Default::default()
    };
    for entry in &s.shards {
        let d = read_shard(dir, manifest, entry, s.labeled)?;
        out.x.extend_from_slice(&d.x);
        out.ids.extend_from_slice(&d.ids);
        if let (Some(all), Some(y)) = (out.y.as_mut(), d.y) {
            all.extend(y);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Split, MANIFEST_FORMAT, MANIFEST_VERSION};
    use std::collections::BTreeMap;

    fn manifest_for(entry: ShardEntry) -> Manifest {
        let mut splits = BTreeMap::new();
        splits.insert(
            "train".into(),
            Split {
                num_samples: entry.num_samples,
                labeled: true,
                shards: vec![entry],
                class_counts: None,
            },
        );
        Manifest {
            format: MANIFEST_FORMAT.into(),
            version: MANIFEST_VERSION,
            name: "t".into(),
            sample_shape: vec![3],
            dtype: "f32".into(),
            classes: vec!["a".into(), "b".into()],
            splits,
            source: BTreeMap::new(),
        }
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
            num_samples: 2,
            sha256: sha,
            first_id: 10,
        };
        let m = manifest_for(entry.clone());
        assert_eq!(read_shard(dir.path(), &m, &entry, true).unwrap(), sample());
    }

    #[test]
    fn missing_corrupt_and_misshapen_shards_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let sha = write_shard(&dir.path().join("s0.safetensors"), &[3], &sample()).unwrap();
        let entry = ShardEntry {
            path: "s0.safetensors".into(),
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
}
