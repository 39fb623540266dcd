//! The samples a shard reader hands out and the policy for corrupt ones: the types every shard format
//! shares, so that the readers ([`crate::shard`], [`crate::webdataset`]) depend on this leaf and not on
//! each other's internals.

use std::path::PathBuf;

/// The samples of one shard (or of a whole split, once concatenated).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ShardData {
    pub x: Vec<f32>,
    pub y: Option<Vec<i64>>,
    pub ids: Vec<u64>,
}

impl ShardData {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// What a reader does with a corrupt sample (one that does not decode, has the wrong shape, or has a
/// missing, unreadable or out-of-range label). A shard that is corrupt as a whole (missing, checksum
/// mismatch, unreadable container, wrong sample count) is always an error, whatever the policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CorruptPolicy {
    /// Leave the sample out and report it in the returned list.
    Skip,
    /// Fail with an error naming the shard file and the sample's index in it.
    #[default]
    Fail,
}

impl From<butler_common::config::CorruptSamples> for CorruptPolicy {
    fn from(c: butler_common::config::CorruptSamples) -> Self {
        match c {
            butler_common::config::CorruptSamples::Skip => CorruptPolicy::Skip,
            butler_common::config::CorruptSamples::Fail => CorruptPolicy::Fail,
        }
    }
}

/// A sample left out under [`CorruptPolicy::Skip`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedSample {
    /// The shard file (the manifest's directory joined with the entry's path).
    pub shard: PathBuf,
    /// Position of the sample within the shard (its id is the shard's `first_id + index`).
    pub index: usize,
    pub reason: String,
}

impl std::fmt::Display for SkippedSample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "shard {}: sample {}: {}",
            self.shard.display(),
            self.index,
            self.reason
        )
    }
}
