//! The layer's operations on the CPU, on the Flex backend's storage directly: RMSNorm, RoPE,
//! attention over the in-place KV cache, SiLU-gating and the embedding lookup. Each runs in one
//! pass over its data with no intermediate tensors; rows are independent, so a sequence's
//! result never depends on the rest of its batch.

use rayon::prelude::*;
use std::ops::Range;
use tessera_quant::vecops::{CacheElem, dot, softmax};

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
/// KV head of the shard is `kv_width` contiguous values at `p * kv_width`, as `T` (f32, or
/// f16: see [`tessera_core::CacheType`]). New positions are written in place at the end;
/// attention reads it where it lies.
pub struct HostKv<T = f32> {
    pub k: Vec<T>,
    pub v: Vec<T>,
}

impl<T> Default for HostKv<T> {
    fn default() -> Self {
        HostKv {
            k: Vec::new(),
            v: Vec::new(),
        }
    }
}

impl<T: CacheElem> HostKv<T> {
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
        T::extend(&mut self.k, k);
        T::extend(&mut self.v, v);
    }
}

/// Keys a tile of [`attention`] takes for all the query heads of a KV head before moving on, so
/// that their K and V rows are read from memory once and then from the core's own caches.
const TILE: usize = 128;

/// Values of a widened tile of an f16 cache (32 KiB of f32).
const WIDE: usize = 8192;

/// A prompt's query rows that take each tile of the cache together, at most.
const BLOCK: usize = 16;

/// The query heads that read each of `nkv` cache heads (`kv_of[h]`: query head `h`'s).
fn heads_of(kv_of: &[usize], nkv: usize) -> Vec<Vec<usize>> {
    let mut heads = vec![Vec::new(); nkv];
    for (h, &g) in kv_of.iter().enumerate() {
        heads[g].push(h);
    }
    heads
}

/// How many of a cache head's query heads one work item takes: as many as keep the threads
/// as evenly loaded as one head an item would (the largest items first, each to the least
/// loaded thread), so that a decode step's few heads still spread over every thread.
fn group_part(heads_of: &[Vec<usize>], t: usize, threads: usize) -> usize {
    let threads = threads.max(1);
    let widest = heads_of.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let groups = heads_of.iter().filter(|hs| !hs.is_empty()).count();
    if t * groups >= 4 * threads {
        // A prompt's rows: whole groups are items enough.
        return widest;
    }
    let total: usize = t * heads_of.iter().map(Vec::len).sum::<usize>();
    let even = total.div_ceil(threads);
    (1..=widest)
        .rev()
        .find(|&size| {
            let mut items: Vec<usize> = heads_of
                .iter()
                .flat_map(|hs| hs.chunks(size).map(<[usize]>::len))
                .flat_map(|n| std::iter::repeat_n(n, t))
                .collect();
            items.sort_unstable_by(|a, b| b.cmp(a));
            let mut load = vec![0usize; threads];
            for n in items {
                *load.iter_mut().min().expect("a thread") += n;
            }
            load.into_iter().max().unwrap_or(0) <= even
        })
        .unwrap_or(1)
}

