//! Small f32 vector kernels for the rest of a layer (attention's dot products and weighted
//! sums, norms). Each is written once, with independent accumulator lanes so the compiler
//! vectorizes it, and compiled three times: for the baseline, AVX2 + FMA and AVX-512, picked
//! at run time. Every compilation performs the same operations in the same order, so they
//! agree bit for bit.

#[inline(always)]
fn dot_impl(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let n = a.len().min(b.len());
    let whole = n / L * L;
    let mut acc = [0f32; L];
    for (x, y) in a[..whole].chunks_exact(L).zip(b[..whole].chunks_exact(L)) {
        for i in 0..L {
            acc[i] += x[i] * y[i];
        }
    }
    // A tree, not a chain: 4 dependent adds instead of 16.
    let mut w = L / 2;
    while w > 0 {
        for i in 0..w {
            acc[i] += acc[i + w];
        }
        w /= 2;
    }
    let mut s = acc[0];
    for i in whole..n {
        s += a[i] * b[i];
    }
    s
}

#[inline(always)]
fn axpy_impl(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// `out[p] = scale * (q · k[p * stride..][..q.len()])`.
#[inline(always)]
fn scores_impl(q: &[f32], k: &[f32], stride: usize, scale: f32, out: &mut [f32]) {
    let hd = q.len();
    for (p, o) in out.iter_mut().enumerate() {
        *o = dot_impl(q, &k[p * stride..p * stride + hd]) * scale;
    }
}

/// `out += Σ_p w[p] * v[p * stride..][..out.len()]`.
#[inline(always)]
fn weighted_sum_impl(w: &[f32], v: &[f32], stride: usize, out: &mut [f32]) {
    let hd = out.len();
    for (p, &wp) in w.iter().enumerate() {
        axpy_impl(out, wp, &v[p * stride..p * stride + hd]);
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
}
