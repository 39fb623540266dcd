//! WebDataset-style tar shards of encoded images: a plain (uncompressed) tar whose entries are grouped
//! into samples by key, in tar order. A sample is `KEY.png` (or `KEY.jpg` / `KEY.jpeg`) plus, in
//! labeled splits, `KEY.cls` holding the label as an ASCII integer. The key is the entry's path up to
//! the first dot of its file name; consecutive entries with the same key form one sample. Entries with
//! any other extension are ignored. Sample `i` of a shard has id `first_id + i` (ids are not stored).
//!
//! Reading decodes each image to f32 in `[0, 1]`, channel-first (`[C, H, W]`): grayscale images (with
//! or without alpha) have C = 1, colour images C = 3 (alpha is dropped); 16-bit images are scaled by
//! 65535. A sample that does not decode, has the wrong shape, or has a missing, unreadable or
//! out-of-range label is *corrupt*: skipped or an error, as the caller's [`CorruptPolicy`] says. A tar
//! that cannot be read as a whole, is truncated, or holds a different number of samples than the
//! manifest says is always an error naming the file.

use crate::manifest::{Manifest, ShardEntry};
use crate::samples::{CorruptPolicy, ShardData, SkippedSample};
use crate::{Error, Result};
use butler_common::fsutil;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// The image extensions a sample may use (lower case; matched case-insensitively).
pub const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// The normalised image extension of a file name (`"png"`, `"jpg"` or `"jpeg"`), if it is one.
pub fn image_extension(name: &str) -> Option<&'static str> {
    let ext = name.rsplit_once('.')?.1.to_ascii_lowercase();
    IMAGE_EXTENSIONS.into_iter().find(|&e| e == ext)
}

/// One decoded image: `data` is `[C, H, W]` (channel-first), f32 in `[0, 1]`.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodedImage {
    pub shape: [usize; 3],
    pub data: Vec<f32>,
}

/// Decodes a PNG or JPEG (recognised by its content, not its name) to a channel-first f32 image in
/// `[0, 1]`. Grayscale gives C = 1, colour C = 3; alpha is dropped. The error says what is wrong
/// without naming a file (the caller knows which one it is).
pub fn decode_image(bytes: &[u8]) -> std::result::Result<DecodedImage, String> {
    let format = image::guess_format(bytes)
        .map_err(|_| "not a PNG or JPEG image (unrecognised content)".to_string())?;
    if !matches!(format, image::ImageFormat::Png | image::ImageFormat::Jpeg) {
        return Err(format!("is {format:?}, only PNG and JPEG are supported"));
    }
    let img = image::load_from_memory_with_format(bytes, format)
        .map_err(|e| format!("cannot decode {format:?}: {e}"))?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (c, hwc) = if img.color().has_color() {
        (3, img.to_rgb32f().into_raw())
    } else {
        (1, img.to_luma32f().into_raw())
    };
    let hw = h * w;
    let mut data = vec![0f32; c * hw];
    for (p, px) in hwc.chunks_exact(c).enumerate() {
        for (ch, &v) in px.iter().enumerate() {
            data[ch * hw + p] = v.clamp(0.0, 1.0);
        }
    }
    Ok(DecodedImage {
        shape: [c, h, w],
        data,
    })
}

