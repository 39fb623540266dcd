//! The importers' shared machinery: the common options, the class and split specs, and
//! [`SplitWriter`], which stages a split's shards and manifest next to the output and swaps them in at
//! the end. Every format module (and `butler data prepare`) writes through it.

use crate::manifest::{
    Manifest, ShardEntry, ShardFormat, Split, MANIFEST_FILE, MANIFEST_FORMAT, MANIFEST_VERSION,
};
use crate::shard::{write_shard, ShardData};
use crate::webdataset::{check_image_shape, TarShardWriter};
use crate::{Error, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Adds what was being done (and to which file or sample) to an error, as `anyhow`'s `with_context`:
/// an I/O error becomes [`Error::File`], an error of ours [`Error::At`]; both keep the cause as their
/// source.
pub(super) trait WithContext<T> {
    fn with_context(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> WithContext<T> for std::result::Result<T, std::io::Error> {
    fn with_context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::File {
            context: context(),
            source,
        })
    }
}

impl<T> WithContext<T> for Result<T> {
    fn with_context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::At {
            context: context(),
            source: Box::new(source),
        })
    }
}

/// What every importer shares (the command line's common options).
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// Dataset directory to create, or to add the split to.
    pub out: PathBuf,
    /// Split to write (replaces a split of that name; other splits are kept).
    pub split: String,
    /// Write the split without labels even where the input has them.
    pub unlabeled: bool,
    /// Samples per shard.
    pub shard_size: usize,
    /// Dataset name in the manifest (default: the existing one, else the output directory's name).
    pub name: Option<String>,
    /// Explicit class names (`--classes`, see [`parse_classes`]); default: the existing dataset's,
    /// else the input's.
    pub classes: Option<Vec<String>>,
}

impl ImportOptions {
    /// The writer for a split of `sample_shape`, labeled when the input has labels and --unlabeled
    /// is not given; `classes` are the input's own (an explicit --classes wins).
    pub(super) fn begin(
        &self,
        sample_shape: Vec<usize>,
        classes: ClassSpec,
        has_labels: bool,
        format: ShardFormat,
        source: BTreeMap<String, String>,
    ) -> Result<SplitWriter> {
        let classes = match &self.classes {
            Some(names) => ClassSpec {
                names: names.clone(),
                origin: ClassOrigin::Explicit,
            },
            None => classes,
        };
        SplitWriter::begin(
            &self.out,
            SplitSpec {
                split: self.split.clone(),
                sample_shape,
                classes,
                labeled: has_labels && !self.unlabeled,
                format,
                shard_size: self.shard_size,
                name: self.name.clone(),
                source,
            },
        )
    }
}

/// Parses `--classes`: a count N for "0".."N-1", or comma-separated unique names.
pub fn parse_classes(s: &str) -> Result<Vec<String>> {
    if let Ok(n) = s.trim().parse::<usize>() {
        if n == 0 {
            fail!("--classes 0: a dataset needs at least one class");
        }
        return Ok(numbered(n));
    }
    let names: Vec<String> = s.split(',').map(|c| c.trim().to_string()).collect();
    if names.iter().any(String::is_empty) {
        fail!("--classes {s:?}: empty class name (use a count N or comma-separated names)");
    }
    let unique: BTreeSet<&String> = names.iter().collect();
    if unique.len() != names.len() {
        fail!("--classes {s:?}: class names repeat");
    }
    Ok(names)
}

pub(super) fn numbered(n: usize) -> Vec<String> {
    (0..n).map(|i| i.to_string()).collect()
}

// ---------------------------------------------------------------------------------------------------
// Writing a split: staging directory, shards, manifest, swap.

/// Where a split's class list comes from, which decides how it must agree with an existing dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClassOrigin {
    /// `--classes`: must equal an existing dataset's classes.
    Explicit,
    /// Named by the input (folder names, CIFAR names): must equal an existing dataset's classes when
    /// the split is labeled.
    FromData,
    /// A default numbering: an existing dataset's classes are used instead (labels must fit).
    Default,
}

#[derive(Clone, Debug)]
pub struct ClassSpec {
    pub names: Vec<String>,
    pub origin: ClassOrigin,
}

pub struct SplitSpec {
    pub split: String,
    pub sample_shape: Vec<usize>,
    pub classes: ClassSpec,
    pub labeled: bool,
    pub format: ShardFormat,
    pub shard_size: usize,
    /// Dataset name (default: the existing dataset's, else the output directory's name).
    pub name: Option<String>,
    /// Provenance, recorded in the manifest's `source` as `<split>.<key>`.
    pub source: BTreeMap<String, String>,
}

