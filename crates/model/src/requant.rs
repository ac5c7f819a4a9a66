//! `tessera quantize`: a GGUF file rewritten with its weight matrices in another GGML format
//! (F32/F16/BF16, Q8_0, Q4_0/Q4_1/Q5_0/Q5_1, Q4_K/Q5_K/Q6_K and the K mixes). Metadata is copied
//! byte for byte (only `general.file_type` changes); norms, biases and routers stay as they are.
//!
//! Which type each matrix gets follows llama.cpp's quantizer, so that its file names mean the
//! same here: the output head (the token embedding when it is tied) takes Q6_K, the `_M` mixes
//! give `attn_v` and `ffn_down` Q6_K on the layers llama.cpp's `use_more_bits` picks, and a
//! row that is not whole blocks of the chosen type falls back (Q4_K to Q5_0, Q5_K to Q5_1,
//! Q6_K to Q8_0, then F16). The blocks themselves come from [`tessera_quant::quantize`]'s
//! round-to-nearest quantizers (see there); a tensor already in its target type is copied.

use crate::error::{ModelError, Result};
use crate::gguf::{GgufFile, TensorInfo};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use tessera_quant::GgmlType;
use tessera_quant::quantize::quantize_row;

/// A file type `tessera quantize` writes: the matrices' base type, and the type the `_M`
/// mixes give their more sensitive layers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Target {
    pub name: &'static str,
    base: GgmlType,
    more: Option<GgmlType>,
    /// `general.file_type` (llama.h's `llama_ftype`).
    ftype: u32,
}

const fn target(name: &'static str, base: GgmlType, more: Option<GgmlType>, ftype: u32) -> Target {
    Target {
        name,
        base,
        more,
        ftype,
    }
}

/// Every target, by name.
pub const TARGETS: [Target; 13] = [
    target("F32", GgmlType::F32, None, 0),
    target("F16", GgmlType::F16, None, 1),
    target("BF16", GgmlType::BF16, None, 32),
    target("Q8_0", GgmlType::Q8_0, None, 7),
    target("Q4_0", GgmlType::Q4_0, None, 2),
    target("Q4_1", GgmlType::Q4_1, None, 3),
    target("Q5_0", GgmlType::Q5_0, None, 8),
    target("Q5_1", GgmlType::Q5_1, None, 9),
    target("Q4_K_S", GgmlType::Q4_K, None, 14),
    target("Q4_K_M", GgmlType::Q4_K, Some(GgmlType::Q6_K), 15),
    target("Q5_K_S", GgmlType::Q5_K, None, 16),
    target("Q5_K_M", GgmlType::Q5_K, Some(GgmlType::Q6_K), 17),
    target("Q6_K", GgmlType::Q6_K, None, 18),
];

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Target, String> {
        TARGETS
            .iter()
            .find(|t| t.name.eq_ignore_ascii_case(s))
            .copied()
            .ok_or_else(|| {
                format!(
                    "unknown type {s:?} (one of {})",
                    TARGETS.map(|t| t.name).join(", ")
                )
            })
    }
}

