//! Activations quantized once per row for the integer kernels, in two 8-bit planes: every 16
//! values get a scale `e`, and each value is `e * (256 * hi + lo)` with `hi` the value rounded
//! to 8 bits (-127..127 of `max |x| / 127`) and `lo` the rounding error rounded to 8 bits of a
//! 256th of that step. The kernels take both planes through the same integer dot products
//! (`256 * Σ w·hi + Σ w·lo`, exact in 32 bits), so activations carry about 16 bits: the fast path
//! lands within ~1e-3 of f32 activations (one 8-bit plane, llama.cpp's way, errs ~0.1-0.5 on
//! SmolLM2's logits) for a few percent more work per weight block read.
//!
//! The two planes can also come as one plane of 16-bit values `256 * hi + lo` (at most 32639 in
//! magnitude), for the AVX2 kernel without VNNI: one `vpmaddwd` of weights widened to 16 bits
//! against it sums exactly the integers of two byte-plane dot products, in half the
//! instructions. Only that kernel reads it, so the matrix products have it written only for
//! that instruction set.

/// `rows` activation rows of `cols` values (a multiple of 32), quantized.
#[derive(Debug, Default, Clone)]
pub struct QActs {
    pub rows: usize,
    pub cols: usize,
    /// The high plane, `rows * cols` values.
    pub q: Vec<i8>,
    /// The low plane: the rounding error of `q`, in 256ths of its step.
    pub q2: Vec<i8>,
    /// One scale per 16 values: the value of one unit of `256 * q + q2`.
    pub d: Vec<f32>,
    /// `256 * Σ q + Σ q2` of every 16 values.
    pub sums: Vec<i32>,
    /// For the 512-bit kernels, per pair of 32-blocks (a row's last pair padded with zeros):
    /// each 16 values' scale spread over their 4 lanes, and scale x sum of every 16 values.
    pub dxv: Vec<f32>,
    pub ds16: Vec<f32>,
    /// The two planes as one, `256 * q + q2`, `rows * cols` values (empty unless joined).
    pub x16: Vec<i16>,
    /// For the 16-bit AVX2 kernel, per 32-block: its two 16 values' scales as that kernel's
    /// sums come out, `[d0, d0, d1, d1, d0, d0, d1, d1]` (empty unless joined).
    pub dx16: Vec<f32>,
}

impl QActs {
    /// Quantizes `x` (`rows * cols` values, row-major), the joined plane included; `cols` must
    /// be a multiple of 32.
    pub fn quantize(x: &[f32], rows: usize, cols: usize) -> QActs {
        let mut a = QActs::default();
        a.requantize(x, rows, cols);
        a
    }

    /// Like [`QActs::quantize`], reusing this value's buffers.
    pub fn requantize(&mut self, x: &[f32], rows: usize, cols: usize) {
        self.requantize_for(x, rows, cols, true)
    }

    /// [`QActs::requantize`], with the joined plane (`x16`, `dx16`) only if `joined`.
    pub(crate) fn requantize_for(&mut self, x: &[f32], rows: usize, cols: usize, joined: bool) {
        assert!(
            cols.is_multiple_of(32),
            "activation rows must be whole 32-blocks"
        );
        assert_eq!(x.len(), rows * cols);
        self.rows = rows;
        self.cols = cols;
        self.q.resize(rows * cols, 0);
        self.q2.resize(rows * cols, 0);
        self.d.resize(rows * cols / 16, 0.0);
        self.sums.resize(rows * cols / 16, 0);
        self.x16.clear();
        if joined {
            self.x16.resize(rows * cols, 0);
        }
        let mut simd = false;
        #[cfg(target_arch = "x86_64")]
        if crate::x86::has_avx2() {
            // SAFETY: AVX2 was detected; the buffers were sized above.
            unsafe {
                crate::x86::quantize_rows(
                    x,
                    (
                        &mut self.q,
                        &mut self.q2,
                        joined.then_some(&mut self.x16[..]),
                    ),
                    &mut self.d,
                    &mut self.sums,
                )
            };
            simd = true;
        }
        if !simd {
            for ((((xb, qb), q2b), d), s) in x
                .chunks_exact(16)
                .zip(self.q.chunks_exact_mut(16))
                .zip(self.q2.chunks_exact_mut(16))
                .zip(self.d.iter_mut())
                .zip(self.sums.iter_mut())
            {
                quantize_block(xb, qb, q2b, d, s);
            }
            for ((o, q), q2) in self.x16.iter_mut().zip(&self.q).zip(&self.q2) {
                *o = 256 * *q as i16 + *q2 as i16;
            }
        }
        let chunks = cols / 32;
        self.dx16.clear();
        if joined {
            self.dx16.extend(
                self.d
                    .chunks_exact(2)
                    .flat_map(|h| [h[0], h[0], h[1], h[1], h[0], h[0], h[1], h[1]]),
            );
        }
        let pairs = self.pairs();
        self.dxv.clear();
        self.dxv.resize(rows * pairs * 16, 0.0);
        self.ds16.clear();
        self.ds16.resize(rows * pairs * 4, 0.0);
        for r in 0..rows {
            for k in 0..chunks {
                for h in 0..2 {
                    let j = r * 2 * chunks + 2 * k + h;
                    let at = r * pairs * 16 + 8 * k + 4 * h;
                    self.dxv[at..at + 4].fill(self.d[j]);
                    self.ds16[r * pairs * 4 + 2 * k + h] = self.d[j] * self.sums[j] as f32;
                }
            }
        }
    }

