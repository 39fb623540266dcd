//! Staged contrastive jobs through the real binary: pretrain → probe → fine-tune (→ distill) recorded
//! in summary.json with each stage's checkpoint, and bad combinations refused with the key that causes
//! them.

mod common;
use common::*;

/// A staged job on MNIST-1D that streams the train split as its unlabeled pool (labels ignored).
fn staged(method: &str, extra: &str) -> String {
    small_config(&mnist1d(), "").replace(
        "[model]",
        "labels_per_class = 10\nunlabeled_split = \"train\"\n[model]",
    ) + &format!(
        "[pretrain]\nmethod = \"{method}\"\nepochs = 1\nbatch_size = 200\nprobe_epochs = 30\n{extra}\n\
         [pretrain.optim]\nkind = \"lars\"\nlr = 0.3\nmomentum = 0.9\n"
    )
}

fn run(text: &str, workers: u32) -> (std::process::Output, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "job.toml", text);
    let o = butler()
        .arg("run")
        .arg(&cfg)
        .args(["--workers", &workers.to_string(), "--out"])
        .arg(dir.path().join("run"))
        .output()
        .unwrap();
    (o, dir)
}

fn check_stages(method: &str, extra: &str) {
    let (o, dir) = run(&staged(method, extra), 2);
    assert!(o.status.success(), "{method}: {}", stderr(&o));
    let out = dir.path().join("run");
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let stages = s["stages"]
        .as_array()
        .expect("a staged job records its stages");
    let names: Vec<&str> = stages
        .iter()
        .map(|r| r["stage"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["pretrain", "probe", "finetune"]);
    for r in stages {
        let ckpt = r["checkpoint"].as_str().unwrap();
        assert!(out.join(ckpt).exists(), "{ckpt} is missing");
        assert!(r["train_loss"].as_f64().unwrap().is_finite());
    }
    // 4000 train samples at a global batch of 200: 20 steps, every sample once.
    assert_eq!(stages[0]["steps"].as_u64(), Some(20));
    assert_eq!(stages[0]["samples"].as_u64(), Some(4000));
    // The probe and the fine-tuned model beat chance (10 classes) on the test split.
    assert!(stages[1]["test_accuracy"].as_f64().unwrap() > 0.15, "{s}");
    assert_eq!(stages[2]["test_accuracy"], s["test_accuracy"]);
    assert_eq!(
        s["history"].as_array().unwrap().len(),
        2,
        "fine-tuning epochs"
    );
}

#[test]
fn simclr_stages_run_end_to_end_and_are_recorded() {
    check_stages("simclr", "temperature = 0.2\nfinetune_augment = true");
}

#[test]
fn cpc_stages_run_end_to_end_and_are_recorded() {
    check_stages("cpc", "cpc_horizons = 2");
}

#[test]
fn method_none_runs_only_the_fine_tuning_stage() {
    let text = staged("none", "").replace("unlabeled_split = \"train\"\n", "");
    let (o, dir) = run(&text, 1);
    assert!(o.status.success(), "{}", stderr(&o));
    let s: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("run/summary.json")).unwrap(),
    )
    .unwrap();
    let names: Vec<&str> = s["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["stage"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["finetune"]);
}

fn refused(text: &str, workers: u32, key: &str) {
    let (o, dir) = run(text, workers);
    assert!(!o.status.success(), "{key}: the job should fail");
    assert!(stderr(&o).contains(key), "{key}: {}", stderr(&o));
    assert!(!dir.path().join("run/summary.json").exists());
}

#[test]
fn pretrain_batch_not_divisible_by_workers_is_refused() {
    refused(
        &staged("simclr", "").replace("batch_size = 200", "batch_size = 201"),
        2,
        "pretrain.batch_size",
    );
}

#[test]
fn pretraining_without_an_unlabeled_split_or_labels_or_conv_base_is_refused() {
    refused(
        &staged("simclr", "").replace("unlabeled_split = \"train\"\n", ""),
        1,
        "data.unlabeled_split",
    );
    refused(
        &staged("cpc", "").replace("labels_per_class = 10\n", ""),
        1,
        "data.labels_per_class",
    );
    refused(
        &staged("simclr", "").replace("kind = \"conv_base\"", "kind = \"mlp\"\nhidden = [32]"),
        1,
        "conv_base",
    );
    refused(
        &staged("cpc", "cpc_horizons = 5"),
        1,
        "pretrain.cpc_horizons",
    );
    refused(
        &staged("simclr", "").replace(
            "momentum = 0.9\n",
            "momentum = 0.9\ntrust_coefficient = 0.0\n",
        ),
        1,
        "pretrain.optim.trust_coefficient",
    );
}

fn summary(dir: &tempfile::TempDir) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.path().join("run/summary.json")).unwrap())
        .unwrap()
}

