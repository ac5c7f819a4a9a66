//! Small f32 vector kernels for the rest of a layer (attention's dot products and weighted
//! sums, norms). Each is written once, with independent accumulator lanes so the compiler
//! vectorizes it, and compiled three times: for the baseline, AVX2 + FMA and AVX-512, picked
//! at run time. Every compilation performs the same operations in the same order, so they
//! agree bit for bit. One is also written out with AVX-512 intrinsics: attention's scores
//! ([`scores_x16`], 16 keys at a time, each key's operations still in the portable order).
//!
//! Attention's products read the KV cache in its element type ([`CacheElem`]): f32, or f16
//! (half the bytes, as llama.cpp keeps its cache), widened to f32 as it is loaded, `L` values
//! at a time, by each compilation's own instruction (`vcvtph2ps` on x86). Widening is exact,
//! so the f16 products are the f32 products of the f16 values, in every compilation.

use half::f16;

/// Independent accumulator lanes of a dot product.
const L: usize = 16;

/// How a compilation loads stored values as f32: `L` at a time, or one. Exact for every
/// element type here, so all of a type's widenings give the same values.
trait Widen<T> {
    /// The first `L` values of `s` (which holds at least `L`).
    fn chunk(s: &[T]) -> [f32; L];
    fn one(x: T) -> f32;
}

/// f32 as it is.
struct Plain;

impl Widen<f32> for Plain {
    #[inline(always)]
    fn chunk(s: &[f32]) -> [f32; L] {
        s[..L].try_into().expect("L values")
    }
    #[inline(always)]
    fn one(x: f32) -> f32 {
        x
    }
}

/// f16 in portable code (the `half` crate's conversion).
struct Soft;

impl Widen<f16> for Soft {
    #[inline(always)]
    fn chunk(s: &[f16]) -> [f32; L] {
        std::array::from_fn(|i| s[i].to_f32())
    }
    #[inline(always)]
    fn one(x: f16) -> f32 {
        x.to_f32()
    }
}

/// f16 by F16C's `vcvtph2ps` on 8 values, twice. Only inside a compilation that enables F16C.
#[cfg(target_arch = "x86_64")]
struct F16c;

#[cfg(target_arch = "x86_64")]
impl Widen<f16> for F16c {
    #[inline(always)]
    fn chunk(s: &[f16]) -> [f32; L] {
        use std::arch::x86_64::*;
        let s = &s[..L];
        // SAFETY: 16 readable values (checked above); F16C is enabled in every function this
        // is inlined into (the AVX2 compilations, chosen only where F16C was detected).
        unsafe {
            let lo = _mm256_cvtph_ps(_mm_loadu_si128(s.as_ptr().cast()));
            let hi = _mm256_cvtph_ps(_mm_loadu_si128(s[8..].as_ptr().cast()));
            std::mem::transmute::<[__m256; 2], [f32; L]>([lo, hi])
        }
    }
    #[inline(always)]
    fn one(x: f16) -> f32 {
        x.to_f32()
    }
}

/// f16 by AVX-512's `vcvtph2ps` on 16 values. Only inside the AVX-512 compilations.
#[cfg(target_arch = "x86_64")]
struct F16x16;

#[cfg(target_arch = "x86_64")]
impl Widen<f16> for F16x16 {
    #[inline(always)]
    fn chunk(s: &[f16]) -> [f32; L] {
        use std::arch::x86_64::*;
        let s = &s[..L];
        // SAFETY: 16 readable values (checked above); AVX-512F is enabled in every function
        // this is inlined into (the AVX-512 compilations, chosen only where it was detected).
        unsafe {
            let v = _mm512_cvtph_ps(_mm256_loadu_si256(s.as_ptr().cast()));
            std::mem::transmute::<__m512, [f32; L]>(v)
        }
    }
    #[inline(always)]
    fn one(x: f16) -> f32 {
        x.to_f32()
    }
}

#[inline(always)]
fn dot_impl(a: &[f32], b: &[f32]) -> f32 {
    dot_w::<f32, Plain>(a, b)
}

#[inline(always)]
fn dot_w<T: Copy, W: Widen<T>>(a: &[f32], b: &[T]) -> f32 {
    let n = a.len().min(b.len());
    let whole = n / L * L;
    let mut acc = [0f32; L];
    for (x, y) in a[..whole].chunks_exact(L).zip(b[..whole].chunks_exact(L)) {
        let y = W::chunk(y);
        for i in 0..L {
            acc[i] += x[i] * y[i];
        }
    }
    finish::<T, W>(acc, &a[whole..n], &b[whole..n])
}

