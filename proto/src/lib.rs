//! The gRPC contract between butler's coordinator and its workers, generated from `butler.proto`.
//!
//! Architecture Invariant: this is the only thing that crosses the coordinator/worker boundary, and it
//! never carries tensors or sample bytes — ranks, generations, cursors, endpoints, scalars, and opaque
//! transport ids (the NCCL unique id) that the coordinator relays without reading.

#[allow(clippy::all)]
pub mod v1 {
    tonic::include_proto!("butler.v1");
}

pub use v1::*;

pub mod transport;

/// Decodes `bytes` as message number `which % 23` of butler.proto (every message, for the property
/// tests and fuzz targets of hostile input); a message that decodes must re-encode and decode again
/// to the same encoded length (not compared with `==`: a NaN double is not equal to itself; nor as
/// bytes: a map field, StepReport.scalars, encodes its entries in no fixed order). Panics otherwise.
pub fn check_decode_roundtrip(which: usize, bytes: &[u8]) {
    fn roundtrip<M: prost::Message + Default>(bytes: &[u8]) {
        if let Ok(m) = M::decode(bytes) {
            let once = m.encode_to_vec();
            let again = M::decode(once.as_slice()).expect("a re-encoded message decodes");
            assert_eq!(again.encoded_len(), once.len());
        }
    }
    match which % 23 {
        0 => roundtrip::<PhaseDone>(bytes),
        1 => roundtrip::<PhaseRequest>(bytes),
        2 => roundtrip::<PhaseResponse>(bytes),
        3 => roundtrip::<RegisterRequest>(bytes),
        4 => roundtrip::<RegisterResponse>(bytes),
        5 => roundtrip::<RendezvousRequest>(bytes),
        6 => roundtrip::<RendezvousResponse>(bytes),
        7 => roundtrip::<AssignmentRequest>(bytes),
        8 => roundtrip::<AssignmentResponse>(bytes),
        9 => roundtrip::<HeartbeatRequest>(bytes),
        10 => roundtrip::<StepTiming>(bytes),
        11 => roundtrip::<StepReport>(bytes),
        12 => roundtrip::<StatusRequest>(bytes),
        13 => roundtrip::<StatusResponse>(bytes),
        14 => roundtrip::<HeartbeatResponse>(bytes),
        15 => roundtrip::<MetricsReport>(bytes),
        16 => roundtrip::<FinishRequest>(bytes),
        17 => roundtrip::<Ack>(bytes),
        18 => roundtrip::<ResumePoint>(bytes),
        19 => roundtrip::<CommitRequest>(bytes),
        20 => roundtrip::<StageResult>(bytes),
        21 => roundtrip::<StageRequest>(bytes),
        _ => roundtrip::<StageResponse>(bytes),
    }
}

/// Metadata key that carries the job token on every RPC.
pub const AUTH_METADATA_KEY: &str = "authorization";
