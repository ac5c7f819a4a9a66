//! Quantizing f32 rows into GGML blocks, for `tessera quantize` (requantizing a model file).
//! The 32-value formats round to nearest against the block's largest magnitude (or its range,
//! for the formats with a min), exactly as llama.cpp's reference quantizers do: the same bytes.
//! The K-quants pick each sub-block's scale (and min) from a few candidates by least squares
//! before quantizing the scales against the super-block's, as llama.cpp's searches do: on the
//! test files the weights end up at least as close to the source as llama.cpp's (no importance
//! matrix: every value weighs the same).

use crate::format::GgmlType;
use half::{bf16, f16};

/// Types [`quantize_row`] writes.
pub const QUANTIZE_TYPES: [GgmlType; 11] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

fn put_f16(out: &mut [u8], v: f32) {
    out[..2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// The value of largest magnitude, with its sign.
fn signed_max(x: &[f32]) -> f32 {
    x.iter()
        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m })
}

/// Quantizes one row (`x.len()` values, whole blocks) into `out` (`ty.row_bytes(x.len())`).
pub fn quantize_row(ty: GgmlType, x: &[f32], out: &mut [u8]) -> Result<(), String> {
    let want = ty
        .row_bytes(x.len())
        .ok_or_else(|| format!("{} values are not whole {} blocks", x.len(), ty.name()))?;
    if out.len() != want {
        return Err(format!("{} bytes for a row that needs {want}", out.len()));
    }
    let (per, bytes) = ty.block();
    match ty {
        GgmlType::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(x) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
            }
        }
        GgmlType::BF16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&bf16::from_f32(*v).to_le_bytes());
            }
        }
        _ => {
            for (xb, ob) in x.chunks_exact(per).zip(out.chunks_exact_mut(bytes)) {
                quantize_block(ty, xb, ob)?;
            }
        }
    }
    Ok(())
}

fn quantize_block(ty: GgmlType, x: &[f32], b: &mut [u8]) -> Result<(), String> {
    match ty {
        GgmlType::Q8_0 => {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            put_f16(b, d);
            for (o, v) in b[2..34].iter_mut().zip(x) {
                *o = (v * id).round().clamp(-127.0, 127.0) as i8 as u8;
            }
        }
        GgmlType::Q4_0 | GgmlType::Q5_0 => {
            let levels = if ty == GgmlType::Q4_0 { 8.0 } else { 16.0 };
            let d = signed_max(x) / -levels;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            put_f16(b, d);
            let top = 2.0 * levels - 1.0;
            let q: Vec<u8> = x
                .iter()
                .map(|v| (v * id + levels + 0.5).clamp(0.0, top) as u8)
                .collect();
            pack_32(ty, &q, b);
        }
        GgmlType::Q4_1 | GgmlType::Q5_1 => {
            let top = if ty == GgmlType::Q4_1 { 15.0 } else { 31.0 };
            let min = x.iter().fold(f32::INFINITY, |m, &v| m.min(v));
            let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let d = (max - min) / top;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            put_f16(b, d);
            put_f16(&mut b[2..], min);
            let q: Vec<u8> = x
                .iter()
                .map(|v| ((v - min) * id + 0.5).clamp(0.0, top) as u8)
                .collect();
            pack_32(ty, &q, b);
        }
        GgmlType::Q4_K | GgmlType::Q5_K => quantize_k45(ty, x, b),
        GgmlType::Q6_K => quantize_q6k(x, b),
        other => return Err(format!("cannot write {} blocks", other.name())),
    }
    Ok(())
}

/// 32-value blocks: nibbles (value i low in byte i, value i + 16 high), and Q5's fifth bits.
fn pack_32(ty: GgmlType, q: &[u8], b: &mut [u8]) {
    let (qh_at, qs_at) = match ty {
        GgmlType::Q4_0 => (None, 2),
        GgmlType::Q4_1 => (None, 4),
        GgmlType::Q5_0 => (Some(2), 6),
        _ => (Some(4), 8),
    };
    for j in 0..16 {
        b[qs_at + j] = (q[j] & 0xF) | ((q[j + 16] & 0xF) << 4);
    }
    if let Some(at) = qh_at {
        let mut qh = 0u32;
        for (j, v) in q.iter().enumerate() {
            qh |= u32::from((v >> 4) & 1) << j;
        }
        b[at..at + 4].copy_from_slice(&qh.to_le_bytes());
    }
}

