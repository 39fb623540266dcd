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
/// The most samples one split may hold (2^36, about 6.9 × 10^10): a manifest claiming more is an
/// error before anything is sized from it.
pub const MAX_SPLIT_SAMPLES: u64 = 1 << 36;
/// The most values one sample may have (2^28 f32, 1 GiB): bounds `sample_shape`'s product.
pub const MAX_SAMPLE_NUMEL: usize = 1 << 28;
/// The most classes a manifest may name.
pub const MAX_CLASSES: usize = 100_000;

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

/// How a shard file stores its samples.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShardFormat {
    /// butler's native shard: decoded `x` (f32), `id` and (labeled splits) `y` tensors.
    #[default]
    Safetensors,
    /// A WebDataset-style tar of encoded images (`KEY.png`/`KEY.jpg` + `KEY.cls`), decoded on read.
    Tar,
}

impl ShardFormat {
    /// The file extension butler gives shards of this format.
    pub fn extension(self) -> &'static str {
        match self {
            ShardFormat::Safetensors => "safetensors",
            ShardFormat::Tar => "tar",
        }
    }
}

impl std::fmt::Display for ShardFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.extension())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    /// Relative to the manifest's directory.
    pub path: String,
    /// Absent in manifests written before tar shards existed: those are all safetensors.
    #[serde(default)]
    pub format: ShardFormat,
    pub num_samples: u64,
    /// Hex SHA-256 of the whole shard file.
    pub sha256: String,
    /// Stable id of the shard's first sample; sample `i` of the shard has id `first_id + i`
    /// (the shard also stores the ids explicitly).
    pub first_id: u64,
}

impl Manifest {
    /// A manifest whose one split, "train", holds `entry` alone, with classes named "a", "b", … : how
    /// the readers' tests and the fuzz targets put a shard in front of the shard reader.
    pub fn single_shard(
        sample_shape: Vec<usize>,
        num_classes: usize,
        entry: ShardEntry,
        labeled: bool,
    ) -> Manifest {
        let split = Split {
            num_samples: entry.num_samples,
            labeled,
            shards: vec![entry],
            class_counts: None,
        };
        Manifest {
            format: MANIFEST_FORMAT.into(),
            version: MANIFEST_VERSION,
            name: "t".into(),
            sample_shape,
            dtype: "f32".into(),
            classes: (0..num_classes)
                .map(|i| char::from(b'a' + (i % 26) as u8).to_string())
                .collect(),
            splits: BTreeMap::from([("train".to_string(), split)]),
            source: BTreeMap::new(),
        }
    }

    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// Values per sample. [`Manifest::validate`] bounds it by [`MAX_SAMPLE_NUMEL`]; on an unvalidated
    /// manifest whose product overflows it saturates instead of panicking.
    pub fn sample_numel(&self) -> usize {
        checked_numel(&self.sample_shape).unwrap_or(usize::MAX)
    }

    /// Parses and validates a manifest's text; `file` is only for messages. [`Manifest::load`] reads
    /// the file and calls this.
    pub fn parse(text: &str, file: &Path) -> Result<Manifest> {
        let m: Manifest = serde_json::from_str(text).map_err(|e| Error::Manifest {
            path: file.to_path_buf(),
            message: format!("invalid JSON: {e}"),
        })?;
        m.validate(file)?;
        Ok(m)
    }

