//! `butler data import` on small inputs written here (npy/npz bytes, PNG/JPEG images, CIFAR records,
//! IDX files): values and labels round-trip; tar shards read back with the corrupt-sample policy;
//! malformed input is a clear error that leaves no output behind. No Python, no downloads.

mod common;
use butler_data::manifest::{Manifest, ShardEntry, ShardFormat, Split};
use butler_data::shard::{read_shard_checked, read_split, CorruptPolicy, ShardData};
use butler_data::webdataset::TarShardWriter;
use common::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Output;

fn butler_data(args: &[&str]) -> Output {
    butler().arg("data").args(args).output().unwrap()
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "butler failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout),
        stderr(&o)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs an import that must fail; returns stderr.
fn fails(args: &[&str]) -> String {
    let o = butler_data(args);
    assert!(
        !o.status.success(),
        "expected failure, got: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    stderr(&o)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn load(dir: &Path) -> (Manifest, PathBuf) {
    Manifest::load(dir).unwrap()
}

fn split(dir: &Path, name: &str) -> ShardData {
    let (m, f) = load(dir);
    read_split(&f, &m, name).unwrap()
}

/// A version-1 `.npy` file.
fn npy(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = if shape.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while !(10 + h.len() + 1).is_multiple_of(64) {
        h.push(' ');
    }
    h.push('\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend((h.len() as u16).to_le_bytes());
    b.extend(h.as_bytes());
    b.extend(data);
    b
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn i64s(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn npz(path: &Path, entries: &[(&str, Vec<u8>)]) {
    let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    for (i, (name, bytes)) in entries.iter().enumerate() {
        let method = if i % 2 == 0 {
            zip::CompressionMethod::Stored
        } else {
            zip::CompressionMethod::Deflated
        };
        z.start_file(
            *name,
            zip::write::FileOptions::default().compression_method(method),
        )
        .unwrap();
        z.write_all(bytes).unwrap();
    }
    z.finish().unwrap();
}

fn pixel(i: usize, seed: usize) -> u8 {
    ((i * 31 + seed * 17) % 256) as u8
}

/// Writes a PNG (C = 1 or 3) with deterministic pixels; returns its CHW floats.
fn write_png(path: &Path, c: usize, h: usize, w: usize, seed: usize) -> Vec<f32> {
    let raw: Vec<u8> = (0..c * h * w).map(|i| pixel(i, seed)).collect();
    let color = if c == 1 {
        image::ExtendedColorType::L8
    } else {
        image::ExtendedColorType::Rgb8
    };
    image::save_buffer(path, &raw, w as u32, h as u32, color).unwrap();
    hwc_to_chw(&raw, c, h, w)
}

fn hwc_to_chw(raw: &[u8], c: usize, h: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0f32; c * h * w];
    for p in 0..h * w {
        for ch in 0..c {
            out[ch * h * w + p] = raw[p * c + ch] as f32 / 255.0;
        }
    }
    out
}

fn assert_no_output(out: &Path) {
    assert!(
        !out.exists(),
        "{} must not exist after a failed import",
        out.display()
    );
    if let Some(parent) = out.parent() {
        if parent.exists() {
            let left: Vec<_> = std::fs::read_dir(parent)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .filter(|n| n.to_string_lossy().starts_with('.'))
                .collect();
            assert!(left.is_empty(), "staging left behind: {left:?}");
        }
    }
}

#[test]
fn npy_with_labels_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let x: Vec<f32> = (0..5 * 2 * 3).map(|v| v as f32 * 0.5 - 3.0).collect();
    let y = [2i64, 0, 1, 2, 2];
    let xp = dir.path().join("x.npy");
    let yp = dir.path().join("y.npy");
    std::fs::write(&xp, npy("<f4", &[5, 2, 3], &f32s(&x))).unwrap();
    std::fs::write(&yp, npy("<i8", &[5], &i64s(&y))).unwrap();
    let out = dir.path().join("ds");
    ok(butler_data(&[
        "import",
        "--from",
        "npy",
        s(&xp),
        "--labels",
        s(&yp),
        "--out",
        s(&out),
        "--shard-size",
        "2",
    ]));
    let (m, _) = load(&out);
    assert_eq!(m.name, "ds");
    assert_eq!(m.sample_shape, vec![2, 3]);
    assert_eq!(m.classes, vec!["0", "1", "2"]);
    let t = &m.splits["train"];
    assert!(t.labeled);
    assert_eq!(t.shards.len(), 3);
    assert!(t
        .shards
        .iter()
        .all(|e| e.format == ShardFormat::Safetensors));
    assert_eq!(t.class_counts, Some(vec![1, 1, 3]));
    let d = split(&out, "train");
    assert_eq!(d.x, x);
    assert_eq!(d.y, Some(y.to_vec()));
    assert_eq!(d.ids, vec![0, 1, 2, 3, 4]);

    // The same x without labels, as a second split: unlabeled, ids after train's.
    ok(butler_data(&[
        "import",
        "--from",
        "npy",
        s(&xp),
        "--out",
        s(&out),
        "--split",
        "pool",
    ]));
    let (m, _) = load(&out);
    assert_eq!(m.splits.len(), 2);
    let p = &m.splits["pool"];
    assert!(!p.labeled && p.class_counts.is_none());
    let d = split(&out, "pool");
    assert_eq!((d.x.clone(), d.y.clone()), (x.clone(), None));
    assert_eq!(d.ids, vec![5, 6, 7, 8, 9]);
    assert_eq!(split(&out, "train").x, x, "train is kept");
    let text = ok(butler_data(&["inspect", s(&out)]));
    assert!(
        text.contains("pool: 5 samples in 1 safetensors shards, unlabeled, ids 5..9"),
        "{text}"
    );
    assert!(
        text.contains("train: 5 samples in 3 safetensors shards, labeled, ids 0..4"),
        "{text}"
    );
}

#[test]
fn npz_uint8_scaling_int32_labels_and_unlabeled() {
    let dir = tempfile::tempdir().unwrap();
    let raw: Vec<u8> = (0..4 * 6).map(|i| (i * 11) as u8).collect();
    let y: Vec<u8> = [1i32, 0, 1, 3]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let p = dir.path().join("d.npz");
    npz(
        &p,
        &[
            ("x.npy", npy("|u1", &[4, 6], &raw)),
            ("y.npy", npy("<i4", &[4], &y)),
        ],
    );
    let out = dir.path().join("scaled");
    ok(butler_data(&[
        "import",
        "--from",
        "npz",
        s(&p),
        "--out",
        s(&out),
        "--name",
        "mine",
    ]));
    let (m, _) = load(&out);
    assert_eq!((m.name.as_str(), m.classes.len()), ("mine", 4));
    let d = split(&out, "train");
    let want: Vec<f32> = raw.iter().map(|&v| v as f32 / 255.0).collect();
    assert_eq!(d.x, want);
    assert_eq!(d.y, Some(vec![1, 0, 1, 3]));

    let out = dir.path().join("raw");
    ok(butler_data(&[
        "import",
        "--from",
        "npz",
        s(&p),
        "--out",
        s(&out),
        "--raw-u8",
        "--unlabeled",
        "--classes",
        "a,b,c,d",
    ]));
    let (m, _) = load(&out);
    assert_eq!(m.classes, vec!["a", "b", "c", "d"]);
    assert!(!m.splits["train"].labeled);
    let d = split(&out, "train");
    assert_eq!(d.x, raw.iter().map(|&v| v as f32).collect::<Vec<_>>());
    assert_eq!(d.y, None);

    // A missing array is named, with what the archive does hold.
    let e = fails(&[
        "import",
        "--from",
        "npz",
        s(&p),
        "--out",
        s(&dir.path().join("k")),
        "--x-key",
        "images",
    ]);
    assert!(
        e.contains("d.npz") && e.contains("\"images\"") && e.contains("x, y"),
        "{e}"
    );
}

#[test]
fn npy_float64_and_label_errors() {
    let dir = tempfile::tempdir().unwrap();
    let x: Vec<u8> = [0.25f64, 1.5, -2.0, 8.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let xp = dir.path().join("x.npy");
    std::fs::write(&xp, npy("<f8", &[2, 2], &x)).unwrap();
    // Labels beyond an explicit class list: the labels file and the sample are named.
    let yp = dir.path().join("y.npy");
    std::fs::write(&yp, npy("<i8", &[2], &i64s(&[0, 5]))).unwrap();
    let out = dir.path().join("ds");
    let e = fails(&[
        "import",
        "--from",
        "npy",
        s(&xp),
        "--labels",
        s(&yp),
        "--classes",
        "2",
        "--out",
        s(&out),
    ]);
    assert!(
        e.contains("y.npy") && e.contains("sample 1") && e.contains("label 5"),
        "{e}"
    );
    assert_no_output(&out);
    // Wrong label count.
    std::fs::write(&yp, npy("<i8", &[3], &i64s(&[0, 1, 1]))).unwrap();
    let e = fails(&[
        "import",
        "--from",
        "npy",
        s(&xp),
        "--labels",
        s(&yp),
        "--out",
        s(&out),
    ]);
    assert!(e.contains("y.npy") && e.contains("[3]"), "{e}");
    // Float labels.
    std::fs::write(&yp, npy("<f4", &[2], &f32s(&[0.0, 1.0]))).unwrap();
    let e = fails(&[
        "import",
        "--from",
        "npy",
        s(&xp),
        "--labels",
        s(&yp),
        "--out",
        s(&out),
    ]);
    assert!(e.contains("y.npy") && e.contains("integers"), "{e}");
    assert_no_output(&out);
    // A new unlabeled dataset needs a class list.
    let e = fails(&["import", "--from", "npy", s(&xp), "--out", s(&out)]);
    assert!(e.contains("--classes"), "{e}");
    ok(butler_data(&[
        "import",
        "--from",
        "npy",
        s(&xp),
        "--out",
        s(&out),
        "--classes",
        "3",
    ]));
    assert_eq!(split(&out, "train").x, vec![0.25, 1.5, -2.0, 8.0]);
}

#[test]
fn malformed_npy_is_a_clear_error_with_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let xp = dir.path().join("x.npy");
    let out = dir.path().join("new/ds");
    let mut bad = npy("<f4", &[1, 2], &f32s(&[1.0, 2.0]));
    bad[10] = b'[';
    std::fs::write(&xp, &bad).unwrap();
    let e = fails(&["import", "--from", "npy", s(&xp), "--out", s(&out)]);
    assert!(
        e.contains("x.npy") && e.contains("malformed .npy header"),
        "{e}"
    );
    assert!(
        !dir.path().join("new").exists(),
        "parent directory left behind"
    );

    std::fs::write(&xp, b"not numpy at all").unwrap();
    let e = fails(&["import", "--from", "npy", s(&xp), "--out", s(&out)]);
    assert!(e.contains("x.npy") && e.contains("not a .npy file"), "{e}");

    std::fs::write(&xp, npy("<f4", &[3, 2], &f32s(&[1.0, 2.0]))).unwrap();
    let e = fails(&["import", "--from", "npy", s(&xp), "--out", s(&out)]);
    assert!(e.contains("x.npy") && e.contains("truncated"), "{e}");

    let mut fortran = npy("<f4", &[1, 2], &f32s(&[1.0, 2.0]));
    let at = fortran.windows(5).position(|w| w == b"False").unwrap();
    fortran[at..at + 5].copy_from_slice(b"True ");
    std::fs::write(&xp, &fortran).unwrap();
    let e = fails(&["import", "--from", "npy", s(&xp), "--out", s(&out)]);
    assert!(e.contains("x.npy") && e.contains("Fortran"), "{e}");
    assert!(!dir.path().join("new").exists());
}

/// Two class folders of 4×5 grayscale PNGs.
fn gray_folder(root: &Path) -> Vec<(Vec<f32>, i64)> {
    let mut want = Vec::new();
    for (label, class) in ["cat", "dog"].iter().enumerate() {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for k in 0..3 {
            let x = write_png(
                &root.join(class).join(format!("{k}.png")),
                1,
                4,
                5,
                label * 10 + k,
            );
            want.push((x, label as i64));
        }
    }
    std::fs::write(root.join("README.txt"), "not an image").unwrap();
    want
}

#[test]
fn imagefolder_to_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("images");
    let want = gray_folder(&src);
    let out = dir.path().join("ds");
    ok(butler_data(&[
        "import",
        "--from",
        "imagefolder",
        s(&src),
        "--out",
        s(&out),
    ]));
    let (m, _) = load(&out);
    assert_eq!(m.sample_shape, vec![1, 4, 5]);
    assert_eq!(m.classes, vec!["cat", "dog"]);
    assert_eq!(m.splits["train"].class_counts, Some(vec![3, 3]));
    let d = split(&out, "train");
    assert_eq!(
        d.x,
        want.iter().flat_map(|(x, _)| x.clone()).collect::<Vec<_>>()
    );
    assert_eq!(d.y, Some(want.iter().map(|(_, y)| *y).collect()));

    // A folder with classes that differ from the dataset's is refused for a labeled split.
    let other = dir.path().join("other");
    std::fs::create_dir_all(other.join("bird")).unwrap();
    write_png(&other.join("bird/a.png"), 1, 4, 5, 0);
    let e = fails(&[
        "import",
        "--from",
        "imagefolder",
        s(&other),
        "--out",
        s(&out),
        "--split",
        "test",
    ]);
    assert!(e.contains("cat,dog") && e.contains("bird"), "{e}");
    // …but is fine as an unlabeled split.
    ok(butler_data(&[
        "import",
        "--from",
        "imagefolder",
        s(&other),
        "--out",
        s(&out),
        "--split",
        "extra",
        "--unlabeled",
    ]));
    let d = split(&out, "extra");
    assert_eq!((d.len(), d.y.is_none(), d.ids.clone()), (1, true, vec![6]));
}

#[test]
fn imagefolder_size_mismatch_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("images");
    gray_folder(&src);
    write_png(&src.join("dog/9-big.png"), 1, 6, 5, 0);
    let out = dir.path().join("ds");
    let e = fails(&["import", "--from", "imagefolder", s(&src), "--out", s(&out)]);
    assert!(e.contains("9-big.png") && e.contains("same size"), "{e}");
    assert_no_output(&out);
    // An undecodable image is named too.
    std::fs::remove_file(src.join("dog/9-big.png")).unwrap();
    std::fs::write(src.join("cat/bad.png"), b"garbage").unwrap();
    let e = fails(&[
        "import",
        "--from",
        "imagefolder",
        s(&src),
        "--out",
        s(&out),
        "--format",
        "tar",
    ]);
    assert!(e.contains("bad.png"), "{e}");
    assert_no_output(&out);
}

#[test]
fn imagefolder_to_tar_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("images");
    let (c, h, w) = (3, 6, 4);
    std::fs::create_dir_all(src.join("a")).unwrap();
    std::fs::create_dir_all(src.join("b")).unwrap();
    let x0 = write_png(&src.join("a/0.png"), c, h, w, 1);
    let x1 = write_png(&src.join("a/1.png"), c, h, w, 2);
    // A flat-coloured JPEG (lossy, so compared with a tolerance).
    let flat = vec![120u8; c * h * w];
    image::save_buffer(
        src.join("b/0.jpg"),
        &flat,
        w as u32,
        h as u32,
        image::ExtendedColorType::Rgb8,
    )
    .unwrap();
    let out = dir.path().join("ds");
    ok(butler_data(&[
        "import",
        "--from",
        "imagefolder",
        s(&src),
        "--out",
        s(&out),
        "--format",
        "tar",
        "--shard-size",
        "2",
    ]));
    let (m, file) = load(&out);
    assert_eq!(m.sample_shape, vec![3, 6, 4]);
    let t = &m.splits["train"];
    assert_eq!(t.shards.len(), 2);
    assert!(t
        .shards
        .iter()
        .all(|e| e.format == ShardFormat::Tar && e.path.ends_with(".tar")));
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("\"format\": \"tar\""), "{text}");
    let dirp = file.parent().unwrap();
    let (d0, sk) = read_shard_checked(dirp, &m, &t.shards[0], true, CorruptPolicy::Fail).unwrap();
    assert!(sk.is_empty());
    assert_eq!(d0.x, [x0, x1].concat());
    assert_eq!((d0.y.unwrap(), d0.ids), (vec![0, 0], vec![0, 1]));
    let (d1, _) = read_shard_checked(dirp, &m, &t.shards[1], true, CorruptPolicy::Fail).unwrap();
    assert_eq!((d1.y.unwrap(), d1.ids), (vec![1], vec![2]));
    assert!(d1.x.iter().all(|v| (v - 120.0 / 255.0).abs() < 0.02));
    let text = ok(butler_data(&["inspect", s(&out)]));
    assert!(
        text.contains("3 samples in 2 tar shards, labeled"),
        "{text}"
    );
}

