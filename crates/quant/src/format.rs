//! The GGML weight formats: block sizes, and decoding one 32-value chunk of a block into small
//! integers with a scale and an offset per 16 values. Every kernel (scalar and SIMD, fast and
//! exact) agrees with this decoding; dequantizing through it is bit-identical to ggml's
//! `dequantize_row_*` (the same float operations in the same order).

use half::{bf16, f16};

/// A GGML tensor type that Tessera keeps in its blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    IQ4_NL,
    IQ4_XS,
}

/// Every supported type, for tests and error messages.
pub const ALL_TYPES: [GgmlType; 15] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::IQ4_NL,
    GgmlType::IQ4_XS,
];

/// The non-linear 4-bit code book of IQ4_NL and IQ4_XS.
pub const IQ4_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

impl GgmlType {
    /// The type for a GGML type id, as stored in a GGUF tensor directory.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            10 => Q2_K,
            11 => Q3_K,
            12 => Q4_K,
            13 => Q5_K,
            14 => Q6_K,
            20 => IQ4_NL,
            23 => IQ4_XS,
            30 => BF16,
            _ => return None,
        })
    }

    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q2_K => 10,
            Q3_K => 11,
            Q4_K => 12,
            Q5_K => 13,
            Q6_K => 14,
            IQ4_NL => 20,
            IQ4_XS => 23,
            BF16 => 30,
        }
    }

    pub fn from_name(name: &str) -> Option<GgmlType> {
        ALL_TYPES.iter().copied().find(|t| t.name() == name)
    }

    /// (values per block, bytes per block)
    pub fn block(self) -> (usize, usize) {
        use GgmlType::*;
        match self {
            F32 => (1, 4),
            F16 | BF16 => (1, 2),
            Q4_0 => (32, 18),
            Q4_1 => (32, 20),
            Q5_0 => (32, 22),
            Q5_1 => (32, 24),
            Q8_0 => (32, 34),
            IQ4_NL => (32, 18),
            Q2_K => (256, 84),
            Q3_K => (256, 110),
            Q4_K => (256, 144),
            Q5_K => (256, 176),
            Q6_K => (256, 210),
            IQ4_XS => (256, 136),
        }
    }

    pub fn block_values(self) -> usize {
        self.block().0
    }

    pub fn block_bytes(self) -> usize {
        self.block().1
    }

    /// Whether values are stored one by one (F32, F16, BF16) rather than in quantized blocks.
    pub fn is_dense(self) -> bool {
        self.block().0 == 1
    }

    /// Byte offsets of a block's f16 scale fields (any bytes elsewhere make a valid block: what
    /// tests need to write random blocks with finite scales).
    pub fn f16_fields(self) -> &'static [usize] {
        use GgmlType::*;
        match self {
            Q4_0 | Q5_0 | Q8_0 | IQ4_NL | IQ4_XS => &[0],
            Q4_1 | Q5_1 | Q4_K | Q5_K => &[0, 2],
            Q2_K => &[80, 82],
            Q3_K => &[108],
            Q6_K => &[208],
            F32 | F16 | BF16 => &[],
        }
    }

    /// Bytes of a row of `cols` values, or None when `cols` is not a whole number of blocks.
    pub fn row_bytes(self, cols: usize) -> Option<usize> {
        let (per, bytes) = self.block();
        cols.is_multiple_of(per).then(|| cols / per * bytes)
    }

    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            BF16 => "BF16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q2_K => "Q2_K",
            Q3_K => "Q3_K",
            Q4_K => "Q4_K",
            Q5_K => "Q5_K",
            Q6_K => "Q6_K",
            IQ4_NL => "IQ4_NL",
            IQ4_XS => "IQ4_XS",
        }
    }
}

#[inline(always)]
pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The `min` of formats without one: adding -0.0 leaves every value, -0.0 included, unchanged.
const NO_MIN: f32 = -0.0;

/// One 32-value chunk of a block, decoded: value `i` is `scale[i / 16] * q[i] + min[i / 16]`,
/// computed in exactly that order (ggml's dequantization rounds the same way).
#[derive(Debug, Clone, Copy, Default)]
pub struct Chunk {
    pub q: [i8; 32],
    pub scale: [f32; 2],
    pub min: [f32; 2],
}

