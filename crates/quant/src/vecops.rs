//! Small f32 vector kernels for the rest of a layer (attention's dot products and weighted
//! sums, norms). Each is written once, with independent accumulator lanes so the compiler
//! vectorizes it, and compiled three times: for the baseline, AVX2 + FMA and AVX-512, picked
//! at run time. Every compilation performs the same operations in the same order, so they
//! agree bit for bit.

/// Independent accumulator lanes of a dot product.
const L: usize = 16;

#[inline(always)]
fn dot_impl(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let whole = n / L * L;
    let mut acc = [0f32; L];
    for (x, y) in a[..whole].chunks_exact(L).zip(b[..whole].chunks_exact(L)) {
        for i in 0..L {
            acc[i] += x[i] * y[i];
        }
    }
    finish(acc, &a[whole..n], &b[whole..n])
}

/// A dot product's lanes summed, then its tail past the whole lanes (`a`, `b`) added.
#[inline(always)]
fn finish(mut acc: [f32; L], a: &[f32], b: &[f32]) -> f32 {
    // A tree, not a chain: 4 dependent adds instead of 16.
    let mut w = L / 2;
    while w > 0 {
        for i in 0..w {
            acc[i] += acc[i + w];
        }
        w /= 2;
    }
    let mut s = acc[0];
    for (x, y) in a.iter().zip(b) {
        s += x * y;
    }
    s
}

#[inline(always)]
fn axpy_impl(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// Keys (or value rows) that [`scores_impl`] and [`weighted_sum_impl`] take in one pass: their
/// independent accumulators hide the latency of each one's chain of adds, and the query (or
/// the output) is loaded once for all of them. Each key's own operations, and their order,
/// are [`dot_impl`]'s (each value row's, `axpy_impl`'s), so the results do not change.
const KEYS: usize = 4; // scores_impl names its four accumulators

/// Rows `p..p + N` of `len` values, `stride` apart, from `m`.
#[inline(always)]
fn rows<const N: usize>(m: &[f32], p: usize, stride: usize, len: usize) -> [&[f32]; N] {
    let mut r: [&[f32]; N] = [&[]; N];
    for (j, r) in r.iter_mut().enumerate() {
        *r = &m[(p + j) * stride..][..len];
    }
    r
}

/// `out[p] = scale * (q · k[p * stride..][..q.len()])`.
#[inline(always)]
fn scores_impl(q: &[f32], k: &[f32], stride: usize, scale: f32, out: &mut [f32]) {
    let hd = q.len();
    let whole = hd / L * L;
    let mut groups = out.chunks_exact_mut(KEYS);
    let mut p = 0;
    for o in groups.by_ref() {
        let ks = rows::<KEYS>(k, p, stride, hd);
        // One accumulator per key, named, so that each stays in registers.
        let (mut a0, mut a1, mut a2, mut a3) = ([0f32; L], [0f32; L], [0f32; L], [0f32; L]);
        for c in 0..whole / L {
            let at = |s: &[f32]| -> [f32; L] { s[c * L..][..L].try_into().unwrap() };
            let (qc, k0, k1, k2, k3) = (at(q), at(ks[0]), at(ks[1]), at(ks[2]), at(ks[3]));
            for i in 0..L {
                a0[i] += qc[i] * k0[i];
                a1[i] += qc[i] * k1[i];
                a2[i] += qc[i] * k2[i];
                a3[i] += qc[i] * k3[i];
            }
        }
        for (j, acc) in [a0, a1, a2, a3].into_iter().enumerate() {
            o[j] = finish(acc, &q[whole..], &ks[j][whole..]) * scale;
        }
        p += KEYS;
    }
    for o in groups.into_remainder() {
        *o = dot_impl(q, &k[p * stride..p * stride + hd]) * scale;
        p += 1;
    }
}

/// `out += Σ_p w[p] * v[p * stride..][..out.len()]`, in order of `p`.
#[inline(always)]
fn weighted_sum_impl(w: &[f32], v: &[f32], stride: usize, out: &mut [f32]) {
    let hd = out.len();
    let mut groups = w.chunks_exact(KEYS);
    let mut p = 0;
    for wg in groups.by_ref() {
        let vs = rows::<KEYS>(v, p, stride, hd);
        let (w0, w1, w2, w3) = (wg[0], wg[1], wg[2], wg[3]);
        let rows = vs[0].iter().zip(vs[1]).zip(vs[2]).zip(vs[3]);
        for (o, (((v0, v1), v2), v3)) in out.iter_mut().zip(rows) {
            *o = *o + w0 * v0 + w1 * v1 + w2 * v2 + w3 * v3;
        }
        p += KEYS;
    }
    for &wp in groups.remainder() {
        axpy_impl(out, wp, &v[p * stride..p * stride + hd]);
        p += 1;
    }
}

macro_rules! multiversion {
    ($name:ident, $imp:ident, $avx512:ident, $avx2:ident, ($($arg:ident: $ty:ty),*) $(-> $ret:ty)?) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx2,fma")]
        fn $avx512($($arg: $ty),*) $(-> $ret)? {
            $imp($($arg),*)
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        fn $avx2($($arg: $ty),*) $(-> $ret)? {
            $imp($($arg),*)
        }
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            if avx512() {
                // SAFETY: AVX-512F, AVX2 and FMA were detected at run time.
                return unsafe { $avx512($($arg),*) };
            }
            #[cfg(target_arch = "x86_64")]
            if avx2() {
                // SAFETY: AVX2 and FMA were detected at run time.
                return unsafe { $avx2($($arg),*) };
            }
            $imp($($arg),*)
        }
    };
}

multiversion!(scores, scores_impl, scores_avx512, scores_avx2,
    (q: &[f32], k: &[f32], stride: usize, scale: f32, out: &mut [f32]));
multiversion!(weighted_sum, weighted_sum_impl, weighted_sum_avx512, weighted_sum_avx2,
    (w: &[f32], v: &[f32], stride: usize, out: &mut [f32]));

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_impl(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn axpy_avx2(y: &mut [f32], a: f32, x: &[f32]) {
    axpy_impl(y, a, x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    dot_impl(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn axpy_avx512(y: &mut [f32], a: f32, x: &[f32]) {
    axpy_impl(y, a, x)
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

/// `Σ a[i] * b[i]` over the shorter length.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: AVX-512F, AVX2 and FMA were detected at run time.
        return unsafe { dot_avx512(a, b) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: AVX2 and FMA were detected at run time.
        return unsafe { dot_avx2(a, b) };
    }
    dot_impl(a, b)
}

/// `y += a * x`.
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: AVX-512F, AVX2 and FMA were detected at run time.
        return unsafe { axpy_avx512(y, a, x) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: AVX2 and FMA were detected at run time.
        return unsafe { axpy_avx2(y, a, x) };
    }
    axpy_impl(y, a, x)
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

    /// Scores taken several keys at a time are each key's `dot`, scaled, bit for bit; the
    /// weighted sum is the chain of `axpy`s in order: every head size, stride and key count
    /// (whole groups and remainders).
    #[test]
    fn grouped_attention_products_equal_one_key_at_a_time() {
        let data: Vec<f32> = (0..40_000)
            .map(|i| (i as f32 * 0.173).sin() * 3.0)
            .collect();
        for hd in [1, 16, 17, 64, 80, 256] {
            for (stride, keys) in [(hd, 1), (hd, 4), (hd + 5, 7), (3 * hd, 13)] {
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
}