    /// Loads and validates a manifest; `path` may be the file or the directory holding `manifest.json`.
    pub fn load(path: &Path) -> Result<(Manifest, PathBuf)> {
        // A missing path that does not name a .json file is the dataset directory a job expects.
        let names_dir = !path.exists() && path.extension().is_none_or(|e| e != "json");
        let file = if path.is_dir() || names_dir {
            path.join(MANIFEST_FILE)
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file).map_err(|e| Error::Manifest {
            path: file.clone(),
            message: format!(
                "cannot read: {e} (prepare it with `{}`)",
                prepare_command(file.parent().unwrap_or(Path::new(".")))
            ),
        })?;
        let m = Manifest::parse(&text, &file)?;
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
        if checked_numel(&self.sample_shape).is_none_or(|n| n > MAX_SAMPLE_NUMEL) {
            return Err(bad(format!(
                "sample_shape {:?} has more than {MAX_SAMPLE_NUMEL} values per sample",
                self.sample_shape
            )));
        }
        if self.classes.is_empty() {
            return Err(bad("classes is empty".into()));
        }
        if self.classes.len() > MAX_CLASSES {
            return Err(bad(format!(
                "{} classes, at most {MAX_CLASSES} are supported",
                self.classes.len()
            )));
        }
        for (name, split) in &self.splits {
            if split.num_samples > MAX_SPLIT_SAMPLES {
                return Err(bad(format!(
                    "split {name}: num_samples {} is over the limit of {MAX_SPLIT_SAMPLES}",
                    split.num_samples
                )));
            }
            let sum = split
                .shards
                .iter()
                .try_fold(0u64, |acc, s| acc.checked_add(s.num_samples));
            let Some(sum) = sum else {
                return Err(bad(format!("split {name}: shard sample counts overflow")));
            };
            if let Some(s) = split
                .shards
                .iter()
                .find(|s| s.first_id.checked_add(s.num_samples).is_none())
            {
                return Err(bad(format!(
                    "split {name}: shard {} has first_id + num_samples past 2^64",
                    s.path
                )));
            }
            if sum != split.num_samples {
                return Err(bad(format!(
                    "split {name}: shards hold {sum} samples but num_samples is {}",
                    split.num_samples
                )));
            }
            if !split.labeled && split.class_counts.is_some() {
                return Err(bad(format!("split {name}: unlabeled but has class_counts")));
            }
            if let Some(counts) = &split.class_counts {
                let total = counts.iter().try_fold(0u64, |acc, &c| acc.checked_add(c));
                if counts.len() != self.classes.len() || total != Some(split.num_samples) {
                    return Err(bad(format!(
                        "split {name}: class_counts {counts:?} do not match {} classes and {} samples",
                        self.classes.len(),
                        split.num_samples
                    )));
                }
            }
        }
        // Ids are unique across the whole dataset: no two shards' id ranges may overlap.
        let mut ranges: Vec<(u64, u64, &str, &str)> = self
            .splits
            .iter()
            .flat_map(|(name, split)| {
                split
                    .shards
                    .iter()
                    .filter(|s| s.num_samples > 0)
                    .map(move |s| {
                        (
                            s.first_id,
                            s.first_id.saturating_add(s.num_samples),
                            name.as_str(),
                            s.path.as_str(),
                        )
                    })
            })
            .collect();
        ranges.sort_unstable();
        for w in ranges.windows(2) {
            let ((_, end, split_a, path_a), (start, _, split_b, path_b)) = (w[0], w[1]);
            if start < end {
                return Err(bad(format!(
                    "sample ids overlap: shard {path_a} (split {split_a}) and shard {path_b} \
                     (split {split_b}) both hold id {start}; ids must be unique across splits"
                )));
            }
        }
        Ok(())
    }