/// A dot product's lanes summed, then its tail past the whole lanes (`a`, `b`) added.
#[inline(always)]
fn finish<T: Copy, W: Widen<T>>(mut acc: [f32; L], a: &[f32], b: &[T]) -> f32 {
    // A tree, not a chain: 4 dependent adds instead of 16.
    let mut w = L / 2;
    while w > 0 {
        for i in 0..w {
            acc[i] += acc[i + w];
        }
        w /= 2;
    }
    let mut s = acc[0];
    for (x, &y) in a.iter().zip(b) {
        s += x * W::one(y);
    }
    s
}

#[inline(always)]
fn axpy_impl(y: &mut [f32], a: f32, x: &[f32]) {
    axpy_w::<f32, Plain>(y, a, x)
}

#[inline(always)]
fn axpy_w<T: Copy, W: Widen<T>>(y: &mut [f32], a: f32, x: &[T]) {
    let n = y.len().min(x.len());
    let whole = n / L * L;
    for (y, x) in y[..whole].chunks_exact_mut(L).zip(x.chunks_exact(L)) {
        let x = W::chunk(x);
        for i in 0..L {
            y[i] += a * x[i];
        }
    }
    for (y, &x) in y[whole..n].iter_mut().zip(&x[whole..n]) {
        *y += a * W::one(x);
    }
}

/// Keys (or value rows) that [`scores_impl`] and [`weighted_sum_impl`] take in one pass: their
/// independent accumulators hide the latency of each one's chain of adds, and the query (or
/// the output) is loaded once for all of them. Each key's own operations, and their order,
/// are [`dot_impl`]'s (each value row's, `axpy_impl`'s), so the results do not change.
const KEYS: usize = 4; // scores_impl names its four accumulators

/// Rows `p..p + N` of `len` values, `stride` apart, from `m`.
#[inline(always)]
fn rows<T, const N: usize>(m: &[T], p: usize, stride: usize, len: usize) -> [&[T]; N] {
    let mut r: [&[T]; N] = [&[]; N];
    for (j, r) in r.iter_mut().enumerate() {
        *r = &m[(p + j) * stride..][..len];
    }
    r
}

/// `out[p] = scale * (q · k[p * stride..][..q.len()])`.
#[inline(always)]
fn scores_impl<T: Copy, W: Widen<T>>(
    q: &[f32],
    k: &[T],
    stride: usize,
    scale: f32,
    out: &mut [f32],
) {
    let hd = q.len();
    let whole = hd / L * L;
    let mut groups = out.chunks_exact_mut(KEYS);
    let mut p = 0;
    for o in groups.by_ref() {
        let ks = rows::<T, KEYS>(k, p, stride, hd);
        // One accumulator per key, named, so that each stays in registers.
        let (mut a0, mut a1, mut a2, mut a3) = ([0f32; L], [0f32; L], [0f32; L], [0f32; L]);
        for c in 0..whole / L {
            let qc: [f32; L] = q[c * L..][..L].try_into().expect("L values");
            let at = |s: &[T]| W::chunk(&s[c * L..]);
            let (k0, k1, k2, k3) = (at(ks[0]), at(ks[1]), at(ks[2]), at(ks[3]));
            for i in 0..L {
                a0[i] += qc[i] * k0[i];
                a1[i] += qc[i] * k1[i];
                a2[i] += qc[i] * k2[i];
                a3[i] += qc[i] * k3[i];
            }
        }
        for (j, acc) in [a0, a1, a2, a3].into_iter().enumerate() {
            o[j] = finish::<T, W>(acc, &q[whole..], &ks[j][whole..]) * scale;
        }
        p += KEYS;
    }
    for o in groups.into_remainder() {
        *o = dot_w::<T, W>(q, &k[p * stride..p * stride + hd]) * scale;
        p += 1;
    }
}

