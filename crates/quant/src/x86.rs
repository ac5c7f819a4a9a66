//! x86-64 kernels: every format's 32-value chunk unpacked into one 256-bit vector of small
//! integers (two chunks into one 512-bit vector on AVX-512), then either integer dot products
//! with quantized activations (`maddubs` on AVX2 and on AVX-512 without VNNI, and `vpmaddwd`
//! on 16-bit values for AVX2's signed formats; `vpdpbusd` on AVX-VNNI and AVX-512 VNNI) or f32
//! FMAs against f32 activations (the exact path, one AVX2 compilation for every instruction
//! set).
//! The instruction set is picked at run time. Super-block formats decode their scales once per
//! block at either width; weights are prefetched ahead of the row being read.

// The kernels index several small arrays (rows x activation rows of a tile) by position.
#![allow(clippy::needless_range_loop)]

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

pub(crate) fn has_avx_vnni() -> bool {
    has_avx2() && is_x86_feature_detected!("avxvnni")
}

/// AVX-512 F, BW, DQ and VL: what the 512-bit kernels need besides VNNI.
pub(crate) fn has_avx512bw() -> bool {
    has_avx2()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512dq")
        && is_x86_feature_detected!("avx512vl")
}

pub(crate) fn has_avx512() -> bool {
    has_avx512bw() && is_x86_feature_detected!("avx512vnni")
}

/// [`crate::act::QActs`] quantization of 16-value blocks: the same operations as the portable
/// `quantize_block` (max |x|, step = max / 127, both planes rounded to nearest even), 8 at a time,
/// and the planes joined into 16 bits where asked (`x16`).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_rows(
    x: &[f32],
    (q, q2, mut x16): (&mut [i8], &mut [i8], Option<&mut [i16]>),
    d: &mut [f32],
    sums: &mut [i32],
) {
    let n = x.len();
    assert!(q.len() == n && q2.len() == n && x16.as_ref().is_none_or(|x| x.len() == n));
    assert!(d.len() * 16 == n && sums.len() * 16 == n);
    let sign = _mm256_set1_ps(-0.0);
    let (lim_hi, lim_lo) = (_mm256_set1_epi32(127), _mm256_set1_epi32(-127));
    // i32 -> i8, 16 of them: [0..4, 8..12 | 4..8, 12..16] after the i16 pack, then in order.
    let pack = |a: __m256i, b: __m256i| {
        let w = _mm256_packs_epi32(a, b);
        let w = _mm256_permute4x64_epi64(w, 0b11_01_10_00);
        _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1))
    };
    for blk in 0..n / 16 {
        let p = unsafe { x.as_ptr().add(16 * blk) };
        let v: [__m256; 2] = std::array::from_fn(|g| unsafe { _mm256_loadu_ps(p.add(8 * g)) });
        let m = _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1]));
        let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
        let step = amax / 127.0;
        let inv = if step != 0.0 { 1.0 / step } else { 0.0 };
        let inv2 = if step != 0.0 { 256.0 / step } else { 0.0 };
        d[blk] = step / 256.0;
        let (iv, iv2, sv) = (
            _mm256_set1_ps(inv),
            _mm256_set1_ps(inv2),
            _mm256_set1_ps(step),
        );
        let clamp = |i: __m256i| _mm256_max_epi32(_mm256_min_epi32(i, lim_hi), lim_lo);
        let hi: [__m256i; 2] =
            std::array::from_fn(|g| clamp(_mm256_cvtps_epi32(_mm256_mul_ps(v[g], iv))));
        let lo: [__m256i; 2] = std::array::from_fn(|g| {
            let err = _mm256_sub_ps(v[g], _mm256_mul_ps(sv, _mm256_cvtepi32_ps(hi[g])));
            clamp(_mm256_cvtps_epi32(_mm256_mul_ps(err, iv2)))
        });
        unsafe {
            _mm_storeu_si128(
                q.as_mut_ptr().add(16 * blk) as *mut __m128i,
                pack(hi[0], hi[1]),
            );
            _mm_storeu_si128(
                q2.as_mut_ptr().add(16 * blk) as *mut __m128i,
                pack(lo[0], lo[1]),
            );
            if let Some(x16) = x16.as_deref_mut() {
                // 256 * hi + lo fits 16 bits; the pack's lane order undone as above.
                let j: [__m256i; 2] =
                    std::array::from_fn(|g| _mm256_add_epi32(_mm256_slli_epi32(hi[g], 8), lo[g]));
                let w = _mm256_permute4x64_epi64(_mm256_packs_epi32(j[0], j[1]), 0b11_01_10_00);
                _mm256_storeu_si256(x16.as_mut_ptr().add(16 * blk) as *mut __m256i, w);
            }
        }
        let s = _mm256_add_epi32(
            _mm256_slli_epi32(_mm256_add_epi32(hi[0], hi[1]), 8),
            _mm256_add_epi32(lo[0], lo[1]),
        );
        let t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        let t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0b01_00_11_10));
        let t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0b10_11_00_01));
        sums[blk] = _mm_cvtsi128_si32(t);
    }
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
    /// Whether `m - OFF * s` can be non-zero (a correction from the activation sums).
    const CORR: bool;
    /// Chunk `c` of the block at `b`: 32 values and their scales.
    unsafe fn unpack(b: *const u8, c: usize) -> (__m256i, Sc);

    /// Chunks `c` and `c + 1` (for 32-value blocks: the block at `b` and the next) as 64 values
    /// in order, with the scales and mins of their four 16-value halves.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")]
    #[inline]
    unsafe fn unpack2(b: *const u8, c: usize) -> (__m512i, Sc2) {
        unsafe { pair::<Self>(b, c) }
    }

    /// For super-block formats: the scale and min of each of the block's sixteen 16-value
    /// halves, decoded once for the whole block (halves 0..8, then 8..16).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn block_scales(b: *const u8) -> ([__m256; 2], [__m256; 2]) {
        let (mut s, mut m) = ([0f32; 16], [0f32; 16]);
        for c in 0..Self::PER / 32 {
            // SAFETY: chunk c of the caller's block; only its scales are used.
            let (_, sc) = unsafe { Self::unpack(b, c) };
            s[2 * c..2 * c + 2].copy_from_slice(&sc.s);
            m[2 * c..2 * c + 2].copy_from_slice(&sc.m);
        }
        // SAFETY: 16 floats each.
        unsafe {
            (
                [
                    _mm256_loadu_ps(s.as_ptr()),
                    _mm256_loadu_ps(s.as_ptr().add(8)),
                ],
                [
                    _mm256_loadu_ps(m.as_ptr()),
                    _mm256_loadu_ps(m.as_ptr().add(8)),
                ],
            )
        }
    }

    /// [`Fmt::block_scales`] in one 512-bit vector each.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")]
    #[inline]
    unsafe fn block_scales16(b: *const u8) -> (__m512, __m512) {
        // SAFETY: the caller's block.
        let (s, m) = unsafe { Self::block_scales(b) };
        (
            _mm512_insertf32x8(_mm512_castps256_ps512(s[0]), s[1], 1),
            _mm512_insertf32x8(_mm512_castps256_ps512(m[0]), m[1], 1),
        )
    }
}

/// The low eight bytes of `bytes` as f32, each times `d` (`signed`: as i8, else as u8).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn bytes8_times(bytes: __m128i, signed: bool, d: f32) -> __m256 {
    let i = if signed {
        _mm256_cvtepi8_epi32(bytes)
    } else {
        _mm256_cvtepu8_epi32(bytes)
    };
    _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(i))
}

/// Each of a chunk's two halves given its chunk's value: `[v0, v0, v1, v1, ..]` from the first
/// (`hi` false) or last four of eight.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn twice(v: __m256, hi: bool) -> __m256 {
    let idx = if hi {
        _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7)
    } else {
        _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3)
    };
    _mm256_permutevar8x32_ps(v, idx)
}

/// Q4_K / Q5_K: the 8 six-bit scales and mins of the super-block at `b`, as the scale and min
/// of each 16-value half (`d * sc`, `-(dmin * m)`, as the chunk decoder computes them).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn k4_scales(b: *const u8) -> ([__m256; 2], [__m256; 2]) {
    unsafe {
        let (d, dmin) = (h2f(b), h2f(b.add(2)));
        let q = b.add(4);
        let w = |i: usize| (q.add(4 * i) as *const u32).read_unaligned();
        let (k1, k2, k3) = (0x3f3f_3f3fu32, 0x0f0f_0f0fu32, 0x0303_0303u32);
        let (w0, w1, w2) = (w(0), w(1), w(2));
        // Scales 0..4 and 4..8, then mins 0..4 and 4..8, one byte each.
        let sc_lo = w0 & k1;
        let sc_hi = (w2 & k2) | (((w0 >> 6) & k3) << 4);
        let m_lo = w1 & k1;
        let m_hi = ((w2 >> 4) & k2) | (((w1 >> 6) & k3) << 4);
        let sc = bytes8_times(_mm_setr_epi32(sc_lo as i32, sc_hi as i32, 0, 0), false, d);
        let m = bytes8_times(_mm_setr_epi32(m_lo as i32, m_hi as i32, 0, 0), false, dmin);
        let m = _mm256_xor_ps(m, _mm256_set1_ps(-0.0));
        (
            [twice(sc, false), twice(sc, true)],
            [twice(m, false), twice(m, true)],
        )
    }
}

/// Q2_K: the 16 four-bit scales and mins of the super-block at `b`, times `d` and `-dmin`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q2k_scales(b: *const u8) -> ([__m256; 2], [__m256; 2]) {
    unsafe {
        let (d, dmin) = (h2f(b.add(80)), h2f(b.add(82)));
        let raw = _mm_loadu_si128(b as *const __m128i);
        let lo = _mm_and_si128(raw, _mm_set1_epi8(0x0F));
        let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0F));
        let neg = _mm256_set1_ps(-0.0);
        (
            [
                bytes8_times(lo, false, d),
                bytes8_times(_mm_srli_si128(lo, 8), false, d),
            ],
            [
                _mm256_xor_ps(bytes8_times(hi, false, dmin), neg),
                _mm256_xor_ps(bytes8_times(_mm_srli_si128(hi, 8), false, dmin), neg),
            ],
        )
    }
}

