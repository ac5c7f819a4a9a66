//! The tensor-parallel shard plan (Megatron style) and what each shard costs in memory.
//!
//! Shard `s` of `n` owns:
//! - a contiguous range of query heads and the KV heads those heads read (column-parallel Q/K/V,
//!   row-parallel O). With `n <= kv_heads` whole KV groups are dealt out; with more shards than
//!   KV heads, query heads are dealt out and a KV head is replicated on every shard that needs it.
//! - a contiguous range of FFN columns (column-parallel gate/up, row-parallel down), cut on
//!   32-column boundaries so a 32-wide quantization block is never split.
//! - a contiguous range of vocabulary rows (embedding lookup and LM head).

use crate::config::ModelConfig;
use std::ops::Range;

/// Width of a GGUF quantization block: FFN splits never cut inside one.
pub const QUANT_BLOCK: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShardSpec {
    pub rank: usize,
    pub world: usize,
    pub q_heads: Range<usize>,
    pub kv_heads: Range<usize>,
    pub ffn: Range<usize>,
    /// The columns of every expert's FFN this shard owns (mixture-of-experts layers; each
    /// expert is split like a dense FFN).
    #[serde(default)]
    pub expert_ffn: Range<usize>,
    pub vocab: Range<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardPlan {
    pub shards: Vec<ShardSpec>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("a plan needs at least one shard")]
    NoShards,
    #[error(
        "{shards} shards but the model has only {heads} attention heads: at most {heads} shards"
    )]
    TooManyShards { shards: usize, heads: usize },
    #[error("shard weights must be positive and finite")]
    BadWeights,
}

/// Splits `0..total` into `parts` contiguous ranges whose inner boundaries fall on multiples of
/// `granularity`; sizes differ by at most one granule, larger ranges first.
pub fn split_even(total: usize, parts: usize, granularity: usize) -> Vec<Range<usize>> {
    split_weighted(total, &vec![1.0; parts], granularity)
}

