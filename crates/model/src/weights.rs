//! One view over the two on-disk formats: a Hugging Face folder (`model.safetensors` or a
//! sharded index) and a GGUF file. A shard asks for a row range and a column range of a
//! tensor in PyTorch's logical layout (`[out, in]`) and gets it in its stored format (GGUF
//! blocks, or F32/F16/BF16), as a view of the memory map where the rows are whole; only those
//! bytes of the map are touched, so a worker's resident weight memory is about its share.

use crate::error::{ModelError, Result};
use crate::gguf::{GgmlType, GgufFile};
use memmap2::{Mmap, MmapMut, MmapOptions};
use safetensors::{Dtype, SafeTensors, tensor::Metadata};
use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The tensors of a decoder, named independently of the file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tensor {
    Embed,
    LmHead,
    FinalNorm,
    AttnNorm(usize),
    Q(usize),
    K(usize),
    V(usize),
    O(usize),
    QBias(usize),
    KBias(usize),
    VBias(usize),
    OBias(usize),
    FfnNorm(usize),
    Gate(usize),
    Up(usize),
    Down(usize),
    GateBias(usize),
    UpBias(usize),
    DownBias(usize),
    /// Per-head RMSNorm weights of Q and K (`[head_dim]`).
    QNorm(usize),
    KNorm(usize),
    /// Norms on the attention and FFN outputs (Gemma).
    PostAttnNorm(usize),
    PostFfnNorm(usize),
    /// A mixture of experts' router (`[experts, hidden]`), and expert `e`'s matrices.
    Router(usize),
    ExpGate(usize, usize),
    ExpUp(usize, usize),
    ExpDown(usize, usize),
}

/// How a Hugging Face checkpoint names the tensors that differ between families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HfNames {
    #[default]
    Llama,
    /// Gemma: `pre_feedforward_layernorm` is the FFN's input norm; `post_attention_layernorm`
    /// and `post_feedforward_layernorm` normalize the outputs.
    Gemma,
    /// Mixtral: `block_sparse_moe.gate` and experts' `w1`, `w3`, `w2`.
    Mixtral,
}

impl HfNames {
    pub fn of(arch: tessera_core::Arch) -> HfNames {
        match arch {
            tessera_core::Arch::Gemma3 => HfNames::Gemma,
            tessera_core::Arch::Mixtral => HfNames::Mixtral,
            _ => HfNames::Llama,
        }
    }
}

impl Tensor {
    /// A format-independent name, e.g. `Q(3)`.
    pub fn key(self) -> String {
        format!("{self:?}")
    }

    fn hf_name(self, names: HfNames) -> String {
        use Tensor::*;
        let l = |i: usize, s: &str| format!("model.layers.{i}.{s}");
        let (gemma, mixtral) = (names == HfNames::Gemma, names == HfNames::Mixtral);
        match self {
            FfnNorm(i) if gemma => l(i, "pre_feedforward_layernorm.weight"),
            PostAttnNorm(i) => l(i, "post_attention_layernorm.weight"),
            PostFfnNorm(i) => l(i, "post_feedforward_layernorm.weight"),
            QNorm(i) => l(i, "self_attn.q_norm.weight"),
            KNorm(i) => l(i, "self_attn.k_norm.weight"),
            Router(i) if mixtral => l(i, "block_sparse_moe.gate.weight"),
            Router(i) => l(i, "mlp.gate.weight"),
            ExpGate(i, e) if mixtral => l(i, &format!("block_sparse_moe.experts.{e}.w1.weight")),
            ExpUp(i, e) if mixtral => l(i, &format!("block_sparse_moe.experts.{e}.w3.weight")),
            ExpDown(i, e) if mixtral => l(i, &format!("block_sparse_moe.experts.{e}.w2.weight")),
            ExpGate(i, e) => l(i, &format!("mlp.experts.{e}.gate_proj.weight")),
            ExpUp(i, e) => l(i, &format!("mlp.experts.{e}.up_proj.weight")),
            ExpDown(i, e) => l(i, &format!("mlp.experts.{e}.down_proj.weight")),
            Embed => "model.embed_tokens.weight".into(),
            LmHead => "lm_head.weight".into(),
            FinalNorm => "model.norm.weight".into(),
            AttnNorm(i) => l(i, "input_layernorm.weight"),
            Q(i) => l(i, "self_attn.q_proj.weight"),
            K(i) => l(i, "self_attn.k_proj.weight"),
            V(i) => l(i, "self_attn.v_proj.weight"),
            O(i) => l(i, "self_attn.o_proj.weight"),
            QBias(i) => l(i, "self_attn.q_proj.bias"),
            KBias(i) => l(i, "self_attn.k_proj.bias"),
            VBias(i) => l(i, "self_attn.v_proj.bias"),
            OBias(i) => l(i, "self_attn.o_proj.bias"),
            FfnNorm(i) => l(i, "post_attention_layernorm.weight"),
            Gate(i) => l(i, "mlp.gate_proj.weight"),
            Up(i) => l(i, "mlp.up_proj.weight"),
            Down(i) => l(i, "mlp.down_proj.weight"),
            GateBias(i) => l(i, "mlp.gate_proj.bias"),
            UpBias(i) => l(i, "mlp.up_proj.bias"),
            DownBias(i) => l(i, "mlp.down_proj.bias"),
        }
    }

