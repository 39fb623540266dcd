//! The worker crate's error type: one enum, context (file, key, rank, RPC) carried in it.

use crate::collective;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Common(#[from] butler_common::Error),
    #[error(transparent)]
    Data(#[from] butler_data::Error),
    #[error("collective: {0}")]
    Collective(#[from] collective::CollectiveError),
    #[error("{op}: coordinator answered {code:?}: {message}")]
    Rpc {
        op: &'static str,
        code: tonic::Code,
        message: String,
    },
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("checkpoint {}: {reason}", file.display())]
    Checkpoint {
        file: std::path::PathBuf,
        reason: String,
    },
    #[error("{0}")]
    Setup(String),
    #[error("stopping: {0}")]
    Stopped(String),
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn rpc(op: &'static str) -> impl FnOnce(tonic::Status) -> Error {
    move |s| Error::Rpc {
        op,
        code: s.code(),
        message: s.message().to_string(),
    }
}
