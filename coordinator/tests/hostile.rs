//! Hostile input never panics (issue 14): the coordinator's readers — the commit log
//! (`state.json`), the pseudo-label rounds state, TensorBoard event files — and prost decoding of
//! every message of `butler.proto` answer any damage with a value or an error. The same entry points
//! are the `fuzz/` crate's targets (docs/fuzzing.md).

use butler_common::hostile::{mutated, mutated_text};
use butler_common::pseudo::{Histogram, SelectRule, Selection, BINS};
use butler_coordinator::commits::{check_checkpoint_name, parse_state as parse_commits};
use butler_coordinator::rounds::{parse_state as parse_rounds, Phase, RoundsState};
use butler_coordinator::tb;
use butler_proto::v1;
use proptest::prelude::*;
use prost::Message;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const COMMITS: &str = r#"{
  "format": 1, "job": "j", "config": "cfg", "generation": 3, "world_size": 2,
  "commits": [
    {"checkpoint": "checkpoints/step-000000010.safetensors", "sha256": "ab", "bytes": 1234,
     "step": 10, "epoch": 1, "steps_in_epoch": 0, "labeled_start": 0, "unlabeled": [0, 10],
     "world_size": 2, "generation": 1, "stage": 0, "round": 0},
    {"checkpoint": "checkpoints/round-1-step-000000020.safetensors", "sha256": "cd", "bytes": 99,
     "step": 20, "epoch": 2, "steps_in_epoch": 5, "labeled_start": 40,
     "world_size": 2, "generation": 3, "stage": 1, "round": 1}
  ]
}"#;

fn rounds_state(threshold: f64, accuracy: f64) -> RoundsState {
    let mut h = Histogram::new(2);
    h.add(0, 0.9, 2.3, 0.5);
    h.add(1, 0.99, 4.6, 0.5);
    h.add(1, 0.2, 0.2, 0.5);
    let rule = SelectRule {
        threshold,
        top_k_per_class: Some(5),
        balance: false,
    };
    RoundsState {
        round: 1,
        phase: Phase::Infer,
        done: BTreeSet::from([0]),
        histograms: BTreeMap::from([(0, h.clone())]),
        selections: vec![Selection::choose(1, &h, &rule)],
        round_accuracy: vec![accuracy],
    }
}

fn events() -> Vec<u8> {
    std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/torch.tfevents"
    ))
    .unwrap()
}

/// Every message of butler.proto.
fn decode_as(which: u8, bytes: &[u8]) {
    butler_proto::check_decode_roundtrip(which as usize, bytes);
}

#[test]
fn the_valid_inputs_parse() {
    let st = parse_commits(COMMITS).unwrap();
    assert_eq!(st.commits.len(), 2);
    let json = serde_json::to_string(&rounds_state(0.5, 0.75)).unwrap();
    assert_eq!(parse_rounds(&json).unwrap(), rounds_state(0.5, 0.75));
    assert!(!tb::parse_events(Path::new("e"), &events())
        .unwrap()
        .is_empty());
}

// Regression (hostile-input property tests): serde_json without `float_roundtrip` read some f64
// back one ulp off, so a resumed coordinator's threshold or recorded accuracies differed from the
// ones it had written.
#[test]
fn rounds_state_floats_round_trip_exactly() {
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..2000 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let accuracy = f64::from_bits(rng >> 2);
        let threshold = (rng >> 11) as f64 / (1u64 << 53) as f64;
        let st = rounds_state(threshold, accuracy);
        let back = parse_rounds(&serde_json::to_string_pretty(&st).unwrap()).unwrap();
        assert_eq!(back, st, "{threshold:e} {accuracy:e}");
    }
}

// The fuzz campaign's one crash (fuzz/artifacts/proto/crash-c5e2…): the `proto` target's
// round-trip compared decoded messages with `==`, and a MetricsReport whose val_accuracy is a NaN
// is not equal to itself. A harness bug, not a decoder bug; the input stays as a regression test.
#[test]
fn a_nan_double_decodes_and_round_trips_by_encoding() {
    let crash = [0xde, 0x59, 0x42, 0x16, 0x1d, 0xf8, 0x7b, 0xff, 0xff, 0xff];
    assert_eq!(crash[0] % 23, 15);
    let m = v1::MetricsReport::decode(&crash[1..]).unwrap();
    assert!(m.val_accuracy.unwrap().is_nan());
    decode_as(crash[0], &crash[1..]);
}

// The campaign's second crash (crash-be98…): the fixed harness compared re-encodings as bytes,
// and a StepReport's `scalars` map (a HashMap) encodes its entries in no fixed order.
#[test]
fn a_map_field_round_trips_whatever_its_order() {
    let mut m = v1::StepReport::default();
    for (i, k) in ["a", "b", "c", "d", "e", "f", "g", "h"].iter().enumerate() {
        m.scalars.insert(k.to_string(), i as f64);
    }
    let bytes = m.encode_to_vec();
    assert_eq!(v1::StepReport::decode(bytes.as_slice()).unwrap(), m);
    for which in 0..23 {
        decode_as(which, &bytes);
    }
}

// The campaign's commits_state crash (crash-9958…): the harness took any `..` in a checkpoint
// name for a parent directory; dots inside a file name are a name inside the run directory.
#[test]
fn dots_inside_a_name_are_not_a_parent_directory() {
    for ok in [
        "checkpoints/step-1.safeten```...```sors",
        "checkpoints/..x",
        "a/...",
        "x..",
    ] {
        assert!(check_checkpoint_name(ok).is_ok(), "{ok}");
    }
    for bad in ["..", "checkpoints/../../x", "/etc/passwd", "./x", ""] {
        assert!(check_checkpoint_name(bad).is_err(), "{bad}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    // A damaged commit log: an error, or commits whose checkpoints stay inside the run directory.
    #[test]
    fn commit_log_never_panics(text in mutated_text(COMMITS.to_string())) {
        if let Ok(st) = parse_commits(&text) {
            for c in &st.commits {
                prop_assert!(check_checkpoint_name(&c.checkpoint).is_ok());
                prop_assert!(Path::new("/run").join(&c.checkpoint).starts_with("/run/"));
                let _ = c.point();
            }
        }
    }

    // A damaged rounds state: an error, or one whose histograms merge and select.
    #[test]
    fn rounds_state_never_panics(
        text in mutated_text(serde_json::to_string(&rounds_state(0.5, 0.75)).unwrap())
    ) {
        if let Ok(st) = parse_rounds(&text) {
            for h in st.histograms.values() {
                prop_assert_eq!(h.counts.len(), h.classes * BINS);
                let rule = SelectRule { threshold: 0.5, top_k_per_class: None, balance: true };
                let s = Selection::choose(st.round + 1, h, &rule);
                prop_assert!(s.check().is_ok());
                let mut m = h.clone();
                m.merge(h).unwrap();
                let _ = m.total();
            }
        }
    }

    // A damaged TensorBoard event file: an error naming it, or its events.
    #[test]
    fn event_file_never_panics(bytes in mutated(events())) {
        if let Err(e) = tb::parse_events(Path::new("events.tfevents"), &bytes) {
            prop_assert!(e.to_string().contains("events.tfevents"), "{}", e);
        }
    }

    // Any bytes as any message of butler.proto: an error or a message that round-trips.
    #[test]
    fn every_message_decodes_or_errs(
        which in any::<u8>(),
        bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..64),
            mutated(v1::ResumePoint { checkpoint: "checkpoints/x".into(), step: 3, ..Default::default() }.encode_to_vec()),
        ],
    ) {
        decode_as(which, &bytes);
    }
}
