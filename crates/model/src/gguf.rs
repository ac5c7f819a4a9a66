//! GGUF v2/v3 reader: metadata, tensor directory, and dequantization of F32, F16, BF16, Q8_0,
//! Q4_0 and Q4_1 rows. The file is memory-mapped and every offset is checked against its
//! length, so a truncated or corrupt file is an error naming what is wrong, never a panic.

use crate::error::{ModelError, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

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
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
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

/// GGML tensor types Tessera reads.
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
    fn from_id(id: u32) -> Option<GgmlType> {
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
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q8_0 => (32, 34),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q8_0 => "Q8_0",
        }
    }
}

#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// GGML order: `dims[0]` is the contiguous (innermost) dimension.
    pub dims: Vec<usize>,
    pub ty: GgmlType,
    /// Absolute offset of the first byte in the file.
    pub offset: usize,
    pub size: usize,
}

impl TensorInfo {
    /// Row length (innermost dimension) and number of rows.
    pub fn rows_cols(&self) -> (usize, usize) {
        let cols = self.dims[0];
        let rows = self.dims[1..].iter().product::<usize>().max(1);
        (rows, cols)
    }
    fn row_bytes(&self) -> usize {
        let (per, bytes) = self.ty.block();
        self.dims[0] / per * bytes
    }
}

pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: HashMap<String, Value>,
    pub tensors: HashMap<String, TensorInfo>,
    mmap: Mmap,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| {
            ModelError::format(
                self.path,
                format!(
                    "truncated GGUF: reading {what} needs {n} bytes at offset {} but the file has {}",
                    self.pos,
                    self.buf.len()
                ),
            )
        })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1, "u8")?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2, "u16")?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, "u32")?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, "u64")?.try_into().unwrap()))
    }
    fn len(&mut self, what: &str) -> Result<usize> {
        let n = self.u64()?;
        // Every counted item takes at least one byte, so no count can exceed the bytes left;
        // this also stops huge allocations on bad input.
        if n > (self.buf.len() - self.pos) as u64 {
            return Err(ModelError::format(
                self.path,
                format!(
                    "truncated or corrupt GGUF: {what} {n} at offset {} cannot fit in the {} bytes left",
                    self.pos,
                    self.buf.len() - self.pos
                ),
            ));
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.len(what)?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| ModelError::format(self.path, format!("GGUF {what} is not UTF-8")))
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.u8()?),
            1 => Value::I8(self.u8()? as i8),
            2 => Value::U16(self.u16()?),
            3 => Value::I16(self.u16()? as i16),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(self.u32()? as i32),
            6 => Value::F32(f32::from_bits(self.u32()?)),
            7 => Value::Bool(self.u8()? != 0),
            8 => Value::Str(self.string("string value")?),
            9 if depth == 0 => {
                let inner = self.u32()?;
                let n = self.len("array")?;
                let mut v = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    v.push(self.value(inner, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.u64()? as i64),
            12 => Value::F64(f64::from_bits(self.u64()?)),
            other => {
                return Err(ModelError::format(
                    self.path,
                    format!(
                        "GGUF metadata value type {other} at offset {} is not valid",
                        self.pos
                    ),
                ));
            }
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: the map is read-only; a model file changed underneath a running process is
        // outside what Tessera can defend against (as with every mmap-based loader).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        let mut r = Reader {
            buf: &mmap,
            pos: 0,
            path,
        };
        if r.take(4, "magic")? != b"GGUF" {
            return Err(ModelError::format(
                path,
                "not a GGUF file (magic is not \"GGUF\")",
            ));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(ModelError::format(
                path,
                format!("GGUF version {version} is not supported (2 or 3)"),
            ));
        }
        let n_tensors = r.len("tensor count")?;
        let n_kv = r.len("metadata count")?;
        let mut metadata = HashMap::new();
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            let ty = r.u32()?;
            let v = r.value(ty, 0)?;
            metadata.insert(key, v);
        }
        let mut infos = Vec::with_capacity(n_tensors.min(1 << 16));
        for _ in 0..n_tensors {
            let name = r.string("tensor name")?;
            let nd = r.u32()? as usize;
            if nd == 0 || nd > 4 {
                return Err(ModelError::format(
                    path,
                    format!("tensor {name:?} has {nd} dimensions"),
                ));
            }
            let mut dims = Vec::with_capacity(nd);
            for _ in 0..nd {
                dims.push(r.u64()? as usize);
            }
            let ty_id = r.u32()?;
            let offset = r.u64()? as usize;
            let ty = GgmlType::from_id(ty_id).ok_or_else(|| ModelError::Dtype {
                path: path.into(),
                name: name.clone(),
                dtype: format!("GGML type {ty_id} (supported: F32, F16, BF16, Q4_0, Q4_1, Q8_0)"),
            })?;
            infos.push((name, dims, ty, offset));
        }
        let align = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(32) as usize;
        if align == 0 || !align.is_power_of_two() {
            return Err(ModelError::format(
                path,
                format!("GGUF alignment {align} is not a power of two"),
            ));
        }
        let data_start = r.pos.div_ceil(align) * align;
        let mut tensors = HashMap::new();
        for (name, dims, ty, rel) in infos {
            let (per, bytes) = ty.block();
            if dims[0] % per != 0 {
                return Err(ModelError::format(
                    path,
                    format!(
                        "tensor {name:?}: row of {} is not a multiple of the {per}-element block",
                        dims[0]
                    ),
                ));
            }
            let n: usize = dims
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| {
                    ModelError::format(
                        path,
                        format!("tensor {name:?} has an impossible shape {dims:?}"),
                    )
                })?;
            let size = n / per * bytes;
            let offset = data_start + rel;
            if offset.checked_add(size).is_none_or(|end| end > mmap.len()) {
                return Err(ModelError::format(
                    path,
                    format!(
                        "truncated GGUF: tensor {name:?} needs bytes {offset}..{} but the file has {}",
                        offset + size,
                        mmap.len()
                    ),
                ));
            }
            tensors.insert(
                name.clone(),
                TensorInfo {
                    name,
                    dims,
                    ty,
                    offset,
                    size,
                },
            );
        }
        Ok(GgufFile {
            path: path.into(),
            version,
            metadata,
            tensors,
            mmap,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.path.clone(),
                name: name.into(),
            })
    }

    /// Dequantizes rows `rows` and columns `cols` (in elements of the innermost dimension) of a
    /// tensor to f32, row-major. Only the touched bytes of the map are read.
    pub fn read_f32(
        &self,
        t: &TensorInfo,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
    ) -> Result<Vec<f32>> {
        let (nrows, ncols) = t.rows_cols();
        let (per, bytes) = t.ty.block();
        if rows.end > nrows || cols.end > ncols || !cols.start.is_multiple_of(per) {
            return Err(ModelError::format(
                &self.path,
                format!(
                    "tensor {:?}: slice rows {rows:?} cols {cols:?} is outside {nrows}x{ncols} or cuts a block",
                    t.name
                ),
            ));
        }
        let row_bytes = t.row_bytes();
        let b0 = cols.start / per;
        let b1 = cols.end.div_ceil(per);
        let mut out = Vec::with_capacity(rows.len() * cols.len());
        let mut tmp = vec![0f32; (b1 - b0) * per];
        for r in rows {
            let start = t.offset + r * row_bytes + b0 * bytes;
            let src = &self.mmap[start..start + (b1 - b0) * bytes];
            dequantize(t.ty, src, &mut tmp);
            let skip = cols.start - b0 * per;
            out.extend_from_slice(&tmp[skip..skip + cols.len()]);
        }
        Ok(out)
    }
}