/// Sixteen signed scale bytes at `p`, times `d`; no mins.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn signed16_scales(p: *const u8, d: f32) -> ([__m256; 2], [__m256; 2]) {
    let raw = unsafe { _mm_loadu_si128(p as *const __m128i) };
    let zero = _mm256_set1_ps(-0.0);
    (
        [
            bytes8_times(raw, true, d),
            bytes8_times(_mm_srli_si128(raw, 8), true, d),
        ],
        [zero, zero],
    )
}

/// Q3_K: the 16 six-bit scales of the super-block at `b` (minus 32), times `d`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q3k_block_scales(b: *const u8) -> ([__m256; 2], [__m256; 2]) {
    unsafe {
        let sc = q3k_scales(std::slice::from_raw_parts(b.add(96), 12));
        signed16_scales(sc.as_ptr() as *const u8, h2f(b.add(108)))
    }
}

/// Q6_K: the 16 signed 8-bit scales of the super-block at `b`, times `d`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q6k_scales(b: *const u8) -> ([__m256; 2], [__m256; 2]) {
    unsafe { signed16_scales(b.add(192), h2f(b.add(208))) }
}

/// [`Fmt::unpack2`] from two [`Fmt::unpack`]s.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
unsafe fn pair<F: Fmt + ?Sized>(b: *const u8, c: usize) -> (__m512i, Sc2) {
    unsafe {
        let (v0, s0) = F::unpack(b, c);
        let (v1, s1) = if F::PER == 32 {
            F::unpack(b.add(F::BYTES), 0)
        } else {
            F::unpack(b, c + 1)
        };
        (
            _mm512_inserti64x4(_mm512_castsi256_si512(v0), v1, 1),
            Sc2 {
                s: _mm_setr_ps(s0.s[0], s0.s[1], s1.s[0], s1.s[1]),
                m: _mm_setr_ps(s0.m[0], s0.m[1], s1.m[0], s1.m[1]),
            },
        )
    }
}

/// Two halves `[lo, hi]` of 32 nibble bytes at `p` (as 16-byte rows `p`, `p + stride`):
/// `[A.lo, A.hi, B.lo, B.hi]` for A at `p`, B at `p + stride`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
unsafe fn nibbles2(p: *const u8, stride: usize) -> __m512i {
    unsafe {
        let a = _mm_loadu_si128(p as *const __m128i);
        let b = _mm_loadu_si128(p.add(stride) as *const __m128i);
        let ab = _mm256_inserti128_si256(_mm256_castsi128_si256(a), b, 1);
        let z = _mm512_inserti64x4(_mm512_castsi256_si512(ab), _mm256_srli_epi16(ab, 4), 1);
        let z = _mm512_and_si512(z, _mm512_set1_epi8(0x0F));
        // [A.lo, B.lo, A.hi, B.hi] -> [A.lo, A.hi, B.lo, B.hi]
        _mm512_shuffle_i64x2(z, z, 0b11_01_10_00)
    }
}

/// The f16 pairs (d, m) at `p` and `p + stride` as `([d0, d0, d1, d1], [m0, m0, m1, m1])`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
unsafe fn dm2(p: *const u8, stride: usize) -> (__m128, __m128) {
    unsafe {
        let a = (p as *const i32).read_unaligned();
        let b = (p.add(stride) as *const i32).read_unaligned();
        let f = _mm_cvtph_ps(_mm_setr_epi32(a, b, 0, 0)); // [d0, m0, d1, m1]
        (
            _mm_shuffle_ps(f, f, 0b10_10_00_00),
            _mm_shuffle_ps(f, f, 0b11_11_01_01),
        )
    }
}

/// Two f16 at `p` and `p + stride` as `[a, a, b, b]` f32.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
unsafe fn halves2(p: *const u8, stride: usize) -> __m128 {
    unsafe {
        let a = (p as *const u16).read_unaligned() as i32;
        let b = (p.add(stride) as *const u16).read_unaligned() as i32;
        _mm_cvtph_ps(_mm_setr_epi32(a | (a << 16), b | (b << 16), 0, 0))
    }
}