/// A dataset with one tar shard written directly (image bytes of our choosing) and its manifest.
fn tar_dataset(dir: &Path, samples: &[(Vec<u8>, i64)]) -> (PathBuf, Manifest) {
    std::fs::create_dir_all(dir).unwrap();
    let mut w = TarShardWriter::create(&dir.join("train-00000.tar")).unwrap();
    for (i, (bytes, y)) in samples.iter().enumerate() {
        w.append(&format!("{i:04}"), "png", bytes, Some(*y))
            .unwrap();
    }
    let sha256 = w.finish().unwrap();
    let entry = ShardEntry {
        path: "train-00000.tar".into(),
        format: ShardFormat::Tar,
        num_samples: samples.len() as u64,
        sha256,
        first_id: 0,
    };
    let mut splits = std::collections::BTreeMap::new();
    splits.insert(
        "train".to_string(),
        Split {
            num_samples: samples.len() as u64,
            labeled: true,
            shards: vec![entry],
            class_counts: None,
        },
    );
    let m = Manifest {
        format: "butler-shards".into(),
        version: 1,
        name: "t".into(),
        sample_shape: vec![1, 3, 3],
        dtype: "f32".into(),
        classes: vec!["a".into(), "b".into()],
        splits,
        source: Default::default(),
    };
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_string(&m).unwrap(),
    )
    .unwrap();
    (dir.join("train-00000.tar"), m)
}

