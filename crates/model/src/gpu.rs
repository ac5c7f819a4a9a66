//! Weights on a GPU (wgpu through CubeCL), in the file's blocks: the bytes of every row go to
//! the GPU as they are stored (packed into `u32` words, since WGSL has no bytes; the f16 scales
//! of blocks that are two bytes off a word in an array of their own), and one CubeCL kernel
//! per format dequantizes inside the matrix product, with f32 activations. So a model takes
//! its file's size on the GPU too. A decode step's products read each row's 32-value chunks
//! side by side, a word at a time; a prompt's take one unit per output value. Every kernel is
//! checked on lavapipe; their speed on a real GPU is not measured yet.

use crate::error::{ModelError, Result};
use crate::weights::RawTensor;
use burn::backend::Cube;
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::{CubeCount, CubeDim};
use kernels::{
    argmax_rows_kernel, attend_one_kernel, dequant_rows_kernel, glu_kernel, kv_write_kernel,
    norm_kernel, qmatmul_kernel, qmatvec_kernel, qmatvec3_kernel, rope_kernel,
};
use tessera_quant::GgmlType;

/// Units per workgroup: a size every adapter accepts.
const WORKGROUP: u32 = 64;

/// Units of the workgroup that the row kernels (mat-vec, norms, attention, argmax) give to one
/// row: a power of two every adapter accepts, a multiple of every GPU's SIMD width (32 on
/// NVIDIA, 32 or 64 on AMD, 8-32 on Intel and Apple).
const ROW_GROUP: usize = 64;

/// The most units of a mat-vec's workgroup that share one output row. Fewer units a row means
/// more rows a workgroup, more chunks a unit and a shorter reduction: on an H100 (NVIDIA's
/// Vulkan driver) a 14336 x 4096 Q4_0 product took 270 us with 64 units a row, 149 with 16 and
/// 98 with 8, and lavapipe too was fastest with 8 (see README, "Which backend").
const MATVEC_LANES: usize = 8;

/// Units of a mat-vec's workgroup that share one output row: one per 32-value chunk of the
/// row up to [`MATVEC_LANES`] (a power of two), so a short row does not leave units idle; the
/// workgroup takes `ROW_GROUP / lanes` rows. `TESSERA_GPU_LANES` (a power of two up to 64)
/// sets another cap, to try other splits on a new GPU (`tessera bench --kernels`).
fn lanes_for(cols: usize, dense: bool) -> u32 {
    static CAP: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cap = *CAP.get_or_init(|| {
        std::env::var("TESSERA_GPU_LANES")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|l| l.is_power_of_two() && *l <= ROW_GROUP)
            .unwrap_or(MATVEC_LANES)
    });
    let units = if dense { cols } else { cols / 32 };
    let mut lanes = 1;
    while lanes * 2 <= units.min(cap) {
        lanes *= 2;
    }
    lanes as u32
}

/// Activation rows up to which a product takes the mat-vec kernel (decode steps and small
/// batches); more rows (prompts) take one unit per output value.
const MATVEC_ROWS: usize = 8;

/// `groups` workgroups, as a grid every adapter accepts (at most 65535 along an axis, the
/// WebGPU limit): the kernels number their workgroups across both axes (`CUBE_POS`,
/// `ABSOLUTE_POS`) and the spare ones of the last row do nothing.
fn grid(groups: u32) -> CubeCount {
    const AXIS: u32 = 65535;
    let groups = groups.max(1);
    CubeCount::Static(groups.min(AXIS), groups.div_ceil(AXIS), 1)
}

/// Bytes of one part of a weight matrix: every adapter can bind a storage buffer this large
/// (WebGPU's guaranteed minimum is 128 MiB). A larger matrix (a big vocabulary's LM head or
/// embedding: 178 MB for Gemma 3 270M's, 430 MB for Llama 3 8B's) is held in parts of whole
/// rows, a launch each.
const PART_BYTES: usize = 120 << 20;

/// Where a block keeps its f16 scale `d`, for the formats whose blocks are two bytes off a
/// whole number of `u32` words (Q4_0, Q5_0, Q8_0, IQ4_NL: 18, 22, 34, 18 bytes; Q3_K, Q6_K:
/// 110, 210). On the GPU those scales sit in an array of their own, so every block's body
/// starts on a word and the kernels read it a word (4 or 8 values) at a time instead of byte
/// by byte; the matrix keeps its file's size.
fn split_scale(ty: GgmlType) -> Option<usize> {
    use GgmlType::*;
    match ty {
        Q4_0 | Q5_0 | Q8_0 | IQ4_NL => Some(0),
        Q3_K => Some(108),
        Q6_K => Some(208),
        _ => None,
    }
}

/// Bytes of a block of `ty` on the GPU: the file's, less the scale [`split_scale`] moves out.
fn body_bytes(ty: GgmlType) -> usize {
    ty.block_bytes() - split_scale(ty).map_or(0, |_| 2)
}

/// A weight matrix on the GPU, in its stored format.
pub struct GpuMatrix {
    /// Parts of whole rows: (first row, rows, words, scales). `words`: the rows' blocks as
    /// little-endian `u32` words (zero-padded to a whole word), each block without its scale
    /// where [`split_scale`] moves it; `scales`: those scales, two f16 a word, in block order
    /// (one unused word for the other formats).
    parts: Vec<(usize, usize, Tensor<1, Int>, Tensor<1, Int>)>,
    /// The IQ4 code book (16 values), read by the IQ4 kernels.
    table: Tensor<1>,
    ty: GgmlType,
    rows: usize,
    cols: usize,
    /// Bytes of a row on the GPU (the file's, less the scales moved out).
    row_bytes: usize,
}

/// Little-endian `u32` words of `bytes`, the last one zero-padded.
fn words_of(bytes: &[u8]) -> Vec<u32> {
    let mut words = vec![0u32; bytes.len().div_ceil(4).max(1)];
    for (w, c) in words.iter_mut().zip(bytes.chunks(4)) {
        let mut b = [0u8; 4];
        b[..c.len()].copy_from_slice(c);
        *w = u32::from_le_bytes(b);
    }
    words
}

/// The GPU layout of `rows` (whole rows of type `ty`): the blocks' bodies, and their scales
/// where [`split_scale`] moves them out.
fn gpu_layout(ty: GgmlType, rows: &[u8]) -> (Vec<u32>, Vec<u32>) {
    let Some(at) = split_scale(ty) else {
        return (words_of(rows), vec![0]);
    };
    let bb = ty.block_bytes();
    let mut body = Vec::with_capacity(rows.len());
    let mut scales = Vec::with_capacity(rows.len() / bb * 2);
    for block in rows.chunks_exact(bb) {
        body.extend_from_slice(&block[..at]);
        body.extend_from_slice(&block[at + 2..]);
        scales.extend_from_slice(&block[at..at + 2]);
    }
    (words_of(&body), words_of(&scales))
}

fn cube<const D: usize>(t: Tensor<D>) -> CubeTensor {
    t.try_into_primitive::<Cube>()
        .expect("a tensor on a CubeCL device")
}

/// The same for an integer tensor (packed weights, ids, indices, picks).
fn cube_int(t: &Tensor<1, Int>) -> CubeTensor {
    t.clone()
        .try_into_primitive::<Cube>()
        .expect("a tensor on a CubeCL device")
}

impl GpuMatrix {
    pub fn upload(raw: &RawTensor, device: &Device) -> Result<GpuMatrix> {
        let bytes = raw.data.as_slice();
        let (rows, row_bytes) = (raw.rows.len(), raw.row_bytes());
        if row_bytes > PART_BYTES {
            return Err(ModelError::Backend(format!(
                "a weight row of {row_bytes} bytes is more than a GPU buffer can be relied on to hold"
            )));
        }
        let per_part = (PART_BYTES / row_bytes.max(1)).max(1);
        let mut parts = Vec::with_capacity(rows.div_ceil(per_part));
        let u32s = |v: Vec<u32>| {
            let len = v.len();
            Tensor::<1, Int>::from_data(TensorData::new(v, [len]), (device, DType::U32))
        };
        for first in (0..rows.max(1)).step_by(per_part) {
            let n = per_part.min(rows - first.min(rows));
            let part = &bytes[first * row_bytes..(first + n) * row_bytes];
            let (words, scales) = gpu_layout(raw.ty, part);
            parts.push((first, n, u32s(words), u32s(scales)));
        }
        let table: Vec<f32> = tessera_quant::format::IQ4_VALUES
            .iter()
            .map(|&v| v as f32)
            .collect();

        Ok(GpuMatrix {
            parts,
            table: Tensor::<1>::from_data(TensorData::new(table, [16]), device),
            ty: raw.ty,
            rows,
            cols: raw.cols.len(),
            row_bytes: row_bytes / raw.ty.block_bytes() * body_bytes(raw.ty),
        })
    }

