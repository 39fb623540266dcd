//! `butler data import`: converts datasets in common on-disk formats — NumPy `.npy`/`.npz`, a folder
//! of images per class, the CIFAR-10/100 binary batches, MNIST's IDX files — into butler shards plus
//! a manifest (see `docs/shard-format.md`).
//!
//! A split is written into a staging directory next to the output; the finished directory replaces
//! the old one only at the end, so an import that fails (malformed input, wrong shape, bad label)
//! leaves the previous dataset — or nothing — behind, never a half-written one. Importing into an
//! existing dataset adds (or replaces) one split and keeps the others (their files are hard-linked
//! into the staging directory, so nothing large is copied); the sample shape must agree, the classes
//! too, and the new split's ids start after every id the other splits use.

use anyhow::{anyhow, bail, Context, Result};
use butler_data::manifest::{
    Manifest, ShardEntry, ShardFormat, Split, MANIFEST_FILE, MANIFEST_FORMAT, MANIFEST_VERSION,
};
use butler_data::shard::{write_shard, ShardData};
use butler_data::webdataset::{check_image_shape, decode_image, image_extension, TarShardWriter};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Source {
    /// A NumPy .npz archive holding arrays `x` and optionally `y` (see --x-key, --y-key).
    Npz,
    /// A NumPy .npy file of samples; labels from --labels Y.npy.
    Npy,
    /// A directory with one sub-folder of PNG/JPEG images per class (sorted names = classes).
    Imagefolder,
    /// The CIFAR-10 binary batches (a directory, or data_batch_*.bin / test_batch.bin files).
    Cifar10,
    /// The CIFAR-100 binary files (a directory, or train.bin / test.bin); fine labels.
    Cifar100,
    /// MNIST-style IDX files: --images FILE (magic 0x00000803) and --labels FILE (0x00000801).
    Idx,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::Npz => "npz",
            Source::Npy => "npy",
            Source::Imagefolder => "imagefolder",
            Source::Cifar10 => "cifar10",
            Source::Cifar100 => "cifar100",
            Source::Idx => "idx",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutFormat {
    /// Decoded f32 samples in safetensors (butler's native shards).
    Safetensors,
    /// WebDataset-style tar of the encoded images (KEY.png/KEY.jpg + KEY.cls); --from imagefolder only.
    Tar,
}

#[derive(clap::Args)]
pub struct ImportArgs {
    /// Input format.
    #[arg(long, value_enum)]
    pub from: Source,
    /// The input: the .npz or .npy file, the image folder, or the CIFAR directory or batch files.
    pub inputs: Vec<PathBuf>,
    /// IDX image file (--from idx).
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Labels: a .npy of integer labels (--from npy) or an IDX label file (--from idx).
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Dataset directory to create, or to add the split to.
    #[arg(long)]
    pub out: PathBuf,
    /// Split to write (replaces a split of that name; other splits are kept).
    #[arg(long, default_value = "train")]
    pub split: String,
    /// Write the split without labels even where the input has them.
    #[arg(long)]
    pub unlabeled: bool,
    /// Samples per shard.
    #[arg(long, default_value_t = 1000)]
    pub shard_size: usize,
    /// Dataset name in the manifest (default: the existing one, else the --out directory's name).
    #[arg(long)]
    pub name: Option<String>,
    /// Class names, comma-separated, or a count N for "0".."N-1" (default: the existing dataset's,
    /// else the input's: folder names, CIFAR names, 10 digits for IDX, 0..=max label for npy/npz).
    #[arg(long)]
    pub classes: Option<String>,
    /// Shard format; `tar` keeps the encoded images (--from imagefolder only).
    #[arg(long, value_enum, default_value = "safetensors")]
    pub format: OutFormat,
    /// uint8 x (npy/npz): keep the values 0..255 instead of dividing by 255.
    #[arg(long)]
    pub raw_u8: bool,
    /// Name of the samples array inside a .npz.
    #[arg(long, default_value = "x")]
    pub x_key: String,
    /// Name of the labels array inside a .npz (optional: without it the split is unlabeled).
    #[arg(long, default_value = "y")]
    pub y_key: String,
}

pub fn run(a: ImportArgs) -> Result<()> {
    if a.shard_size == 0 {
        bail!("--shard-size must be at least 1");
    }
    if a.format == OutFormat::Tar && a.from != Source::Imagefolder {
        bail!("--format tar stores encoded images, so it needs --from imagefolder");
    }
    let one_input = || -> Result<&Path> {
        match a.inputs.as_slice() {
            [one] => Ok(one),
            [] => bail!("--from {} needs an input path", a.from.name()),
            _ => bail!(
                "--from {} takes one input path, got {}",
                a.from.name(),
                a.inputs.len()
            ),
        }
    };
    if a.images.is_some() && a.from != Source::Idx {
        bail!("--images is for --from idx");
    }
    if a.labels.is_some() && !matches!(a.from, Source::Idx | Source::Npy) {
        bail!("--labels is for --from npy and --from idx");
    }
    let explicit = a.classes.as_deref().map(parse_classes).transpose()?;
    let opts = Options {
        out: a.out.clone(),
        split: a.split.clone(),
        unlabeled: a.unlabeled,
        shard_size: a.shard_size,
        name: a.name.clone(),
        explicit,
    };
    let report = match a.from {
        Source::Npz => {
            let input = one_input()?;
            let (x, y) = read_npz(input, &a.x_key, &a.y_key)?;
            import_arrays(&opts, input, x, y, a.raw_u8)?
        }
        Source::Npy => {
            let input = one_input()?;
            let x = read_npy_file(input)?;
            let y = a
                .labels
                .as_deref()
                .map(|p| Ok::<_, anyhow::Error>((p.to_path_buf(), read_npy_file(p)?)))
                .transpose()?;
            import_arrays(&opts, input, (input.display().to_string(), x), y, a.raw_u8)?
        }
        Source::Imagefolder => import_imagefolder(&opts, one_input()?, a.format)?,
        Source::Cifar10 => import_cifar(&opts, &a.inputs, false)?,
        Source::Cifar100 => import_cifar(&opts, &a.inputs, true)?,
        Source::Idx => {
            if !a.inputs.is_empty() {
                bail!("--from idx takes --images FILE [--labels FILE], not positional inputs");
            }
            let images = a
                .images
                .as_deref()
                .ok_or_else(|| anyhow!("--from idx needs --images FILE"))?;
            import_idx(&opts, images, a.labels.as_deref())?
        }
    };
    println!(
        "imported {} samples ({}, shape {:?}, {} shards) into split {:?} of {}",
        report.num_samples,
        if report.labeled {
            "labeled"
        } else {
            "unlabeled"
        },
        report.sample_shape,
        report.format,
        opts.split,
        opts.out.join(MANIFEST_FILE).display()
    );
    Ok(())
}

/// What every importer shares (the command line's common options).
struct Options {
    out: PathBuf,
    split: String,
    unlabeled: bool,
    shard_size: usize,
    name: Option<String>,
    explicit: Option<Vec<String>>,
}

impl Options {
    /// The writer for a split of `sample_shape`, labeled when the input has labels and --unlabeled
    /// is not given; `classes` are the input's own (an explicit --classes wins).
    fn begin(
        &self,
        sample_shape: Vec<usize>,
        classes: ClassSpec,
        has_labels: bool,
        format: ShardFormat,
        source: BTreeMap<String, String>,
    ) -> Result<SplitWriter> {
        let classes = match &self.explicit {
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

fn parse_classes(s: &str) -> Result<Vec<String>> {
    if let Ok(n) = s.trim().parse::<usize>() {
        if n == 0 {
            bail!("--classes 0: a dataset needs at least one class");
        }
        return Ok(numbered(n));
    }
    let names: Vec<String> = s.split(',').map(|c| c.trim().to_string()).collect();
    if names.iter().any(String::is_empty) {
        bail!("--classes {s:?}: empty class name (use a count N or comma-separated names)");
    }
    let unique: BTreeSet<&String> = names.iter().collect();
    if unique.len() != names.len() {
        bail!("--classes {s:?}: class names repeat");
    }
    Ok(names)
}

fn numbered(n: usize) -> Vec<String> {
    (0..n).map(|i| i.to_string()).collect()
}

// ---------------------------------------------------------------------------------------------------
// Writing a split: staging directory, shards, manifest, swap.

/// Where a split's class list comes from, which decides how it must agree with an existing dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ClassOrigin {
    /// `--classes`: must equal an existing dataset's classes.
    Explicit,
    /// Named by the input (folder names, CIFAR names): must equal an existing dataset's classes when
    /// the split is labeled.
    FromData,
    /// A default numbering: an existing dataset's classes are used instead (labels must fit).
    Default,
}

#[derive(Clone, Debug)]
pub(crate) struct ClassSpec {
    pub names: Vec<String>,
    pub origin: ClassOrigin,
}

pub(crate) struct SplitSpec {
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
pub(crate) struct SplitWriter {
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
pub(crate) struct SplitReport {
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
        bail!("split name {split:?} must be non-empty ASCII letters, digits, '_' or '-'");
    }
    Ok(())
}

impl SplitWriter {
    pub fn begin(out: &Path, spec: SplitSpec) -> Result<Self> {
        check_split_name(&spec.split)?;
        if spec.shard_size == 0 {
            bail!("--shard-size must be at least 1");
        }
        if spec.sample_shape.is_empty() || spec.sample_shape.contains(&0) {
            bail!(
                "sample shape {:?} must be non-empty with positive sizes",
                spec.sample_shape
            );
        }
        if spec.format == ShardFormat::Tar {
            check_image_shape(&spec.sample_shape).map_err(|m| anyhow!("tar shards: {m}"))?;
        }
        let base = if out.join(MANIFEST_FILE).is_file() {
            Some(Manifest::load(out)?.0)
        } else if out.exists() {
            let empty_dir = std::fs::read_dir(out)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false);
            if !empty_dir {
                bail!(
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
                bail!(
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
        let y = y.ok_or_else(|| anyhow!("a labeled split needs a label for every sample"))?;
        let k = self.classes.len();
        match usize::try_from(y).ok().filter(|&l| l < k) {
            Some(l) => {
                self.counts[l] += 1;
                Ok(Some(y))
            }
            None => bail!(
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
            bail!(
                "{} already has a file {name} that belongs to another split; import under another --split",
                self.out.display()
            );
        }
        Ok(name)
    }

    /// Appends one decoded sample (`x` has the spec's shape; `y` is ignored for unlabeled splits).
    pub fn push(&mut self, x: &[f32], y: Option<i64>) -> Result<()> {
        if self.spec.format != ShardFormat::Safetensors {
            bail!("internal: push() on a tar split");
        }
        let numel: usize = self.spec.sample_shape.iter().product();
        if x.len() != numel {
            bail!(
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
            bail!("internal: push_encoded() on a safetensors split");
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
            bail!("the input holds no samples");
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
        butler_common::fsutil::write_atomic(&file, serde_json::to_string_pretty(&m)?.as_bytes())?;

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
                bail!(
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
                bail!(
                    "{} has classes [{}] but this input has [{}]",
                    out.display(),
                    m.classes.join(","),
                    names.join(",")
                );
            }
            if *origin == ClassOrigin::Default && spec.labeled && names.len() > m.classes.len() {
                bail!(
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
        if e.file_type()?.is_dir() {
            std::fs::create_dir(&to).with_context(|| format!("creating {}", to.display()))?;
            link_tree(src, dst, &r, skip)?;
        } else if std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to)
                .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// NumPy .npy / .npz

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NpyKind {
    F4,
    F8,
    I1,
    U1,
    I2,
    U2,
    I4,
    U4,
    I8,
    U8,
}

impl NpyKind {
    fn size(self) -> usize {
        match self {
            NpyKind::I1 | NpyKind::U1 => 1,
            NpyKind::I2 | NpyKind::U2 => 2,
            NpyKind::F4 | NpyKind::I4 | NpyKind::U4 => 4,
            NpyKind::F8 | NpyKind::I8 | NpyKind::U8 => 8,
        }
    }

    fn numpy_name(self) -> &'static str {
        match self {
            NpyKind::F4 => "float32",
            NpyKind::F8 => "float64",
            NpyKind::I1 => "int8",
            NpyKind::U1 => "uint8",
            NpyKind::I2 => "int16",
            NpyKind::U2 => "uint16",
            NpyKind::I4 => "int32",
            NpyKind::U4 => "uint32",
            NpyKind::I8 => "int64",
            NpyKind::U8 => "uint64",
        }
    }
}

/// A parsed `.npy` array: C-order element bytes plus dtype and shape.
pub(crate) struct Npy {
    kind: NpyKind,
    big_endian: bool,
    shape: Vec<usize>,
    data: Vec<u8>,
}

/// A value in the header's Python dict literal.
#[derive(Debug, PartialEq)]
enum PyValue {
    Str(String),
    Bool(bool),
    Tuple(Vec<usize>),
}

/// Parses the `.npy` header's dict literal, e.g. `{'descr': '<f4', 'fortran_order': False,
/// 'shape': (3, 4), }` — strings, booleans and tuples of integers are all numpy writes.
fn parse_py_dict(text: &str) -> std::result::Result<BTreeMap<String, PyValue>, String> {
    struct P<'a> {
        s: &'a [u8],
        i: usize,
    }
    impl P<'_> {
        fn ws(&mut self) {
            while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
                self.i += 1;
            }
        }
        fn peek(&mut self) -> Option<u8> {
            self.ws();
            self.s.get(self.i).copied()
        }
        fn eat(&mut self, c: u8) -> std::result::Result<(), String> {
            if self.peek() == Some(c) {
                self.i += 1;
                Ok(())
            } else {
                Err(format!(
                    "expected '{}' at byte {}, found {}",
                    c as char,
                    self.i,
                    self.s
                        .get(self.i)
                        .map_or("the end".to_string(), |b| format!("'{}'", *b as char))
                ))
            }
        }
        fn string(&mut self) -> std::result::Result<String, String> {
            let q = self.peek().ok_or("unexpected end")?;
            if q != b'\'' && q != b'"' {
                return Err(format!("expected a quoted string at byte {}", self.i));
            }
            let start = self.i + 1;
            let len = self.s[start..]
                .iter()
                .position(|&b| b == q)
                .ok_or("unterminated string")?;
            self.i = start + len + 1;
            Ok(String::from_utf8_lossy(&self.s[start..start + len]).into_owned())
        }
        fn word(&mut self) -> &[u8] {
            self.ws();
            let start = self.i;
            while self.i < self.s.len() && self.s[self.i].is_ascii_alphanumeric() {
                self.i += 1;
            }
            &self.s[start..self.i]
        }
        fn value(&mut self) -> std::result::Result<PyValue, String> {
            match self.peek().ok_or("unexpected end")? {
                b'\'' | b'"' => Ok(PyValue::Str(self.string()?)),
                b'(' => {
                    self.i += 1;
                    let mut dims = Vec::new();
                    loop {
                        if self.peek() == Some(b')') {
                            self.i += 1;
                            return Ok(PyValue::Tuple(dims));
                        }
                        let w = self.word();
                        let w = std::str::from_utf8(w).unwrap_or("");
                        let w = w.strip_suffix('L').unwrap_or(w);
                        dims.push(
                            w.parse()
                                .map_err(|_| format!("shape entry {w:?} is not a size"))?,
                        );
                        if self.peek() == Some(b',') {
                            self.i += 1;
                        } else {
                            self.eat(b')')?;
                            return Ok(PyValue::Tuple(dims));
                        }
                    }
                }
                _ => match self.word() {
                    b"True" => Ok(PyValue::Bool(true)),
                    b"False" => Ok(PyValue::Bool(false)),
                    w => Err(format!(
                        "unsupported value {:?} (structured dtypes are not supported)",
                        String::from_utf8_lossy(w)
                    )),
                },
            }
        }
    }
    let mut p = P {
        s: text.as_bytes(),
        i: 0,
    };
    let mut out = BTreeMap::new();
    p.eat(b'{')?;
    loop {
        if p.peek() == Some(b'}') {
            p.i += 1;
            break;
        }
        let key = p.string()?;
        p.eat(b':')?;
        let v = p.value()?;
        out.insert(key, v);
        if p.peek() == Some(b',') {
            p.i += 1;
        } else {
            p.eat(b'}')?;
            break;
        }
    }
    if p.peek().is_some() {
        return Err(format!(
            "trailing characters after the dict at byte {}",
            p.i
        ));
    }
    Ok(out)
}

/// Parses a `.npy` file's bytes; `what` names it in errors.
pub(crate) fn parse_npy(mut bytes: Vec<u8>, what: &str) -> Result<Npy> {
    const MAGIC: &[u8] = b"\x93NUMPY";
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        bail!("{what}: not a .npy file (it does not start with \\x93NUMPY)");
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let (header_len, header_start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize,
            12,
        ),
        _ => bail!("{what}: unsupported .npy format version {major}.{minor}"),
    };
    let data_start = header_start + header_len;
    if bytes.len() < data_start {
        bail!(
            "{what}: truncated .npy header ({} bytes, the header says {header_len})",
            bytes.len() - header_start
        );
    }
    let header = std::str::from_utf8(&bytes[header_start..data_start])
        .map_err(|_| anyhow!("{what}: .npy header is not text"))?;
    let dict = parse_py_dict(header.trim_end_matches(['\n', ' ', '\0']))
        .map_err(|e| anyhow!("{what}: malformed .npy header {header:?}: {e}"))?;
    let descr = match dict.get("descr") {
        Some(PyValue::Str(s)) => s.clone(),
        Some(_) => bail!("{what}: .npy header's 'descr' is not a simple dtype string (structured dtypes are not supported)"),
        None => bail!("{what}: .npy header has no 'descr'"),
    };
    match dict.get("fortran_order") {
        Some(PyValue::Bool(false)) => {}
        Some(PyValue::Bool(true)) => bail!(
            "{what}: array is stored in Fortran order; save it with np.ascontiguousarray(a) first"
        ),
        _ => bail!("{what}: .npy header has no boolean 'fortran_order'"),
    }
    let shape = match dict.get("shape") {
        Some(PyValue::Tuple(t)) => t.clone(),
        _ => bail!("{what}: .npy header has no 'shape' tuple"),
    };
    let (order, code) = match descr.as_bytes().first() {
        Some(b'<' | b'>' | b'|' | b'=') => descr.split_at(1),
        _ => ("=", descr.as_str()),
    };
    let kind = match code {
        "f4" => NpyKind::F4,
        "f8" => NpyKind::F8,
        "i1" => NpyKind::I1,
        "u1" | "B" => NpyKind::U1,
        "i2" => NpyKind::I2,
        "u2" => NpyKind::U2,
        "i4" => NpyKind::I4,
        "u4" => NpyKind::U4,
        "i8" => NpyKind::I8,
        "u8" => NpyKind::U8,
        _ => bail!("{what}: dtype {descr:?} is not supported (float32/64 or an integer type)"),
    };
    let big_endian = order == ">" || (order == "=" && cfg!(target_endian = "big"));
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .and_then(|n| n.checked_mul(kind.size()))
        .ok_or_else(|| anyhow!("{what}: shape {shape:?} is too large"))?;
    let have = bytes.len() - data_start;
    if have != count {
        bail!(
            "{what}: {} data: shape {shape:?} of {} needs {count} bytes, the file has {have}",
            if have < count {
                "truncated"
            } else {
                "too much"
            },
            kind.numpy_name()
        );
    }
    bytes.drain(..data_start);
    Ok(Npy {
        kind,
        big_endian,
        shape,
        data: bytes,
    })
}

fn read_npy_file(path: &Path) -> Result<Npy> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    parse_npy(bytes, &path.display().to_string())
}

/// Reads arrays `x_key` and (if present) `y_key` from an `.npz`. Returns (label, array) pairs.
#[allow(clippy::type_complexity)]
fn read_npz(
    path: &Path,
    x_key: &str,
    y_key: &str,
) -> Result<((String, Npy), Option<(PathBuf, Npy)>)> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| anyhow!("{}: not a .npz (zip) archive: {e}", path.display()))?;
    let mut names: Vec<String> = zip.file_names().map(str::to_string).collect();
    names.sort();
    let mut get = |key: &str| -> Result<Option<(String, Npy)>> {
        let entry = format!("{key}.npy");
        if !names.contains(&entry) {
            return Ok(None);
        }
        let what = format!("{}[{entry}]", path.display());
        let mut f = zip
            .by_name(&entry)
            .map_err(|e| anyhow!("{what}: cannot read: {e}"))?;
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes)
            .map_err(|e| anyhow!("{what}: cannot read: {e}"))?;
        Ok(Some((what.clone(), parse_npy(bytes, &what)?)))
    };
    let x = get(x_key)?.ok_or_else(|| {
        anyhow!(
            "{}: has no array {x_key:?} (it has: {}); choose one with --x-key",
            path.display(),
            names
                .iter()
                .map(|n| n.trim_end_matches(".npy"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    let y = get(y_key)?.map(|(what, a)| (PathBuf::from(what), a));
    Ok((x, y))
}

impl Npy {
    fn elem(&self, i: usize) -> [u8; 8] {
        let n = self.kind.size();
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(&self.data[i * n..(i + 1) * n]);
        if self.big_endian {
            b[..n].reverse();
        }
        b
    }

    /// Elements `range` as f32 (x): floats as they are, uint8 divided by 255 unless `raw_u8`.
    fn floats(&self, start: usize, len: usize, raw_u8: bool, what: &str) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(len);
        for i in start..start + len {
            let b = self.elem(i);
            let v = match self.kind {
                NpyKind::F4 => f32::from_le_bytes(b[..4].try_into().expect("4 bytes")),
                NpyKind::F8 => f64::from_le_bytes(b) as f32,
                NpyKind::U1 if raw_u8 => b[0] as f32,
                NpyKind::U1 => b[0] as f32 / 255.0,
                k => bail!(
                    "{what}: x dtype {} is not supported (float32, float64 or uint8)",
                    k.numpy_name()
                ),
            };
            if !v.is_finite() {
                bail!("{what}: value {v} at flat index {i} is not finite");
            }
            out.push(v);
        }
        Ok(out)
    }

    /// All elements as labels (integer dtypes only, non-negative).
    fn labels(&self, what: &str) -> Result<Vec<i64>> {
        let n: usize = self.shape.iter().product();
        (0..n)
            .map(|i| {
                let b = self.elem(i);
                let v: i128 = match self.kind {
                    NpyKind::I1 => b[0] as i8 as i128,
                    NpyKind::U1 => b[0] as i128,
                    NpyKind::I2 => i16::from_le_bytes([b[0], b[1]]) as i128,
                    NpyKind::U2 => u16::from_le_bytes([b[0], b[1]]) as i128,
                    NpyKind::I4 => i32::from_le_bytes(b[..4].try_into().expect("4")) as i128,
                    NpyKind::U4 => u32::from_le_bytes(b[..4].try_into().expect("4")) as i128,
                    NpyKind::I8 => i64::from_le_bytes(b) as i128,
                    NpyKind::U8 => u64::from_le_bytes(b) as i128,
                    k => bail!(
                        "{what}: labels must be integers (int64, int32, uint8, …), not {}",
                        k.numpy_name()
                    ),
                };
                if v < 0 || v > i64::MAX as i128 {
                    bail!("{what}: label {v} at index {i} is negative or too large");
                }
                Ok(v as i64)
            })
            .collect()
    }
}

fn import_arrays(
    opts: &Options,
    input: &Path,
    (x_what, x): (String, Npy),
    y: Option<(PathBuf, Npy)>,
    raw_u8: bool,
) -> Result<SplitReport> {
    if x.shape.len() < 2 {
        bail!(
            "{x_what}: x has shape {:?}; expected [samples, ...sample shape] with at least 2 dimensions",
            x.shape
        );
    }
    if !matches!(x.kind, NpyKind::F4 | NpyKind::F8 | NpyKind::U1) {
        bail!(
            "{x_what}: x dtype {} is not supported (float32, float64 or uint8)",
            x.kind.numpy_name()
        );
    }
    let n = x.shape[0];
    let sample_shape = x.shape[1..].to_vec();
    let labels = match &y {
        Some((yp, ya)) => {
            let what = yp.display().to_string();
            let ok_shape = ya.shape == [n] || ya.shape == [n, 1];
            if !ok_shape {
                bail!(
                    "{what}: labels have shape {:?}; expected [{n}] to match the {n} samples of {x_what}",
                    ya.shape
                );
            }
            Some(ya.labels(&what)?)
        }
        None => None,
    };
    let max = labels.iter().flatten().copied().max();
    let classes = ClassSpec {
        names: max.map_or(Vec::new(), |m| numbered(m as usize + 1)),
        origin: ClassOrigin::Default,
    };
    let mut source = BTreeMap::new();
    source.insert(
        "importer".into(),
        format!("butler data import ({})", input.display()),
    );
    if x.kind == NpyKind::U1 {
        source.insert(
            "scale".into(),
            if raw_u8 { "none (uint8 kept)" } else { "x/255" }.into(),
        );
    }
    let mut w = opts.begin(
        sample_shape,
        classes,
        labels.is_some(),
        ShardFormat::Safetensors,
        source,
    )?;
    let numel: usize = x.shape[1..].iter().product();
    for i in 0..n {
        let xs = x.floats(i * numel, numel, raw_u8, &x_what)?;
        let yi = labels.as_ref().map(|l| l[i]);
        w.push(&xs, yi).with_context(|| {
            format!(
                "{}: sample {i}",
                y.as_ref()
                    .map_or(x_what.clone(), |(p, _)| p.display().to_string())
            )
        })?;
    }
    Ok(w.finish()?.1)
}

// ---------------------------------------------------------------------------------------------------
// Image folders

fn import_imagefolder(opts: &Options, dir: &Path, format: OutFormat) -> Result<SplitReport> {
    if !dir.is_dir() {
        bail!(
            "{}: not a directory (expected one sub-folder of images per class)",
            dir.display()
        );
    }
    let mut class_dirs = Vec::new();
    let mut top_images = Vec::new();
    for e in sorted_entries(dir)? {
        let name = e
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if name.starts_with('.') {
            continue;
        }
        if e.is_dir() {
            class_dirs.push((name, e));
        } else if image_extension(&name).is_some() {
            top_images.push(e);
        }
    }
    let labeled = !class_dirs.is_empty() && !opts.unlabeled;
    let mut files: Vec<(PathBuf, Option<i64>)> = Vec::new();
    if opts.unlabeled {
        files.extend(top_images.iter().map(|p| (p.clone(), None)));
    } else if !top_images.is_empty() {
        eprintln!(
            "note: ignoring {} image(s) directly in {} (not in a class folder), e.g. {}",
            top_images.len(),
            dir.display(),
            top_images[0].display()
        );
    }
    if class_dirs.is_empty() && !opts.unlabeled {
        bail!(
            "{}: has no class sub-folders (one folder of images per class); pass --unlabeled to import loose images",
            dir.display()
        );
    }
    for (label, (_, d)) in class_dirs.iter().enumerate() {
        let mut found = Vec::new();
        collect_images(d, &mut found)?;
        files.extend(
            found
                .into_iter()
                .map(|p| (p, labeled.then_some(label as i64))),
        );
    }
    let Some((first, _)) = files.first() else {
        bail!("{}: holds no .png/.jpg/.jpeg images", dir.display());
    };
    let first = first.clone();
    let shape = decode_file(&first)?.shape;
    let classes = ClassSpec {
        names: class_dirs.iter().map(|(n, _)| n.clone()).collect(),
        origin: ClassOrigin::FromData,
    };
    let out_format = match format {
        OutFormat::Safetensors => ShardFormat::Safetensors,
        OutFormat::Tar => ShardFormat::Tar,
    };
    let mut source = BTreeMap::new();
    source.insert(
        "importer".into(),
        format!("butler data import --from imagefolder ({})", dir.display()),
    );
    let mut w = opts.begin(shape.to_vec(), classes, labeled, out_format, source)?;
    for (path, label) in &files {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let img = decode_image(&bytes).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        if img.shape != shape {
            bail!(
                "{}: image is {:?} (C, H, W) but {} is {:?}; all images must have the same size and channels",
                path.display(),
                img.shape,
                first.display(),
                shape
            );
        }
        match out_format {
            ShardFormat::Safetensors => w.push(&img.data, *label),
            ShardFormat::Tar => {
                let ext = image_extension(&path.to_string_lossy()).expect("collected by extension");
                w.push_encoded(ext, &bytes, *label)
            }
        }
        .with_context(|| path.display().to_string())?;
    }
    Ok(w.finish()?.1)
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("reading {}", dir.display()))?;
    v.sort();
    Ok(v)
}

/// Every image under `dir` (recursively, sorted by path; hidden entries skipped).
fn collect_images(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for p in sorted_entries(dir)? {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with('.') {
            continue;
        }
        if p.is_dir() {
            collect_images(&p, out)?;
        } else if image_extension(&name).is_some() {
            out.push(p);
        }
    }
    Ok(())
}

fn decode_file(path: &Path) -> Result<butler_data::webdataset::DecodedImage> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    decode_image(&bytes).map_err(|e| anyhow!("{}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------------
// CIFAR-10 / CIFAR-100 binary batches

const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];
const CIFAR_PIXELS: usize = 3 * 32 * 32;

fn cifar_files(inputs: &[PathBuf], split: &str, hundred: bool) -> Result<Vec<PathBuf>> {
    let set = if hundred { "CIFAR-100" } else { "CIFAR-10" };
    match inputs {
        [] => bail!(
            "--from {} needs the directory or the batch files",
            if hundred { "cifar100" } else { "cifar10" }
        ),
        [dir] if dir.is_dir() => {
            let files: Vec<PathBuf> = if hundred {
                vec![dir.join(if split == "test" {
                    "test.bin"
                } else {
                    "train.bin"
                })]
            } else if split == "test" {
                vec![dir.join("test_batch.bin")]
            } else {
                sorted_entries(dir)?
                    .into_iter()
                    .filter(|p| {
                        let n = p.file_name().unwrap_or_default().to_string_lossy();
                        n.starts_with("data_batch_") && n.ends_with(".bin")
                    })
                    .collect()
            };
            let missing = files.iter().find(|p| !p.is_file());
            if files.is_empty() || missing.is_some() {
                let looks_python =
                    dir.join("data_batch_1").is_file() || dir.join("train").is_file();
                bail!(
                    "{}: no {set} binary batch {} for split {split:?}{}",
                    dir.display(),
                    missing.map_or("data_batch_*.bin".into(), |p| p.display().to_string()),
                    if looks_python {
                        " (this looks like the python/pickle version; use the binary version)"
                    } else {
                        ""
                    }
                );
            }
            Ok(files)
        }
        files => {
            if let Some(d) = files.iter().find(|p| p.is_dir()) {
                bail!(
                    "{}: give either one directory or batch files, not both",
                    d.display()
                );
            }
            Ok(files.to_vec())
        }
    }
}

/// Class names from the dataset's own text file next to the batches, if it is there.
fn cifar_classes(files: &[PathBuf], hundred: bool) -> Result<Vec<String>> {
    let (meta, k) = if hundred {
        ("fine_label_names.txt", 100)
    } else {
        ("batches.meta.txt", 10)
    };
    let dir = files[0].parent().unwrap_or(Path::new("."));
    let path = dir.join(meta);
    if !path.is_file() {
        return Ok(if hundred {
            numbered(100)
        } else {
            CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect()
        });
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    if names.len() != k {
        bail!(
            "{}: lists {} class names, expected {k}",
            path.display(),
            names.len()
        );
    }
    Ok(names)
}

fn import_cifar(opts: &Options, inputs: &[PathBuf], hundred: bool) -> Result<SplitReport> {
    let files = cifar_files(inputs, &opts.split, hundred)?;
    let (set, label_bytes, k) = if hundred {
        ("CIFAR-100", 2, 100)
    } else {
        ("CIFAR-10", 1, 10)
    };
    let record = label_bytes + CIFAR_PIXELS;
    for f in &files {
        let len = std::fs::metadata(f)
            .with_context(|| format!("reading {}", f.display()))?
            .len();
        if len == 0 || !len.is_multiple_of(record as u64) {
            bail!(
                "{}: {len} bytes is not a whole number of {record}-byte {set} records \
                 ({label_bytes} label byte(s) + {CIFAR_PIXELS} pixel bytes)",
                f.display()
            );
        }
    }
    let classes = ClassSpec {
        names: cifar_classes(&files, hundred)?,
        origin: ClassOrigin::FromData,
    };
    let mut source = BTreeMap::new();
    source.insert(
        "importer".into(),
        format!(
            "butler data import --from {} ({})",
            if hundred { "cifar100" } else { "cifar10" },
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    source.insert("scale".into(), "x/255".into());
    if hundred {
        source.insert("labels".into(), "fine".into());
    }
    let mut w = opts.begin(
        vec![3, 32, 32],
        classes,
        true,
        ShardFormat::Safetensors,
        source,
    )?;
    let mut buf = vec![0u8; record];
    let mut x = vec![0f32; CIFAR_PIXELS];
    for f in &files {
        let mut r = BufReader::new(
            std::fs::File::open(f).with_context(|| format!("opening {}", f.display()))?,
        );
        let n = std::fs::metadata(f)?.len() as usize / record;
        for i in 0..n {
            r.read_exact(&mut buf)
                .with_context(|| format!("{}: reading record {i}", f.display()))?;
            let label = buf[label_bytes - 1] as i64; // CIFAR-100: coarse, then fine
            if label >= k {
                bail!(
                    "{}: record {i} has label {label}, outside 0..{k}",
                    f.display()
                );
            }
            for (v, &p) in x.iter_mut().zip(&buf[label_bytes..]) {
                *v = p as f32 / 255.0;
            }
            w.push(&x, Some(label))
                .with_context(|| format!("{}: record {i}", f.display()))?;
        }
    }
    Ok(w.finish()?.1)
}

// ---------------------------------------------------------------------------------------------------
// MNIST IDX files

fn read_be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Reads and checks an IDX header: returns the dims. `magic` is 0x00000803 or 0x00000801.
fn idx_header(path: &Path, head: &[u8], magic: u32, file_len: u64) -> Result<Vec<usize>> {
    if head.len() >= 2 && head[0] == 0x1f && head[1] == 0x8b {
        bail!("{}: is gzip-compressed; gunzip it first", path.display());
    }
    let ndim = (magic & 0xff) as usize;
    let header_len = 4 + 4 * ndim;
    if head.len() < header_len {
        bail!(
            "{}: too short for an IDX header ({} bytes)",
            path.display(),
            head.len()
        );
    }
    let got = read_be_u32(head, 0);
    if got != magic {
        bail!(
            "{}: magic number 0x{got:08x} is not an IDX {} file (expected 0x{magic:08x})",
            path.display(),
            if ndim == 3 { "image" } else { "label" }
        );
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|d| read_be_u32(head, 4 + 4 * d) as usize)
        .collect();
    let want = header_len as u64 + dims.iter().map(|&d| d as u64).product::<u64>();
    if file_len != want {
        bail!(
            "{}: {file_len} bytes, but its header (dims {dims:?}) needs {want}",
            path.display()
        );
    }
    Ok(dims)
}

fn import_idx(opts: &Options, images: &Path, labels: Option<&Path>) -> Result<SplitReport> {
    let open = |p: &Path| -> Result<(BufReader<std::fs::File>, u64)> {
        let f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
        let len = f.metadata()?.len();
        Ok((BufReader::new(f), len))
    };
    let (mut r, len) = open(images)?;
    let mut head = vec![0u8; 16.min(len as usize)];
    r.read_exact(&mut head)
        .with_context(|| format!("reading {}", images.display()))?;
    let dims = idx_header(images, &head, 0x0000_0803, len)?;
    let (n, rows, cols) = (dims[0], dims[1], dims[2]);
    if rows == 0 || cols == 0 {
        bail!("{}: images of {rows}×{cols} pixels", images.display());
    }
    let ys = match labels {
        Some(lp) => {
            let bytes = std::fs::read(lp).with_context(|| format!("reading {}", lp.display()))?;
            let d = idx_header(
                lp,
                &bytes[..8.min(bytes.len())],
                0x0000_0801,
                bytes.len() as u64,
            )?;
            if d[0] != n {
                bail!(
                    "{} has {} labels but {} has {n} images",
                    lp.display(),
                    d[0],
                    images.display()
                );
            }
            Some(bytes[8..].iter().map(|&b| b as i64).collect::<Vec<_>>())
        }
        None => None,
    };
    let max = ys.iter().flatten().copied().max().unwrap_or(0) as usize;
    let classes = ClassSpec {
        names: numbered(10.max(max + 1)),
        origin: ClassOrigin::Default,
    };
    let mut source = BTreeMap::new();
    source.insert(
        "importer".into(),
        format!(
            "butler data import --from idx ({}{})",
            images.display(),
            labels.map_or(String::new(), |l| format!(", {}", l.display()))
        ),
    );
    source.insert("scale".into(), "x/255".into());
    let mut w = opts.begin(
        vec![1, rows, cols],
        classes,
        ys.is_some(),
        ShardFormat::Safetensors,
        source,
    )?;
    let mut buf = vec![0u8; rows * cols];
    let mut x = vec![0f32; rows * cols];
    for i in 0..n {
        r.read_exact(&mut buf)
            .with_context(|| format!("{}: reading image {i}", images.display()))?;
        for (v, &p) in x.iter_mut().zip(&buf) {
            *v = p as f32 / 255.0;
        }
        w.push(&x, ys.as_ref().map(|y| y[i]))
            .with_context(|| format!("{}: label {i}", labels.unwrap_or(images).display()))?;
    }
    Ok(w.finish()?.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(header: &str, data: &[u8]) -> Vec<u8> {
        let mut h = header.to_string();
        while !(10 + h.len() + 1).is_multiple_of(64) {
            h.push(' ');
        }
        h.push('\n');
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend((h.len() as u16).to_le_bytes());
        b.extend(h.as_bytes());
        b.extend(data);
        b
    }

    #[test]
    fn header_dicts() {
        let d =
            parse_py_dict("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }").unwrap();
        assert_eq!(d["descr"], PyValue::Str("<f4".into()));
        assert_eq!(d["fortran_order"], PyValue::Bool(false));
        assert_eq!(d["shape"], PyValue::Tuple(vec![3, 4]));
        let d = parse_py_dict("{\"shape\": (5,), \"descr\": \"|u1\", \"fortran_order\": True}")
            .unwrap();
        assert_eq!(d["shape"], PyValue::Tuple(vec![5]));
        assert_eq!(
            parse_py_dict("{'shape': ()}").unwrap()["shape"],
            PyValue::Tuple(vec![])
        );
        assert!(parse_py_dict("{'descr': [('a', '<f4')]}").is_err());
        assert!(parse_py_dict("{'descr': '<f4'").is_err());
        assert!(parse_py_dict("{'shape': (3, x)}").is_err());
    }

    #[test]
    fn npy_arrays_and_their_errors() {
        let a = parse_npy(
            npy(
                "{'descr': '>i2', 'fortran_order': False, 'shape': (2,), }",
                &[0, 7, 1, 0],
            ),
            "a.npy",
        )
        .unwrap();
        assert_eq!(a.labels("a.npy").unwrap(), vec![7, 256]);
        let f = parse_npy(
            npy(
                "{'descr': '<f8', 'fortran_order': False, 'shape': (1, 1), }",
                &2.5f64.to_le_bytes(),
            ),
            "f.npy",
        )
        .unwrap();
        assert_eq!(f.floats(0, 1, false, "f").unwrap(), vec![2.5]);
        assert!(f
            .labels("f.npy")
            .unwrap_err()
            .to_string()
            .contains("integers"));
        let e = |b: Vec<u8>| parse_npy(b, "bad.npy").err().unwrap().to_string();
        assert!(e(b"PK\x03\x04 not numpy".to_vec()).contains("not a .npy"));
        assert!(e(npy(
            "{'descr': '<f4', 'fortran_order': True, 'shape': (1,), }",
            &[0; 4]
        ))
        .contains("Fortran"));
        assert!(e(npy(
            "{'descr': '<c8', 'fortran_order': False, 'shape': (1,), }",
            &[0; 8]
        ))
        .contains("<c8"));
        assert!(e(npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }",
            &[0; 4]
        ))
        .contains("truncated"));
        assert!(e(npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), ",
            &[0; 8]
        ))
        .contains("malformed"));
    }

    #[test]
    fn class_lists() {
        assert_eq!(parse_classes("3").unwrap(), vec!["0", "1", "2"]);
        assert_eq!(parse_classes("cat, dog").unwrap(), vec!["cat", "dog"]);
        assert!(parse_classes("a,,b").is_err());
        assert!(parse_classes("a,a").is_err());
        assert!(parse_classes("0").is_err());
    }
}