/// Scales and mins of the four 16-value halves of two chunks, as `[c.0, c.1, c+1.0, c+1.1]`.
#[derive(Clone, Copy)]
struct Sc2 {
    s: __m128,
    m: __m128,
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn h2f(p: *const u8) -> f32 {
    let bits = unsafe { u16::from_le_bytes([*p, *p.add(1)]) };
    // `vmovd` writes the whole register. Left to itself LLVM inserts the 16 bits into whatever
    // register is at hand (`vpinsrw`, as only lane 0 is used), which ties each block's scale to
    // the last value that register held: in the Q8_0 kernel, the accumulator, so every block
    // waited on the one before (half the speed on Zen 3).
    let v: __m128i;
    // SAFETY: `vmovd` from a general register reads and writes registers only.
    unsafe {
        std::arch::asm!(
            "vmovd {v}, {b:e}",
            v = lateout(xmm_reg) v,
            b = in(reg) bits as u32,
            options(pure, nomem, nostack, preserves_flags)
        )
    };
    _mm_cvtss_f32(_mm_cvtph_ps(v))
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
    ($name:ident, $per:expr, $bytes:expr, $signed:expr, $off:expr, $corr:expr,
     |$b:ident, $c:ident| $body:block $(, pair = $pair:path)? $(, scales = $scales:path)?) => {
        struct $name;
        impl Fmt for $name {
            const PER: usize = $per;
            const BYTES: usize = $bytes;
            const SIGNED: bool = $signed;
            const OFF: i32 = $off;
            const CORR: bool = $corr;
            #[target_feature(enable = "avx2,fma,f16c")]
            #[inline]
            #[allow(unused_variables, unused_unsafe)]
            unsafe fn unpack($b: *const u8, $c: usize) -> (__m256i, Sc) {
                unsafe { $body }
            }
            $(
            #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")]
            #[inline]
            unsafe fn unpack2(b: *const u8, c: usize) -> (__m512i, Sc2) {
                unsafe { $pair(b, c) }
            }
            )?
            $(
            #[target_feature(enable = "avx2,fma,f16c")]
            #[inline]
            unsafe fn block_scales(b: *const u8) -> ([__m256; 2], [__m256; 2]) {
                unsafe { $scales(b) }
            }
            )?
        }
    };
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
#[allow(unused_variables)]
unsafe fn q40_pair(b: *const u8, c: usize) -> (__m512i, Sc2) {
    unsafe {
        (
            nibbles2(b.add(2), 18),
            Sc2 {
                s: halves2(b, 18),
                m: _mm_setzero_ps(),
            },
        )
    }
}

fmt!(
    Q40,
    32,
    18,
    false,
    8,
    true,
    |b, c| {
        let d = h2f(b);
        (
            nibbles(b.add(2)),
            Sc {
                s: [d; 2],
                m: [0.0; 2],
            },
        )
    },
    pair = q40_pair
);
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
#[allow(unused_variables)]
unsafe fn q41_pair(b: *const u8, c: usize) -> (__m512i, Sc2) {
    unsafe {
        let (s, m) = dm2(b, 20);
        (nibbles2(b.add(4), 20), Sc2 { s, m })
    }
}

fmt!(
    Q41,
    32,
    20,
    false,
    0,
    true,
    |b, c| {
        let (d, m) = (h2f(b), h2f(b.add(2)));
        (
            nibbles(b.add(4)),
            Sc {
                s: [d; 2],
                m: [m; 2],
            },
        )
    },
    pair = q41_pair
);
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
#[allow(unused_variables)]
unsafe fn q50_pair(b: *const u8, c: usize) -> (__m512i, Sc2) {
    unsafe {
        let qa = (b.add(2) as *const u32).read_unaligned() as u64;
        let qb = (b.add(24) as *const u32).read_unaligned() as u64;
        let hi = _mm512_maskz_mov_epi8(qa | (qb << 32), _mm512_set1_epi8(0x10));
        (
            _mm512_or_si512(nibbles2(b.add(6), 22), hi),
            Sc2 {
                s: halves2(b, 22),
                m: _mm_setzero_ps(),
            },
        )
    }
}

fmt!(
    Q50,
    32,
    22,
    false,
    16,
    true,
    |b, c| {
        let d = h2f(b);
        let hi = _mm256_and_si256(bits32(b.add(2)), _mm256_set1_epi8(0x10));
        (
            _mm256_or_si256(nibbles(b.add(6)), hi),
            Sc {
                s: [d; 2],
                m: [0.0; 2],
            },
        )
    },
    pair = q50_pair
);
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
#[allow(unused_variables)]
unsafe fn q51_pair(b: *const u8, c: usize) -> (__m512i, Sc2) {
    unsafe {
        let qa = (b.add(4) as *const u32).read_unaligned() as u64;
        let qb = (b.add(28) as *const u32).read_unaligned() as u64;
        let hi = _mm512_maskz_mov_epi8(qa | (qb << 32), _mm512_set1_epi8(0x10));
        let (s, m) = dm2(b, 24);
        (_mm512_or_si512(nibbles2(b.add(8), 24), hi), Sc2 { s, m })
    }
}

fmt!(
    Q51,
    32,
    24,
    false,
    0,
    true,
    |b, c| {
        let (d, m) = (h2f(b), h2f(b.add(2)));
        let hi = _mm256_and_si256(bits32(b.add(4)), _mm256_set1_epi8(0x10));
        (
            _mm256_or_si256(nibbles(b.add(8)), hi),
            Sc {
                s: [d; 2],
                m: [m; 2],
            },
        )
    },
    pair = q51_pair
);
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
#[allow(unused_variables)]
unsafe fn q80_pair(b: *const u8, c: usize) -> (__m512i, Sc2) {
    unsafe {
        let v = _mm512_inserti64x4(
            _mm512_castsi256_si512(load256(b.add(2))),
            load256(b.add(36)),
            1,
        );
        (
            v,
            Sc2 {
                s: halves2(b, 34),
                m: _mm_setzero_ps(),
            },
        )
    }
}

fmt!(
    Q80,
    32,
    34,
    true,
    0,
    false,
    |b, c| {
        let d = h2f(b);
        (
            load256(b.add(2)),
            Sc {
                s: [d; 2],
                m: [0.0; 2],
            },
        )
    },
    pair = q80_pair
);
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
#[allow(unused_variables)]
unsafe fn iq4nl_pair(b: *const u8, c: usize) -> (__m512i, Sc2) {
    unsafe {
        let table = _mm512_broadcast_i32x4(_mm_loadu_si128(IQ4_VALUES.as_ptr() as *const __m128i));
        (
            _mm512_shuffle_epi8(table, nibbles2(b.add(2), 18)),
            Sc2 {
                s: halves2(b, 18),
                m: _mm_setzero_ps(),
            },
        )
    }
}

fmt!(
    IQ4NL,
    32,
    18,
    true,
    0,
    false,
    |b, c| {
        let d = h2f(b);
        (
            iq4(b.add(2)),
            Sc {
                s: [d; 2],
                m: [0.0; 2],
            },
        )
    },
    pair = iq4nl_pair
);
fmt!(
    Q2K,
    256,
    84,
    false,
    0,
    true,
    |b, c| {
        let (d, dmin) = (h2f(b.add(80)), h2f(b.add(82)));
        let (half, j) = (c / 4, c % 4);
        let v = shr_mask(load256(b.add(16 + 32 * half)), 2 * j as u32, 3);
        let (s0, s1) = (*b.add(2 * c), *b.add(2 * c + 1));
        let sc = Sc {
            s: [d * (s0 & 0xF) as f32, d * (s1 & 0xF) as f32],
            m: [-(dmin * (s0 >> 4) as f32), -(dmin * (s1 >> 4) as f32)],
        };
        (v, sc)
    },
    scales = q2k_scales
);
fmt!(
    Q3K,
    256,
    110,
    false,
    4,
    true,
    |b, c| {
        let d = h2f(b.add(108));
        let sc = q3k_scales(std::slice::from_raw_parts(b.add(96), 12));
        let (half, j) = (c / 4, c % 4);
        let low = shr_mask(load256(b.add(32 + 32 * half)), 2 * j as u32, 3);
        let high = bit_of(load256(b), (4 * half + j) as u32, 4);
        let s = [d * sc[2 * c] as f32, d * sc[2 * c + 1] as f32];
        (_mm256_or_si256(low, high), Sc { s, m: [0.0; 2] })
    },
    scales = q3k_block_scales
);
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
#[allow(unused_variables)]
unsafe fn q4k_pair(b: *const u8, c: usize) -> (__m512i, Sc2) {
    unsafe {
        let s = std::slice::from_raw_parts(b.add(4), 12);
        let (sc0, m0) = scale_min_k4(c, s);
        let (sc1, m1) = scale_min_k4(c + 1, s);
        let q = load256(b.add(16 + 16 * c));
        let z = _mm512_inserti64x4(_mm512_castsi256_si512(q), _mm256_srli_epi16(q, 4), 1);
        let v = _mm512_and_si512(z, _mm512_set1_epi8(0x0F));
        let (d, dmin) = (_mm_set1_ps(h2f(b)), _mm_set1_ps(h2f(b.add(2))));
        let sc = _mm_cvtepi32_ps(_mm_setr_epi32(
            sc0 as i32, sc0 as i32, sc1 as i32, sc1 as i32,
        ));
        let m = _mm_cvtepi32_ps(_mm_setr_epi32(m0 as i32, m0 as i32, m1 as i32, m1 as i32));
        let neg = _mm_set1_ps(-0.0);
        (
            v,
            Sc2 {
                s: _mm_mul_ps(d, sc),
                m: _mm_xor_ps(_mm_mul_ps(dmin, m), neg),
            },
        )
    }
}

fmt!(
    Q4K,
    256,
    144,
    false,
    0,
    true,
    |b, c| {
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
    },
    pair = q4k_pair,
    scales = k4_scales
);
fmt!(
    Q5K,
    256,
    176,
    false,
    0,
    true,
    |b, c| {
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
    },
    scales = k4_scales
);
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
#[allow(unused_variables)]
unsafe fn q6k_pair(b: *const u8, c: usize) -> (__m512i, Sc2) {
    unsafe {
        let (half, quarter) = (c / 4, c % 4);
        let ql = _mm512_loadu_si512(b.add(64 * half) as *const __m512i);
        let lo = _mm512_and_si512(
            _mm512_srl_epi16(ql, _mm_cvtsi32_si128(4 * (quarter / 2) as i32)),
            _mm512_set1_epi8(0x0F),
        );
        let qh = load256(b.add(128 + 32 * half));
        let h0 = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * quarter as i32));
        let h1 = _mm256_srli_epi16(h0, 2);
        let h = _mm512_and_si512(
            _mm512_inserti64x4(_mm512_castsi256_si512(h0), h1, 1),
            _mm512_set1_epi8(3),
        );
        let v = _mm512_or_si512(lo, _mm512_slli_epi16(h, 4));
        let sc = _mm_cvtepi32_ps(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(
            (b.add(192 + 2 * c) as *const i32).read_unaligned(),
        )));
        (
            v,
            Sc2 {
                s: _mm_mul_ps(_mm_set1_ps(h2f(b.add(208))), sc),
                m: _mm_setzero_ps(),
            },
        )
    }
}

