//! GGUF reader: header, metadata and tensor directory of a GGUF v2/v3 file.
//!
//! Owns the file's bytes and hands out bounds-checked views of tensor data.
//! Every length and offset read from the file is checked against what is left
//! of it, so a truncated or corrupt file is an error, never a panic or an
//! out-of-bounds read. It knows nothing about Llama (`config` interprets the
//! metadata) and does not compute: a tensor's type is kept as the raw GGML type
//! id, which the engine maps to its kernels' type where it loads weights. Only
//! the storage size of the types the engine computes with is known here, to
//! check that their data lies inside the file.

use std::collections::HashMap;
use std::path::Path;

use crate::error::TextError;

const MAGIC: u32 = 0x4655_4747; // "GGUF", little-endian
const DEFAULT_ALIGNMENT: u64 = 32;
/// GGML type ids whose storage this reader knows: (id, name, elements per block, bytes per
/// block). Every type the kernels compute with (the engine's tests check that both agree), and a
/// few they do not (Q2_K, Q3_K, BF16) so that such files parse and the engine refuses them by
/// name; tensors of other types are kept unsized and refused when read.
const SIZED_TYPES: &[(u32, &str, u64, u64)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (30, "BF16", 1, 2),
];
/// Arrays and strings longer than this are treated as corruption.
const MAX_ELEMENTS: u64 = 1 << 28;
const MAX_DIMS: u32 = 4;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as an `i64`, if it is an integer that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::U64(v) => i64::try_from(v).ok(),
            Value::I64(v) => Some(v),
            _ => self.as_u64().map(|v| v as i64).or(match *self {
                Value::I8(v) => Some(v as i64),
                Value::I16(v) => Some(v as i64),
                Value::I32(v) => Some(v as i64),
                _ => None,
            }),
        }
    }

    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Value::F32(v) => Some(v),
            Value::F64(v) => Some(v as f32),
            _ => self.as_i64().map(|v| v as f32),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions in GGML order: `dims[0]` is the contiguous (row) length.
    pub dims: Vec<u64>,
    /// The GGML type id as stored (the engine maps it to the kernels' type).
    pub type_id: u32,
    /// Absolute byte range of the tensor's data in the file; empty for a type of unknown size.
    pub start: usize,
    pub len: usize,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

fn sized_type(type_id: u32) -> Option<&'static (u32, &'static str, u64, u64)> {
    SIZED_TYPES.iter().find(|t| t.0 == type_id)
}

/// Bytes taken by `n_elements` of GGML type `type_id` in rows of `row_len`: `None` for a type
/// of unknown size, an error if rows are not whole blocks.
pub fn tensor_byte_size(type_id: u32, n_elements: u64, row_len: u64) -> Option<Result<u64, String>> {
    let &(_, name, block_elements, block_bytes) = sized_type(type_id)?;
    if !row_len.is_multiple_of(block_elements) {
        return Some(Err(format!("row length {row_len} is not a multiple of the {name} block size {block_elements}")));
    }
    Some(Ok(n_elements / block_elements * block_bytes))
}

