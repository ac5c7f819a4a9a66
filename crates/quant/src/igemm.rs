//! Prefill on the fast path, where VNNI runs (AVX-512 VNNI, or AVX-VNNI at 256 bits): a
//! prompt's rows as 16-bit integers (one scale per 32 values) against weight tiles decoded to
//! 16-bit integers, multiplied by `vpdpwssd` (32 products a 512-bit vector against the f32
//! GEMM's 16 FMAs), the sums scaled into f32 once per weight scale.
//!
//! Activations: each 32 values get `d = max |x| / 32767` and `a = round(x / d)`, so a prompt row
//! carries about 15 bits, as the decode kernels' two 8-bit planes do. Weights: a tile of
//! [`IG_ROWS`] rows, each value `s * q + m` with `q` the block's integer (offset removed), `s`
//! its 16- or 32-value scale and `m` its min (Q4_1, Q5_1 and the K-quants with mins). Then
//!
//! `y[b][r] = Σ_g (S_g · d_g) · s_g + Σ_h m_h · (d · Σ_h a)`, `S_g = Σ_{k in g} q·a` in i32,
//!
//! one scale group `g` after another, in that order, for every output: the portable
//! [`reference`] and the AVX-512 kernel give the same bits, and a row's result does not depend
//! on the other rows of its batch. The sums are exact: |q| ≤ 128 and |a| ≤ 32767 over 32 values
//! stay far inside 32 bits.

use crate::format::{Chunk, GgmlType, decode_chunk};
use crate::kernel::{Isa, Out, QMatrix};

/// Weight rows per tile: two vectors of 16 lanes.
pub(crate) const IG_ROWS: usize = 32;
/// Activation rows per pass of the micro-kernel (its accumulators: 2 x this many in i32 and as
/// many in f32).
pub(crate) const IG_COLS: usize = 6;

/// Whether prompt rows on the fast path take this GEMM on `isa`: AVX-512 VNNI, or AVX-VNNI's
/// 256-bit `vpdpwssd` (elsewhere the f32 GEMM, which is as fast as 16-bit products without
/// VNNI's fused dot product).
pub(crate) fn serves(isa: Isa) -> bool {
    matches!(isa, Isa::Avx512 | Isa::AvxVnni)
}

/// The values a weight scale covers: 16 for the formats with a scale per 16 values.
pub(crate) fn group(ty: GgmlType) -> usize {
    match ty {
        GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q6_K => 16,
        _ => 32,
    }
}

/// Whether the format's values carry a min besides their scale.
pub(crate) fn has_mins(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q2_K | GgmlType::Q4_K | GgmlType::Q5_K
    )
}

/// Prompt rows quantized for this GEMM, padded with zero rows to a multiple of [`IG_COLS`].
#[derive(Debug, Default)]
pub(crate) struct GemmActs {
    /// Rows, padded.
    pub rows: usize,
    pub cols: usize,
    /// `rows * cols` values.
    pub a: Vec<i16>,
    /// One scale per 32 values.
    pub d: Vec<f32>,
    /// `d * Σ a` of every 16 values, and of every 32.
    pub ds16: Vec<f32>,
    pub ds32: Vec<f32>,
}