/// Like [`split_even`], but each part's share follows `weights` (for example each worker's free
/// memory). Largest-remainder rounding keeps the total exact.
pub fn split_weighted(total: usize, weights: &[f64], granularity: usize) -> Vec<Range<usize>> {
    let g = granularity.max(1);
    let units = total.div_ceil(g);
    let sum: f64 = weights.iter().sum();
    let exact: Vec<f64> = weights.iter().map(|w| w / sum * units as f64).collect();
    let mut counts: Vec<usize> = exact.iter().map(|x| x.floor() as usize).collect();
    let mut left = units - counts.iter().sum::<usize>();
    let mut order: Vec<usize> = (0..weights.len()).collect();
    // Largest fractional part first; ties go to the lower rank so the result is deterministic.
    order.sort_by(|&a, &b| {
        let fa = exact[a] - exact[a].floor();
        let fb = exact[b] - exact[b].floor();
        fb.partial_cmp(&fa)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    for &i in order.iter().cycle() {
        if left == 0 {
            break;
        }
        counts[i] += 1;
        left -= 1;
    }
    let mut start = 0usize;
    counts
        .iter()
        .map(|&c| {
            let end = ((start / g + c) * g).min(total);
            let r = start..end;
            start = end;
            r
        })
        .collect()
}

impl ShardPlan {
    /// An even plan over `n` shards.
    pub fn new(cfg: &ModelConfig, n: usize) -> Result<ShardPlan, PlanError> {
        Self::weighted(cfg, &vec![1.0; n])
    }

    /// A plan whose shard sizes follow `weights` (one per shard).
    pub fn weighted(cfg: &ModelConfig, weights: &[f64]) -> Result<ShardPlan, PlanError> {
        Self::weighted_blocks(cfg, weights, QUANT_BLOCK)
    }

    /// Like [`ShardPlan::weighted`], cutting the FFN on multiples of `ffn_block` (the block
    /// width of the `down` weights, e.g. 256 for K-quant super-blocks) when every shard can get
    /// a whole one; else on 32-value blocks (a row-parallel slice then straddles a super-block,
    /// which stays exact: see the model crate's weights).
    pub fn weighted_blocks(
        cfg: &ModelConfig,
        weights: &[f64],
        ffn_block: usize,
    ) -> Result<ShardPlan, PlanError> {
        let n = weights.len();
        if n == 0 {
            return Err(PlanError::NoShards);
        }
        if weights.iter().any(|w| !(w.is_finite() && *w > 0.0)) {
            return Err(PlanError::BadWeights);
        }
        if n > cfg.heads {
            return Err(PlanError::TooManyShards {
                shards: n,
                heads: cfg.heads,
            });
        }
        let group = cfg.group_size();
        // Whole KV groups per shard, or query heads per shard with the KV heads of a group that
        // is cut held by both sides (needed when shards outnumber KV heads).
        let by_groups = || -> (Vec<_>, Vec<_>) {
            split_nonempty(cfg.kv_heads, weights, 1)
                .into_iter()
                .map(|kv| (kv.start * group..kv.end * group, kv))
                .unzip()
        };
        let by_heads = || -> (Vec<_>, Vec<_>) {
            split_nonempty(cfg.heads, weights, 1)
                .into_iter()
                .map(|q| {
                    let kv = q.start / group..(q.end - 1) / group + 1;
                    (q, kv)
                })
                .unzip()
        };
        // A shard's attention work per step: its query heads, and the KV heads whose cache it
        // reads; relative to its weight. Whole groups unless cutting one evens the busiest
        // shard's work (SmolLM2's 3 groups over 2 shards: 6+2 against 3+1 heads, or 5+2
        // against 4+2 with the middle group's K and V on both).
        let busiest = |(q, kv): &(Vec<Range<usize>>, Vec<Range<usize>>)| {
            (0..n)
                .map(|r| (q[r].len() + kv[r].len()) as f64 / weights[r])
                .fold(0.0, f64::max)
        };
        let (q, kv) = if n > cfg.kv_heads {
            by_heads()
        } else {
            let (g, h) = (by_groups(), by_heads());
            if busiest(&h) < busiest(&g) { h } else { g }
        };
        let gran_for = |width: usize| {
            let fits = |g: usize| g > 0 && width.is_multiple_of(g) && width / g >= n;
            [ffn_block, QUANT_BLOCK, 1]
                .into_iter()
                .find(|&g| fits(g))
                .unwrap_or(1)
        };
        let ffn_split = |width: usize| split_nonempty(width, weights, gran_for(width));
        let expert_ffn = match &cfg.opts.moe {
            Some(m) => ffn_split(m.expert_ffn),
            None => vec![0..0; n],
        };
        // A dense layer's FFN makes up for an uneven split of the heads (SmolLM2's 3 KV groups
        // over 2 workers: 6 and 3 query heads), so that each worker's whole layer follows its
        // weight: every all-reduce waits for the slowest worker.
        let ffn = match cfg.opts.moe {
            None => {
                let gran = gran_for(cfg.intermediate);
                match balanced_columns(cfg, &q, &kv, weights, gran) {
                    Some(w) => split_nonempty(cfg.intermediate, &w, gran),
                    None => ffn_split(cfg.intermediate),
                }
            }
            Some(_) => ffn_split(cfg.intermediate),
        };
        let vocab = split_nonempty(cfg.vocab, weights, 1);
        let shards = (0..n)
            .map(|rank| ShardSpec {
                rank,
                world: n,
                q_heads: q[rank].clone(),
                kv_heads: kv[rank].clone(),
                ffn: ffn[rank].clone(),
                expert_ffn: expert_ffn[rank].clone(),
                vocab: vocab[rank].clone(),
            })
            .collect();
        Ok(ShardPlan { shards })
    }
}

/// FFN columns per shard (as weights for [`split_weighted`]) that make each shard's attention
/// plus FFN parameters follow `weights`, or None where some shard's heads alone exceed its share
/// (then the FFN follows `weights` by itself).
fn balanced_columns(
    cfg: &ModelConfig,
    q: &[Range<usize>],
    kv: &[Range<usize>],
    weights: &[f64],
    gran: usize,
) -> Option<Vec<f64>> {
    let (h, hd) = (cfg.hidden as f64, cfg.head_dim as f64);
    // Per layer: a query head's Q and O rows (2 x head_dim x hidden), a KV head's K and V, an
    // FFN column's gate, up and down (3 x hidden).
    let attn: Vec<f64> = (0..weights.len())
        .map(|r| 2.0 * hd * h * (q[r].len() + kv[r].len()) as f64)
        .collect();
    let total = attn.iter().sum::<f64>() + 3.0 * h * cfg.intermediate as f64;
    let wsum: f64 = weights.iter().sum();
    let cols: Vec<f64> = (0..weights.len())
        .map(|r| (weights[r] / wsum * total - attn[r]) / (3.0 * h))
        .collect();
    cols.iter().all(|&c| c >= gran as f64).then_some(cols)
}

/// A weighted split in which every part gets at least one granule (a worker with no heads or
/// no FFN columns would have nothing to do in that layer and break the uniform code path).
fn split_nonempty(total: usize, weights: &[f64], g: usize) -> Vec<Range<usize>> {
    let ranges = split_weighted(total, weights, g);
    if ranges.iter().all(|r| !r.is_empty()) {
        return ranges;
    }
    split_even(total, weights.len(), g)
}

/// What one shard holds and moves, in bytes, for a given weight and cache element size.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardCost {
    /// Parameters held by the shard (its slice of every layer, its vocab rows, the norms).
    pub params: u64,
    /// Parameters read for every decoded token (everything but the embedding lookup table,
    /// unless it doubles as the LM head).
    pub params_read_per_token: u64,
    /// KV cache bytes per token of context.
    pub kv_bytes_per_token: u64,
}

impl ShardSpec {
    pub fn n_q(&self) -> usize {
        self.q_heads.len()
    }
    pub fn n_kv(&self) -> usize {
        self.kv_heads.len()
    }

    /// The shard's KV-head index (0-based within the shard) that local query head `j` reads.
    pub fn kv_index_for_local_q(&self, cfg: &ModelConfig, j: usize) -> usize {
        (self.q_heads.start + j) / cfg.group_size() - self.kv_heads.start
    }

    pub fn cost(&self, cfg: &ModelConfig, cache_elem_bytes: u64) -> ShardCost {
        let h = cfg.hidden as u64;
        let hd = cfg.head_dim as u64;
        let q = self.n_q() as u64 * hd;
        let kv = self.n_kv() as u64 * hd;
        let f = self.ffn.len() as u64;
        let ef = self.expert_ffn.len() as u64;
        let v = self.vocab.len() as u64;
        let mut attn = h * q + 2 * h * kv + q * h + 2 * h;
        if cfg.qkv_bias {
            attn += q + 2 * kv;
        }
        if cfg.o_bias {
            attn += h;
        }
        if cfg.opts.qk_norm {
            attn += 2 * hd;
        }
        if cfg.opts.post_norms {
            attn += 2 * h;
        }
        let (mut held, mut read) = (0, 0);
        for l in 0..cfg.layers {
            let (ffn_held, ffn_read) = match cfg.moe_at(l) {
                // The router is replicated; a token reads its top-k experts' slices.
                Some(m) => {
                    let router = m.experts as u64 * h;
                    let expert = 3 * h * ef;
                    (
                        router + m.experts as u64 * expert,
                        router + m.top_k as u64 * expert,
                    )
                }
                None => {
                    let mut ffn = 3 * h * f;
                    if cfg.mlp_bias {
                        ffn += 2 * f + h;
                    }
                    (ffn, ffn)
                }
            };
            held += attn + ffn_held;
            read += attn + ffn_read;
        }
        let head = v * h;
        let embed = if cfg.tie_word_embeddings { 0 } else { v * h };
        ShardCost {
            params: held + head + embed + h,
            params_read_per_token: read + head + h,
            kv_bytes_per_token: 2 * cfg.layers as u64 * kv * cache_elem_bytes,
        }
    }
}

/// What the KV cache holds. By default the exact path keeps f32 (it reproduces transformers,
/// whose cache is the model's f32 activations); the fast path on quantized weights keeps f16,
/// as llama.cpp does: half the memory, and half the bytes a decode step reads once the context
/// is long. `--kv-cache` chooses either for any model and path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheType {
    F32,
    F16,
}

