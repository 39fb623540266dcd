use std::path::PathBuf;

/// Errors of the shared layer. Every variant names what a user must look at: the file, the key, the shard.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config {path}: {message}")]
    Config { path: PathBuf, message: String },

    #[error("manifest {path}: {message}")]
    Manifest { path: PathBuf, message: String },

    #[error("shard {path}: {message}")]
    Shard { path: PathBuf, message: String },

    #[error("{context}: {message}")]
    Invalid { context: String, message: String },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
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