    /// `x · Wᵀ` for `x` of `[n, cols]`: `[n, rows]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let [n, cols] = x.dims();
        debug_assert_eq!(cols, self.cols);
        let device = x.device();
        // Every value is written by the kernels: no fill.
        let out = Tensor::<2>::empty([n, self.rows], &device);
        for (first, rows, words, scales) in &self.parts {
            let (xc, oc) = (cube(x.clone()), cube(out.clone()));
            let (w, sc, tc) = (cube_int(words), cube_int(scales), cube(self.table.clone()));
            let client = oc.client.clone();
            if n <= MATVEC_ROWS {
                // Decode: the units of a row read it side by side.
                let lanes = lanes_for(self.cols, self.ty.is_dense());
                let per = ROW_GROUP as u32 / lanes;
                qmatvec_kernel::launch(
                    &client,
                    grid((*rows as u32).div_ceil(per)),
                    CubeDim::new_1d(ROW_GROUP as u32),
                    w.into_tensor_arg(),
                    sc.into_tensor_arg(),
                    tc.into_tensor_arg(),
                    xc.into_tensor_arg(),
                    oc.into_tensor_arg(),
                    *first as u32,
                    *rows as u32,
                    self.cols as u32,
                    self.row_bytes as u32,
                    n as u32,
                    lanes,
                    self.ty.id(),
                    ROW_GROUP,
                );
            } else {
                let units = (n * rows) as u32;
                qmatmul_kernel::launch(
                    &client,
                    grid(units.div_ceil(WORKGROUP)),
                    CubeDim::new_1d(WORKGROUP),
                    w.into_tensor_arg(),
                    sc.into_tensor_arg(),
                    tc.into_tensor_arg(),
                    xc.into_tensor_arg(),
                    oc.into_tensor_arg(),
                    *first as u32,
                    *rows as u32,
                    self.cols as u32,
                    self.row_bytes as u32,
                    n as u32,
                    self.ty.id(),
                );
            }
        }
        out
    }

    /// `x · Wᵀ` for two or three matrices of one input (Q, K, V; gate, up) in one launch,
    /// each in its own format (one lane count: blocks in all or in none); None where that does
    /// not apply (a prompt's rows, a matrix in parts, more than three): then a launch each.
    pub fn forward_many(ms: &[&GpuMatrix], x: &Tensor<2>) -> Option<Vec<Tensor<2>>> {
        let [n, cols] = x.dims();
        if !(2..=3).contains(&ms.len())
            || n > MATVEC_ROWS
            || ms.iter().any(|m| m.parts.len() != 1 || m.cols != cols)
            || ms.iter().any(|m| m.ty.is_dense() != ms[0].ty.is_dense())
        {
            return None;
        }
        let device = x.device();
        let outs: Vec<Tensor<2>> = ms
            .iter()
            .map(|m| Tensor::<2>::empty([n, m.rows], &device))
            .collect();
        // An empty third: a one-value output of its own (a buffer may not be bound twice
        // where one binding writes) and no rows.
        let spare = (ms.len() == 2).then(|| Tensor::<2>::empty([1, 1], &device));
        let o2 = spare.clone().unwrap_or_else(|| outs[2].clone());
        let m2 = ms.get(2).copied().unwrap_or(ms[1]);
        let rows2 = if spare.is_some() { 0 } else { m2.rows };
        let part = |m: &GpuMatrix| (cube_int(&m.parts[0].2), cube_int(&m.parts[0].3));
        let ((w0, s0), (w1, s1), (w2, s2)) = (part(ms[0]), part(ms[1]), part(m2));
        let oc = cube(outs[0].clone());
        let client = oc.client.clone();
        let lanes = lanes_for(cols, ms[0].ty.is_dense());
        let per = ROW_GROUP / lanes as usize;
        let groups = ms[0].rows.div_ceil(per) + ms[1].rows.div_ceil(per) + rows2.div_ceil(per);
        qmatvec3_kernel::launch(
            &client,
            grid(groups as u32),
            CubeDim::new_1d(ROW_GROUP as u32),
            w0.into_tensor_arg(),
            s0.into_tensor_arg(),
            w1.into_tensor_arg(),
            s1.into_tensor_arg(),
            w2.into_tensor_arg(),
            s2.into_tensor_arg(),
            cube(ms[0].table.clone()).into_tensor_arg(),
            cube(x.clone()).into_tensor_arg(),
            oc.into_tensor_arg(),
            cube(outs[1].clone()).into_tensor_arg(),
            cube(o2).into_tensor_arg(),
            ms[0].rows as u32,
            ms[1].rows as u32,
            rows2 as u32,
            cols as u32,
            ms[0].row_bytes as u32,
            ms[1].row_bytes as u32,
            m2.row_bytes as u32,
            n as u32,
            lanes,
            ms[0].ty.id(),
            ms[1].ty.id(),
            m2.ty.id(),
            ROW_GROUP,
        );
        Some(outs)
    }

    /// Rows `ids` of the matrix, dequantized: `[ids, cols]` (an embedding lookup).
    pub fn rows(&self, ids: &[u32], device: &Device) -> Tensor<2> {
        let t = ids.len();
        let ids =
            Tensor::<1, Int>::from_data(TensorData::new(ids.to_vec(), [t]), (device, DType::U32));
        let out = Tensor::<2>::empty([t, self.cols], device);
        for (first, rows, words, scales) in &self.parts {
            let oc = cube(out.clone());
            let ic = cube_int(&ids);
            let (w, sc, tc) = (cube_int(words), cube_int(scales), cube(self.table.clone()));
            let units = (t * self.cols) as u32;
            let client = oc.client.clone();
            // Each part writes the rows of the ids it holds.
            dequant_rows_kernel::launch(
                &client,
                grid(units.div_ceil(WORKGROUP)),
                CubeDim::new_1d(WORKGROUP),
                w.into_tensor_arg(),
                sc.into_tensor_arg(),
                tc.into_tensor_arg(),
                ic.into_tensor_arg(),
                oc.into_tensor_arg(),
                *first as u32,
                *rows as u32,
                self.cols as u32,
                self.row_bytes as u32,
                t as u32,
                self.ty.id(),
            );
        }
        out
    }
}

/// RMSNorm of every row of `x` (`[rows, width]`) times `w` (`width` values): one dispatch, a
/// workgroup per row.
pub fn rms_norm(x: Tensor<2>, w: &Tensor<2>, eps: f32) -> Tensor<2> {
    norm(x, None, w, eps).1
}

/// `x + y` (the residual add) and its RMSNorm times `w`: one dispatch, a workgroup per row.
pub fn add_rms_norm(x: Tensor<2>, y: Tensor<2>, w: &Tensor<2>, eps: f32) -> (Tensor<2>, Tensor<2>) {
    let (sum, out) = norm(x, Some(y), w, eps);
    (sum.expect("the sum"), out)
}

fn norm(
    x: Tensor<2>,
    y: Option<Tensor<2>>,
    w: &Tensor<2>,
    eps: f32,
) -> (Option<Tensor<2>>, Tensor<2>) {
    let [rows, width] = x.dims();
    let device = x.device();
    let add = y.is_some();
    // Without `y`, the kernel reads `x` in its place and writes no sum (a one-value stand-in:
    // a buffer may not be bound twice where one binding writes).
    let sum = Tensor::<2>::empty(if add { [rows, width] } else { [1, 1] }, &device);
    let y = y.unwrap_or_else(|| x.clone());
    let out = Tensor::<2>::empty([rows, width], &device);
    let oc = cube(out.clone());
    let client = oc.client.clone();
    norm_kernel::launch(
        &client,
        grid(rows as u32),
        CubeDim::new_1d(ROW_GROUP as u32),
        cube(x).into_tensor_arg(),
        cube(y).into_tensor_arg(),
        cube(w.clone()).into_tensor_arg(),
        cube(sum.clone()).into_tensor_arg(),
        oc.into_tensor_arg(),
        rows as u32,
        width as u32,
        eps,
        add,
        ROW_GROUP,
    );
    (add.then_some(sum), out)
}

/// Row `row` of `k` and `v` (`[tokens, nkv * hd]`) into position `at` of the caches `ck`, `cv`
/// (`[nkv, capacity, hd]`): one dispatch for both.
pub fn kv_write(
    k: &Tensor<2>,
    v: &Tensor<2>,
    row: usize,
    ck: &Tensor<3>,
    cv: &Tensor<3>,
    at: usize,
) {
    let [nkv, _, hd] = ck.dims();
    let units = (nkv * hd) as u32;
    let kc = cube(ck.clone());
    let client = kc.client.clone();
    kv_write_kernel::launch(
        &client,
        grid(units.div_ceil(WORKGROUP)),
        CubeDim::new_1d(WORKGROUP),
        cube(k.clone()).into_tensor_arg(),
        cube(v.clone()).into_tensor_arg(),
        kc.into_tensor_arg(),
        cube(cv.clone()).into_tensor_arg(),
        row as u32,
        at as u32,
        units,
        hd as u32,
    );
}