#[test]
fn corrupt_sample_in_a_tar_is_skipped_or_fails() {
    let dir = tempfile::tempdir().unwrap();
    let imgs = dir.path().join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    let x0 = write_png(&imgs.join("0.png"), 1, 3, 3, 0);
    let x2 = write_png(&imgs.join("2.png"), 1, 3, 3, 2);
    let png = |n: &str| std::fs::read(imgs.join(n)).unwrap();
    let ds = dir.path().join("ds");
    let (shard, m) = tar_dataset(
        &ds,
        &[
            (png("0.png"), 1),
            (b"\x89PNG garbage bytes".to_vec(), 0),
            (png("2.png"), 0),
        ],
    );
    let entry = &m.splits["train"].shards[0];
    let (d, skipped) = read_shard_checked(&ds, &m, entry, true, CorruptPolicy::Skip).unwrap();
    assert_eq!(d.x, [x0, x2].concat());
    assert_eq!((d.y.unwrap(), d.ids), (vec![1, 0], vec![0, 2]));
    assert_eq!(skipped.len(), 1);
    assert_eq!(
        (skipped[0].shard.clone(), skipped[0].index),
        (shard.clone(), 1)
    );
    let shown = skipped[0].to_string();
    assert!(
        shown.contains("train-00000.tar") && shown.contains("sample 1"),
        "{shown}"
    );
    let e = read_shard_checked(&ds, &m, entry, true, CorruptPolicy::Fail)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("train-00000.tar") && e.contains("sample 1"),
        "{e}"
    );

    // inspect counts it; --strict fails on it.
    let text = ok(butler_data(&["inspect", s(&ds)]));
    assert!(
        text.contains("1 corrupt samples skipped") && text.contains("sample 1"),
        "{text}"
    );
    let e = fails(&["inspect", s(&ds), "--strict"]);
    assert!(
        e.contains("train-00000.tar") && e.contains("sample 1"),
        "{e}"
    );
}

