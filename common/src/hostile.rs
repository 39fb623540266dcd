//! Hostile-input strategies shared by the property tests of every reader (feature `proptest`, on only
//! for tests): take a valid encoding and damage it the ways a corrupt or crafted file does — flipped
//! bytes, truncation, inserted garbage, a length field replaced by a huge number, a number in a text
//! format replaced by an extreme one. Readers must answer each with a value or an error, never a
//! panic or an allocation sized by the input.

use proptest::prelude::*;

/// One damage to a byte string; positions are taken modulo its length.
#[derive(Clone, Debug)]
pub enum Edit {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    /// Overwrites 8 bytes with a little-endian `u64` (a length, count or offset field).
    Huge(usize, u64),
    /// Overwrites 4 bytes with a big-endian `u32` (PNG and tar-style size fields).
    HugeBe32(usize, u32),
    Remove(usize, usize),
}

/// Numbers that break sizing arithmetic.
pub fn extreme_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(u64::MAX),
        Just(u64::MAX - 1),
        Just(1u64 << 63),
        Just(1u64 << 32),
        Just(1_000_000_000_000),
        Just(0),
        any::<u64>(),
    ]
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(i, x)| Edit::Flip(i, x)),
        any::<usize>().prop_map(Edit::Truncate),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..16)
        )
            .prop_map(|(i, v)| Edit::Insert(i, v)),
        (any::<usize>(), extreme_u64()).prop_map(|(i, v)| Edit::Huge(i, v)),
        (
            any::<usize>(),
            prop_oneof![Just(u32::MAX), Just(1u32 << 31), Just(65_535), any::<u32>()]
        )
            .prop_map(|(i, v)| Edit::HugeBe32(i, v)),
        (any::<usize>(), 1..64usize).prop_map(|(i, n)| Edit::Remove(i, n)),
    ]
}

/// Applies `edits` to `bytes`.
pub fn apply(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let len = bytes.len();
        let at = |i: usize| if len == 0 { 0 } else { i % len };
        match e {
            Edit::Flip(i, x) if len > 0 => bytes[at(*i)] ^= x,
            Edit::Truncate(i) => bytes.truncate(at(*i)),
            Edit::Insert(i, v) => {
                let i = at(*i);
                bytes.splice(i..i, v.iter().copied());
            }
            Edit::Huge(i, v) if len >= 8 => {
                let i = at(*i).min(len - 8);
                bytes[i..i + 8].copy_from_slice(&v.to_le_bytes());
            }
            Edit::HugeBe32(i, v) if len >= 4 => {
                let i = at(*i).min(len - 4);
                bytes[i..i + 4].copy_from_slice(&v.to_be_bytes());
            }
            Edit::Remove(i, n) => {
                let i = at(*i);
                let end = (i + n).min(len);
                bytes.drain(i..end);
            }
            _ => {}
        }
    }
    bytes
}

/// `valid` with one to four edits (and, one time in eight, untouched).
pub fn mutated(valid: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(edit(), 0..4).prop_map(move |edits| apply(valid.clone(), &edits))
}

/// Text to put where a number was: extreme, negative, fractional, exponent, not a number.
pub fn extreme_number() -> impl Strategy<Value = String> {
    prop_oneof![
        extreme_u64().prop_map(|v| v.to_string()),
        Just("18446744073709551616".to_string()),
        Just("-1".to_string()),
        Just("1e308".to_string()),
        Just("-0".to_string()),
        Just("0.5".to_string()),
        Just("NaN".to_string()),
        Just("\"7\"".to_string()),
        any::<i64>().prop_map(|v| v.to_string()),
    ]
}