/// Rotary embedding of `q` and `k` (`[tokens, heads * head_dim]`) with the step's `cos` and
/// `sin` tables (`[1, tokens, head_dim]`, each angle's value at both positions it turns): one
/// dispatch for both.
pub fn rope(
    q: Tensor<2>,
    k: Tensor<2>,
    cos: &Tensor<3>,
    sin: &Tensor<3>,
    hd: usize,
    interleaved: bool,
) -> (Tensor<2>, Tensor<2>) {
    let ([t, wq], [_, wk]) = (q.dims(), k.dims());
    let device = q.device();
    let q_out = Tensor::<2>::empty([t, wq], &device);
    let k_out = Tensor::<2>::empty([t, wk], &device);
    let qc = cube(q_out.clone());
    let client = qc.client.clone();
    let units = (t * (wq + wk)) as u32;
    rope_kernel::launch(
        &client,
        grid(units.div_ceil(WORKGROUP)),
        CubeDim::new_1d(WORKGROUP),
        cube(q).into_tensor_arg(),
        cube(k).into_tensor_arg(),
        cube(cos.clone()).into_tensor_arg(),
        cube(sin.clone()).into_tensor_arg(),
        qc.into_tensor_arg(),
        cube(k_out.clone()).into_tensor_arg(),
        t as u32,
        wq as u32,
        wk as u32,
        hd as u32,
        interleaved,
    );
    (q_out, k_out)
}

/// `act(gate) * up`, SiLU or GELU (tanh form): one dispatch.
pub fn glu(gate: Tensor<2>, up: Tensor<2>, gelu: bool) -> Tensor<2> {
    let [t, w] = gate.dims();
    let device = gate.device();
    let out = Tensor::<2>::empty([t, w], &device);
    let oc = cube(out.clone());
    let client = oc.client.clone();
    let units = (t * w) as u32;
    glu_kernel::launch(
        &client,
        grid(units.div_ceil(WORKGROUP)),
        CubeDim::new_1d(WORKGROUP),
        cube(gate).into_tensor_arg(),
        cube(up).into_tensor_arg(),
        oc.into_tensor_arg(),
        t as u32,
        w as u32,
        gelu,
    );
    out
}

/// One decode query against its KV cache: row `row` of `q` (`[tokens, nq * hd]`) attends to
/// positions `lo..s` of `k`, `v` (`[nkv, capacity, hd]`), query head `h` reading KV head
/// `kv_of[h]`; the result goes to row `row` of `out`. One dispatch, a workgroup per query
/// head; the cache is read in place.
#[allow(clippy::too_many_arguments)]
pub fn attend_one(
    q: &Tensor<2>,
    row: usize,
    k: &Tensor<3>,
    v: &Tensor<3>,
    kv_of: &Tensor<1, Int>,
    lo: usize,
    s: usize,
    scale: f32,
    out: &Tensor<2>,
) {
    let nq = kv_of.dims()[0];
    let hd = k.dims()[2];
    let device = q.device();
    // The scores of each head, and then their exponentials.
    let scratch = Tensor::<2>::empty([nq, s.max(1)], &device);
    let oc = cube(out.clone());
    let client = oc.client.clone();
    attend_one_kernel::launch(
        &client,
        grid(nq as u32),
        CubeDim::new_1d(ROW_GROUP as u32),
        cube(q.clone()).into_tensor_arg(),
        cube(k.clone()).into_tensor_arg(),
        cube(v.clone()).into_tensor_arg(),
        cube_int(kv_of).into_tensor_arg(),
        cube(scratch).into_tensor_arg(),
        oc.into_tensor_arg(),
        nq as u32,
        row as u32,
        lo as u32,
        s as u32,
        hd as u32,
        scale,
        ROW_GROUP,
    );
}

/// Each row's largest logit that is not NaN and its index (the lower index among equals, and
/// -0.0 below +0.0, as `f32::total_cmp` orders them), or None for a row of NaNs: one dispatch
/// and a readback of 8 bytes a row, where the logits themselves would be the vocabulary slice.
pub fn argmax_rows(logits: Tensor<2>) -> Vec<Option<(u32, f32)>> {
    let [rows, width] = logits.dims();
    let device = logits.device();
    let out = Tensor::<1, Int>::empty([2 * rows], (&device, DType::U32));
    let oc = cube_int(&out);
    let client = oc.client.clone();
    argmax_rows_kernel::launch(
        &client,
        grid(rows as u32),
        CubeDim::new_1d(ROW_GROUP as u32),
        cube(logits).into_tensor_arg(),
        oc.into_tensor_arg(),
        rows as u32,
        width as u32,
        ROW_GROUP,
    );
    let words: Vec<u32> = out
        .into_data()
        .convert::<u32>()
        .try_into_vec()
        .expect("u32 words");
    words
        .chunks_exact(2)
        .map(|p| (p[0] != u32::MAX).then(|| (p[0], f32::from_bits(p[1]))))
        .collect()
}