#[test]
fn truncated_tar_and_checksum_mismatch_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let imgs = dir.path().join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    write_png(&imgs.join("0.png"), 1, 3, 3, 0);
    let png = std::fs::read(imgs.join("0.png")).unwrap();
    let ds = dir.path().join("ds");
    let (shard, m) = tar_dataset(&ds, &[(png.clone(), 0), (png.clone(), 1), (png, 1)]);
    let bytes = std::fs::read(&shard).unwrap();

    // Flipped byte: checksum mismatch.
    let mut flipped = bytes.clone();
    flipped[600] ^= 0x40;
    std::fs::write(&shard, &flipped).unwrap();
    let e = fails(&["inspect", s(&ds)]);
    assert!(
        e.contains("train-00000.tar") && e.contains("checksum mismatch"),
        "{e}"
    );

    // Truncated, with the manifest's checksum updated so that the tar reader must notice.
    let cut = &bytes[..bytes.len() / 2 + 7];
    std::fs::write(&shard, cut).unwrap();
    let mut m2 = m.clone();
    let entry = &mut m2.splits.get_mut("train").unwrap().shards[0];
    entry.sha256 = sha256_hex(cut);
    let entry = entry.clone();
    for policy in [CorruptPolicy::Skip, CorruptPolicy::Fail] {
        let e = read_shard_checked(&ds, &m2, &entry, true, policy)
            .unwrap_err()
            .to_string();
        assert!(e.contains("train-00000.tar"), "{e}");
    }
    std::fs::write(
        ds.join("manifest.json"),
        serde_json::to_string(&m2).unwrap(),
    )
    .unwrap();
    let e = fails(&["inspect", s(&ds)]);
    assert!(e.contains("train-00000.tar"), "{e}");
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// CIFAR records: (label bytes, pixel seed).
fn cifar_file(path: &Path, records: &[(Vec<u8>, usize)]) -> Vec<Vec<f32>> {
    let mut bytes = Vec::new();
    let mut xs = Vec::new();
    for (labels, seed) in records {
        bytes.extend(labels);
        let px: Vec<u8> = (0..3072).map(|i| pixel(i, *seed)).collect();
        xs.push(px.iter().map(|&p| p as f32 / 255.0).collect());
        bytes.extend(px);
    }
    std::fs::write(path, bytes).unwrap();
    xs
}