    /// The first id after every id used by the splits other than `except` — where a new (or
    /// replaced) split's ids start so that ids stay unique across the dataset.
    pub fn next_free_id(&self, except: Option<&str>) -> u64 {
        self.splits
            .iter()
            .filter(|(name, _)| Some(name.as_str()) != except)
            .flat_map(|(_, split)| &split.shards)
            .map(|s| s.first_id.saturating_add(s.num_samples))
            .max()
            .unwrap_or(0)
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

/// The product of `shape`, or `None` when it overflows `usize`.
pub fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// The command that prepares the dataset a job expects in `dir`, from the directory's name: the
/// datasets `butler data prepare` generates (`data/mnist1d`, `data/digits`, `data/mnist1d-shift`) and
/// the same with a validation split held out (`data/mnist1d-val500`: `--val 500`), and the examples'
/// unlabeled pools (`…/mnist1d-pool-N`).
pub fn prepare_command(dir: &Path) -> String {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let out = dir.display();
    // `<dataset>-val<N>`: the dataset with N train samples held out as `val`.
    if let Some((base, n)) = name
        .rsplit_once("-val")
        .and_then(|(b, n)| Some((b, n.parse::<u64>().ok()?)))
        .filter(|(b, _)| matches!(*b, "mnist1d" | "digits" | "mnist1d-shift"))
    {
        return format!("butler data prepare {base} --val {n} --out {out}");
    }
    match name.as_str() {
        "mnist1d" | "digits" | "mnist1d-shift" => format!("butler data prepare {name} --out {out}"),
        _ => match name
            .strip_prefix("mnist1d-pool-")
            .and_then(|n| n.parse::<u64>().ok())
        {
            Some(n) => format!("butler data prepare mnist1d --num-samples {n} --out {out}"),
            None => format!(
                "butler data prepare mnist1d|digits|mnist1d-shift --out {out}` or `butler data import … --out {out}"
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_dataset_names_the_command_that_prepares_it() {
        assert_eq!(
            prepare_command(Path::new("data/mnist1d-val500")),
            "butler data prepare mnist1d --val 500 --out data/mnist1d-val500"
        );
        assert_eq!(
            prepare_command(Path::new("data/digits")),
            "butler data prepare digits --out data/digits"
        );
        assert_eq!(
            prepare_command(Path::new("bench-data/mnist1d-pool-100000")),
            "butler data prepare mnist1d --num-samples 100000 --out bench-data/mnist1d-pool-100000"
        );
        let e = Manifest::load(Path::new("/nonexistent/mnist1d-shift"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("butler data prepare mnist1d-shift --out /nonexistent/mnist1d-shift"),
            "{e}"
        );
    }

    const OLD: &str = r#"{
      "format": "butler-shards", "version": 1, "name": "t", "sample_shape": [2], "dtype": "f32",
      "classes": ["a", "b"],
      "splits": {
        "train": {"num_samples": 3, "labeled": true, "class_counts": [1, 2],
                  "shards": [{"path": "train-00000.safetensors", "num_samples": 3, "sha256": "00", "first_id": 0}]},
        "pool": {"num_samples": 2, "labeled": false,
                 "shards": [{"path": "pool-00000.tar", "format": "tar", "num_samples": 2, "sha256": "00", "first_id": 3}]}
      }
    }"#;

    fn parse(text: &str) -> Result<Manifest> {
        Manifest::parse(text, Path::new("m.json"))
    }

    #[test]
    fn format_defaults_to_safetensors_and_round_trips() {
        let m = parse(OLD).unwrap();
        assert_eq!(m.splits["train"].shards[0].format, ShardFormat::Safetensors);
        assert_eq!(m.splits["pool"].shards[0].format, ShardFormat::Tar);
        let text = serde_json::to_string(&m).unwrap();
        assert!(text.contains(r#""format":"tar""#) && text.contains(r#""format":"safetensors""#));
        assert_eq!(parse(&text).unwrap(), m);
        assert_eq!(m.next_free_id(None), 5);
        assert_eq!(m.next_free_id(Some("pool")), 3);
    }

    #[test]
    fn unknown_format_and_unknown_keys_are_rejected() {
        let e = parse(&OLD.replace(r#""format": "tar""#, r#""format": "zip""#)).unwrap_err();
        assert!(e.to_string().contains("zip"), "{e}");
        let e =
            parse(&OLD.replace(r#""first_id": 3"#, r#""first_id": 3, "frist": 1"#)).unwrap_err();
        assert!(e.to_string().contains("frist"), "{e}");
    }

    #[test]
    fn overlapping_ids_and_unlabeled_class_counts_are_rejected() {
        let e = parse(&OLD.replace(r#""first_id": 3"#, r#""first_id": 2"#)).unwrap_err();
        assert!(e.to_string().contains("ids overlap"), "{e}");
        let e = parse(&OLD.replace(
            r#""labeled": false,"#,
            r#""labeled": false, "class_counts": [1, 1],"#,
        ))
        .unwrap_err();
        assert!(
            e.to_string().contains("unlabeled but has class_counts"),
            "{e}"
        );
    }

    // Regression (found by the hostile-input property tests): a shape whose product overflows
    // panicked in `sample_numel` (debug) or wrapped to a small size (release).
    #[test]
    fn a_sample_shape_whose_product_overflows_is_an_error() {
        let e = parse(&OLD.replace(
            r#""sample_shape": [2]"#,
            r#""sample_shape": [4294967296, 4294967296, 2]"#,
        ))
        .unwrap_err();
        assert!(e.to_string().contains("values per sample"), "{e}");
        let e = parse(&OLD.replace(r#""sample_shape": [2]"#, r#""sample_shape": [536870912]"#))
            .unwrap_err();
        assert!(e.to_string().contains("values per sample"), "{e}");
    }

    // Regression: class_counts whose sum overflows u64 panicked in `validate` (debug builds).
    #[test]
    fn class_counts_whose_sum_overflows_are_an_error() {
        let e = parse(&OLD.replace(
            r#""class_counts": [1, 2]"#,
            r#""class_counts": [18446744073709551615, 4]"#,
        ))
        .unwrap_err();
        assert!(e.to_string().contains("class_counts"), "{e}");
    }

    // A 10^12 sample count is an error, not an allocation.
    #[test]
    fn a_huge_sample_count_is_an_error() {
        let text = OLD
            .replace(
                r#""num_samples": 3, "labeled": true, "class_counts": [1, 2]"#,
                r#""num_samples": 1000000000000, "labeled": true"#,
            )
            .replace(
                r#""num_samples": 3, "sha256""#,
                r#""num_samples": 1000000000000, "sha256""#,
            )
            .replace(r#""first_id": 3"#, r#""first_id": 1000000000000"#);
        let e = parse(&text).unwrap_err();
        assert!(e.to_string().contains("over the limit"), "{e}");
    }
}