/// Kernel launches issued by this process while `f` runs (every device, every thread), by
/// kernel name, most launched first; and what `f` returned.
pub fn count_launches<R>(f: impl FnOnce() -> R) -> (R, Vec<(&'static str, u64)>) {
    use cubecl::logging::{LaunchObservation, LaunchObserver};
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    #[derive(Default)]
    struct Count(Mutex<HashMap<&'static str, u64>>);
    impl LaunchObserver for Count {
        fn launched(&self, kernel: &'static str) {
            *self
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(kernel)
                .or_default() += 1;
        }
    }
    let c = Arc::new(Count::default());
    let watching = LaunchObservation::new(c.clone());
    let r = f();
    drop(watching);
    let mut by: Vec<(&'static str, u64)> =
        c.0.lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
    by.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    (r, by)
}

/// Probes of this adapter's speed, for `tessera bench --kernels` (the engine does not use them).
pub mod probe {
    use super::{GpuMatrix, rms_norm};
    use crate::error::Result;
    use crate::weights::RawTensor;
    use burn::tensor::{Device, Tensor, TensorData};
    use std::time::Instant;
    use tessera_quant::GgmlType;

    /// Seconds per decode product (one activation row) of a `rows x cols` matrix of `ty`
    /// blocks (`bytes`, the file's layout, `rows >= cols`): `copies` uploads of it are taken in
    /// turn, so that none is still in the GPU's cache when its turn comes again, each product's
    /// input the RMSNorm of the last one's first `cols` outputs (as a decode step chains its
    /// layers: one readback at the end then waits for every product, and the time includes
    /// that small launch); after a warm-up round, as many products as take about `seconds`.
    pub fn matvec_seconds(
        ty: GgmlType,
        (rows, cols): (usize, usize),
        bytes: &[u8],
        copies: usize,
        seconds: f64,
        device: &Device,
    ) -> Result<f64> {
        if rows < cols {
            return Err(crate::error::ModelError::Backend(format!(
                "the probe chains products: {rows} rows must be at least the {cols} columns"
            )));
        }
        let raw = RawTensor::whole(ty, rows, cols, bytes.to_vec());
        let ms = (0..copies.max(1))
            .map(|_| GpuMatrix::upload(&raw, device))
            .collect::<Result<Vec<_>>>()?;
        let x: Vec<f32> = (0..cols)
            .map(|i| ((i * 7919) % 1009) as f32 / 504.5 - 1.0)
            .collect();
        let norm = Tensor::<2>::ones([1, cols], device);
        let mut x = Tensor::<2>::from_data(TensorData::new(x, [1, cols]), device);
        let mut run = |k: usize| {
            for i in 0..k {
                let y = ms[i % ms.len()].forward(x.clone());
                x = rms_norm(y.slice([0..1, 0..cols]), &norm, 1e-5);
            }
            x.clone().try_into_data().map_err(|e| {
                crate::error::ModelError::Backend(format!("the probe's products failed: {e:?}"))
            })
        };
        run(ms.len())?;
        let t = Instant::now();
        run(ms.len())?;
        let each = t.elapsed().as_secs_f64() / ms.len() as f64;
        let iters = ((seconds / each) as usize).clamp(ms.len(), 100 * ms.len());
        let t = Instant::now();
        run(iters)?;
        Ok(t.elapsed().as_secs_f64() / iters as f64)
    }

    /// The fixed costs a decode step pays on this adapter and driver: seconds per launch of a
    /// one-workgroup kernel (RMSNorm of a 64-wide row) queued `n` times back to back, each on
    /// the last one's output, and seconds per synchronous round trip (that launch and a
    /// readback of its 256 bytes), `n / 10` times.
    pub fn fixed_seconds(device: &Device, n: usize) -> (f64, f64) {
        let w = Tensor::<2>::ones([1, 64], device);
        let mut x = Tensor::<2>::ones([1, 64], device);
        x = rms_norm(x, &w, 1e-5);
        let _ = x.clone().into_data();
        let t = Instant::now();
        for _ in 0..n {
            x = rms_norm(x, &w, 1e-5);
        }
        let _ = x.clone().into_data();
        let launch = t.elapsed().as_secs_f64() / n as f64;
        let m = (n / 10).max(1);
        let t = Instant::now();
        for _ in 0..m {
            x = rms_norm(x, &w, 1e-5);
            let _ = x.clone().into_data();
        }
        (launch, t.elapsed().as_secs_f64() / m as f64)
    }
}

/// The CubeCL kernels (in a module of their own: CubeCL's `Tensor` is not Burn's).
mod kernels {
    use cubecl::prelude::*;
    use tessera_quant::GgmlType;

    /// Byte `off` of the packed words.
    #[cube]
    fn byte(w: &Tensor<u32>, off: u32) -> u32 {
        (w[(off / 4) as usize] >> ((off % 4) * 8)) & 0xFF
    }

    /// The IEEE half at byte `off`, as f32 (decoded by hand: WGSL may lack f16).
    #[cube]
    fn half(w: &Tensor<u32>, off: u32) -> f32 {
        let h = byte(w, off) | (byte(w, off + 1) << 8);
        let exp = (h >> 10) & 0x1F;
        let mant = h & 0x3FF;
        let mut v = f32::reinterpret(((exp + 112) << 23) | (mant << 13));
        if exp == 0 {
            v = f32::cast_from(mant) * 0.000000059604645;
        }
        if exp == 31 {
            v = f32::reinterpret(0x7F80_0000u32 | (mant << 13));
        }
        if (h >> 15) == 1 {
            v = -v;
        }
        v
    }

    /// A byte as a signed value.
    #[cube]
    fn signed(b: u32) -> f32 {
        let mut v = f32::cast_from(b);
        if b >= 128 {
            v -= 256.0;
        }
        v
    }

    /// Nibble `i` (0..32) of 16 bytes of nibbles at `off`: the low nibbles, then the high ones.
    #[cube]
    fn nibble(w: &Tensor<u32>, off: u32, i: u32) -> u32 {
        let b = byte(w, off + (i % 16));
        if i < 16 { b & 0xF } else { b >> 4 }
    }

    /// Bytes of a block of GGML type id `fmt` on the GPU (see [`super::body_bytes`]).
    fn body_bytes(fmt: u32) -> u32 {
        super::body_bytes(GgmlType::from_id(fmt).expect("a GGML type id")) as u32
    }

    /// Whether GGML type id `fmt` stores values one by one (F32, F16, BF16).
    fn dense(fmt: u32) -> bool {
        GgmlType::from_id(fmt).is_some_and(|t| t.is_dense())
    }

    /// The moved-out scale of the block whose body starts at byte `b` (bodies of `body`
    /// bytes, from the part's first row on).
    #[cube]
    fn scale(sc: &Tensor<u32>, b: u32, #[comptime] body: u32) -> f32 {
        half(sc, 2 * (b / body))
    }

    /// Value `k` of the row whose bytes start at `row`, for GGML type `fmt`.
    #[cube]
    #[allow(unused_assignments)]
    fn value(
        w: &Tensor<u32>,
        sc: &Tensor<u32>,
        table: &Tensor<f32>,
        row: u32,
        k: u32,
        #[comptime] fmt: u32,
    ) -> f32 {
        let mut v = 0.0f32;
        if comptime!(fmt == 0) {
            // F32
            v = f32::reinterpret(
                byte(w, row + 4 * k)
                    | (byte(w, row + 4 * k + 1) << 8)
                    | (byte(w, row + 4 * k + 2) << 16)
                    | (byte(w, row + 4 * k + 3) << 24),
            );
        } else if comptime!(fmt == 1) {
            // F16
            v = half(w, row + 2 * k);
        } else if comptime!(fmt == 30) {
            // BF16
            v = f32::reinterpret((byte(w, row + 2 * k) | (byte(w, row + 2 * k + 1) << 8)) << 16);
        } else if comptime!(fmt == 2 || fmt == 3 || fmt == 6 || fmt == 7 || fmt == 8 || fmt == 20) {
            // 32-value blocks
            let bytes = comptime!(body_bytes(fmt));
            let b = row + (k / 32) * bytes;
            let i = k % 32;
            if comptime!(fmt == 2) {
                v = scale(sc, b, bytes) * (f32::cast_from(nibble(w, b, i)) - 8.0);
            } else if comptime!(fmt == 3) {
                v = half(w, b) * f32::cast_from(nibble(w, b + 4, i)) + half(w, b + 2);
            } else if comptime!(fmt == 6) {
                let hb = (byte(w, b + i / 8) >> (i % 8)) & 1;
                v = scale(sc, b, bytes) * (f32::cast_from(nibble(w, b + 4, i) | (hb << 4)) - 16.0);
            } else if comptime!(fmt == 7) {
                let hb = (byte(w, b + 4 + i / 8) >> (i % 8)) & 1;
                v = half(w, b) * f32::cast_from(nibble(w, b + 8, i) | (hb << 4)) + half(w, b + 2);
            } else if comptime!(fmt == 8) {
                v = scale(sc, b, bytes) * signed(byte(w, b + i));
            } else {
                v = scale(sc, b, bytes) * table[nibble(w, b, i) as usize];
            }
        } else {
            // 256-value super-blocks, in chunks of 32.
            let bytes = comptime!(body_bytes(fmt));
            let b = row + (k / 256) * bytes;
            let c = (k % 256) / 32;
            let i = k % 32;
            if comptime!(fmt == 10) {
                // Q2_K: scales[16] qs[64] d dmin
                let q = (byte(w, b + 16 + 32 * (c / 4) + i) >> (2 * (c % 4))) & 3;
                let sc = byte(w, b + 2 * c + i / 16);
                v = half(w, b + 80) * f32::cast_from(sc & 0xF) * f32::cast_from(q)
                    - half(w, b + 82) * f32::cast_from(sc >> 4);
            } else if comptime!(fmt == 11) {
                // Q3_K: hmask[32] qs[64] scales[12] (d moved out)
                let is = 2 * c + i / 16;
                let low = byte(w, b + 96 + is % 8);
                let mut lo4 = low & 0xF;
                if is >= 8 {
                    lo4 = low >> 4;
                }
                let hi2 = (byte(w, b + 96 + 8 + is % 4) >> (2 * (is / 4))) & 3;
                let s = f32::cast_from(lo4 | (hi2 << 4)) - 32.0;
                let q = (byte(w, b + 32 + 32 * (c / 4) + i) >> (2 * (c % 4))) & 3;
                let hbit = (byte(w, b + i) >> (4 * (c / 4) + c % 4)) & 1;
                v = scale(sc, b, bytes)
                    * s
                    * (f32::cast_from(q) - 4.0 + 4.0 * f32::cast_from(hbit));
            } else if comptime!(fmt == 12 || fmt == 13) {
                // Q4_K / Q5_K: d dmin scales[12] (qh[32]) qs[128]
                let (s6, m6) = k_scale_min(w, b, c);
                let qs = comptime!(if fmt == 13 { 48u32 } else { 16u32 });
                let qb = byte(w, b + qs + 32 * (c / 2) + i);
                let mut q = qb & 0xF;
                if c % 2 == 1 {
                    q = qb >> 4;
                }
                if comptime!(fmt == 13) {
                    q += ((byte(w, b + 16 + i) >> c) & 1) << 4;
                }
                v = half(w, b) * s6 * f32::cast_from(q) - half(w, b + 2) * m6;
            } else if comptime!(fmt == 14) {
                // Q6_K: ql[128] qh[64] scales[16] (d moved out)
                let hf = c / 4;
                let quarter = c % 4;
                let ql = byte(w, b + 64 * hf + 32 * (quarter % 2) + i);
                let mut lo = ql & 0xF;
                if quarter >= 2 {
                    lo = ql >> 4;
                }
                let hi = (byte(w, b + 128 + 32 * hf + i) >> (2 * quarter)) & 3;
                let s = signed(byte(w, b + 192 + 2 * c + i / 16));
                v = scale(sc, b, bytes) * s * (f32::cast_from(lo | (hi << 4)) - 32.0);
            } else {
                // IQ4_XS: d scales_h scales_l[4] qs[128]
                let scales_h = byte(w, b + 2) | (byte(w, b + 3) << 8);
                let ls = ((byte(w, b + 4 + c / 2) >> (4 * (c % 2))) & 0xF)
                    | (((scales_h >> (2 * c)) & 3) << 4);
                let dl = half(w, b) * (f32::cast_from(ls) - 32.0);
                v = dl * table[nibble(w, b + 8 + 16 * c, i) as usize];
            }
        }
        v
    }

    /// The 6-bit scale and minimum of chunk `c` of a Q4_K / Q5_K super-block at byte `b`.
    #[cube]
    fn k_scale_min(w: &Tensor<u32>, b: u32, c: u32) -> (f32, f32) {
        let s = b + 4;
        let mut sc = byte(w, s + c) & 63;
        let mut m = byte(w, s + c + 4) & 63;
        if c >= 4 {
            sc = (byte(w, s + c + 4) & 0xF) | ((byte(w, s + c - 4) >> 6) << 4);
            m = (byte(w, s + c + 4) >> 4) | ((byte(w, s + c) >> 6) << 4);
        }
        (f32::cast_from(sc), f32::cast_from(m))
    }

    /// Σ_i q_i · x[xo + i·xs] and Σ_i x[xo + i·xs] over a 32-value chunk whose nibbles fill
    /// the 4 words from word `wo` (value i in byte i % 16, the low nibbles first, as ggml packs
    /// it): the two sums every 4-bit format's chunk needs. `kind` 0: q is the nibble; 1: the
    /// nibble and bit i of `qh` as a fifth bit (Q5_0, Q5_1); 2: the code book's value for the
    /// nibble (IQ4_NL).
    #[cube]
    #[allow(clippy::too_many_arguments)]
    fn nibbles_dot(
        w: &Tensor<u32>,
        table: &Tensor<f32>,
        wo: u32,
        qh: u32,
        x: &Tensor<f32>,
        xo: usize,
        xs: usize,
        #[comptime] kind: u32,
    ) -> (f32, f32) {
        let mut sq = 0.0f32;
        let mut sx = 0.0f32;
        #[unroll]
        for j in 0..4u32 {
            let q = w[(wo + j) as usize];
            #[unroll]
            for e in 0..4u32 {
                let by = (q >> (8 * e)) & 0xFF;
                let i = 4 * j + e;
                let lo = x[xo + (i as usize) * xs];
                let hi = x[xo + ((16 + i) as usize) * xs];
                let mut ql = by & 0xF;
                let mut qu = by >> 4;
                if comptime!(kind == 1) {
                    ql |= ((qh >> i) & 1) << 4;
                    qu |= ((qh >> (16 + i)) & 1) << 4;
                }
                if comptime!(kind == 2) {
                    sq += table[ql as usize] * lo + table[qu as usize] * hi;
                } else {
                    sq += f32::cast_from(ql) * lo + f32::cast_from(qu) * hi;
                }
                sx += lo + hi;
            }
        }
        (sq, sx)
    }

    /// Chunk `c` (values `32c .. 32c + 32`) of the row whose bytes start at `row`, dotted
    /// with `x[xo + i·xs]`: the whole chunk from a few word loads and one scale, for the
    /// formats of real models; the others value by value.
    #[cube]
    #[allow(unused_assignments)]
    fn chunk_dot(
        w: &Tensor<u32>,
        sc: &Tensor<u32>,
        table: &Tensor<f32>,
        row: u32,
        c: u32,
        x: &Tensor<f32>,
        xo: usize,
        xs: usize,
        #[comptime] fmt: u32,
    ) -> f32 {
        let bytes = comptime!(body_bytes(fmt));
        let mut acc = 0.0f32;
        if comptime!(fmt == 2) {
            // Q4_0: d · (q - 8)
            let b = row + c * bytes;
            let (sq, sx) = nibbles_dot(w, table, b / 4, 0u32, x, xo, xs, 0u32);
            acc = scale(sc, b, bytes) * (sq - 8.0 * sx);
        } else if comptime!(fmt == 20) {
            // IQ4_NL: d · book[q]
            let b = row + c * bytes;
            let (sq, _sx) = nibbles_dot(w, table, b / 4, 0u32, x, xo, xs, 2u32);
            acc = scale(sc, b, bytes) * sq;
        } else if comptime!(fmt == 3) {
            // Q4_1: d · q + m
            let b = row + c * bytes;
            let (sq, sx) = nibbles_dot(w, table, b / 4 + 1, 0u32, x, xo, xs, 0u32);
            acc = half(w, b) * sq + half(w, b + 2) * sx;
        } else if comptime!(fmt == 6) {
            // Q5_0: d · (q - 16), the fifth bits in the block's first word
            let b = row + c * bytes;
            let qh = w[(b / 4) as usize];
            let (sq, sx) = nibbles_dot(w, table, b / 4 + 1, qh, x, xo, xs, 1u32);
            acc = scale(sc, b, bytes) * (sq - 16.0 * sx);
        } else if comptime!(fmt == 7) {
            // Q5_1: d · q + m, the fifth bits after d and m
            let b = row + c * bytes;
            let qh = w[(b / 4 + 1) as usize];
            let (sq, sx) = nibbles_dot(w, table, b / 4 + 2, qh, x, xo, xs, 1u32);
            acc = half(w, b) * sq + half(w, b + 2) * sx;
        } else if comptime!(fmt == 8) {
            // Q8_0: d · q
            let b = row + c * bytes;
            let mut s = 0.0f32;
            #[unroll]
            for j in 0..8u32 {
                let q = w[(b / 4 + j) as usize];
                #[unroll]
                for e in 0..4u32 {
                    s += signed((q >> (8 * e)) & 0xFF) * x[xo + ((4 * j + e) as usize) * xs];
                }
            }
            acc = scale(sc, b, bytes) * s;
        } else if comptime!(fmt == 12 || fmt == 13) {
            // Q4_K / Q5_K: d · sc · q - dmin · m, chunk c % 8 of super-block c / 8; Q5_K's
            // fifth bit is bit `cc` of each qh byte
            let b = row + (c / 8) * bytes;
            let cc = c % 8;
            let (s6, m6) = k_scale_min(w, b, cc);
            let qs = comptime!(if fmt == 13 { 48u32 } else { 16u32 });
            let wo = (b + qs + 32 * (cc / 2)) / 4;
            let ho = (b + 16) / 4;
            let shift = 4 * (cc % 2);
            let mut sq = 0.0f32;
            let mut sx = 0.0f32;
            #[unroll]
            for j in 0..8u32 {
                let q = w[(wo + j) as usize] >> shift;
                let mut h = 0u32;
                if comptime!(fmt == 13) {
                    h = w[(ho + j) as usize] >> cc;
                }
                #[unroll]
                for e in 0..4u32 {
                    let xv = x[xo + ((4 * j + e) as usize) * xs];
                    let mut v = (q >> (8 * e)) & 0xF;
                    if comptime!(fmt == 13) {
                        v |= ((h >> (8 * e)) & 1) << 4;
                    }
                    sq += f32::cast_from(v) * xv;
                    sx += xv;
                }
            }
            acc = half(w, b) * s6 * sq - half(w, b + 2) * m6 * sx;
        } else if comptime!(fmt == 14) {
            // Q6_K: d · sc · (q - 32), a scale per 16 values
            let b = row + (c / 8) * bytes;
            let cc = c % 8;
            let hf = cc / 4;
            let quarter = cc % 4;
            let lo_wo = (b + 64 * hf + 32 * (quarter % 2)) / 4;
            let hi_wo = (b + 128 + 32 * hf) / 4;
            let lo_shift = 4 * (quarter / 2);
            let hi_shift = 2 * quarter;
            let mut s0 = 0.0f32;
            let mut s1 = 0.0f32;
            #[unroll]
            for j in 0..8u32 {
                let ql = w[(lo_wo + j) as usize] >> lo_shift;
                let qh = w[(hi_wo + j) as usize] >> hi_shift;
                let mut s = 0.0f32;
                #[unroll]
                for e in 0..4u32 {
                    let q = ((ql >> (8 * e)) & 0xF) | (((qh >> (8 * e)) & 3) << 4);
                    s += (f32::cast_from(q) - 32.0) * x[xo + ((4 * j + e) as usize) * xs];
                }
                if j < 4 {
                    s0 += s;
                } else {
                    s1 += s;
                }
            }
            let s_lo = signed(byte(w, b + 192 + 2 * cc));
            let s_hi = signed(byte(w, b + 192 + 2 * cc + 1));
            acc = scale(sc, b, bytes) * (s_lo * s0 + s_hi * s1);
        } else {
            let base = c * 32;
            for i in 0..32u32 {
                acc += value(w, sc, table, row, base + i, fmt) * x[xo + (i as usize) * xs];
            }
        }
        acc
    }

    /// `out[b][first + r] = Σ_k x[b][k] · W[r][k]` (W one part of the matrix), one unit per
    /// output value, a 32-value chunk at a time (dense rows value by value).
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn qmatmul_kernel(
        w: &Tensor<u32>,
        sc: &Tensor<u32>,
        table: &Tensor<f32>,
        x: &Tensor<f32>,
        out: &mut Tensor<f32>,
        first: u32,
        rows: u32,
        cols: u32,
        row_bytes: u32,
        n: u32,
        #[comptime] fmt: u32,
    ) {
        let pos = ABSOLUTE_POS as u32;
        if pos >= rows * n {
            terminate!();
        }
        let b = (pos / rows) as usize;
        let r = pos % rows;
        let row = r * row_bytes;
        let (xs0, xs1) = (x.stride(0), x.stride(1));
        let mut acc = 0.0f32;
        if comptime!(dense(fmt)) {
            for k in 0..cols {
                acc += value(w, sc, table, row, k, fmt) * x[b * xs0 + (k as usize) * xs1];
            }
        } else {
            for c in 0..cols / 32 {
                acc += chunk_dot(
                    w,
                    sc,
                    table,
                    row,
                    c,
                    x,
                    b * xs0 + ((32 * c) as usize) * xs1,
                    xs1,
                    fmt,
                );
            }
        }
        let at = b * out.stride(0) + ((first + r) as usize) * out.stride(1);
        out[at] = acc;
    }

    /// `out[t][k] = W[ids[t]][k]`, one unit per output value.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn dequant_rows_kernel(
        w: &Tensor<u32>,
        sc: &Tensor<u32>,
        table: &Tensor<f32>,
        ids: &Tensor<u32>,
        out: &mut Tensor<f32>,
        first: u32,
        rows: u32,
        cols: u32,
        row_bytes: u32,
        t: u32,
        #[comptime] fmt: u32,
    ) {
        let pos = ABSOLUTE_POS as u32;
        if pos >= t * cols {
            terminate!();
        }
        let t_i = (pos / cols) as usize;
        let k = pos % cols;
        let r = ids[t_i];
        // Only the rows of this part.
        if r >= first && r < first + rows {
            let at = t_i * out.stride(0) + (k as usize) * out.stride(1);
            out[at] = value(w, sc, table, (r - first) * row_bytes, k, fmt);
        }
    }

    /// `out[b][first + r] = Σ_k x[b][k] · W[r][k]` for the few rows `b` of `x`, by `lanes`
    /// units of the workgroup (`lane` is this unit's place among them; the workgroup holds
    /// `CUBE_DIM_X / lanes` such rows): each takes the row's 32-value chunks `lane, lane +
    /// lanes, ...` (neighbouring units read neighbouring blocks, a word at a time; dense rows
    /// go value by value), and their sums meet in shared memory. Every unit of the workgroup
    /// comes here, `active` or not (a row past the last), for the barriers.
    #[cube]
    #[allow(clippy::too_many_arguments)]
    fn matvec_row(
        w: &Tensor<u32>,
        sc: &Tensor<u32>,
        table: &Tensor<f32>,
        x: &Tensor<f32>,
        out: &mut Tensor<f32>,
        sums: &mut Shared<[f32]>,
        r: u32,
        active: bool,
        first: u32,
        cols: u32,
        row_bytes: u32,
        n: u32,
        lanes: u32,
        #[comptime] fmt: u32,
    ) {
        let lane = UNIT_POS_X % lanes;
        let base = UNIT_POS_X - lane;
        let row = r * row_bytes;
        let (xs0, xs1) = (x.stride(0), x.stride(1));
        for b in 0..n {
            let mut acc = 0.0f32;
            if active {
                if comptime!(dense(fmt)) {
                    let mut k = lane;
                    while k < cols {
                        acc += value(w, sc, table, row, k, fmt)
                            * x[(b as usize) * xs0 + (k as usize) * xs1];
                        k += lanes;
                    }
                } else {
                    let mut c = lane;
                    while c < cols / 32 {
                        let xo = (b as usize) * xs0 + ((32 * c) as usize) * xs1;
                        acc += chunk_dot(w, sc, table, row, c, x, xo, xs1, fmt);
                        c += lanes;
                    }
                }
            }
            sums[UNIT_POS_X as usize] = acc;
            sync_cube();
            let mut half = lanes / 2;
            while half > 0 {
                if lane < half {
                    sums[UNIT_POS_X as usize] += sums[(UNIT_POS_X + half) as usize];
                }
                sync_cube();
                half /= 2;
            }
            if active && lane == 0 {
                let at = (b as usize) * out.stride(0) + ((first + r) as usize) * out.stride(1);
                out[at] = sums[base as usize];
            }
            sync_cube();
        }
    }

    /// A mat-vec for a few rows of `x`: `CUBE_DIM_X / lanes` output rows a workgroup (see
    /// [`matvec_row`]).
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn qmatvec_kernel(
        w: &Tensor<u32>,
        sc: &Tensor<u32>,
        table: &Tensor<f32>,
        x: &Tensor<f32>,
        out: &mut Tensor<f32>,
        first: u32,
        rows: u32,
        cols: u32,
        row_bytes: u32,
        n: u32,
        lanes: u32,
        #[comptime] fmt: u32,
        #[comptime] group: usize,
    ) {
        let r = (CUBE_POS as u32) * (CUBE_DIM_X / lanes) + UNIT_POS_X / lanes;
        let mut sums = Shared::<[f32]>::new_slice(group);
        matvec_row(
            w,
            sc,
            table,
            x,
            out,
            &mut sums,
            r,
            r < rows,
            first,
            cols,
            row_bytes,
            n,
            lanes,
            fmt,
        );
    }

    /// Three mat-vecs of the same rows of `x` in one launch (Q, K and V; gate and up, with an
    /// empty third): the first `groups0` workgroups take matrix 0, the next `groups1` matrix
    /// 1, the rest matrix 2, each in its own format.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn qmatvec3_kernel(
        w0: &Tensor<u32>,
        s0: &Tensor<u32>,
        w1: &Tensor<u32>,
        s1: &Tensor<u32>,
        w2: &Tensor<u32>,
        s2: &Tensor<u32>,
        table: &Tensor<f32>,
        x: &Tensor<f32>,
        o0: &mut Tensor<f32>,
        o1: &mut Tensor<f32>,
        o2: &mut Tensor<f32>,
        rows0: u32,
        rows1: u32,
        rows2: u32,
        cols: u32,
        rb0: u32,
        rb1: u32,
        rb2: u32,
        n: u32,
        lanes: u32,
        #[comptime] f0: u32,
        #[comptime] f1: u32,
        #[comptime] f2: u32,
        #[comptime] group: usize,
    ) {
        let per = CUBE_DIM_X / lanes;
        let (g0, g1) = (rows0.div_ceil(per), rows1.div_ceil(per));
        let cube = CUBE_POS as u32;
        let at = UNIT_POS_X / lanes;
        let mut sums = Shared::<[f32]>::new_slice(group);
        // The branch is the workgroup's: its barriers are every unit's.
        if cube < g0 {
            let r = cube * per + at;
            matvec_row(
                w0,
                s0,
                table,
                x,
                o0,
                &mut sums,
                r,
                r < rows0,
                0,
                cols,
                rb0,
                n,
                lanes,
                f0,
            );
        } else if cube < g0 + g1 {
            let r = (cube - g0) * per + at;
            matvec_row(
                w1,
                s1,
                table,
                x,
                o1,
                &mut sums,
                r,
                r < rows1,
                0,
                cols,
                rb1,
                n,
                lanes,
                f1,
            );
        } else {
            let r = (cube - g0 - g1) * per + at;
            matvec_row(
                w2,
                s2,
                table,
                x,
                o2,
                &mut sums,
                r,
                r < rows2,
                0,
                cols,
                rb2,
                n,
                lanes,
                f2,
            );
        }
    }

    /// The units' values of `sums` added up (`CUBE_DIM_X` of them, a power of two), in a tree
    /// through shared memory; every unit returns the total.
    #[cube]
    fn group_sum(sums: &mut Shared<[f32]>, u: u32) -> f32 {
        sync_cube();
        let mut half = CUBE_DIM_X / 2;
        while half > 0 {
            if u < half {
                sums[u as usize] += sums[(u + half) as usize];
            }
            sync_cube();
            half /= 2;
        }
        sums[0]
    }

    /// RMSNorm of row `CUBE_POS` times `w`: of `x`, or with `add` of `sum = x + y` (the
    /// residual add), which is written too.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn norm_kernel(
        x: &Tensor<f32>,
        y: &Tensor<f32>,
        w: &Tensor<f32>,
        sum: &mut Tensor<f32>,
        out: &mut Tensor<f32>,
        rows: u32,
        width: u32,
        eps: f32,
        #[comptime] add: bool,
        #[comptime] group: usize,
    ) {
        if CUBE_POS as u32 >= rows {
            terminate!();
        }
        let r = CUBE_POS;
        let u = UNIT_POS_X;
        let g = CUBE_DIM_X;
        let (xs0, xs1) = (x.stride(0), x.stride(1));
        let (ys0, ys1) = (y.stride(0), y.stride(1));
        let (ss0, ss1) = (sum.stride(0), sum.stride(1));
        let ws = w.stride(1);
        let mut sums = Shared::<[f32]>::new_slice(group);
        let mut acc = 0.0f32;
        let mut k = u;
        while k < width {
            let mut a = x[r * xs0 + (k as usize) * xs1];
            if add {
                a += y[r * ys0 + (k as usize) * ys1];
                sum[r * ss0 + (k as usize) * ss1] = a;
            }
            acc += a * a;
            k += g;
        }
        sums[u as usize] = acc;
        let total = group_sum(&mut sums, u);
        let inv = 1.0f32 / (total / f32::cast_from(width) + eps).sqrt();
        let mut k = u;
        while k < width {
            // Each unit reads back only the values it wrote itself.
            let mut a = x[r * xs0 + (k as usize) * xs1];
            if add {
                a = sum[r * ss0 + (k as usize) * ss1];
            }
            let at = r * out.stride(0) + (k as usize) * out.stride(1);
            out[at] = a * inv * w[(k as usize) * ws];
            k += g;
        }
    }

    /// One new position of K and V into their caches, one unit per value of the position.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn kv_write_kernel(
        k: &Tensor<f32>,
        v: &Tensor<f32>,
        ck: &mut Tensor<f32>,
        cv: &mut Tensor<f32>,
        row: u32,
        at: u32,
        units: u32,
        hd: u32,
    ) {
        let pos = ABSOLUTE_POS as u32;
        if pos >= units {
            terminate!();
        }
        let h = (pos / hd) as usize;
        let d = (pos % hd) as usize;
        let src = (row as usize) * k.stride(0) + (pos as usize) * k.stride(1);
        let srcv = (row as usize) * v.stride(0) + (pos as usize) * v.stride(1);
        let dk = h * ck.stride(0) + (at as usize) * ck.stride(1) + d * ck.stride(2);
        let dv = h * cv.stride(0) + (at as usize) * cv.stride(1) + d * cv.stride(2);
        ck[dk] = k[src];
        cv[dv] = v[srcv];
    }

    /// Value `c` of row `i` of `x` turned: `x·cos + rotate(x)·sin`, where rotate pairs each
    /// value with its partner (the other half of the head, or the other value of its pair when
    /// interleaved) and negates the first of the two.
    #[cube]
    #[allow(clippy::too_many_arguments)]
    fn rotate(
        x: &Tensor<f32>,
        cos: &Tensor<f32>,
        sin: &Tensor<f32>,
        out: &mut Tensor<f32>,
        i: u32,
        c: u32,
        hd: u32,
        #[comptime] interleaved: bool,
    ) {
        let d = c % hd;
        let head = c - d;
        // The partner's offset from `d`, and whether `d` is the first of the two.
        let mut first = d < hd / 2;
        let mut step = hd / 2;
        if interleaved {
            first = (d & 1) == 0;
            step = 1;
        }
        let mut partner = d + step;
        if !first {
            partner = d - step;
        }
        let (xs0, xs1) = (x.stride(0), x.stride(1));
        let row = (i as usize) * xs0;
        let a = x[row + (c as usize) * xs1];
        let mut b = x[row + ((head + partner) as usize) * xs1];
        if first {
            b = -b;
        }
        let tab = (i as usize) * cos.stride(1) + (d as usize) * cos.stride(2);
        let tab_s = (i as usize) * sin.stride(1) + (d as usize) * sin.stride(2);
        let at = (i as usize) * out.stride(0) + (c as usize) * out.stride(1);
        out[at] = a * cos[tab] + b * sin[tab_s];
    }

    /// Rotary embedding of Q (`[t, wq]`) and K (`[t, wk]`) together, one unit per value.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn rope_kernel(
        q: &Tensor<f32>,
        k: &Tensor<f32>,
        cos: &Tensor<f32>,
        sin: &Tensor<f32>,
        q_out: &mut Tensor<f32>,
        k_out: &mut Tensor<f32>,
        t: u32,
        wq: u32,
        wk: u32,
        hd: u32,
        #[comptime] interleaved: bool,
    ) {
        let pos = ABSOLUTE_POS as u32;
        if pos >= t * (wq + wk) {
            terminate!();
        }
        if pos < t * wq {
            rotate(q, cos, sin, q_out, pos / wq, pos % wq, hd, interleaved);
        } else {
            let p = pos - t * wq;
            rotate(k, cos, sin, k_out, p / wk, p % wk, hd, interleaved);
        }
    }

    /// `act(gate) · up`, one unit per value; GELU in its tanh form, with tanh written through
    /// `exp` so that large arguments give ±1, not NaN.
    #[cube(launch)]
    #[allow(unused_assignments)]
    pub(super) fn glu_kernel(
        gate: &Tensor<f32>,
        up: &Tensor<f32>,
        out: &mut Tensor<f32>,
        t: u32,
        width: u32,
        #[comptime] gelu: bool,
    ) {
        let pos = ABSOLUTE_POS as u32;
        if pos >= t * width {
            terminate!();
        }
        let i = (pos / width) as usize;
        let c = (pos % width) as usize;
        let g = gate[i * gate.stride(0) + c * gate.stride(1)];
        let u = up[i * up.stride(0) + c * up.stride(1)];
        let mut a = 0.0f32;
        if gelu {
            let y = 0.797_884_6f32 * (g + 0.044715f32 * g * g * g);
            let th = 1.0f32 - 2.0f32 / ((2.0f32 * y).exp() + 1.0f32);
            a = 0.5f32 * g * (1.0f32 + th);
        } else {
            a = g / (1.0f32 + (-g).exp());
        }
        let at = i * out.stride(0) + c * out.stride(1);
        out[at] = a * u;
    }

    /// One decode query head per workgroup (`CUBE_POS`): scores against positions `lo..s`
    /// of its KV head, their softmax, and the weighted sum of the values. The scores pass
    /// through `scratch` (`[heads, s]`); the units' maxima and sums through shared memory.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attend_one_kernel(
        q: &Tensor<f32>,
        k: &Tensor<f32>,
        v: &Tensor<f32>,
        kv_of: &Tensor<u32>,
        scratch: &mut Tensor<f32>,
        out: &mut Tensor<f32>,
        nq: u32,
        row: u32,
        lo: u32,
        s: u32,
        hd: u32,
        scale: f32,
        #[comptime] group: usize,
    ) {
        let h = CUBE_POS as u32;
        if h >= nq {
            terminate!();
        }
        let u = UNIT_POS_X;
        let g = CUBE_DIM_X;
        let kvh = kv_of[h as usize] as usize;
        let qb = (row as usize) * q.stride(0) + ((h * hd) as usize) * q.stride(1);
        let qs = q.stride(1);
        let (k0, k1, k2) = (k.stride(0), k.stride(1), k.stride(2));
        let (v0, v1, v2) = (v.stride(0), v.stride(1), v.stride(2));
        let sb = (h as usize) * scratch.stride(0);
        let mut red = Shared::<[f32]>::new_slice(group);
        // Scores, and this unit's largest.
        let mut m = f32::new(-3.0e38);
        let mut j = lo + u;
        while j < s {
            let mut dot = 0.0f32;
            for d in 0..hd {
                dot +=
                    q[qb + (d as usize) * qs] * k[kvh * k0 + (j as usize) * k1 + (d as usize) * k2];
            }
            let sc = dot * scale;
            scratch[sb + j as usize] = sc;
            if sc > m {
                m = sc;
            }
            j += g;
        }
        red[u as usize] = m;
        sync_cube();
        let mut half = CUBE_DIM_X / 2;
        while half > 0 {
            if u < half {
                let o = red[(u + half) as usize];
                if o > red[u as usize] {
                    red[u as usize] = o;
                }
            }
            sync_cube();
            half /= 2;
        }
        let mx = red[0];
        sync_cube();
        // Exponentials (each unit its own positions) and their sum.
        let mut sum = 0.0f32;
        let mut j = lo + u;
        while j < s {
            let e = (scratch[sb + j as usize] - mx).exp();
            scratch[sb + j as usize] = e;
            sum += e;
            j += g;
        }
        red[u as usize] = sum;
        sync_storage();
        let inv = 1.0f32 / group_sum(&mut red, u);
        // The weighted values, a unit per output value of the head.
        let mut d = u;
        while d < hd {
            let mut acc = 0.0f32;
            for j in lo..s {
                acc +=
                    scratch[sb + j as usize] * v[kvh * v0 + (j as usize) * v1 + (d as usize) * v2];
            }
            let at = (row as usize) * out.stride(0) + ((h * hd + d) as usize) * out.stride(1);
            out[at] = acc * inv;
            d += g;
        }
    }

    /// An order on f32 bits that agrees with `f32::total_cmp` (NaNs aside).
    #[cube]
    fn order_key(bits: u32) -> u32 {
        let mut k = bits | 0x8000_0000u32;
        if (bits >> 31) == 1 {
            k = !bits;
        }
        k
    }

    /// Row `CUBE_POS`'s best (index, logit bits) into `out[2r]`, `out[2r + 1]`: the largest
    /// by `order_key`, the lower index among equals, NaNs passed over; index `u32::MAX` when
    /// the row holds nothing else.
    #[cube(launch)]
    pub(super) fn argmax_rows_kernel(
        x: &Tensor<f32>,
        out: &mut Tensor<u32>,
        rows: u32,
        width: u32,
        #[comptime] group: usize,
    ) {
        let r = CUBE_POS as u32;
        if r >= rows {
            terminate!();
        }
        let u = UNIT_POS_X;
        let g = CUBE_DIM_X;
        let (xs0, xs1) = (x.stride(0), x.stride(1));
        let mut keys = Shared::<[u32]>::new_slice(group);
        let mut ids = Shared::<[u32]>::new_slice(group);
        let none = 0xFFFF_FFFFu32;
        let mut best_key = 0u32;
        let mut best = 0xFFFF_FFFFu32;
        let mut k = u;
        while k < width {
            let bits = u32::reinterpret(x[(r as usize) * xs0 + (k as usize) * xs1]);
            let nan = (bits & 0x7F80_0000u32) == 0x7F80_0000u32 && (bits & 0x007F_FFFFu32) != 0;
            let key = order_key(bits);
            // A unit meets its indices in increasing order: only a larger key wins.
            if !nan && (best == none || key > best_key) {
                best_key = key;
                best = k;
            }
            k += g;
        }
        keys[u as usize] = best_key;
        ids[u as usize] = best;
        sync_cube();
        let mut half = CUBE_DIM_X / 2;
        while half > 0 {
            if u < half {
                let (ok, oi) = (keys[(u + half) as usize], ids[(u + half) as usize]);
                let (mk, mi) = (keys[u as usize], ids[u as usize]);
                if oi != none && (mi == none || ok > mk || (ok == mk && oi < mi)) {
                    keys[u as usize] = ok;
                    ids[u as usize] = oi;
                }
            }
            sync_cube();
            half /= 2;
        }
        if u == 0 {
            let i = ids[0];
            out[(2 * r) as usize] = i;
            let mut bits = 0u32;
            if i != none {
                bits = u32::reinterpret(x[(r as usize) * xs0 + (i as usize) * xs1]);
            }
            out[(2 * r + 1) as usize] = bits;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Backend;
    use crate::sampling::{TopSpec, candidates};

    fn wgpu() -> Option<Device> {
        if std::env::var_os("TESSERA_SKIP_WGPU").is_some() {
            eprintln!("SKIPPED: TESSERA_SKIP_WGPU is set");
            return None;
        }
        Some(
            Backend::Wgpu
                .device()
                .expect("a wgpu adapter (lavapipe in CI)"),
        )
    }

    /// Rows of random blocks of `ty` (every value finite and of modest size, as the CPU
    /// decodes them): `rows x cols` values, the file's bytes and their values.
    fn random_rows(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
        let mut z = seed;
        let mut next = move || {
            z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            x ^ (x >> 31)
        };
        let (per, bb) = ty.block();
        let mut bytes = Vec::new();
        let mut values = Vec::new();
        let mut block = vec![0u8; bb];
        let mut vals = vec![0f32; per];
        for _ in 0..rows * cols / per {
            loop {
                block.iter_mut().for_each(|b| *b = next() as u8);
                tessera_quant::dequantize(ty, &block, &mut vals);
                if vals.iter().all(|v| v.is_finite() && v.abs() < 1e6) {
                    break;
                }
            }
            bytes.extend_from_slice(&block);
            values.extend_from_slice(&vals);
        }
        (bytes, values)
    }

    /// Every format's products on the GPU, decode rows (the block-wise mat-vec) and prompt
    /// rows (the per-value kernel), and its row lookup, equal the CPU's dequantized values'
    /// (to f32 rounding): the moved-out scales, the word reads and each format's chunk code.
    #[test]
    fn every_format_multiplies_as_the_cpu_decodes_it() {
        let Some(device) = wgpu() else { return };
        let (rows, cols) = (37usize, 512usize);
        for (s, ty) in tessera_quant::format::ALL_TYPES.into_iter().enumerate() {
            let (bytes, w) = random_rows(ty, rows, cols, 7 + s as u64);
            let raw = RawTensor::whole(ty, rows, cols, bytes);
            let m = GpuMatrix::upload(&raw, &device).expect("uploads");
            for n in [1usize, 3, MATVEC_ROWS + 3] {
                let x: Vec<f32> = (0..n * cols)
                    .map(|i| ((i * 7919 + s) % 1009) as f32 / 504.5 - 1.0)
                    .collect();
                let xt = Tensor::<2>::from_data(TensorData::new(x.clone(), [n, cols]), &device);
                let got: Vec<f32> = m.forward(xt).into_data().try_into_vec().expect("f32");
                for b in 0..n {
                    for r in 0..rows {
                        let (wr, xb) = (&w[r * cols..][..cols], &x[b * cols..][..cols]);
                        let want: f64 = wr.iter().zip(xb).map(|(a, c)| *a as f64 * *c as f64).sum();
                        let mass: f64 =
                            wr.iter().zip(xb).map(|(a, c)| (*a * *c).abs() as f64).sum();
                        let g = got[b * rows + r] as f64;
                        assert!(
                            (g - want).abs() <= 1e-5 * mass + 1e-6,
                            "{}: {n} rows, row {b}, output {r}: {g} against {want}",
                            ty.name()
                        );
                    }
                }
            }
            let ids = [0u32, 36, 5, 5];
            let got: Vec<f32> = m
                .rows(&ids, &device)
                .into_data()
                .try_into_vec()
                .expect("f32");
            for (t, &id) in ids.iter().enumerate() {
                let want = &w[id as usize * cols..][..cols];
                for (k, (g, v)) in got[t * cols..][..cols].iter().zip(want).enumerate() {
                    assert!(
                        (g - v).abs() <= 1e-6 * v.abs(),
                        "{}: row {id}, value {k}: {g} against {v}",
                        ty.name()
                    );
                }
            }
        }
    }

    /// More rows than a grid axis holds (65535 workgroups): every row is still normed, once.
    #[test]
    fn row_kernels_cover_more_rows_than_one_grid_axis() {
        let Some(device) = wgpu() else { return };
        let (rows, width) = (70_000usize, 8usize);
        let x: Vec<f32> = (0..rows * width)
            .map(|i| (i % 97) as f32 * 0.1 - 4.0)
            .collect();
        let w: Vec<f32> = (0..width).map(|i| 1.0 + i as f32 * 0.25).collect();
        let xt = Tensor::<2>::from_data(TensorData::new(x.clone(), [rows, width]), &device);
        let wt = Tensor::<2>::from_data(TensorData::new(w.clone(), [1, width]), &device);
        let got: Vec<f32> = rms_norm(xt, &wt, 1e-5)
            .into_data()
            .try_into_vec()
            .expect("f32");
        for (r, (row, out)) in x.chunks(width).zip(got.chunks(width)).enumerate() {
            let ms = row.iter().map(|v| v * v).sum::<f32>() / width as f32;
            let inv = 1.0 / (ms + 1e-5).sqrt();
            for k in 0..width {
                let want = row[k] * inv * w[k];
                assert!(
                    (out[k] - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "row {r}, {k}"
                );
            }
        }
    }

    /// The device's greedy pick is the host's `candidates` for a greedy spec, row by row:
    /// ties to the lower id (across units and within one), -0.0 below +0.0, NaNs passed over,
    /// -inf still a candidate, a row of NaNs giving nothing.
    #[test]
    fn argmax_on_the_device_equals_the_host_pick() {
        let Some(device) = wgpu() else { return };
        let width = 1000;
        let nan = f32::NAN;
        let mut rows: Vec<Vec<f32>> = Vec::new();
        let mut r = vec![0.0f32; width];
        r[7] = 3.0;
        r[900] = 3.0;
        r[64 + 7] = 3.0;
        rows.push(r);
        let mut r = vec![-1.0f32; width];
        r[3] = -0.0;
        r[2] = 0.0;
        r[500] = -0.0;
        rows.push(r);
        let mut r = vec![nan; width];
        r[999] = f32::NEG_INFINITY;
        r[998] = f32::NEG_INFINITY;
        rows.push(r);
        rows.push(vec![nan; width]);
        let mut r: Vec<f32> = (0..width)
            .map(|i| ((i * 7919) % 1013) as f32 * 0.01)
            .collect();
        r[0] = nan;
        r[1] = f32::INFINITY;
        r[640] = f32::INFINITY;
        rows.push(r);
        let spec = TopSpec {
            n: 1,
            temperature: 0.0,
            gumbel: None,
            mass: false,
            raw_lse: false,
        };
        let flat: Vec<f32> = rows.concat();
        let x = Tensor::<2>::from_data(TensorData::new(flat, [rows.len(), width]), &device);
        let got = argmax_rows(x);
        for (i, (row, g)) in rows.iter().zip(got).enumerate() {
            let want = candidates(row, &spec, 0).top;
            let g: Vec<(u32, f32)> = g.into_iter().collect();
            assert_eq!(
                g.iter().map(|x| (x.0, x.1.to_bits())).collect::<Vec<_>>(),
                want.iter()
                    .map(|x| (x.0, x.1.to_bits()))
                    .collect::<Vec<_>>(),
                "row {i}"
            );
        }
    }
}
