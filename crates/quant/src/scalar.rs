//! Portable kernels: the reference every SIMD kernel is tested against, and what runs on a
//! CPU without AVX2.

use crate::act::QActs;
use crate::format::{Chunk, GgmlType, decode_chunk};
use crate::kernel::{Out, dense_chunk};

/// Quantized activations: `y[b][r] = Σ_halves e * (scale_h * Σ q·x + min_h * Σ x)`, with each
/// activation `x = 256 * hi + lo` in units of its scale `e`.
pub(crate) fn rows_fast(
    ty: GgmlType,
    w: &[u8],
    rows: std::ops::Range<usize>,
    a: &QActs,
    out: &Out,
) {
    let (per, bytes) = ty.block();
    let row_bytes = a.cols / per * bytes;
    let chunks = a.cols / 32;
    let mut acc = vec![0f32; a.rows];
    let mut ch = Chunk::default();
    for r in rows {
        acc.iter_mut().for_each(|v| *v = 0.0);
        let row = &w[r * row_bytes..(r + 1) * row_bytes];
        for k in 0..chunks {
            let blk = &row[(k * 32 / per) * bytes..];
            decode_chunk(ty, blk, k % (per / 32), &mut ch);
            for (b, acc) in acc.iter_mut().enumerate() {
                let xq = &a.row_q(b)[k * 32..k * 32 + 32];
                let xq2 = &a.row_q2(b)[k * 32..k * 32 + 32];
                let s = &a.row_sums(b)[2 * k..2 * k + 2];
                let dx = &a.row_d(b)[2 * k..2 * k + 2];
                for h in 0..2 {
                    let dot: i32 = (0..16)
                        .map(|i| {
                            let x = 256 * xq[16 * h + i] as i32 + xq2[16 * h + i] as i32;
                            ch.q[16 * h + i] as i32 * x
                        })
                        .sum();
                    *acc += dx[h] * (ch.scale[h] * dot as f32 + ch.min[h] * s[h] as f32);
                }
            }
        }
        for (b, v) in acc.iter().enumerate() {
            out.set(b, r, *v);
        }
    }
}

/// f32 activations against dequantized weights, summed in order.
pub(crate) fn rows_exact(
    ty: GgmlType,
    w: &[u8],
    rows: std::ops::Range<usize>,
    x: &[f32],
    n: usize,
    cols: usize,
    out: &Out,
) {
    let (per, bytes) = ty.block();
    let row_bytes = cols / per * bytes;
    let mut acc = vec![0f32; n];
    let mut vals = [0f32; 32];
    let mut ch = Chunk::default();
    for r in rows {
        acc.iter_mut().for_each(|v| *v = 0.0);
        let row = &w[r * row_bytes..(r + 1) * row_bytes];
        let mut k0 = 0;
        while k0 < cols {
            let len = (cols - k0).min(32);
            if ty.is_dense() {
                dense_chunk(ty, row, k0, len, &mut vals);
            } else {
                let blk = &row[(k0 / per) * bytes..];
                decode_chunk(ty, blk, (k0 % per) / 32, &mut ch);
                for (i, v) in vals.iter_mut().enumerate() {
                    *v = ch.value(i);
                }
            }
            for (b, acc) in acc.iter_mut().enumerate() {
                let xs = &x[b * cols + k0..b * cols + k0 + len];
                for (w, x) in vals[..len].iter().zip(xs) {
                    *acc += w * x;
                }
            }
            k0 += len;
        }
        for (b, v) in acc.iter().enumerate() {
            out.set(b, r, *v);
        }
    }
}
