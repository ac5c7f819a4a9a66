//! x86-64 kernels: every format's 32-value chunk unpacked into one 256-bit vector of small
//! integers, then either integer dot products with quantized activations (AVX2 `maddubs`, or
//! AVX-512 VNNI `vpdpbusd`) or f32 FMAs against f32 activations (the exact path). The
//! instruction set is picked at run time; both variants are compiled from the same source.

use crate::act::QActs;
use crate::format::{GgmlType, IQ4_VALUES, iq4xs_scale, q3k_scales, scale_min_k4};
use crate::kernel::{Isa, Out};
use std::arch::x86_64::*;
use std::ops::Range;

pub(crate) fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

pub(crate) fn has_vnni() -> bool {
    has_avx2()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

/// Per-16-value scale and min of a chunk: value = s * (q - OFF) + m.
#[derive(Clone, Copy)]
struct Sc {
    s: [f32; 2],
    m: [f32; 2],
}

/// One block format as the x86 kernels see it.
trait Fmt {
    const PER: usize;
    const BYTES: usize;
    /// Values are signed bytes (else unsigned, minus `OFF`).
    const SIGNED: bool;
    const OFF: i32;
    /// Both halves of every chunk share scale and min.
    const UNIFORM: bool;
    /// Whether `m - OFF * s` can be non-zero (a correction from the activation sums).
    const CORR: bool;
    /// Chunk `c` of the block at `b`: 32 values and their scales.
    unsafe fn unpack(b: *const u8, c: usize) -> (__m256i, Sc);
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn h2f(p: *const u8) -> f32 {
    let bits = unsafe { u16::from_le_bytes([*p, *p.add(1)]) };
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load256(p: *const u8) -> __m256i {
    unsafe { _mm256_loadu_si256(p as *const __m256i) }
}

/// 16 bytes of nibbles -> 32 values: the low nibbles, then the high ones.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let raw = unsafe { _mm_loadu_si128(p as *const __m128i) };
    let m = _mm_set1_epi8(0x0F);
    let lo = _mm_and_si128(raw, m);
    let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m);
    _mm256_set_m128i(hi, lo)
}

/// The IQ4 code book applied to 16 bytes of nibbles.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn iq4(p: *const u8) -> __m256i {
    let raw = unsafe { _mm_loadu_si128(p as *const __m128i) };
    let table = unsafe { _mm_loadu_si128(IQ4_VALUES.as_ptr() as *const __m128i) };
    let m = _mm_set1_epi8(0x0F);
    let lo = _mm_shuffle_epi8(table, _mm_and_si128(raw, m));
    let hi = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(raw, 4), m));
    _mm256_set_m128i(hi, lo)
}

/// 32 bits -> 32 bytes, 0xFF where the bit is set.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn bits32(p: *const u8) -> __m256i {
    let x = unsafe { (p as *const u32).read_unaligned() };
    let shuf = _mm256_set_epi64x(
        0x0303030303030303,
        0x0202020202020202,
        0x0101010101010101,
        0,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x as i32), shuf);
    let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
}

/// Bit `bit` of each of 32 bytes -> 32 bytes of `val` or 0.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn bit_of(v: __m256i, bit: u32, val: i8) -> __m256i {
    let m = _mm256_set1_epi8((1u8 << bit) as i8);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(v, m), m);
    _mm256_and_si256(set, _mm256_set1_epi8(val))
}

/// `(v >> shift) & mask` per byte, for shifts up to 6.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn shr_mask(v: __m256i, shift: u32, mask: i8) -> __m256i {
    let s = _mm256_srl_epi16(v, _mm_cvtsi32_si128(shift as i32));
    _mm256_and_si256(s, _mm256_set1_epi8(mask))
}