/// [`scores_impl`] with 512-bit vectors, for the AVX-512 compilations: where the head size is
/// whole vectors, 16 keys at a time. Each key's products and sums are [`scores_impl`]'s, in its
/// order (a product, then an add, per lane and vector; the lanes summed as [`finish`]'s tree);
/// what changes is the tree: the 16 keys' trees run together, each step on two keys' halves
/// packed in one vector (31 shuffles and 15 adds for 16 keys, not 4 and 4 for each), and the
/// sums come out as one vector. So the bits are [`scores_impl`]'s.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn scores_x16<T: Copy, W: Widen<T>>(
    q: &[f32],
    k: &[T],
    stride: usize,
    scale: f32,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    const N: usize = 16;
    let hd = q.len();
    let mut p = 0;
    if hd > 0 && hd.is_multiple_of(L) {
        // SAFETY: AVX-512F is enabled in the function this is inlined into (the AVX-512
        // compilations, chosen only where it was detected); every load and store is of a
        // slice checked to hold 16 values.
        unsafe {
            let v = |a: [f32; L]| std::mem::transmute::<[f32; L], __m512>(a);
            // Lane 4k + j of the packed tree's result holds key 4j + k.
            let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
            let scale = _mm512_set1_ps(scale);
            while p + N <= out.len() {
                let ks = rows::<T, N>(k, p, stride, hd);
                let mut acc = [_mm512_setzero_ps(); N];
                for c in 0..hd / L {
                    let qc = v(Plain::chunk(&q[c * L..]));
                    for (a, kr) in acc.iter_mut().zip(&ks) {
                        *a = _mm512_add_ps(*a, _mm512_mul_ps(qc, v(W::chunk(&kr[c * L..]))));
                    }
                }
                // Lanes i and i + 8 of each key: two keys a vector.
                let s: [__m512; 8] = std::array::from_fn(|m| {
                    let (a, b) = (acc[2 * m], acc[2 * m + 1]);
                    _mm512_add_ps(
                        _mm512_shuffle_f32x4::<0x44>(a, b),
                        _mm512_shuffle_f32x4::<0xEE>(a, b),
                    )
                });
                // Lanes i and i + 4: keys 4r..4r + 4 in the four 128-bit blocks.
                let t: [__m512; 4] = std::array::from_fn(|r| {
                    let (a, b) = (s[2 * r], s[2 * r + 1]);
                    _mm512_add_ps(
                        _mm512_shuffle_f32x4::<0x88>(a, b),
                        _mm512_shuffle_f32x4::<0xDD>(a, b),
                    )
                });
                // Lanes i and i + 2 of each block, then i and i + 1.
                let u: [__m512; 2] = std::array::from_fn(|r| {
                    let (a, b) = (t[2 * r], t[2 * r + 1]);
                    _mm512_add_ps(
                        _mm512_shuffle_ps::<0x44>(a, b),
                        _mm512_shuffle_ps::<0xEE>(a, b),
                    )
                });
                let f = _mm512_add_ps(
                    _mm512_shuffle_ps::<0x88>(u[0], u[1]),
                    _mm512_shuffle_ps::<0xDD>(u[0], u[1]),
                );
                let f = _mm512_mul_ps(_mm512_permutexvar_ps(order, f), scale);
                let o = &mut out[p..p + N];
                _mm512_storeu_ps(o.as_mut_ptr(), f);
                p += N;
            }
        }
    }
    if p < out.len() {
        scores_impl::<T, W>(q, &k[p * stride..], stride, scale, &mut out[p..]);
    }
}

/// `out += Σ_p w[p] * v[p * stride..][..out.len()]`, in order of `p`.
#[inline(always)]
fn weighted_sum_impl<T: Copy, W: Widen<T>>(w: &[f32], v: &[T], stride: usize, out: &mut [f32]) {
    let hd = out.len();
    let whole = hd / L * L;
    let mut groups = w.chunks_exact(KEYS);
    let mut p = 0;
    for wg in groups.by_ref() {
        let vs = rows::<T, KEYS>(v, p, stride, hd);
        let (w0, w1, w2, w3) = (wg[0], wg[1], wg[2], wg[3]);
        for (c, o) in out[..whole].chunks_exact_mut(L).enumerate() {
            let at = |s: &[T]| W::chunk(&s[c * L..]);
            let (v0, v1, v2, v3) = (at(vs[0]), at(vs[1]), at(vs[2]), at(vs[3]));
            for i in 0..L {
                o[i] = o[i] + w0 * v0[i] + w1 * v1[i] + w2 * v2[i] + w3 * v3[i];
            }
        }
        for (i, o) in out.iter_mut().enumerate().skip(whole) {
            let [v0, v1, v2, v3] = vs.map(|r| W::one(r[i]));
            *o = *o + w0 * v0 + w1 * v1 + w2 * v2 + w3 * v3;
        }
        p += KEYS;
    }
    for &wp in groups.remainder() {
        axpy_w::<T, W>(out, wp, &v[p * stride..p * stride + hd]);
        p += 1;
    }
}

/// Queries that [`weighted_sum_multi`] takes in one pass.
const QUERIES: usize = 4;