/// Writes one split of a dataset, sample by sample (at most one shard in memory), into a staging
/// directory that [`SplitWriter::finish`] swaps into place. Dropping an unfinished writer removes the
/// staging directory (and any parent directories it had to create), leaving the output untouched.
pub struct SplitWriter {
    out: PathBuf,
    staging: PathBuf,
    created_dirs: Vec<PathBuf>,
    base: Option<Manifest>,
    spec: SplitSpec,
    classes: Vec<String>,
    first_id: u64,
    shards: Vec<ShardEntry>,
    pending: ShardData,
    tar: Option<TarShardWriter>,
    counts: Vec<u64>,
    num_samples: u64,
    finished: bool,
}

/// A summary of a finished split.
pub struct SplitReport {
    pub num_samples: u64,
    pub labeled: bool,
    pub sample_shape: Vec<usize>,
    pub format: ShardFormat,
}

fn check_split_name(split: &str) -> Result<()> {
    if split.is_empty()
        || !split
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        fail!("split name {split:?} must be non-empty ASCII letters, digits, '_' or '-'");
    }
    Ok(())
}

impl SplitWriter {
    pub fn begin(out: &Path, spec: SplitSpec) -> Result<Self> {
        check_split_name(&spec.split)?;
        if spec.shard_size == 0 {
            fail!("--shard-size must be at least 1");
        }
        if spec.sample_shape.is_empty() || spec.sample_shape.contains(&0) {
            fail!(
                "sample shape {:?} must be non-empty with positive sizes",
                spec.sample_shape
            );
        }
        if spec.format == ShardFormat::Tar {
            check_image_shape(&spec.sample_shape).map_err(|m| import_err!("tar shards: {m}"))?;
        }
        let base = if out.join(MANIFEST_FILE).is_file() {
            Some(Manifest::load(out)?.0)
        } else if out.exists() {
            let empty_dir = std::fs::read_dir(out)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false);
            if !empty_dir {
                fail!(
                    "{} exists but is not a butler dataset (no {MANIFEST_FILE}); choose another --out",
                    out.display()
                );
            }
            None
        } else {
            None
        };
        let classes = resolve_classes(out, base.as_ref(), &spec)?;
        if let Some(m) = &base {
            if m.sample_shape != spec.sample_shape {
                fail!(
                    "{} holds samples of shape {:?}; this input's are {:?}",
                    out.display(),
                    m.sample_shape,
                    spec.sample_shape
                );
            }
        }
        let first_id = base
            .as_ref()
            .map_or(0, |m| m.next_free_id(Some(&spec.split)));

