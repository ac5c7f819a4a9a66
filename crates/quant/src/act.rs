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
        for (((xb, qb), d), s) in x
            .chunks_exact(32)
            .zip(self.q.chunks_exact_mut(32))
            .zip(self.d.iter_mut())
            .zip(self.sums.chunks_exact_mut(2))
        {
            quantize_block(xb, qb, d, s);
        }
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

/// Symmetric 8-bit quantization of 32 values: scale = max |x| / 127, round half away from zero.
#[inline]
fn quantize_block(x: &[f32], q: &mut [i8], d: &mut f32, sums: &mut [i16]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = amax / 127.0;
    let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
    *d = scale;
    for (o, v) in q.iter_mut().zip(x) {
        *o = (v * inv).round().clamp(-127.0, 127.0) as i8;
    }
    sums[0] = q[..16].iter().map(|&v| v as i16).sum();
    sums[1] = q[16..].iter().map(|&v| v as i16).sum();
}