impl Target {
    fn is_float(&self) -> bool {
        matches!(self.base, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
    }
}

/// llama.cpp's choice of layers that keep more bits in the `_M` mixes: the first and last
/// eighth, and every third layer between.
fn use_more_bits(layer: usize, layers: usize) -> bool {
    let eighth = layers / 8;
    layer < eighth || layer >= 7 * layers / 8 || (layer - eighth) % 3 == 2
}

/// The type a row of `cols` values can take when `ty`'s blocks do not divide it.
fn fit(ty: GgmlType, cols: usize) -> GgmlType {
    let whole = |t: GgmlType| cols.is_multiple_of(t.block_values());
    if whole(ty) {
        return ty;
    }
    let next = match ty {
        GgmlType::Q4_K => GgmlType::Q5_0,
        GgmlType::Q5_K => GgmlType::Q5_1,
        GgmlType::Q6_K => GgmlType::Q8_0,
        _ => GgmlType::F16,
    };
    if whole(next) { next } else { GgmlType::F16 }
}

/// The type tensor `t` gets in a `target` file; `None` keeps it as it is (vectors: norms,
/// biases; and MoE routers, which llama.cpp keeps too).
pub fn tensor_type(target: &Target, t: &TensorInfo, layers: usize, tied: bool) -> Option<GgmlType> {
    let name = t.name.as_str();
    if t.dims.len() < 2 || !name.ends_with("weight") || name.contains("ffn_gate_inp") {
        return None;
    }
    let cols = t.dims[0];
    if target.is_float() {
        return Some(target.base);
    }
    let output = name == "output.weight" || (tied && name == "token_embd.weight");
    let layer = name
        .strip_prefix("blk.")
        .and_then(|r| r.split('.').next())
        .and_then(|i| i.parse::<usize>().ok());
    let ty = if output && target.base != GgmlType::Q8_0 {
        GgmlType::Q6_K
    } else if let (Some(more), Some(i)) = (target.more, layer) {
        let sensitive = name.ends_with("attn_v.weight") || name.ends_with("ffn_down.weight");
        if sensitive && use_more_bits(i, layers) {
            more
        } else {
            target.base
        }
    } else {
        target.base
    };
    Some(fit(ty, cols))
}

/// What [`requantize`] wrote.
#[derive(Debug, Default)]
pub struct Summary {
    pub tensors: usize,
    /// Tensors re-encoded (the rest were copied).
    pub converted: usize,
    pub in_bytes: u64,
    pub out_bytes: u64,
    /// Tensors per type in the new file.
    pub types: BTreeMap<&'static str, usize>,
}

/// Rows quantized per batch: bounds the f32 held at once to 16 MiB.
const BATCH_VALUES: usize = 4 << 20;

/// Rewrites the GGUF file `input` as `output` in `target`. The file is written next to
/// `output` under a temporary name and renamed when complete, so a failure leaves nothing
/// behind and never a half-written model.
pub fn requantize(input: &Path, output: &Path, target: &Target) -> Result<Summary> {
    let src = GgufFile::open(input)?;
    let same = match (input.canonicalize(), output.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same {
        return Err(ModelError::format(
            output,
            "the output would overwrite the input: choose another file name",
        ));
    }
    via_partial(output, |partial| write(&src, partial, target))
}

/// Writes `output` through `OUTPUT.partial`, renamed into place once `write` succeeds and
/// removed if it fails: a failed run leaves nothing behind and never a half-written model.
fn via_partial(output: &Path, write: impl FnOnce(&Path) -> Result<Summary>) -> Result<Summary> {
    let partial = {
        let mut s = output.as_os_str().to_owned();
        s.push(".partial");
        PathBuf::from(s)
    };
    match write(&partial) {
        Ok(summary) => {
            std::fs::rename(&partial, output).map_err(|e| ModelError::io(output, e))?;
            Ok(summary)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(e)
        }
    }
}

fn write(src: &GgufFile, path: &Path, target: &Target) -> Result<Summary> {
    let arch = src
        .get("general.architecture")
        .and_then(|v| v.as_str())
        .unwrap_or("llama")
        .to_string();
    let layers = src
        .get(&format!("{arch}.block_count"))
        .and_then(|v| v.as_u64())
        .unwrap_or(0) as usize;
    let tied = !src.tensors.contains_key("output.weight");
    let mut tensors: Vec<&TensorInfo> = src.tensors.values().collect();
    tensors.sort_by_key(|t| t.offset);
    let align = src.alignment;
    let plan: Vec<(&TensorInfo, GgmlType)> = tensors
        .iter()
        .map(|t| (*t, tensor_type(target, t, layers, tied).unwrap_or(t.ty)))
        .collect();

    let io = |e| ModelError::io(path, e);
    let file = std::fs::File::create(path).map_err(io)?;
    let mut w = Sink {
        w: std::io::BufWriter::with_capacity(8 << 20, file),
        pos: 0,
        path,
    };
    let key = |k: &str| {
        let mut v = (k.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(k.as_bytes());
        v
    };

    // Header and metadata: every entry as stored, but the file type.
    let n_kv = src.entries.len() + usize::from(src.get("general.file_type").is_none());
    w.put(b"GGUF")?;
    w.put(&3u32.to_le_bytes())?;
    w.put(&(plan.len() as u64).to_le_bytes())?;
    w.put(&(n_kv as u64).to_le_bytes())?;
    let file_type = {
        let mut v = key("general.file_type");
        v.extend_from_slice(&4u32.to_le_bytes());
        v.extend_from_slice(&target.ftype.to_le_bytes());
        v
    };
    for (k, range) in &src.entries {
        if k == "general.file_type" {
            w.put(&file_type)?;
        } else {
            w.put(src.bytes(range.clone()))?;
        }
    }
    if src.get("general.file_type").is_none() {
        w.put(&file_type)?;
    }

    // Tensor infos, with offsets in the new data section.
    let mut summary = Summary::default();
    let sizes = put_infos(
        &mut w,
        plan.iter().map(|(t, ty)| (*t, *ty)),
        align,
        &mut summary,
    )?;

    // Data, one batch of rows at a time.
    for ((t, ty), size) in plan.iter().zip(&sizes) {
        let (rows, cols) = t.rows_cols();
        summary.tensors += 1;
        summary.in_bytes += t.bytes() as u64;
        summary.out_bytes += *size as u64;
        if *ty == t.ty {
            w.put(src.bytes(t.offset..t.offset + t.bytes()))?;
        } else {
            summary.converted += 1;
            let in_row = t.bytes() / rows;
            let out_row = size / rows;
            let batch = (BATCH_VALUES / cols).max(1);
            let mut out = Vec::new();
            for r0 in (0..rows).step_by(batch) {
                let n = batch.min(rows - r0);
                let data = src.bytes(t.offset + r0 * in_row..t.offset + (r0 + n) * in_row);
                out.resize(n * out_row, 0);
                tessera_quant::in_pool(|| {
                    out.par_chunks_mut(out_row)
                        .zip(data.par_chunks(in_row))
                        .try_for_each_init(
                            || vec![0f32; cols],
                            |x, (o, d)| {
                                tessera_quant::dequantize(t.ty, d, x);
                                quantize_row(*ty, x, o)
                            },
                        )
                })
                .map_err(|e| ModelError::format(&src.path, format!("{}: {e}", t.name)))?;
                w.put(&out)?;
            }
        }
        w.pad(align)?;
    }
    w.finish()?;
    Ok(summary)
}

/// A model shape for [`synthesize`]: a Llama-architecture decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub name: &'static str,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub context: usize,
}

/// Shapes of known models, for benchmarking a machine without downloading one.
pub const SHAPES: [Shape; 4] = [
    Shape {
        name: "tiny",
        hidden: 64,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        ffn: 256,
        vocab: 512,
        context: 256,
    },
    Shape {
        name: "smollm2-135m",
        hidden: 576,
        layers: 30,
        heads: 9,
        kv_heads: 3,
        ffn: 1536,
        vocab: 49152,
        context: 8192,
    },
    Shape {
        name: "tinyllama-1.1b",
        hidden: 2048,
        layers: 22,
        heads: 32,
        kv_heads: 4,
        ffn: 5632,
        vocab: 32000,
        context: 2048,
    },
    Shape {
        name: "llama3-8b",
        hidden: 4096,
        layers: 32,
        heads: 32,
        kv_heads: 8,
        ffn: 14336,
        vocab: 128256,
        context: 8192,
    },
];

/// Writes a GGUF file of `shape` with random weights (uniform in ±0.05, norms 1) in `target`'s
/// formats (chosen per tensor as [`requantize`] would), and a byte-level tokenizer (the 256
/// bytes, the rest of the vocabulary unused names): a model to measure speed with, not to
/// read. The same seed writes the same file.
pub fn synthesize(output: &Path, shape: &Shape, target: &Target, seed: u64) -> Result<Summary> {
    via_partial(output, |partial| synth(partial, shape, target, seed))
}

fn synth(partial: &Path, shape: &Shape, target: &Target, seed: u64) -> Result<Summary> {
    let sh = *shape;
    let hd = sh.hidden / sh.heads;
    let file = std::fs::File::create(partial).map_err(|e| ModelError::io(partial, e))?;
    let mut w = Sink {
        w: std::io::BufWriter::with_capacity(8 << 20, file),
        pos: 0,
        path: partial,
    };
    let mut tensors: Vec<(String, Vec<usize>)> =
        vec![("token_embd.weight".into(), vec![sh.hidden, sh.vocab])];
    for l in 0..sh.layers {
        let b = |n: &str| format!("blk.{l}.{n}.weight");
        tensors.extend([
            (b("attn_norm"), vec![sh.hidden]),
            (b("attn_q"), vec![sh.hidden, sh.heads * hd]),
            (b("attn_k"), vec![sh.hidden, sh.kv_heads * hd]),
            (b("attn_v"), vec![sh.hidden, sh.kv_heads * hd]),
            (b("attn_output"), vec![sh.heads * hd, sh.hidden]),
            (b("ffn_norm"), vec![sh.hidden]),
            (b("ffn_gate"), vec![sh.hidden, sh.ffn]),
            (b("ffn_up"), vec![sh.hidden, sh.ffn]),
            (b("ffn_down"), vec![sh.ffn, sh.hidden]),
        ]);
    }
    tensors.push(("output_norm.weight".into(), vec![sh.hidden]));
    tensors.push(("output.weight".into(), vec![sh.hidden, sh.vocab]));

    // Metadata.
    let mut kv: Vec<u8> = Vec::new();
    let mut n_kv = 0u64;
    let text = |v: &mut Vec<u8>, x: &str| {
        v.extend((x.len() as u64).to_le_bytes());
        v.extend(x.as_bytes());
    };
    let mut put = |k: &str, ty: u32, value: &[u8]| {
        text(&mut kv, k);
        kv.extend(ty.to_le_bytes());
        kv.extend(value);
        n_kv += 1;
    };
    let string = |x: &str| {
        let mut v = Vec::new();
        text(&mut v, x);
        v
    };
    let u32v = |x: usize| (x as u32).to_le_bytes().to_vec();
    let f32v = |x: f32| x.to_le_bytes().to_vec();
    put("general.architecture", 8, &string("llama"));
    put("general.name", 8, &string(&format!("random {}", sh.name)));
    put("general.file_type", 4, &target.ftype.to_le_bytes());
    put("llama.context_length", 4, &u32v(sh.context));
    put("llama.embedding_length", 4, &u32v(sh.hidden));
    put("llama.block_count", 4, &u32v(sh.layers));
    put("llama.feed_forward_length", 4, &u32v(sh.ffn));
    put("llama.attention.head_count", 4, &u32v(sh.heads));
    put("llama.attention.head_count_kv", 4, &u32v(sh.kv_heads));
    put("llama.attention.layer_norm_rms_epsilon", 6, &f32v(1e-5));
    put("llama.rope.freq_base", 6, &f32v(10000.0));
    put("tokenizer.ggml.model", 8, &string("gpt2"));
    put("tokenizer.ggml.pre", 8, &string("default"));
    // GPT-2's byte-to-character map: the printable bytes stand for themselves, the others
    // for the characters from U+0100 on.
    let mut tokens = Vec::with_capacity(sh.vocab);
    let mut next = 256u32;
    for b in 0..=255u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let c = if printable {
            b
        } else {
            next += 1;
            next - 1
        };
        tokens.push(char::from_u32(c).expect("a character").to_string());
    }
    while tokens.len() < sh.vocab {
        tokens.push(format!("<unused{}>", tokens.len()));
    }
    tokens.truncate(sh.vocab);
    let mut arr = Vec::new();
    arr.extend(8u32.to_le_bytes());
    arr.extend((tokens.len() as u64).to_le_bytes());
    for t in &tokens {
        text(&mut arr, t);
    }
    put("tokenizer.ggml.tokens", 9, &arr);
    let mut merges = Vec::new();
    merges.extend(8u32.to_le_bytes());
    merges.extend(0u64.to_le_bytes());
    put("tokenizer.ggml.merges", 9, &merges);
    put("tokenizer.ggml.bos_token_id", 4, &u32v(0));
    put("tokenizer.ggml.eos_token_id", 4, &u32v(sh.vocab - 1));

    let align = 32usize;
    let plan: Vec<(TensorInfo, GgmlType)> = tensors
        .into_iter()
        .map(|(name, dims)| {
            let info = TensorInfo {
                name,
                dims,
                ty: GgmlType::F32,
                offset: 0,
                size: 0,
            };
            let ty = tensor_type(target, &info, sh.layers, false).unwrap_or(GgmlType::F32);
            (info, ty)
        })
        .collect();
    w.put(b"GGUF")?;
    w.put(&3u32.to_le_bytes())?;
    w.put(&(plan.len() as u64).to_le_bytes())?;
    w.put(&n_kv.to_le_bytes())?;
    w.put(&kv)?;
    let mut summary = Summary::default();
    let sizes = put_infos(
        &mut w,
        plan.iter().map(|(t, ty)| (t, *ty)),
        align,
        &mut summary,
    )?;
    for (i, ((t, ty), size)) in plan.iter().zip(&sizes).enumerate() {
        let (rows, cols) = t.rows_cols();
        summary.tensors += 1;
        summary.converted += usize::from(*ty != GgmlType::F32);
        summary.out_bytes += *size as u64;
        let norm = t.dims.len() == 1;
        let out_row = size / rows;
        let batch = (BATCH_VALUES / cols).max(1);
        let mut out = Vec::new();
        for r0 in (0..rows).step_by(batch) {
            let n = batch.min(rows - r0);
            out.resize(n * out_row, 0);
            random_rows(*ty, cols, (seed, i, r0), norm, &mut out)
                .map_err(|e| ModelError::format(partial, format!("{}: {e}", t.name)))?;
            w.put(&out)?;
        }
        w.pad(align)?;
    }
    w.finish()?;
    Ok(summary)
}

/// Whole rows of `ty` blocks into `out` (`cols` values a row): rows `first..` of tensor
/// `tensor` of a random model from `seed`, values uniform in ±0.05 (all 1 for a `norm`), on the
/// kernels' threads. A generator per row, from (seed, tensor, row): any thread order writes
/// the same bytes.
pub fn random_rows(
    ty: GgmlType,
    cols: usize,
    (seed, tensor, first): (u64, usize, usize),
    norm: bool,
    out: &mut [u8],
) -> std::result::Result<(), String> {
    let row_bytes = ty
        .row_bytes(cols)
        .ok_or_else(|| format!("{cols} values are not whole {} blocks", ty.name()))?;
    tessera_quant::in_pool(|| {
        out.par_chunks_mut(row_bytes).enumerate().try_for_each_init(
            || vec![0f32; cols],
            |x, (r, o)| {
                let mut z = seed ^ ((tensor as u64) << 40) ^ (first + r) as u64;
                for v in x.iter_mut() {
                    *v = if norm {
                        1.0
                    } else {
                        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
                        let mut m = z;
                        m = (m ^ (m >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                        m = (m ^ (m >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                        m ^= m >> 31;
                        ((m >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
                    };
                }
                quantize_row(ty, x, o)
            },
        )
    })
}

/// The tensor directory: each tensor's name, dimensions, type and offset in the data section
/// (every tensor aligned to `align`), then the padding to the data; the tensors' sizes.
fn put_infos<'a>(
    w: &mut Sink,
    plan: impl Iterator<Item = (&'a TensorInfo, GgmlType)>,
    align: usize,
    summary: &mut Summary,
) -> Result<Vec<usize>> {
    let mut offset = 0usize;
    let mut sizes = Vec::new();
    for (t, ty) in plan {
        let (rows, cols) = t.rows_cols();
        let size = ty.row_bytes(cols).ok_or_else(|| {
            ModelError::format(
                w.path,
                format!("{}: {cols} columns do not fit {}", t.name, ty.name()),
            )
        })? * rows;
        w.put(&(t.name.len() as u64).to_le_bytes())?;
        w.put(t.name.as_bytes())?;
        w.put(&(t.dims.len() as u32).to_le_bytes())?;
        for d in &t.dims {
            w.put(&(*d as u64).to_le_bytes())?;
        }
        w.put(&ty.id().to_le_bytes())?;
        w.put(&(offset as u64).to_le_bytes())?;
        sizes.push(size);
        offset = (offset + size).div_ceil(align) * align;
        *summary.types.entry(ty.name()).or_default() += 1;
    }
    w.pad(align)?;
    Ok(sizes)
}

/// The file being written, and how far.
struct Sink<'a> {
    w: std::io::BufWriter<std::fs::File>,
    pos: u64,
    path: &'a Path,
}

impl Sink<'_> {
    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.pos += b.len() as u64;
        self.w
            .write_all(b)
            .map_err(|e| ModelError::io(self.path, e))
    }
    /// Flushes the file and waits for it to reach the disk.
    fn finish(self) -> Result<()> {
        let path = self.path;
        self.w
            .into_inner()
            .map_err(|e| ModelError::io(path, e.into_error()))?
            .sync_all()
            .map_err(|e| ModelError::io(path, e))
    }
    /// Zeros up to the next multiple of `align`.
    fn pad(&mut self, align: usize) -> Result<()> {
        let align = align as u64;
        let n = self.pos.div_ceil(align) * align - self.pos;
        self.put(&vec![0u8; n as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, dims: &[usize]) -> TensorInfo {
        TensorInfo {
            name: name.into(),
            dims: dims.to_vec(),
            ty: GgmlType::F32,
            offset: 0,
            size: 0,
        }
    }

    /// The types llama.cpp's quantizer chose for SmolLM2-135M (576 wide, 30 layers, tied
    /// embedding) in its Q4_K_M file: its log lists Q5_0 for the 576-wide matrices, Q8_0 for the
    /// sensitive attn_v layers and the tied head, Q6_K/Q4_K for ffn_down by layer.
    #[test]
    fn q4_k_m_mix_matches_llama_cpp_choices() {
        let t: Target = "q4_k_m".parse().unwrap();
        let ty = |name: &str, dims: &[usize]| tensor_type(&t, &info(name, dims), 30, true);
        assert_eq!(ty("blk.0.attn_q.weight", &[576, 576]), Some(GgmlType::Q5_0));
        assert_eq!(ty("blk.0.attn_v.weight", &[576, 192]), Some(GgmlType::Q8_0));
        assert_eq!(ty("blk.3.attn_v.weight", &[576, 192]), Some(GgmlType::Q5_0));
        assert_eq!(ty("blk.5.attn_v.weight", &[576, 192]), Some(GgmlType::Q8_0));
        assert_eq!(
            ty("blk.0.ffn_down.weight", &[1536, 576]),
            Some(GgmlType::Q6_K)
        );
        assert_eq!(
            ty("blk.3.ffn_down.weight", &[1536, 576]),
            Some(GgmlType::Q4_K)
        );
        assert_eq!(
            ty("blk.29.ffn_down.weight", &[1536, 576]),
            Some(GgmlType::Q6_K)
        );
        assert_eq!(ty("token_embd.weight", &[576, 49152]), Some(GgmlType::Q8_0));
        assert_eq!(ty("blk.0.attn_norm.weight", &[576]), None);
        let wide = |name: &str| tensor_type(&t, &info(name, &[4096, 4096]), 32, false);
        assert_eq!(wide("output.weight"), Some(GgmlType::Q6_K));
        assert_eq!(wide("token_embd.weight"), Some(GgmlType::Q4_K));
        assert_eq!(wide("blk.0.ffn_gate_inp.weight"), None);
        let f16: Target = "F16".parse().unwrap();
        assert_eq!(
            tensor_type(&f16, &info("output.weight", &[576, 10]), 30, false),
            Some(GgmlType::F16)
        );
        assert!("Q3_K".parse::<Target>().is_err());
    }
}
