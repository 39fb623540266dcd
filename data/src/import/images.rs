//! `--from imagefolder`: one sub-folder of PNG/JPEG images per class, decoded to safetensors shards
//! or kept encoded in tar shards.

use super::writer::{
    sorted_entries, ClassOrigin, ClassSpec, ImportOptions, SplitReport, WithContext,
};
use crate::manifest::ShardFormat;
use crate::webdataset::{decode_image, image_extension, DecodedImage};
use crate::Result;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub(super) fn import_imagefolder(
    opts: &ImportOptions,
    dir: &Path,
    format: ShardFormat,
    note: &mut dyn FnMut(&str),
) -> Result<SplitReport> {
    if !dir.is_dir() {
        fail_input!(
            dir.display(),
            "not a directory (expected one sub-folder of images per class)"
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
        note(&format!(
            "note: ignoring {} image(s) directly in {} (not in a class folder), e.g. {}",
            top_images.len(),
            dir.display(),
            top_images[0].display()
        ));
    }
    if class_dirs.is_empty() && !opts.unlabeled {
        fail_input!(dir.display(), "has no class sub-folders (one folder of images per class); pass --unlabeled to import loose images"
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
        fail_input!(dir.display(), "holds no .png/.jpg/.jpeg images");
    };
    let first = first.clone();
    let shape = decode_file(&first)?.shape;
    let classes = ClassSpec {
        names: class_dirs.iter().map(|(n, _)| n.clone()).collect(),
        origin: ClassOrigin::FromData,
    };
    let out_format = format;
    let mut source = BTreeMap::new();
    source.insert(
        "importer".into(),
        format!("butler data import --from imagefolder ({})", dir.display()),
    );
    let mut w = opts.begin(shape.to_vec(), classes, labeled, out_format, source)?;
    for (path, label) in &files {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let img = decode_image(&bytes).map_err(|e| input_err!(path.display(), "{e}"))?;
        if img.shape != shape {
            fail_input!(path.display(), "image is {:?} (C, H, W) but {} is {:?}; all images must have the same size and channels",
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

fn decode_file(path: &Path) -> Result<DecodedImage> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    decode_image(&bytes).map_err(|e| input_err!(path.display(), "{e}"))
}