impl CacheType {
    /// `choice` where given, else the default for a path (`fast`: activations quantized
    /// against quantized weights) on weights that are `quantized` (the layers' matrices in
    /// GGML blocks).
    pub fn choose(choice: Option<CacheType>, fast: bool, quantized: bool) -> CacheType {
        match choice {
            Some(c) => c,
            None if fast && quantized => CacheType::F16,
            None => CacheType::F32,
        }
    }

    /// Bytes of one cached value.
    pub fn bytes(self) -> u64 {
        match self {
            CacheType::F32 => 4,
            CacheType::F16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CacheType::F32 => "f32",
            CacheType::F16 => "f16",
        }
    }

    /// KV cache bytes per position of context for the whole model (every layer and KV head).
    pub fn bytes_per_position(self, cfg: &ModelConfig) -> u64 {
        2 * (cfg.layers * cfg.kv_heads * cfg.head_dim) as u64 * self.bytes()
    }
}

impl std::str::FromStr for CacheType {
    type Err = String;
    fn from_str(s: &str) -> Result<CacheType, String> {
        match s {
            "f32" => Ok(CacheType::F32),
            "f16" => Ok(CacheType::F16),
            _ => Err(format!("unknown KV cache type {s:?} (f32 or f16)")),
        }
    }
}

