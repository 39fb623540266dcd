//! The stage plan of a staged job (`[pretrain]`): pretrain → linear probe → fine-tune, or fine-tune
//! alone for `method = "none"`, either followed by distill when `[pretrain.distill]` is set. Each rank walks the plan through `NextStage`; a stage is recorded once
//! every rank has reported it, with rank 0's metrics and checkpoint (the losses are global means, the
//! same on every rank) and the slowest rank's time.

use crate::summary::StageRecord;
use butler_common::config::JobConfig;
use butler_common::pretrain::PretrainMethod;
use butler_proto::{Stage, StageResult};

#[derive(Clone, Debug, Default)]
pub struct StagePlan {
    plan: Vec<Stage>,
    /// Stages each rank has finished.
    progress: Vec<usize>,
    /// Per stage: reports so far, the slowest rank's seconds, the samples of all ranks, rank 0's result.
    reports: Vec<(u32, f64, u64, Option<StageResult>)>,
}

impl StagePlan {
    pub fn new(cfg: &JobConfig, world_size: u32) -> StagePlan {
        let mut plan = match cfg.pretrain.as_ref().map(|p| p.method) {
            None => Vec::new(),
            Some(PretrainMethod::None) => vec![Stage::Finetune],
            Some(_) => vec![Stage::Pretrain, Stage::Probe, Stage::Finetune],
        };
        if cfg.pretrain.as_ref().is_some_and(|p| p.distill.is_some()) {
            plan.push(Stage::Distill);
        }
        StagePlan {
            reports: vec![(0, 0.0, 0, None); plan.len()],
            progress: vec![0; world_size as usize],
            plan,
        }
    }

    /// Records what `rank` finished (if anything) and returns the stage it runs next. `Err` names a
    /// report that does not follow the plan.
    pub fn next(&mut self, rank: u32, finished: Option<StageResult>) -> Result<Stage, String> {
        let done = self.progress[rank as usize];
        if let Some(r) = finished {
            let got = Stage::try_from(r.stage).unwrap_or(Stage::Done);
            let expected = self.plan.get(done).copied().unwrap_or(Stage::Done);
            if got != expected || expected == Stage::Done {
                return Err(format!(
                    "rank {rank} reported stage {} finished, but its next stage in the plan is {}",
                    got.as_str_name(),
                    expected.as_str_name()
                ));
            }
            let slot = &mut self.reports[done];
            slot.0 += 1;
            slot.1 = slot.1.max(r.seconds);
            slot.2 += r.samples;
            if rank == 0 {
                slot.3 = Some(r);
            }
            self.progress[rank as usize] = done + 1;
        }
        Ok(self
            .plan
            .get(self.progress[rank as usize])
            .copied()
            .unwrap_or(Stage::Done))
    }

    /// The stage `rank` runs now (`Done` once it has finished the plan, or for unstaged jobs).
    pub fn current(&self, rank: u32) -> Stage {
        let done = self.progress.get(rank as usize).copied().unwrap_or(0);
        self.plan.get(done).copied().unwrap_or(Stage::Done)
    }

    /// Stages every rank has finished, in plan order.
    pub fn records(&self, world_size: u32) -> Vec<StageRecord> {
        self.plan
            .iter()
            .zip(&self.reports)
            .filter(|(_, (n, ..))| *n == world_size)
            .map(|(stage, (_, seconds, samples, r0))| {
                let r0 = r0.clone().unwrap_or_default();
                StageRecord {
                    stage: stage_name(*stage).to_string(),
                    train_loss: r0.train_loss,
                    loss_history: r0.loss_history,
                    steps: r0.steps,
                    samples: *samples,
                    seconds: *seconds,
                    test_accuracy: r0.test_accuracy,
                    val_accuracy: r0.val_accuracy,
                    checkpoint: r0.checkpoint,
                }
            })
            .collect()
    }
}

