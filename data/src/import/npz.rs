//! `--from npz|npy`: NumPy arrays, parsed here (the `.npy` header's dict literal, little- and
//! big-endian numeric dtypes; an `.npz` is a zip of `.npy` members).

use super::writer::{numbered, ClassOrigin, ClassSpec, ImportOptions, SplitReport, WithContext};
use crate::manifest::ShardFormat;
use crate::Result;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NpyKind {
    F4,
    F8,
    I1,
    U1,
    I2,
    U2,
    I4,
    U4,
    I8,
    U8,
}

impl NpyKind {
    fn size(self) -> usize {
        match self {
            NpyKind::I1 | NpyKind::U1 => 1,
            NpyKind::I2 | NpyKind::U2 => 2,
            NpyKind::F4 | NpyKind::I4 | NpyKind::U4 => 4,
            NpyKind::F8 | NpyKind::I8 | NpyKind::U8 => 8,
        }
    }

    fn numpy_name(self) -> &'static str {
        match self {
            NpyKind::F4 => "float32",
            NpyKind::F8 => "float64",
            NpyKind::I1 => "int8",
            NpyKind::U1 => "uint8",
            NpyKind::I2 => "int16",
            NpyKind::U2 => "uint16",
            NpyKind::I4 => "int32",
            NpyKind::U4 => "uint32",
            NpyKind::I8 => "int64",
            NpyKind::U8 => "uint64",
        }
    }
}

/// A parsed `.npy` array: C-order element bytes plus dtype and shape.
pub(super) struct Npy {
    kind: NpyKind,
    big_endian: bool,
    shape: Vec<usize>,
    data: Vec<u8>,
}

/// A value in the header's Python dict literal.
#[derive(Debug, PartialEq)]
enum PyValue {
    Str(String),
    Bool(bool),
    Tuple(Vec<usize>),
}

/// Parses the `.npy` header's dict literal, e.g. `{'descr': '<f4', 'fortran_order': False,
/// 'shape': (3, 4), }` — strings, booleans and tuples of integers are all numpy writes.
fn parse_py_dict(text: &str) -> std::result::Result<BTreeMap<String, PyValue>, String> {
    struct P<'a> {
        s: &'a [u8],
        i: usize,
    }
    impl P<'_> {
        fn ws(&mut self) {
            while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
                self.i += 1;
            }
        }
        fn peek(&mut self) -> Option<u8> {
            self.ws();
            self.s.get(self.i).copied()
        }
        fn eat(&mut self, c: u8) -> std::result::Result<(), String> {
            if self.peek() == Some(c) {
                self.i += 1;
                Ok(())
            } else {
                Err(format!(
                    "expected '{}' at byte {}, found {}",
                    c as char,
                    self.i,
                    self.s
                        .get(self.i)
                        .map_or("the end".to_string(), |b| format!("'{}'", *b as char))
                ))
            }
        }
        fn string(&mut self) -> std::result::Result<String, String> {
            let q = self.peek().ok_or("unexpected end")?;
            if q != b'\'' && q != b'"' {
                return Err(format!("expected a quoted string at byte {}", self.i));
            }
            let start = self.i + 1;
            let len = self.s[start..]
                .iter()
                .position(|&b| b == q)
                .ok_or("unterminated string")?;
            self.i = start + len + 1;
            Ok(String::from_utf8_lossy(&self.s[start..start + len]).into_owned())
        }
        fn word(&mut self) -> &[u8] {
            self.ws();
            let start = self.i;
            while self.i < self.s.len() && self.s[self.i].is_ascii_alphanumeric() {
                self.i += 1;
            }
            &self.s[start..self.i]
        }
        fn value(&mut self) -> std::result::Result<PyValue, String> {
            match self.peek().ok_or("unexpected end")? {
                b'\'' | b'"' => Ok(PyValue::Str(self.string()?)),
                b'(' => {
                    self.i += 1;
                    let mut dims = Vec::new();
                    loop {
                        if self.peek() == Some(b')') {
                            self.i += 1;
                            return Ok(PyValue::Tuple(dims));
                        }
                        let w = self.word();
                        let w = std::str::from_utf8(w).unwrap_or("");
                        let w = w.strip_suffix('L').unwrap_or(w);
                        dims.push(
                            w.parse()
                                .map_err(|_| format!("shape entry {w:?} is not a size"))?,
                        );
                        if self.peek() == Some(b',') {
                            self.i += 1;
                        } else {
                            self.eat(b')')?;
                            return Ok(PyValue::Tuple(dims));
                        }
                    }
                }
                _ => match self.word() {
                    b"True" => Ok(PyValue::Bool(true)),
                    b"False" => Ok(PyValue::Bool(false)),
                    w => Err(format!(
                        "unsupported value {:?} (structured dtypes are not supported)",
                        String::from_utf8_lossy(w)
                    )),
                },
            }
        }
    }
    let mut p = P {
        s: text.as_bytes(),
        i: 0,
    };
    let mut out = BTreeMap::new();
    p.eat(b'{')?;
    loop {
        if p.peek() == Some(b'}') {
            p.i += 1;
            break;
        }
        let key = p.string()?;
        p.eat(b':')?;
        let v = p.value()?;
        out.insert(key, v);
        if p.peek() == Some(b',') {
            p.i += 1;
        } else {
            p.eat(b'}')?;
            break;
        }
    }
    if p.peek().is_some() {
        return Err(format!(
            "trailing characters after the dict at byte {}",
            p.i
        ));
    }
    Ok(out)
}

