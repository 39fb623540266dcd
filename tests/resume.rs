//! Checkpoint and exact resume, driving the real binary: a job whose worker is killed (`kill -9`) or
//! asked to terminate (SIGTERM) mid-epoch and then resumed with `--resume` ends with the same weights,
//! byte for byte, as the same job run without interruption; a corrupt newest checkpoint falls back to the
//! previous one, and with none intact the resume fails naming the file.

mod common;
use common::*;
use std::path::{Path, PathBuf};

/// Supervised with Mixup on 40 labels per class (10 steps per epoch), AdamW, EMA, checkpoints every 7
/// steps; or FixMatch on the unlabeled train split (its stream's cursor must resume too).
fn config(manifest: &Path, fixmatch: bool) -> String {
    let method = if fixmatch {
        "unlabeled_split = \"train\"\nunlabeled_ratio = 2\n"
    } else {
        ""
    };
    let extra = if fixmatch {
        "[ssl]\nmethod = \"fixmatch\"\nthreshold = 0.7\n[augment]\nlabeled = \"weak\"\n"
    } else {
        "[regularize.mix]\nmixup_alpha = 0.4\n[augment]\nlabeled = \"weak\"\n"
    };
    format!(
        "[job]\nname = \"resume\"\nseed = 5\n[data]\nmanifest = \"{}\"\nlabels_per_class = 40\n{method}\
         [model]\nkind = \"conv_base\"\nchannels = 16\n\
         [optim]\nkind = \"adamw\"\nlr = 0.01\nweight_decay = 0.01\n[schedule]\nkind = \"cosine\"\n\
         [train]\nepochs = 3\nbatch_size = 40\nema = 0.9\n{extra}\
         [checkpoint]\nevery_steps = 7\nevery_epochs = 1\nkeep = 2\n\
         [cluster]\nheartbeat_interval_ms = 200\nheartbeat_timeout_ms = 5000\n",
        manifest.display()
    )
}

fn run(cfg: &Path, out: &Path, resume: bool, fault: Option<&str>) -> std::process::Output {
    let mut c = butler();
    c.arg("run")
        .arg(cfg)
        .args(["--workers", "2", "--threads", "1", "--out"])
        .arg(out);
    if resume {
        c.arg("--resume");
    }
    if let Some(f) = fault {
        c.env("BUTLER_FAULT", f);
    }
    c.output().unwrap()
}

