//! `butler data`: turns the reference generators' output into butler shards plus a manifest, and checks
//! existing datasets.

use anyhow::{bail, Context, Result};
use butler_common::manifest::{
    Manifest, ShardEntry, Split, MANIFEST_FILE, MANIFEST_FORMAT, MANIFEST_VERSION,
};
use butler_common::shard::{read_shard, write_shard, ShardData};
use safetensors::tensor::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const DATAGEN: &str = include_str!("../scripts/datagen.py");

#[derive(clap::Subcommand)]
pub enum DataCommand {
    /// Generate a dataset offline with its reference package and write butler shards.
    Prepare {
        #[arg(value_enum)]
        dataset: Dataset,
        /// Output directory (default: data/<dataset>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Samples per shard.
        #[arg(long, default_value_t = 1000)]
        shard_size: usize,
        /// Python with the generator packages (default: $BUTLER_PYTHON, then .venv/bin/python, then python3).
        #[arg(long)]
        python: Option<PathBuf>,
    },
    /// Print a dataset's summary and verify every shard's checksum and shapes.
    Inspect { path: PathBuf },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Dataset {
    /// MNIST-1D (Greydanus 2020): 4000 train / 1000 test sequences of length 40, 10 classes.
    Mnist1d,
    /// scikit-learn's 8×8 digits: 1437 train / 360 test (stratified 80/20, seed 0), 10 classes.
    Digits,
}

impl Dataset {
    fn name(self) -> &'static str {
        match self {
            Dataset::Mnist1d => "mnist1d",
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
        } => {
            let out = out.unwrap_or_else(|| PathBuf::from("data").join(dataset.name()));
            prepare(dataset, &out, shard_size, python)
        }
        DataCommand::Inspect { path } => inspect(&path),
    }
}

fn find_python(explicit: Option<PathBuf>) -> PathBuf {
    explicit
        .or_else(|| std::env::var_os("BUTLER_PYTHON").map(PathBuf::from))
        .or_else(|| Some(PathBuf::from(".venv/bin/python")).filter(|p| p.exists()))
        .unwrap_or_else(|| PathBuf::from("python3"))
}

fn prepare(dataset: Dataset, out: &Path, shard_size: usize, python: Option<PathBuf>) -> Result<()> {
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
    let result = build(dataset, &staging, shard_size, &python);
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
    inspect(out)
}

fn build(dataset: Dataset, dir: &Path, shard_size: usize, python: &Path) -> Result<()> {
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

    let mut splits = BTreeMap::new();
    let mut sample_shape = Vec::new();
    let mut next_id = 0u64;
    for split in ["train", "test"] {
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
                class_counts: Some(class_counts(&ys, classes.len())?),
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

fn inspect(path: &Path) -> Result<()> {
    let (m, file) = Manifest::load(path)?;
    let dir = file.parent().unwrap_or(Path::new("."));
    println!(
        "dataset {:?}: sample shape {:?} {}, {} classes",
        m.name,
        m.sample_shape,
        m.dtype,
        m.num_classes()
    );
    for (name, split) in &m.splits {
        let mut counts = vec![0u64; m.num_classes()];
        for entry in &split.shards {
            let d = read_shard(dir, &m, entry, split.labeled)?;
            for &l in d.y.iter().flatten() {
                counts[l as usize] += 1;
            }
        }
        println!(
            "  {name}: {} samples in {} shards, {}, checksums ok{}",
            split.num_samples,
            split.shards.len(),
            if split.labeled {
                "labeled"
            } else {
                "unlabeled"
            },
            if split.labeled {
                format!(", per class {counts:?}")
            } else {
                String::new()
            }
        );
    }
    Ok(())
}