#[test]
fn cifar10_directory_train_and_test() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("cifar-10-batches-bin");
    std::fs::create_dir_all(&src).unwrap();
    let a = cifar_file(&src.join("data_batch_1.bin"), &[(vec![3], 1), (vec![9], 2)]);
    let b = cifar_file(&src.join("data_batch_2.bin"), &[(vec![0], 3)]);
    let t = cifar_file(&src.join("test_batch.bin"), &[(vec![5], 4)]);
    let out = dir.path().join("cifar10");
    ok(butler_data(&[
        "import",
        "--from",
        "cifar10",
        s(&src),
        "--out",
        s(&out),
    ]));
    ok(butler_data(&[
        "import",
        "--from",
        "cifar10",
        s(&src),
        "--out",
        s(&out),
        "--split",
        "test",
    ]));
    let (m, _) = load(&out);
    assert_eq!(m.sample_shape, vec![3, 32, 32]);
    assert_eq!(m.classes[0], "airplane");
    assert_eq!(m.classes[9], "truck");
    let d = split(&out, "train");
    assert_eq!(d.x, [a, b].concat().concat());
    assert_eq!((d.y.unwrap(), d.ids), (vec![3, 9, 0], vec![0, 1, 2]));
    let d = split(&out, "test");
    assert_eq!(d.x, t.concat());
    assert_eq!((d.y.unwrap(), d.ids), (vec![5], vec![3]));

    // Explicit files, and a label out of range.
    let bad = dir.path().join("bad.bin");
    cifar_file(&bad, &[(vec![10], 0)]);
    let e = fails(&[
        "import",
        "--from",
        "cifar10",
        s(&bad),
        "--out",
        s(&dir.path().join("x")),
    ]);
    assert!(
        e.contains("bad.bin") && e.contains("record 0") && e.contains("label 10"),
        "{e}"
    );
    assert_no_output(&dir.path().join("x"));
}

