//! `--from idx`: MNIST-style IDX files (big-endian header: magic, then one u32 per dimension).

use super::writer::{numbered, ClassOrigin, ClassSpec, ImportOptions, SplitReport, WithContext};
use crate::manifest::ShardFormat;
use crate::Result;
use std::collections::BTreeMap;
use std::io::{BufReader, Read};
use std::path::Path;

fn read_be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Reads and checks an IDX header: returns the dims. `magic` is 0x00000803 or 0x00000801.
fn idx_header(path: &Path, head: &[u8], magic: u32, file_len: u64) -> Result<Vec<usize>> {
    if head.len() >= 2 && head[0] == 0x1f && head[1] == 0x8b {
        fail_input!(path.display(), "is gzip-compressed; gunzip it first");
    }
    let ndim = (magic & 0xff) as usize;
    let header_len = 4 + 4 * ndim;
    if head.len() < header_len {
        fail_input!(
            path.display(),
            "too short for an IDX header ({} bytes)",
            head.len()
        );
    }
    let got = read_be_u32(head, 0);
    if got != magic {
        fail_input!(
            path.display(),
            "magic number 0x{got:08x} is not an IDX {} file (expected 0x{magic:08x})",
            if ndim == 3 { "image" } else { "label" }
        );
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|d| read_be_u32(head, 4 + 4 * d) as usize)
        .collect();
    let want = header_len as u64 + dims.iter().map(|&d| d as u64).product::<u64>();
    if file_len != want {
        fail_input!(
            path.display(),
            "{file_len} bytes, but its header (dims {dims:?}) needs {want}"
        );
    }
    Ok(dims)
}

pub(super) fn import_idx(
    opts: &ImportOptions,
    images: &Path,
    labels: Option<&Path>,
) -> Result<SplitReport> {
    let open = |p: &Path| -> Result<(BufReader<std::fs::File>, u64)> {
        let f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
        let len = f
            .metadata()
            .with_context(|| format!("reading {}", p.display()))?
            .len();
        Ok((BufReader::new(f), len))
    };
    let (mut r, len) = open(images)?;
    let mut head = vec![0u8; 16.min(len as usize)];
    r.read_exact(&mut head)
        .with_context(|| format!("reading {}", images.display()))?;
    let dims = idx_header(images, &head, 0x0000_0803, len)?;
    let (n, rows, cols) = (dims[0], dims[1], dims[2]);
    if rows == 0 || cols == 0 {
        fail_input!(images.display(), "images of {rows}×{cols} pixels");
    }
    let ys = match labels {
        Some(lp) => {
            let bytes = std::fs::read(lp).with_context(|| format!("reading {}", lp.display()))?;
            let d = idx_header(
                lp,
                &bytes[..8.min(bytes.len())],
                0x0000_0801,
                bytes.len() as u64,
            )?;
            if d[0] != n {
                fail!(
                    "{} has {} labels but {} has {n} images",
                    lp.display(),
                    d[0],
                    images.display()
                );
            }
            Some(bytes[8..].iter().map(|&b| b as i64).collect::<Vec<_>>())
        }
        None => None,
    };
    let max = ys.iter().flatten().copied().max().unwrap_or(0) as usize;
    let classes = ClassSpec {
        names: numbered(10.max(max + 1)),
        origin: ClassOrigin::Default,
    };
    let mut source = BTreeMap::new();
    source.insert(
        "importer".into(),
        format!(
            "butler data import --from idx ({}{})",
            images.display(),
            labels.map_or(String::new(), |l| format!(", {}", l.display()))
        ),
    );
    source.insert("scale".into(), "x/255".into());
    let mut w = opts.begin(
        vec![1, rows, cols],
        classes,
        ys.is_some(),
        ShardFormat::Safetensors,
        source,
    )?;
    let mut buf = vec![0u8; rows * cols];
    let mut x = vec![0f32; rows * cols];
    for i in 0..n {
        r.read_exact(&mut buf)
            .with_context(|| format!("{}: reading image {i}", images.display()))?;
        for (v, &p) in x.iter_mut().zip(&buf) {
            *v = p as f32 / 255.0;
        }
        w.push(&x, ys.as_ref().map(|y| y[i]))
            .with_context(|| format!("{}: label {i}", labels.unwrap_or(images).display()))?;
    }
    Ok(w.finish()?.1)
}