        let parent = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let created_dirs = create_dirs(&parent)?;
        let out_name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "dataset".into());
        let staging = parent.join(format!(".import-{out_name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        let mut w = SplitWriter {
            out: out.to_path_buf(),
            staging: staging.clone(),
            created_dirs,
            counts: vec![0; classes.len()],
            classes,
            first_id,
            shards: Vec::new(),
            pending: ShardData::default(),
            tar: None,
            num_samples: 0,
            finished: false,
            base,
            spec,
        };
        std::fs::create_dir(&staging).with_context(|| format!("creating {}", staging.display()))?;
        if let Some(m) = &w.base {
            // Keep every file of the old dataset except its manifest and the replaced split's shards.
            let keep: BTreeSet<&str> = m
                .splits
                .iter()
                .filter(|(name, _)| **name != w.spec.split)
                .flat_map(|(_, s)| s.shards.iter().map(|e| e.path.as_str()))
                .collect();
            let mut drop: BTreeSet<PathBuf> = m
                .splits
                .get(&w.spec.split)
                .into_iter()
                .flat_map(|s| &s.shards)
                .filter(|e| !keep.contains(e.path.as_str()))
                .map(|e| PathBuf::from(&e.path))
                .collect();
            drop.insert(PathBuf::from(MANIFEST_FILE));
            link_tree(out, &staging, Path::new(""), &drop)?;
        }
        w.pending.y = w.spec.labeled.then(Vec::new);
        Ok(w)
    }

    fn check_label(&mut self, y: Option<i64>) -> Result<Option<i64>> {
        if !self.spec.labeled {
            return Ok(None);
        }
        let y = y.ok_or_else(|| import_err!("a labeled split needs a label for every sample"))?;
        let k = self.classes.len();
        match usize::try_from(y).ok().filter(|&l| l < k) {
            Some(l) => {
                self.counts[l] += 1;
                Ok(Some(y))
            }
            None => fail!(
                "label {y} outside 0..{k} (classes: {})",
                self.classes.join(",")
            ),
        }
    }

    fn shard_name(&self) -> Result<String> {
        let name = format!(
            "{}-{:05}.{}",
            self.spec.split,
            self.shards.len(),
            self.spec.format.extension()
        );
        if self.staging.join(&name).exists() {
            fail!(
                "{} already has a file {name} that belongs to another split; import under another --split",
                self.out.display()
            );
        }
        Ok(name)
    }

    /// Appends one decoded sample (`x` has the spec's shape; `y` is ignored for unlabeled splits).
    pub fn push(&mut self, x: &[f32], y: Option<i64>) -> Result<()> {
        if self.spec.format != ShardFormat::Safetensors {
            fail!("internal: push() on a tar split");
        }
        let numel: usize = self.spec.sample_shape.iter().product();
        if x.len() != numel {
            fail!(
                "sample has {} values, expected {numel} for shape {:?}",
                x.len(),
                self.spec.sample_shape
            );
        }
        let y = self.check_label(y)?;
        self.pending.x.extend_from_slice(x);
        if let (Some(all), Some(y)) = (self.pending.y.as_mut(), y) {
            all.push(y);
        }
        self.pending.ids.push(self.first_id + self.num_samples);
        self.num_samples += 1;
        if self.pending.len() >= self.spec.shard_size {
            self.flush()?;
        }
        Ok(())
    }

    /// Appends one encoded image to a tar split (the caller has checked that it decodes to the
    /// spec's shape). `ext` is `png`, `jpg` or `jpeg`.
    pub fn push_encoded(&mut self, ext: &str, bytes: &[u8], y: Option<i64>) -> Result<()> {
        if self.spec.format != ShardFormat::Tar {
            fail!("internal: push_encoded() on a safetensors split");
        }
        let y = self.check_label(y)?;
        if self.tar.is_none() {
            let name = self.shard_name()?;
            self.tar = Some(TarShardWriter::create(&self.staging.join(name))?);
        }
        let id = self.first_id + self.num_samples;
        let tar = self.tar.as_mut().expect("opened above");
        tar.append(&format!("{id:010}"), ext, bytes, y)?;
        self.num_samples += 1;
        if tar.len() >= self.spec.shard_size as u64 {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        let first_id = self.first_id + self.shards.iter().map(|s| s.num_samples).sum::<u64>();
        if let Some(tar) = self.tar.take() {
            let num_samples = tar.len();
            let name = self.shard_name()?;
            let sha256 = tar.finish()?;
            self.shards.push(ShardEntry {
                path: name,
                format: ShardFormat::Tar,
                num_samples,
                sha256,
                first_id,
            });
        }
        if !self.pending.is_empty() {
            let name = self.shard_name()?;
            let data = std::mem::take(&mut self.pending);
            self.pending.y = self.spec.labeled.then(Vec::new);
            let sha256 = write_shard(&self.staging.join(&name), &self.spec.sample_shape, &data)?;
            self.shards.push(ShardEntry {
                path: name,
                format: ShardFormat::Safetensors,
                num_samples: data.len() as u64,
                sha256,
                first_id,
            });
        }
        Ok(())
    }

    /// Writes the last shard and the manifest, then swaps the staging directory into place.
    pub fn finish(mut self) -> Result<(Manifest, SplitReport)> {
        self.flush()?;
        if self.num_samples == 0 {
            fail!("the input holds no samples");
        }
        let split = self.spec.split.clone();
        let mut m = self.base.take().unwrap_or_else(|| Manifest {
            format: MANIFEST_FORMAT.into(),
            version: MANIFEST_VERSION,
            name: self
                .out
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "dataset".into()),
            sample_shape: self.spec.sample_shape.clone(),
            dtype: "f32".into(),
            classes: self.classes.clone(),
            splits: BTreeMap::new(),
            source: BTreeMap::new(),
        });
        if let Some(name) = &self.spec.name {
            m.name = name.clone();
        }
        m.splits.insert(
            split.clone(),
            Split {
                num_samples: self.num_samples,
                labeled: self.spec.labeled,
                shards: std::mem::take(&mut self.shards),
                class_counts: self.spec.labeled.then(|| self.counts.clone()),
            },
        );
        let prefix = format!("{split}.");
        m.source.retain(|k, _| !k.starts_with(&prefix));
        for (k, v) in &self.spec.source {
            m.source.insert(format!("{prefix}{k}"), v.clone());
        }
        let file = self.staging.join(MANIFEST_FILE);
        m.validate(&file)?;
        butler_common::fsutil::write_atomic(
            &file,
            serde_json::to_string_pretty(&m)
                .expect("a manifest serializes: plain fields, string keys")
                .as_bytes(),
        )?;

        let parent = self
            .staging
            .parent()
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let old = parent.join(format!(
            ".old-{}-{}",
            self.out
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&old);
        if self.out.exists() {
            std::fs::rename(&self.out, &old)
                .with_context(|| format!("moving the previous {} aside", self.out.display()))?;
        }
        if let Err(e) = std::fs::rename(&self.staging, &self.out) {
            // Put the previous dataset back before reporting.
            let _ = std::fs::rename(&old, &self.out);
            return Err(e)
                .with_context(|| format!("moving the new dataset into {}", self.out.display()));
        }
        self.finished = true;
        let _ = std::fs::remove_dir_all(&old);
        let report = SplitReport {
            num_samples: self.num_samples,
            labeled: self.spec.labeled,
            sample_shape: self.spec.sample_shape.clone(),
            format: self.spec.format,
        };
        Ok((m, report))
    }
}