    pub(crate) fn gguf_name(self) -> String {
        use Tensor::*;
        let l = |i: usize, s: &str| format!("blk.{i}.{s}");
        match self {
            Embed => "token_embd.weight".into(),
            LmHead => "output.weight".into(),
            FinalNorm => "output_norm.weight".into(),
            AttnNorm(i) => l(i, "attn_norm.weight"),
            Q(i) => l(i, "attn_q.weight"),
            K(i) => l(i, "attn_k.weight"),
            V(i) => l(i, "attn_v.weight"),
            O(i) => l(i, "attn_output.weight"),
            QBias(i) => l(i, "attn_q.bias"),
            KBias(i) => l(i, "attn_k.bias"),
            VBias(i) => l(i, "attn_v.bias"),
            OBias(i) => l(i, "attn_output.bias"),
            FfnNorm(i) => l(i, "ffn_norm.weight"),
            Gate(i) => l(i, "ffn_gate.weight"),
            Up(i) => l(i, "ffn_up.weight"),
            Down(i) => l(i, "ffn_down.weight"),
            GateBias(i) => l(i, "ffn_gate.bias"),
            UpBias(i) => l(i, "ffn_up.bias"),
            DownBias(i) => l(i, "ffn_down.bias"),
            QNorm(i) => l(i, "attn_q_norm.weight"),
            KNorm(i) => l(i, "attn_k_norm.weight"),
            PostAttnNorm(i) => l(i, "post_attention_norm.weight"),
            PostFfnNorm(i) => l(i, "post_ffw_norm.weight"),
            Router(i) => l(i, "ffn_gate_inp.weight"),
            // Stacked: one tensor per layer holds every expert; see `gguf_expert`.
            ExpGate(i, _) => l(i, "ffn_gate_exps.weight"),
            ExpUp(i, _) => l(i, "ffn_up_exps.weight"),
            ExpDown(i, _) => l(i, "ffn_down_exps.weight"),
        }
    }

    /// GGUF's older per-expert name (`blk.N.ffn_gate.E.weight`), and the expert's index.
    fn gguf_expert(self) -> Option<(String, usize)> {
        use Tensor::*;
        let (i, e, s) = match self {
            ExpGate(i, e) => (i, e, "ffn_gate"),
            ExpUp(i, e) => (i, e, "ffn_up"),
            ExpDown(i, e) => (i, e, "ffn_down"),
            _ => return None,
        };
        Some((format!("blk.{i}.{s}.{e}.weight"), e))
    }
}

pub struct StFile {
    path: PathBuf,
    mmap: Arc<Mmap>,
    header: usize,
    meta: Metadata,
}

/// Bytes of weights, shared by whoever holds them: a view of a memory-mapped model file, or
/// a buffer of their own (a slice cut out of rows, or a shard received over the network).
#[derive(Clone)]
pub struct Bytes {
    owner: Owner,
    range: Range<usize>,
}

#[derive(Clone)]
enum Owner {
    Vec(Arc<Vec<u8>>),
    Map(Arc<Mmap>),
}

