//! Weights on a GPU (wgpu through CubeCL), in the file's blocks: the bytes of every row go to
//! the GPU as they are stored (packed into `u32` words, since WGSL has no bytes), and one
//! CubeCL kernel per format dequantizes inside the matrix product, with f32 activations. So a
//! model takes its file's size on the GPU too. One unit computes one output value; the kernels
//! are written for correctness on every adapter (lavapipe included), their speed on real GPUs
//! is the GPU issue's work.

use crate::error::{ModelError, Result};
use crate::weights::RawTensor;
use burn::backend::Cube;
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::{CubeCount, CubeDim};
use kernels::{dequant_rows_kernel, qmatmul_kernel};
use tessera_quant::GgmlType;

/// Units per workgroup: a size every adapter accepts.
const WORKGROUP: u32 = 64;

/// A weight matrix on the GPU, in its stored format.
pub struct GpuMatrix {
    /// The stored rows' bytes as little-endian `u32` words (zero-padded to a whole word).
    words: Tensor<1, Int>,
    /// The IQ4 code book (16 values), read by the IQ4 kernels.
    table: Tensor<1>,
    ty: GgmlType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
}

fn cube<const D: usize>(t: Tensor<D>) -> CubeTensor {
    t.try_into_primitive::<Cube>()
        .expect("a tensor on a CubeCL device")
}

impl GpuMatrix {
    pub fn upload(raw: &RawTensor, device: &Device) -> Result<GpuMatrix> {
        let bytes = raw.data.as_slice();
        let mut words = vec![0u32; bytes.len().div_ceil(4).max(1)];
        for (w, c) in words.iter_mut().zip(bytes.chunks(4)) {
            let mut b = [0u8; 4];
            b[..c.len()].copy_from_slice(c);
            *w = u32::from_le_bytes(b);
        }
        if words.len() as u64 * 4 > u32::MAX as u64 {
            return Err(ModelError::Backend(format!(
                "a {} MB weight matrix is more than a GPU kernel can address (4 GB)",
                bytes.len() / 1_000_000
            )));
        }
        let n = words.len();
        let words = Tensor::<1, Int>::from_data(TensorData::new(words, [n]), (device, DType::U32));
        let table: Vec<f32> = tessera_quant::format::IQ4_VALUES
            .iter()
            .map(|&v| v as f32)
            .collect();
        Ok(GpuMatrix {
            words,
            table: Tensor::<1>::from_data(TensorData::new(table, [16]), device),
            ty: raw.ty,
            rows: raw.rows.len(),
            cols: raw.cols.len(),
            row_bytes: raw.row_bytes(),
        })
    }

    /// `x · Wᵀ` for `x` of `[n, cols]`: `[n, rows]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let [n, cols] = x.dims();
        debug_assert_eq!(cols, self.cols);
        let device = x.device();
        let out = Tensor::<2>::zeros([n, self.rows], &device);
        let (xc, oc) = (cube(x), cube(out.clone()));
        let w = self
            .words
            .clone()
            .try_into_primitive::<Cube>()
            .expect("GPU weights");
        let tc = cube(self.table.clone());
        let units = (n * self.rows) as u32;
        let client = oc.client.clone();
        qmatmul_kernel::launch(
            &client,
            CubeCount::Static(units.div_ceil(WORKGROUP), 1, 1),
            CubeDim::new_1d(WORKGROUP),
            w.into_tensor_arg(),
            tc.into_tensor_arg(),
            xc.into_tensor_arg(),
            oc.into_tensor_arg(),
            self.rows as u32,
            self.cols as u32,
            self.row_bytes as u32,
            n as u32,
            self.ty.id(),
        );
        out
    }

    /// Rows `ids` of the matrix, dequantized: `[ids, cols]` (an embedding lookup).
    pub fn rows(&self, ids: &[u32], device: &Device) -> Tensor<2> {
        let t = ids.len();
        let ids =
            Tensor::<1, Int>::from_data(TensorData::new(ids.to_vec(), [t]), (device, DType::U32));
        let out = Tensor::<2>::zeros([t, self.cols], device);
        let oc = cube(out.clone());
        let w = self
            .words
            .clone()
            .try_into_primitive::<Cube>()
            .expect("GPU weights");
        let ic = ids.try_into_primitive::<Cube>().expect("GPU ids");
        let tc = cube(self.table.clone());
        let units = (t * self.cols) as u32;
        let client = oc.client.clone();
        dequant_rows_kernel::launch(
            &client,
            CubeCount::Static(units.div_ceil(WORKGROUP), 1, 1),
            CubeDim::new_1d(WORKGROUP),
            w.into_tensor_arg(),
            tc.into_tensor_arg(),
            ic.into_tensor_arg(),
            oc.into_tensor_arg(),
            self.cols as u32,
            self.row_bytes as u32,
            t as u32,
            self.ty.id(),
        );
        out
    }
}

/// The CubeCL kernels (in a module of their own: CubeCL's `Tensor` is not Burn's).
mod kernels {
    use cubecl::prelude::*;

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