/// `valid` text with some of its numbers replaced by extreme ones and some byte-level damage
/// (made valid UTF-8 again lossily), so that most cases still get past the parser's syntax.
pub fn mutated_text(valid: String) -> impl Strategy<Value = String> {
    let numbers = proptest::collection::vec((any::<usize>(), extreme_number()), 0..4);
    let edits = proptest::collection::vec(edit(), 0..2);
    (numbers, edits).prop_map(move |(numbers, edits)| {
        let mut text = valid.clone();
        for (pick, with) in numbers {
            let runs = number_runs(&text);
            if let Some(&(a, b)) = runs.get(pick % runs.len().max(1)) {
                text.replace_range(a..b, &with);
            }
        }
        String::from_utf8_lossy(&apply(text.into_bytes(), &edits)).into_owned()
    })
}

/// Byte ranges of the runs of ASCII digits in `text`.
pub fn number_runs(text: &str) -> Vec<(usize, usize)> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit() {
            let start = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            out.push((start, i));
        } else {
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_stay_in_bounds_and_change_the_bytes() {
        let v: Vec<u8> = (0..20).collect();
        assert_eq!(apply(v.clone(), &[Edit::Truncate(25)]), v[..5].to_vec());
        let h = apply(v.clone(), &[Edit::Huge(19, u64::MAX)]);
        assert_eq!((h.len(), &h[12..]), (20, &[0xff; 8][..]));
        assert_eq!(apply(v.clone(), &[Edit::Remove(18, 10)]).len(), 18);
        assert!(apply(Vec::new(), &[Edit::Flip(3, 1), Edit::Huge(0, 1)]).is_empty());
        assert_eq!(number_runs("a 12 b 3"), vec![(2, 4), (7, 8)]);
    }
}

/// The property tests of `common`'s readers: the strict TOML config and pseudo-label sidecars.
#[cfg(test)]
mod properties {
    use super::*;
    use crate::config::JobConfig;
    use crate::pseudo::{SelectRule, Selection, Sidecar};
    use std::path::Path;

    const CONFIGS: [&str; 4] = [
        include_str!("../../examples/mnist1d-40-fixmatch.toml"),
        include_str!("../../examples/mnist1d-40-pseudo-label.toml"),
        include_str!("../../examples/mnist1d-simclr.toml"),
        include_str!("../../examples/digits-supervised.toml"),
    ];

    fn sidecar(n: usize, classes: usize, probs: bool) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.safetensors");
        Sidecar {
            ids: (0..n as u64).collect(),
            class: (0..n).map(|i| (i % classes) as u32).collect(),
            confidence: (0..n).map(|i| i as f32 / n as f32).collect(),
            margin: (0..n).map(|i| i as f32).collect(),
            probs: probs.then(|| vec![0.5; n * classes]),
            classes,
        }
        .write(&path)
        .unwrap();
        std::fs::read(path).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        // Any damage to a config: an error naming the file, or a config that re-parses to itself.
        #[test]
        fn config_text_never_panics(
            text in (0..CONFIGS.len()).prop_flat_map(|i| mutated_text(CONFIGS[i].to_string()))
        ) {
            match JobConfig::from_toml(&text, Path::new("job.toml")) {
                Ok(cfg) => {
                    let again = JobConfig::from_toml(&cfg.to_toml(), Path::new("again.toml"));
                    prop_assert_eq!(again.ok(), Some(cfg));
                }
                Err(e) => prop_assert!(e.to_string().contains("job.toml"), "{}", e),
            }
        }

        // Any damage to a sidecar: an error, or a sidecar whose histogram and selection are sound.
        #[test]
        fn sidecar_bytes_never_panic(
            bytes in (1..6usize, 1..4usize, any::<bool>())
                .prop_flat_map(|(n, k, p)| mutated(sidecar(n, k, p)))
        ) {
            if let Ok(s) = Sidecar::parse(&bytes) {
                prop_assert!(s.classes <= crate::pseudo::MAX_CLASSES);
                let h = s.histogram(0.5);
                prop_assert!(h.check().is_ok());
                let rule = SelectRule { threshold: 0.5, top_k_per_class: Some(2), balance: true };
                prop_assert!(Selection::choose(1, &h, &rule).check().is_ok());
            }
        }
    }
}