/// Memory a worker process takes besides its weights and KV cache (code, runtime, buffers):
/// measured, a worker holding a shard of SmolLM2 is 31 MB above its weights; with margin for
/// the load's transient buffers.
pub const WORKER_OVERHEAD_BYTES: u64 = 48 << 20;

/// What one worker must hold: its weights, its KV cache for the positions the cluster may
/// reserve, and the process itself. `tessera plan` and the coordinator use the same arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerNeed {
    pub weights: u64,
    pub kv_cache: u64,
    pub process: u64,
}

impl WorkerNeed {
    pub fn new(weight_bytes: u64, kv_bytes_per_token: u64, kv_positions: u64) -> WorkerNeed {
        WorkerNeed {
            weights: weight_bytes,
            kv_cache: kv_bytes_per_token.saturating_mul(kv_positions),
            process: WORKER_OVERHEAD_BYTES,
        }
    }

    pub fn total(&self) -> u64 {
        self.weights + self.kv_cache + self.process
    }

    /// How much more than `offered` it needs, if it does not fit.
    pub fn shortfall(&self, offered: u64) -> Option<u64> {
        self.total().checked_sub(offered).filter(|&s| s > 0)
    }

    /// "N MiB (weights A + KV cache B + process C)".
    pub fn describe(&self) -> String {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        format!(
            "{:.1} MiB (weights {:.1} + KV cache {:.1} + process {:.1})",
            mib(self.total()),
            mib(self.weights),
            mib(self.kv_cache),
            mib(self.process)
        )
    }
}

/// Bytes one shard sends into all-reduces per token: two hidden-size vectors per layer plus the
/// embedding lookup, of `elem_bytes` each.
pub fn allreduce_bytes_per_token(cfg: &ModelConfig, elem_bytes: u64) -> u64 {
    (2 * cfg.layers as u64 + 1) * cfg.hidden as u64 * elem_bytes
}

/// A network link between workers: its rate in bits per second and its one-way latency.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Link {
    pub bits_per_second: f64,
    pub latency_seconds: f64,
}

impl std::str::FromStr for Link {
    type Err = String;