/// A sub-block's scale and min (`x ≈ scale * q - min`, `q` in `0..=top`, `min >= 0`): of the
/// scales a little either side of the one that spans the range, the one whose levels, with
/// scale and min refitted by least squares, leave the smallest squared error (the search
/// llama.cpp's K-quants make; it matters most when the values sit on a coarser grid, as in a
/// file requantized from 4 bits).
fn fit_affine(x: &[f32], top: f32) -> (f32, f32) {
    let min = x.iter().fold(0f32, |m, &v| m.min(v));
    let max = x.iter().fold(0f32, |m, &v| m.max(v));
    if max == min {
        return (0.0, -min);
    }
    let err = |scale: f32, m: f32, id: f32| -> f32 {
        x.iter()
            .map(|&v| {
                let q = ((v - min) * id).round().clamp(0.0, top);
                (v - (scale * q - m)).powi(2)
            })
            .sum()
    };
    let plain = (max - min) / top;
    let mut best = (err(plain, -min, 1.0 / plain), plain, -min);
    let n = x.len() as f32;
    for step in 0..=20 {
        let id = (top - 1.0 + 0.1 * step as f32) / (max - min);
        let (mut sl, mut sl2, mut sx, mut sxl) = (0f32, 0f32, 0f32, 0f32);
        for &v in x {
            let q = ((v - min) * id).round().clamp(0.0, top);
            sl += q;
            sl2 += q * q;
            sx += v;
            sxl += v * q;
        }
        let det = n * sl2 - sl * sl;
        if det <= 0.0 {
            continue;
        }
        let mut scale = (n * sxl - sl * sx) / det;
        let mut offset = (sl2 * sx - sl * sxl) / det;
        if offset > 0.0 {
            offset = 0.0;
            scale = sxl / sl2;
        }
        if scale <= 0.0 {
            continue;
        }
        let e = err(scale, -offset, id);
        if e < best.0 {
            best = (e, scale, -offset);
        }
    }
    (best.1, best.2)
}

