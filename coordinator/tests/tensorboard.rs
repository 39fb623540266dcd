//! butler's event-file reader against a file written by torch's `SummaryWriter` (fixture from
//! `scripts/fixtures_tb.py`): the framing, both CRCs and the Event/Summary encoding must agree with the
//! reference writer's, or TensorBoard would silently show nothing of butler's files.

use butler_coordinator::tb;
use std::path::Path;

fn fixture() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/torch.tfevents"
    ))
}

#[test]
fn a_file_written_by_torch_summary_writer_reads_back_point_for_point() {
    let events = tb::read_events(fixture()).unwrap();
    assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture(), dir.path().join("events.out.tfevents.1.torch")).unwrap();
    let s = tb::read_scalars(dir.path()).unwrap();
    assert_eq!(s.len(), 3, "{:?}", s.keys());
    assert_eq!(s["train/loss"].len(), 20);
    assert_eq!(s["train/lr"].len(), 20);
    assert_eq!(s["epoch/test_accuracy"].len(), 3);
    assert_eq!(s["train/loss"][3], (40, 0.25));
    assert_eq!(s["epoch/test_accuracy"][2].0, 2);
    assert!((s["epoch/test_accuracy"][2].1 - 0.7).abs() < 1e-6);
}

#[test]
fn butler_frames_torchs_records_byte_for_byte() {
    // Re-framing each decoded record's payload gives back torch's bytes: same length field, same
    // masked CRC-32C of length and data.
    let bytes = std::fs::read(fixture()).unwrap();
    let mut at = 0;
    let mut records = 0;
    while at < bytes.len() {
        let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
        let record = &bytes[at..at + 16 + len];
        assert_eq!(tb::frame(&record[12..12 + len]), record, "record {records}");
        at += 16 + len;
        records += 1;
    }
    assert!(records > 20);
}