pub fn stage_name(s: Stage) -> &'static str {
    match s {
        Stage::Done => "done",
        Stage::Pretrain => "pretrain",
        Stage::Probe => "probe",
        Stage::Finetune => "finetune",
        Stage::Distill => "distill",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cfg(method: &str) -> JobConfig {
        cfg_with(method, "")
    }

    fn cfg_with(method: &str, extra: &str) -> JobConfig {
        let text = format!(
            "[job]\nname='s'\nseed=1\n[data]\nmanifest='m'\nlabels_per_class=4\nunlabeled_split='u'\n\
             [model]\nkind='conv_base'\nchannels=4\n[optim]\nkind='adam'\nlr=0.01\n\
             [train]\nepochs=1\nbatch_size=8\n[pretrain]\nmethod='{method}'\n\
             [pretrain.optim]\nkind='lars'\nlr=0.1\n{extra}"
        );
        JobConfig::from_toml(&text, Path::new("s.toml")).unwrap()
    }

    fn result(stage: Stage, rank: u32) -> StageResult {
        StageResult {
            stage: stage as i32,
            train_loss: 1.0 + rank as f64,
            seconds: 2.0 + rank as f64,
            samples: 10,
            checkpoint: format!("ckpt{rank}"),
            ..Default::default()
        }
    }

    #[test]
    fn ranks_walk_the_plan_and_a_stage_is_recorded_when_all_have_reported() {
        let mut p = StagePlan::new(&cfg("simclr"), 2);
        assert_eq!(p.next(0, None).unwrap(), Stage::Pretrain);
        assert_eq!(p.next(1, None).unwrap(), Stage::Pretrain);
        assert_eq!(
            p.next(1, Some(result(Stage::Pretrain, 1))).unwrap(),
            Stage::Probe
        );
        assert!(p.records(2).is_empty(), "rank 0 has not reported yet");
        assert_eq!(
            p.next(0, Some(result(Stage::Pretrain, 0))).unwrap(),
            Stage::Probe
        );
        let r = p.records(2);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].stage, "pretrain");
        assert_eq!(r[0].checkpoint, "ckpt0");
        assert_eq!(r[0].train_loss, 1.0);
        assert_eq!(r[0].seconds, 3.0);
        assert_eq!(r[0].samples, 20);
        for rank in 0..2 {
            assert_eq!(
                p.next(rank, Some(result(Stage::Probe, rank))).unwrap(),
                Stage::Finetune
            );
            assert_eq!(
                p.next(rank, Some(result(Stage::Finetune, rank))).unwrap(),
                Stage::Done
            );
        }
        let names: Vec<_> = p.records(2).into_iter().map(|r| r.stage).collect();
        assert_eq!(names, ["pretrain", "probe", "finetune"]);
    }

    #[test]
    fn out_of_order_reports_are_refused_with_the_expected_stage() {
        let mut p = StagePlan::new(&cfg("cpc"), 1);
        let e = p.next(0, Some(result(Stage::Probe, 0))).unwrap_err();
        assert!(e.contains("STAGE_PRETRAIN"), "{e}");
        let mut none = StagePlan::new(&cfg("none"), 1);
        assert_eq!(none.next(0, None).unwrap(), Stage::Finetune);
        assert_eq!(
            none.next(0, Some(result(Stage::Finetune, 0))).unwrap(),
            Stage::Done
        );
        assert!(none.next(0, Some(result(Stage::Finetune, 0))).is_err());
    }

    #[test]
    fn a_distill_section_appends_the_distill_stage() {
        let d = "[pretrain.distill]\nsteps=10\n";
        for (method, expected) in [
            ("simclr", &["pretrain", "probe", "finetune", "distill"][..]),
            ("none", &["finetune", "distill"][..]),
        ] {
            let mut p = StagePlan::new(&cfg_with(method, d), 1);
            let mut next = p.next(0, None).unwrap();
            let mut walked = Vec::new();
            while next != Stage::Done {
                walked.push(stage_name(next));
                assert_eq!(p.current(0), next);
                let mut r = result(next, 0);
                r.val_accuracy = Some(0.25);
                next = p.next(0, Some(r)).unwrap();
            }
            assert_eq!(walked, expected);
            assert_eq!(p.current(0), Stage::Done);
            let records = p.records(1);
            assert_eq!(records.len(), expected.len());
            assert_eq!(records.last().unwrap().val_accuracy, Some(0.25));
        }
    }
}
