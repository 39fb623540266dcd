#![no_main]
//! See docs/fuzzing.md: run with `scripts/fuzz.sh` (bounded) or `cargo +nightly fuzz run TARGET`.
use butler_proto::v1;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fn roundtrip<M: Message + Default>(bytes: &[u8]) {
    if let Ok(m) = M::decode(bytes) {
        // Compared by encoded length: a decoded NaN double is not equal to itself, and a map field
        // (StepReport.scalars, a HashMap) encodes its entries in no fixed order.
        let once = m.encode_to_vec();
        let again = M::decode(once.as_slice()).unwrap();
        assert_eq!(again.encoded_len(), once.len());
    }
}

// The first byte picks the message of butler.proto; the rest is its encoding.
fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which as usize % 23 {
        0 => roundtrip::<v1::PhaseDone>(bytes),
        1 => roundtrip::<v1::PhaseRequest>(bytes),
        2 => roundtrip::<v1::PhaseResponse>(bytes),
        3 => roundtrip::<v1::RegisterRequest>(bytes),
        4 => roundtrip::<v1::RegisterResponse>(bytes),
        5 => roundtrip::<v1::RendezvousRequest>(bytes),
        6 => roundtrip::<v1::RendezvousResponse>(bytes),
        7 => roundtrip::<v1::AssignmentRequest>(bytes),
        8 => roundtrip::<v1::AssignmentResponse>(bytes),
        9 => roundtrip::<v1::HeartbeatRequest>(bytes),
        10 => roundtrip::<v1::StepTiming>(bytes),
        11 => roundtrip::<v1::StepReport>(bytes),
        12 => roundtrip::<v1::StatusRequest>(bytes),
        13 => roundtrip::<v1::StatusResponse>(bytes),
        14 => roundtrip::<v1::HeartbeatResponse>(bytes),
        15 => roundtrip::<v1::MetricsReport>(bytes),
        16 => roundtrip::<v1::FinishRequest>(bytes),
        17 => roundtrip::<v1::Ack>(bytes),
        18 => roundtrip::<v1::ResumePoint>(bytes),
        19 => roundtrip::<v1::CommitRequest>(bytes),
        20 => roundtrip::<v1::StageResult>(bytes),
        21 => roundtrip::<v1::StageRequest>(bytes),
        22 => roundtrip::<v1::StageResponse>(bytes),
        _ => unreachable!(),
    }
});