impl GemmActs {
    /// Rows `which` of `x` (rows of `cols`, a multiple of 32).
    pub(crate) fn quantize(x: &[f32], cols: usize, which: &[usize]) -> GemmActs {
        assert!(
            cols.is_multiple_of(32),
            "activation rows are whole 32-blocks"
        );
        let rows = which.len().next_multiple_of(IG_COLS);
        let mut g = GemmActs {
            rows,
            cols,
            a: vec![0; rows * cols],
            d: vec![0.0; rows * cols / 32],
            ds16: vec![0.0; rows * cols / 16],
            ds32: vec![0.0; rows * cols / 32],
        };
        for (j, &r) in which.iter().enumerate() {
            let src = &x[r * cols..(r + 1) * cols];
            let (a, d) = (
                &mut g.a[j * cols..(j + 1) * cols],
                &mut g.d[j * cols / 32..],
            );
            let (ds16, ds32) = (&mut g.ds16[j * cols / 16..], &mut g.ds32[j * cols / 32..]);
            #[cfg(target_arch = "x86_64")]
            if crate::x86::has_avx512bw() {
                // SAFETY: AVX-512 was detected.
                unsafe { crate::x86::igemm_quantize_row(src, a, d, ds16, ds32) };
                continue;
            } else if crate::x86::has_avx2() {
                // SAFETY: AVX2 was detected.
                unsafe { crate::x86::igemm_quantize_row_avx2(src, a, d, ds16, ds32) };
                continue;
            }
            quantize_row(src, a, d, ds16, ds32);
        }
        g
    }

    /// Value `i` of padded row `j` as the kernel sees it.
    #[cfg(test)]
    pub(crate) fn value(&self, j: usize, i: usize) -> f32 {
        self.d[(j * self.cols + i) / 32] * self.a[j * self.cols + i] as f32
    }
}

/// One row's values `a`, scales `d` and scaled sums `ds16`, `ds32` (see [`GemmActs`]); inlined
/// into the x86 module's AVX-512 compilation, which rounds alike (to nearest, ties to even).
#[inline(always)]
pub(crate) fn quantize_row(
    x: &[f32],
    a: &mut [i16],
    d: &mut [f32],
    ds16: &mut [f32],
    ds32: &mut [f32],
) {
    for (c, (xs, out)) in x.chunks_exact(32).zip(a.chunks_exact_mut(32)).enumerate() {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let step = amax / 32767.0;
        let inv = if amax != 0.0 { 32767.0 / amax } else { 0.0 };
        let mut sums = [0i32; 2];
        for (h, (o, v)) in out
            .chunks_exact_mut(16)
            .zip(xs.chunks_exact(16))
            .enumerate()
        {
            for (o, v) in o.iter_mut().zip(v) {
                *o = (v * inv).round_ties_even().clamp(-32767.0, 32767.0) as i16;
            }
            sums[h] = o.iter().map(|&q| q as i32).sum();
        }
        d[c] = step;
        ds16[2 * c] = step * sums[0] as f32;
        ds16[2 * c + 1] = step * sums[1] as f32;
        ds32[c] = step * (sums[0] + sums[1]) as f32;
    }
}

/// [`IG_ROWS`] weight rows of `k` values, decoded.
#[derive(Debug, Default)]
pub(crate) struct Tile {
    pub k: usize,
    /// `[k / 2][IG_ROWS][2]`: a 64-byte vector holds one pair of values of 16 rows.
    pub q: Vec<i16>,
    /// `[k / 16][IG_ROWS]`: each 16 values' scale and min.
    pub s: Vec<f32>,
    pub m: Vec<f32>,
}

impl Tile {
    /// Sized for rows of `k`; zeros where `zero` (a tile that will not be filled whole).
    fn reset(&mut self, k: usize, zero: bool) {
        self.k = k;
        if zero {
            self.q.clear();
            self.s.clear();
            self.m.clear();
        }
        self.q.resize(k * IG_ROWS, 0);
        self.s.resize(k / 16 * IG_ROWS, 0.0);
        self.m.resize(k / 16 * IG_ROWS, 0.0);
    }

    /// Stores chunk `c` (values `32c..32c+32`) of tile row `i`: integers `q`, and each half's
    /// scale and min.
    #[inline(always)]
    fn put(&mut self, i: usize, c: usize, q: &[i16; 32], s: [f32; 2], m: [f32; 2]) {
        for (p, pair) in q.chunks_exact(2).enumerate() {
            let at = (16 * c + p) * 2 * IG_ROWS + 2 * i;
            self.q[at] = pair[0];
            self.q[at + 1] = pair[1];
        }
        for h in 0..2 {
            self.s[(2 * c + h) * IG_ROWS + i] = s[h];
            self.m[(2 * c + h) * IG_ROWS + i] = m[h];
        }
    }