fn stage_names(s: &serde_json::Value) -> Vec<String> {
    s["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["stage"].as_str().unwrap().to_string())
        .collect()
}

const DISTILL: &str = "[pretrain.distill]\nsteps = 10\nunlabeled_ratio = 2\naugment = true\n";

#[test]
fn simclr_then_distill_runs_on_two_workers_and_the_student_is_the_result() {
    // 10 labels per class, labeled batch 100: 1 step an epoch, so 10 distill steps are 10 epochs after
    // fine-tuning's 2.
    let (o, dir) = run(
        &(staged("simclr", "temperature = 0.2") + DISTILL + "temperature = 2.0\nalpha = 0.3\n"),
        2,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let s = summary(&dir);
    assert_eq!(
        stage_names(&s),
        ["pretrain", "probe", "finetune", "distill"]
    );
    let stages = s["stages"].as_array().unwrap();
    let out = dir.path().join("run");
    for r in stages {
        assert!(out.join(r["checkpoint"].as_str().unwrap()).exists(), "{r}");
    }
    let (ft, d) = (&stages[2], &stages[3]);
    // The teacher's weights stay where the fine-tuning record says; the student's are the final ones.
    assert_eq!(ft["checkpoint"], "checkpoints/finetune.safetensors");
    assert_eq!(d["checkpoint"], "checkpoints/final.safetensors");
    assert_eq!(s["checkpoint"], "checkpoints/final.safetensors");
    assert_ne!(
        std::fs::read(out.join("checkpoints/finetune.safetensors")).unwrap(),
        std::fs::read(out.join("checkpoints/final.safetensors")).unwrap()
    );
    assert_eq!(d["steps"].as_u64(), Some(10));
    let losses: Vec<f64> = (d["loss_history"].as_array().unwrap().iter())
        .map(|l| l.as_f64().unwrap())
        .collect();
    assert_eq!(losses.len(), 10);
    assert!(losses[9] < losses[0], "the student learns: {losses:?}");
    // Labeled samples: 100 a step (2 workers × 50).
    assert_eq!(d["samples"].as_u64(), Some(1000));
    assert_eq!(s["test_accuracy"], d["test_accuracy"]);
    assert!(d["test_accuracy"].as_f64().unwrap() > 0.15, "{s}");
    // The coordinator's epoch history: fine-tuning's 2 epochs, then distillation's 10.
    let history = s["history"].as_array().unwrap();
    let epochs: Vec<u64> = history
        .iter()
        .map(|h| h["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(epochs, (0..12).collect::<Vec<u64>>());
    // The run directory's config holds the resolved epochs.
    let cfg = std::fs::read_to_string(out.join("job.toml")).unwrap();
    let section = cfg
        .split("[pretrain.distill]")
        .nth(1)
        .expect("the distill section");
    let section = section.split("\n[").next().unwrap();
    assert!(section.contains("epochs = 10"), "{section}");
    assert!(!section.contains("steps ="), "{section}");
}

#[test]
fn supervised_teacher_distills_with_a_clean_teacher_view_and_a_smaller_student() {
    // method = "none": the supervised baseline is the teacher; the student is a narrower ConvBase.
    let text = staged("none", "")
        + DISTILL
        + "teacher_view = \"clean\"\n[pretrain.distill.model]\nkind = \"conv_base\"\nchannels = 8\n";
    let text = text.replace(
        "[model]\nkind = \"conv_base\"",
        "[model]\nkind = \"conv_base\"\nchannels = 16",
    );
    let (o, dir) = run(&text, 1);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = summary(&dir);
    assert_eq!(stage_names(&s), ["finetune", "distill"]);
    let read = |rel: &str| tch::Tensor::read_safetensors(dir.path().join("run").join(rel)).unwrap();
    let width = |vars: Vec<(String, tch::Tensor)>| {
        vars.into_iter()
            .find(|(n, _)| n.ends_with("weight") && n.contains("conv"))
            .map(|(_, t)| t.size()[0])
            .unwrap()
    };
    assert_eq!(width(read("checkpoints/finetune.safetensors")), 16);
    assert_eq!(width(read("checkpoints/final.safetensors")), 8);
}

#[test]
fn distill_config_errors_name_their_key() {
    let base = staged("simclr", "");
    for (section, key) in [
        (
            "[pretrain.distill]\nalpha = 0.5\n",
            "pretrain.distill.epochs",
        ),
        (
            "[pretrain.distill]\nsteps = 2\nepochs = 2\n",
            "pretrain.distill.steps",
        ),
        (
            "[pretrain.distill]\nsteps = 2\nalpha = 1.5\n",
            "pretrain.distill.alpha",
        ),
        (
            "[pretrain.distill]\nsteps = 2\ntemperature = 0\n",
            "pretrain.distill.temperature",
        ),
        (
            "[pretrain.distill]\nsteps = 2\nunlabeled_ratio = 0\n",
            "pretrain.distill.unlabeled_ratio",
        ),
        (
            "[pretrain.distill]\nsteps = 2\nteacher_view = \"clean\"\n",
            "pretrain.distill.teacher_view",
        ),
        (
            "[pretrain.distill]\nsteps = 2\nteacher = \"x\"\n",
            "teacher",
        ),
        (
            "[pretrain.distill]\nsteps = 2\nteacher_view = \"noisy\"\n",
            "noisy",
        ),
    ] {
        refused(&(base.clone() + section), 1, key);
    }
    // The distillation stage reads the unlabeled stream, also after a supervised teacher.
    refused(
        &(staged("none", "").replace("unlabeled_split = \"train\"\n", "")
            + "[pretrain.distill]\nsteps = 2\n"),
        1,
        "pretrain.distill",
    );
}