impl Drop for SplitWriter {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        drop(self.tar.take());
        let _ = std::fs::remove_dir_all(&self.staging);
        for d in self.created_dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Settles the split's classes against an existing dataset (see [`ClassOrigin`]).
fn resolve_classes(out: &Path, base: Option<&Manifest>, spec: &SplitSpec) -> Result<Vec<String>> {
    let ClassSpec { names, origin } = &spec.classes;
    match base {
        None => {
            if names.is_empty() {
                fail!(
                    "{} is a new dataset and the input names no classes: pass --classes N or --classes a,b,c",
                    out.display()
                );
            }
            Ok(names.clone())
        }
        Some(m) => {
            let must_match = match origin {
                ClassOrigin::Explicit => true,
                ClassOrigin::FromData => spec.labeled,
                ClassOrigin::Default => false,
            };
            if must_match && *names != m.classes {
                fail!(
                    "{} has classes [{}] but this input has [{}]",
                    out.display(),
                    m.classes.join(","),
                    names.join(",")
                );
            }
            if *origin == ClassOrigin::Default && spec.labeled && names.len() > m.classes.len() {
                fail!(
                    "{} has {} classes but this input's labels go up to {}",
                    out.display(),
                    m.classes.len(),
                    names.len() - 1
                );
            }
            Ok(m.classes.clone())
        }
    }
}

/// `create_dir_all` that returns the directories it created (outermost first).
fn create_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut missing = Vec::new();
    let mut d = Some(dir);
    while let Some(p) = d.filter(|p| !p.as_os_str().is_empty() && !p.exists()) {
        missing.push(p.to_path_buf());
        d = p.parent();
    }
    missing.reverse();
    for p in &missing {
        std::fs::create_dir(p).with_context(|| format!("creating {}", p.display()))?;
    }
    Ok(missing)
}

/// Hard-links (or copies, across filesystems) every file under `src/rel` into `dst/rel`, except the
/// relative paths in `skip`.
fn link_tree(src: &Path, dst: &Path, rel: &Path, skip: &BTreeSet<PathBuf>) -> Result<()> {
    let dir = src.join(rel);
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("reading {}", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let r = rel.join(e.file_name());
        if skip.contains(&r) || e.file_name().to_string_lossy().starts_with(".tmp-") {
            continue;
        }
        let (from, to) = (src.join(&r), dst.join(&r));
        if e.file_type()
            .with_context(|| format!("reading {}", dir.display()))?
            .is_dir()
        {
            std::fs::create_dir(&to).with_context(|| format!("creating {}", to.display()))?;
            link_tree(src, dst, &r, skip)?;
        } else if std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to)
                .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        }
    }
    Ok(())
}

/// The entries of `dir`, sorted by path.
pub(super) fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("reading {}", dir.display()))?;
    v.sort();
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_lists() {
        assert_eq!(parse_classes("3").unwrap(), vec!["0", "1", "2"]);
        assert_eq!(parse_classes("cat, dog").unwrap(), vec!["cat", "dog"]);
        assert!(parse_classes("a,,b").is_err());
        assert!(parse_classes("a,a").is_err());
        assert!(parse_classes("0").is_err());
    }
}
