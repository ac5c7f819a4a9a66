//! One view over the two on-disk formats: a Hugging Face folder (`model.safetensors` or a
//! sharded index) and a GGUF file. A shard asks for a row range and a column range of a
//! tensor in PyTorch's logical layout (`[out, in]`) and gets f32 back; only those bytes of the
//! memory map are touched, so a worker's resident weight memory is about its share.

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use half::{bf16, f16};
use memmap2::Mmap;
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
}

impl Tensor {
    /// A format-independent name, e.g. `Q(3)`.
    pub fn key(self) -> String {
        format!("{self:?}")
    }

    fn hf_name(self) -> String {
        use Tensor::*;
        let l = |i: usize, s: &str| format!("model.layers.{i}.{s}");
        match self {
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

    fn gguf_name(self) -> String {
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
        }
    }
}

pub struct StFile {
    path: PathBuf,
    mmap: Mmap,
    header: usize,
    meta: Metadata,
}

/// A block of a tensor already cut out for one shard (what a coordinator ships a worker).
#[derive(Debug, Clone)]
pub struct Block {
    /// The whole tensor's logical shape.
    pub shape: Vec<usize>,
    pub rows: Range<usize>,
    pub cols: Range<usize>,
    /// `rows.len() x cols.len()` values, row-major.
    pub data: Vec<f32>,
}

/// Either format, or pre-cut blocks, behind one `read` call.
#[derive(Clone)]
pub enum Weights {
    /// Blocks keyed by [`Tensor::key`], with Q/K already in rotate-half order.
    Blocks(Arc<HashMap<String, Block>>),
    Safetensors {
        files: Arc<Vec<StFile>>,
        by_name: Arc<HashMap<String, usize>>,
    },
    Gguf {
        file: Arc<GgufFile>,
        unpermute_qk: bool,
        heads: usize,
        kv_heads: usize,
    },
}

fn map_file(path: &Path) -> Result<Mmap> {
    let f = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    // SAFETY: read-only map of a model file, see GgufFile::open.
    unsafe { Mmap::map(&f) }.map_err(|e| ModelError::io(path, e))
}

impl Weights {
    /// Opens `model.safetensors` or the files named by `model.safetensors.index.json` in `dir`.
    pub fn open_safetensors(dir: &Path) -> Result<Weights> {
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
            let mmap = map_file(&path)?;
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
        })
    }

    pub fn gguf(file: Arc<GgufFile>, unpermute_qk: bool, heads: usize, kv_heads: usize) -> Weights {
        Weights::Gguf {
            file,
            unpermute_qk,
            heads,
            kv_heads,
        }
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
            Weights::Safetensors { .. } => t.hf_name(),
            Weights::Gguf { .. } => t.gguf_name(),
            Weights::Blocks(_) => t.key(),
        }
    }

    /// Logical shape, PyTorch order (`[out, in]` for a matrix), or None when absent.
    pub fn shape(&self, t: Tensor) -> Option<Vec<usize>> {
        let name = self.name(t);
        match self {
            Weights::Safetensors { files, by_name } => {
                let f = &files[*by_name.get(&name)?];
                Some(f.meta.info(&name)?.shape.clone())
            }
            Weights::Gguf { file, .. } => {
                let info = file.tensors.get(&name)?;
                Some(info.dims.iter().rev().copied().collect())
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

    /// Reads `rows` x `cols` of a 2-D tensor (a 1-D tensor is one row) as row-major f32.
    pub fn read(&self, t: Tensor, rows: Range<usize>, cols: Range<usize>) -> Result<Vec<f32>> {
        let name = self.name(t);
        let out = match self {
            Weights::Blocks(blocks) => {
                let b = blocks.get(&name).ok_or_else(|| ModelError::MissingTensor {
                    path: self.path(),
                    name: name.clone(),
                })?;
                if rows.start < b.rows.start
                    || rows.end > b.rows.end
                    || cols.start < b.cols.start
                    || cols.end > b.cols.end
                {
                    return Err(ModelError::format(
                        self.path(),
                        format!(
                            "{name}: slice {rows:?} x {cols:?} was not shipped (have {:?} x {:?})",
                            b.rows, b.cols
                        ),
                    ));
                }
                let w = b.cols.len();
                let mut out = Vec::with_capacity(rows.len() * cols.len());
                for r in rows.clone() {
                    let s = (r - b.rows.start) * w + (cols.start - b.cols.start);
                    out.extend_from_slice(&b.data[s..s + cols.len()]);
                }
                out
            }
            Weights::Safetensors { files, by_name } => {
                let missing = || ModelError::MissingTensor {
                    path: self.path(),
                    name: name.clone(),
                };
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
                if rows.end > nrows || cols.end > ncols {
                    return Err(ModelError::format(
                        &f.path,
                        format!(
                            "tensor {name:?}: slice {rows:?} x {cols:?} is outside {nrows}x{ncols}"
                        ),
                    ));
                }
                let esize = match info.dtype {
                    Dtype::F32 => 4,
                    Dtype::F16 | Dtype::BF16 => 2,
                    other => {
                        return Err(ModelError::Dtype {
                            path: f.path.clone(),
                            name,
                            dtype: format!("{other:?} (supported: F32, F16, BF16)"),
                        });
                    }
                };
                let base = 8 + f.header + info.data_offsets.0;
                let mut out = Vec::with_capacity(rows.len() * cols.len());
                for r in rows.clone() {
                    let s = base + (r * ncols + cols.start) * esize;
                    let bytes = &f.mmap[s..s + cols.len() * esize];
                    match info.dtype {
                        Dtype::F32 => out.extend(
                            bytes
                                .chunks_exact(4)
                                .map(|b| f32::from_le_bytes(b.try_into().unwrap())),
                        ),
                        Dtype::F16 => out.extend(
                            bytes
                                .chunks_exact(2)
                                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()),
                        ),
                        _ => out.extend(
                            bytes
                                .chunks_exact(2)
                                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()),
                        ),
                    }
                }
                out
            }
            Weights::Gguf {
                file,
                unpermute_qk,
                heads,
                kv_heads,
            } => {
                let info = file.info(&name)?;
                let mut out = file.read_f32(info, rows.clone(), cols.clone())?;
                let n_heads = match t {
                    Tensor::Q(_) | Tensor::QBias(_) => Some(*heads),
                    Tensor::K(_) | Tensor::KBias(_) => Some(*kv_heads),
                    _ => None,
                };
                if let (true, Some(n)) = (*unpermute_qk, n_heads) {
                    let (total_rows, _) = info.rows_cols();
                    let hd = total_rows / n;
                    // For a bias (1-D) the "rows" of the permutation are its columns.
                    let (r, width) = if info.dims.len() == 1 {
                        (cols.clone(), 1)
                    } else {
                        (rows.clone(), cols.len())
                    };
                    if r.start % hd != 0 || r.end % hd != 0 {
                        return Err(ModelError::format(
                            &file.path,
                            format!("{name:?}: slice {r:?} cuts a head of {hd}"),
                        ));
                    }
                    unpermute_rows(&mut out, r.len() / hd, hd, width);
                }
                out
            }
        };
        Ok(out)
    }
}

/// GGUF stores Q and K rows of each head interleaved for pairwise RoPE: GGUF row `2i + j` of a
/// head is Hugging Face row `j * hd/2 + i`. This puts them back in rotate-half order.
fn unpermute_rows(data: &mut [f32], heads: usize, hd: usize, width: usize) {
    let half = hd / 2;
    let mut tmp = vec![0f32; hd * width];
    for h in 0..heads {
        let block = &mut data[h * hd * width..(h + 1) * hd * width];
        for i in 0..half {
            for j in 0..2 {
                let src = (2 * i + j) * width;
                let dst = (j * half + i) * width;
                tmp[dst..dst + width].copy_from_slice(&block[src..src + width]);
            }
        }
        block.copy_from_slice(&tmp);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn unpermute_inverts_the_gguf_permutation() {
        // One head of 4 rows, width 1: HF rows [a0, a1, b0, b1] are stored as [a0, b0, a1, b1].
        let mut d = vec![0.0, 2.0, 1.0, 3.0];
        super::unpermute_rows(&mut d, 1, 4, 1);
        assert_eq!(d, vec![0.0, 1.0, 2.0, 3.0]);
    }
}