    /// Rows `r0..r0 + n` of `w` (rows past `n` are zeros).
    pub(crate) fn decode(&mut self, isa: Isa, w: &QMatrix, r0: usize, n: usize) {
        // A whole tile overwrites every value.
        self.reset(w.cols, n < IG_ROWS || self.k != w.cols);
        let rb = w.row_bytes();
        #[cfg(target_arch = "x86_64")]
        if isa.is_x86() {
            for e in 0..n.div_ceil(8) {
                let rows = (8 * e..n.min(8 * e + 8)).map(|i| r0 + i);
                let rows: Vec<&[u8]> = rows.map(|r| &w.data[r * rb..(r + 1) * rb]).collect();
                crate::x86::igemm_decode_rows8(w.ty, &rows, e, self);
            }
            return;
        }
        let _ = isa;
        for i in 0..n {
            decode_row_scalar(w.ty, &w.data[(r0 + i) * rb..(r0 + i + 1) * rb], i, self);
        }
    }
}

pub(crate) fn decode_row_scalar(ty: GgmlType, row: &[u8], i: usize, t: &mut Tile) {
    let (per, bytes) = ty.block();
    let mut ch = Chunk::default();
    for c in 0..t.k / 32 {
        decode_chunk(ty, &row[(c * 32 / per) * bytes..], c % (per / 32), &mut ch);
        let q: [i16; 32] = std::array::from_fn(|j| ch.q[j] as i16);
        t.put(i, c, &q, ch.scale, ch.min);
    }
}

/// The products of tile `t` with activation rows `b0..b0 + n` of `a` (`n` ≤ [`IG_COLS`]), the
/// arithmetic every kernel of this GEMM follows: `res[c][i]` for row `i` of the tile.
pub(crate) fn reference(
    t: &Tile,
    g: usize,
    mins: bool,
    a: &GemmActs,
    b0: usize,
    n: usize,
    res: &mut [[f32; IG_ROWS]; IG_COLS],
) {
    let k = t.k;
    for (c, out) in res.iter_mut().enumerate().take(n) {
        let b = b0 + c;
        for (i, o) in out.iter_mut().enumerate() {
            let mut acc = 0f32;
            for grp in 0..k / g {
                let mut s = 0i32;
                for kk in grp * g..(grp + 1) * g {
                    let q = t.q[(kk / 2) * 2 * IG_ROWS + 2 * i + kk % 2] as i32;
                    s += q * a.a[b * k + kk] as i32;
                }
                let d = a.d[(b * k + grp * g) / 32];
                let h = grp * g / 16;
                acc = (s as f32 * d).mul_add(t.s[h * IG_ROWS + i], acc);
                if mins {
                    if g == 32 {
                        acc = t.m[h * IG_ROWS + i].mul_add(a.ds32[(b * k) / 32 + grp], acc);
                    } else {
                        acc = t.m[h * IG_ROWS + i].mul_add(a.ds16[(b * k) / 16 + grp], acc);
                    }
                }
            }
            *o = acc;
        }
    }
}