/// Dequantizes whole blocks from `src` into `dst` (`dst.len()` elements).
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    match ty {
        GgmlType::F32 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes(s.try_into().unwrap());
            }
        }
        GgmlType::F16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = f16::from_le_bytes([s[0], s[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = bf16::from_le_bytes([s[0], s[1]]).to_f32();
            }
        }
        GgmlType::Q8_0 => {
            for (d, b) in dst.chunks_exact_mut(32).zip(src.chunks_exact(34)) {
                let scale = f16::from_le_bytes([b[0], b[1]]).to_f32();
                for (x, q) in d.iter_mut().zip(&b[2..34]) {
                    *x = (*q as i8) as f32 * scale;
                }
            }
        }
        GgmlType::Q4_0 => {
            for (d, b) in dst.chunks_exact_mut(32).zip(src.chunks_exact(18)) {
                let scale = f16::from_le_bytes([b[0], b[1]]).to_f32();
                for j in 0..16 {
                    let q = b[2 + j];
                    d[j] = ((q & 0x0F) as i32 - 8) as f32 * scale;
                    d[j + 16] = ((q >> 4) as i32 - 8) as f32 * scale;
                }
            }
        }
        GgmlType::Q4_1 => {
            for (d, b) in dst.chunks_exact_mut(32).zip(src.chunks_exact(20)) {
                let scale = f16::from_le_bytes([b[0], b[1]]).to_f32();
                let min = f16::from_le_bytes([b[2], b[3]]).to_f32();
                for j in 0..16 {
                    let q = b[4 + j];
                    d[j] = (q & 0x0F) as f32 * scale + min;
                    d[j + 16] = (q >> 4) as f32 * scale + min;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_1_and_q8_0_blocks_decode() {
        let mut b = vec![0u8; 20];
        b[0..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        b[4] = 0x3A; // low nibble 10 -> elem 0, high nibble 3 -> elem 16
        let mut out = [0f32; 32];
        dequantize(GgmlType::Q4_1, &b, &mut out);
        assert_eq!(out[0], 10.0 * 0.5 - 1.0);
        assert_eq!(out[16], 3.0 * 0.5 - 1.0);
        assert_eq!(out[1], -1.0);
        let mut b = vec![0u8; 34];
        b[0..2].copy_from_slice(&f16::from_f32(0.25).to_le_bytes());
        b[2] = (-8i8) as u8;
        b[33] = 4;
        dequantize(GgmlType::Q8_0, &b, &mut out);
        assert_eq!(out[0], -2.0);
        assert_eq!(out[31], 1.0);
        let mut b = vec![0u8; 18];
        b[0..2].copy_from_slice(&f16::from_f32(2.0).to_le_bytes());
        b[2] = 0xF0;
        dequantize(GgmlType::Q4_0, &b, &mut out);
        assert_eq!(out[0], -16.0);
        assert_eq!(out[16], 14.0);
    }
}
