//! The collectives' error type: every variant that concerns a peer names its rank.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

/// Result type of the collectives.
pub type Result<T> = std::result::Result<T, CollectiveError>;

/// Errors of the collectives (TCP ring and NCCL). Every peer-related variant names the peer's rank in
/// its message (see [`CollectiveError::peer_rank`]).
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// A caller error detected locally, before anything was sent.
    #[error("{op}: invalid argument: {detail}")]
    InvalidArgument { op: &'static str, detail: String },
    /// Binding the listener failed.
    #[error("rendezvous: could not bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// Connecting to the successor failed until the deadline.
    #[error("rendezvous: could not connect to rank {rank} at {addr}: {source}")]
    Connect {
        rank: usize,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// The predecessor never connected.
    #[error("rendezvous: rank {rank} did not connect within {timeout:?} (listening on {local})")]
    AcceptTimeout {
        rank: usize,
        timeout: Duration,
        local: SocketAddr,
    },
    /// A local socket error while setting up the ring.
    #[error("rendezvous with rank {rank}: {context}: {source}")]
    Setup {
        rank: usize,
        context: &'static str,
        #[source]
        source: io::Error,
    },
    /// The handshake with a neighbour failed (wrong generation, world size, version, ...).
    #[error("handshake with rank {rank}: {detail}")]
    Handshake { rank: usize, detail: String },
    /// A blocking read or write on a neighbour's connection exceeded the timeout.
    #[error("{op}: peer rank {rank} timed out after {timeout:?} ({what})")]
    Timeout {
        op: &'static str,
        rank: usize,
        timeout: Duration,
        what: &'static str,
    },
    /// The neighbour closed (EOF) or reset the connection.
    #[error("{op}: peer rank {rank} closed the connection{how}")]
    PeerClosed {
        op: &'static str,
        rank: usize,
        how: &'static str,
    },
    /// Any other I/O error on a neighbour's connection.
    #[error("{op}: I/O error with peer rank {rank}: {source}")]
    PeerIo {
        op: &'static str,
        rank: usize,
        #[source]
        source: io::Error,
    },
    /// The predecessor sent something unexpected (ranks out of step, size mismatch, garbage).
    #[error("{op}: protocol error from peer rank {rank}: {detail}")]
    Protocol {
        op: &'static str,
        rank: usize,
        detail: String,
    },
    /// The predecessor gave up on the operation; `origin` is the rank that first failed.
    #[error("{op}: peer rank {rank} aborted the operation (root cause at rank {origin}: {cause})")]
    PeerAborted {
        op: &'static str,
        rank: usize,
        origin: usize,
        cause: String,
    },
    /// An earlier operation failed; the ring's connections are closed.
    #[error("{op}: ring unusable after an earlier failure: {cause}")]
    Poisoned { op: &'static str, cause: String },
    /// A backend's library or device is missing on this machine.
    #[error(
        "{what} is not available: {detail} (run `butler doctor` to see what this machine offers)"
    )]
    Unavailable { what: String, detail: String },
    /// NCCL or the CUDA driver returned an error.
    #[error("{op}: NCCL: {detail}")]
    Nccl { op: &'static str, detail: String },
    /// An NCCL operation did not complete on the device in time; the communicator was aborted. NCCL
    /// cannot tell which peer is gone: `rank` is the one the coordinator reported, if any.
    #[error("{op}: NCCL did not complete within {timeout:?}, communicator aborted ({what})")]
    DeviceTimeout {
        op: &'static str,
        timeout: Duration,
        rank: Option<usize>,
        what: String,
    },
    /// An NCCL operation was waiting when the coordinator reported a failed peer; the communicator was
    /// aborted rather than left to the deadline.
    #[error("{op}: NCCL operation aborted: the coordinator reports: {reason}")]
    PeerGone {
        op: &'static str,
        rank: Option<usize>,
        reason: String,
    },
    /// Should not happen (a helper thread could not be started or panicked).
    #[error("{op}: internal error: {detail}")]
    Internal { op: &'static str, detail: String },
}

impl CollectiveError {
    /// The peer rank this error is about, if any.
    pub fn peer_rank(&self) -> Option<usize> {
        match self {
            CollectiveError::Connect { rank, .. }
            | CollectiveError::AcceptTimeout { rank, .. }
            | CollectiveError::Setup { rank, .. }
            | CollectiveError::Handshake { rank, .. }
            | CollectiveError::Timeout { rank, .. }
            | CollectiveError::PeerClosed { rank, .. }
            | CollectiveError::PeerIo { rank, .. }
            | CollectiveError::Protocol { rank, .. }
            | CollectiveError::PeerAborted { rank, .. } => Some(*rank),
            CollectiveError::DeviceTimeout { rank, .. }
            | CollectiveError::PeerGone { rank, .. } => *rank,
            CollectiveError::InvalidArgument { .. }
            | CollectiveError::Unavailable { .. }
            | CollectiveError::Nccl { .. }
            | CollectiveError::Bind { .. }
            | CollectiveError::Poisoned { .. }
            | CollectiveError::Internal { .. } => None,
        }
    }
}
