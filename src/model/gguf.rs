//! GGUF (v2/v3) reader: metadata and tensor directory, parsed from untrusted bytes.
//!
//! Every count and length is checked against the bytes that remain before anything is
//! allocated, so a corrupt or hostile header yields an error naming the file and offset, never a
//! panic or a huge allocation.

use crate::error::{Error, Result};
use half::{bf16, f16};
use std::collections::BTreeMap;

const MAGIC: &[u8; 4] = b"GGUF";
const MAX_DIMS: usize = 4;

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
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
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

/// ggml tensor types this reader can dequantize.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q8_0,
}

impl GgmlType {
    fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }
    /// (elements per block, bytes per block)
    fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q8_0 => (32, 34),
        }
    }
}

#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the contiguous (input) dimension.
    pub dims: Vec<usize>,
    pub dtype: GgmlType,
    /// Absolute byte range in the file.
    pub start: usize,
    pub len: usize,
}

impl TensorInfo {
    pub fn elements(&self) -> usize {
        self.dims.iter().product()
    }
}

#[derive(Debug)]
pub struct Gguf {
    pub name: String,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    data: Vec<u8>,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    name: &'a str,
}

impl<'a> Cursor<'a> {
    fn err(&self, reason: impl std::fmt::Display) -> Error {
        Error::format(format!("{} (GGUF, byte {})", self.name, self.pos), reason)
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.err(format!(
                "truncated: need {n} bytes, {} left",
                self.remaining()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().unwrap())
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    /// A count of items that each occupy at least `min_item_bytes` of what remains.
    fn count(&mut self, min_item_bytes: usize, what: &str) -> Result<usize> {
        let n = self.u64()?;
        let cap = (self.remaining() / min_item_bytes.max(1)) as u64;
        if n > cap {
            return Err(self.err(format!(
                "{what} count {n} is impossible with {} bytes left",
                self.remaining()
            )));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String> {
        let n = self.count(1, "string length")?;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.err("string is not valid UTF-8"))
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.arr::<1>()?[0]),
            1 => Value::I8(self.arr::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr()?)),
            3 => Value::I16(i16::from_le_bytes(self.arr()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.arr()?)),
            6 => Value::F32(f32::from_le_bytes(self.arr()?)),
            7 => match self.arr::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.err(format!("bool value {b} is neither 0 nor 1"))),
            },
            8 => Value::Str(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(self.err("arrays nested too deeply"));
                }
                let item_ty = self.u32()?;
                let min = match item_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8..=12 => 8,
                    _ => return Err(self.err(format!("unknown array item type {item_ty}"))),
                };
                let n = self.count(min, "array")?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(item_ty, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.arr()?)),
            12 => Value::F64(f64::from_le_bytes(self.arr()?)),
            _ => return Err(self.err(format!("unknown metadata value type {ty}"))),
        })
    }
}