macro_rules! fmt {
    ($name:ident, $per:expr, $bytes:expr, $signed:expr, $off:expr, $uniform:expr, $corr:expr,
     |$b:ident, $c:ident| $body:block) => {
        struct $name;
        impl Fmt for $name {
            const PER: usize = $per;
            const BYTES: usize = $bytes;
            const SIGNED: bool = $signed;
            const OFF: i32 = $off;
            const UNIFORM: bool = $uniform;
            const CORR: bool = $corr;
            #[target_feature(enable = "avx2,fma,f16c")]
            #[inline]
            #[allow(unused_variables, unused_unsafe)]
            unsafe fn unpack($b: *const u8, $c: usize) -> (__m256i, Sc) {
                unsafe { $body }
            }
        }
    };
}

fmt!(Q40, 32, 18, false, 8, true, true, |b, c| {
    let d = h2f(b);
    (
        nibbles(b.add(2)),
        Sc {
            s: [d; 2],
            m: [0.0; 2],
        },
    )
});
fmt!(Q41, 32, 20, false, 0, true, true, |b, c| {
    let (d, m) = (h2f(b), h2f(b.add(2)));
    (
        nibbles(b.add(4)),
        Sc {
            s: [d; 2],
            m: [m; 2],
        },
    )
});
fmt!(Q50, 32, 22, false, 16, true, true, |b, c| {
    let d = h2f(b);
    let hi = _mm256_and_si256(bits32(b.add(2)), _mm256_set1_epi8(0x10));
    (
        _mm256_or_si256(nibbles(b.add(6)), hi),
        Sc {
            s: [d; 2],
            m: [0.0; 2],
        },
    )
});
fmt!(Q51, 32, 24, false, 0, true, true, |b, c| {
    let (d, m) = (h2f(b), h2f(b.add(2)));
    let hi = _mm256_and_si256(bits32(b.add(4)), _mm256_set1_epi8(0x10));
    (
        _mm256_or_si256(nibbles(b.add(8)), hi),
        Sc {
            s: [d; 2],
            m: [m; 2],
        },
    )
});
fmt!(Q80, 32, 34, true, 0, true, false, |b, c| {
    let d = h2f(b);
    (
        load256(b.add(2)),
        Sc {
            s: [d; 2],
            m: [0.0; 2],
        },
    )
});
fmt!(IQ4NL, 32, 18, true, 0, true, false, |b, c| {
    let d = h2f(b);
    (
        iq4(b.add(2)),
        Sc {
            s: [d; 2],
            m: [0.0; 2],
        },
    )
});
fmt!(Q2K, 256, 84, false, 0, false, true, |b, c| {
    let (d, dmin) = (h2f(b.add(80)), h2f(b.add(82)));
    let (half, j) = (c / 4, c % 4);
    let v = shr_mask(load256(b.add(16 + 32 * half)), 2 * j as u32, 3);
    let (s0, s1) = (*b.add(2 * c), *b.add(2 * c + 1));
    let sc = Sc {
        s: [d * (s0 & 0xF) as f32, d * (s1 & 0xF) as f32],
        m: [-(dmin * (s0 >> 4) as f32), -(dmin * (s1 >> 4) as f32)],
    };
    (v, sc)
});
fmt!(Q3K, 256, 110, false, 4, false, true, |b, c| {
    let d = h2f(b.add(108));
    let sc = q3k_scales(std::slice::from_raw_parts(b.add(96), 12));
    let (half, j) = (c / 4, c % 4);
    let low = shr_mask(load256(b.add(32 + 32 * half)), 2 * j as u32, 3);
    let high = bit_of(load256(b), (4 * half + j) as u32, 4);
    let s = [d * sc[2 * c] as f32, d * sc[2 * c + 1] as f32];
    (_mm256_or_si256(low, high), Sc { s, m: [0.0; 2] })
});
fmt!(Q4K, 256, 144, false, 0, true, true, |b, c| {
    let (d, dmin) = (h2f(b), h2f(b.add(2)));
    let (sc, m) = scale_min_k4(c, std::slice::from_raw_parts(b.add(4), 12));
    let v = shr_mask(load256(b.add(16 + 32 * (c / 2))), 4 * (c % 2) as u32, 0x0F);
    let (s, m) = (d * sc as f32, -(dmin * m as f32));
    (
        v,
        Sc {
            s: [s; 2],
            m: [m; 2],
        },
    )
});
fmt!(Q5K, 256, 176, false, 0, true, true, |b, c| {
    let (d, dmin) = (h2f(b), h2f(b.add(2)));
    let (sc, m) = scale_min_k4(c, std::slice::from_raw_parts(b.add(4), 12));
    let low = shr_mask(load256(b.add(48 + 32 * (c / 2))), 4 * (c % 2) as u32, 0x0F);
    let high = bit_of(load256(b.add(16)), c as u32, 16);
    let (s, m) = (d * sc as f32, -(dmin * m as f32));
    (
        _mm256_or_si256(low, high),
        Sc {
            s: [s; 2],
            m: [m; 2],
        },
    )
});
fmt!(Q6K, 256, 210, false, 32, false, true, |b, c| {
    let d = h2f(b.add(208));
    let (half, quarter) = (c / 4, c % 4);
    let ql = load256(b.add(64 * half + 32 * (quarter & 1)));
    let low = shr_mask(ql, 4 * (quarter / 2) as u32, 0x0F);
    let qh = shr_mask(load256(b.add(128 + 32 * half)), 2 * quarter as u32, 3);
    let v = _mm256_or_si256(low, _mm256_slli_epi16(qh, 4));
    let (s0, s1) = (*b.add(192 + 2 * c) as i8, *b.add(193 + 2 * c) as i8);
    (
        v,
        Sc {
            s: [d * s0 as f32, d * s1 as f32],
            m: [0.0; 2],
        },
    )
});
fmt!(IQ4XS, 256, 136, true, 0, true, false, |b, c| {
    let d = h2f(b);
    let dl = d * iq4xs_scale(std::slice::from_raw_parts(b, 8), c) as f32;
    (
        iq4(b.add(8 + 16 * c)),
        Sc {
            s: [dl; 2],
            m: [0.0; 2],
        },
    )
});

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// The 32 values of a chunk as 4 x 8 f32: `s * (q - OFF) + m`, multiply then add as ggml does.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn to_f32<F: Fmt>(v: __m256i, sc: Sc) -> [__m256; 4] {
    let lo = _mm256_castsi256_si128(v);
    let hi = _mm256_extracti128_si256(v, 1);
    let parts = [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)];
    let off = _mm256_set1_epi32(F::OFF);
    let mut out = [_mm256_setzero_ps(); 4];
    for g in 0..4 {
        let q = if F::SIGNED {
            _mm256_cvtepi8_epi32(parts[g])
        } else {
            _mm256_cvtepu8_epi32(parts[g])
        };
        let q = _mm256_cvtepi32_ps(_mm256_sub_epi32(q, off));
        let h = g / 2;
        out[g] = _mm256_add_ps(
            _mm256_mul_ps(_mm256_set1_ps(sc.s[h]), q),
            _mm256_set1_ps(sc.m[h]),
        );
    }
    out
}