impl Bytes {
    pub fn from_vec(v: Vec<u8>) -> Bytes {
        let len = v.len();
        Bytes {
            owner: Owner::Vec(Arc::new(v)),
            range: 0..len,
        }
    }
    pub(crate) fn mapped(map: Arc<Mmap>, range: Range<usize>) -> Bytes {
        assert!(range.end <= map.len());
        Bytes {
            owner: Owner::Map(map),
            range,
        }
    }
    pub fn as_slice(&self) -> &[u8] {
        match &self.owner {
            Owner::Vec(v) => &v[self.range.clone()],
            Owner::Map(m) => &m[self.range.clone()],
        }
    }
    pub fn len(&self) -> usize {
        self.range.len()
    }
    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }
    /// Whether these bytes are a view of a memory map (a model file, or a [`WeightArena`]) rather
    /// than a buffer of their own.
    pub fn is_mapped(&self) -> bool {
        matches!(self.owner, Owner::Map(_))
    }
    /// A sub-range, sharing the same storage.
    pub fn slice(&self, r: Range<usize>) -> Bytes {
        assert!(r.end <= self.range.len());
        Bytes {
            owner: self.owner.clone(),
            range: self.range.start + r.start..self.range.start + r.end,
        }
    }
}

/// Where a worker puts the weights it receives: one anonymous mapping for the whole shard,
/// which the kernel is asked to back with 2 MiB pages. Decode streams every weight once per
/// token; on 4 KiB pages that is a page walk (two levels inside a VM) every 4 KiB and a
/// hardware prefetcher that stops at every page edge. On this project's 2-core VM a two-thread
/// streaming read of 128 MiB per thread went from 44 to 54 GB/s with them, while decode did
/// not change measurably (its kernels bound it first). The capacity is fixed at creation:
/// nothing grows from what a sender claims.
pub struct WeightArena {
    map: MmapMut,
    /// Offset of the first 2 MiB boundary in the mapping; ranges handed out are relative to it.
    base: usize,
    next: usize,
    cap: usize,
}

const HUGE_PAGE: usize = 2 << 20;

impl WeightArena {
    /// Room for `bytes` of weights (plus alignment of each tensor to a cache line while the
    /// slack lasts). Pages are only taken as they are written.
    pub fn new(bytes: usize) -> std::io::Result<WeightArena> {
        let cap = bytes.saturating_add(1 << 20);
        let len = cap.saturating_add(HUGE_PAGE).max(1);
        let map = MmapOptions::new().len(len).map_anon()?;
        // A hint: where the kernel has no transparent huge pages this changes nothing.
        // `TESSERA_HUGE_PAGES=0` leaves the kernel's default (to compare, or where collapsing
        // pages stalls the machine).
        #[cfg(target_os = "linux")]
        if std::env::var("TESSERA_HUGE_PAGES").map_or(true, |v| v != "0") {
            let _ = map.advise(memmap2::Advice::HugePage);
        }
        let base = map.as_ptr().align_offset(HUGE_PAGE).min(HUGE_PAGE);
        Ok(WeightArena {
            map,
            base,
            next: 0,
            cap,
        })
    }

    /// A range of `len` bytes for one tensor, or `None` when the arena is full.
    pub fn reserve(&mut self, len: usize) -> Option<Range<usize>> {
        let aligned = self.next.next_multiple_of(64);
        let start = if aligned.checked_add(len)? <= self.cap {
            aligned
        } else {
            self.next
        };
        let end = start.checked_add(len).filter(|&e| e <= self.cap)?;
        self.next = end;
        Some(start..end)
    }

    /// The bytes of a reserved range, to be filled.
    pub fn slice_mut(&mut self, r: Range<usize>) -> &mut [u8] {
        &mut self.map[self.base + r.start..self.base + r.end]
    }

    /// Read-only from here on; each reserved range becomes its tensor's [`Bytes`].
    pub fn freeze(self) -> std::io::Result<FrozenArena> {
        Ok(FrozenArena {
            map: Arc::new(self.map.make_read_only()?),
            base: self.base,
        })
    }
}

/// A filled [`WeightArena`].
pub struct FrozenArena {
    map: Arc<Mmap>,
    base: usize,
}

