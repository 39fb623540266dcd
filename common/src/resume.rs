//! A resumable checkpoint's self-description: the `meta` tensor (JSON bytes) that says where the job
//! stood, and the tensor-name layout around it (`model.*`, `ema.N`, `optim.*`, `objective.*`,
//! `meta`). The worker writes and loads the tensors with libtorch; checking the layout and the
//! metadata is pure and lives here, so hostile checkpoints can be tested and fuzzed without libtorch.

use safetensors::tensor::{Dtype, SafeTensors};

/// The metadata format this butler writes and reads.
pub const RESUME_FORMAT: u32 = 1;

/// Where the job stood when a resumable checkpoint was written, stored inside it (tensor `meta`, JSON
/// bytes) so the file is one self-describing fact.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ResumeMeta {
    pub format: u32,
    pub job: String,
    pub step: u64,
    pub epoch: u64,
    pub steps_in_epoch: u64,
    pub labeled_start: u64,
    pub unlabeled: Option<[u64; 2]>,
    pub world_size: u32,
    pub generation: u64,
    /// Each rank's running labeled-loss sum and sample count in the epoch, so the epoch's reported
    /// mean covers the whole epoch across a resume.
    pub epoch_losses: Vec<[f64; 2]>,
    /// Staged jobs: the stage the checkpoint belongs to (`butler_proto::Stage`; 0 for other jobs).
    #[serde(default)]
    pub stage: u32,
    /// Staged jobs, pretraining: the mean loss of each finished pretraining epoch.
    #[serde(default)]
    pub history: Vec<f64>,
    /// Pseudo-label rounds: the round whose TRAIN phase the checkpoint belongs to.
    #[serde(default)]
    pub round: u32,
    /// The unlabeled stream's epoch as membership periods (world size, samples each rank consumed),
    /// the current one last: what a job resumed with another world size re-cuts.
    #[serde(default)]
    pub unlabeled_periods: Vec<(u32, Vec<u64>)>,
}

/// Parses and checks a checkpoint's `meta` JSON.
pub fn parse_meta(json: &[u8]) -> Result<ResumeMeta, String> {
    let meta: ResumeMeta = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    if meta.format != RESUME_FORMAT {
        return Err(format!(
            "format {} (this butler reads {RESUME_FORMAT})",
            meta.format
        ));
    }
    Ok(meta)
}

/// Checks a resumable checkpoint's bytes without loading its tensors: a safetensors file whose
/// tensors are `model.*`, `ema.0..n`, `optim.*`, `objective.*` and a `meta` (U8, one dimension)
/// holding valid metadata, which is returned.
pub fn parse_resumable(bytes: &[u8]) -> Result<ResumeMeta, String> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let mut ema = Vec::new();
    let mut meta = None;
    for (name, t) in st.tensors() {
        if name.starts_with("model.")
            || name.starts_with("optim.")
            || name.starts_with("objective.")
        {
            continue;
        }
        if let Some(i) = name.strip_prefix("ema.") {
            ema.push(
                i.parse::<usize>()
                    .map_err(|_| format!("malformed tensor name {name:?}"))?,
            );
        } else if name == "meta" {
            if t.dtype() != Dtype::U8 || t.shape().len() != 1 {
                return Err(format!(
                    "`meta` is {:?} {:?}, expected U8 [n]",
                    t.dtype(),
                    t.shape()
                ));
            }
            meta = Some(parse_meta(t.data()).map_err(|e| format!("metadata: {e}"))?);
        } else {
            return Err(format!("unexpected tensor {name:?}"));
        }
    }
    ema.sort_unstable();
    if ema.iter().enumerate().any(|(k, &i)| k != i) {
        return Err("EMA tensors are not numbered 0..n".into());
    }
    meta.ok_or_else(|| {
        "no `meta` tensor: not a resumable checkpoint (a final model checkpoint?)".to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    fn checkpoint(names: &[&str], meta: &[u8]) -> Vec<u8> {
        let w = [0u8; 4];
        let mut tensors: Vec<(String, TensorView<'_>)> = names
            .iter()
            .map(|n| {
                (
                    n.to_string(),
                    TensorView::new(Dtype::F32, vec![1], &w).unwrap(),
                )
            })
            .collect();
        tensors.push((
            "meta".into(),
            TensorView::new(Dtype::U8, vec![meta.len()], meta).unwrap(),
        ));
        safetensors::serialize(tensors, None).unwrap()
    }

    fn json(format: u32) -> Vec<u8> {
        serde_json::to_vec(&ResumeMeta {
            format,
            job: "j".into(),
            step: 7,
            world_size: 2,
            ..ResumeMeta::default()
        })
        .unwrap()
    }

    #[test]
    fn a_valid_checkpoint_parses_and_damaged_ones_are_errors() {
        let ok = checkpoint(&["model.w", "ema.0", "ema.1", "optim.0.m"], &json(1));
        assert_eq!(parse_resumable(&ok).unwrap().step, 7);
        let e = parse_resumable(&checkpoint(&["model.w", "ema.1"], &json(1))).unwrap_err();
        assert!(e.contains("0..n"), "{e}");
        let e = parse_resumable(&checkpoint(&["ema.x"], &json(1))).unwrap_err();
        assert!(e.contains("malformed"), "{e}");
        let e = parse_resumable(&checkpoint(&["weights"], &json(1))).unwrap_err();
        assert!(e.contains("unexpected tensor"), "{e}");
        let e = parse_resumable(&checkpoint(&[], &json(2))).unwrap_err();
        assert!(e.contains("format 2"), "{e}");
        let e = parse_resumable(&checkpoint(&[], b"{not json")).unwrap_err();
        assert!(e.contains("metadata"), "{e}");
        assert!(parse_resumable(&ok[..ok.len() - 1]).is_err());
    }

    // Regression (hostile-input property tests): without serde_json's `float_roundtrip`, some f64
    // (here a loss sum) came back from the checkpoint's JSON one ulp off, so a resumed job's epoch
    // mean differed from an uninterrupted one's.
    #[test]
    fn metadata_floats_round_trip_exactly() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let v = f64::from_bits(rng >> 2);
            let meta = ResumeMeta {
                format: RESUME_FORMAT,
                epoch_losses: vec![[v, 8.0]],
                history: vec![v / 3.0],
                ..ResumeMeta::default()
            };
            let back = parse_meta(&serde_json::to_vec(&meta).unwrap()).unwrap();
            assert_eq!(back, meta, "{v:e}");
        }
    }
}