#[test]
fn cifar100_uses_fine_labels() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("train.bin");
    let xs = cifar_file(&f, &[(vec![4, 72], 0), (vec![19, 99], 5)]);
    let out = dir.path().join("c100");
    ok(butler_data(&[
        "import",
        "--from",
        "cifar100",
        s(&f),
        "--out",
        s(&out),
    ]));
    let (m, _) = load(&out);
    assert_eq!(m.classes.len(), 100);
    let d = split(&out, "train");
    assert_eq!(d.x, xs.concat());
    assert_eq!(d.y, Some(vec![72, 99]));
}

#[test]
fn cifar_file_of_wrong_length_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("data_batch_1.bin");
    std::fs::write(&f, vec![0u8; 3073 * 2 + 5]).unwrap();
    let out = dir.path().join("ds");
    let e = fails(&["import", "--from", "cifar10", s(&f), "--out", s(&out)]);
    assert!(
        e.contains("data_batch_1.bin") && e.contains("3073-byte"),
        "{e}"
    );
    assert_no_output(&out);
    // 3073-byte records are not CIFAR-100's 3074.
    std::fs::write(&f, vec![0u8; 3073 * 2]).unwrap();
    let e = fails(&["import", "--from", "cifar100", s(&f), "--out", s(&out)]);
    assert!(e.contains("3074-byte"), "{e}");
    assert_no_output(&out);
}