/// The (height, width) a PNG or JPEG header announces, read without decoding the pixels, so that a
/// small file announcing a huge image is refused before anything is allocated for it.
pub fn image_dimensions(bytes: &[u8]) -> std::result::Result<(usize, usize), String> {
    let format = image::guess_format(bytes)
        .map_err(|_| "not a PNG or JPEG image (unrecognised content)".to_string())?;
    if !matches!(format, image::ImageFormat::Png | image::ImageFormat::Jpeg) {
        return Err(format!("is {format:?}, only PNG and JPEG are supported"));
    }
    let (w, h) = image::ImageReader::with_format(std::io::Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(|e| format!("cannot decode {format:?}: {e}"))?;
    Ok((h as usize, w as usize))
}

/// Checks that `shape` can describe images: `[C, H, W]` with C = 1 (grayscale) or 3 (RGB).
pub fn check_image_shape(shape: &[usize]) -> std::result::Result<(), String> {
    match shape {
        [1 | 3, h, w] if *h > 0 && *w > 0 => Ok(()),
        _ => Err(format!(
            "sample_shape {shape:?} is not an image shape [C, H, W] with C = 1 or 3"
        )),
    }
}

/// The entries of one sample, gathered while walking the tar.
struct Group {
    key: String,
    images: Vec<(String, Vec<u8>)>,
    labels: Vec<(String, Vec<u8>)>,
}

/// Splits an entry name into (key, lower-case extension): the key is the path up to the first dot
/// of the file name.
fn split_key(name: &str) -> (&str, String) {
    let base_start = name.rfind('/').map_or(0, |i| i + 1);
    match name[base_start..].find('.') {
        Some(dot) => (
            &name[..base_start + dot],
            name[base_start + dot + 1..].to_ascii_lowercase(),
        ),
        None => (name, String::new()),
    }
}

/// Reads a tar shard whose bytes (checksum already verified) are `bytes`. `path` is for messages.
pub(crate) fn read_tar_shard(
    path: &Path,
    bytes: &[u8],
    manifest: &Manifest,
    entry: &ShardEntry,
    labeled: bool,
    policy: CorruptPolicy,
) -> Result<(ShardData, Vec<SkippedSample>)> {
    let bad = |message: String| Error::Shard {
        path: path.to_path_buf(),
        message,
    };
    check_image_shape(&manifest.sample_shape).map_err(|m| bad(format!("tar shard, but {m}")))?;

    // Pass 1: group the entries into samples (whole-shard problems are errors here).
    let mut groups: Vec<Group> = Vec::new();
    let mut archive = tar::Archive::new(bytes);
    let entries = archive
        .entries()
        .map_err(|e| bad(format!("not a readable tar archive: {e}")))?;
    for item in entries {
        let mut e = item.map_err(|e| {
            bad(format!(
                "not a readable tar archive (after {} samples): {e}",
                groups.len()
            ))
        })?;
        if !e.header().entry_type().is_file() {
            continue;
        }
        let name = e
            .path()
            .map_err(|err| bad(format!("tar entry with an unreadable name: {err}")))?
            .to_string_lossy()
            .into_owned();
        let (key, ext) = split_key(&name);
        let is_image = IMAGE_EXTENSIONS.contains(&ext.as_str());
        if !is_image && ext != "cls" {
            continue;
        }
        let size = e.size();
        let mut data = Vec::with_capacity(size.min(bytes.len() as u64) as usize);
        e.read_to_end(&mut data)
            .map_err(|err| bad(format!("cannot read tar entry {name}: {err}")))?;
        if (data.len() as u64) < size {
            return Err(bad(format!(
                "truncated: tar entry {name} has {} of its {size} bytes",
                data.len()
            )));
        }
        if groups.last().is_none_or(|g| g.key != key) {
            groups.push(Group {
                key: key.to_string(),
                images: Vec::new(),
                labels: Vec::new(),
            });
        }
        let g = groups.last_mut().expect("pushed above");
        if is_image {
            g.images.push((name, data));
        } else {
            g.labels.push((name, data));
        }
    }
    if groups.len() as u64 != entry.num_samples {
        return Err(bad(format!(
            "holds {} samples but the manifest says {} (truncated or replaced?)",
            groups.len(),
            entry.num_samples
        )));
    }

    // Pass 2: decode and check each sample.
    let numel = manifest.sample_numel();
    let k = manifest.num_classes() as i64;
    let mut out = ShardData {
        // Bounded: `numel` by the manifest's validation, `groups` by the bytes actually read.
        x: Vec::with_capacity(groups.len().saturating_mul(numel).min(bytes.len())),
        y: labeled.then(|| Vec::with_capacity(groups.len())),
        ids: Vec::with_capacity(groups.len()),
    };
    let mut skipped = Vec::new();
    for (index, g) in groups.into_iter().enumerate() {
        match check_sample(&g, &manifest.sample_shape, labeled, k) {
            Ok((x, y)) => {
                out.x.extend_from_slice(&x);
                if let (Some(all), Some(y)) = (out.y.as_mut(), y) {
                    all.push(y);
                }
                out.ids.push(entry.first_id.saturating_add(index as u64));
            }
            Err(reason) => match policy {
                CorruptPolicy::Fail => {
                    return Err(bad(format!("sample {index} (key {:?}): {reason}", g.key)))
                }
                CorruptPolicy::Skip => skipped.push(SkippedSample {
                    shard: path.to_path_buf(),
                    index,
                    reason: format!("key {:?}: {reason}", g.key),
                }),
            },
        }
    }
    Ok((out, skipped))
}

fn check_sample(
    g: &Group,
    shape: &[usize],
    labeled: bool,
    num_classes: i64,
) -> std::result::Result<(Vec<f32>, Option<i64>), String> {
    let (name, bytes) = match g.images.as_slice() {
        [one] => one,
        [] => return Err("no .png/.jpg/.jpeg entry".into()),
        many => {
            return Err(format!(
                "{} image entries ({}), expected one",
                many.len(),
                many.iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        }
    };
    // The header's size first: decoding allocates for whatever size the header announces.
    let (h, w) = image_dimensions(bytes).map_err(|e| format!("{name}: {e}"))?;
    if shape.get(1..) != Some(&[h, w][..]) {
        return Err(format!("{name} is {h}×{w} (H×W), expected {shape:?}"));
    }
    let img = decode_image(bytes).map_err(|e| format!("{name}: {e}"))?;
    if img.shape[..] != *shape {
        return Err(format!(
            "{name} is {:?} (C, H, W), expected {shape:?}",
            img.shape
        ));
    }
    let y = if labeled {
        let (cls_name, cls) = match g.labels.as_slice() {
            [one] => one,
            [] => return Err("no .cls label entry".into()),
            _ => return Err("several .cls label entries".into()),
        };
        Some(parse_label(cls, num_classes).map_err(|e| format!("{cls_name}: {e}"))?)
    } else {
        None
    };
    Ok((img.data, y))
}

/// Parses a `.cls` entry: an ASCII integer (surrounding whitespace allowed) in `0..num_classes`.
pub fn parse_label(bytes: &[u8], num_classes: i64) -> std::result::Result<i64, String> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| "label is not ASCII text".to_string())?
        .trim();
    let label: i64 = text
        .parse()
        .map_err(|_| format!("label {text:?} is not an integer"))?;
    if label < 0 || label >= num_classes {
        return Err(format!("label {label} outside 0..{num_classes}"));
    }
    Ok(label)
}

/// A writer that hashes what passes through it.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes one tar shard sample by sample, atomically: the tar grows in a temporary sibling file that
/// is fsynced and renamed onto the target by [`TarShardWriter::finish`]; dropping an unfinished
/// writer removes the temporary file.
pub struct TarShardWriter {
    path: PathBuf,
    tmp: PathBuf,
    builder: Option<tar::Builder<HashingWriter<BufWriter<File>>>>,
    samples: u64,
}

impl TarShardWriter {
    pub fn create(path: &Path) -> Result<Self> {
        let tmp = fsutil::temp_sibling(path);
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut builder = tar::Builder::new(HashingWriter {
            inner: BufWriter::new(file),
            hasher: Sha256::new(),
        });
        builder.mode(tar::HeaderMode::Deterministic);
        Ok(TarShardWriter {
            path: path.to_path_buf(),
            tmp,
            builder: Some(builder),
            samples: 0,
        })
    }

    /// Samples written so far.
    pub fn len(&self) -> u64 {
        self.samples
    }

    pub fn is_empty(&self) -> bool {
        self.samples == 0
    }

    /// Appends one sample: `KEY.EXT` with the encoded image bytes, then `KEY.cls` if `label` is given.
    /// `key` must not contain a dot or a slash; `ext` is `png`, `jpg` or `jpeg`.
    pub fn append(&mut self, key: &str, ext: &str, image: &[u8], label: Option<i64>) -> Result<()> {
        if key.is_empty() || key.contains(['.', '/']) || !IMAGE_EXTENSIONS.contains(&ext) {
            return Err(Error::Shard {
                path: self.path.clone(),
                message: format!("cannot store sample {key:?}.{ext:?}: bad key or extension"),
            });
        }
        self.entry(&format!("{key}.{ext}"), image)?;
        if let Some(label) = label {
            self.entry(&format!("{key}.cls"), label.to_string().as_bytes())?;
        }
        self.samples += 1;
        Ok(())
    }

    fn entry(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let mut header = tar::Header::new_ustar();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        let builder = self.builder.as_mut().expect("not finished");
        builder
            .append_data(&mut header, name, data)
            .map_err(|e| Error::io(&self.tmp, e))
    }

    /// Ends the archive, fsyncs it, renames it onto the target and returns its hex SHA-256.
    pub fn finish(mut self) -> Result<String> {
        let builder = self.builder.take().expect("finish is called once");
        let mut w = builder.into_inner().map_err(|e| Error::io(&self.tmp, e))?;
        w.flush().map_err(|e| Error::io(&self.tmp, e))?;
        let digest = hex::encode(w.hasher.finalize());
        let file = w
            .inner
            .into_inner()
            .map_err(|e| Error::io(&self.tmp, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&self.tmp, e))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).map_err(|e| Error::io(&self.path, e))?;
        fsutil::sync_parent(&self.path)?;
        Ok(digest)
    }
}