fmt!(
    Q6K,
    256,
    210,
    false,
    32,
    true,
    |b, c| {
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
    },
    pair = q6k_pair,
    scales = q6k_scales
);
fmt!(IQ4XS, 256, 136, true, 0, false, |b, c| {
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

/// The 256-bit kernel: one 32-value chunk per vector, with the activations' per-half scales and
/// scaled sums as [`QActs`] lays them out for the 512-bit kernels (a chunk is half a pair).
/// Super-block formats decode their scales once per block; the float work per chunk is one
/// multiply and one FMA. Two instantiations whose sums come out the same: `vnni` (AVX-VNNI's
/// 256-bit `vpdpbusd` on both byte planes) and `avx2`, whose signed formats (Q8_0, IQ4_NL,
/// IQ4_XS) go `wide`: the weights widened to 16 bits, two `vpmaddwd` against the joined plane
/// [`QActs::x16`] and one `vphaddd`, where the byte planes need `vpsignb` on each plane before
/// two `vpmaddubsw` and two `vpmaddwd` (on Zen 3, Q8_0 from cache 1.1-1.7x as fast, from
/// memory level: one core's stream is the limit either way; the unsigned formats ran 10-30%
/// slower wide, their widening on the shuffle ports their unpacking already keeps busy).
/// `wide` sums come out with the chunk's 4-value groups in the order [`WIDE_LANES`], so the
/// scales are laid out alike and the accumulators put back in order before their horizontal
/// sum: the same float operations in the same order.
macro_rules! isa_kernels {
    ($m:ident, $feat:tt, $vnni:expr, $wide:expr) => {
        mod $m {
            use super::*;

            /// How far ahead of the current block the weights are prefetched, in bytes.
            const PREFETCH: usize = 2048;

            /// Whether format `F` goes through the 16-bit dot products.
            const fn wide<F: Fmt>() -> bool {
                $wide && F::SIGNED
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
                let chunks = a.cols / 32;
                let pairs = a.pairs();
                let mut acc = [[_mm256_setzero_ps(); B]; R];
                let mut cacc = [[_mm256_setzero_ps(); B]; R];
                if F::PER == 256 {
                    // Chunk c's halves 2c and 2c + 1 of a vector of eight, each over 4 lanes
                    // (in `wide`'s lane order there).
                    let idx: [__m256i; 4] = std::array::from_fn(|c| {
                        let (h0, h1) = (2 * c as i32, 2 * c as i32 + 1);
                        if wide::<F>() {
                            _mm256_setr_epi32(h0, h0, h1, h1, h0, h0, h1, h1)
                        } else {
                            _mm256_setr_epi32(h0, h0, h0, h0, h1, h1, h1, h1)
                        }
                    });
                    for blk in 0..chunks / 8 {
                        let mut svw = [[_mm256_setzero_ps(); 8]; R];
                        for ri in 0..R {
                            let row = w.wrapping_add((r0 + ri) * row_bytes + blk * F::BYTES);
                            // SAFETY: the caller checked the rows exist.
                            let (s, m) = unsafe { F::block_scales(row) };
                            for c in 0..8 {
                                svw[ri][c] = _mm256_permutevar8x32_ps(s[c / 4], idx[c % 4]);
                            }
                            if F::CORR {
                                let corr = [correction::<F>(s[0], m[0]), correction::<F>(s[1], m[1])];
                                for bi in 0..B {
                                    // The scaled sums of the block's 16 halves (4 pairs).
                                    let at = ((b0 + bi) * pairs + 4 * blk) * 4;
                                    // SAFETY: the caller checked the activation rows exist.
                                    let ds = unsafe {
                                        [
                                            _mm256_loadu_ps(a.ds16.as_ptr().add(at)),
                                            _mm256_loadu_ps(a.ds16.as_ptr().add(at + 8)),
                                        ]
                                    };
                                    let c = _mm256_fmadd_ps(corr[0], ds[0], cacc[ri][bi]);
                                    cacc[ri][bi] = _mm256_fmadd_ps(corr[1], ds[1], c);
                                }
                            }
                        }
                        for c in 0..8 {
                            // SAFETY: as above.
                            let (xs, xs2, dxv) = unsafe { chunk_acts::<F, B>(a, b0, 8 * blk + c, pairs) };
                            for ri in 0..R {
                                let row = w.wrapping_add((r0 + ri) * row_bytes + blk * F::BYTES);
                                if c % 2 == 0 {
                                    _mm_prefetch::<_MM_HINT_T0>(
                                        row.wrapping_add(PREFETCH + 32 * c) as *const i8
                                    );
                                }
                                // SAFETY: the caller checked the weight rows exist.
                                let (v, _) = unsafe { F::unpack(row, c) };
                                accumulate::<F, B>(v, svw[ri][c], (&xs, &xs2), &dxv, &mut acc[ri]);
                            }
                        }
                    }
                } else {
                    for k in 0..chunks {
                        // SAFETY: the caller checked the activation rows exist.
                        let (xs, xs2, dxv) = unsafe { chunk_acts::<F, B>(a, b0, k, pairs) };
                        let mut ds = [_mm256_setzero_ps(); B];
                        if F::CORR {
                            for bi in 0..B {
                                // The chunk's two scaled sums, the other lanes zero.
                                let at = ((b0 + bi) * pairs + k / 2) * 4 + 2 * (k % 2);
                                // SAFETY: as above.
                                ds[bi] = _mm256_zextps128_ps256(_mm_castpd_ps(unsafe {
                                    _mm_load_sd(a.ds16.as_ptr().add(at) as *const f64)
                                }));
                            }
                        }
                        for ri in 0..R {
                            let row = w.wrapping_add((r0 + ri) * row_bytes + k * F::BYTES);
                            if k % 2 == 0 {
                                _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(PREFETCH) as *const i8);
                            }
                            // SAFETY: the caller checked the weight rows exist.
                            let (v, sc) = unsafe { F::unpack(row, 0) };
                            let svw = if wide::<F>() {
                                let h = _mm_setr_ps(sc.s[0], sc.s[0], sc.s[1], sc.s[1]);
                                _mm256_setr_m128(h, h)
                            } else {
                                _mm256_setr_m128(_mm_set1_ps(sc.s[0]), _mm_set1_ps(sc.s[1]))
                            };
                            accumulate::<F, B>(v, svw, (&xs, &xs2), &dxv, &mut acc[ri]);
                            if F::CORR {
                                let s = _mm256_setr_ps(sc.s[0], sc.s[1], 0., 0., 0., 0., 0., 0.);
                                let m = _mm256_setr_ps(sc.m[0], sc.m[1], 0., 0., 0., 0., 0., 0.);
                                let corr = correction::<F>(s, m);
                                for bi in 0..B {
                                    cacc[ri][bi] = _mm256_fmadd_ps(corr, ds[bi], cacc[ri][bi]);
                                }
                            }
                        }
                    }
                }
                for ri in 0..R {
                    for bi in 0..B {
                        let a = if wide::<F>() {
                            _mm256_permutevar8x32_ps(acc[ri][bi], WIDE_LANES)
                        } else {
                            acc[ri][bi]
                        };
                        out.set(b0 + bi, r0 + ri, hsum(a) + hsum(cacc[ri][bi]));
                    }
                }
            }

            /// Activation rows `b0..b0+B` at chunk `k`: both planes and each half's scale spread
            /// over its 4 lanes (`wide`: the joined plane's two halves, and the scales in its
            /// lane order).
            #[target_feature(enable = $feat)]
            #[inline]
            unsafe fn chunk_acts<F: Fmt, const B: usize>(
                a: &QActs,
                b0: usize,
                k: usize,
                pairs: usize,
            ) -> ([__m256i; B], [__m256i; B], [__m256; B]) {
                let mut xs = [_mm256_setzero_si256(); B];
                let mut xs2 = [_mm256_setzero_si256(); B];
                let mut dxv = [_mm256_setzero_ps(); B];
                for bi in 0..B {
                    let b = b0 + bi;
                    // SAFETY: the caller checked the activation rows exist, with scales for
                    // every pair.
                    unsafe {
                        if wide::<F>() {
                            let x = a.x16.as_ptr().add(b * a.cols + 32 * k);
                            xs[bi] = load256(x as *const u8);
                            xs2[bi] = load256(x.add(16) as *const u8);
                            let at = (b * a.cols / 32 + k) * 8;
                            dxv[bi] = _mm256_loadu_ps(a.dx16.as_ptr().add(at));
                        } else {
                            xs[bi] = load256(a.q.as_ptr().add(b * a.cols + 32 * k) as *const u8);
                            xs2[bi] = load256(a.q2.as_ptr().add(b * a.cols + 32 * k) as *const u8);
                            let at = (b * pairs + k / 2) * 16 + 8 * (k % 2);
                            dxv[bi] = _mm256_loadu_ps(a.dxv.as_ptr().add(at));
                        }
                    }
                }
                (xs, xs2, dxv)
            }

            /// The per-half correction the sums need: the weights' mins `m`, less their offset
            /// times their scales `s` where the format stores values with one.
            #[target_feature(enable = $feat)]
            #[inline]
            fn correction<F: Fmt>(s: __m256, m: __m256) -> __m256 {
                if F::OFF == 0 {
                    m
                } else {
                    _mm256_sub_ps(m, _mm256_mul_ps(_mm256_set1_ps(F::OFF as f32), s))
                }
            }

            /// One weight chunk `v` (its per-half scales `svw` spread over the lanes) against
            /// activation rows `xs`, `xs2` (the two planes) with their scales `dxv`.
            #[target_feature(enable = $feat)]
            #[inline]
            fn accumulate<F: Fmt, const B: usize>(
                v: __m256i,
                svw: __m256,
                (xs, xs2): (&[__m256i; B], &[__m256i; B]),
                dxv: &[__m256; B],
                acc: &mut [__m256; B],
            ) {
                if wide::<F>() {
                    // The chunk's two halves as 16-bit values, against the joined plane's.
                    let (lo, hi) = (_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
                    let w = [_mm256_cvtepi8_epi16(lo), _mm256_cvtepi8_epi16(hi)];
                    for bi in 0..B {
                        // Sums of value pairs, then of 4-value groups: at most 4 x 128 x 32639.
                        let p = _mm256_hadd_epi32(
                            _mm256_madd_epi16(w[0], xs[bi]),
                            _mm256_madd_epi16(w[1], xs2[bi]),
                        );
                        let p = _mm256_cvtepi32_ps(p);
                        acc[bi] = _mm256_fmadd_ps(_mm256_mul_ps(svw, dxv[bi]), p, acc[bi]);
                    }
                    return;
                }
                let vu = if F::SIGNED { _mm256_sign_epi8(v, v) } else { v };
                for bi in 0..B {
                    let (xx, xx2) = if F::SIGNED {
                        (_mm256_sign_epi8(xs[bi], v), _mm256_sign_epi8(xs2[bi], v))
                    } else {
                        (xs[bi], xs2[bi])
                    };
                    // 256 * Σ w·hi + Σ w·lo, exact in 32 bits.
                    let hi = dot(_mm256_setzero_si256(), vu, xx);
                    let p = _mm256_cvtepi32_ps(dot(_mm256_slli_epi32(hi, 8), vu, xx2));
                    acc[bi] = _mm256_fmadd_ps(_mm256_mul_ps(svw, dxv[bi]), p, acc[bi]);
                }
            }

            /// `acc` plus the sums of 4 products of unsigned `v` and signed `x` bytes, as 8 x i32
            /// (the same sums either way, as in the 512-bit kernels).
            #[target_feature(enable = $feat)]
            #[inline]
            #[allow(unused_unsafe)]
            fn dot(acc: __m256i, v: __m256i, x: __m256i) -> __m256i {
                if $vnni {
                    // SAFETY: only reached in the VNNI instantiation, whose features include it.
                    unsafe { _mm256_dpbusd_avx_epi32(acc, v, x) }
                } else {
                    let pairs = _mm256_maddubs_epi16(v, x);
                    _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
                }
            }
        }
    };
}

/// The 512-bit kernel: two chunks per vector, with the activations' scales and sums already
/// laid out per pair by [`QActs`] (so the float work per pair is one permute, one multiply and
/// two FMAs). Two instantiations: `avx512` with VNNI (Ice Lake and later, Zen 4), `avx512bw`
/// without (Skylake-SP Xeons, common in cloud VMs), whose sums come out the same.
macro_rules! avx512_kernels {
    ($m:ident, $feat:tt, $vnni:expr) => {
        mod $m {
            use super::*;

            /// How far ahead of the current block the weights are prefetched, in bytes: past the
            /// hardware streamer's reach when the rows come from L3 or memory.
            const PREFETCH: usize = 2048;

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
                let pairs = a.pairs();
                let mut acc = [[_mm512_setzero_ps(); B]; R];
                let mut cacc = [[_mm_setzero_ps(); B]; R];
                if F::PER == 256 {
                    // Super-blocks: their scales decoded once per block, four pairs each.
                    for blk in 0..chunks / 8 {
                        let mut sc = [(_mm512_setzero_ps(), _mm512_setzero_ps()); R];
                        for (ri, s) in sc.iter_mut().enumerate() {
                            // SAFETY: the caller checked the rows exist.
                            *s = unsafe {
                                F::block_scales16(w.add((r0 + ri) * row_bytes + blk * F::BYTES))
                            };
                        }
                        for p in 0..4 {
                            // SAFETY: as above.
                            unsafe {
                                step_k::<F, R, B>(
                                    w,
                                    row_bytes,
                                    r0,
                                    a,
                                    b0,
                                    4 * blk + p,
                                    pairs,
                                    &sc,
                                    &mut acc,
                                    &mut cacc,
                                )
                            };
                        }
                    }
                } else {
                    for j in 0..chunks / 2 {
                        // SAFETY: the caller checked the rows, and whole pairs lie inside them.
                        unsafe {
                            step::<F, R, B, true>(
                                w, row_bytes, r0, a, b0, j, pairs, &mut acc, &mut cacc,
                            )
                        };
                    }
                    if chunks % 2 == 1 {
                        // SAFETY: as above; the last half pair reads only its own chunk.
                        unsafe {
                            step::<F, R, B, false>(
                                w,
                                row_bytes,
                                r0,
                                a,
                                b0,
                                chunks / 2,
                                pairs,
                                &mut acc,
                                &mut cacc,
                            )
                        };
                    }
                }
                for ri in 0..R {
                    for bi in 0..B {
                        let c = cacc[ri][bi];
                        let c = _mm_add_ps(c, _mm_movehl_ps(c, c));
                        let c = _mm_add_ss(c, _mm_movehdup_ps(c));
                        let v = _mm512_reduce_add_ps(acc[ri][bi]) + _mm_cvtss_f32(c);
                        out.set(b0 + bi, r0 + ri, v);
                    }
                }
            }

            /// Pair `j` of a super-block format, with each row's block scales decoded.
            #[target_feature(enable = $feat)]
            #[inline]
            #[allow(clippy::too_many_arguments)]
            unsafe fn step_k<F: Fmt, const R: usize, const B: usize>(
                w: *const u8,
                row_bytes: usize,
                r0: usize,
                a: &QActs,
                b0: usize,
                j: usize,
                pairs: usize,
                sc: &[(__m512, __m512); R],
                acc: &mut [[__m512; B]; R],
                cacc: &mut [[__m128; B]; R],
            ) {
                let k = 2 * j;
                let blk = (k / 8) * F::BYTES;
                let c = k % 8;
                // Halves 2c..2c+4 of the block: lanes 4h..4h+4 of a product hold half 2c + h.
                let first = _mm512_set1_epi32(2 * c as i32);
                let spread = _mm512_add_epi32(
                    first,
                    _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                );
                let four = _mm512_add_epi32(
                    first,
                    _mm512_setr_epi32(0, 1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
                );
                // SAFETY: the caller checked the activation rows exist.
                let (xs, xs2, dxv, ds) = unsafe { pair_acts::<B, true>(a, b0, j, pairs) };
                for ri in 0..R {
                    let row = w.wrapping_add((r0 + ri) * row_bytes + blk);
                    _mm_prefetch::<_MM_HINT_T0>(
                        row.wrapping_add(PREFETCH + 64 * (c / 2)) as *const i8
                    );
                    // SAFETY: the caller checked the weight rows exist.
                    let (v, _) = unsafe { F::unpack2(row, c) };
                    let (s16, m16) = sc[ri];
                    let svw = _mm512_permutexvar_ps(spread, s16);
                    let s4 = _mm512_castps512_ps128(_mm512_permutexvar_ps(four, s16));
                    let m4 = _mm512_castps512_ps128(_mm512_permutexvar_ps(four, m16));
                    let corr = correction::<F>(s4, m4);
                    accumulate::<F, B>(
                        v,
                        svw,
                        corr,
                        (&xs, &xs2),
                        (&dxv, &ds),
                        (&mut acc[ri], &mut cacc[ri]),
                    );
                }
            }

            /// Pair `j` (chunks `2j`, `2j + 1`, or only `2j` when not `WHOLE`) of rows `r0..r0+R`
            /// against activation rows `b0..b0+B`.
            #[target_feature(enable = $feat)]
            #[inline]
            #[allow(clippy::too_many_arguments)]
            unsafe fn step<F: Fmt, const R: usize, const B: usize, const WHOLE: bool>(
                w: *const u8,
                row_bytes: usize,
                r0: usize,
                a: &QActs,
                b0: usize,
                j: usize,
                pairs: usize,
                acc: &mut [[__m512; B]; R],
                cacc: &mut [[__m128; B]; R],
            ) {
                let k = 2 * j;
                let cpb = F::PER / 32;
                let blk = (k / cpb) * F::BYTES;
                let c = k % cpb;
                // Lanes 4h..4h+4 of a product hold 16-value half h: its scale is s[h].
                let spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
                // SAFETY: the caller checked the activation rows exist; a row's last half pair
                // reads only its own 32 bytes.
                let (xs, xs2, dxv, ds) = unsafe { pair_acts::<B, WHOLE>(a, b0, j, pairs) };
                for ri in 0..R {
                    let row = w.wrapping_add((r0 + ri) * row_bytes + blk);
                    _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(PREFETCH) as *const i8);
                    // SAFETY: the caller checked the weight rows exist.
                    let (v, sc) = unsafe {
                        if WHOLE {
                            F::unpack2(row, c)
                        } else {
                            let (v, s) = F::unpack(row, c);
                            (
                                _mm512_zextsi256_si512(v),
                                Sc2 {
                                    s: _mm_setr_ps(s.s[0], s.s[1], 0.0, 0.0),
                                    m: _mm_setr_ps(s.m[0], s.m[1], 0.0, 0.0),
                                },
                            )
                        }
                    };
                    let svw = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(sc.s));
                    let corr = correction::<F>(sc.s, sc.m);
                    accumulate::<F, B>(
                        v,
                        svw,
                        corr,
                        (&xs, &xs2),
                        (&dxv, &ds),
                        (&mut acc[ri], &mut cacc[ri]),
                    );
                }
            }

            /// Activation rows `b0..b0+B` at pair `j`: both planes (only the pair's first chunk,
            /// zero above, when not `WHOLE`), their scales spread over the lanes, their scaled
            /// sums.
            #[target_feature(enable = $feat)]
            #[inline]
            unsafe fn pair_acts<const B: usize, const WHOLE: bool>(
                a: &QActs,
                b0: usize,
                j: usize,
                pairs: usize,
            ) -> ([__m512i; B], [__m512i; B], [__m512; B], [__m128; B]) {
                let mut xs = [_mm512_setzero_si512(); B];
                let mut xs2 = [_mm512_setzero_si512(); B];
                let mut dxv = [_mm512_setzero_ps(); B];
                let mut ds = [_mm_setzero_ps(); B];
                for bi in 0..B {
                    let b = b0 + bi;
                    // SAFETY: the caller checked the activation rows exist (a half pair: its
                    // own 32 bytes), with scales and sums for every pair.
                    unsafe {
                        let xq = a.q.as_ptr().add(b * a.cols + 64 * j) as *const u8;
                        let xq2 = a.q2.as_ptr().add(b * a.cols + 64 * j) as *const u8;
                        if WHOLE {
                            xs[bi] = _mm512_loadu_si512(xq as *const __m512i);
                            xs2[bi] = _mm512_loadu_si512(xq2 as *const __m512i);
                        } else {
                            xs[bi] = _mm512_zextsi256_si512(load256(xq));
                            xs2[bi] = _mm512_zextsi256_si512(load256(xq2));
                        }
                        dxv[bi] = _mm512_loadu_ps(a.dxv.as_ptr().add((b * pairs + j) * 16));
                        ds[bi] = _mm_loadu_ps(a.ds16.as_ptr().add((b * pairs + j) * 4));
                    }
                }
                (xs, xs2, dxv, ds)
            }

            /// The per-half correction a pair's sums need: the weights' mins `m`, less their
            /// offset times their scales `s` where the format stores values with one.
            #[target_feature(enable = $feat)]
            #[inline]
            fn correction<F: Fmt>(s: __m128, m: __m128) -> __m128 {
                if F::OFF == 0 {
                    m
                } else {
                    _mm_sub_ps(m, _mm_mul_ps(_mm_set1_ps(F::OFF as f32), s))
                }
            }

            /// One weight pair `v` (its per-half scales `svw` spread over the lanes, its
            /// per-half corrections `corr`) against activation rows `xs`, `xs2` (the two planes)
            /// with their scales `dxv` and scaled sums `ds`, into one weight row's accumulators.
            #[target_feature(enable = $feat)]
            #[inline]
            fn accumulate<F: Fmt, const B: usize>(
                v: __m512i,
                svw: __m512,
                corr: __m128,
                (xs, xs2): (&[__m512i; B], &[__m512i; B]),
                (dxv, ds): (&[__m512; B], &[__m128; B]),
                (acc, cacc): (&mut [__m512; B], &mut [__m128; B]),
            ) {
                let vu = if F::SIGNED { _mm512_abs_epi8(v) } else { v };
                let neg = _mm512_movepi8_mask(v);
                for bi in 0..B {
                    let xx = if F::SIGNED {
                        _mm512_mask_sub_epi8(xs[bi], neg, _mm512_setzero_si512(), xs[bi])
                    } else {
                        xs[bi]
                    };
                    let xx2 = if F::SIGNED {
                        _mm512_mask_sub_epi8(xs2[bi], neg, _mm512_setzero_si512(), xs2[bi])
                    } else {
                        xs2[bi]
                    };
                    // 256 * Σ w·hi + Σ w·lo, exact in 32 bits.
                    let hi = dot(_mm512_setzero_si512(), vu, xx);
                    let p = dot(_mm512_slli_epi32(hi, 8), vu, xx2);
                    let p = _mm512_cvtepi32_ps(p);
                    acc[bi] = _mm512_fmadd_ps(_mm512_mul_ps(svw, dxv[bi]), p, acc[bi]);
                    if F::CORR {
                        cacc[bi] = _mm_fmadd_ps(corr, ds[bi], cacc[bi]);
                    }
                }
            }

            /// `acc` plus the sums of 4 products of unsigned `v` and signed `x` bytes, as 16 x i32: one
            /// `vpdpbusd` with VNNI; without it `vpmaddubsw`, then `vpmaddwd` by ones: the same sums, bit
            /// for bit (the unpacked weights and the activations are small enough that a pair's 16-bit
            /// sum never saturates: at most 2 x 128 x 127).
            #[target_feature(enable = $feat)]
            #[inline]
            #[allow(unused_unsafe)]
            fn dot(acc: __m512i, v: __m512i, x: __m512i) -> __m512i {
                if $vnni {
                    // SAFETY: only reached in the VNNI instantiation, whose features include it.
                    unsafe { _mm512_dpbusd_epi32(acc, v, x) }
                } else {
                    let pairs = _mm512_maddubs_epi16(v, x);
                    _mm512_add_epi32(acc, _mm512_madd_epi16(pairs, _mm512_set1_epi16(1)))
                }
            }
        }
    };
}