fn final_weights(out: &Path) -> Vec<u8> {
    let p = out.join("checkpoints/final.safetensors");
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn summary(out: &Path) -> serde_json::Value {
    let p = out.join("summary.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn commits(out: &Path) -> Vec<PathBuf> {
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("state.json")).unwrap()).unwrap();
    state["commits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| out.join(c["checkpoint"].as_str().unwrap()))
        .collect()
}

fn logs(out: &Path) -> String {
    let mut s = String::new();
    for e in std::fs::read_dir(out.join("logs")).unwrap() {
        s += &std::fs::read_to_string(e.unwrap().path()).unwrap_or_default();
    }
    s
}

fn assert_ok(o: &std::process::Output, what: &str) {
    assert!(o.status.success(), "{what} failed:\n{}", stderr(o));
}

/// The uninterrupted run, then a run stopped by `fault` and resumed: same final weights, same accuracy,
/// one history record per epoch.
/// Returns the directory, the resumed run's directory and what the stopped run printed and logged.
fn stopped_and_resumed_equals_straight(
    fixmatch: bool,
    fault: &str,
) -> (tempfile::TempDir, PathBuf, String) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let cfg = write(&dir, "job.toml", &config(&mnist1d(), fixmatch));
    let straight = dir.join("straight");
    assert_ok(&run(&cfg, &straight, false, None), "the uninterrupted run");

    let out = dir.join("stopped");
    let o = run(&cfg, &out, false, Some(fault));
    assert!(!o.status.success(), "the job should have failed: {fault}");
    assert!(!out.join("summary.json").exists());
    assert!(
        !commits(&out).is_empty(),
        "no commit point before the fault"
    );
    let stopped = stderr(&o) + &logs(&out);
    let o = run(&cfg, &out, true, None);
    assert_ok(&o, "the resumed run");
    assert!(
        logs(&out).contains("resumed from the commit point"),
        "the run did not resume"
    );
    assert!(
        final_weights(&straight) == final_weights(&out),
        "the resumed job's final weights differ from the uninterrupted job's ({fault})"
    );
    let (a, b) = (summary(&straight), summary(&out));
    assert_eq!(a["test_accuracy"], b["test_accuracy"]);
    let epochs = |s: &serde_json::Value| {
        s["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["epoch"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(epochs(&a), epochs(&b));
    (tmp, out, stopped)
}

#[test]
fn supervised_mixup_killed_mid_epoch_resumes_exactly() {
    // Step 17: epoch 1, after the commit at step 14 (mid-epoch) — 3 steps are redone.
    let (_tmp, out, _) = stopped_and_resumed_equals_straight(false, "worker-kill-at-step:17");

    // Truncate the newest checkpoint: the resume falls back to the previous one and still ends equal.
    let cfg = out.parent().unwrap().join("job.toml");
    let fresh = out.parent().unwrap().join("fallback");
    let o = run(&cfg, &fresh, false, Some("worker-kill-at-step:17"));
    assert!(!o.status.success());
    let ckpts = commits(&fresh);
    assert_eq!(ckpts.len(), 2, "keep = 2");
    let newest = ckpts.last().unwrap();
    let bytes = std::fs::read(newest).unwrap();
    std::fs::write(newest, &bytes[..bytes.len() / 2]).unwrap();
    let o = run(&cfg, &fresh, true, None);
    assert_ok(&o, "the resume past a truncated checkpoint");
    assert!(logs(&fresh).contains("trying the previous commit"));
    assert!(final_weights(&out) == final_weights(&fresh));

    // With every recorded checkpoint damaged, the resume fails naming the file and writes nothing.
    let broken = out.parent().unwrap().join("broken");
    let o = run(&cfg, &broken, false, Some("worker-kill-at-step:17"));
    assert!(!o.status.success());
    for c in commits(&broken) {
        let mut bytes = std::fs::read(&c).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        std::fs::write(&c, &bytes).unwrap();
    }
    let o = run(&cfg, &broken, true, None);
    assert!(!o.status.success());
    let err = stderr(&o) + &logs(&broken);
    assert!(
        err.contains("no intact checkpoint") && err.contains("corrupt") && err.contains("step-"),
        "{err}"
    );
    assert!(!broken.join("summary.json").exists());
}

#[test]
fn fixmatch_killed_mid_epoch_resumes_exactly() {
    let _ = stopped_and_resumed_equals_straight(true, "worker-kill-at-step:16");
}

#[test]
fn sigterm_commits_a_checkpoint_and_the_job_resumes_exactly() {
    // SIGTERM after step 9: the ranks agree to stop at the next boundary (step 9, one before the epoch
    // ends), rank 0 commits it, and the job fails with the reason; nothing is redone on resume.
    let (_tmp, _, stopped) = stopped_and_resumed_equals_straight(false, "worker-sigterm-at-step:9");
    assert!(
        stopped.contains("asked to terminate (SIGTERM)")
            && stopped.contains("step 9 is committed")
            && stopped.contains("--resume"),
        "{stopped}"
    );
}

#[test]
fn simclr_pretraining_killed_mid_pretrain_resumes_exactly() {
    // SimCLR on the train split as the unlabeled pool (20 steps per pretraining epoch, LARS), then
    // the probe and fine-tuning; killed after pretraining step 13, resumed from the commit of step 10.
    let text = format!(
        "[job]\nname = \"staged\"\nseed = 1\n[data]\nmanifest = \"{}\"\nlabels_per_class = 10\n\
         unlabeled_split = \"train\"\n[model]\nkind = \"conv_base\"\n\
         [optim]\nkind = \"adam\"\nlr = 0.01\n[train]\nepochs = 2\nbatch_size = 100\n\
         [pretrain]\nmethod = \"simclr\"\nepochs = 2\nbatch_size = 200\nprobe_epochs = 10\n\
         [pretrain.optim]\nkind = \"lars\"\nlr = 0.3\nmomentum = 0.9\n\
         [checkpoint]\nevery_steps = 5\n\
         [cluster]\nheartbeat_interval_ms = 200\nheartbeat_timeout_ms = 5000\n",
        mnist1d().display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "job.toml", &text);
    let straight = tmp.path().join("straight");
    assert_ok(&run(&cfg, &straight, false, None), "the uninterrupted run");
    let out = tmp.path().join("stopped");
    let o = run(&cfg, &out, false, Some("worker-kill-at-step:13"));
    assert!(!o.status.success(), "the job should have failed");
    let o = run(&cfg, &out, true, None);
    assert_ok(&o, "the resumed run");
    assert!(logs(&out).contains("resumed from the commit point"));
    let pretrained = |d: &Path| std::fs::read(d.join("checkpoints/pretrain.safetensors")).unwrap();
    assert!(
        pretrained(&straight) == pretrained(&out),
        "the resumed pretraining ends with other weights"
    );
    assert!(final_weights(&straight) == final_weights(&out));
    let (a, b) = (summary(&straight), summary(&out));
    assert_eq!(a["test_accuracy"], b["test_accuracy"]);
    assert_eq!(
        a["stages"][0]["loss_history"], b["stages"][0]["loss_history"],
        "the pretraining loss history spans the resume"
    );
}

#[test]
fn a_staged_job_killed_in_its_distill_stage_resumes_from_pretraining_exactly() {
    // SimCLR 2 epochs × 20 steps (committed at its end), fine-tuning 2 steps, distillation 4 steps on
    // the unlabeled stream; killed after 44 steps in all (the second distillation step). The resumed
    // job reloads pretraining's last commit and runs the probe, fine-tuning and distillation again; the
    // distillation stream must start at its beginning (not at pretraining's committed cursor) for the
    // weights to match the uninterrupted run.
    let text = format!(
        "[job]\nname = \"staged-distill\"\nseed = 2\n[data]\nmanifest = \"{}\"\nlabels_per_class = 10\n\
         unlabeled_split = \"train\"\n[model]\nkind = \"conv_base\"\nchannels = 16\n\
         [optim]\nkind = \"adam\"\nlr = 0.01\n[train]\nepochs = 2\nbatch_size = 100\n\
         [pretrain]\nmethod = \"simclr\"\nepochs = 2\nbatch_size = 200\nprobe_epochs = 10\n\
         [pretrain.optim]\nkind = \"lars\"\nlr = 0.3\nmomentum = 0.9\n\
         [pretrain.distill]\nsteps = 4\nunlabeled_ratio = 2\naugment = true\n\
         [checkpoint]\nevery_steps = 0\nevery_epochs = 1\n\
         [cluster]\nheartbeat_interval_ms = 200\nheartbeat_timeout_ms = 5000\n",
        mnist1d().display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "job.toml", &text);
    let straight = tmp.path().join("straight");
    assert_ok(&run(&cfg, &straight, false, None), "the uninterrupted run");
    let out = tmp.path().join("stopped");
    let o = run(&cfg, &out, false, Some("worker-kill-after-steps:44"));
    assert!(!o.status.success(), "the job should have failed");
    assert!(
        logs(&out).contains("distillation"),
        "the kill should land in the distill stage"
    );
    assert!(!out.join("checkpoints/final.safetensors").exists());
    let o = run(&cfg, &out, true, None);
    assert_ok(&o, "the resumed run");
    assert!(logs(&out).contains("resumed from the commit point"));
    for f in ["finetune.safetensors", "final.safetensors"] {
        let read = |d: &Path| std::fs::read(d.join("checkpoints").join(f)).unwrap();
        assert!(
            read(&straight) == read(&out),
            "{f} differs after the resume"
        );
    }
    let (a, b) = (summary(&straight), summary(&out));
    assert_eq!(a["test_accuracy"], b["test_accuracy"]);
    assert_eq!(a["stages"][3]["stage"], "distill");
    assert_eq!(
        a["stages"][3]["loss_history"],
        b["stages"][3]["loss_history"]
    );
}

#[test]
fn pseudo_label_rounds_killed_mid_train_resume_exactly() {
    // 2 rounds of 4 epochs × 5 steps; killed after 27 steps in all: round 1's TRAIN (on the
    // pseudo-labeled stream), after its commit of step 5. The resumed job reloads that commit.
    let text = format!(
        "[job]\nname = \"rounds\"\nseed = 3\n[data]\nmanifest = \"{}\"\nlabels_per_class = 20\n\
         unlabeled_split = \"train\"\nunlabeled_ratio = 2\n[model]\nkind = \"conv_base\"\nchannels = 16\n\
         [optim]\nkind = \"adam\"\nlr = 0.01\n[train]\nepochs = 4\nbatch_size = 40\neval_every = 4\n\
         [augment]\nlabeled = \"weak\"\n\
         [pseudo_label]\nrounds = 2\nthreshold = 0.5\ntop_k_per_class = 150\nnoisy = true\n\
         [checkpoint]\nevery_steps = 5\n\
         [cluster]\nheartbeat_interval_ms = 200\nheartbeat_timeout_ms = 5000\n",
        mnist1d().display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "job.toml", &text);
    let straight = tmp.path().join("straight");
    assert_ok(&run(&cfg, &straight, false, None), "the uninterrupted run");
    let out = tmp.path().join("stopped");
    let o = run(&cfg, &out, false, Some("worker-kill-after-steps:27"));
    assert!(!o.status.success(), "the job should have failed");
    let newest = commits(&out);
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("state.json")).unwrap()).unwrap();
    let last = state["commits"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        last["round"], 1,
        "the newest commit belongs to round 1: {state}"
    );
    assert!(!newest.is_empty());
    let o = run(&cfg, &out, true, None);
    assert_ok(&o, "the resumed run");
    assert!(logs(&out).contains("resumed from the commit point"));
    assert!(final_weights(&straight) == final_weights(&out));
    let (a, b) = (summary(&straight), summary(&out));
    assert_eq!(a["test_accuracy"], b["test_accuracy"]);
    assert_eq!(a["rounds"], b["rounds"]);
}
