//! GGUF v2/v3 reader: metadata and the tensor directory, for every GGML type in
//! [`tessera_quant::GgmlType`]. The file is memory-mapped and every offset is checked against
//! its length, so a truncated or corrupt file is an error naming what is wrong, never a panic.
//! Tensors are read in their stored blocks ([`GgufFile::raw`], without a copy when the slice is
//! contiguous) or dequantized to f32 ([`GgufFile::read_f32`]).

use crate::error::{ModelError, Result};
use crate::weights::{Bytes, RawTensor};
use memmap2::Mmap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

pub use tessera_quant::GgmlType;

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
    /// Bytes of the whole tensor in the file.
    pub fn bytes(&self) -> usize {
        self.size
    }
}

pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: HashMap<String, Value>,
    pub tensors: HashMap<String, TensorInfo>,
    /// Each metadata entry's key and its bytes in the file (key, type and value), in file
    /// order: what a rewriter copies unchanged.
    pub entries: Vec<(String, std::ops::Range<usize>)>,
    /// The data section's alignment.
    pub alignment: usize,
    mmap: Arc<Mmap>,
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
        let mut entries = Vec::with_capacity(n_kv.min(1 << 16));
        for _ in 0..n_kv {
            let start = r.pos;
            let key = r.string("metadata key")?;
            let ty = r.u32()?;
            let v = r.value(ty, 0)?;
            entries.push((key.clone(), start..r.pos));
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
                dtype: format!(
                    "GGML type {ty_id} (supported: {})",
                    tessera_quant::ALL_TYPES.map(|t| t.name()).join(", ")
                ),
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
            if dims.contains(&0) {
                return Err(ModelError::format(
                    path,
                    format!("tensor {name:?} has an empty dimension: {dims:?}"),
                ));
            }
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
            entries,
            alignment: align,
            mmap: Arc::new(mmap),
        })
    }

    /// Bytes `range` of the file, as stored.
    pub fn bytes(&self, range: std::ops::Range<usize>) -> &[u8] {
        &self.mmap[range]
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

    fn check_slice(
        &self,
        t: &TensorInfo,
        rows: &std::ops::Range<usize>,
        cols: &std::ops::Range<usize>,
    ) -> Result<()> {
        let (nrows, ncols) = t.rows_cols();
        if rows.start > rows.end || cols.start > cols.end || rows.end > nrows || cols.end > ncols {
            return Err(ModelError::format(
                &self.path,
                format!(
                    "tensor {:?}: slice rows {rows:?} cols {cols:?} is outside {nrows}x{ncols}",
                    t.name
                ),
            ));
        }
        Ok(())
    }

    /// Rows `rows` of a tensor in its stored blocks, covering columns `cols` (widened to whole
    /// blocks; [`RawTensor::valid`] says which columns were asked for). Whole rows are a view of
    /// the memory map, not a copy.
    pub fn raw(
        &self,
        t: &TensorInfo,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
    ) -> Result<RawTensor> {
        self.check_slice(t, &rows, &cols)?;
        let (_, ncols) = t.rows_cols();
        let (per, bytes) = t.ty.block();
        let row_bytes = t.row_bytes();
        let b0 = cols.start / per;
        let b1 = cols.end.div_ceil(per);
        let stored = b0 * per..(b1 * per).min(ncols);
        let data = if stored == (0..ncols) {
            let start = t.offset + rows.start * row_bytes;
            Bytes::mapped(self.mmap.clone(), start..start + rows.len() * row_bytes)
        } else {
            let mut v = Vec::with_capacity(rows.len() * (b1 - b0) * bytes);
            for r in rows.clone() {
                let start = t.offset + r * row_bytes + b0 * bytes;
                v.extend_from_slice(&self.mmap[start..start + (b1 - b0) * bytes]);
            }
            Bytes::from_vec(v)
        };
        Ok(RawTensor {
            ty: t.ty,
            shape: t.dims.iter().rev().copied().collect(),
            rows,
            cols: stored.clone(),
            valid: cols.start - stored.start..cols.end - stored.start,
            data,
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
        self.raw(t, rows, cols)?.to_f32()
    }
}
