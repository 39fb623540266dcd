use serde::{Deserialize, Serialize};

/// One epoch, aggregated over all ranks.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: u64,
    /// Sample-weighted mean of the ranks' training losses.
    pub train_loss: f64,
    /// Samples processed by all ranks together (each training sample once per epoch).
    pub train_samples: u64,
    /// The slowest rank's training time for the epoch (the step time of synchronous data parallelism).
    pub train_seconds: f64,
    pub learning_rate: f64,
    pub test_accuracy: Option<f64>,
    pub test_loss: Option<f64>,
    /// The validation split's (`data.val_split`), on the epochs that evaluate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_accuracy: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
}

/// `summary.json`: what a job produced, written once, atomically, when every rank has finished.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub job: String,
    /// Final test accuracy in 0..1.
    pub test_accuracy: f64,
    pub test_loss: Option<f64>,
    /// The last validation accuracy, when the job has a `data.val_split`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_accuracy: Option<f64>,
    pub world_size: u32,
    pub generation: u64,
    pub epochs: u64,
    /// Training samples per second over the whole world (sum of samples / sum of slowest-rank epoch times).
    pub samples_per_second: f64,
    /// From the coordinator's start to the last rank's finish.
    pub wall_seconds: f64,
    /// Rank 0's final checkpoint, relative to the run directory.
    pub checkpoint: String,
    pub history: Vec<EpochRecord>,
    /// Pseudo-label rounds: each round's accuracy and the pseudo-labels it trained on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rounds: Option<Vec<crate::rounds::RoundRecord>>,
    /// Staged jobs only: each stage's metrics and checkpoint, in order (`history` holds the fine-tuning
    /// stage's epochs, then the distillation stage's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<StageRecord>,
    /// Ranks the coordinator found persistently late (stragglers), each time one was flagged.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub late_ranks: Vec<crate::observe::LateRank>,
}

/// One stage of a staged job (pretrain, probe, finetune, distill).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StageRecord {
    pub stage: String,
    /// Final training loss (global mean over the stage's last epoch).
    pub train_loss: f64,
    /// One entry per epoch.
    pub loss_history: Vec<f64>,
    pub steps: u64,
    /// Samples all ranks together processed.
    pub samples: u64,
    /// The slowest rank's time for the stage.
    pub seconds: f64,
    pub test_accuracy: Option<f64>,
    /// The validation split's accuracy at the stage's end (fine-tune, distill; with `data.val_split`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_accuracy: Option<f64>,
    /// Rank 0's checkpoint of the stage, relative to the run directory.
    pub checkpoint: String,
}