/// Q4_K / Q5_K: per 32 values a scale and a min (6 bits each, against the super-block's `d`
/// and `dmin`), values 0..15 (0..31) with `x = d * sc * q - dmin * m`.
fn quantize_k45(ty: GgmlType, x: &[f32], b: &mut [u8]) {
    let top = if ty == GgmlType::Q4_K { 15.0 } else { 31.0 };
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    for (j, xs) in x.chunks_exact(32).enumerate() {
        (scales[j], mins[j]) = fit_affine(xs, top);
    }
    let max_scale = scales.iter().fold(0f32, |m, &v| m.max(v));
    let max_min = mins.iter().fold(0f32, |m, &v| m.max(v));
    let d = f16::from_f32(max_scale / 63.0).to_f32();
    let dmin = f16::from_f32(max_min / 63.0).to_f32();
    put_f16(b, d);
    put_f16(&mut b[2..], dmin);
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..8 {
        sc[j] = if d > 0.0 {
            (scales[j] / d).round().clamp(0.0, 63.0) as u8
        } else {
            0
        };
        mn[j] = if dmin > 0.0 {
            (mins[j] / dmin).round().clamp(0.0, 63.0) as u8
        } else {
            0
        };
    }
    let s = &mut b[4..16];
    for j in 0..4 {
        s[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        s[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6);
        s[j + 8] = (sc[j + 4] & 0xF) | ((mn[j + 4] & 0xF) << 4);
    }
    let (qs_at, qh_at) = if ty == GgmlType::Q5_K {
        (48, Some(16))
    } else {
        (16, None)
    };
    if let Some(at) = qh_at {
        b[at..at + 32].iter_mut().for_each(|v| *v = 0);
    }
    for (j, xs) in x.chunks_exact(32).enumerate() {
        let step = d * sc[j] as f32;
        let m = dmin * mn[j] as f32;
        let inv = if step != 0.0 { 1.0 / step } else { 0.0 };
        for (l, v) in xs.iter().enumerate() {
            let q = ((v + m) * inv).round().clamp(0.0, top) as u8;
            let at = qs_at + 32 * (j / 2) + l;
            if j % 2 == 0 {
                b[at] = (b[at] & 0xF0) | (q & 0xF);
            } else {
                b[at] = (b[at] & 0x0F) | ((q & 0xF) << 4);
            }
            if let Some(h) = qh_at {
                b[h + l] |= ((q >> 4) & 1) << j;
            }
        }
    }
}

/// A sub-block's scale for signed levels `-levels..levels-1`: of the scales a little either
/// side of the one that maps the largest magnitude to `-levels`, the one whose levels,
/// refitted by least squares, leave the smallest squared error (as llama.cpp's Q6_K search).
fn fit_scale(x: &[f32], levels: f32) -> f32 {
    let max = signed_max(x);
    if max == 0.0 {
        return 0.0;
    }
    let mut best = (f32::INFINITY, max / -levels);
    for step in -9..=9 {
        let id = (-levels + 0.1 * step as f32) / max;
        let (mut xq, mut qq) = (0f32, 0f32);
        for &v in x {
            let q = (v * id).round().clamp(-levels, levels - 1.0);
            xq += v * q;
            qq += q * q;
        }
        if qq == 0.0 {
            continue;
        }
        let d = xq / qq;
        let err: f32 = x
            .iter()
            .map(|&v| {
                let q = (v * id).round().clamp(-levels, levels - 1.0);
                (v - d * q).powi(2)
            })
            .sum();
        if err < best.0 {
            best = (err, d);
        }
    }
    best.1
}

/// Q6_K: per 16 values an 8-bit scale (against the super-block's `d`), values -32..31.
fn quantize_q6k(x: &[f32], b: &mut [u8]) {
    let mut sub = [0f32; 16];
    for (j, xs) in x.chunks_exact(16).enumerate() {
        sub[j] = fit_scale(xs, 32.0);
    }
    let smax = signed_max(&sub);
    let d = f16::from_f32(smax / -128.0).to_f32();
    put_f16(&mut b[208..], d);
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut sc = [0i8; 16];
    for j in 0..16 {
        sc[j] = (sub[j] * id).round().clamp(-128.0, 127.0) as i8;
        b[192 + j] = sc[j] as u8;
    }
    b[..192].iter_mut().for_each(|v| *v = 0);
    for (e, v) in x.iter().enumerate() {
        let step = d * sc[e / 16] as f32;
        let q = if step != 0.0 {
            (v / step).round().clamp(-32.0, 31.0) as i32
        } else {
            0
        };
        let u = (q + 32) as u8;
        let (half, r) = (e / 128, e % 128);
        let (quarter, l) = (r / 32, r % 32);
        let ql = 64 * half + 32 * (quarter & 1) + l;
        if quarter < 2 {
            b[ql] |= u & 0xF;
        } else {
            b[ql] |= (u & 0xF) << 4;
        }
        b[128 + 32 * half + l] |= ((u >> 4) & 3) << (2 * quarter);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Quantized rows decode (with the decoder checked against gguf-py) close to the input.
    #[test]
    fn rows_round_trip_within_each_formats_precision() {
        let x: Vec<f32> = (0..1024)
            .map(|i| ((i as f32 * 0.37).sin() + 0.3 * (i as f32 * 0.011).cos()) * 0.8)
            .collect();
        for ty in QUANTIZE_TYPES {
            let mut out = vec![0u8; ty.row_bytes(x.len()).unwrap()];
            quantize_row(ty, &x, &mut out).unwrap();
            let mut back = vec![0f32; x.len()];
            crate::dequantize(ty, &out, &mut back);
            let rms = (x
                .iter()
                .zip(&back)
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f32>()
                / x.len() as f32)
                .sqrt();
            let bound = match ty {
                GgmlType::F32 => 0.0,
                GgmlType::F16 | GgmlType::BF16 => 3e-3,
                GgmlType::Q8_0 => 5e-3,
                GgmlType::Q6_K => 2e-2,
                GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q5_K => 3e-2,
                _ => 6e-2,
            };
            assert!(rms <= bound, "{}: rms error {rms} over {bound}", ty.name());
        }
    }

    #[test]
    fn bad_rows_are_errors() {
        let mut out = vec![0u8; 18];
        assert!(quantize_row(GgmlType::Q4_0, &[0.0; 31], &mut out).is_err());
        assert!(quantize_row(GgmlType::Q4_0, &[0.0; 32], &mut out[..17]).is_err());
        assert!(quantize_row(GgmlType::IQ4_NL, &[0.0; 32], &mut out).is_err());
    }
}
