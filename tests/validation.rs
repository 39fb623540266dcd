//! `butler data prepare … --val N` and `data.val_split`: the held-out split is stratified, disjoint from
//! train and together with it exactly the original train set; a job evaluates on it while training and
//! on the test split once, at the end. Also `train.steps`, resolved into whole epochs.
mod common;

use common::*;
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::path::Path;

/// The prepared `data/mnist1d-val500` (scripts/test.sh prepares it).
fn mnist1d_val() -> std::path::PathBuf {
    let p = repo().join("data/mnist1d-val500/manifest.json");
    assert!(
        p.exists(),
        "{} is missing: run scripts/test.sh or `butler data prepare mnist1d --val 500 --out data/mnist1d-val500`",
        p.display()
    );
    p.parent().unwrap().to_path_buf()
}

/// Every sample of `split` as (bit pattern of x, label).
fn samples(dir: &Path, split: &str) -> Vec<(Vec<u32>, i64)> {
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let mut out = Vec::new();
    for sh in m["splits"][split]["shards"].as_array().unwrap() {
        let bytes = std::fs::read(dir.join(sh["path"].as_str().unwrap())).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let x = st.tensor("x").unwrap();
        let y = st.tensor("y").unwrap();
        let n = x.shape()[0];
        let xs: Vec<u32> = x
            .data()
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let ys: Vec<i64> = y
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let d = xs.len() / n;
        for i in 0..n {
            out.push((xs[i * d..(i + 1) * d].to_vec(), ys[i]));
        }
    }
    out
}

#[test]
fn the_validation_split_is_stratified_and_partitions_the_train_split() {
    let (full, held) = (mnist1d(), mnist1d_val());
    let original = samples(&full, "train");
    let (train, val) = (samples(&held, "train"), samples(&held, "val"));
    assert_eq!((train.len(), val.len()), (3500, 500));
    // train ∪ val is the original train split, each sample once (as multisets).
    let mut union: Vec<_> = train.iter().chain(&val).cloned().collect();
    let mut orig = original.clone();
    union.sort();
    orig.sort();
    assert!(
        union == orig,
        "train + val differ from the original train split"
    );
    // Stratified: each class's share of val is its share of train, up to rounding.
    let mut per_class: BTreeMap<i64, (usize, usize)> = BTreeMap::new();
    for (_, y) in &original {
        per_class.entry(*y).or_default().0 += 1;
    }
    for (_, y) in &val {
        per_class.entry(*y).or_default().1 += 1;
    }
    for (c, (n, v)) in per_class {
        let expected = n as f64 * 500.0 / 4000.0;
        assert!(
            (v as f64 - expected).abs() < 1.0,
            "class {c}: {v} held out, expected {expected:.2}"
        );
    }
    // The test split is untouched.
    assert!(samples(&full, "test") == samples(&held, "test"));
}

#[test]
fn a_job_with_a_validation_split_evaluates_the_test_split_once_at_the_end() {
    let dir = tempfile::tempdir().unwrap();
    // 40 labels per class = 400 samples, batch 64: 7 steps an epoch, so 20 steps are 3 epochs.
    let cfg = format!(
        "[job]\nname = \"val\"\nseed = 3\n[data]\nmanifest = \"{}\"\nval_split = \"val\"\nlabels_per_class = 40\n\
         [model]\nkind = \"conv_base\"\n[optim]\nkind = \"adam\"\nlr = 0.01\n[train]\nsteps = 20\nbatch_size = 64\n",
        mnist1d_val().display()
    );
    let cfg = write(dir.path(), "job.toml", &cfg);
    let out = dir.path().join("run");
    let o = butler()
        .arg("run")
        .arg(&cfg)
        .args(["--workers", "2", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("validation accuracy"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let job = std::fs::read_to_string(out.join("job.toml")).unwrap();
    assert!(
        job.contains("\nepochs = 3\n") && !job.contains("\nsteps ="),
        "{job}"
    );
    let records: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 3);
    for (i, r) in records.iter().enumerate() {
        assert!(r["val_accuracy"].as_f64().is_some(), "epoch {i}: {r}");
        let last = i == records.len() - 1;
        assert_eq!(
            r["test_accuracy"].as_f64().is_some(),
            last,
            "epoch {i}: {r}"
        );
    }
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(s["epochs"], 3);
    assert_eq!(s["val_accuracy"], records[2]["val_accuracy"]);
    assert_eq!(s["test_accuracy"], records[2]["test_accuracy"]);
}

#[test]
fn a_validation_split_that_is_the_test_split_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_config(&mnist1d(), "").replace("[model]", "val_split = \"test\"\n[model]");
    let cfg = write(dir.path(), "job.toml", &cfg);
    let o = butler()
        .args(["run"])
        .arg(&cfg)
        .args(["--workers", "1"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("data.val_split"), "{}", stderr(&o));
}
