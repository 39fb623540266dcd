//! `butler data import`: converts datasets in common on-disk formats — NumPy `.npy`/`.npz` (`npz`), a
//! folder of images per class (`images`), the CIFAR-10/100 binary batches (`cifar`), MNIST's IDX files
//! (`idx`) — into butler shards plus a manifest (see `docs/shard-format.md`).
//!
//! A split is written into a staging directory next to the output; the finished directory replaces
//! the old one only at the end, so an import that fails (malformed input, wrong shape, bad label)
//! leaves the previous dataset — or nothing — behind, never a half-written one. Importing into an
//! existing dataset adds (or replaces) one split and keeps the others (their files are hard-linked
//! into the staging directory, so nothing large is copied); the sample shape must agree, the classes
//! too, and the new split's ids start after every id the other splits use.
//!
//! [`SplitWriter`] (in `writer`) is the importers' writer; the binary's `butler data prepare` uses it
//! too. This module holds the dispatch only: each format module imports the shared machinery from
//! `writer`, never from here.

/// An [`Error::Import`] from a format string.
macro_rules! import_err {
    ($($arg:tt)*) => {
        $crate::Error::Import(format!($($arg)*))
    };
}

/// Returns an [`Error::Import`] from a format string.
macro_rules! fail {
    ($($arg:tt)*) => {
        return Err(import_err!($($arg)*))
    };
}

/// An [`Error::Input`] naming `input` (anything `Display`, e.g. `path.display()`).
macro_rules! input_err {
    ($input:expr, $($arg:tt)*) => {
        $crate::Error::Input {
            input: $input.to_string(),
            message: format!($($arg)*),
        }
    };
}

/// Returns an [`Error::Input`] naming `input`.
macro_rules! fail_input {
    ($input:expr, $($arg:tt)*) => {
        return Err(input_err!($input, $($arg)*))
    };
}

mod cifar;
mod idx;
mod images;
mod npz;
mod writer;

pub use writer::{
    parse_classes, ClassOrigin, ClassSpec, ImportOptions, SplitReport, SplitSpec, SplitWriter,
};

use crate::manifest::ShardFormat;
use crate::{Error, Result};
use std::path::PathBuf;

/// The input of an import, one variant per format.
#[derive(Clone, Debug)]
pub enum Source {
    /// A NumPy `.npz` archive holding arrays `x_key` and optionally `y_key`. `raw_u8`: keep uint8
    /// values 0..255 instead of dividing by 255.
    Npz {
        path: PathBuf,
        x_key: String,
        y_key: String,
        raw_u8: bool,
    },
    /// A NumPy `.npy` file of samples, labels from an optional `.npy` of integers.
    Npy {
        path: PathBuf,
        labels: Option<PathBuf>,
        raw_u8: bool,
    },
    /// A directory with one sub-folder of PNG/JPEG images per class (sorted names = classes), written
    /// as decoded safetensors shards or, with `format` = [`ShardFormat::Tar`], as the encoded images.
    ImageFolder { dir: PathBuf, format: ShardFormat },
    /// The CIFAR-10 (or, with `hundred`, CIFAR-100: fine labels) binary batches: a directory or the
    /// batch files.
    Cifar { inputs: Vec<PathBuf>, hundred: bool },
    /// MNIST-style IDX files: images (magic 0x00000803) and optional labels (0x00000801).
    Idx {
        images: PathBuf,
        labels: Option<PathBuf>,
    },
}

/// Imports `source` as split `opts.split` of the dataset at `opts.out`. `note` receives remarks a user
/// should see (input that was skipped); the binary prints them.
pub fn import(
    opts: &ImportOptions,
    source: &Source,
    note: &mut dyn FnMut(&str),
) -> Result<SplitReport> {
    match source {
        Source::Npz {
            path,
            x_key,
            y_key,
            raw_u8,
        } => {
            let (x, y) = npz::read_npz(path, x_key, y_key)?;
            npz::import_arrays(opts, path, x, y, *raw_u8)
        }
        Source::Npy {
            path,
            labels,
            raw_u8,
        } => {
            let x = npz::read_npy_file(path)?;
            let y = labels
                .as_deref()
                .map(|p| Ok::<_, Error>((p.to_path_buf(), npz::read_npy_file(p)?)))
                .transpose()?;
            npz::import_arrays(opts, path, (path.display().to_string(), x), y, *raw_u8)
        }
        Source::ImageFolder { dir, format } => images::import_imagefolder(opts, dir, *format, note),
        Source::Cifar { inputs, hundred } => cifar::import_cifar(opts, inputs, *hundred),
        Source::Idx { images, labels } => idx::import_idx(opts, images, labels.as_deref()),
    }
}