impl Chunk {
    #[inline(always)]
    pub fn value(&self, i: usize) -> f32 {
        self.scale[i / 16] * self.q[i] as f32 + self.min[i / 16]
    }
}

/// The 6-bit scale and min `j` (0..8) of a Q4_K or Q5_K super-block.
#[inline(always)]
pub(crate) fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// The 16 signed 6-bit scales of a Q3_K super-block (already minus 32).
#[inline(always)]
pub(crate) fn q3k_scales(s: &[u8]) -> [i8; 16] {
    let mut aux = [0u32; 4];
    for (i, a) in aux.iter_mut().take(3).enumerate() {
        *a = u32::from_le_bytes(s[4 * i..4 * i + 4].try_into().unwrap());
    }
    let (k1, k2) = (0x0303_0303u32, 0x0f0f_0f0fu32);
    let tmp = aux[2];
    aux[2] = ((aux[0] >> 4) & k2) | (((tmp >> 4) & k1) << 4);
    aux[3] = ((aux[1] >> 4) & k2) | (((tmp >> 6) & k1) << 4);
    aux[0] = (aux[0] & k2) | ((tmp & k1) << 4);
    aux[1] = (aux[1] & k2) | (((tmp >> 2) & k1) << 4);
    let mut out = [0i8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = (aux[i / 4] >> (8 * (i % 4))) as u8 as i8 - 32;
    }
    out
}

/// The 6-bit scale of IQ4_XS sub-block `ib` (0..8), minus 32.
#[inline(always)]
pub(crate) fn iq4xs_scale(b: &[u8], ib: usize) -> i32 {
    let scales_h = u16::from_le_bytes([b[2], b[3]]);
    let ls = ((b[4 + ib / 2] >> (4 * (ib % 2))) & 0xf) as i32
        | ((((scales_h >> (2 * ib)) & 3) as i32) << 4);
    ls - 32
}

