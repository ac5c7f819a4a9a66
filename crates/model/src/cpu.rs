//! The layer's operations on the CPU, on the Flex backend's storage directly: RMSNorm, RoPE,
//! attention over the in-place KV cache, SiLU-gating and the embedding lookup. Each runs in one
//! pass over its data with no intermediate tensors; rows are independent, so a sequence's
//! result never depends on the rest of its batch.

use rayon::prelude::*;
use tessera_quant::vecops::{dot, scores, weighted_sum};

/// `x * w / sqrt(mean(x²) + eps)` per row of `h` values, in place.
pub fn rms_norm(x: &mut [f32], w: &[f32], h: usize, eps: f32) {
    for row in x.chunks_exact_mut(h) {
        let ss = dot(row, row) / h as f32;
        let inv = 1.0 / (ss + eps).sqrt();
        for (v, w) in row.iter_mut().zip(w) {
            *v = *v * inv * w;
        }
    }
}

/// Rotary position embedding, in place, on `x` = rows of `heads * hd` values, row `i` at
/// position `positions[i]`. Pairs are (j, j + hd/2), or (2j, 2j + 1) when `interleaved`.
pub fn rope(
    x: &mut [f32],
    positions: &[usize],
    heads: usize,
    hd: usize,
    inv_freq: &[f32],
    interleaved: bool,
) {
    let half = hd / 2;
    let mut cs = vec![(0f32, 0f32); half];
    for (row, &p) in x.chunks_exact_mut(heads * hd).zip(positions) {
        for (c, f) in cs.iter_mut().zip(inv_freq) {
            // f32 product, like transformers' `inv_freq @ position_ids` in float32.
            let a = f * p as f32;
            *c = (a.cos(), a.sin());
        }
        for head in row.chunks_exact_mut(hd) {
            for (j, &(c, s)) in cs.iter().enumerate() {
                let (a, b) = if interleaved {
                    (2 * j, 2 * j + 1)
                } else {
                    (j, j + half)
                };
                let (x1, x2) = (head[a], head[b]);
                head[a] = x1 * c - x2 * s;
                head[b] = x2 * c + x1 * s;
            }
        }
    }
}

/// `silu(gate) * up`, into `gate`.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// `gelu_tanh(gate) * up`, into `gate` (PyTorch's `gelu(approximate="tanh")`), using
/// `0.5 * (1 + tanh(v)) = 1 / (1 + exp(-2v))`: one `exp` instead of a `tanh`, a third of the
/// time, equal within f32 rounding.
pub fn geglu(gate: &mut [f32], up: &[f32]) {
    const C2: f32 = 2.0 * 0.797_884_6; // 2 * sqrt(2/pi)
    for (g, u) in gate.iter_mut().zip(up) {
        let x = *g;
        *g = x / (1.0 + (-C2 * (x + 0.044715 * x * x * x)).exp()) * u;
    }
}

/// One sequence's KV cache for one layer, position-major: position `p`'s K (and V) for every
/// KV head of the shard is `kv_width` contiguous values at `p * kv_width`. New positions are
/// written in place at the end; attention reads it where it lies.
#[derive(Default)]
pub struct HostKv {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

impl HostKv {
    pub fn len(&self, kv_width: usize) -> usize {
        self.k.len() / kv_width.max(1)
    }
    pub fn append(&mut self, k: &[f32], v: &[f32]) {
        if self.k.capacity() - self.k.len() < k.len() {
            // Double (at least), so a sequence's cache is reallocated O(log n) times.
            let extra = k.len().max(self.k.len());
            self.k.reserve_exact(extra);
            self.v.reserve_exact(extra);
        }
        self.k.extend_from_slice(k);
        self.v.extend_from_slice(v);
    }
}

/// Causal attention of one sequence's `t` new queries (rows of `nq * hd` values, the first at
/// position `pos`) over its cache (`pos + t` positions, the new ones already appended).
/// `kv_of[h]` is the cache head query head `h` reads; a query sees the last `window`
/// positions (itself included) when set, else all. Writes rows of `nq * hd` into `out`.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    cache: &HostKv,
    out: &mut [f32],
    t: usize,
    pos: usize,
    nq: usize,
    nkv: usize,
    hd: usize,
    kv_of: &[usize],
    scale: f32,
    window: Option<usize>,
) {
    let kvw = nkv * hd;
    let one = |(i, h, o): (usize, usize, &mut [f32])| {
        let qh = &q[i * nq * hd + h * hd..][..hd];
        let g = kv_of[h];
        let end = pos + i + 1;
        let lo = window.map_or(0, |w| end.saturating_sub(w));
        let len = end - lo;
        let mut sc = vec![0f32; len];
        let base = lo * kvw + g * hd;
        scores(qh, &cache.k[base..], kvw, scale, &mut sc);
        let max = sc.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        let mut sum = 0f32;
        for s in sc.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        sc.iter_mut().for_each(|s| *s *= inv);
        o.iter_mut().for_each(|v| *v = 0.0);
        weighted_sum(&sc, &cache.v[base..], kvw, o);
    };
    let work = t * nq * (pos + t) * hd;
    if work < 1 << 16 {
        out.chunks_exact_mut(hd)
            .enumerate()
            .for_each(|(j, o)| one((j / nq, j % nq, o)));
    } else {
        tessera_quant::in_pool(|| {
            out.par_chunks_exact_mut(hd)
                .enumerate()
                .for_each(|(j, o)| one((j / nq, j % nq, o)))
        });
    }
}