/// 32 values of a dense row at `p` as 4 x 8 f32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dense32(ty: GgmlType, p: *const u8) -> [__m256; 4] {
    let mut out = [_mm256_setzero_ps(); 4];
    for (g, o) in out.iter_mut().enumerate() {
        *o = unsafe {
            match ty {
                GgmlType::F32 => _mm256_loadu_ps((p as *const f32).add(8 * g)),
                GgmlType::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p.add(16 * g) as *const __m128i)),
                _ => _mm256_castsi256_ps(_mm256_slli_epi32(
                    _mm256_cvtepu16_epi32(_mm_loadu_si128(p.add(16 * g) as *const __m128i)),
                    16,
                )),
            }
        };
    }
    out
}

macro_rules! isa_kernels {
    ($m:ident, $feat:tt, $vnni:expr) => {
        mod $m {
            use super::*;

            /// Sums of 4 products of unsigned `v` and signed `x` bytes, as 8 x i32.
            #[target_feature(enable = $feat)]
            #[inline]
            #[allow(unused_unsafe)]
            fn dot(v: __m256i, x: __m256i) -> __m256i {
                if $vnni {
                    // SAFETY: only reached in the VNNI instantiation, whose features include it.
                    unsafe { _mm256_dpbusd_epi32(_mm256_setzero_si256(), v, x) }
                } else {
                    _mm256_madd_epi16(_mm256_maddubs_epi16(v, x), _mm256_set1_epi16(1))
                }
            }

            /// Rows `r0..r0+R` against activation rows `b0..b0+B`, quantized activations.
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn fast<F: Fmt, const R: usize, const B: usize>(
                w: *const u8,
                row_bytes: usize,
                r0: usize,
                a: &QActs,
                b0: usize,
                out: &Out,
            ) {
                let cols = a.cols;
                let chunks = cols / 32;
                let cpb = F::PER / 32;
                let mut acc = [[_mm256_setzero_ps(); B]; R];
                let mut sacc = [[0f32; B]; R];
                let (qp, dp, sp) = (a.q.as_ptr(), a.d.as_ptr(), a.sums.as_ptr());
                for k in 0..chunks {
                    let blk = (k / cpb) * F::BYTES;
                    let c = k % cpb;
                    let mut xs = [_mm256_setzero_si256(); B];
                    let mut dx = [0f32; B];
                    let mut s = [[0f32; 2]; B];
                    for bi in 0..B {
                        let b = b0 + bi;
                        // SAFETY: the caller checked the activation rows exist.
                        unsafe {
                            xs[bi] = load256(qp.add(b * cols + 32 * k) as *const u8);
                            dx[bi] = *dp.add(b * chunks + k);
                            s[bi] = [
                                *sp.add(b * 2 * chunks + 2 * k) as f32,
                                *sp.add(b * 2 * chunks + 2 * k + 1) as f32,
                            ];
                        }
                    }
                    for ri in 0..R {
                        // SAFETY: the caller checked the weight rows exist.
                        let (v, sc) = unsafe { F::unpack(w.add((r0 + ri) * row_bytes + blk), c) };
                        let corr = [
                            sc.m[0] - F::OFF as f32 * sc.s[0],
                            sc.m[1] - F::OFF as f32 * sc.s[1],
                        ];
                        let vu = if F::SIGNED { _mm256_sign_epi8(v, v) } else { v };
                        for bi in 0..B {
                            let xx = if F::SIGNED {
                                _mm256_sign_epi8(xs[bi], v)
                            } else {
                                xs[bi]
                            };
                            let p = _mm256_cvtepi32_ps(dot(vu, xx));
                            let sv = if F::UNIFORM {
                                _mm256_set1_ps(sc.s[0] * dx[bi])
                            } else {
                                _mm256_set_m128(
                                    _mm_set1_ps(sc.s[1] * dx[bi]),
                                    _mm_set1_ps(sc.s[0] * dx[bi]),
                                )
                            };
                            acc[ri][bi] = _mm256_fmadd_ps(sv, p, acc[ri][bi]);
                            if F::CORR {
                                sacc[ri][bi] += dx[bi] * (corr[0] * s[bi][0] + corr[1] * s[bi][1]);
                            }
                        }
                    }
                }
                for ri in 0..R {
                    for bi in 0..B {
                        out.set(b0 + bi, r0 + ri, hsum(acc[ri][bi]) + sacc[ri][bi]);
                    }
                }
            }

            /// Row `r` against f32 activation rows `b0..b0+B`, weights dequantized in registers.
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn exact<F: Fmt, const B: usize>(
                w: *const u8,
                row_bytes: usize,
                r: usize,
                x: *const f32,
                cols: usize,
                b0: usize,
                out: &Out,
            ) {
                let cpb = F::PER / 32;
                let mut acc = [[_mm256_setzero_ps(); 4]; B];
                for k in 0..cols / 32 {
                    // SAFETY: the caller checked the weight row and activation rows exist.
                    unsafe {
                        let (v, sc) =
                            F::unpack(w.add(r * row_bytes + (k / cpb) * F::BYTES), k % cpb);
                        let wf = to_f32::<F>(v, sc);
                        for bi in 0..B {
                            let xp = x.add((b0 + bi) * cols + 32 * k);
                            for g in 0..4 {
                                let xv = _mm256_loadu_ps(xp.add(8 * g));
                                acc[bi][g] = _mm256_fmadd_ps(wf[g], xv, acc[bi][g]);
                            }
                        }
                    }
                }
                for bi in 0..B {
                    let a = &acc[bi];
                    let s = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
                    out.set(b0 + bi, r, hsum(s));
                }
            }

            /// A dense (F32/F16/BF16) row against f32 activation rows; any column count.
            #[target_feature(enable = $feat)]
            #[allow(clippy::too_many_arguments)]
            pub(super) unsafe fn exact_dense<const B: usize>(
                ty: GgmlType,
                w: *const u8,
                row_bytes: usize,
                r: usize,
                x: *const f32,
                cols: usize,
                b0: usize,
                out: &Out,
            ) {
                let esize = row_bytes / cols.max(1);
                // SAFETY: the caller checked the weight row and activation rows exist.
                let row = unsafe { std::slice::from_raw_parts(w.add(r * row_bytes), row_bytes) };
                let mut acc = [[_mm256_setzero_ps(); 4]; B];
                let whole = cols / 32 * 32;
                for k0 in (0..whole).step_by(32) {
                    // SAFETY: as above.
                    unsafe {
                        let wf = dense32(ty, row.as_ptr().add(k0 * esize));
                        for bi in 0..B {
                            let xp = x.add((b0 + bi) * cols + k0);
                            for g in 0..4 {
                                let xv = _mm256_loadu_ps(xp.add(8 * g));
                                acc[bi][g] = _mm256_fmadd_ps(wf[g], xv, acc[bi][g]);
                            }
                        }
                    }
                }
                let mut tail = [0f32; 32];
                crate::kernel::dense_chunk(ty, row, whole, cols - whole, &mut tail);
                for bi in 0..B {
                    let a = &acc[bi];
                    let s = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
                    let mut t = hsum(s);
                    for (i, wv) in tail[..cols - whole].iter().enumerate() {
                        // SAFETY: as above.
                        t += wv * unsafe { *x.add((b0 + bi) * cols + whole + i) };
                    }
                    out.set(b0 + bi, r, t);
                }
            }
        }
    };
}

