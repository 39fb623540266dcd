//! The data crate's error type: one enum, and every variant names what a user must look at — the
//! manifest, the shard, the input file, the split.
//!
//! The messages are the ones users see (the coordinator's and the worker's errors wrap this enum
//! transparently; the binary prints the chain). Variants that carry a `source` print only their own
//! context and leave the cause to the chain, as `anyhow`'s `{:#}` shows it: `reading x.npy: No such
//! file or directory`.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The manifest cannot be read, does not parse, or contradicts itself or the request.
    #[error("manifest {path}: {message}")]
    Manifest { path: PathBuf, message: String },

    /// A shard is missing, corrupt (checksum, header, tensor shapes) or cannot be written.
    #[error("shard {path}: {message}")]
    Shard { path: PathBuf, message: String },

    /// A setting or value does not fit the dataset; `context` names the key (e.g. `data.unlabeled_split`).
    #[error("{context}: {message}")]
    Invalid { context: String, message: String },

    /// The streaming data loader could not start or deliver a batch (its message names the split or shard).
    #[error("{0}")]
    Loader(String),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// From the layer below: the config, the atomic writes of `fsutil`.
    #[error(transparent)]
    Common(#[from] butler_common::Error),

    /// `butler data import`: the request contradicts itself or the existing dataset (the message
    /// names the option or the dataset directory).
    #[error("{0}")]
    Import(String),

    /// `butler data import`: an input is malformed or does not fit; `input` names the file (an `.npz`
    /// member as `archive[member.npy]`).
    #[error("{input}: {message}")]
    Input { input: String, message: String },

    /// An I/O failure of an importer; `context` names the action and the file ("reading x.npy").
    #[error("{context}")]
    File {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// An error about one sample or record; `context` names the input and the sample ("y.npy: sample 3").
    #[error("{context}")]
    At {
        context: String,
        #[source]
        source: Box<Error>,
    },
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn invalid(context: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Invalid {
            context: context.into(),
            message: message.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
