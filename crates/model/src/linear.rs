//! The weight seam: every matrix product of the model goes through [`Linear`], whatever the
//! weights' format (GGUF blocks, F32/F16/BF16) and whatever the device. The weights stay in
//! their stored format; the kernel for that format and device computes `x · Wᵀ`:
//! - CPU (Burn's Flex backend): `tessera_quant`'s kernels, reading the rows where they lie (a
//!   view of the memory-mapped file, or the shard's own buffer), on the Flex storage of `x`.
//! - wgpu: the packed blocks in a GPU buffer, CubeCL kernels per format (`gpu.rs`).

use crate::error::{ModelError, Result};
use crate::ops::host;
use crate::weights::RawTensor;
use burn::tensor::{Device, Tensor, TensorData};
use tessera_quant::{Isa, Precision, QMatrix, matmul_rows};

// One per weight matrix: the size difference costs nothing worth an indirection.
#[allow(clippy::large_enum_variant)]
enum Store {
    /// The stored rows, multiplied in place by the CPU kernels.
    Host(RawTensor),
    /// Packed blocks on a GPU.
    #[cfg(feature = "wgpu")]
    Gpu(crate::gpu::GpuMatrix),
}

pub struct Linear {
    store: Store,
    /// Output features (the stored rows).
    out: usize,
    /// Input features the layer passes in; they sit at `in_offset` of the stored columns (a
    /// row-parallel slice whose cut falls inside a block stores the whole straddling block,
    /// and the columns outside the shard's own meet zeros).
    in_width: usize,
    in_offset: usize,
    stored_cols: usize,
    bias: Option<Tensor<2>>,
    bytes: u64,
}

impl Linear {
    /// Keeps `raw` (rows = outputs, valid columns = inputs) on `device`, with an optional bias.
    pub fn new(raw: RawTensor, bias: Option<Vec<f32>>, device: &Device) -> Result<Linear> {
        let out = raw.rows.len();
        let in_width = raw.valid.len();
        let in_offset = raw.valid.start;
        let stored_cols = raw.cols.len();
        QMatrix::new(raw.ty, out, stored_cols, raw.data.as_slice())
            .map_err(|e| ModelError::Backend(format!("weights: {e}")))?;
        let bytes = raw.data.len() as u64;
        let bias = bias.map(|b| Tensor::<2>::from_data(TensorData::new(b, [1, out]), device));
        let store = if crate::ops::is_host(device) {
            Store::Host(raw)
        } else {
            #[cfg(feature = "wgpu")]
            {
                Store::Gpu(crate::gpu::GpuMatrix::upload(&raw, device)?)
            }
            #[cfg(not(feature = "wgpu"))]
            return Err(ModelError::Backend("no GPU support in this build".into()));
        };
        Ok(Linear {
            store,
            out,
            in_width,
            in_offset,
            stored_cols,
            bias,
            bytes,
        })
    }