/// Parses a `.npy` file's bytes; `what` names it in errors.
fn parse_npy(mut bytes: Vec<u8>, what: &str) -> Result<Npy> {
    const MAGIC: &[u8] = b"\x93NUMPY";
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        fail_input!(what, "not a .npy file (it does not start with \\x93NUMPY)");
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let (header_len, header_start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize,
            12,
        ),
        _ => fail_input!(what, "unsupported .npy format version {major}.{minor}"),
    };
    let data_start = header_start + header_len;
    if bytes.len() < data_start {
        fail_input!(
            what,
            "truncated .npy header ({} bytes, the header says {header_len})",
            bytes.len() - header_start
        );
    }
    let header = std::str::from_utf8(&bytes[header_start..data_start])
        .map_err(|_| input_err!(what, ".npy header is not text"))?;
    let dict = parse_py_dict(header.trim_end_matches(['\n', ' ', '\0']))
        .map_err(|e| input_err!(what, "malformed .npy header {header:?}: {e}"))?;
    let descr = match dict.get("descr") {
        Some(PyValue::Str(s)) => s.clone(),
        Some(_) => fail_input!(what, ".npy header's 'descr' is not a simple dtype string (structured dtypes are not supported)"),
        None => fail_input!(what, ".npy header has no 'descr'"),
    };
    match dict.get("fortran_order") {
        Some(PyValue::Bool(false)) => {}
        Some(PyValue::Bool(true)) => fail_input!(
            what,
            "array is stored in Fortran order; save it with np.ascontiguousarray(a) first"
        ),
        _ => fail_input!(what, ".npy header has no boolean 'fortran_order'"),
    }
    let shape = match dict.get("shape") {
        Some(PyValue::Tuple(t)) => t.clone(),
        _ => fail_input!(what, ".npy header has no 'shape' tuple"),
    };
    let (order, code) = match descr.as_bytes().first() {
        Some(b'<' | b'>' | b'|' | b'=') => descr.split_at(1),
        _ => ("=", descr.as_str()),
    };
    let kind = match code {
        "f4" => NpyKind::F4,
        "f8" => NpyKind::F8,
        "i1" => NpyKind::I1,
        "u1" | "B" => NpyKind::U1,
        "i2" => NpyKind::I2,
        "u2" => NpyKind::U2,
        "i4" => NpyKind::I4,
        "u4" => NpyKind::U4,
        "i8" => NpyKind::I8,
        "u8" => NpyKind::U8,
        _ => fail_input!(
            what,
            "dtype {descr:?} is not supported (float32/64 or an integer type)"
        ),
    };
    let big_endian = order == ">" || (order == "=" && cfg!(target_endian = "big"));
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .and_then(|n| n.checked_mul(kind.size()))
        .ok_or_else(|| input_err!(what, "shape {shape:?} is too large"))?;
    let have = bytes.len() - data_start;
    if have != count {
        fail_input!(
            what,
            "{} data: shape {shape:?} of {} needs {count} bytes, the file has {have}",
            if have < count {
                "truncated"
            } else {
                "too much"
            },
            kind.numpy_name()
        );
    }
    bytes.drain(..data_start);
    Ok(Npy {
        kind,
        big_endian,
        shape,
        data: bytes,
    })
}

pub(super) fn read_npy_file(path: &Path) -> Result<Npy> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    parse_npy(bytes, &path.display().to_string())
}

