//! In-memory splits for the foundation: a split's shards are read (checksums verified) into one tensor.
//! Streaming for sets larger than RAM replaces this behind the same batch interface.

use crate::augment::{Pipeline, SampleKey};
use crate::Result;
use butler_data::manifest::Manifest;
use butler_data::shard::read_split;
use std::path::Path;
use tch::Tensor;

pub struct InMemorySplit {
    /// `[n, ...sample_shape]`, f32.
    pub x: Tensor,
    /// `[n]`, i64.
    pub y: Tensor,
    pub len: u64,
}

impl InMemorySplit {
    pub fn load(manifest_file: &Path, manifest: &Manifest, split: &str) -> Result<Self> {
        let d = read_split(manifest_file, manifest, split)?;
        let n = d.len() as i64;
        let mut shape = vec![n];
        shape.extend(manifest.sample_shape.iter().map(|&s| s as i64));
        let x = Tensor::from_slice(&d.x).reshape(shape.as_slice());
        let y = Tensor::from_slice(d.y.as_deref().unwrap_or(&[]));
        Ok(InMemorySplit {
            x,
            y,
            len: n as u64,
        })
    }

    pub fn from_tensors(x: Tensor, y: Tensor) -> Self {
        let len = x.size()[0] as u64;
        InMemorySplit { x, y, len }
    }

    /// The samples at `indices`, as a new split (e.g. the labeled subset of a few-label experiment).
    pub fn subset(&self, indices: &[u64]) -> Self {
        let (x, y) = self.batch(indices);
        InMemorySplit {
            x,
            y,
            len: indices.len() as u64,
        }
    }

    /// The batch at `indices` with each sample augmented by `pipeline`, seeded per (job seed, epoch,
    /// index in this split, view) like the loader's views, so a batch is reproducible on any rank.
    pub fn batch_augmented(
        &self,
        indices: &[u64],
        pipeline: &Pipeline,
        seed: u64,
        epoch: u64,
        view: u64,
    ) -> (Tensor, Tensor) {
        let (x, y) = self.batch(indices);
        let shape: Vec<usize> = x.size()[1..].iter().map(|&d| d as usize).collect();
        let mut flat = Vec::<f32>::try_from(x.reshape([-1])).expect("f32 samples");
        let numel: usize = shape.iter().product();
        let mut scratch = Vec::new();
        if numel > 0 {
            for (row, &i) in flat.chunks_mut(numel).zip(indices) {
                let mut rng = SampleKey::new(seed, epoch, i).rng(view);
                pipeline.apply_in_place(row, &shape, &mut rng, &mut scratch);
            }
        }
        (Tensor::from_slice(&flat).reshape(x.size()), y)
    }

    /// Gathers the samples at `indices` into a batch.
    pub fn batch(&self, indices: &[u64]) -> (Tensor, Tensor) {
        let idx = Tensor::from_slice(&indices.iter().map(|&i| i as i64).collect::<Vec<_>>());
        (self.x.index_select(0, &idx), self.y.index_select(0, &idx))
    }
}