/// Decodes chunk `c` (values `32c..32c+32`) of one block of a quantized type.
// Index loops: positions map between several packed arrays, as in ggml's layouts.
#[allow(clippy::needless_range_loop)]
pub fn decode_chunk(ty: GgmlType, b: &[u8], c: usize, out: &mut Chunk) {
    use GgmlType::*;
    match ty {
        Q4_0 | Q4_1 | IQ4_NL => {
            let (d, m, qs) = match ty {
                Q4_1 => (f16_at(b, 0), f16_at(b, 2), &b[4..20]),
                _ => (f16_at(b, 0), NO_MIN, &b[2..18]),
            };
            for j in 0..16 {
                let (lo, hi) = (qs[j] & 0xF, qs[j] >> 4);
                let (lo, hi) = match ty {
                    Q4_0 => (lo as i8 - 8, hi as i8 - 8),
                    Q4_1 => (lo as i8, hi as i8),
                    _ => (IQ4_VALUES[lo as usize], IQ4_VALUES[hi as usize]),
                };
                out.q[j] = lo;
                out.q[j + 16] = hi;
            }
            out.scale = [d; 2];
            out.min = [m; 2];
        }
        Q5_0 | Q5_1 => {
            let (d, m, off) = match ty {
                Q5_1 => (f16_at(b, 0), f16_at(b, 2), 4),
                _ => (f16_at(b, 0), NO_MIN, 2),
            };
            let qh = u32::from_le_bytes(b[off..off + 4].try_into().unwrap());
            let qs = &b[off + 4..off + 20];
            let bias = if ty == Q5_0 { 16 } else { 0 };
            for j in 0..16 {
                let h0 = (((qh >> j) << 4) & 0x10) as u8;
                let h1 = ((qh >> (j + 12)) & 0x10) as u8;
                out.q[j] = ((qs[j] & 0xF) | h0) as i8 - bias;
                out.q[j + 16] = ((qs[j] >> 4) | h1) as i8 - bias;
            }
            out.scale = [d; 2];
            out.min = [m; 2];
        }
        Q8_0 => {
            let d = f16_at(b, 0);
            for j in 0..32 {
                out.q[j] = b[2 + j] as i8;
            }
            out.scale = [d; 2];
            out.min = [NO_MIN; 2];
        }
        Q2_K => {
            // scales[16] qs[64] d dmin
            let d = f16_at(b, 80);
            let dmin = f16_at(b, 82);
            let (half, j) = (c / 4, c % 4);
            let q = &b[16 + 32 * half..16 + 32 * half + 32];
            for l in 0..32 {
                out.q[l] = ((q[l] >> (2 * j)) & 3) as i8;
            }
            for h in 0..2 {
                let sc = b[c * 2 + h];
                out.scale[h] = d * (sc & 0xF) as f32;
                out.min[h] = -(dmin * (sc >> 4) as f32);
            }
        }
        Q3_K => {
            // hmask[32] qs[64] scales[12] d
            let d = f16_at(b, 108);
            let sc = q3k_scales(&b[96..108]);
            let (half, j) = (c / 4, c % 4);
            let q = &b[32 + 32 * half..32 + 32 * half + 32];
            let m = 1u8 << (4 * half + j);
            for l in 0..32 {
                let low = ((q[l] >> (2 * j)) & 3) as i8;
                out.q[l] = low - if b[l] & m != 0 { 0 } else { 4 };
            }
            for h in 0..2 {
                out.scale[h] = d * sc[c * 2 + h] as f32;
                out.min[h] = NO_MIN;
            }
        }
        Q4_K | Q5_K => {
            // d dmin scales[12] (qh[32]) qs[128]
            let d = f16_at(b, 0);
            let dmin = f16_at(b, 2);
            let (sc, m) = scale_min_k4(c, &b[4..16]);
            let (qs_at, qh) = if ty == Q5_K {
                (48, Some(&b[16..48]))
            } else {
                (16, None)
            };
            let q = &b[qs_at + 32 * (c / 2)..qs_at + 32 * (c / 2) + 32];
            let high = c % 2 == 1;
            for l in 0..32 {
                let mut v = if high { q[l] >> 4 } else { q[l] & 0xF };
                if let Some(qh) = qh
                    && qh[l] & (1 << c) != 0
                {
                    v += 16;
                }
                out.q[l] = v as i8;
            }
            out.scale = [d * sc as f32; 2];
            out.min = [-(dmin * m as f32); 2];
        }
        Q6_K => {
            // ql[128] qh[64] scales[16] d
            let d = f16_at(b, 208);
            let (half, quarter) = (c / 4, c % 4);
            let ql = &b[64 * half + 32 * (quarter & 1)..];
            let qh = &b[128 + 32 * half..];
            for l in 0..32 {
                let lo = if quarter < 2 { ql[l] & 0xF } else { ql[l] >> 4 };
                let hi = (qh[l] >> (2 * quarter)) & 3;
                out.q[l] = (lo | (hi << 4)) as i8 - 32;
            }
            for h in 0..2 {
                out.scale[h] = d * (b[192 + 2 * c + h] as i8) as f32;
                out.min[h] = NO_MIN;
            }
        }
        IQ4_XS => {
            // d scales_h scales_l[4] qs[128]
            let d = f16_at(b, 0);
            let dl = d * iq4xs_scale(b, c) as f32;
            let qs = &b[8 + 16 * c..8 + 16 * c + 16];
            for j in 0..16 {
                out.q[j] = IQ4_VALUES[(qs[j] & 0xF) as usize];
                out.q[j + 16] = IQ4_VALUES[(qs[j] >> 4) as usize];
            }
            out.scale = [dl; 2];
            out.min = [NO_MIN; 2];
        }
        F32 | F16 | BF16 => unreachable!("dense types have no chunks"),
    }
}

/// Dequantizes whole blocks of `src` into `dst` (`dst.len()` values, a multiple of the block).
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    match ty {
        GgmlType::F32 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes(s.try_into().unwrap());
            }
        }
        GgmlType::F16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = f16::from_le_bytes([s[0], s[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = bf16::from_le_bytes([s[0], s[1]]).to_f32();
            }
        }
        _ => {
            let (per, bytes) = ty.block();
            let mut ch = Chunk::default();
            for (d, blk) in dst.chunks_exact_mut(per).zip(src.chunks_exact(bytes)) {
                for (c, out) in d.chunks_exact_mut(32).enumerate() {
                    decode_chunk(ty, blk, c, &mut ch);
                    for (i, o) in out.iter_mut().enumerate() {
                        *o = ch.value(i);
                    }
                }
            }
        }
    }
}