/// A parsed GGUF file held in memory.
pub struct GgufFile {
    pub version: u32,
    pub metadata: HashMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    bytes: Vec<u8>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], TextError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| {
            TextError::BadModel(format!("truncated GGUF file while reading {what} at byte {}", self.pos))
        })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> Result<u8, TextError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, TextError> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap()))
    }
    fn u32(&mut self, what: &str) -> Result<u32, TextError> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &str) -> Result<u64, TextError> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    /// A count that must be plausible given the bytes left (each element at least `min_size` bytes).
    fn count(&mut self, what: &str, min_size: usize) -> Result<usize, TextError> {
        let n = self.u64(what)?;
        if n > MAX_ELEMENTS || (n as u128) * (min_size as u128) > self.remaining() as u128 {
            return Err(TextError::BadModel(format!(
                "corrupt GGUF file: {what} claims {n} elements at byte {}",
                self.pos
            )));
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &str) -> Result<String, TextError> {
        let n = self.count(what, 1)?;
        let bytes = self.take(n, what)?;
        // Vocabularies may hold invalid UTF-8 fragments; keep them lossily.
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    fn value(&mut self, type_id: u32, depth: u32) -> Result<Value, TextError> {
        const W: &str = "metadata value";
        Ok(match type_id {
            0 => Value::U8(self.u8(W)?),
            1 => Value::I8(self.u8(W)? as i8),
            2 => Value::U16(self.u16(W)?),
            3 => Value::I16(self.u16(W)? as i16),
            4 => Value::U32(self.u32(W)?),
            5 => Value::I32(self.u32(W)? as i32),
            6 => Value::F32(f32::from_bits(self.u32(W)?)),
            7 => Value::Bool(self.u8(W)? != 0),
            8 => Value::String(self.string(W)?),
            9 => {
                if depth > 2 {
                    return Err(TextError::BadModel("corrupt GGUF file: arrays nested too deeply".into()));
                }
                let elem = self.u32("array element type")?;
                let min = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    10..=12 => 8,
                    8 | 9 => 8,
                    other => return Err(TextError::BadModel(format!("corrupt GGUF file: unknown value type {other}"))),
                };
                let n = self.count("array length", min)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(W)?),
            11 => Value::I64(self.u64(W)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(W)?)),
            other => return Err(TextError::BadModel(format!("corrupt GGUF file: unknown value type {other}"))),
        })
    }
}

impl GgufFile {
    /// Reads and parses a GGUF file.
    pub fn open(path: &Path) -> Result<Self, TextError> {
        let bytes = std::fs::read(path)
            .map_err(|e| TextError::Io(format!("cannot read model file {}: {e}", path.display())))?;
        Self::parse(bytes)
    }

    /// Parses a GGUF file held in memory.
    pub fn parse(bytes: Vec<u8>) -> Result<Self, TextError> {
        let mut c = Cursor { buf: &bytes, pos: 0 };
        let magic = c.u32("magic").map_err(|_| TextError::BadModel("not a GGUF file (too short)".into()))?;
        if magic != MAGIC {
            return Err(TextError::BadModel("not a GGUF file (bad magic)".into()));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(TextError::BadModel(format!("unsupported GGUF version {version} (2 and 3 are supported)")));
        }
        // A tensor info takes at least 8 (name len) + 4 + 8 + 4 + 8 bytes; a KV at least 8 + 4 + 1.
        let n_tensors = c.count("tensor count", 32)?;
        let n_kv = c.count("metadata count", 13)?;

        let mut metadata = HashMap::with_capacity(n_kv);
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let t = c.u32("metadata type")?;
            let v = c.value(t, 0)?;
            metadata.insert(key, v);
        }

        let mut infos = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let n_dims = c.u32("tensor rank")?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(TextError::BadModel(format!("corrupt GGUF file: tensor {name} has rank {n_dims}")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64("tensor dimension")?);
            }
            let type_id = c.u32("tensor type")?;
            let offset = c.u64("tensor offset")?;
            infos.push((name, dims, type_id, offset));
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 16 => a,
                _ => return Err(TextError::BadModel("corrupt GGUF file: bad general.alignment".into())),
            },
        };
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let file_len = bytes.len() as u64;

        let mut tensors = Vec::with_capacity(n_tensors);
        let mut by_name = HashMap::with_capacity(n_tensors);
        for (name, dims, type_id, offset) in infos {
            let n_elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .filter(|&n| n > 0 && n <= 1 << 40)
                .ok_or_else(|| {
                    TextError::BadModel(format!("corrupt GGUF file: tensor {name} has bad dimensions {dims:?}"))
                })?;
            // Unknown types are kept (reported by the model loader only if the tensor is used),
            // but their size cannot be checked.
            let len = match tensor_byte_size(type_id, n_elements, dims[0]) {
                Some(Ok(len)) => len,
                Some(Err(msg)) => return Err(TextError::BadModel(format!("tensor {name}: {msg}"))),
                None => 0,
            };
            let start = data_start
                .checked_add(offset)
                .filter(|s| s.checked_add(len).is_some_and(|e| e <= file_len))
                .ok_or_else(|| {
                    TextError::BadModel(format!(
                        "truncated or corrupt GGUF file: tensor {name} ({len} bytes at offset {offset}) lies beyond the end of the file ({file_len} bytes)"
                    ))
                })?;
            by_name.insert(name.clone(), tensors.len());
            tensors.push(TensorInfo { name, dims, type_id, start: start as usize, len: len as usize });
        }

        Ok(GgufFile { version, metadata, tensors, by_name, bytes })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(Value::as_u64)
    }

    pub fn get_f32(&self, key: &str) -> Option<f32> {
        self.get(key).and_then(Value::as_f32)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The tensor's raw bytes; an error names the tensor if its type is unknown.
    pub fn tensor_data(&self, info: &TensorInfo) -> Result<&[u8], TextError> {
        if sized_type(info.type_id).is_none() {
            return Err(TextError::Unsupported(format!(
                "tensor {} has unsupported GGML type id {}",
                info.name, info.type_id
            )));
        }
        Ok(&self.bytes[info.start..info.start + info.len])
    }
}