fn idx_files(dir: &Path, n: usize, rows: usize, cols: usize) -> (PathBuf, PathBuf, Vec<u8>) {
    let mut img = vec![0, 0, 8, 3];
    for d in [n, rows, cols] {
        img.extend((d as u32).to_be_bytes());
    }
    let px: Vec<u8> = (0..n * rows * cols).map(|i| pixel(i, 7)).collect();
    img.extend(&px);
    let mut lab = vec![0, 0, 8, 1];
    lab.extend((n as u32).to_be_bytes());
    lab.extend((0..n).map(|i| (i % 10) as u8));
    let (ip, lp) = (dir.join("images-idx3-ubyte"), dir.join("labels-idx1-ubyte"));
    std::fs::write(&ip, img).unwrap();
    std::fs::write(&lp, lab).unwrap();
    (ip, lp, px)
}

#[test]
fn idx_round_trips_and_bad_magic_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (ip, lp, px) = idx_files(dir.path(), 12, 28, 28);
    let out = dir.path().join("mnist");
    ok(butler_data(&[
        "import",
        "--from",
        "idx",
        "--images",
        s(&ip),
        "--labels",
        s(&lp),
        "--out",
        s(&out),
        "--shard-size",
        "5",
    ]));
    let (m, _) = load(&out);
    assert_eq!(m.sample_shape, vec![1, 28, 28]);
    assert_eq!(m.classes.len(), 10);
    assert_eq!(m.splits["train"].shards.len(), 3);
    let d = split(&out, "train");
    assert_eq!(
        d.x,
        px.iter().map(|&p| p as f32 / 255.0).collect::<Vec<_>>()
    );
    assert_eq!(d.y, Some((0..12).map(|i| i % 10).collect()));

    let bad_out = dir.path().join("bad");
    let e = fails(&[
        "import",
        "--from",
        "idx",
        "--images",
        s(&lp),
        "--labels",
        s(&lp),
        "--out",
        s(&bad_out),
    ]);
    assert!(
        e.contains("labels-idx1-ubyte") && e.contains("0x00000801") && e.contains("0x00000803"),
        "{e}"
    );
    assert_no_output(&bad_out);
    // Swapped the other way round.
    let e = fails(&[
        "import",
        "--from",
        "idx",
        "--images",
        s(&ip),
        "--labels",
        s(&ip),
        "--out",
        s(&bad_out),
    ]);
    assert!(
        e.contains("images-idx3-ubyte") && e.contains("magic"),
        "{e}"
    );
    // Gzipped input gets a hint; a short file is named.
    let gz = dir.path().join("t.gz");
    std::fs::write(
        &gz,
        [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    )
    .unwrap();
    let e = fails(&[
        "import",
        "--from",
        "idx",
        "--images",
        s(&gz),
        "--out",
        s(&bad_out),
    ]);
    assert!(e.contains("t.gz") && e.contains("gunzip"), "{e}");
    let bytes = std::fs::read(&ip).unwrap();
    std::fs::write(&ip, &bytes[..bytes.len() - 3]).unwrap();
    let e = fails(&[
        "import",
        "--from",
        "idx",
        "--images",
        s(&ip),
        "--out",
        s(&bad_out),
    ]);
    assert!(
        e.contains("images-idx3-ubyte") && e.contains("needs"),
        "{e}"
    );
    assert_no_output(&bad_out);
}