    /// `RATE,LATENCY`, e.g. `1gbit,0.2ms`, `10gbit,50us`, `100mbit,2ms`.
    fn from_str(s: &str) -> Result<Link, String> {
        let (rate, lat) = s
            .split_once(',')
            .ok_or_else(|| format!("{s:?}: expected RATE,LATENCY (e.g. 1gbit,0.2ms)"))?;
        let num = |t: &str, units: &[(&str, f64)]| -> Result<f64, String> {
            let t = t.trim().to_ascii_lowercase();
            for (suffix, scale) in units {
                if let Some(n) = t.strip_suffix(suffix) {
                    return n
                        .trim()
                        .parse::<f64>()
                        .ok()
                        .filter(|x| x.is_finite() && *x >= 0.0)
                        .map(|x| x * scale)
                        .ok_or_else(|| format!("{t:?} is not a number of {suffix}"));
                }
            }
            Err(format!(
                "{t:?}: give a unit ({})",
                units.iter().map(|u| u.0).collect::<Vec<_>>().join(", ")
            ))
        };
        let bits_per_second = num(rate, &[("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)])?;
        let latency_seconds = num(lat, &[("ms", 1e-3), ("us", 1e-6), ("s", 1.0)])?;
        if bits_per_second <= 0.0 {
            return Err("the rate must be above zero".into());
        }
        Ok(Link {
            bits_per_second,
            latency_seconds,
        })
    }
}

/// An estimate of one decode step, from the seed's formulas.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeEstimate {
    /// The slowest worker's weight bytes over memory bandwidth.
    pub compute_seconds: f64,
    /// 2 all-reduces per layer plus the embedding's, each one link latency plus the bytes one
    /// worker sends (its vector to each of the others) at the link's rate; and the step's
    /// round trip between the coordinator and the workers (two latencies; its few bytes do
    /// not count).
    pub network_seconds: f64,
}

impl DecodeEstimate {
    /// `weight_bytes[w]`: what worker `w` reads per token; `bandwidth`: bytes/s of memory
    /// each worker streams.
    pub fn new(
        cfg: &ModelConfig,
        weight_bytes: &[u64],
        bandwidth: f64,
        link: Option<Link>,
    ) -> DecodeEstimate {
        let n = weight_bytes.len();
        let slowest = weight_bytes.iter().copied().max().unwrap_or(0) as f64;
        let network_seconds = match link {
            Some(l) => {
                let per =
                    l.latency_seconds + ((n - 1) * cfg.hidden * 4 * 8) as f64 / l.bits_per_second;
                let reduces = if n > 1 { 2 * cfg.layers + 1 } else { 0 };
                reduces as f64 * per + 2.0 * l.latency_seconds
            }
            None => 0.0,
        };
        DecodeEstimate {
            compute_seconds: slowest / bandwidth.max(1.0),
            network_seconds,
        }
    }

    pub fn tokens_per_second(&self) -> f64 {
        1.0 / (self.compute_seconds + self.network_seconds).max(1e-12)
    }

    /// The share of a step spent on the network.
    pub fn network_share(&self) -> f64 {
        self.network_seconds / (self.compute_seconds + self.network_seconds).max(1e-12)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Arch;

    fn cfg(heads: usize, kv: usize, inter: usize, vocab: usize) -> ModelConfig {
        ModelConfig {
            arch: Arch::Llama,
            hidden: heads * 64,
            intermediate: inter,
            layers: 30,
            heads,
            kv_heads: kv,
            head_dim: 64,
            vocab,
            max_context: 8192,
            rms_eps: 1e-5,
            rope_theta: 1e4,
            rope_scaling: None,
            rope_precision: Default::default(),
            rope_interleaved: false,
            tie_word_embeddings: true,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            bos_token_id: None,
            eos_token_ids: vec![],
            opts: Default::default(),
        }
    }

    fn check_cover(ranges: impl Iterator<Item = Range<usize>>, total: usize) {
        let mut at = 0;
        for r in ranges {
            assert_eq!(r.start, at, "ranges must be contiguous");
            assert!(!r.is_empty());
            at = r.end;
        }
        assert_eq!(at, total);
    }

    #[test]
    fn split_even_respects_blocks() {
        assert_eq!(
            split_even(1536, 4, 32),
            vec![0..384, 384..768, 768..1152, 1152..1536]
        );
        // 48 blocks over 5 shards: 10,10,10,9,9 blocks.
        let r = split_even(1536, 5, 32);
        assert_eq!(
            r.iter().map(|r| r.len()).collect::<Vec<_>>(),
            vec![320, 320, 320, 288, 288]
        );
        assert!(r.iter().all(|r| r.start % 32 == 0));
        // A total that is not a multiple of the granule: the last range is short.
        assert_eq!(split_even(100, 3, 32), vec![0..64, 64..96, 96..100]);
        assert_eq!(split_even(10, 3, 1), vec![0..4, 4..7, 7..10]);
    }

    #[test]
    fn smollm2_two_shards_cut_the_middle_kv_group() {
        // SmolLM2-135M: 9 query heads, 3 KV heads (groups of 3). Whole groups would give 6+2
        // and 3+1 heads; cutting the middle group gives 5+2 and 4+2, both holding its K and V.
        let c = cfg(9, 3, 1536, 49152);
        let p = ShardPlan::new(&c, 2).unwrap();
        assert_eq!(p.shards[0].q_heads, 0..5);
        assert_eq!(p.shards[0].kv_heads, 0..2);
        assert_eq!(p.shards[1].q_heads, 5..9);
        assert_eq!(p.shards[1].kv_heads, 1..3);
        // The FFN makes up for the rest: 5 query and 2 KV heads (14 x 64 x 576 parameters)
        // plus 736 columns (736 x 3 x 576) against 4 and 2 heads plus 800 columns.
        assert_eq!(p.shards[0].ffn, 0..736);
        assert_eq!(p.shards[1].ffn, 736..1536);
        let read: Vec<u64> = p
            .shards
            .iter()
            .map(|s| s.cost(&c, 2).params_read_per_token - s.vocab.len() as u64 * 576)
            .collect();
        assert!(read[0].abs_diff(read[1]) * 30 < read[0], "{read:?}");
    }

    #[test]
    fn smollm2_four_shards_replicate_kv_heads() {
        let c = cfg(9, 3, 1536, 49152);
        let p = ShardPlan::new(&c, 4).unwrap();
        let q: Vec<_> = p.shards.iter().map(|s| s.q_heads.clone()).collect();
        let kv: Vec<_> = p.shards.iter().map(|s| s.kv_heads.clone()).collect();
        assert_eq!(q, vec![0..3, 3..5, 5..7, 7..9]);
        // Head 5 reads KV head 1 and head 6 reads KV head 2: shard 2 holds both.
        assert_eq!(kv, vec![0..1, 1..2, 1..3, 2..3]);
        let s2 = &p.shards[2];
        assert_eq!(s2.kv_index_for_local_q(&c, 0), 0);
        assert_eq!(s2.kv_index_for_local_q(&c, 1), 1);
        check_cover(p.shards.iter().map(|s| s.ffn.clone()), 1536);
        check_cover(p.shards.iter().map(|s| s.vocab.clone()), 49152);
    }

    #[test]
    fn every_shard_count_covers_everything() {
        for (heads, kv, inter, vocab) in [
            (4, 2, 176, 384),
            (6, 2, 240, 384),
            (9, 3, 1536, 49152),
            (32, 8, 14336, 128256),
        ] {
            let c = cfg(heads, kv, inter, vocab);
            for n in 1..=heads.min(8) {
                let p = ShardPlan::new(&c, n).unwrap();
                check_cover(p.shards.iter().map(|s| s.q_heads.clone()), heads);
                check_cover(p.shards.iter().map(|s| s.ffn.clone()), inter);
                check_cover(p.shards.iter().map(|s| s.vocab.clone()), vocab);
                for s in &p.shards {
                    for j in 0..s.n_q() {
                        let kv_global = s.kv_heads.start + s.kv_index_for_local_q(&c, j);
                        assert_eq!(kv_global, (s.q_heads.start + j) / c.group_size());
                        assert!(s.kv_heads.contains(&kv_global));
                    }
                }
                // Parameters add up to the whole model once replicated pieces are counted once.
                let total: u64 = p.shards.iter().map(|s| s.cost(&c, 4).params).sum();
                assert!(total >= c.param_count());
            }
        }
    }

    #[test]
    fn too_many_shards_and_weights() {
        let c = cfg(4, 2, 176, 384);
        assert_eq!(
            ShardPlan::new(&c, 5),
            Err(PlanError::TooManyShards {
                shards: 5,
                heads: 4
            })
        );
        assert_eq!(ShardPlan::new(&c, 0), Err(PlanError::NoShards));
        assert_eq!(
            ShardPlan::weighted(&c, &[1.0, -1.0]),
            Err(PlanError::BadWeights)
        );
        let c = cfg(8, 8, 4096, 32000);
        let p = ShardPlan::weighted(&c, &[3.0, 1.0]).unwrap();
        assert_eq!(p.shards[0].kv_heads, 0..6);
        assert_eq!(p.shards[0].ffn, 0..3072);
        assert_eq!(p.shards[1].vocab, 24000..32000);
    }

    #[test]
    fn ffn_splits_on_super_blocks_when_each_shard_gets_one() {
        let c = cfg(9, 3, 1536, 49152);
        let p = ShardPlan::weighted_blocks(&c, &[1.0; 4], 256).unwrap();
        // 6 super-blocks over 4 shards; shards 0 and 2 hold 4 heads' worth of attention (3
        // query + 1 KV, 2 + 2), shards 1 and 3 only 3: they get 1 super-block, the others 2.
        let f: Vec<_> = p.shards.iter().map(|s| s.ffn.clone()).collect();
        assert_eq!(f, vec![0..256, 256..768, 768..1024, 1024..1536]);
        // 768 = 3 super-blocks cannot feed 4 shards: 32-value blocks instead.
        let c = cfg(4, 2, 768, 384);
        let p = ShardPlan::weighted_blocks(&c, &[1.0; 4], 256).unwrap();
        assert!(
            p.shards
                .iter()
                .all(|s| s.ffn.start % 32 == 0 && s.ffn.len() == 192)
        );
    }

    #[test]
    fn kv_bytes_follow_the_formula() {
        // 2 x layers x kv_heads x head_dim x bytes: SmolLM2 on one shard in f32.
        let c = cfg(9, 3, 1536, 49152);
        let s = &ShardPlan::new(&c, 1).unwrap().shards[0];
        assert_eq!(s.cost(&c, 4).kv_bytes_per_token, 2 * 30 * 3 * 64 * 4);
        assert_eq!(allreduce_bytes_per_token(&c, 4), 61 * 576 * 4);
        // The whole model's, in either cache type; f16 is the fast path's on quantized weights
        // unless chosen otherwise.
        assert_eq!(CacheType::F32.bytes_per_position(&c), 2 * 30 * 3 * 64 * 4);
        assert_eq!(CacheType::F16.bytes_per_position(&c), 2 * 30 * 3 * 64 * 2);
        assert_eq!(CacheType::choose(None, true, true), CacheType::F16);
        assert_eq!(CacheType::choose(None, false, true), CacheType::F32);
        assert_eq!(CacheType::choose(None, true, false), CacheType::F32);
        let f16 = Some(CacheType::F16);
        assert_eq!(CacheType::choose(f16, false, false), CacheType::F16);
        assert_eq!("f32".parse(), Ok(CacheType::F32));
        assert!(
            "q8".parse::<CacheType>()
                .unwrap_err()
                .contains("f32 or f16")
        );
    }

    #[test]
    fn decode_estimate_adds_memory_time_and_latency_bound_all_reduces() {
        let c = cfg(4, 2, 1024, 1000); // hidden 256, 30 layers
        let link: Link = "1gbit,0.2ms".parse().unwrap();
        assert_eq!(link.bits_per_second, 1e9);
        assert!((link.latency_seconds - 2e-4).abs() < 1e-12);
        // Two workers reading 50 MB each at 25 GB/s: 2 ms; 61 all-reduces of
        // 0.2 ms + 256*4*8 bits / 1 Gbit/s = 0.2082 ms each.
        let e = DecodeEstimate::new(&c, &[50_000_000, 50_000_000], 25e9, Some(link));
        assert!((e.compute_seconds - 2e-3).abs() < 1e-9);
        assert!((e.network_seconds - 61.0 * (2e-4 + 8192.0 / 1e9) - 4e-4).abs() < 1e-9);
        assert!((e.tokens_per_second() - 1.0 / (2e-3 + e.network_seconds)).abs() < 1e-6);
        // One worker: only the round trip to the coordinator.
        let one = DecodeEstimate::new(&c, &[100_000_000], 25e9, Some(link));
        assert!((one.network_seconds - 4e-4).abs() < 1e-12);
        let none = DecodeEstimate::new(&c, &[100_000_000], 25e9, None);
        assert_eq!(none.network_seconds, 0.0);
        for bad in ["1gbit", "fast,1ms", "1gbit,1", "0mbit,1ms"] {
            assert!(bad.parse::<Link>().is_err(), "{bad}");
        }
    }
}