/// [`weighted_sum_impl`] for several queries' weights over the same value rows (each row's
/// chunk loaded once for all of them): every output is the same operations in the same order
/// as one query's.
#[inline(always)]
fn weighted_sum_multi_impl(ws: &[&[f32]], v: &[f32], stride: usize, outs: &mut [&mut [f32]]) {
    assert_eq!(ws.len(), outs.len(), "one output per query");
    let mut i = 0;
    while i < ws.len() {
        let m = (ws.len() - i).min(QUERIES);
        let (w, o) = (&ws[i..i + m], &mut outs[i..i + m]);
        match m {
            4 => weighted_sum_m::<4>(w, v, stride, o),
            3 => weighted_sum_m::<3>(w, v, stride, o),
            2 => weighted_sum_m::<2>(w, v, stride, o),
            _ => weighted_sum_impl::<f32, Plain>(w[0], v, stride, o[0]),
        }
        i += m;
    }
}

#[inline(always)]
fn weighted_sum_m<const M: usize>(
    ws: &[&[f32]],
    v: &[f32],
    stride: usize,
    outs: &mut [&mut [f32]],
) {
    let hd = outs[0].len();
    let n = ws[0].len();
    assert!(ws.iter().all(|w| w.len() == n) && outs.iter().all(|o| o.len() == hd));
    let whole = hd / L * L;
    let mut p = 0;
    while p + KEYS <= n {
        let vs = rows::<f32, KEYS>(v, p, stride, hd);
        let wp: [[f32; KEYS]; M] = std::array::from_fn(|m| ws[m][p..p + KEYS].try_into().unwrap());
        for c in 0..whole / L {
            let vc: [[f32; L]; KEYS] = std::array::from_fn(|j| Plain::chunk(&vs[j][c * L..]));
            for (o, w) in outs.iter_mut().zip(&wp) {
                let o = &mut o[c * L..][..L];
                for i in 0..L {
                    o[i] = o[i]
                        + w[0] * vc[0][i]
                        + w[1] * vc[1][i]
                        + w[2] * vc[2][i]
                        + w[3] * vc[3][i];
                }
            }
        }
        for (o, w) in outs.iter_mut().zip(&wp) {
            for (i, o) in o.iter_mut().enumerate().skip(whole) {
                *o = *o + w[0] * vs[0][i] + w[1] * vs[1][i] + w[2] * vs[2][i] + w[3] * vs[3][i];
            }
        }
        p += KEYS;
    }
    for p in p..n {
        for (w, o) in ws.iter().zip(outs.iter_mut()) {
            axpy_w::<f32, Plain>(o, w[p], &v[p * stride..p * stride + hd]);
        }
    }
}

/// `e^x`, within 2 ulp for the arguments softmax meets (`x <= 0`; below -87.3 it gives about
/// 1e-38 instead of a smaller number or 0). Plain arithmetic on f32 and its bits (Cephes'
/// range reduction and polynomial), so that a loop of it vectorizes and every compilation
/// gives the same bits, unlike a call to the C library's `expf` per value.
#[inline(always)]
fn exp_impl(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts: n * C1 is exact for the n that occur.
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.7);
    let n = (x * LOG2E).round_ties_even();
    let r = x - n * C1 - n * C2;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * (r * r) + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `s` in place as softmax weights: `e^(s - max)`, then divided by their sum.
#[inline(always)]
fn softmax_impl(s: &mut [f32]) {
    let whole = s.len() / L * L;
    let mut m = [f32::NEG_INFINITY; L];
    for c in s[..whole].chunks_exact(L) {
        for i in 0..L {
            m[i] = m[i].max(c[i]);
        }
    }
    // The largest value, whatever the order it is found in.
    let max = m
        .iter()
        .chain(&s[whole..])
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut acc = [0f32; L];
    for c in s[..whole].chunks_exact_mut(L) {
        for i in 0..L {
            c[i] = exp_impl(c[i] - max);
            acc[i] += c[i];
        }
    }
    for v in s[whole..].iter_mut() {
        *v = exp_impl(*v - max);
    }
    let ones = [1f32; L];
    let sum = finish::<f32, Plain>(acc, &s[whole..], &ones[..s.len() - whole]);
    let inv = 1.0 / sum;
    s.iter_mut().for_each(|v| *v *= inv);
}

