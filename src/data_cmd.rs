//! `butler data`: turns the reference generators' output into butler shards plus a manifest, imports
//! datasets in other formats (the flags here; the importers are `butler_data::import`), and checks
//! existing datasets.

use anyhow::{anyhow, bail, Context, Result};
use butler_data::import::{self, ClassOrigin, ClassSpec, SplitSpec, SplitWriter};
use butler_data::manifest::{
    Manifest, ShardEntry, ShardFormat, Split, MANIFEST_FILE, MANIFEST_FORMAT, MANIFEST_VERSION,
};
use butler_data::shard::{read_shard_checked, write_shard, CorruptPolicy, ShardData};
use safetensors::tensor::{Dtype, SafeTensors};
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

const DATAGEN: &str = include_str!("../scripts/datagen.py");

#[derive(clap::Subcommand)]
pub enum DataCommand {
    /// Generate a dataset offline with its reference package and write butler shards.
    Prepare {
        #[arg(value_enum)]
        dataset: Dataset,
        /// Output directory (default: data/DATASET).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Samples per shard.
        #[arg(long, default_value_t = 1000)]
        shard_size: usize,
        /// Python with the generator packages (default: $BUTLER_PYTHON, then .venv/bin/python, then python3).
        #[arg(long)]
        python: Option<PathBuf>,
        /// mnist1d only: instead of rebuilding train/test, add an unlabeled split of this many freshly
        /// generated samples to the existing dataset (generated 100,000 at a time).
        #[arg(long)]
        num_samples: Option<u64>,
        /// Name of the unlabeled split that --num-samples writes (default: unlabeled).
        #[arg(long)]
        split: Option<String>,
        /// With --num-samples: generator seed of the first 100,000-sample chunk; chunk k uses
        /// seed + k. The range must not include 42, the seed of train/test.
        #[arg(long, default_value_t = POOL_SEED)]
        seed: u64,
        /// Hold out this many samples of the train split as a `val` split, stratified by class (the
        /// same count per class up to rounding; a fixed draw, the same on every machine). Jobs name it
        /// with `data.val_split = "val"`: they evaluate on it while training and on the test split
        /// once, at the end.
        #[arg(long, default_value_t = 0)]
        val: u64,
    },
    /// Import a dataset from .npy/.npz, an image folder, CIFAR-10/100 binaries or MNIST IDX files.
    Import(ImportArgs),
    /// Print a dataset's summary and verify every shard's checksum and shapes.
    Inspect {
        path: PathBuf,
        /// Fail on the first corrupt sample instead of counting and listing the skipped ones.
        #[arg(long)]
        strict: bool,
    },
}

/// Default seed of the first chunk of `prepare mnist1d --num-samples` (chunk k: POOL_SEED + k).
const POOL_SEED: u64 = 1000;
/// Samples generated per generator run for `prepare mnist1d --num-samples`.
const POOL_CHUNK: u64 = 100_000;

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Dataset {
    /// MNIST-1D (Greydanus 2020): 4000 train / 1000 test sequences of length 40, 10 classes.
    Mnist1d,
    /// MNIST-1D as the source domain (train/test) plus a shifted target domain from the same generator
    /// (target_train/target_test: larger shear, scale and noise, wider translation, another seed).
    Mnist1dShift,
    /// scikit-learn's 8×8 digits: 1437 train / 360 test (stratified 80/20, seed 0), 10 classes.
    Digits,
}

impl Dataset {
    fn name(self) -> &'static str {
        match self {
            Dataset::Mnist1d => "mnist1d",
            Dataset::Mnist1dShift => "mnist1d-shift",
            Dataset::Digits => "digits",
        }
    }
}

pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Prepare {
            dataset,
            out,
            shard_size,
            python,
            num_samples,
            split,
            seed,
            val,
        } => {
            let out = out.unwrap_or_else(|| PathBuf::from("data").join(dataset.name()));
            match num_samples {
                Some(n) => {
                    if !matches!(dataset, Dataset::Mnist1d) {
                        bail!("--num-samples is only for mnist1d");
                    }
                    let split = split.unwrap_or_else(|| "unlabeled".into());
                    prepare_pool(&out, n, &split, seed, shard_size, val, python)
                }
                None => {
                    if split.is_some() {
                        bail!("--split names the unlabeled split of --num-samples; give both or neither");
                    }
                    prepare(dataset, &out, shard_size, val, python)
                }
            }
        }
        DataCommand::Import(args) => import(args),
        DataCommand::Inspect { path, strict } => inspect(&path, strict),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ImportSource {
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

impl ImportSource {
    fn name(self) -> &'static str {
        match self {
            ImportSource::Npz => "npz",
            ImportSource::Npy => "npy",
            ImportSource::Imagefolder => "imagefolder",
            ImportSource::Cifar10 => "cifar10",
            ImportSource::Cifar100 => "cifar100",
            ImportSource::Idx => "idx",
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
    pub from: ImportSource,
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

/// `butler data import`: checks the flags against `--from`, then hands the import to
/// [`butler_data::import`] and prints its summary.
fn import(a: ImportArgs) -> Result<()> {
    if a.shard_size == 0 {
        bail!("--shard-size must be at least 1");
    }
    if a.format == OutFormat::Tar && a.from != ImportSource::Imagefolder {
        bail!("--format tar stores encoded images, so it needs --from imagefolder");
    }
    let one_input = || -> Result<PathBuf> {
        match a.inputs.as_slice() {
            [one] => Ok(one.clone()),
            [] => bail!("--from {} needs an input path", a.from.name()),
            _ => bail!(
                "--from {} takes one input path, got {}",
                a.from.name(),
                a.inputs.len()
            ),
        }
    };
    if a.images.is_some() && a.from != ImportSource::Idx {
        bail!("--images is for --from idx");
    }
    if a.labels.is_some() && !matches!(a.from, ImportSource::Idx | ImportSource::Npy) {
        bail!("--labels is for --from npy and --from idx");
    }
    let classes = a
        .classes
        .as_deref()
        .map(import::parse_classes)
        .transpose()?;
    let opts = import::ImportOptions {
        out: a.out.clone(),
        split: a.split.clone(),
        unlabeled: a.unlabeled,
        shard_size: a.shard_size,
        name: a.name.clone(),
        classes,
    };
    let source = match a.from {
        ImportSource::Npz => import::Source::Npz {
            path: one_input()?,
            x_key: a.x_key.clone(),
            y_key: a.y_key.clone(),
            raw_u8: a.raw_u8,
        },
        ImportSource::Npy => import::Source::Npy {
            path: one_input()?,
            labels: a.labels.clone(),
            raw_u8: a.raw_u8,
        },
        ImportSource::Imagefolder => import::Source::ImageFolder {
            dir: one_input()?,
            format: match a.format {
                OutFormat::Safetensors => ShardFormat::Safetensors,
                OutFormat::Tar => ShardFormat::Tar,
            },
        },
        ImportSource::Cifar10 | ImportSource::Cifar100 => import::Source::Cifar {
            inputs: a.inputs.clone(),
            hundred: a.from == ImportSource::Cifar100,
        },
        ImportSource::Idx => {
            if !a.inputs.is_empty() {
                bail!("--from idx takes --images FILE [--labels FILE], not positional inputs");
            }
            let images = a
                .images
                .clone()
                .ok_or_else(|| anyhow!("--from idx needs --images FILE"))?;
            import::Source::Idx {
                images,
                labels: a.labels.clone(),
            }
        }
    };
    let report = import::import(&opts, &source, &mut |note| eprintln!("{note}"))?;
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

fn find_python(explicit: Option<PathBuf>) -> PathBuf {
    explicit
        .or_else(|| std::env::var_os("BUTLER_PYTHON").map(PathBuf::from))
        .or_else(|| Some(PathBuf::from(".venv/bin/python")).filter(|p| p.exists()))
        .unwrap_or_else(|| PathBuf::from("python3"))
}

fn prepare(
    dataset: Dataset,
    out: &Path,
    shard_size: usize,
    val: u64,
    python: Option<PathBuf>,
) -> Result<()> {
    if shard_size == 0 {
        bail!("--shard-size must be at least 1");
    }
    let python = find_python(python);
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    // Everything is built in a sibling directory and swapped in at the end: an interrupted prepare
    // leaves the previous dataset (or nothing), never a half-written one.
    let staging = parent.join(format!(
        ".staging-{}-{}",
        dataset.name(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)?;
    let result = build(dataset, &staging, shard_size, val, &python);
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    let old = parent.join(format!(".old-{}-{}", dataset.name(), std::process::id()));
    if out.exists() {
        std::fs::rename(out, &old)
            .with_context(|| format!("moving the previous {} aside", out.display()))?;
    }
    std::fs::rename(&staging, out)
        .with_context(|| format!("moving the new dataset into {}", out.display()))?;
    let _ = std::fs::remove_dir_all(&old);
    println!("wrote {}", out.join(MANIFEST_FILE).display());
    inspect(out, true)
}

/// Removes a scratch file when dropped (the generator's raw output, on success or error).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Generator processes still running; on an early return they are stopped before their scratch files
/// are removed, so nothing is written after we are gone.
struct Generators(VecDeque<(Child, Scratch)>);

impl Drop for Generators {
    fn drop(&mut self) {
        for (child, _) in self.0.iter_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `prepare mnist1d --num-samples N`: adds an unlabeled split of N samples from the same generator
/// to the existing dataset. The generator runs once per 100,000-sample chunk (chunk k with seed
/// `seed + k`, up to two runs at a time), and each chunk is written shard by shard and dropped before
/// the next is read, so memory stays at one chunk however large N is.
fn prepare_pool(
    out: &Path,
    n: u64,
    split: &str,
    seed: u64,
    shard_size: usize,
    val: u64,
    python: Option<PathBuf>,
) -> Result<()> {
    if n == 0 {
        bail!("--num-samples must be at least 1");
    }
    if !out.join(MANIFEST_FILE).is_file() {
        // The pool joins MNIST-1D's train/test splits, so a pool directory starts as the dataset.
        println!(
            "{} has no dataset yet: preparing MNIST-1D's train/test splits there first",
            out.display()
        );
        prepare(Dataset::Mnist1d, out, shard_size, val, python.clone())?;
    } else if val > 0 {
        bail!(
            "--val holds out a validation split when the dataset is generated, but {} exists: \
             prepare the dataset with --val first (into an empty directory), then add the pool",
            out.display()
        );
    }
    let (base, _) = Manifest::load(out)?;
    if base.splits.get(split).is_some_and(|s| s.labeled) {
        bail!(
            "split {split:?} of {} is labeled; choose another --split for the unlabeled samples",
            out.display()
        );
    }
    let chunks = n.div_ceil(POOL_CHUNK);
    let last_seed = seed
        .checked_add(chunks - 1)
        .context("--seed is too large")?;
    if (seed..=last_seed).contains(&42) {
        bail!("--seed {seed}: chunk seeds {seed}..={last_seed} include 42, the seed of train/test, so the pool would repeat their samples");
    }
    let python = find_python(python);
    let mut source = BTreeMap::new();
    source.insert(
        "generator".into(),
        "mnist1d.data.make_dataset (x and x_test of each chunk; labels discarded)".into(),
    );
    source.insert(
        "chunks".into(),
        format!("{chunks} of up to {POOL_CHUNK} samples, default arguments except num_samples and seed; chunk k uses seed {seed}+k"),
    );
    source.insert("num_samples".into(), n.to_string());
    let numel = base.sample_numel();
    let mut writer = SplitWriter::begin(
        out,
        SplitSpec {
            split: split.to_string(),
            sample_shape: base.sample_shape.clone(),
            classes: ClassSpec {
                names: base.classes.clone(),
                origin: ClassOrigin::Default,
            },
            labeled: false,
            format: ShardFormat::Safetensors,
            shard_size,
            name: None,
            source,
        },
    )?;
    let scratch_dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let parallel = std::thread::available_parallelism().map_or(1, |p| p.get().min(2)) as u64;
    let chunk_len = |k: u64| POOL_CHUNK.min(n - k * POOL_CHUNK);
    let start = |k: u64| -> Result<(Child, Scratch)> {
        let raw =
            Scratch(scratch_dir.join(format!(".pool-{}-{k}.safetensors", std::process::id())));
        let child = Command::new(&python)
            .arg("-c")
            .arg(DATAGEN)
            .arg("mnist1d-pool")
            .arg(&raw.0)
            .arg(chunk_len(k).to_string())
            .arg((seed + k).to_string())
            .spawn()
            .with_context(|| format!("running {} (set --python or BUTLER_PYTHON to a python with the generator packages)", python.display()))?;
        Ok((child, raw))
    };
    let mut running = Generators(VecDeque::new());
    let mut next = 0;
    let mut done = 0u64;
    for k in 0..chunks {
        while next < chunks && running.0.len() < parallel as usize {
            running.0.push_back(start(next)?);
            next += 1;
        }
        let (mut child, raw) = running.0.pop_front().expect("started above");
        let status = child.wait()?;
        if !status.success() {
            bail!("the mnist1d generator failed on chunk {k} ({status}); see its output above");
        }
        let bytes =
            std::fs::read(&raw.0).with_context(|| format!("reading {}", raw.0.display()))?;
        let st = SafeTensors::deserialize(&bytes)
            .context("the generator wrote an invalid safetensors file")?;
        let x = st.tensor("x").context("the generator wrote no x")?;
        let mut want = vec![chunk_len(k) as usize];
        want.extend_from_slice(&base.sample_shape);
        if x.dtype() != Dtype::F32 || x.shape() != want.as_slice() {
            bail!(
                "generator wrote x as {:?}{:?}, expected F32{want:?}",
                x.dtype(),
                x.shape()
            );
        }
        let mut sample = vec![0f32; numel];
        for row in x.data().chunks_exact(numel * 4) {
            for (v, c) in sample.iter_mut().zip(row.chunks_exact(4)) {
                *v = f32::from_le_bytes(c.try_into().expect("4 bytes"));
            }
            writer.push(&sample, None)?;
        }
        drop(raw);
        done += chunk_len(k);
        eprintln!("generated {done}/{n} samples");
    }
    writer.finish()?;
    println!(
        "wrote split {split:?} to {}",
        out.join(MANIFEST_FILE).display()
    );
    inspect(out, true)
}

fn build(dataset: Dataset, dir: &Path, shard_size: usize, val: u64, python: &Path) -> Result<()> {
    let raw = dir.join("raw.safetensors");
    let status = Command::new(python)
        .arg("-c")
        .arg(DATAGEN)
        .arg(dataset.name())
        .arg(&raw)
        .status()
        .with_context(|| format!("running {} (set --python or BUTLER_PYTHON to a python with the generator packages; scripts/setup-python.sh makes one)", python.display()))?;
    if !status.success() {
        bail!(
            "the {} generator failed ({status}); see its output above",
            dataset.name()
        );
    }
    let bytes = std::fs::read(&raw).with_context(|| format!("reading {}", raw.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .context("the generator wrote an invalid safetensors file")?;
    let meta = SafeTensors::read_metadata(&bytes)
        .context("reading generator metadata")?
        .1;
    let meta = meta.metadata().clone().unwrap_or_default();
    let classes: Vec<String> =
        serde_json::from_str(meta.get("classes").map(String::as_str).unwrap_or("[]"))?;
    let source: BTreeMap<String, String> =
        serde_json::from_str(meta.get("source").map(String::as_str).unwrap_or("{}"))?;

    let split_names: Vec<String> = match meta.get("splits") {
        Some(s) => serde_json::from_str(s).context("the generator's `splits` metadata")?,
        None => vec!["train".into(), "test".into()],
    };
    let mut arrays: Vec<(String, Vec<f32>, Vec<i64>)> = Vec::new();
    let mut sample_shape = Vec::new();
    for split in split_names.iter().map(String::as_str) {
        let x = st.tensor(&format!("x_{split}"))?;
        let y = st.tensor(&format!("y_{split}"))?;
        if x.dtype() != Dtype::F32 || y.dtype() != Dtype::I64 {
            bail!(
                "generator wrote x_{split} as {:?} and y_{split} as {:?}, expected F32 and I64",
                x.dtype(),
                y.dtype()
            );
        }
        let n = x.shape()[0];
        sample_shape = x.shape()[1..].to_vec();
        let numel: usize = sample_shape.iter().product();
        let xs: Vec<f32> = x
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        let ys: Vec<i64> = y
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        if xs.len() != n * numel || ys.len() != n {
            bail!(
                "generator wrote {split} with {} values for {n} samples and {} labels",
                xs.len(),
                ys.len()
            );
        }
        arrays.push((split.to_string(), xs, ys));
    }
    if val > 0 {
        let k = arrays
            .iter()
            .position(|(name, ..)| name == "train")
            .context("--val holds out part of the train split, and this dataset has none")?;
        let (_, xs, ys) = arrays.remove(k);
        let numel: usize = sample_shape.iter().product();
        let held = stratified_holdout(&ys, classes.len(), val)?;
        let mut parts = [(Vec::new(), Vec::new()), (Vec::new(), Vec::new())];
        for (i, &y) in ys.iter().enumerate() {
            let (px, py) = &mut parts[held[i] as usize];
            px.extend_from_slice(&xs[i * numel..(i + 1) * numel]);
            py.push(y);
        }
        let [(tx, ty), (vx, vy)] = parts;
        arrays.insert(k, ("val".into(), vx, vy));
        arrays.insert(k, ("train".into(), tx, ty));
    }
    let numel: usize = sample_shape.iter().product();
    let mut splits = BTreeMap::new();
    let mut next_id = 0u64;
    for (split, xs, ys) in &arrays {
        let n = ys.len();
        let mut shards = Vec::new();
        for (k, start) in (0..n).step_by(shard_size).enumerate() {
            let end = (start + shard_size).min(n);
            let name = format!("{split}-{k:05}.safetensors");
            let data = ShardData {
                x: xs[start * numel..end * numel].to_vec(),
                y: Some(ys[start..end].to_vec()),
                ids: (next_id + start as u64..next_id + end as u64).collect(),
            };
            let sha256 = write_shard(&dir.join(&name), &sample_shape, &data)?;
            shards.push(ShardEntry {
                path: name,
                format: ShardFormat::Safetensors,
                num_samples: (end - start) as u64,
                sha256,
                first_id: next_id + start as u64,
            });
        }
        next_id += n as u64;
        splits.insert(
            split.to_string(),
            Split {
                num_samples: n as u64,
                labeled: true,
                shards,
                class_counts: Some(class_counts(ys, classes.len())?),
            },
        );
    }
    std::fs::remove_file(&raw)?;
    let manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        version: MANIFEST_VERSION,
        name: dataset.name().into(),
        sample_shape,
        dtype: "f32".into(),
        classes,
        splits,
        source,
    };
    manifest.validate(&dir.join(MANIFEST_FILE))?;
    butler_common::fsutil::write_atomic(
        &dir.join(MANIFEST_FILE),
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;
    Ok(())
}

/// Which samples `--val` holds out (true) of a split with labels `ys`: `val` in all, each class's
/// share proportional to its count (largest remainders, ties to the lower class), each class's
/// samples picked by a fixed-seed shuffle, so the split is the same wherever it is prepared.
fn stratified_holdout(ys: &[i64], classes: usize, val: u64) -> Result<Vec<bool>> {
    let n = ys.len() as u64;
    if val >= n {
        bail!("--val {val}: the train split has only {n} samples");
    }
    let counts = class_counts(ys, classes)?;
    let mut quota: Vec<u64> = counts.iter().map(|&c| c * val / n).collect();
    let mut order: Vec<usize> = (0..classes).collect();
    // Largest remainder first; the sort is stable, so ties keep the lower class first.
    order.sort_by_key(|&c| std::cmp::Reverse(counts[c] * val % n));
    let missing = val - quota.iter().sum::<u64>();
    for &c in order.iter().take(missing as usize) {
        quota[c] += 1;
    }
    let mut held = vec![false; ys.len()];
    for (c, &q) in quota.iter().enumerate() {
        let mut members: Vec<usize> = (0..ys.len()).filter(|&i| ys[i] == c as i64).collect();
        let mut rng = butler_data::rng::MixRng::new(0x7661_6c00 + c as u64);
        // Fisher–Yates on the class's positions.
        for i in (1..members.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            members.swap(i, j);
        }
        for &i in members.iter().take(q as usize) {
            held[i] = true;
        }
    }
    Ok(held)
}

fn class_counts(labels: &[i64], classes: usize) -> Result<Vec<u64>> {
    let mut counts = vec![0u64; classes];
    for &l in labels {
        match counts.get_mut(usize::try_from(l).unwrap_or(usize::MAX)) {
            Some(c) => *c += 1,
            None => bail!("the generator produced label {l}, outside 0..{classes}"),
        }
    }
    Ok(counts)
}

fn inspect(path: &Path, strict: bool) -> Result<()> {
    let (m, file) = Manifest::load(path)?;
    let dir = file.parent().unwrap_or(Path::new("."));
    println!(
        "dataset {:?}: sample shape {:?} {}, {} classes",
        m.name,
        m.sample_shape,
        m.dtype,
        m.num_classes()
    );
    let policy = if strict {
        CorruptPolicy::Fail
    } else {
        CorruptPolicy::Skip
    };
    let mut total_skipped = 0;
    for (name, split) in &m.splits {
        let mut counts = vec![0u64; m.num_classes()];
        let mut skipped = Vec::new();
        for entry in &split.shards {
            let (d, sk) = read_shard_checked(dir, &m, entry, split.labeled, policy)?;
            for &l in d.y.iter().flatten() {
                counts[l as usize] += 1;
            }
            skipped.extend(sk);
        }
        let formats: std::collections::BTreeSet<String> =
            split.shards.iter().map(|e| e.format.to_string()).collect();
        let ids = match (split.shards.first(), split.shards.last()) {
            (Some(a), Some(b)) if split.num_samples > 0 => {
                format!(", ids {}..{}", a.first_id, b.first_id + b.num_samples - 1)
            }
            _ => String::new(),
        };
        println!(
            "  {name}: {} samples in {} {} shards, {}{ids}, checksums ok{}{}",
            split.num_samples,
            split.shards.len(),
            formats.into_iter().collect::<Vec<_>>().join("+"),
            if split.labeled {
                "labeled"
            } else {
                "unlabeled"
            },
            if split.labeled {
                format!(", per class {counts:?}")
            } else {
                String::new()
            },
            if skipped.is_empty() {
                String::new()
            } else {
                format!(", {} corrupt samples skipped", skipped.len())
            }
        );
        for s in skipped.iter().take(10) {
            println!("    skipped {s}");
        }
        if skipped.len() > 10 {
            println!("    … and {} more", skipped.len() - 10);
        }
        total_skipped += skipped.len();
    }
    if total_skipped > 0 {
        println!("{total_skipped} corrupt samples in all: readers with the skip policy leave them out; `inspect --strict` fails on them");
    }
    Ok(())
}