#[test]
fn failed_import_into_an_existing_dataset_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let (ip, lp, _) = idx_files(dir.path(), 4, 2, 2);
    let out = dir.path().join("ds");
    ok(butler_data(&[
        "import",
        "--from",
        "idx",
        "--images",
        s(&ip),
        "--labels",
        s(&lp),
        "--out",
        s(&out),
    ]));
    let before = std::fs::read_to_string(out.join("manifest.json")).unwrap();
    // Different sample shape.
    let xp = dir.path().join("x.npy");
    std::fs::write(&xp, npy("<f4", &[1, 3], &f32s(&[1.0, 2.0, 3.0]))).unwrap();
    let e = fails(&[
        "import",
        "--from",
        "npy",
        s(&xp),
        "--out",
        s(&out),
        "--split",
        "more",
    ]);
    assert!(e.contains("[1, 2, 2]") && e.contains("[3]"), "{e}");
    assert_eq!(
        std::fs::read_to_string(out.join("manifest.json")).unwrap(),
        before
    );
    // Replacing train with fewer samples keeps the directory consistent.
    let (ip2, lp2, _) = idx_files(dir.path(), 2, 2, 2);
    ok(butler_data(&[
        "import",
        "--from",
        "idx",
        "--images",
        s(&ip2),
        "--labels",
        s(&lp2),
        "--out",
        s(&out),
    ]));
    assert_eq!(split(&out, "train").len(), 2);
    // A directory that is not a dataset is not overwritten.
    let e = fails(&[
        "import",
        "--from",
        "npy",
        s(&xp),
        "--out",
        s(dir.path()),
        "--classes",
        "2",
    ]);
    assert!(e.contains("not a butler dataset"), "{e}");
}
