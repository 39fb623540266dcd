//! `--from cifar10|cifar100`: the CIFAR binary batches (a label byte — CIFAR-100: coarse, then fine —
//! followed by 3×32×32 pixel bytes per record).

use super::writer::{
    numbered, sorted_entries, ClassOrigin, ClassSpec, ImportOptions, SplitReport, WithContext,
};
use crate::manifest::ShardFormat;
use crate::Result;
use std::collections::BTreeMap;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

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
        [] => fail!(
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
                fail_input!(
                    dir.display(),
                    "no {set} binary batch {} for split {split:?}{}",
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
                fail_input!(
                    d.display(),
                    "give either one directory or batch files, not both"
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
        fail_input!(
            path.display(),
            "lists {} class names, expected {k}",
            names.len()
        );
    }
    Ok(names)
}

pub(super) fn import_cifar(
    opts: &ImportOptions,
    inputs: &[PathBuf],
    hundred: bool,
) -> Result<SplitReport> {
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
            fail!(
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
        let n = std::fs::metadata(f)
            .with_context(|| format!("reading {}", f.display()))?
            .len() as usize
            / record;
        for i in 0..n {
            r.read_exact(&mut buf)
                .with_context(|| format!("{}: reading record {i}", f.display()))?;
            let label = buf[label_bytes - 1] as i64; // CIFAR-100: coarse, then fine
            if label >= k {
                fail_input!(f.display(), "record {i} has label {label}, outside 0..{k}");
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