isa_kernels!(avx2, "avx2,fma,f16c", false);
isa_kernels!(
    vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    true
);

/// Tiles rows and activation rows and runs the kernel of `isa` for format `F`.
fn go_fast<F: Fmt>(isa: Isa, w: &[u8], rows: Range<usize>, a: &QActs, out: &Out) {
    let row_bytes = a.cols / F::PER * F::BYTES;
    assert!(
        w.len() >= rows.end * row_bytes,
        "weights shorter than their rows"
    );
    assert!(a.q.len() >= a.rows * a.cols && a.cols.is_multiple_of(F::PER));
    let n = a.rows;
    let p = w.as_ptr();
    macro_rules! call {
        ($r:expr, $b:expr, $r0:expr, $b0:expr) => {
            // SAFETY: the asserts above bound every row and activation row the kernel reads,
            // and the instruction set was detected at run time.
            unsafe {
                match isa {
                    Isa::Avx512Vnni => vnni::fast::<F, $r, $b>(p, row_bytes, $r0, a, $b0, out),
                    _ => avx2::fast::<F, $r, $b>(p, row_bytes, $r0, a, $b0, out),
                }
            }
        };
    }
    let mut r = rows.start;
    if n < 4 {
        while r + 4 <= rows.end {
            for b in 0..n {
                call!(4, 1, r, b);
            }
            r += 4;
        }
        while r < rows.end {
            for b in 0..n {
                call!(1, 1, r, b);
            }
            r += 1;
        }
        return;
    }
    while r < rows.end {
        let two = r + 2 <= rows.end;
        let mut b = 0;
        while b + 4 <= n {
            if two {
                call!(2, 4, r, b);
            } else {
                call!(1, 4, r, b);
            }
            b += 4;
        }
        while b < n {
            if two {
                call!(2, 1, r, b);
            } else {
                call!(1, 1, r, b);
            }
            b += 1;
        }
        r += if two { 2 } else { 1 };
    }
}