impl Drop for TarShardWriter {
    fn drop(&mut self) {
        if self.builder.is_some() {
            // Unfinished (an error upstream): leave nothing behind.
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::ShardFormat;
    use crate::shard::{read_shard, read_shard_checked};

    fn png(shape: [usize; 3], seed: u8) -> Vec<u8> {
        let [c, h, w] = shape;
        let raw: Vec<u8> = (0..c * h * w)
            .map(|i| (i as u8).wrapping_mul(37).wrapping_add(seed))
            .collect();
        let mut out = Vec::new();
        let enc = image::codecs::png::PngEncoder::new(&mut out);
        let ct = if c == 1 {
            image::ExtendedColorType::L8
        } else {
            image::ExtendedColorType::Rgb8
        };
        image::ImageEncoder::write_image(enc, &raw, w as u32, h as u32, ct).unwrap();
        out
    }

    /// The expected CHW floats of `png(shape, seed)`.
    fn expected(shape: [usize; 3], seed: u8) -> Vec<f32> {
        let [c, h, w] = shape;
        let mut out = vec![0f32; c * h * w];
        for p in 0..h * w {
            for ch in 0..c {
                let i = p * c + ch;
                out[ch * h * w + p] = (i as u8).wrapping_mul(37).wrapping_add(seed) as f32 / 255.0;
            }
        }
        out
    }

    fn manifest(shape: Vec<usize>, entry: ShardEntry, labeled: bool) -> Manifest {
        Manifest::single_shard(shape, 3, entry, labeled)
    }

    fn write_tar(path: &Path, samples: &[(&str, &str, Vec<u8>, Option<i64>)]) -> ShardEntry {
        let mut w = TarShardWriter::create(path).unwrap();
        for (key, ext, bytes, label) in samples {
            w.append(key, ext, bytes, *label).unwrap();
        }
        let n = w.len();
        let sha256 = w.finish().unwrap();
        ShardEntry {
            path: path.file_name().unwrap().to_string_lossy().into_owned(),
            format: ShardFormat::Tar,
            num_samples: n,
            sha256,
            first_id: 100,
        }
    }

    #[test]
    fn keys_and_extensions() {
        assert_eq!(split_key("a/b/000.png"), ("a/b/000", "png".into()));
        assert_eq!(split_key("k.seg.PNG"), ("k", "seg.png".into()));
        assert_eq!(split_key("x.y/k"), ("x.y/k", String::new()));
        assert_eq!(image_extension("A.JPEG"), Some("jpeg"));
        assert_eq!(image_extension("a.gif"), None);
    }

    #[test]
    fn round_trip_gray_and_rgb_with_labels() {
        let dir = tempfile::tempdir().unwrap();
        for shape in [[1, 4, 5], [3, 2, 3]] {
            let e = write_tar(
                &dir.path().join("s.tar"),
                &[
                    ("a", "png", png(shape, 1), Some(2)),
                    ("b", "png", png(shape, 9), Some(0)),
                ],
            );
            let m = manifest(shape.to_vec(), e.clone(), true);
            let d = read_shard(dir.path(), &m, &e, true).unwrap();
            let mut x = expected(shape, 1);
            x.extend(expected(shape, 9));
            assert_eq!(d.x, x);
            assert_eq!(d.y, Some(vec![2, 0]));
            assert_eq!(d.ids, vec![100, 101]);
            // The same shard read as unlabeled ignores the labels.
            let d = read_shard(dir.path(), &m, &e, false).unwrap();
            assert_eq!(d.y, None);
        }
    }

    #[test]
    fn jpeg_decodes_close_to_its_source() {
        let (h, w) = (8, 8);
        let raw: Vec<u8> = vec![200; h * w * 3];
        let mut bytes = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 95)
            .encode(&raw, w as u32, h as u32, image::ExtendedColorType::Rgb8)
            .unwrap();
        let img = decode_image(&bytes).unwrap();
        assert_eq!(img.shape, [3, 8, 8]);
        assert!(img.data.iter().all(|v| (v - 200.0 / 255.0).abs() < 0.02));
    }

    #[test]
    fn corrupt_samples_are_skipped_or_fail() {
        let dir = tempfile::tempdir().unwrap();
        let shape = [1, 3, 3];
        let e = write_tar(
            &dir.path().join("s.tar"),
            &[
                ("a", "png", png(shape, 1), Some(1)),
                ("b", "png", b"garbage, not an image".to_vec(), Some(1)),
                ("c", "png", png([1, 4, 3], 2), Some(1)),
                ("d", "png", png(shape, 3), Some(7)),
                ("e", "jpg", png(shape, 4), Some(2)),
            ],
        );
        let m = manifest(shape.to_vec(), e.clone(), true);
        let (d, skipped) =
            read_shard_checked(dir.path(), &m, &e, true, CorruptPolicy::Skip).unwrap();
        // A PNG stored under .jpg still decodes: the content decides.
        assert_eq!(d.ids, vec![100, 104]);
        assert_eq!(d.y, Some(vec![1, 2]));
        let idx: Vec<usize> = skipped.iter().map(|s| s.index).collect();
        assert_eq!(idx, vec![1, 2, 3]);
        assert!(skipped[0].reason.contains("b.png"), "{}", skipped[0].reason);
        assert!(skipped[1].reason.contains("expected [1, 3, 3]"));
        assert!(skipped[2].reason.contains("label 7 outside 0..3"));
        assert!(
            skipped[0].to_string().contains("s.tar") && skipped[0].to_string().contains("sample 1")
        );

        let err = read_shard_checked(dir.path(), &m, &e, true, CorruptPolicy::Fail)
            .unwrap_err()
            .to_string();
        assert!(err.contains("s.tar") && err.contains("sample 1"), "{err}");
    }

    /// `png(shape, seed)` with its IHDR rewritten to announce `h`×`w` (the CRC recomputed).
    fn png_announcing(h: u32, w: u32) -> Vec<u8> {
        fn crc32(bytes: &[u8]) -> u32 {
            let mut crc = !0u32;
            for &b in bytes {
                crc ^= b as u32;
                for _ in 0..8 {
                    crc = if crc & 1 == 1 {
                        (crc >> 1) ^ 0xedb8_8320
                    } else {
                        crc >> 1
                    };
                }
            }
            !crc
        }
        let mut b = png([1, 3, 3], 0);
        // Signature (8), length (4), "IHDR" (4), width, height, …; the CRC covers "IHDR" + 13 bytes.
        b[16..20].copy_from_slice(&w.to_be_bytes());
        b[20..24].copy_from_slice(&h.to_be_bytes());
        let crc = crc32(&b[12..29]);
        b[29..33].copy_from_slice(&crc.to_be_bytes());
        b
    }

    // Regression (hostile-input property tests): an image was decoded — and its pixels allocated at
    // whatever size its header announced — before its size was compared with the manifest's.
    #[test]
    fn an_image_announcing_a_huge_size_is_refused_before_decoding() {
        assert_eq!(image_dimensions(&png_announcing(3, 3)).unwrap(), (3, 3));
        let huge = png_announcing(20_000, 20_000);
        assert_eq!(image_dimensions(&huge).unwrap(), (20_000, 20_000));
        let g = Group {
            key: "k".into(),
            images: vec![("k.png".into(), huge)],
            labels: vec![],
        };
        let e = check_sample(&g, &[1, 3, 3], false, 3).unwrap_err();
        assert!(e.contains("20000×20000 (H×W), expected [1, 3, 3]"), "{e}");
    }

    #[test]
    fn missing_label_is_corrupt_only_when_labeled() {
        let dir = tempfile::tempdir().unwrap();
        let shape = [1, 2, 2];
        let e = write_tar(
            &dir.path().join("s.tar"),
            &[
                ("a", "png", png(shape, 1), None),
                ("b", "png", png(shape, 2), Some(0)),
            ],
        );
        let m = manifest(shape.to_vec(), e.clone(), true);
        let (d, skipped) =
            read_shard_checked(dir.path(), &m, &e, true, CorruptPolicy::Skip).unwrap();
        assert_eq!((d.len(), skipped.len()), (1, 1));
        assert!(skipped[0].reason.contains(".cls"), "{}", skipped[0].reason);
        let (d, skipped) =
            read_shard_checked(dir.path(), &m, &e, false, CorruptPolicy::Fail).unwrap();
        assert_eq!((d.len(), skipped.len()), (2, 0));
    }

    #[test]
    fn truncated_or_miscounted_tar_is_a_shard_error() {
        let dir = tempfile::tempdir().unwrap();
        let shape = [1, 8, 8];
        let p = dir.path().join("s.tar");
        let e = write_tar(
            &p,
            &[
                ("a", "png", png(shape, 1), Some(0)),
                ("b", "png", png(shape, 2), Some(1)),
            ],
        );
        let m = manifest(shape.to_vec(), e.clone(), true);
        let bytes = std::fs::read(&p).unwrap();
        // Cut inside the second image; re-hash so that the tar reader itself must notice.
        for cut in [700, 1024 + 100, bytes.len() / 2 + 3] {
            std::fs::write(&p, &bytes[..cut]).unwrap();
            let e2 = ShardEntry {
                sha256: hex::encode(Sha256::digest(&bytes[..cut])),
                ..e.clone()
            };
            for policy in [CorruptPolicy::Skip, CorruptPolicy::Fail] {
                let err = read_shard_checked(dir.path(), &m, &e2, true, policy)
                    .unwrap_err()
                    .to_string();
                assert!(err.contains("s.tar"), "{err}");
            }
        }
        // Unchanged checksum: the mismatch is caught first.
        std::fs::write(&p, &bytes[..bytes.len() - 1024]).unwrap();
        let err = read_shard(dir.path(), &m, &e, true)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("s.tar") && err.contains("checksum mismatch"),
            "{err}"
        );
    }

    #[test]
    fn non_image_sample_shape_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let e = write_tar(
            &dir.path().join("s.tar"),
            &[("a", "png", png([1, 2, 2], 0), None)],
        );
        let m = manifest(vec![4], e.clone(), false);
        let err = read_shard(dir.path(), &m, &e, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("s.tar") && err.contains("not an image shape"),
            "{err}"
        );
    }

    #[test]
    fn unfinished_writer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = TarShardWriter::create(&dir.path().join("s.tar")).unwrap();
        w.append("a", "png", b"x", None).unwrap();
        assert!(w.append("a.b", "png", b"x", None).is_err());
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
