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
    /// The job regrouped without this rank, or lost its coordinator: register again.
    #[error("regroup: {0}")]
    Regroup(String),
    /// SIGTERM: the job stopped at a committed step boundary on purpose.
    #[error("{0}")]
    Terminated(String),
}

impl Error {
    /// A failure the job may survive by regrouping from its commit point: a lost peer (its collective
    /// failed), a lost or restarted coordinator, a regroup the coordinator announced. Bad data, config,
    /// checkpoints, a diverged model or a failed job are not: they would fail again.
    pub fn is_transient(&self) -> bool {
        use tonic::Code;
        match self {
            Error::Collective(_) | Error::Regroup(_) => true,
            Error::Rpc { code, .. } => matches!(
                code,
                Code::Unavailable
                    | Code::FailedPrecondition
                    | Code::DeadlineExceeded
                    | Code::Cancelled
                    | Code::Unknown
            ),
            _ => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn rpc(op: &'static str) -> impl FnOnce(tonic::Status) -> Error {
    move |s| Error::Rpc {
        op,
        code: s.code(),
        message: s.message().to_string(),
    }
}
