//! Weights on a GPU (wgpu through CubeCL).

use crate::error::Result;
use crate::weights::RawTensor;
use burn::tensor::{Device, Int, Tensor, TensorData};

/// A weight matrix on the GPU.
pub struct GpuMatrix {
    /// `[in, out]` f32.
    w: Tensor<2>,
    rows: usize,
    cols: usize,
}

impl GpuMatrix {
    pub fn upload(raw: &RawTensor, device: &Device) -> Result<GpuMatrix> {
        let (rows, cols) = (raw.rows.len(), raw.cols.len());
        let mut all = vec![0f32; rows * cols];
        tessera_quant::dequantize(raw.ty, raw.data.as_slice(), &mut all);
        let w = Tensor::<2>::from_data(TensorData::new(all, [rows, cols]), device).transpose();
        Ok(GpuMatrix { w, rows, cols })
    }

    /// `x · Wᵀ` for `x` of `[n, cols]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        x.matmul(self.w.clone())
    }

    /// Rows `ids` of the matrix as `[ids, cols]` f32 (an embedding lookup).
    pub fn rows(&self, ids: Tensor<1, Int>) -> Tensor<2> {
        debug_assert!(self.rows > 0 && self.cols > 0);
        self.w.clone().select(1, ids).transpose()
    }
}
