//! The dataset manifest: one JSON file next to the shards that lists, per split, the shards with their
//! sample counts and checksums, plus what every sample looks like (shape, dtype, classes). Workers read
//! shard bytes themselves; the coordinator reads only this file.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const MANIFEST_FORMAT: &str = "butler-shards";
pub const MANIFEST_VERSION: u32 = 1;
pub const MANIFEST_FILE: &str = "manifest.json";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always "butler-shards"; guards against pointing a job at some other JSON file.
    pub format: String,
    pub version: u32,
    pub name: String,
    /// Shape of one sample, without the batch dimension (MNIST-1D: `[40]`, digits: `[1, 8, 8]`).
    pub sample_shape: Vec<usize>,
    /// Element type of the `x` tensor in every shard. Only "f32" today.
    pub dtype: String,
    /// Class names, index = label.
    pub classes: Vec<String>,
    pub splits: BTreeMap<String, Split>,
    /// How the data was made (generator name and arguments), for provenance only.
    #[serde(default)]
    pub source: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Split {
    pub num_samples: u64,
    /// Unlabeled splits carry no `y` tensor.
    pub labeled: bool,
    pub shards: Vec<ShardEntry>,
    /// Samples per class (labeled splits), so that a labeled subset's size is known without reading
    /// labels — the coordinator sizes the sampler from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_counts: Option<Vec<u64>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    /// Relative to the manifest's directory.
    pub path: String,
    pub num_samples: u64,
    /// Hex SHA-256 of the whole shard file.
    pub sha256: String,
    /// Stable id of the shard's first sample; sample `i` of the shard has id `first_id + i`
    /// (the shard also stores the ids explicitly).
    pub first_id: u64,
}

impl Manifest {
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    pub fn sample_numel(&self) -> usize {
        self.sample_shape.iter().product()
    }

    /// Loads and validates a manifest; `path` may be the file or the directory holding `manifest.json`.
    pub fn load(path: &Path) -> Result<(Manifest, PathBuf)> {
        let file = if path.is_dir() {
            path.join(MANIFEST_FILE)
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file).map_err(|e| Error::Manifest {
            path: file.clone(),
            message: format!("cannot read: {e} (prepare data with `butler data prepare`)"),
        })?;
        let m: Manifest = serde_json::from_str(&text).map_err(|e| Error::Manifest {
            path: file.clone(),
            message: format!("invalid JSON: {e}"),
        })?;
        m.validate(&file)?;
        Ok((m, file))
    }

    pub fn validate(&self, file: &Path) -> Result<()> {
        let bad = |message: String| Error::Manifest {
            path: file.to_path_buf(),
            message,
        };
        if self.format != MANIFEST_FORMAT {
            return Err(bad(format!(
                "format is {:?}, expected {MANIFEST_FORMAT:?}",
                self.format
            )));
        }
        if self.version != MANIFEST_VERSION {
            return Err(bad(format!(
                "version {} is not supported (this butler reads {MANIFEST_VERSION})",
                self.version
            )));
        }
        if self.dtype != "f32" {
            return Err(bad(format!(
                "dtype {:?} is not supported (only \"f32\")",
                self.dtype
            )));
        }
        if self.sample_shape.is_empty() || self.sample_shape.contains(&0) {
            return Err(bad(format!(
                "sample_shape {:?} must be non-empty with positive sizes",
                self.sample_shape
            )));
        }
        if self.classes.is_empty() {
            return Err(bad("classes is empty".into()));
        }
        for (name, split) in &self.splits {
            let sum: u64 = split.shards.iter().map(|s| s.num_samples).sum();
            if sum != split.num_samples {
                return Err(bad(format!(
                    "split {name}: shards hold {sum} samples but num_samples is {}",
                    split.num_samples
                )));
            }
            if let Some(counts) = &split.class_counts {
                if counts.len() != self.classes.len()
                    || counts.iter().sum::<u64>() != split.num_samples
                {
                    return Err(bad(format!(
                        "split {name}: class_counts {counts:?} do not match {} classes and {} samples",
                        self.classes.len(),
                        split.num_samples
                    )));
                }
            }
        }
        Ok(())
    }

    /// Checks that every shard of `split` exists on disk, without reading it (a stat per shard), so a
    /// broken dataset fails at job start rather than mid-epoch. The error names the missing file.
    pub fn check_shards_exist(&self, split: &str, file: &Path) -> Result<()> {
        let dir = file.parent().unwrap_or(Path::new("."));
        for entry in &self.split(split, file)?.shards {
            let path = dir.join(&entry.path);
            if !path.is_file() {
                return Err(Error::Shard {
                    path,
                    message: format!("listed in {} but missing on disk", file.display()),
                });
            }
        }
        Ok(())
    }

    pub fn split(&self, name: &str, file: &Path) -> Result<&Split> {
        self.splits.get(name).ok_or_else(|| Error::Manifest {
            path: file.to_path_buf(),
            message: format!(
                "has no split {name:?} (it has: {})",
                self.splits.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        })
    }
}