/// `$name`, dispatching at run time to a compilation of `$imp` for AVX-512 (`$avx512`), for
/// AVX2 + FMA + F16C (`$avx2`), or the baseline. `[$w512, $w256, $wbase]`, when given, are
/// the [`Widen`] each of the three loads the cache with (`$imp` then takes them as its second
/// type parameter; its first is `$elem`).
macro_rules! multiversion {
    ($(#[$doc:meta])* $name:ident, $imp:ident, $avx512:ident, $avx2:ident, ($($arg:ident: $ty:ty),*) $(-> $ret:ty)?) => {
        multiversion!($(#[$doc])* $name, $imp, $avx512, $avx2, ($($arg: $ty),*) $(-> $ret)?;
            [$imp, $imp, $imp]);
    };
    ($(#[$doc:meta])* $name:ident, $imp:ident<$elem:ty>, $avx512:ident, $avx2:ident, ($($arg:ident: $ty:ty),*) $(-> $ret:ty)?;
        [$w512:ty, $w256:ty, $wbase:ty]) => {
        multiversion!($(#[$doc])* $name, $imp, $avx512, $avx2, ($($arg: $ty),*) $(-> $ret)?;
            [$imp::<$elem, $w512>, $imp::<$elem, $w256>, $imp::<$elem, $wbase>]);
    };
    ($(#[$doc:meta])* $name:ident, $imp:ident, $avx512:ident, $avx2:ident, ($($arg:ident: $ty:ty),*) $(-> $ret:ty)?;
        [$f512:expr, $f256:expr, $fbase:expr]) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        fn $avx512($($arg: $ty),*) $(-> $ret)? {
            $f512($($arg),*)
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn $avx2($($arg: $ty),*) $(-> $ret)? {
            $f256($($arg),*)
        }
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            if avx512() {
                // SAFETY: AVX-512F, AVX2, FMA and F16C were detected at run time.
                return unsafe { $avx512($($arg),*) };
            }
            #[cfg(target_arch = "x86_64")]
            if avx2() {
                // SAFETY: AVX2, FMA and F16C were detected at run time.
                return unsafe { $avx2($($arg),*) };
            }
            $fbase($($arg),*)
        }
    };
}

multiversion!(
    /// `Σ a[i] * b[i]` over the shorter length.
    dot, dot_impl, dot_avx512, dot_avx2, (a: &[f32], b: &[f32]) -> f32);
multiversion!(
    /// `y += a * x`.
    axpy, axpy_impl, axpy_avx512, axpy_avx2, (y: &mut [f32], a: f32, x: &[f32]));
multiversion!(softmax, softmax_impl, softmax_avx512, softmax_avx2, (s: &mut [f32]));
multiversion!(
    /// `out[p] = scale * (q · k[p * stride..][..q.len()])`, for an f32 cache.
    scores, scores_impl, scores_avx512, scores_avx2,
    (q: &[f32], k: &[f32], stride: usize, scale: f32, out: &mut [f32]);
    [scores_x16::<f32, Plain>, scores_impl::<f32, Plain>, scores_impl::<f32, Plain>]);
multiversion!(
    /// `out += Σ_p w[p] * v[p * stride..][..out.len()]`, in order of `p`, for an f32 cache.
    weighted_sum, weighted_sum_impl<f32>, weighted_sum_avx512, weighted_sum_avx2,
    (w: &[f32], v: &[f32], stride: usize, out: &mut [f32]); [Plain, Plain, Plain]);
multiversion!(
    /// [`weighted_sum`] for several queries' weights over the same value rows: `outs[m] +=
    /// Σ_p ws[m][p] * v[p * stride..]`, each the bits [`weighted_sum`] gives.
    weighted_sum_multi, weighted_sum_multi_impl, weighted_sum_multi_avx512, weighted_sum_multi_avx2,
    (ws: &[&[f32]], v: &[f32], stride: usize, outs: &mut [&mut [f32]]));
multiversion!(
    /// [`scores`] over an f16 cache.
    scores_f16, scores_impl, scores_f16_avx512, scores_f16_avx2,
    (q: &[f32], k: &[f16], stride: usize, scale: f32, out: &mut [f32]);
    [scores_x16::<f16, X16>, scores_impl::<f16, X8>, scores_impl::<f16, Soft>]);
multiversion!(
    /// [`weighted_sum`] over an f16 cache.
    weighted_sum_f16, weighted_sum_impl<f16>, weighted_sum_f16_avx512, weighted_sum_f16_avx2,
    (w: &[f32], v: &[f16], stride: usize, out: &mut [f32]); [X16, X8, Soft]);

multiversion!(
    /// Rows of an f16 cache as contiguous f32 (see [`CacheElem::widen_rows`]).
    widen_f16, widen_impl<f16>, widen_f16_avx512, widen_f16_avx2,
    (src: &[f16], stride: usize, n: usize, hd: usize, dst: &mut [f32]); [X16, X8, Soft]);

#[cfg(target_arch = "x86_64")]
type X16 = F16x16;
#[cfg(target_arch = "x86_64")]
type X8 = F16c;
#[cfg(not(target_arch = "x86_64"))]
type X16 = Soft;
#[cfg(not(target_arch = "x86_64"))]
type X8 = Soft;

/// What a KV cache may hold: f32, or f16 (half the memory and half the bytes a step reads).
pub trait CacheElem: Copy + Default + Send + Sync + 'static {
    /// `out[p] = scale * (q · k[p * stride..][..q.len()])`.
    fn scores(q: &[f32], k: &[Self], stride: usize, scale: f32, out: &mut [f32]);
    /// `out += Σ_p w[p] * v[p * stride..][..out.len()]`, in order of `p`.
    fn weighted_sum(w: &[f32], v: &[Self], stride: usize, out: &mut [f32]);
    /// [`CacheElem::weighted_sum`] for several queries' weights over the same rows (the same
    /// bits).
    fn weighted_sum_multi(ws: &[&[f32]], v: &[Self], stride: usize, outs: &mut [&mut [f32]]) {
        for (w, o) in ws.iter().zip(outs.iter_mut()) {
            Self::weighted_sum(w, v, stride, o);
        }
    }
    /// Appends `src`, rounded to this type (to nearest, ties to even).
    fn extend(dst: &mut Vec<Self>, src: &[f32]);
    /// Whether a load of this type costs a conversion: then the heads that share rows
    /// read them once through [`CacheElem::widen_rows`] rather than each converting them.
    const CONVERTS: bool;
    /// `dst` = rows `0..n` of `hd` values, `stride` apart, in `src`, as contiguous f32
    /// (exact: the products over `dst` are the products over `src`, bit for bit).
    fn widen_rows(src: &[Self], stride: usize, n: usize, hd: usize, dst: &mut [f32]);
}

impl CacheElem for f32 {
    fn scores(q: &[f32], k: &[f32], stride: usize, scale: f32, out: &mut [f32]) {
        scores(q, k, stride, scale, out)
    }
    fn weighted_sum(w: &[f32], v: &[f32], stride: usize, out: &mut [f32]) {
        weighted_sum(w, v, stride, out)
    }
    fn weighted_sum_multi(ws: &[&[f32]], v: &[f32], stride: usize, outs: &mut [&mut [f32]]) {
        weighted_sum_multi(ws, v, stride, outs)
    }
    fn extend(dst: &mut Vec<f32>, src: &[f32]) {
        dst.extend_from_slice(src)
    }
    const CONVERTS: bool = false;
    fn widen_rows(src: &[f32], stride: usize, n: usize, hd: usize, dst: &mut [f32]) {
        for (p, d) in dst[..n * hd].chunks_exact_mut(hd).enumerate() {
            d.copy_from_slice(&src[p * stride..][..hd]);
        }
    }
}

impl CacheElem for f16 {
    fn scores(q: &[f32], k: &[f16], stride: usize, scale: f32, out: &mut [f32]) {
        scores_f16(q, k, stride, scale, out)
    }
    fn weighted_sum(w: &[f32], v: &[f16], stride: usize, out: &mut [f32]) {
        weighted_sum_f16(w, v, stride, out)
    }
    fn extend(dst: &mut Vec<f16>, src: &[f32]) {
        use half::slice::HalfFloatSliceExt;
        let at = dst.len();
        dst.resize(at + src.len(), f16::ZERO);
        dst[at..].convert_from_f32_slice(src);
    }
    const CONVERTS: bool = true;
    fn widen_rows(src: &[f16], stride: usize, n: usize, hd: usize, dst: &mut [f32]) {
        widen_f16(src, stride, n, hd, dst)
    }
}

#[inline(always)]
fn widen_impl<T: Copy, W: Widen<T>>(
    src: &[T],
    stride: usize,
    n: usize,
    hd: usize,
    dst: &mut [f32],
) {
    let whole = hd / L * L;
    for (p, d) in dst[..n * hd].chunks_exact_mut(hd).enumerate() {
        let row = &src[p * stride..][..hd];
        for (c, dc) in d[..whole].chunks_exact_mut(L).enumerate() {
            dc.copy_from_slice(&W::chunk(&row[c * L..]));
        }
        for (d, &x) in d[whole..].iter_mut().zip(&row[whole..]) {
            *d = W::one(x);
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| crate::x86::has_avx2() && is_x86_feature_detected!("avx512f"))
}

#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(crate::x86::has_avx2)
}

#[cfg(test)]
mod tests {
    #[test]
    fn both_compilations_agree_bit_for_bit() {
        let a: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.11).cos()).collect();
        for n in [0, 1, 15, 16, 17, 64, 999] {
            let want = super::dot_impl(&a[..n], &b[..n]);
            assert_eq!(super::dot(&a[..n], &b[..n]).to_bits(), want.to_bits());
            let exact: f64 = (0..n).map(|i| a[i] as f64 * b[i] as f64).sum();
            assert!((want as f64 - exact).abs() < 1e-3);
        }
        let mut y1 = b.clone();
        let mut y2 = b.clone();
        super::axpy(&mut y1, 0.3, &a);
        super::axpy_impl(&mut y2, 0.3, &a);
        assert_eq!(y1, y2);
    }

    /// The polynomial `exp` is within 2 ulp of the true value over softmax's range, and the
    /// softmax of any length sums to 1, matches f64 closely, and is the same in every
    /// compilation.
    #[test]
    fn softmax_is_close_to_f64_and_alike_everywhere() {
        let mut x = -87.0f32;
        while x <= 10.0 {
            let (got, want) = (super::exp_impl(x) as f64, (x as f64).exp());
            let ulp = (want as f32).to_bits().abs_diff((got as f32).to_bits());
            assert!(ulp <= 2, "exp({x}) = {got}, want {want}");
            x += 0.0137;
        }
        for n in [1, 3, 16, 17, 40, 129] {
            let s: Vec<f32> = (0..n).map(|i| (i as f32 * 0.731).sin() * 12.0).collect();
            let mut got = s.clone();
            super::softmax(&mut got);
            let mut base = s.clone();
            super::softmax_impl(&mut base);
            assert!(
                got.iter()
                    .zip(&base)
                    .all(|(a, b)| a.to_bits() == b.to_bits())
            );
            let max = s.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let sum: f64 = s.iter().map(|&v| (v as f64 - max).exp()).sum();
            for (g, v) in got.iter().zip(&s) {
                let want = (*v as f64 - max).exp() / sum;
                assert!(
                    (*g as f64 - want).abs() <= 1e-6 * want.max(1e-3),
                    "{g} vs {want}"
                );
            }
            let total: f64 = got.iter().map(|&v| v as f64).sum();
            assert!((total - 1.0).abs() < 1e-5, "sums to {total}");
        }
    }

    /// (row stride, keys) for a head of `hd` values: one key to 100, so that whole groups of
    /// 4 and of 16 (AVX-512 takes 16 at a time where the head is whole vectors) and their
    /// remainders all occur.
    fn key_layouts(hd: usize) -> [(usize, usize); 7] {
        [
            (hd, 1),
            (hd, 4),
            (hd + 5, 7),
            (3 * hd, 13),
            (hd, 16),
            (hd + 3, 37),
            (2 * hd, 100),
        ]
    }

    /// Scores taken several keys at a time are each key's `dot`, scaled, bit for bit; the
    /// weighted sum is the chain of `axpy`s in order: every head size, stride and key count
    /// (whole groups and remainders).
    #[test]
    fn grouped_attention_products_equal_one_key_at_a_time() {
        let data: Vec<f32> = (0..160_000)
            .map(|i| (i as f32 * 0.173).sin() * 3.0)
            .collect();
        for hd in [1, 16, 17, 64, 80, 256] {
            for (stride, keys) in key_layouts(hd) {
                let q = &data[7..7 + hd];
                let k = &data[1000..];
                let mut got = vec![0f32; keys];
                super::scores(q, k, stride, 0.125, &mut got);
                for (p, g) in got.iter().enumerate() {
                    let want = super::dot_impl(q, &k[p * stride..p * stride + hd]) * 0.125;
                    assert_eq!(g.to_bits(), want.to_bits(), "hd {hd} key {p}");
                }
                let w = &data[20_000..20_000 + keys];
                let mut got = data[30_000..30_000 + hd].to_vec();
                let mut want = got.clone();
                super::weighted_sum(w, k, stride, &mut got);
                for (p, &wp) in w.iter().enumerate() {
                    super::axpy_impl(&mut want, wp, &k[p * stride..p * stride + hd]);
                }
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "hd {hd} stride {stride} keys {keys}");
            }
        }
    }

    /// Several queries' weighted sums in one pass give each query's own bits, in every
    /// compilation: 1..9 queries (passes of 4 and their remainders), rows in groups of 4 and
    /// not, heads with and without a tail past the 16 lanes.
    #[test]
    fn queries_together_give_each_querys_bits() {
        let data: Vec<f32> = (0..40_000)
            .map(|i| (i as f32 * 0.291).cos() * 2.0)
            .collect();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for hd in [16, 17, 72, 256] {
            for (stride, keys) in [(hd, 4), (hd + 5, 7), (3 * hd, 13), (hd, 1)] {
                let k = &data[1000..];
                for m in 1..=9 {
                    let ws: Vec<&[f32]> = (0..m)
                        .map(|i| &data[20_000 + 17 * i..20_000 + 17 * i + keys])
                        .collect();
                    let init = |i: usize| data[30_000 + 13 * i..30_000 + 13 * i + hd].to_vec();
                    // The dispatched compilation, the portable one and the AVX2 one.
                    for imp in 0..3 {
                        #[cfg(target_arch = "x86_64")]
                        let has_avx2 = super::avx2();
                        #[cfg(not(target_arch = "x86_64"))]
                        let has_avx2 = false;
                        if imp == 2 && !has_avx2 {
                            continue;
                        }
                        let mut ou: Vec<Vec<f32>> = (0..m).map(init).collect();
                        let mut oo: Vec<&mut [f32]> = ou.iter_mut().map(|v| &mut v[..]).collect();
                        match imp {
                            0 => super::weighted_sum_multi(&ws, k, stride, &mut oo),
                            1 => super::weighted_sum_multi_impl(&ws, k, stride, &mut oo),
                            // SAFETY: AVX2, FMA and F16C were detected.
                            #[cfg(target_arch = "x86_64")]
                            _ => unsafe { super::weighted_sum_multi_avx2(&ws, k, stride, &mut oo) },
                            #[cfg(not(target_arch = "x86_64"))]
                            _ => unreachable!(),
                        }
                        drop(oo);
                        for (i, got) in ou.iter().enumerate() {
                            let mut o1 = init(i);
                            super::weighted_sum(ws[i], k, stride, &mut o1);
                            let at = format!("imp {imp} hd {hd} keys {keys} m {m} q {i}");
                            assert_eq!(bits(got), bits(&o1), "{at}");
                        }
                    }
                }
            }
        }
    }

    /// Over an f16 cache, every compilation's scores and weighted sums are the f32 ones over
    /// the widened values, bit for bit.
    #[test]
    fn f16_products_are_the_f32_products_of_the_widened_values() {
        use half::f16;
        let data: Vec<f32> = (0..160_000)
            .map(|i| (i as f32 * 0.173).sin() * 3.0)
            .collect();
        let halves: Vec<f16> = data.iter().map(|&x| f16::from_f32(x)).collect();
        let widened: Vec<f32> = halves.iter().map(|x| x.to_f32()).collect();
        for hd in [1, 16, 17, 64, 80, 256] {
            for (stride, keys) in key_layouts(hd) {
                let q = &data[7..7 + hd];
                let (k16, k32) = (&halves[1000..], &widened[1000..]);
                let mut want = vec![0f32; keys];
                super::scores(q, k32, stride, 0.125, &mut want);
                let mut got = vec![0f32; keys];
                super::scores_f16(q, k16, stride, 0.125, &mut got);
                let mut base = vec![0f32; keys];
                super::scores_impl::<f16, super::Soft>(q, k16, stride, 0.125, &mut base);
                let mut narrow = want.clone();
                #[cfg(target_arch = "x86_64")]
                if super::avx2() {
                    // SAFETY: AVX2, FMA and F16C were detected.
                    unsafe { super::scores_f16_avx2(q, k16, stride, 0.125, &mut narrow) };
                }
                for (g, b) in [(&got, "dispatched"), (&base, "portable"), (&narrow, "avx2")] {
                    let same = g.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{b} scores, hd {hd} stride {stride} keys {keys}");
                }
                let w = &data[20_000..20_000 + keys];
                let mut want = data[30_000..30_000 + hd].to_vec();
                let (mut got, mut base) = (want.clone(), want.clone());
                super::weighted_sum(w, k32, stride, &mut want);
                super::weighted_sum_f16(w, k16, stride, &mut got);
                super::weighted_sum_impl::<f16, super::Soft>(w, k16, stride, &mut base);
                // Where AVX2 is missing, nothing to compare: the expected value stands in.
                let mut narrow = want.clone();
                #[cfg(target_arch = "x86_64")]
                if super::avx2() {
                    narrow.copy_from_slice(&data[30_000..30_000 + hd]);
                    // SAFETY: AVX2, FMA and F16C were detected.
                    unsafe { super::weighted_sum_f16_avx2(w, k16, stride, &mut narrow) };
                }
                for (g, b) in [(&got, "dispatched"), (&base, "portable"), (&narrow, "avx2")] {
                    let same = g.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "{b} weighted sum, hd {hd} stride {stride} keys {keys}"
                    );
                }
            }
        }
    }
}