    /// Value `k` of the row whose bytes start at `row`, for GGML type `fmt`.
    #[cube]
    #[allow(unused_assignments)]
    fn value(w: &Tensor<u32>, table: &Tensor<f32>, row: u32, k: u32, #[comptime] fmt: u32) -> f32 {
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
            let bytes = comptime!(match fmt {
                2 | 20 => 18u32,
                3 => 20u32,
                6 => 22u32,
                7 => 24u32,
                _ => 34u32,
            });
            let b = row + (k / 32) * bytes;
            let i = k % 32;
            let d = half(w, b);
            if comptime!(fmt == 2) {
                v = d * (f32::cast_from(nibble(w, b + 2, i)) - 8.0);
            } else if comptime!(fmt == 3) {
                v = d * f32::cast_from(nibble(w, b + 4, i)) + half(w, b + 2);
            } else if comptime!(fmt == 6) {
                let hb = (byte(w, b + 2 + i / 8) >> (i % 8)) & 1;
                v = d * (f32::cast_from(nibble(w, b + 6, i) | (hb << 4)) - 16.0);
            } else if comptime!(fmt == 7) {
                let hb = (byte(w, b + 4 + i / 8) >> (i % 8)) & 1;
                v = d * f32::cast_from(nibble(w, b + 8, i) | (hb << 4)) + half(w, b + 2);
            } else if comptime!(fmt == 8) {
                v = d * signed(byte(w, b + 2 + i));
            } else {
                v = d * table[nibble(w, b + 2, i) as usize];
            }
        } else {
            // 256-value super-blocks, in chunks of 32.
            let bytes = comptime!(match fmt {
                10 => 84u32,
                11 => 110u32,
                12 => 144u32,
                13 => 176u32,
                14 => 210u32,
                _ => 136u32,
            });
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
                // Q3_K: hmask[32] qs[64] scales[12] d
                let is = 2 * c + i / 16;
                let low = byte(w, b + 96 + is % 8);
                let mut lo4 = low & 0xF;
                if is >= 8 {
                    lo4 = low >> 4;
                }
                let hi2 = (byte(w, b + 96 + 8 + is % 4) >> (2 * (is / 4))) & 3;
                let sc = f32::cast_from(lo4 | (hi2 << 4)) - 32.0;
                let q = (byte(w, b + 32 + 32 * (c / 4) + i) >> (2 * (c % 4))) & 3;
                let hbit = (byte(w, b + i) >> (4 * (c / 4) + c % 4)) & 1;
                v = half(w, b + 108) * sc * (f32::cast_from(q) - 4.0 + 4.0 * f32::cast_from(hbit));
            } else if comptime!(fmt == 12 || fmt == 13) {
                // Q4_K / Q5_K: d dmin scales[12] (qh[32]) qs[128]
                let s = b + 4;
                let mut sc = byte(w, s + c) & 63;
                let mut m = byte(w, s + c + 4) & 63;
                if c >= 4 {
                    sc = (byte(w, s + c + 4) & 0xF) | ((byte(w, s + c - 4) >> 6) << 4);
                    m = (byte(w, s + c + 4) >> 4) | ((byte(w, s + c) >> 6) << 4);
                }
                let qs = comptime!(if fmt == 13 { 48u32 } else { 16u32 });
                let qb = byte(w, b + qs + 32 * (c / 2) + i);
                let mut q = qb & 0xF;
                if c % 2 == 1 {
                    q = qb >> 4;
                }
                if comptime!(fmt == 13) {
                    q += ((byte(w, b + 16 + i) >> c) & 1) << 4;
                }
                v = half(w, b) * f32::cast_from(sc) * f32::cast_from(q)
                    - half(w, b + 2) * f32::cast_from(m);
            } else if comptime!(fmt == 14) {
                // Q6_K: ql[128] qh[64] scales[16] d
                let hf = c / 4;
                let quarter = c % 4;
                let ql = byte(w, b + 64 * hf + 32 * (quarter % 2) + i);
                let mut lo = ql & 0xF;
                if quarter >= 2 {
                    lo = ql >> 4;
                }
                let hi = (byte(w, b + 128 + 32 * hf + i) >> (2 * quarter)) & 3;
                let sc = signed(byte(w, b + 192 + 2 * c + i / 16));
                v = half(w, b + 208) * sc * (f32::cast_from(lo | (hi << 4)) - 32.0);
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

    /// `out[b][r] = Σ_k x[b][k] · W[r][k]`, one unit per output value.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn qmatmul_kernel(
        w: &Tensor<u32>,
        table: &Tensor<f32>,
        x: &Tensor<f32>,
        out: &mut Tensor<f32>,
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
        for k in 0..cols {
            acc += value(w, table, row, k, fmt) * x[b * xs0 + (k as usize) * xs1];
        }
        let at = b * out.stride(0) + (r as usize) * out.stride(1);
        out[at] = acc;
    }

    /// `out[t][k] = W[ids[t]][k]`, one unit per output value.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn dequant_rows_kernel(
        w: &Tensor<u32>,
        table: &Tensor<f32>,
        ids: &Tensor<u32>,
        out: &mut Tensor<f32>,
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
        let at = t_i * out.stride(0) + (k as usize) * out.stride(1);
        out[at] = value(w, table, r * row_bytes, k, fmt);
    }
}