/// Causal attention of one sequence's `t` new queries (rows of `nq * hd` values, the first at
/// position `pos`) over its cache (`pos + t` positions, the new ones already appended).
/// `kv_of[h]` is the cache head query head `h` reads; a query sees the last `window`
/// positions (itself included) when set, else all. Writes rows of `nq * hd` into `out`.
///
/// The query heads that share a cache head go together, a tile of positions at a time (split
/// in parts where whole groups would load the threads unevenly: see [`group_part`]), and so do
/// a prompt's rows, in blocks of up to [`BLOCK`]: a tile of an f16 cache is widened once for
/// all of them, not once per row. Every head's scores and weighted sums are the same
/// operations in the same order as one head and one row at a time, so the result does not
/// depend on the grouping.
#[allow(clippy::too_many_arguments)]
pub fn attention<T: CacheElem>(
    q: &[f32],
    cache: &HostKv<T>,
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
    // One work item: a block of query rows, cache head `g`, and some of the heads that read it,
    // each with its output row for every row of the block.
    type Item<'a> = (Range<usize>, usize, Vec<(usize, Vec<&'a mut [f32]>)>);
    let work = t * nq * (pos + t) * hd;
    let threads = if work < 1 << 16 {
        1
    } else {
        tessera_quant::threads()
    };
    assert_eq!(kv_of.len(), nq, "one cache head per query head");
    let groups = heads_of(kv_of, nkv);
    let size = group_part(&groups, t, threads);
    // A prompt's rows go in blocks that take each tile of the cache together (widened once,
    // read from L1 by every row), as long as the blocks still spread over the threads.
    let block = (t * groups.len() / (4 * threads)).clamp(1, BLOCK);
    let mut rows: Vec<Option<&mut [f32]>> = out.chunks_exact_mut(hd).map(Some).collect();
    let mut items: Vec<Item> = Vec::new();
    for i0 in (0..t).step_by(block) {
        let rs = i0..(i0 + block).min(t);
        for (g, hs) in groups.iter().enumerate() {
            for part in hs.chunks(size) {
                let outs = part
                    .iter()
                    .map(|&h| {
                        let o = rs
                            .clone()
                            .map(|i| rows[i * nq + h].take().expect("one output row per head"));
                        (h, o.collect())
                    })
                    .collect();
                items.push((rs.clone(), g, outs));
            }
        }
    }
    let one = |(rs, g, heads): &mut Item| {
        // Each row's range of positions: `lo..end`.
        let spans: Vec<(usize, usize)> = rs
            .clone()
            .map(|i| {
                let end = pos + i + 1;
                (window.map_or(0, |w| end.saturating_sub(w)), end)
            })
            .collect();
        let from = spans.iter().map(|s| s.0).min().expect("a row");
        let to = spans.iter().map(|s| s.1).max().expect("a row");
        let nh = heads.len();
        // Scores of row r, head j at `sc[r * nh + j]`.
        let mut sc: Vec<Vec<f32>> = spans
            .iter()
            .flat_map(|&(lo, end)| std::iter::repeat_n(end - lo, nh))
            .map(|n| vec![0f32; n])
            .collect();
        // Rows and heads that share a tile of a converting cache (f16) widen it once, into
        // `wide`, a tile small enough to stay in the core's L1 cache. Every score and every
        // weighted sum is the same operations in the same order however the range is tiled
        // (each score alone; each sum position after position).
        let shared = T::CONVERTS && nh * spans.len() > 1;
        let tile = if shared {
            (WIDE / hd).clamp(4, TILE) / 4 * 4
        } else {
            TILE
        };
        let mut wide = vec![0f32; if shared { tile.min(to - from) * hd } else { 0 }];
        // The part of tile `a..a + n` row `r` sees.
        let part = |r: usize, a: usize, n: usize| {
            let (lo, end) = spans[r];
            (a.max(lo), (a + n).min(end), lo)
        };
        for a in (from..to).step_by(tile) {
            let n = tile.min(to - a);
            let k = &cache.k[a * kvw + *g * hd..];
            if shared {
                T::widen_rows(k, kvw, n, hd, &mut wide);
            }
            for (r, i) in rs.clone().enumerate() {
                let (s0, s1, lo) = part(r, a, n);
                if s0 >= s1 {
                    continue;
                }
                for (j, (h, _)) in heads.iter().enumerate() {
                    let qh = &q[(i * nq + *h) * hd..][..hd];
                    let s = &mut sc[r * nh + j][s0 - lo..s1 - lo];
                    if shared {
                        f32::scores(qh, &wide[(s0 - a) * hd..], hd, scale, s);
                    } else {
                        T::scores(qh, &k[(s0 - a) * kvw..], kvw, scale, s);
                    }
                }
            }
        }
        sc.iter_mut().for_each(|s| softmax(s));
        for (_, os) in heads.iter_mut() {
            os.iter_mut().for_each(|o| o.fill(0.0));
        }
        for a in (from..to).step_by(tile) {
            let n = tile.min(to - a);
            let v = &cache.v[a * kvw + *g * hd..];
            if shared {
                T::widen_rows(v, kvw, n, hd, &mut wide);
            }
            for r in 0..spans.len() {
                let (s0, s1, lo) = part(r, a, n);
                if s0 >= s1 {
                    continue;
                }
                // The heads take each value row together: loaded once for all their sums.
                let w: Vec<&[f32]> = (0..nh).map(|j| &sc[r * nh + j][s0 - lo..s1 - lo]).collect();
                let mut o: Vec<&mut [f32]> = heads.iter_mut().map(|(_, os)| &mut *os[r]).collect();
                if shared {
                    f32::weighted_sum_multi(&w, &wide[(s0 - a) * hd..], hd, &mut o);
                } else {
                    T::weighted_sum_multi(&w, &v[(s0 - a) * kvw..], kvw, &mut o);
                }
            }
        }
    };
    if items.len() == 1 || threads == 1 {
        items.iter_mut().for_each(one);
    } else {
        tessera_quant::in_pool(|| items.par_iter_mut().for_each(one));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One head at a time over the whole range, as attention was computed before heads were
    /// grouped: the reference the grouped version must equal bit for bit.
    #[allow(clippy::too_many_arguments)]
    fn per_head<T: CacheElem>(
        q: &[f32],
        cache: &HostKv<T>,
        t: usize,
        pos: usize,
        nq: usize,
        nkv: usize,
        hd: usize,
        kv_of: &[usize],
        window: Option<usize>,
    ) -> Vec<f32> {
        let kvw = nkv * hd;
        let mut out = vec![0f32; t * nq * hd];
        for (j, o) in out.chunks_exact_mut(hd).enumerate() {
            let (i, h) = (j / nq, j % nq);
            let end = pos + i + 1;
            let lo = window.map_or(0, |w| end.saturating_sub(w));
            let mut sc = vec![0f32; end - lo];
            let base = lo * kvw + kv_of[h] * hd;
            T::scores(
                &q[i * nq * hd + h * hd..][..hd],
                &cache.k[base..],
                kvw,
                0.3,
                &mut sc,
            );
            softmax(&mut sc);
            T::weighted_sum(&sc, &cache.v[base..], kvw, o);
        }
        out
    }

    #[test]
    fn grouped_heads_give_the_per_head_bits() {
        grouped_heads_equal_per_head::<f32>();
        grouped_heads_equal_per_head::<half::f16>();
    }

    fn grouped_heads_equal_per_head<T: CacheElem>() {
        // (query heads' cache heads): even groups, one shared head, an uneven shard's cut.
        let layouts: [&[usize]; 3] = [
            &[0, 0, 0, 1, 1, 1, 2, 2, 2],
            &[0, 0, 0, 0],
            &[0, 0, 0, 1, 1],
        ];
        // Head sizes whose widened f16 tiles are 128, 100 and 32 positions.
        for (hd, kv_of) in [16, 80, 256]
            .into_iter()
            .flat_map(|hd| layouts.map(|l| (hd, l)))
        {
            let (nq, nkv) = (kv_of.len(), kv_of.iter().max().unwrap() + 1);
            for (t, pos, window) in [
                (1, 0, None),
                (1, 300, None),
                (1, 600, None),
                (1, 700, Some(300)),
                (5, 140, None),
                (40, 0, None),
                (3, 290, Some(100)),
                (40, 290, Some(100)),
                (37, 20, Some(30)),
            ] {
                let n = pos + t;
                let val = |i: usize, f: f32| ((i as f32) * f).sin();
                let mut cache = HostKv::<T>::default();
                let k: Vec<f32> = (0..n * nkv * hd).map(|i| val(i, 0.37)).collect();
                let v: Vec<f32> = (0..n * nkv * hd).map(|i| val(i, 0.11)).collect();
                cache.append(&k, &v);
                let q: Vec<f32> = (0..t * nq * hd).map(|i| val(i, 0.53)).collect();
                let mut got = vec![f32::NAN; t * nq * hd];
                attention(
                    &q, &cache, &mut got, t, pos, nq, nkv, hd, kv_of, 0.3, window,
                );
                let want = per_head(&q, &cache, t, pos, nq, nkv, hd, kv_of, window);
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "hd {hd}, heads {kv_of:?}, t {t}, pos {pos}, window {window:?}"
                );
            }
        }
    }

    /// An f16 cache gives exactly what an f32 cache holding the same values rounded to f16
    /// gives (widening is exact), and stays within f16's rounding of the f32 cache's result.
    #[test]
    fn an_f16_cache_is_the_f32_cache_of_its_rounded_values() {
        use half::f16;
        let (hd, nq, nkv, t, pos) = (64, 6, 2, 3, 517);
        let kv_of = [0, 0, 0, 1, 1, 1];
        let n = pos + t;
        let val = |i: usize, f: f32| ((i as f32) * f).sin() * 2.0;
        let k: Vec<f32> = (0..n * nkv * hd).map(|i| val(i, 0.37)).collect();
        let v: Vec<f32> = (0..n * nkv * hd).map(|i| val(i, 0.11)).collect();
        let q: Vec<f32> = (0..t * nq * hd).map(|i| val(i, 0.53)).collect();
        let round =
            |x: &[f32]| -> Vec<f32> { x.iter().map(|&x| f16::from_f32(x).to_f32()).collect() };
        let run = |cache_f16: bool, k: &[f32], v: &[f32]| {
            let mut out = vec![f32::NAN; t * nq * hd];
            if cache_f16 {
                let mut c = HostKv::<f16>::default();
                c.append(k, v);
                attention(&q, &c, &mut out, t, pos, nq, nkv, hd, &kv_of, 0.125, None);
            } else {
                let mut c = HostKv::<f32>::default();
                c.append(k, v);
                attention(&q, &c, &mut out, t, pos, nq, nkv, hd, &kv_of, 0.125, None);
            }
            out
        };
        let half = run(true, &k, &v);
        let rounded = run(false, &round(&k), &round(&v));
        assert!(
            half.iter()
                .zip(&rounded)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
        let full = run(false, &k, &v);
        let worst = half
            .iter()
            .zip(&full)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst > 0.0 && worst < 2e-3, "f16 cache off by {worst}");
    }

    #[test]
    fn groups_split_only_to_even_out_the_threads() {
        let smollm2 = heads_of(&[0, 0, 0, 1, 1, 1, 2, 2, 2], 3);
        let gemma = heads_of(&[0, 0, 0, 0], 1);
        // Decode on two threads: 9 heads split 5 + 4 (items of 2 and 1), 4 heads 2 + 2.
        assert_eq!(group_part(&smollm2, 1, 2), 2);
        assert_eq!(group_part(&gemma, 1, 2), 2);
        // One thread, or a prompt's many rows: whole groups.
        assert_eq!(group_part(&smollm2, 1, 1), 3);
        assert_eq!(group_part(&gemma, 1, 1), 4);
        assert_eq!(group_part(&smollm2, 128, 2), 3);
        assert_eq!(group_part(&gemma, 2, 2), 4);
    }
}