impl FrozenArena {
    pub fn bytes(&self, r: Range<usize>) -> Bytes {
        Bytes::mapped(self.map.clone(), self.base + r.start..self.base + r.end)
    }
}

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Bytes({} bytes, {})",
            self.len(),
            if self.is_mapped() { "mapped" } else { "owned" }
        )
    }
}

/// Rows of a weight tensor in their stored format: `rows` of the whole tensor, each holding
/// columns `cols` in whole blocks, of which `valid` (relative to `cols.start`) were asked for;
/// the other columns of the straddling blocks belong to another shard, which multiplies them
/// by zero.
#[derive(Debug, Clone)]
pub struct RawTensor {
    pub ty: GgmlType,
    /// The whole tensor's logical shape, PyTorch order (`[out, in]`, or `[n]` for a vector).
    pub shape: Vec<usize>,
    pub rows: Range<usize>,
    pub cols: Range<usize>,
    pub valid: Range<usize>,
    pub data: Bytes,
}

impl RawTensor {
    /// A whole `rows x cols` matrix of `ty` blocks (`data`, the file's layout).
    pub fn whole(ty: GgmlType, rows: usize, cols: usize, data: Vec<u8>) -> RawTensor {
        RawTensor {
            ty,
            shape: vec![rows, cols],
            rows: 0..rows,
            cols: 0..cols,
            valid: 0..cols,
            data: Bytes::from_vec(data),
        }
    }

    pub fn row_bytes(&self) -> usize {
        self.data.len() / self.rows.len().max(1)
    }

    /// The stored rows as a kernel matrix.
    pub fn matrix(&self) -> tessera_quant::QMatrix<'_> {
        tessera_quant::QMatrix {
            ty: self.ty,
            rows: self.rows.len(),
            cols: self.cols.len(),
            data: self.data.as_slice(),
        }
    }

    /// Rows `r` (relative to `self.rows.start`), sharing the storage.
    pub fn sub_rows(&self, r: Range<usize>) -> RawTensor {
        let rb = self.row_bytes();
        RawTensor {
            rows: self.rows.start + r.start..self.rows.start + r.end,
            data: self.data.slice(r.start * rb..r.end * rb),
            ..self.clone()
        }
    }

    /// The valid columns of every row, dequantized, row-major.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let (n, w) = (self.rows.len(), self.cols.len());
        let mut all = vec![0f32; n * w];
        tessera_quant::dequantize(self.ty, self.data.as_slice(), &mut all);
        if self.valid == (0..w) {
            return Ok(all);
        }
        let mut out = Vec::with_capacity(n * self.valid.len());
        for r in 0..n {
            out.extend_from_slice(&all[r * w + self.valid.start..r * w + self.valid.end]);
        }
        Ok(out)
    }
}

/// Either format, or pre-cut blocks, behind one `raw` / `read` call.
#[derive(Clone)]
pub enum Weights {
    /// Slices shipped by a coordinator, keyed by [`Tensor::key`], in their stored format.
    Blocks(Arc<HashMap<String, RawTensor>>),
    Safetensors {
        files: Arc<Vec<StFile>>,
        by_name: Arc<HashMap<String, usize>>,
        names: HfNames,
    },
    Gguf {
        file: Arc<GgufFile>,
    },
}

fn map_file(path: &Path) -> Result<Mmap> {
    let f = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    // SAFETY: read-only map of a model file, see GgufFile::open.
    unsafe { Mmap::map(&f) }.map_err(|e| ModelError::io(path, e))
}