avx512_kernels!(
    avx512,
    "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni",
    true
);
avx512_kernels!(
    avx512bw,
    "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl",
    false
);

/// The exact path (f32 activations against weights dequantized in registers): one AVX2
/// compilation serves every x86 instruction set, so its results are the same on all of them.
mod exact_avx2 {
    use super::*;

    /// Row `r` against f32 activation rows `b0..b0+B`, weights dequantized in registers.
    #[target_feature(enable = "avx2,fma,f16c")]
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
                let (v, sc) = F::unpack(w.add(r * row_bytes + (k / cpb) * F::BYTES), k % cpb);
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
    #[target_feature(enable = "avx2,fma,f16c")]
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

/// Where `wide` sums put a chunk's 4-value groups: lane `i` holds group `WIDE_LANES[i]` (its own
/// inverse, so the same permutation puts them back). `vphaddd` adds within 128-bit lanes, so its
/// low lane holds groups 0-1 (of the first half's pair sums) and 4-5 (of the second's), its high
/// lane 2-3 and 6-7.
const WIDE_LANES: __m256i = unsafe { std::mem::transmute([0i32, 1, 4, 5, 2, 3, 6, 7]) };

isa_kernels!(avx2, "avx2,fma,f16c", false, true);
isa_kernels!(vnni, "avx2,fma,f16c,avxvnni", true, false);
// The byte-plane AVX2 kernel `avx2` replaced, kept to show that the two sum alike on machines
// without AVX-VNNI.
#[cfg(test)]
isa_kernels!(avx2_bytes, "avx2,fma,f16c", false, false);

/// Tiles rows and activation rows and runs the kernel of `isa` for format `F`.
fn go_fast<F: Fmt>(isa: Isa, w: &[u8], rows: Range<usize>, a: &QActs, out: &Out) {
    let row_bytes = a.cols / F::PER * F::BYTES;
    assert!(
        w.len() >= rows.end * row_bytes,
        "weights shorter than their rows"
    );
    assert!(a.q.len() >= a.rows * a.cols && a.cols.is_multiple_of(F::PER));
    // The AVX2 kernel's signed formats read the joined plane and its scales.
    assert!(
        isa != Isa::Avx2
            || !F::SIGNED
            || (a.x16.len() >= a.rows * a.cols && a.dx16.len() >= a.rows * a.cols / 4),
        "activations quantized without the joined plane"
    );
    let n = a.rows;
    let p = w.as_ptr();
    macro_rules! call {
        ($r:expr, $b:expr, $r0:expr, $b0:expr) => {
            // SAFETY: the asserts above bound every row and activation row the kernel reads,
            // and the instruction set was detected at run time.
            unsafe {
                match isa {
                    Isa::Avx512 => avx512::fast::<F, $r, $b>(p, row_bytes, $r0, a, $b0, out),
                    Isa::Avx512Bw => avx512bw::fast::<F, $r, $b>(p, row_bytes, $r0, a, $b0, out),
                    Isa::AvxVnni => vnni::fast::<F, $r, $b>(p, row_bytes, $r0, a, $b0, out),
                    _ => avx2::fast::<F, $r, $b>(p, row_bytes, $r0, a, $b0, out),
                }
            }
        };
    }
    let mut r = rows.start;
    if n < 4 {
        // One row at a time: each row is a sequential stream, which the hardware prefetchers
        // follow (reading several rows interleaved runs at two thirds of the speed once the
        // weights come from L3 or memory).
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

fn go_exact<F: Fmt>(w: &[u8], rows: Range<usize>, x: &[f32], n: usize, cols: usize, out: &Out) {
    let row_bytes = cols / F::PER * F::BYTES;
    assert!(w.len() >= rows.end * row_bytes && x.len() >= n * cols);
    assert!(cols.is_multiple_of(F::PER));
    let (p, xp) = (w.as_ptr(), x.as_ptr());
    for r in rows {
        let mut b = 0;
        // SAFETY: bounded by the asserts above; the instruction set was detected at run time.
        unsafe {
            while b + 4 <= n {
                exact_avx2::exact::<F, 4>(p, row_bytes, r, xp, cols, b, out);
                b += 4;
            }
            while b < n {
                exact_avx2::exact::<F, 1>(p, row_bytes, r, xp, cols, b, out);
                b += 1;
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn go_dense(
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
                exact_avx2::exact_dense::<4>(ty, p, row_bytes, r, xp, cols, b, out);
                b += 4;
            }
            while b < n {
                exact_avx2::exact_dense::<1>(ty, p, row_bytes, r, xp, cols, b, out);
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

/// One row dequantized to f32, 32 values at a time (the GEMM's weight tiles).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dequant_row_f<F: Fmt>(row: &[u8], out: &mut [f32]) {
    let cpb = F::PER / 32;
    assert!(out.len().is_multiple_of(32) && row.len() >= out.len() / F::PER * F::BYTES);
    for (k, o) in out.chunks_exact_mut(32).enumerate() {
        // SAFETY: AVX2 was detected by the caller's ISA; the block lies inside `row` (above).
        unsafe {
            let (v, sc) = F::unpack(row.as_ptr().add((k / cpb) * F::BYTES), k % cpb);
            let f = to_f32::<F>(v, sc);
            for (g, fg) in f.iter().enumerate() {
                _mm256_storeu_ps(o.as_mut_ptr().add(8 * g), *fg);
            }
        }
    }
}

pub(crate) fn dequant_row(ty: GgmlType, row: &[u8], out: &mut [f32]) {
    if ty.is_dense() {
        let n = out.len();
        crate::kernel::dense_chunk(ty, row, 0, n, out);
        return;
    }
    // SAFETY: the caller's ISA (AVX2 or better) was detected at run time.
    unsafe { by_type!(ty, dequant_row_f, row, out) }
}

/// `c[r][j] = Σ_k w[r][k] · xt[k][j]` for `tiles` tiles of weight rows (`w`, each `TILE_ROWS`
/// x `k`; `c`, each tile's `TILE_ROWS` rows of `width`), the blocks of activation columns of
/// `xt` outermost: a block is read from memory once for all the tiles.
pub(crate) fn gemm_group(
    isa: Isa,
    w: &[f32],
    tiles: usize,
    k: usize,
    xt: &[f32],
    width: usize,
    c: &mut [f32],
) {
    use crate::gemm::TILE_ROWS;
    let (wt, ct) = (TILE_ROWS * k, TILE_ROWS * width);
    assert!(w.len() >= tiles * wt && xt.len() >= k * width && c.len() >= tiles * ct);
    // SAFETY: bounds checked above; the ISA was detected at run time.
    unsafe {
        let step = isa.gemm_width();
        assert!(step >= 16 && width.is_multiple_of(step));
        for j in (0..width).step_by(step) {
            for t in 0..tiles {
                let (w, c) = (w.as_ptr().add(t * wt), c.as_mut_ptr().add(t * ct));
                if step == 32 {
                    gemm6x32(w, k, xt.as_ptr(), width, j, c);
                } else {
                    gemm6x16(w, k, xt.as_ptr(), width, j, c);
                }
            }
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f")]
unsafe fn gemm6x32(w: *const f32, k: usize, xt: *const f32, width: usize, j: usize, c: *mut f32) {
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; 6];
        for kk in 0..k {
            let x0 = _mm512_loadu_ps(xt.add(kk * width + j));
            let x1 = _mm512_loadu_ps(xt.add(kk * width + j + 16));
            for r in 0..6 {
                let wv = _mm512_set1_ps(*w.add(r * k + kk));
                acc[r][0] = _mm512_fmadd_ps(wv, x0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(wv, x1, acc[r][1]);
            }
        }
        for r in 0..6 {
            _mm512_storeu_ps(c.add(r * width + j), acc[r][0]);
            _mm512_storeu_ps(c.add(r * width + j + 16), acc[r][1]);
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemm6x16(w: *const f32, k: usize, xt: *const f32, width: usize, j: usize, c: *mut f32) {
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; 6];
        for kk in 0..k {
            let x0 = _mm256_loadu_ps(xt.add(kk * width + j));
            let x1 = _mm256_loadu_ps(xt.add(kk * width + j + 8));
            for r in 0..6 {
                let wv = _mm256_set1_ps(*w.add(r * k + kk));
                acc[r][0] = _mm256_fmadd_ps(wv, x0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(wv, x1, acc[r][1]);
            }
        }
        for r in 0..6 {
            _mm256_storeu_ps(c.add(r * width + j), acc[r][0]);
            _mm256_storeu_ps(c.add(r * width + j + 8), acc[r][1]);
        }
    }
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
    ty: GgmlType,
    w: &[u8],
    rows: Range<usize>,
    x: &[f32],
    n: usize,
    cols: usize,
    out: &Out,
) {
    if ty.is_dense() {
        return go_dense(ty, w, rows, x, n, cols, out);
    }
    by_type!(ty, go_exact, w, rows, x, n, cols, out)
}

/// [`crate::igemm::quantize_row`] with AVX-512: the same values (the max is exact in any order,
/// the conversion rounds to nearest even as `round_ties_even` does, the sums are integers).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")]
pub(crate) unsafe fn igemm_quantize_row(
    x: &[f32],
    a: &mut [i16],
    d: &mut [f32],
    ds16: &mut [f32],
    ds32: &mut [f32],
) {
    let n = x.len() / 32;
    assert!(a.len() >= 32 * n && d.len() >= n && ds16.len() >= 2 * n && ds32.len() >= n);
    let (lo, hi) = (_mm512_set1_epi32(-32767), _mm512_set1_epi32(32767));
    for c in 0..n {
        // SAFETY: 32 values of `x` and of `a` at 32c (checked above).
        unsafe {
            let v = [
                _mm512_loadu_ps(x.as_ptr().add(32 * c)),
                _mm512_loadu_ps(x.as_ptr().add(32 * c + 16)),
            ];
            let amax =
                _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
            let step = amax / 32767.0;
            let inv = _mm512_set1_ps(if amax != 0.0 { 32767.0 / amax } else { 0.0 });
            let mut sums = [0i32; 2];
            for (h, v) in v.into_iter().enumerate() {
                let q = _mm512_cvtps_epi32(_mm512_mul_ps(v, inv));
                let q = _mm512_max_epi32(_mm512_min_epi32(q, hi), lo);
                sums[h] = _mm512_reduce_add_epi32(q);
                _mm256_storeu_si256(
                    a.as_mut_ptr().add(32 * c + 16 * h) as *mut __m256i,
                    _mm512_cvtepi32_epi16(q),
                );
            }
            d[c] = step;
            ds16[2 * c] = step * sums[0] as f32;
            ds16[2 * c + 1] = step * sums[1] as f32;
            ds32[c] = step * (sums[0] + sums[1]) as f32;
        }
    }
}

/// [`crate::igemm::quantize_row`] compiled for AVX2 (rounding by `vroundps`, not a call per
/// value): the same values.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn igemm_quantize_row_avx2(
    x: &[f32],
    a: &mut [i16],
    d: &mut [f32],
    ds16: &mut [f32],
    ds32: &mut [f32],
) {
    crate::igemm::quantize_row(x, a, d, ds16, ds32)
}

/// Tile rows `8e..8e + rows.len()` (at most 8) decoded from `rows` with AVX2, for every x86
/// instruction set (a 16-row AVX-512 version ran no faster): each chunk's 32 values of 8 rows
/// as 8 x 16 pairs, transposed 8 x 8 at a time so that each pair lands as the tile lays it
/// out.
pub(crate) fn igemm_decode_rows8(
    ty: GgmlType,
    rows: &[&[u8]],
    e: usize,
    t: &mut crate::igemm::Tile,
) {
    assert!(rows.len() <= 8 && e < 4 && has_avx2());
    // SAFETY: AVX2 was detected.
    unsafe { by_type!(ty, igemm_decode8_f, rows, e, t) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn igemm_decode8_f<F: Fmt>(rows: &[&[u8]], e: usize, t: &mut crate::igemm::Tile) {
    use crate::igemm::IG_ROWS;
    let cpb = F::PER / 32;
    let chunks = t.k / 32;
    let need = chunks / cpb * F::BYTES;
    assert!(rows.iter().all(|r| r.len() >= need));
    assert!(t.q.len() == t.k * IG_ROWS && t.s.len() == t.k / 16 * IG_ROWS);
    let off = _mm256_set1_epi16(F::OFF as i16);
    let (mut s, mut m) = ([[0f32; 8]; 2], [[0f32; 8]; 2]);
    for c in 0..chunks {
        // Row i's pairs 0..8 in lo[i], 8..16 in hi[i].
        let (mut lo, mut hi) = ([_mm256_setzero_si256(); 8], [_mm256_setzero_si256(); 8]);
        for (i, row) in rows.iter().enumerate() {
            // SAFETY: the block lies inside the row (checked above).
            let (v, sc) = unsafe { F::unpack(row.as_ptr().add((c / cpb) * F::BYTES), c % cpb) };
            let halves = [_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)];
            let w = halves.map(|x| {
                let w = if F::SIGNED {
                    _mm256_cvtepi8_epi16(x)
                } else {
                    _mm256_cvtepu8_epi16(x)
                };
                _mm256_sub_epi16(w, off)
            });
            (lo[i], hi[i]) = (w[0], w[1]);
            for half in 0..2 {
                s[half][i] = sc.s[half];
                m[half][i] = sc.m[half];
            }
        }
        for (j0, block) in [(0, lo), (8, hi)] {
            let o = transpose8(block);
            // SAFETY: pair 16c + j0 + j of rows 8e.. lies inside the tile (checked above).
            unsafe {
                for (j, v) in o.iter().enumerate() {
                    let at = (16 * c + j0 + j) * 2 * IG_ROWS + 16 * e;
                    _mm256_storeu_si256(t.q.as_mut_ptr().add(at) as *mut _, *v);
                }
            }
        }
        // SAFETY: as above.
        unsafe {
            for half in 0..2 {
                let at = (2 * c + half) * IG_ROWS + 8 * e;
                _mm256_storeu_ps(t.s.as_mut_ptr().add(at), _mm256_loadu_ps(s[half].as_ptr()));
                _mm256_storeu_ps(t.m.as_mut_ptr().add(at), _mm256_loadu_ps(m[half].as_ptr()));
            }
        }
    }
}

/// An 8 x 8 transpose of 32-bit elements: `out[j]` lane `i` is `r[i]` lane `j`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn transpose8(r: [__m256i; 8]) -> [__m256i; 8] {
    // Within each 128-bit half H: u[4i + e] holds element 4H + e of rows 4i..4i + 4.
    let mut t = [_mm256_setzero_si256(); 8];
    for i in 0..4 {
        t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    let mut u = [_mm256_setzero_si256(); 8];
    for i in 0..2 {
        u[4 * i] = _mm256_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm256_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm256_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm256_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    // Element 4H + e of the 8 rows: half H of u[e] (rows 0..4) and of u[4 + e] (rows 4..8).
    let mut out = [_mm256_setzero_si256(); 8];
    for e in 0..4 {
        out[e] = _mm256_permute2x128_si256::<0x20>(u[e], u[4 + e]);
        out[4 + e] = _mm256_permute2x128_si256::<0x31>(u[e], u[4 + e]);
    }
    out
}

/// [`crate::igemm::reference`] with AVX-512 VNNI: the same sums and the same float operations
/// in the same order, so the same bits.
pub(crate) fn igemm_block(
    t: &crate::igemm::Tile,
    g: usize,
    mins: bool,
    a: &crate::igemm::GemmActs,
    b0: usize,
    n: usize,
    res: &mut [[f32; crate::igemm::IG_ROWS]; crate::igemm::IG_COLS],
) {
    assert!(
        igemm_shapes_fit(t, a, b0, n) && n <= crate::igemm::IG_COLS && has_avx512(),
        "a tile and activation rows of matching shapes, on AVX-512 VNNI"
    );
    // SAFETY: shapes checked above; AVX-512 VNNI detected.
    unsafe { by_shape!(igemm_block_v, (t, a, b0, res), n, g, mins, 1 2 3 4 5 6) }
}

/// What every integer GEMM kernel needs of its tile (`t`) and its activation rows `b0..b0 +
/// n` (`a`): the same width, a multiple of 32, at least one row and no more than there are,
/// and the tile's values, scales and mins all there.
fn igemm_shapes_fit(
    t: &crate::igemm::Tile,
    a: &crate::igemm::GemmActs,
    b0: usize,
    n: usize,
) -> bool {
    use crate::igemm::IG_ROWS;
    let k = t.k;
    k == a.cols
        && k.is_multiple_of(32)
        && n >= 1
        && b0 + n <= a.rows
        && t.q.len() == k * IG_ROWS
        && t.s.len() == k / 16 * IG_ROWS
        && t.m.len() == t.s.len()
}

/// Calls `$f::<N, G, MINS>($args)` for the block's row count `$n` (one of `$ns`), its scale
/// group `$g` (16 or 32 values) and whether it has mins: each kernel is compiled per shape.
macro_rules! by_shape {
    ($f:ident, $args:tt, $n:expr, $g:expr, $mins:expr, $($ns:literal)*) => {
        match ($n, $g, $mins) {
            $(
                ($ns, 32, false) => $f::<$ns, 32, false> $args,
                ($ns, 32, true) => $f::<$ns, 32, true> $args,
                ($ns, 16, false) => $f::<$ns, 16, false> $args,
                ($ns, 16, true) => $f::<$ns, 16, true> $args,
            )*
            _ => unreachable!("rows checked by the caller; scale groups of 16 or 32 values"),
        }
    };
}
use by_shape;

/// `N` activation rows (a full block, or a prompt's last few: each output's arithmetic is the
/// same whatever `N`).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
unsafe fn igemm_block_v<const N: usize, const G: usize, const MINS: bool>(
    t: &crate::igemm::Tile,
    a: &crate::igemm::GemmActs,
    b0: usize,
    res: &mut [[f32; crate::igemm::IG_ROWS]; crate::igemm::IG_COLS],
) {
    use crate::igemm::IG_ROWS;
    let k = t.k;
    let q = t.q.as_ptr();
    // SAFETY (whole body): the caller checked the tile's and the activations' shapes; every
    // pointer below stays inside them.
    unsafe {
        let xs: [*const i16; N] = std::array::from_fn(|c| a.a.as_ptr().add((b0 + c) * k));
        let mut acc = [[_mm512_setzero_ps(); 2]; N];
        for grp in 0..k / G {
            let mut s = [[_mm512_setzero_si512(); 2]; N];
            for p in grp * G / 2..(grp + 1) * G / 2 {
                let w0 = _mm512_loadu_si512(q.add(p * 2 * IG_ROWS) as *const _);
                let w1 = _mm512_loadu_si512(q.add(p * 2 * IG_ROWS + IG_ROWS) as *const _);
                for c in 0..N {
                    let x = _mm512_set1_epi32((xs[c].add(2 * p) as *const i32).read_unaligned());
                    s[c][0] = dpwssd(s[c][0], w0, x);
                    s[c][1] = dpwssd(s[c][1], w1, x);
                }
            }
            let h = grp * G / 16;
            let sv = [
                _mm512_loadu_ps(t.s.as_ptr().add(h * IG_ROWS)),
                _mm512_loadu_ps(t.s.as_ptr().add(h * IG_ROWS + 16)),
            ];
            for c in 0..N {
                let d = _mm512_set1_ps(*a.d.get_unchecked(((b0 + c) * k + grp * G) / 32));
                for v in 0..2 {
                    let p = _mm512_mul_ps(_mm512_cvtepi32_ps(s[c][v]), d);
                    acc[c][v] = _mm512_fmadd_ps(p, sv[v], acc[c][v]);
                }
            }
            if MINS {
                let mv = [
                    _mm512_loadu_ps(t.m.as_ptr().add(h * IG_ROWS)),
                    _mm512_loadu_ps(t.m.as_ptr().add(h * IG_ROWS + 16)),
                ];
                for c in 0..N {
                    let ds = if G == 32 {
                        *a.ds32.get_unchecked((b0 + c) * k / 32 + grp)
                    } else {
                        *a.ds16.get_unchecked((b0 + c) * k / 16 + grp)
                    };
                    let ds = _mm512_set1_ps(ds);
                    for v in 0..2 {
                        acc[c][v] = _mm512_fmadd_ps(mv[v], ds, acc[c][v]);
                    }
                }
            }
        }
        for (c, r) in res.iter_mut().take(N).enumerate() {
            _mm512_storeu_ps(r.as_mut_ptr(), acc[c][0]);
            _mm512_storeu_ps(r.as_mut_ptr().add(16), acc[c][1]);
        }
    }
}

/// [`crate::igemm::reference`] with AVX-VNNI (Alder Lake and later, Zen 5): rows `16h..16h +
/// 16` of the tile (two 8-lane vectors), activation rows `b0..b0 + n` (`n` ≤ 3, so that the
/// accumulators fit 16 registers); the same sums and float operations as the reference.
#[allow(clippy::too_many_arguments)]
pub(crate) fn igemm_half_avx_vnni(
    t: &crate::igemm::Tile,
    g: usize,
    mins: bool,
    a: &crate::igemm::GemmActs,
    b0: usize,
    n: usize,
    h: usize,
    res: &mut [[f32; crate::igemm::IG_ROWS]; crate::igemm::IG_COLS],
) {
    assert!(
        igemm_shapes_fit(t, a, b0, n) && n <= 3 && n <= res.len() && h < 2 && has_avx_vnni(),
        "a tile and at most 3 activation rows of matching shapes, on AVX-VNNI"
    );
    // SAFETY: shapes checked above; AVX-VNNI detected.
    unsafe { by_shape!(igemm_half_v, (t, a, b0, h, res), n, g, mins, 1 2 3) }
}

#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
unsafe fn igemm_half_v<const N: usize, const G: usize, const MINS: bool>(
    t: &crate::igemm::Tile,
    a: &crate::igemm::GemmActs,
    b0: usize,
    h: usize,
    res: &mut [[f32; crate::igemm::IG_ROWS]; crate::igemm::IG_COLS],
) {
    use crate::igemm::IG_ROWS;
    let k = t.k;
    // Rows 16h.. of pair p: 16 pairs of i16 at q[p * 64 + 32h].
    let q = t.q.as_ptr().wrapping_add(32 * h);
    let r0 = 16 * h;
    // SAFETY (whole body): the caller checked the tile's and the activations' shapes; every
    // pointer below stays inside them.
    unsafe {
        let xs: [*const i16; N] = std::array::from_fn(|c| a.a.as_ptr().add((b0 + c) * k));
        let mut acc = [[_mm256_setzero_ps(); 2]; N];
        for grp in 0..k / G {
            let mut s = [[_mm256_setzero_si256(); 2]; N];
            for p in grp * G / 2..(grp + 1) * G / 2 {
                let w0 = _mm256_loadu_si256(q.add(p * 2 * IG_ROWS) as *const _);
                let w1 = _mm256_loadu_si256(q.add(p * 2 * IG_ROWS + 16) as *const _);
                for c in 0..N {
                    let x = _mm256_set1_epi32((xs[c].add(2 * p) as *const i32).read_unaligned());
                    s[c][0] = dpwssd256(s[c][0], w0, x);
                    s[c][1] = dpwssd256(s[c][1], w1, x);
                }
            }
            let at = grp * G / 16 * IG_ROWS + r0;
            let sv = [
                _mm256_loadu_ps(t.s.as_ptr().add(at)),
                _mm256_loadu_ps(t.s.as_ptr().add(at + 8)),
            ];
            for c in 0..N {
                let d = _mm256_set1_ps(*a.d.get_unchecked(((b0 + c) * k + grp * G) / 32));
                for v in 0..2 {
                    let p = _mm256_mul_ps(_mm256_cvtepi32_ps(s[c][v]), d);
                    acc[c][v] = _mm256_fmadd_ps(p, sv[v], acc[c][v]);
                }
            }
            if MINS {
                let mv = [
                    _mm256_loadu_ps(t.m.as_ptr().add(at)),
                    _mm256_loadu_ps(t.m.as_ptr().add(at + 8)),
                ];
                for c in 0..N {
                    let ds = if G == 32 {
                        *a.ds32.get_unchecked((b0 + c) * k / 32 + grp)
                    } else {
                        *a.ds16.get_unchecked((b0 + c) * k / 16 + grp)
                    };
                    let ds = _mm256_set1_ps(ds);
                    for v in 0..2 {
                        acc[c][v] = _mm256_fmadd_ps(mv[v], ds, acc[c][v]);
                    }
                }
            }
        }
        for (c, r) in res.iter_mut().take(N).enumerate() {
            _mm256_storeu_ps(r.as_mut_ptr().add(r0), acc[c][0]);
            _mm256_storeu_ps(r.as_mut_ptr().add(r0 + 8), acc[c][1]);
        }
    }
}

/// `vpdpwssd` on 256-bit vectors (AVX-VNNI), written out as [`dpwssd`] is.
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
#[inline]
fn dpwssd256(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
    let mut acc = acc;
    // SAFETY: registers only; the enclosing functions enable AVX-VNNI, detected at run time.
    unsafe {
        std::arch::asm!(
            "{{vex}} vpdpwssd {a}, {w}, {x}",
            a = inout(ymm_reg) acc,
            w = in(ymm_reg) w,
            x = in(ymm_reg) x,
            options(pure, nomem, nostack, preserves_flags)
        )
    };
    acc
}

/// `vpdpwssd`, written out: LLVM's machine combiner otherwise splits most of them into
/// `vpmaddwd` + `vpaddd` (to shorten the accumulators' chains), two instructions for one, which
/// leaves the integer GEMM no faster than the f32 one.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
#[inline]
fn dpwssd(acc: __m512i, w: __m512i, x: __m512i) -> __m512i {
    let mut acc = acc;
    // SAFETY: registers only; the enclosing functions enable AVX-512 VNNI, detected at run time.
    unsafe {
        std::arch::asm!(
            "vpdpwssd {a}, {w}, {x}",
            a = inout(zmm_reg) acc,
            w = in(zmm_reg) w,
            x = in(zmm_reg) x,
            options(pure, nomem, nostack, preserves_flags)
        )
    };
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::ALL_TYPES;

    /// Rows `0..rows` of `w` against every row of `a` through both AVX2 kernels, in the tile
    /// shapes the dispatcher uses.
    fn both<F: Fmt>(w: &[u8], rows: usize, a: &QActs) -> (Vec<f32>, Vec<f32>) {
        let row_bytes = a.cols / F::PER * F::BYTES;
        assert!(w.len() >= rows * row_bytes && rows.is_multiple_of(2) && a.rows == 4);
        let run = |wide: bool| {
            let mut y = vec![f32::NAN; a.rows * rows];
            let out = Out::new(&mut y, rows, None);
            let p = w.as_ptr();
            // SAFETY: AVX2 was detected; the rows and activation rows exist (asserted above).
            unsafe {
                for r in (0..rows).step_by(2) {
                    if wide {
                        avx2::fast::<F, 2, 4>(p, row_bytes, r, a, 0, &out);
                        avx2::fast::<F, 1, 1>(p, row_bytes, r + 1, a, 3, &out);
                    } else {
                        avx2_bytes::fast::<F, 2, 4>(p, row_bytes, r, a, 0, &out);
                        avx2_bytes::fast::<F, 1, 1>(p, row_bytes, r + 1, a, 3, &out);
                    }
                }
            }
            drop(out);
            y
        };
        (run(true), run(false))
    }

    /// The 16-bit AVX2 kernel gives the byte-plane kernel's bits (and so AVX-VNNI's, which
    /// `tests/kernels.rs` compares with the byte planes where a machine has it), for every
    /// format, with activations at the planes' extremes among them.
    #[test]
    fn the_wide_avx2_kernel_gives_the_byte_planes_bits() {
        if !has_avx2() {
            eprintln!("skipped: no AVX2 here");
            return;
        }
        let mut seed = 7u64;
        let mut rnd = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        for ty in ALL_TYPES.iter().filter(|t| !t.is_dense()) {
            let cols = 3 * ty.block_values().max(64);
            let rows = 6;
            // Random blocks (every weight byte value, -128 among them) with modest scales.
            let mut w: Vec<u8> = (0..rows * ty.row_bytes(cols).unwrap())
                .map(|_| (rnd() * 256.0) as i32 as u8)
                .collect();
            for blk in w.chunks_exact_mut(ty.block_bytes()) {
                for &at in ty.f16_fields() {
                    let v = half::f16::from_f32(rnd() * 0.1);
                    blk[at..at + 2].copy_from_slice(&v.to_le_bytes());
                }
            }
            // Row 0 of the activations at +-max in every block (hi = +-127), so the joined
            // plane reaches its extremes; the others random with outliers.
            let x: Vec<f32> = (0..4 * cols)
                .map(|i| match (i / cols, i % 16) {
                    (0, 0) => -1.0,
                    (0, _) => {
                        if i % 3 == 0 {
                            1.0
                        } else {
                            -0.999_1
                        }
                    }
                    _ => rnd() * if i % 37 == 0 { 50.0 } else { 1.0 },
                })
                .collect();
            let a = QActs::quantize(&x, 4, cols);
            let (wide, bytes) = by_type!(*ty, both, &w, rows, &a);
            assert!(wide.iter().all(|v| v.is_finite()));
            let same = wide
                .iter()
                .zip(&bytes)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{}: {wide:?} != {bytes:?}", ty.name());
        }
    }
}
