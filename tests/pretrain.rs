//! Staged contrastive jobs through the real binary: pretrain → probe → fine-tune recorded in
//! summary.json with each stage's checkpoint, and bad combinations refused with the key that causes them.

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