impl Weights {
    /// Opens `model.safetensors` or the files named by `model.safetensors.index.json` in `dir`.
    pub fn open_safetensors(dir: &Path, naming: HfNames) -> Result<Weights> {
        let index = dir.join("model.safetensors.index.json");
        let names: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::format(&index, format!("invalid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::format(&index, "no \"weight_map\" object"))?;
            let mut files: Vec<String> = map
                .values()
                .filter_map(|f| f.as_str().map(String::from))
                .collect();
            files.sort();
            files.dedup();
            files.into_iter().map(|f| dir.join(f)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        let mut files = Vec::new();
        let mut by_name = HashMap::new();
        for path in names {
            let mmap = Arc::new(map_file(&path)?);
            let (header, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| {
                let hint = match e {
                    safetensors::SafeTensorError::MetadataIncompleteBuffer
                    | safetensors::SafeTensorError::InvalidHeaderLength => " (truncated file?)",
                    _ => "",
                };
                ModelError::format(&path, format!("invalid safetensors: {e}{hint}"))
            })?;
            for name in meta.tensors().keys() {
                by_name.insert(name.clone(), files.len());
            }
            files.push(StFile {
                path,
                mmap,
                header,
                meta,
            });
        }
        Ok(Weights::Safetensors {
            files: Arc::new(files),
            by_name: Arc::new(by_name),
            names: naming,
        })
    }

    pub fn gguf(file: Arc<GgufFile>) -> Weights {
        Weights::Gguf { file }
    }

    fn path(&self) -> PathBuf {
        match self {
            Weights::Safetensors { files, .. } => {
                files[0].path.parent().unwrap_or(Path::new(".")).into()
            }
            Weights::Gguf { file, .. } => file.path.clone(),
            Weights::Blocks(_) => PathBuf::from("<shipped shard>"),
        }
    }

    fn name(&self, t: Tensor) -> String {
        match self {
            Weights::Safetensors { names, .. } => t.hf_name(*names),
            Weights::Gguf { file } => match t.gguf_expert() {
                // Experts stacked in one tensor, or (older files) one tensor each.
                Some((own, _)) if file.tensors.contains_key(&own) => own,
                _ => t.gguf_name(),
            },
            Weights::Blocks(_) => t.key(),
        }
    }

    /// For an expert's matrix stored stacked in a GGUF tensor: the expert's index and its
    /// number of rows (the stacked tensor's rows are the experts' rows, expert after expert).
    fn stacked(&self, t: Tensor, name: &str) -> Option<(usize, usize)> {
        let Weights::Gguf { file } = self else {
            return None;
        };
        let (_, e) = t.gguf_expert()?;
        let info = file.tensors.get(name)?;
        (info.dims.len() == 3).then(|| (e, info.dims[1]))
    }

    /// Logical shape, PyTorch order (`[out, in]` for a matrix), or None when absent.
    pub fn shape(&self, t: Tensor) -> Option<Vec<usize>> {
        let name = self.name(t);
        match self {
            Weights::Safetensors { files, by_name, .. } => {
                let f = &files[*by_name.get(&name)?];
                Some(f.meta.info(&name)?.shape.clone())
            }
            Weights::Gguf { file, .. } => {
                let info = file.tensors.get(&name)?;
                match self.stacked(t, &name) {
                    Some((e, _)) if e >= info.dims[2] => None,
                    Some(_) => Some(vec![info.dims[1], info.dims[0]]),
                    None => Some(info.dims.iter().rev().copied().collect()),
                }
            }
            Weights::Blocks(b) => Some(b.get(&name)?.shape.clone()),
        }
    }

    pub fn has(&self, t: Tensor) -> bool {
        self.shape(t).is_some()
    }

    /// Checks a tensor exists with the expected shape.
    pub fn expect_shape(&self, t: Tensor, expected: &[usize]) -> Result<()> {
        let found = self.shape(t).ok_or_else(|| ModelError::MissingTensor {
            path: self.path(),
            name: self.name(t),
        })?;
        if found != expected {
            return Err(ModelError::Shape {
                path: self.path(),
                name: self.name(t),
                expected: expected.to_vec(),
                found,
            });
        }
        Ok(())
    }

    /// Rows `rows` of a tensor (a 1-D tensor is one row) covering columns `cols`, in the
    /// stored format: see [`RawTensor`].
    pub fn raw(&self, t: Tensor, rows: Range<usize>, cols: Range<usize>) -> Result<RawTensor> {
        let name = self.name(t);
        let missing = || ModelError::MissingTensor {
            path: self.path(),
            name: name.clone(),
        };
        match self {
            Weights::Blocks(blocks) => {
                let b = blocks.get(&name).ok_or_else(missing)?;
                let want = b.cols.start + b.valid.start..b.cols.start + b.valid.end;
                if rows.start < b.rows.start || rows.end > b.rows.end || cols != want {
                    return Err(ModelError::format(
                        self.path(),
                        format!(
                            "{name}: slice {rows:?} x {cols:?} was not shipped (have {:?} x {want:?})",
                            b.rows
                        ),
                    ));
                }
                Ok(b.sub_rows(rows.start - b.rows.start..rows.end - b.rows.start))
            }
            Weights::Safetensors { files, by_name, .. } => {
                let f = &files[*by_name.get(&name).ok_or_else(missing)?];
                let info = f.meta.info(&name).ok_or_else(missing)?;
                let (nrows, ncols) = match info.shape.as_slice() {
                    [n] => (1, *n),
                    [r, c] => (*r, *c),
                    s => {
                        return Err(ModelError::format(
                            &f.path,
                            format!("tensor {name:?} has rank {}", s.len()),
                        ));
                    }
                };
                if rows.start > rows.end
                    || cols.start > cols.end
                    || rows.end > nrows
                    || cols.end > ncols
                {
                    return Err(ModelError::format(
                        &f.path,
                        format!(
                            "tensor {name:?}: slice {rows:?} x {cols:?} is outside {nrows}x{ncols}"
                        ),
                    ));
                }
                let ty = match info.dtype {
                    Dtype::F32 => GgmlType::F32,
                    Dtype::F16 => GgmlType::F16,
                    Dtype::BF16 => GgmlType::BF16,
                    other => {
                        return Err(ModelError::Dtype {
                            path: f.path.clone(),
                            name,
                            dtype: format!("{other:?} (supported: F32, F16, BF16)"),
                        });
                    }
                };
                let esize = ty.block_bytes();
                let base = 8 + f.header + info.data_offsets.0;
                let end = 8 + f.header + info.data_offsets.1;
                if end > f.mmap.len()
                    || info.data_offsets.1 - info.data_offsets.0 != nrows * ncols * esize
                {
                    return Err(ModelError::format(
                        &f.path,
                        format!("tensor {name:?}: its data does not fit the file (truncated?)"),
                    ));
                }
                let data = if cols == (0..ncols) {
                    let s = base + rows.start * ncols * esize;
                    Bytes::mapped(f.mmap.clone(), s..s + rows.len() * ncols * esize)
                } else {
                    let mut v = Vec::with_capacity(rows.len() * cols.len() * esize);
                    for r in rows.clone() {
                        let s = base + (r * ncols + cols.start) * esize;
                        v.extend_from_slice(&f.mmap[s..s + cols.len() * esize]);
                    }
                    Bytes::from_vec(v)
                };
                Ok(RawTensor {
                    ty,
                    shape: info.shape.clone(),
                    rows,
                    valid: 0..cols.len(),
                    cols,
                    data,
                })
            }
            Weights::Gguf { file } => {
                let info = file.info(&name)?;
                match self.stacked(t, &name) {
                    Some((e, n)) => {
                        if e >= info.dims[2] || rows.end > n || rows.start > rows.end {
                            return Err(ModelError::format(
                                &file.path,
                                format!(
                                    "{name}: expert {e} rows {rows:?} are outside {:?}",
                                    info.dims
                                ),
                            ));
                        }
                        let mut raw = file.raw(info, e * n + rows.start..e * n + rows.end, cols)?;
                        raw.rows = rows;
                        raw.shape = vec![n, info.dims[0]];
                        Ok(raw)
                    }
                    None => file.raw(info, rows, cols),
                }
            }
        }
    }

    /// Reads `rows` x `cols` of a 2-D tensor (a 1-D tensor is one row) as row-major f32.
    pub fn read(&self, t: Tensor, rows: Range<usize>, cols: Range<usize>) -> Result<Vec<f32>> {
        self.raw(t, rows, cols)?.to_f32()
    }

    /// The stored type of a tensor.
    pub fn ty(&self, t: Tensor) -> Option<GgmlType> {
        let name = self.name(t);
        match self {
            Weights::Blocks(b) => b.get(&name).map(|b| b.ty),
            Weights::Gguf { file } => file.tensors.get(&name).map(|i| i.ty),
            Weights::Safetensors { files, by_name, .. } => {
                let info = files[*by_name.get(&name)?].meta.info(&name)?;
                match info.dtype {
                    Dtype::F32 => Some(GgmlType::F32),
                    Dtype::F16 => Some(GgmlType::F16),
                    Dtype::BF16 => Some(GgmlType::BF16),
                    _ => None,
                }
            }
        }
    }
}