/// Row tiles `tiles` (in units of [`IG_ROWS`]) of `w` against the prompt rows `a` (the first
/// `m` of its rows are real): activation row `j` is `out`'s row `j`.
pub(crate) fn igemm_tiles(
    isa: Isa,
    w: &QMatrix,
    tiles: std::ops::Range<usize>,
    a: &GemmActs,
    m: usize,
    out: &Out,
) {
    let (g, mins) = (group(w.ty), has_mins(w.ty));
    let mut t = Tile::default();
    let mut res = [[0f32; IG_ROWS]; IG_COLS];
    for tile in tiles {
        let r0 = tile * IG_ROWS;
        let nr = IG_ROWS.min(w.rows - r0);
        t.decode(isa, w, r0, nr);
        for b0 in (0..m).step_by(IG_COLS) {
            let n = IG_COLS.min(m - b0);
            block(isa, &t, g, mins, a, b0, n, &mut res);
            for (c, r) in res.iter().enumerate().take(n) {
                if nr == IG_ROWS {
                    out.set_run(b0 + c, r0, r);
                } else {
                    for (i, v) in r.iter().take(nr).enumerate() {
                        out.set(b0 + c, r0 + i, *v);
                    }
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn block(
    isa: Isa,
    t: &Tile,
    g: usize,
    mins: bool,
    a: &GemmActs,
    b0: usize,
    n: usize,
    res: &mut [[f32; IG_ROWS]; IG_COLS],
) {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        return crate::x86::igemm_block(t, g, mins, a, b0, n, res);
    }
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::AvxVnni {
        // Three activation rows at a time, on each half of the tile.
        let mut part = [[0f32; IG_ROWS]; IG_COLS];
        for c0 in (0..n).step_by(3) {
            let m = 3.min(n - c0);
            for h in 0..2 {
                crate::x86::igemm_half_avx_vnni(t, g, mins, a, b0 + c0, m, h, &mut part);
            }
            res[c0..c0 + m].copy_from_slice(&part[..m]);
        }
        return;
    }
    let _ = isa;
    reference(t, g, mins, a, b0, n, res)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::ALL_TYPES;

    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *seed >> 33
    }

    /// Random blocks of `ty` (every bit pattern of the values) with small, sane f16 scales.
    fn random_row(ty: GgmlType, cols: usize, seed: &mut u64) -> Vec<u8> {
        use GgmlType::*;
        let fields: &[usize] = match ty {
            Q4_0 | Q5_0 | Q8_0 | IQ4_NL | IQ4_XS => &[0],
            Q4_1 | Q5_1 | Q4_K | Q5_K => &[0, 2],
            Q2_K => &[80, 82],
            Q3_K => &[108],
            _ => &[208],
        };
        let mut out: Vec<u8> = (0..ty.row_bytes(cols).unwrap())
            .map(|_| lcg(seed) as u8)
            .collect();
        for blk in out.chunks_exact_mut(ty.block_bytes()) {
            for &at in fields {
                let v = half::f16::from_f32((lcg(seed) % 1001) as f32 / 10000.0 - 0.05);
                blk[at..at + 2].copy_from_slice(&v.to_le_bytes());
            }
        }
        out
    }

    /// Every instruction set decodes a tile to the same integers, scales and mins, and those are
    /// the portable decoder's; the kernel gives the reference's bits.
    #[test]
    fn tiles_and_products_are_the_reference_everywhere() {
        let mut seed = 7u64;
        for &ty in ALL_TYPES.iter().filter(|t| !t.is_dense()) {
            let cols = if ty.block_values() == 256 { 512 } else { 96 };
            let rows = 37;
            let data: Vec<u8> = (0..rows)
                .flat_map(|_| random_row(ty, cols, &mut seed))
                .collect();
            let w = QMatrix::new(ty, rows, cols, &data).unwrap();
            let x: Vec<f32> = (0..9 * cols)
                .map(|i| ((i as f32 * 0.37).sin()) * if i % 53 == 0 { 30.0 } else { 1.0 })
                .collect();
            let which: Vec<usize> = (0..9).collect();
            let a = GemmActs::quantize(&x, cols, &which);
            let mut want = Tile::default();
            want.reset(cols, true);
            let rb = w.row_bytes();
            for i in 0..IG_ROWS {
                decode_row_scalar(
                    ty,
                    &data[(32 + i % 5) * rb..(33 + i % 5) * rb],
                    i,
                    &mut want,
                );
            }
            // Tile rows 32 + i % 5: the tile's rows repeat 5 of the matrix's, past its end.
            let rep: Vec<u8> = (0..IG_ROWS)
                .flat_map(|i| data[(32 + i % 5) * rb..(33 + i % 5) * rb].to_vec())
                .collect();
            let wr = QMatrix::new(ty, IG_ROWS, cols, &rep).unwrap();
            for isa in Isa::available() {
                let mut t = Tile::default();
                t.decode(isa, &wr, 0, IG_ROWS);
                assert_eq!(t.q, want.q, "{} {}", ty.name(), isa.name());
                assert_eq!(t.s, want.s, "{} {}", ty.name(), isa.name());
                let bits = |v: &[f32]| v.iter().map(|f| (f + 0.0).to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&t.m), bits(&want.m), "{} {}", ty.name(), isa.name());
                // A tile past the matrix's last row: its rows beyond are zeros.
                let mut part = Tile::default();
                part.decode(isa, &wr, 0, 21);
                for kk in 0..cols {
                    for i in 0..IG_ROWS {
                        let at = (kk / 2) * 2 * IG_ROWS + 2 * i + kk % 2;
                        let v = if i < 21 { want.q[at] } else { 0 };
                        assert_eq!(part.q[at], v, "{} {} row {i}", ty.name(), isa.name());
                    }
                }
                let (g, mins) = (group(ty), has_mins(ty));
                for (b0, n) in [(0, 6), (6, 3), (8, 1), (2, 5)] {
                    let mut r1 = [[0f32; IG_ROWS]; IG_COLS];
                    let mut r2 = [[0f32; IG_ROWS]; IG_COLS];
                    reference(&want, g, mins, &a, b0, n, &mut r1);
                    block(isa, &t, g, mins, &a, b0, n, &mut r2);
                    assert_eq!(r1, r2, "{} {} rows {b0}+{n}", ty.name(), isa.name());
                    if n == 6 && b0 == 0 {
                        // A row's result is the same in any block.
                        let mut r3 = [[0f32; IG_ROWS]; IG_COLS];
                        block(isa, &t, g, mins, &a, 2, 1, &mut r3);
                        assert_eq!(r3[0], r1[2], "{} {}", ty.name(), isa.name());
                    }
                }
            }
        }
    }

    /// The quantized activations are within half a step of the input, and padded rows are zero.
    #[test]
    fn activations_carry_15_bits() {
        let cols = 64;
        let x: Vec<f32> = (0..3 * cols)
            .map(|i| (i as f32 * 0.731).sin() * (1 + i % 7) as f32)
            .chain([0.0; 64])
            .collect();
        let a = GemmActs::quantize(&x, cols, &[0, 1, 2, 3]);
        assert_eq!(a.rows, IG_COLS);
        for j in 0..4 {
            for i in 0..cols {
                let v = x[j * cols + i];
                let step = a.d[(j * cols + i) / 32];
                assert!((a.value(j, i) - v).abs() <= step * 0.5001, "{j} {i}");
            }
        }
        assert!(a.a[4 * cols..].iter().all(|&v| v == 0));
        // The portable compilation and the AVX-512 one round alike.
        let n = 3 * cols;
        let mut p = (
            vec![0i16; n],
            vec![0f32; n / 32],
            vec![0f32; n / 16],
            vec![0f32; n / 32],
        );
        quantize_row(&x[..n], &mut p.0, &mut p.1, &mut p.2, &mut p.3);
        assert_eq!(p.0, a.a[..n]);
        assert_eq!(
            (p.1.as_slice(), p.2.as_slice()),
            (&a.d[..n / 32], &a.ds16[..n / 16])
        );
        assert_eq!(p.3, a.ds32[..n / 32]);
        #[cfg(target_arch = "x86_64")]
        if crate::x86::has_avx2() {
            let mut v = (
                vec![0i16; n],
                vec![0f32; n / 32],
                vec![0f32; n / 16],
                vec![0f32; n / 32],
            );
            // SAFETY: AVX2 was detected.
            unsafe {
                crate::x86::igemm_quantize_row_avx2(&x[..n], &mut v.0, &mut v.1, &mut v.2, &mut v.3)
            };
            assert_eq!(v, p);
        }
    }
}
