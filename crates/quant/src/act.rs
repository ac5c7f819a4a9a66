//! Activations quantized once per row for the integer kernels: 8-bit values in blocks of 32
//! with an f32 scale each, plus the sum of every 16 values (for the formats with offsets or
//! mins). One layout serves every weight format, so a row is quantized once per layer input
//! however many formats the layer mixes.

/// `rows` activation rows of `cols` values (a multiple of 32), quantized.
#[derive(Debug, Default, Clone)]
pub struct QActs {
    pub rows: usize,
    pub cols: usize,
    /// `rows * cols` values.
    pub q: Vec<i8>,
    /// One scale per 32 values.
    pub d: Vec<f32>,
    /// The sum of every 16 values of `q`.
    pub sums: Vec<i16>,
    /// For the 512-bit kernels, per pair of 32-blocks (a row's last pair padded with zeros):
    /// the two scales spread over 8 lanes each, and scale x sum of every 16 values.
    pub dxv: Vec<f32>,
    pub ds16: Vec<f32>,
}

impl QActs {
    /// Quantizes `x` (`rows * cols` values, row-major); `cols` must be a multiple of 32.
    pub fn quantize(x: &[f32], rows: usize, cols: usize) -> QActs {
        let mut a = QActs::default();
        a.requantize(x, rows, cols);
        a
    }

    /// Like [`QActs::quantize`], reusing this value's buffers.
    pub fn requantize(&mut self, x: &[f32], rows: usize, cols: usize) {
        assert!(
            cols.is_multiple_of(32),
            "activation rows must be whole 32-blocks"
        );
        assert_eq!(x.len(), rows * cols);
        self.rows = rows;
        self.cols = cols;
        self.q.resize(rows * cols, 0);
        self.d.resize(rows * cols / 32, 0.0);
        self.sums.resize(rows * cols / 16, 0);
        let mut simd = false;
        #[cfg(target_arch = "x86_64")]
        if crate::x86::has_avx2() {
            // SAFETY: AVX2 was detected; the buffers were sized above.
            unsafe { crate::x86::quantize_rows(x, &mut self.q, &mut self.d, &mut self.sums) };
            simd = true;
        }
        if !simd {
            for (((xb, qb), d), s) in x
                .chunks_exact(32)
                .zip(self.q.chunks_exact_mut(32))
                .zip(self.d.iter_mut())
                .zip(self.sums.chunks_exact_mut(2))
            {
                quantize_block(xb, qb, d, s);
            }
        }
        let chunks = cols / 32;
        let pairs = self.pairs();
        self.dxv.clear();
        self.dxv.resize(rows * pairs * 16, 0.0);
        self.ds16.clear();
        self.ds16.resize(rows * pairs * 4, 0.0);
        for r in 0..rows {
            for k in 0..chunks {
                let dx = self.d[r * chunks + k];
                let at = r * pairs * 16 + 8 * k;
                self.dxv[at..at + 8].fill(dx);
                for h in 0..2 {
                    self.ds16[r * pairs * 4 + 2 * k + h] =
                        dx * self.sums[r * 2 * chunks + 2 * k + h] as f32;
                }
            }
        }
    }

    /// Pairs of 32-blocks per row, the last one possibly half.
    pub fn pairs(&self) -> usize {
        (self.cols / 32).div_ceil(2)
    }

    #[inline(always)]
    pub fn row_q(&self, r: usize) -> &[i8] {
        &self.q[r * self.cols..(r + 1) * self.cols]
    }
    #[inline(always)]
    pub fn row_d(&self, r: usize) -> &[f32] {
        &self.d[r * self.cols / 32..(r + 1) * self.cols / 32]
    }
    #[inline(always)]
    pub fn row_sums(&self, r: usize) -> &[i16] {
        &self.sums[r * self.cols / 16..(r + 1) * self.cols / 16]
    }
}

/// Symmetric 8-bit quantization of 32 values: scale = max |x| / 127, rounded to nearest, ties
/// to even (as the SIMD conversion does, so every instruction set quantizes alike).
#[inline]
pub(crate) fn quantize_block(x: &[f32], q: &mut [i8], d: &mut f32, sums: &mut [i16]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = amax / 127.0;
    let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
    *d = scale;
    for (o, v) in q.iter_mut().zip(x) {
        *o = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
    }
    sums[0] = q[..16].iter().map(|&v| v as i16).sum();
    sums[1] = q[16..].iter().map(|&v| v as i16).sum();
}

#[cfg(test)]
mod tests {
    /// The SIMD quantizer and the portable one agree bit for bit.
    #[test]
    fn every_instruction_set_quantizes_alike() {
        let x: Vec<f32> = (0..32 * 40)
            .map(|i| {
                ((i as f32 * 0.731).sin() * (1 + i % 7) as f32)
                    * if i % 97 == 0 { 40.0 } else { 1.0 }
            })
            .chain([0.5f32; 32])
            .chain([0.0f32; 32])
            .collect();
        let rows = x.len() / 64;
        let a = super::QActs::quantize(&x, rows, 64);
        let (mut q, mut d, mut s) = (
            vec![0i8; x.len()],
            vec![0f32; x.len() / 32],
            vec![0i16; x.len() / 16],
        );
        for i in 0..x.len() / 32 {
            super::quantize_block(
                &x[32 * i..32 * i + 32],
                &mut q[32 * i..32 * i + 32],
                &mut d[i],
                &mut s[2 * i..2 * i + 2],
            );
        }
        assert_eq!(a.q, q);
        assert_eq!(a.d, d);
        assert_eq!(a.sums, s);
    }
}