    /// Pairs of 32-blocks per row, the last one possibly half.
    pub fn pairs(&self) -> usize {
        (self.cols / 32).div_ceil(2)
    }

    /// Value `i` as the kernels see it.
    pub fn value(&self, i: usize) -> f32 {
        self.d[i / 16] * (256 * self.q[i] as i32 + self.q2[i] as i32) as f32
    }

    #[inline(always)]
    pub fn row_q(&self, r: usize) -> &[i8] {
        &self.q[r * self.cols..(r + 1) * self.cols]
    }
    #[inline(always)]
    pub fn row_q2(&self, r: usize) -> &[i8] {
        &self.q2[r * self.cols..(r + 1) * self.cols]
    }
    #[inline(always)]
    pub fn row_d(&self, r: usize) -> &[f32] {
        &self.d[r * self.cols / 16..(r + 1) * self.cols / 16]
    }
    #[inline(always)]
    pub fn row_sums(&self, r: usize) -> &[i32] {
        &self.sums[r * self.cols / 16..(r + 1) * self.cols / 16]
    }
}

/// Two-plane quantization of 16 values: step = max |x| / 127, `q` = x rounded to steps, `q2` =
/// the error rounded to 256ths of a step (both to nearest, ties to even, as the SIMD conversion
/// does, so every instruction set quantizes alike).
#[inline]
pub(crate) fn quantize_block(x: &[f32], q: &mut [i8], q2: &mut [i8], d: &mut f32, sum: &mut i32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let step = amax / 127.0;
    let inv = if step != 0.0 { 1.0 / step } else { 0.0 };
    let inv2 = if step != 0.0 { 256.0 / step } else { 0.0 };
    *d = step / 256.0;
    let mut s = 0i32;
    for ((o, o2), v) in q.iter_mut().zip(q2.iter_mut()).zip(x) {
        let hi = (v * inv).round_ties_even().clamp(-127.0, 127.0);
        let lo = ((v - step * hi) * inv2)
            .round_ties_even()
            .clamp(-127.0, 127.0);
        *o = hi as i8;
        *o2 = lo as i8;
        s += 256 * hi as i32 + lo as i32;
    }
    *sum = s;
}

#[cfg(test)]
mod tests {
    fn inputs() -> Vec<f32> {
        (0..32 * 40)
            .map(|i| {
                ((i as f32 * 0.731).sin() * (1 + i % 7) as f32)
                    * if i % 97 == 0 { 40.0 } else { 1.0 }
            })
            .chain([0.5f32; 32])
            .chain([0.0f32; 32])
            .collect()
    }

    /// The SIMD quantizer and the portable one agree bit for bit.
    #[test]
    fn every_instruction_set_quantizes_alike() {
        let x = inputs();
        let rows = x.len() / 64;
        let a = super::QActs::quantize(&x, rows, 64);
        let n = x.len() / 16;
        let (mut q, mut q2, mut d, mut s) = (
            vec![0i8; x.len()],
            vec![0i8; x.len()],
            vec![0f32; n],
            vec![0i32; n],
        );
        for i in 0..n {
            let r = 16 * i..16 * i + 16;
            super::quantize_block(
                &x[r.clone()],
                &mut q[r.clone()],
                &mut q2[r],
                &mut d[i],
                &mut s[i],
            );
        }
        assert_eq!(a.q, q);
        assert_eq!(a.q2, q2);
        assert_eq!(a.d, d);
        assert_eq!(a.sums, s);
        let x16: Vec<i16> = q
            .iter()
            .zip(&q2)
            .map(|(a, b)| 256 * *a as i16 + *b as i16)
            .collect();
        assert_eq!(a.x16, x16);
    }

    /// Two planes carry about 16 bits: every value within half a 256th of its step.
    #[test]
    fn two_planes_are_close_to_f32() {
        let x = inputs();
        let a = super::QActs::quantize(&x, x.len() / 64, 64);
        for (i, v) in x.iter().enumerate() {
            let step = a.d[i / 16] * 256.0;
            let err = (a.value(i) - v).abs();
            assert!(
                err <= step / 256.0 + 1e-6 * v.abs(),
                "value {i}: {v} vs {}",
                a.value(i)
            );
        }
    }
}