/// Reads arrays `x_key` and (if present) `y_key` from an `.npz`. Returns (label, array) pairs.
#[allow(clippy::type_complexity)]
pub(super) fn read_npz(
    path: &Path,
    x_key: &str,
    y_key: &str,
) -> Result<((String, Npy), Option<(PathBuf, Npy)>)> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| input_err!(path.display(), "not a .npz (zip) archive: {e}"))?;
    let mut names: Vec<String> = zip.file_names().map(str::to_string).collect();
    names.sort();
    let mut get = |key: &str| -> Result<Option<(String, Npy)>> {
        let entry = format!("{key}.npy");
        if !names.contains(&entry) {
            return Ok(None);
        }
        let what = format!("{}[{entry}]", path.display());
        let mut f = zip
            .by_name(&entry)
            .map_err(|e| input_err!(what, "cannot read: {e}"))?;
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes)
            .map_err(|e| input_err!(what, "cannot read: {e}"))?;
        Ok(Some((what.clone(), parse_npy(bytes, &what)?)))
    };
    let x = get(x_key)?.ok_or_else(|| {
        input_err!(
            path.display(),
            "has no array {x_key:?} (it has: {}); choose one with --x-key",
            names
                .iter()
                .map(|n| n.trim_end_matches(".npy"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    let y = get(y_key)?.map(|(what, a)| (PathBuf::from(what), a));
    Ok((x, y))
}

impl Npy {
    fn elem(&self, i: usize) -> [u8; 8] {
        let n = self.kind.size();
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(&self.data[i * n..(i + 1) * n]);
        if self.big_endian {
            b[..n].reverse();
        }
        b
    }

    /// Elements `range` as f32 (x): floats as they are, uint8 divided by 255 unless `raw_u8`.
    fn floats(&self, start: usize, len: usize, raw_u8: bool, what: &str) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(len);
        for i in start..start + len {
            let b = self.elem(i);
            let v = match self.kind {
                NpyKind::F4 => f32::from_le_bytes(b[..4].try_into().expect("4 bytes")),
                NpyKind::F8 => f64::from_le_bytes(b) as f32,
                NpyKind::U1 if raw_u8 => b[0] as f32,
                NpyKind::U1 => b[0] as f32 / 255.0,
                k => fail_input!(
                    what,
                    "x dtype {} is not supported (float32, float64 or uint8)",
                    k.numpy_name()
                ),
            };
            if !v.is_finite() {
                fail_input!(what, "value {v} at flat index {i} is not finite");
            }
            out.push(v);
        }
        Ok(out)
    }

    /// All elements as labels (integer dtypes only, non-negative).
    fn labels(&self, what: &str) -> Result<Vec<i64>> {
        let n: usize = self.shape.iter().product();
        (0..n)
            .map(|i| {
                let b = self.elem(i);
                let v: i128 = match self.kind {
                    NpyKind::I1 => b[0] as i8 as i128,
                    NpyKind::U1 => b[0] as i128,
                    NpyKind::I2 => i16::from_le_bytes([b[0], b[1]]) as i128,
                    NpyKind::U2 => u16::from_le_bytes([b[0], b[1]]) as i128,
                    NpyKind::I4 => i32::from_le_bytes(b[..4].try_into().expect("4")) as i128,
                    NpyKind::U4 => u32::from_le_bytes(b[..4].try_into().expect("4")) as i128,
                    NpyKind::I8 => i64::from_le_bytes(b) as i128,
                    NpyKind::U8 => u64::from_le_bytes(b) as i128,
                    k => fail_input!(
                        what,
                        "labels must be integers (int64, int32, uint8, …), not {}",
                        k.numpy_name()
                    ),
                };
                if v < 0 || v > i64::MAX as i128 {
                    fail_input!(what, "label {v} at index {i} is negative or too large");
                }
                Ok(v as i64)
            })
            .collect()
    }
}

pub(super) fn import_arrays(
    opts: &ImportOptions,
    input: &Path,
    (x_what, x): (String, Npy),
    y: Option<(PathBuf, Npy)>,
    raw_u8: bool,
) -> Result<SplitReport> {
    if x.shape.len() < 2 {
        fail_input!(
            x_what,
            "x has shape {:?}; expected [samples, ...sample shape] with at least 2 dimensions",
            x.shape
        );
    }
    if !matches!(x.kind, NpyKind::F4 | NpyKind::F8 | NpyKind::U1) {
        fail_input!(
            x_what,
            "x dtype {} is not supported (float32, float64 or uint8)",
            x.kind.numpy_name()
        );
    }
    let n = x.shape[0];
    let sample_shape = x.shape[1..].to_vec();
    let labels = match &y {
        Some((yp, ya)) => {
            let what = yp.display().to_string();
            let ok_shape = ya.shape == [n] || ya.shape == [n, 1];
            if !ok_shape {
                fail_input!(
                    what,
                    "labels have shape {:?}; expected [{n}] to match the {n} samples of {x_what}",
                    ya.shape
                );
            }
            Some(ya.labels(&what)?)
        }
        None => None,
    };
    let max = labels.iter().flatten().copied().max();
    let classes = ClassSpec {
        names: max.map_or(Vec::new(), |m| numbered(m as usize + 1)),
        origin: ClassOrigin::Default,
    };
    let mut source = BTreeMap::new();
    source.insert(
        "importer".into(),
        format!("butler data import ({})", input.display()),
    );
    if x.kind == NpyKind::U1 {
        source.insert(
            "scale".into(),
            if raw_u8 { "none (uint8 kept)" } else { "x/255" }.into(),
        );
    }
    let mut w = opts.begin(
        sample_shape,
        classes,
        labels.is_some(),
        ShardFormat::Safetensors,
        source,
    )?;
    let numel: usize = x.shape[1..].iter().product();
    for i in 0..n {
        let xs = x.floats(i * numel, numel, raw_u8, &x_what)?;
        let yi = labels.as_ref().map(|l| l[i]);
        w.push(&xs, yi).with_context(|| {
            format!(
                "{}: sample {i}",
                y.as_ref()
                    .map_or(x_what.clone(), |(p, _)| p.display().to_string())
            )
        })?;
    }
    Ok(w.finish()?.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(header: &str, data: &[u8]) -> Vec<u8> {
        let mut h = header.to_string();
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

    #[test]
    fn header_dicts() {
        let d =
            parse_py_dict("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }").unwrap();
        assert_eq!(d["descr"], PyValue::Str("<f4".into()));
        assert_eq!(d["fortran_order"], PyValue::Bool(false));
        assert_eq!(d["shape"], PyValue::Tuple(vec![3, 4]));
        let d = parse_py_dict("{\"shape\": (5,), \"descr\": \"|u1\", \"fortran_order\": True}")
            .unwrap();
        assert_eq!(d["shape"], PyValue::Tuple(vec![5]));
        assert_eq!(
            parse_py_dict("{'shape': ()}").unwrap()["shape"],
            PyValue::Tuple(vec![])
        );
        assert!(parse_py_dict("{'descr': [('a', '<f4')]}").is_err());
        assert!(parse_py_dict("{'descr': '<f4'").is_err());
        assert!(parse_py_dict("{'shape': (3, x)}").is_err());
    }

    #[test]
    fn npy_arrays_and_their_errors() {
        let a = parse_npy(
            npy(
                "{'descr': '>i2', 'fortran_order': False, 'shape': (2,), }",
                &[0, 7, 1, 0],
            ),
            "a.npy",
        )
        .unwrap();
        assert_eq!(a.labels("a.npy").unwrap(), vec![7, 256]);
        let f = parse_npy(
            npy(
                "{'descr': '<f8', 'fortran_order': False, 'shape': (1, 1), }",
                &2.5f64.to_le_bytes(),
            ),
            "f.npy",
        )
        .unwrap();
        assert_eq!(f.floats(0, 1, false, "f").unwrap(), vec![2.5]);
        assert!(f
            .labels("f.npy")
            .unwrap_err()
            .to_string()
            .contains("integers"));
        let e = |b: Vec<u8>| parse_npy(b, "bad.npy").err().unwrap().to_string();
        assert!(e(b"PK\x03\x04 not numpy".to_vec()).contains("not a .npy"));
        assert!(e(npy(
            "{'descr': '<f4', 'fortran_order': True, 'shape': (1,), }",
            &[0; 4]
        ))
        .contains("Fortran"));
        assert!(e(npy(
            "{'descr': '<c8', 'fortran_order': False, 'shape': (1,), }",
            &[0; 8]
        ))
        .contains("<c8"));
        assert!(e(npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }",
            &[0; 4]
        ))
        .contains("truncated"));
        assert!(e(npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), ",
            &[0; 8]
        ))
        .contains("malformed"));
    }
}