impl Gguf {
    pub fn from_bytes(name: &str, data: Vec<u8>) -> Result<Self> {
        let (version, metadata, tensors) = {
            let mut c = Cursor {
                buf: &data,
                pos: 0,
                name,
            };
            if c.take(4)? != MAGIC {
                return Err(c.err("not a GGUF file (bad magic)"));
            }
            let version = c.u32()?;
            if !(2..=3).contains(&version) {
                return Err(c.err(format!("unsupported GGUF version {version} (need 2 or 3)")));
            }
            let n_tensors = c.count(8 + 4 + 4 + 8, "tensor")?;
            let n_kv = c.count(8 + 4 + 1, "metadata")?;
            let mut metadata = BTreeMap::new();
            for _ in 0..n_kv {
                let key = c.string()?;
                let ty = c.u32()?;
                let v = c.value(ty, 0)?;
                metadata.insert(key, v);
            }
            let mut raw = Vec::with_capacity(n_tensors);
            for _ in 0..n_tensors {
                let tname = c.string()?;
                let nd = c.u32()? as usize;
                if nd == 0 || nd > MAX_DIMS {
                    return Err(c.err(format!("tensor {tname}: {nd} dimensions")));
                }
                let mut dims = Vec::with_capacity(nd);
                for _ in 0..nd {
                    let d = c.u64()?;
                    if d == 0 || d > (1 << 32) {
                        return Err(c.err(format!("tensor {tname}: dimension {d}")));
                    }
                    dims.push(d as usize);
                }
                let ty = c.u32()?;
                let dtype = GgmlType::from_id(ty)
                    .ok_or_else(|| c.err(format!("tensor {tname}: unsupported ggml type {ty}")))?;
                let offset = c.u64()?;
                raw.push((tname, dims, dtype, offset));
            }
            let align = match metadata.get("general.alignment") {
                Some(v) => v
                    .as_u64()
                    .filter(|a| *a > 0 && a.is_power_of_two() && *a <= 4096)
                    .ok_or_else(|| c.err("general.alignment is not a small power of two"))?
                    as usize,
                None => 32,
            };
            let data_start = c.pos.div_ceil(align) * align;
            let mut tensors = Vec::with_capacity(raw.len());
            for (tname, dims, dtype, offset) in raw {
                let elements = dims
                    .iter()
                    .try_fold(1usize, |a, &d| a.checked_mul(d))
                    .ok_or_else(|| c.err(format!("tensor {tname}: size overflows")))?;
                let (be, bb) = dtype.block();
                if elements % be != 0 || dims[0] % be != 0 {
                    return Err(c.err(format!(
                        "tensor {tname}: {elements} elements not a multiple of the {dtype:?} block"
                    )));
                }
                let len = elements / be * bb;
                let start = (offset as usize)
                    .checked_add(data_start)
                    .filter(|s| s.checked_add(len).is_some_and(|e| e <= data.len()))
                    .ok_or_else(|| {
                        c.err(format!(
                            "tensor {tname}: data at offset {offset} (+{len} bytes) lies beyond the end of the file ({} bytes)",
                            data.len()
                        ))
                    })?;
                tensors.push(TensorInfo {
                    name: tname,
                    dims,
                    dtype,
                    start,
                    len,
                });
            }
            (version, metadata, tensors)
        };
        Ok(Gguf {
            name: name.to_string(),
            version,
            metadata,
            tensors,
            data,
        })
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// Dequantizes a tensor to f32 in ggml order (`dims[0]` contiguous).
    pub fn dequantize(&self, t: &TensorInfo) -> Vec<f32> {
        dequantize(t.dtype, &self.data[t.start..t.start + t.len], t.elements())
    }

    pub fn raw(&self, t: &TensorInfo) -> &[u8] {
        &self.data[t.start..t.start + t.len]
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// ggml block formats (ggml-common.h): Q4_0 = f16 d + 16 nibble bytes, value d*(q-8);
/// Q4_1 = f16 d, f16 m + 16 nibble bytes, value d*q+m; Q8_0 = f16 d + 32 i8, value d*q.
/// Nibble layout: the low nibbles hold elements 0..16, the high nibbles 16..32.
pub fn dequantize(dtype: GgmlType, b: &[u8], n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    match dtype {
        GgmlType::F32 => out.extend(
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap())),
        ),
        GgmlType::F16 => out.extend(
            b.chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        GgmlType::BF16 => out.extend(
            b.chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let bb = dtype.block().1;
            for blk in b.chunks_exact(bb) {
                let d = f16_at(blk, 0);
                let (m, qs) = if dtype == GgmlType::Q4_1 {
                    (f16_at(blk, 2), &blk[4..20])
                } else {
                    (-8.0 * d, &blk[2..18])
                };
                let mut vals = [0f32; 32];
                for (j, &q) in qs.iter().enumerate() {
                    vals[j] = d * (q & 0x0f) as f32 + m;
                    vals[j + 16] = d * (q >> 4) as f32 + m;
                }
                out.extend_from_slice(&vals);
            }
        }
        GgmlType::Q8_0 => {
            for blk in b.chunks_exact(34) {
                let d = f16_at(blk, 0);
                out.extend(blk[2..].iter().map(|&q| d * (q as i8) as f32));
            }
        }
    }
    out
}