/// Synthetic files for other modules' unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::GgufFile;

    /// A tensor-less GGUF v3 file holding string metadata only.
    pub fn with_strings(kvs: &[(&str, &str)]) -> GgufFile {
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
        for (k, v) in kvs {
            b.extend_from_slice(&(k.len() as u64).to_le_bytes());
            b.extend_from_slice(k.as_bytes());
            b.extend_from_slice(&8u32.to_le_bytes()); // string
            b.extend_from_slice(&(v.len() as u64).to_le_bytes());
            b.extend_from_slice(v.as_bytes());
        }
        GgufFile::parse(b).expect("synthetic GGUF parses")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push_str(b: &mut Vec<u8>, s: &str) {
        b.extend_from_slice(&(s.len() as u64).to_le_bytes());
        b.extend_from_slice(s.as_bytes());
    }

    /// A tiny valid file: one u32 metadata entry and one 4-element F32 tensor.
    fn tiny() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC.to_le_bytes());
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
        push_str(&mut b, "test.n");
        b.extend_from_slice(&4u32.to_le_bytes());
        b.extend_from_slice(&7u32.to_le_bytes());
        push_str(&mut b, "t");
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&4u64.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        while b.len() % 32 != 0 {
            b.push(0);
        }
        for x in [1.0f32, 2.0, 3.0, 4.0] {
            b.extend_from_slice(&x.to_le_bytes());
        }
        b
    }

    #[test]
    fn parses_a_tiny_file() {
        let f = GgufFile::parse(tiny()).unwrap();
        assert_eq!(f.get_u64("test.n"), Some(7));
        let t = f.tensor("t").unwrap();
        assert_eq!(t.dims, vec![4]);
        assert_eq!(f.tensor_data(t).unwrap().len(), 16);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let full = tiny();
        for cut in 0..full.len() {
            assert!(GgufFile::parse(full[..cut].to_vec()).is_err(), "cut at {cut} parsed");
        }
    }

    #[test]
    fn corrupt_counts_and_magic_are_errors() {
        let mut b = tiny();
        b[0] = b'X';
        assert!(GgufFile::parse(b).is_err());
        let mut b = tiny();
        b[8..16].copy_from_slice(&u64::MAX.to_le_bytes()); // tensor count
        assert!(GgufFile::parse(b).is_err());
        let mut b = tiny();
        b[4..8].copy_from_slice(&9u32.to_le_bytes()); // version
        assert!(GgufFile::parse(b).is_err());
        // Every single-byte corruption either parses or errors; none panics.
        let full = tiny();
        for i in 0..full.len() {
            for v in [0u8, 0xff, 0x7f] {
                let mut b = full.clone();
                b[i] = v;
                let _ = GgufFile::parse(b);
            }
        }
    }
}