    /// Bytes of weights this matrix holds (and reads per token).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn out_features(&self) -> usize {
        self.out
    }

    /// Rows `ids` of the matrix as `[ids, in_width]` f32, an id of `None` giving zeros (an
    /// embedding lookup of the ids this shard holds).
    pub fn rows(&self, ids: &[Option<usize>], device: &Device) -> Tensor<2> {
        let (t, w) = (ids.len(), self.in_width);
        match &self.store {
            Store::Host(raw) => {
                let rb = raw.row_bytes();
                let mut out = vec![0f32; t * w];
                let mut row = vec![0f32; self.stored_cols];
                for (o, id) in out.chunks_exact_mut(w).zip(ids) {
                    if let Some(r) = id {
                        let bytes = &raw.data.as_slice()[r * rb..(r + 1) * rb];
                        tessera_quant::dequantize(raw.ty, bytes, &mut row);
                        o.copy_from_slice(&row[self.in_offset..self.in_offset + w]);
                    }
                }
                Tensor::<2>::from_data(TensorData::new(out, [t, w]), device)
            }
            #[cfg(feature = "wgpu")]
            Store::Gpu(g) => {
                let idx: Vec<u32> = ids.iter().map(|i| i.unwrap_or(0) as u32).collect();
                let mut x = g.rows(&idx, device);
                if ids.iter().any(|i| i.is_none()) {
                    let m: Vec<f32> = ids
                        .iter()
                        .map(|i| f32::from(u8::from(i.is_some())))
                        .collect();
                    x = x * Tensor::<2>::from_data(TensorData::new(m, [t, 1]), device);
                }
                x.slice([0..t, self.in_offset..self.in_offset + w])
            }
        }
    }

    pub fn forward(&self, x: Tensor<2>, prec: Precision, prompt: &[bool]) -> Tensor<2> {
        Self::forward_group(&[self], x, prec, prompt)
            .pop()
            .expect("one output")
    }

    /// Several matrices that read the same input (Q, K, V; gate, up): on the CPU, one pass of
    /// the threads over all their rows, with the input quantized once. `prompt[b]` marks the
    /// rows of prompts (steps of several tokens): on the CPU they take a GEMM (see
    /// [`tessera_quant::matmul_rows`]).
    pub fn forward_group(
        ls: &[&Linear],
        x: Tensor<2>,
        prec: Precision,
        prompt: &[bool],
    ) -> Vec<Tensor<2>> {
        let [n, width] = x.dims();
        let device = x.device();
        let outs: Vec<Tensor<2>> = if let Some(xh) = host(&x) {
            let xs = xh.as_slice::<f32>().expect("contiguous f32");
            let padded;
            let input: &[f32] = if ls[0].in_offset == 0 && ls[0].stored_cols == width {
                xs
            } else {
                // Zeros outside the shard's own columns of the straddling blocks.
                let (off, cols) = (ls[0].in_offset, ls[0].stored_cols);
                let mut p = vec![0f32; n * cols];
                for (dst, src) in p.chunks_exact_mut(cols).zip(xs.chunks_exact(width)) {
                    dst[off..off + width].copy_from_slice(src);
                }
                padded = p;
                &padded
            };
            let ms: Vec<QMatrix> = ls
                .iter()
                .map(|l| match &l.store {
                    Store::Host(r) => r.matrix(),
                    #[cfg(feature = "wgpu")]
                    Store::Gpu(_) => unreachable!("a host tensor met GPU weights"),
                })
                .collect();
            let mut ys: Vec<Vec<f32>> = ls.iter().map(|l| vec![0f32; n * l.out]).collect();
            {
                let mut refs: Vec<&mut [f32]> = ys.iter_mut().map(|y| y.as_mut_slice()).collect();
                matmul_rows(&ms, input, n, &mut refs, prec, Isa::best(), prompt);
            }
            ys.into_iter()
                .zip(ls)
                .map(|(y, l)| Tensor::<2>::from_data(TensorData::new(y, [n, l.out]), &device))
                .collect()
        } else {
            #[cfg(feature = "wgpu")]
            {
                // Q, K and V (gate and up) of the whole input: one launch on a GPU.
                let gs: Option<Vec<&crate::gpu::GpuMatrix>> = ls
                    .iter()
                    .map(|l| match &l.store {
                        Store::Gpu(g) if l.in_offset == 0 && l.stored_cols == width => Some(g),
                        _ => None,
                    })
                    .collect();
                if let Some(ys) = gs.and_then(|gs| crate::gpu::GpuMatrix::forward_many(&gs, &x)) {
                    return Self::add_bias(ys, ls);
                }
            }
            ls.iter()
                .map(|l| match &l.store {
                    #[cfg(feature = "wgpu")]
                    Store::Gpu(g) => {
                        let x = if l.in_offset == 0 && l.stored_cols == width {
                            x.clone()
                        } else {
                            let z = Tensor::<2>::zeros([n, l.stored_cols], &device);
                            z.slice_assign([0..n, l.in_offset..l.in_offset + width], x.clone())
                        };
                        g.forward(x)
                    }
                    Store::Host(_) => unreachable!("a device tensor met host weights"),
                })
                .collect()
        };
        debug_assert!(ls.iter().all(|l| l.in_width == width));
        Self::add_bias(outs, ls)
    }

    fn add_bias(outs: Vec<Tensor<2>>, ls: &[&Linear]) -> Vec<Tensor<2>> {
        outs.into_iter()
            .zip(ls)
            .map(|(y, l)| match &l.bias {
                Some(b) => y + b.clone(),
                None => y,
            })
            .collect()
    }
}