fn go_exact<F: Fmt>(
    isa: Isa,
    w: &[u8],
    rows: Range<usize>,
    x: &[f32],
    n: usize,
    cols: usize,
    out: &Out,
) {
    let row_bytes = cols / F::PER * F::BYTES;
    assert!(w.len() >= rows.end * row_bytes && x.len() >= n * cols);
    assert!(cols.is_multiple_of(F::PER));
    let (p, xp) = (w.as_ptr(), x.as_ptr());
    for r in rows {
        let mut b = 0;
        // SAFETY: bounded by the asserts above; the instruction set was detected at run time.
        unsafe {
            while b + 4 <= n {
                match isa {
                    Isa::Avx512Vnni => vnni::exact::<F, 4>(p, row_bytes, r, xp, cols, b, out),
                    _ => avx2::exact::<F, 4>(p, row_bytes, r, xp, cols, b, out),
                }
                b += 4;
            }
            while b < n {
                match isa {
                    Isa::Avx512Vnni => vnni::exact::<F, 1>(p, row_bytes, r, xp, cols, b, out),
                    _ => avx2::exact::<F, 1>(p, row_bytes, r, xp, cols, b, out),
                }
                b += 1;
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn go_dense(
    isa: Isa,
    ty: GgmlType,
    w: &[u8],
    rows: Range<usize>,
    x: &[f32],
    n: usize,
    cols: usize,
    out: &Out,
) {
    let row_bytes = cols * ty.block_bytes();
    assert!(w.len() >= rows.end * row_bytes && x.len() >= n * cols);
    let (p, xp) = (w.as_ptr(), x.as_ptr());
    for r in rows {
        let mut b = 0;
        // SAFETY: bounded by the assert above; the instruction set was detected at run time.
        unsafe {
            while b + 4 <= n {
                match isa {
                    Isa::Avx512Vnni => {
                        vnni::exact_dense::<4>(ty, p, row_bytes, r, xp, cols, b, out)
                    }
                    _ => avx2::exact_dense::<4>(ty, p, row_bytes, r, xp, cols, b, out),
                }
                b += 4;
            }
            while b < n {
                match isa {
                    Isa::Avx512Vnni => {
                        vnni::exact_dense::<1>(ty, p, row_bytes, r, xp, cols, b, out)
                    }
                    _ => avx2::exact_dense::<1>(ty, p, row_bytes, r, xp, cols, b, out),
                }
                b += 1;
            }
        }
    }
}

macro_rules! by_type {
    ($ty:expr, $f:ident, $($args:expr),*) => {
        match $ty {
            GgmlType::Q4_0 => $f::<Q40>($($args),*),
            GgmlType::Q4_1 => $f::<Q41>($($args),*),
            GgmlType::Q5_0 => $f::<Q50>($($args),*),
            GgmlType::Q5_1 => $f::<Q51>($($args),*),
            GgmlType::Q8_0 => $f::<Q80>($($args),*),
            GgmlType::IQ4_NL => $f::<IQ4NL>($($args),*),
            GgmlType::Q2_K => $f::<Q2K>($($args),*),
            GgmlType::Q3_K => $f::<Q3K>($($args),*),
            GgmlType::Q4_K => $f::<Q4K>($($args),*),
            GgmlType::Q5_K => $f::<Q5K>($($args),*),
            GgmlType::Q6_K => $f::<Q6K>($($args),*),
            GgmlType::IQ4_XS => $f::<IQ4XS>($($args),*),
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => unreachable!("dense"),
        }
    };
}

pub(crate) fn rows_fast(
    isa: Isa,
    ty: GgmlType,
    w: &[u8],
    rows: Range<usize>,
    a: &QActs,
    out: &Out,
) {
    by_type!(ty, go_fast, isa, w, rows, a, out)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn rows_exact(
    isa: Isa,
    ty: GgmlType,
    w: &[u8],
    rows: Range<usize>,
    x: &[f32],
    n: usize,
    cols: usize,
    out: &Out,
) {
    if ty.is_dense() {
        return go_dense(isa, ty, w, rows, x, n, cols, out);
    }
    by_type!(ty, go_exact, isa, w, rows, x, n, cols, out)
}
