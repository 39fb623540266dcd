//! TensorBoard event files, written and read without TensorFlow: TFRecord framing (length, masked
//! CRC-32C of the length, data, masked CRC-32C of the data) around `Event` protocol buffers carrying
//! scalar `Summary` values — the subset of `tensorflow/core/util/event.proto` and `summary.proto` that
//! `SummaryWriter.add_scalar` writes. A wrong CRC makes TensorBoard drop the rest of a file silently, so
//! the reader checks both CRCs of every record and the tests count tags and points.

use crate::metrics::unix_now;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// `tensorflow.Event` (the fields butler writes or reads).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    /// `oneof what`: the first record's `file_version`.
    #[prost(string, optional, tag = "3")]
    pub file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    pub summary: Option<Summary>,
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value` with the old-style `simple_value` scalar.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bytewise with a table built once.
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// TFRecord's masked CRC: rotate right by 15 and add a constant.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let c = crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord frame around `data`.
pub fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

/// Appends scalar events to one `events.out.tfevents.*` file.
pub struct EventWriter {
    out: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// A new event file in `dir` (created if missing), named the way TensorBoard discovers it.
    pub fn create(dir: &Path) -> std::io::Result<EventWriter> {
        std::fs::create_dir_all(dir)?;
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty() && !h.contains(['/', '.']))
            .unwrap_or_else(|| "butler".into());
        // A restarted coordinator writes a second file next to the first; TensorBoard merges them.
        let mut n = 0;
        let path = loop {
            let p = dir.join(format!(
                "events.out.tfevents.{}.{host}.{}.{n}",
                unix_now() as u64,
                std::process::id()
            ));
            if !p.exists() {
                break p;
            }
            n += 1;
        };
        let mut w = EventWriter {
            out: BufWriter::new(File::create(&path)?),
            path,
        };
        w.write(&Event {
            wall_time: unix_now(),
            step: 0,
            file_version: Some("brain.Event:2".into()),
            summary: None,
        })?;
        w.flush()?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, e: &Event) -> std::io::Result<()> {
        self.out
            .write_all(&frame(&prost::Message::encode_to_vec(e)))
    }

    /// One event at `step` holding every `(tag, value)` as a scalar.
    pub fn scalars<'a>(
        &mut self,
        step: u64,
        values: impl IntoIterator<Item = (&'a str, f64)>,
    ) -> std::io::Result<()> {
        let value: Vec<SummaryValue> = values
            .into_iter()
            .filter(|(_, v)| v.is_finite())
            .map(|(tag, v)| SummaryValue {
                tag: tag.to_string(),
                simple_value: Some(v as f32),
            })
            .collect();
        if value.is_empty() {
            return Ok(());
        }
        self.write(&Event {
            wall_time: unix_now(),
            step: step as i64,
            file_version: None,
            summary: Some(Summary { value }),
        })
    }

    /// Makes what was written visible to a reader (TensorBoard polls the file).
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Why an event file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{path}: record {record} at byte {offset}: {why}")]
    Corrupt {
        path: PathBuf,
        record: usize,
        offset: usize,
        why: String,
    },
}

/// Every event of an event file, checking both CRCs of every record.
pub fn read_events(path: &Path) -> Result<Vec<Event>, ReadError> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| ReadError::Io(path.into(), e))?;
    parse_events(path, &bytes)
}

/// Every event of an event file's bytes (TFRecord framing: length, its CRC, data, its CRC), checking
/// both CRCs of every record. `path` is only for messages. A record's announced length is compared
/// with the bytes left before it is used, so a hostile length is an error, not an overflow.
pub fn parse_events(path: &Path, bytes: &[u8]) -> Result<Vec<Event>, ReadError> {
    let mut events = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let corrupt = |why: String| ReadError::Corrupt {
            path: path.into(),
            record: events.len(),
            offset: at,
            why,
        };
        let header = bytes
            .get(at..)
            .and_then(|rest| rest.get(..12))
            .ok_or_else(|| corrupt("truncated header".into()))?;
        let (len_bytes, len_crc) = header.split_at(8);
        if masked_crc32c(len_bytes) != u32::from_le_bytes(len_crc.try_into().expect("4 bytes")) {
            return Err(corrupt("length CRC mismatch".into()));
        }
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
        let rest = &bytes[at + 12..];
        let data = usize::try_from(len)
            .ok()
            .and_then(|n| rest.get(..n))
            .ok_or_else(|| corrupt(format!("truncated data ({len} bytes announced)")))?;
        let crc = rest
            .get(data.len()..data.len() + 4)
            .ok_or_else(|| corrupt("truncated data CRC".into()))?;
        if masked_crc32c(data) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return Err(corrupt("data CRC mismatch".into()));
        }
        let e: Event = prost::Message::decode(data).map_err(|e| corrupt(e.to_string()))?;
        events.push(e);
        at += 16 + data.len();
    }
    Ok(events)
}

/// Every scalar of every event file under `dir`, as tag → (step, value) points in file order.
pub fn read_scalars(dir: &Path) -> Result<BTreeMap<String, Vec<(i64, f32)>>, ReadError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| ReadError::Io(dir.into(), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains("tfevents"))
        })
        .collect();
    files.sort();
    let mut out: BTreeMap<String, Vec<(i64, f32)>> = BTreeMap::new();
    for f in files {
        for e in read_events(&f)? {
            for v in e.summary.map(|s| s.value).unwrap_or_default() {
                if let Some(x) = v.simple_value {
                    out.entry(v.tag).or_default().push((e.step, x));
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_known_vectors() {
        // From TensorBoard's own CRC module (the `123456789` check value of CRC-32C).
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(masked_crc32c(b"123456789"), 0xc78a_b0e5);
        assert_eq!(masked_crc32c(b""), 0xa282_ead8);
    }

    #[test]
    fn written_scalars_read_back_and_a_flipped_byte_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        for step in 1..=5u64 {
            w.scalars(
                step * 10,
                [("train/loss", 1.0 / step as f64), ("train/lr", 0.1)],
            )
            .unwrap();
        }
        w.flush().unwrap();
        let s = read_scalars(dir.path()).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s["train/loss"].len(), 5);
        assert_eq!(s["train/loss"][4], (50, 0.2));
        assert_eq!(s["train/lr"][0], (10, 0.1));
        let first = read_events(w.path()).unwrap();
        assert_eq!(first[0].file_version.as_deref(), Some("brain.Event:2"));

        let mut bytes = std::fs::read(w.path()).unwrap();
        let n = bytes.len();
        bytes[n - 6] ^= 0x01;
        std::fs::write(w.path(), &bytes).unwrap();
        let err = read_events(w.path()).unwrap_err().to_string();
        assert!(err.contains("CRC mismatch"), "{err}");
    }

    // Regression (hostile-input property tests): a record announcing a length near 2^64 (with a
    // valid length CRC) overflowed `at + 12 + len` — a panic in debug builds.
    #[test]
    fn a_record_announcing_a_huge_length_is_corrupt() {
        let len = u64::MAX - 4;
        let mut bytes = len.to_le_bytes().to_vec();
        bytes.extend_from_slice(&masked_crc32c(&len.to_le_bytes()).to_le_bytes());
        bytes.extend_from_slice(b"some data");
        let err = parse_events(Path::new("e"), &bytes)
            .unwrap_err()
            .to_string();
        assert!(err.contains("truncated data"), "{err}");
        let ok = frame(b"");
        assert_eq!(parse_events(Path::new("e"), &ok).unwrap().len(), 1);
    }
}
