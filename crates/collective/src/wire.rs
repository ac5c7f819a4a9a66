//! What partial sums look like on the wire: f32 (exact), bf16, or Q8_0 blocks (32 values as
//! one f16 scale and 32 signed bytes, as ggml's Q8_0 and distributed-llama's sync). Encoded
//! vectors travel as f32 slots holding the bytes (the transports move bits unchanged), and
//! every rank decodes every partial, its own included, and sums them in rank order in f32: so
//! all ranks still hold bit-identical results.

use half::{bf16, f16};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Wire {
    #[default]
    F32,
    Bf16,
    Q8,
}

impl std::str::FromStr for Wire {
    type Err = String;
    fn from_str(s: &str) -> Result<Wire, String> {
        match s.to_ascii_lowercase().as_str() {
            "" | "f32" => Ok(Wire::F32),
            "bf16" => Ok(Wire::Bf16),
            "q8" | "q8_0" => Ok(Wire::Q8),
            other => Err(format!("wire format {other:?}: one of f32, bf16, q8")),
        }
    }
}

/// Values per Q8_0 block, and the f32 slots a block takes (2 + 32 bytes, padded to 36).
const QK: usize = 32;
const Q8_SLOTS: usize = 9;

impl Wire {
    pub fn name(self) -> &'static str {
        match self {
            Wire::F32 => "f32",
            Wire::Bf16 => "bf16",
            Wire::Q8 => "q8",
        }
    }

    /// f32 slots that `n` values take on the wire.
    pub fn slots(self, n: usize) -> usize {
        match self {
            Wire::F32 => n,
            Wire::Bf16 => n.div_ceil(2),
            Wire::Q8 => n.div_ceil(QK) * Q8_SLOTS,
        }
    }

    /// Encodes `x` into `out` (resized to `slots(x.len())`).
    pub fn encode(self, x: &[f32], out: &mut Vec<f32>) {
        out.clear();
        match self {
            Wire::F32 => out.extend_from_slice(x),
            Wire::Bf16 => {
                for pair in x.chunks(2) {
                    let lo = bf16::from_f32(pair[0]).to_bits() as u32;
                    let hi = pair
                        .get(1)
                        .map_or(0, |v| bf16::from_f32(*v).to_bits() as u32);
                    out.push(f32::from_bits(lo | hi << 16));
                }
            }
            Wire::Q8 => {
                let mut bytes = [0u8; Q8_SLOTS * 4];
                for block in x.chunks(QK) {
                    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let d = f16::from_f32(amax / 127.0);
                    let inv = if d.to_f32() > 0.0 {
                        1.0 / d.to_f32()
                    } else {
                        0.0
                    };
                    bytes.fill(0);
                    bytes[..2].copy_from_slice(&d.to_bits().to_le_bytes());
                    for (b, v) in bytes[2..].iter_mut().zip(block) {
                        *b = ((v * inv).round().clamp(-127.0, 127.0) as i8) as u8;
                    }
                    for s in bytes.chunks_exact(4) {
                        out.push(f32::from_bits(u32::from_le_bytes(s.try_into().unwrap())));
                    }
                }
            }
        }
    }

    /// Decodes `enc` (as [`Wire::encode`] wrote it) into `out` (`n` values); with `add`, adds
    /// them to `out` instead.
    pub fn decode(self, enc: &[f32], out: &mut [f32], add: bool) {
        let n = out.len();
        if self == Wire::F32 {
            if add {
                out.iter_mut().zip(enc).for_each(|(o, x)| *o += x);
            } else {
                out.copy_from_slice(&enc[..n]);
            }
            return;
        }
        let mut put = |i: usize, v: f32| {
            if add {
                out[i] += v;
            } else {
                out[i] = v;
            }
        };
        match self {
            Wire::F32 => unreachable!("handled above"),
            Wire::Bf16 => {
                for i in 0..n {
                    let w = enc[i / 2].to_bits();
                    let h = if i % 2 == 0 { w & 0xffff } else { w >> 16 };
                    put(i, bf16::from_bits(h as u16).to_f32());
                }
            }
            Wire::Q8 => {
                let mut bytes = [0u8; Q8_SLOTS * 4];
                for (b, slots) in enc.chunks_exact(Q8_SLOTS).enumerate() {
                    for (dst, s) in bytes.chunks_exact_mut(4).zip(slots) {
                        dst.copy_from_slice(&s.to_bits().to_le_bytes());
                    }
                    let d = f16::from_bits(u16::from_le_bytes([bytes[0], bytes[1]])).to_f32();
                    for j in 0..QK {
                        let i = b * QK + j;
                        if i >= n {
                            break;
                        }
                        put(i, d * (bytes[2 + j] as i8) as f32);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_within_each_formats_precision() {
        let x: Vec<f32> = (0..100).map(|i| ((i as f32) * 0.37).sin() * 3.0).collect();
        let mut enc = Vec::new();
        let mut y = vec![0f32; x.len()];
        for (w, tol) in [
            (Wire::F32, 0.0),
            (Wire::Bf16, 3.0 / 128.0),
            (Wire::Q8, 3.0 / 127.0),
        ] {
            w.encode(&x, &mut enc);
            assert_eq!(enc.len(), w.slots(x.len()));
            w.decode(&enc, &mut y, false);
            let worst = x
                .iter()
                .zip(&y)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst <= tol, "{w:?}: off by {worst}");
        }
        // 100 values: 50 slots in bf16, 4 blocks of 9 slots in Q8 (against 100 in f32).
        assert_eq!((Wire::Bf16.slots(100), Wire::Q8.slots(100)), (50, 36));
        assert_eq!("q8".parse::<Wire>(), Ok(Wire::Q8));
        assert!("fp8".parse::<Wire>().is_err());
    }
}
