//! One shard's slice of every layer, on Burn tensors. World size 1 is simply shard 0 of 1:
//! there is no other, unsharded code path.
//!
//! Per layer: RMSNorm (replicated) -> Q/K/V for the shard's heads (column-parallel) -> RoPE ->
//! attention against the shard's own KV cache -> O over the matching rows (row-parallel) ->
//! all-reduce #1 -> residual; RMSNorm -> gate/up for the shard's FFN columns -> SiLU(gate)*up ->
//! down over the same rows -> all-reduce #2 -> residual. The LM head holds the shard's
//! vocabulary rows, and the embedding is looked up in those same rows and all-reduced.
//!
//! Weights stay in their stored format behind [`Linear`]; every other operation is a call into
//! `ops.rs`, which picks the implementation for the device.

use crate::error::{ModelError, Result};
use crate::linear::Linear;
use crate::ops::{self, Heads, Kv, Norm, Rope};
use crate::sampling::{Candidates, TopSpec, candidates};
use crate::weights::{Tensor as W, Weights};
use burn::tensor::{Device, Int, Tensor, TensorData};
use std::collections::HashMap;
use std::ops::Range;
use tessera_collective::Collective;
use tessera_core::{CacheType, ModelConfig, ShardSpec};
pub use tessera_quant::Precision;

struct Layer {
    attn_norm: Norm,
    /// Per-head norms of Q and K (Qwen3, Gemma 3).
    qk_norm: Option<(Norm, Norm)>,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    o_bias: Option<Tensor<2>>,
    /// Norms of the attention's and the FFN's outputs (Gemma).
    post_attn_norm: Option<Norm>,
    ffn_norm: Norm,
    ffn: Ffn,
    post_ffn_norm: Option<Norm>,
    /// Positions a query sees, when this layer's attention is a sliding window.
    window: Option<usize>,
    /// Which of the model's RoPE tables this layer rotates by.
    rope: usize,
}

/// A layer's FFN: one gated FFN, or a mixture of experts each split across shards like one.
// One per layer: the size difference costs nothing worth an indirection.
#[allow(clippy::large_enum_variant)]
enum Ffn {
    Dense {
        gate: Linear,
        up: Linear,
        down: Linear,
        down_bias: Option<Tensor<2>>,
    },
    Moe {
        /// Replicated on every shard: all shards route every token alike.
        router: Linear,
        /// Each expert's gate, up and down slices.
        experts: Vec<[Linear; 3]>,
        top_k: usize,
        norm_topk: bool,
    },
}

pub struct ShardModel {
    pub cfg: ModelConfig,
    pub spec: ShardSpec,
    device: Device,
    precision: Precision,
    /// What the KV cache holds on the CPU.
    cache_type: CacheType,
    layers: Vec<Layer>,
    final_norm: Norm,
    /// LM head rows for the shard's vocabulary slice.
    head: Linear,
    /// Embedding rows for the same slice; None when tied to the head.
    embed: Option<Linear>,
    heads: Heads,
    /// RoPE frequencies: the global layers' and, where they differ, the sliding layers'.
    inv_freqs: Vec<Vec<f32>>,
    caches: HashMap<u64, Vec<Kv>>,
    weight_bytes: u64,
    held_bytes: u64,
}

/// Rotary inverse frequencies of the global layers, as Hugging Face computes them.
pub fn inv_freq(cfg: &ModelConfig) -> Vec<f32> {
    inv_freq_at(cfg, cfg.rope_theta, true)
}

/// Rotary inverse frequencies for base `theta`: with Llama 3 scaling, GGUF frequency factors
/// or linear scaling if the model sets them (`global`: not a sliding layer of a family whose
/// sliding layers rotate plainly).
pub fn inv_freq_at(cfg: &ModelConfig, theta: f64, global: bool) -> Vec<f32> {
    let d = cfg.head_dim;
    (0..d / 2)
        .map(|i| {
            let mut base = 1.0 / theta.powf((2 * i) as f64 / d as f64);
            if global {
                if let Some(f) = &cfg.opts.rope_freq_factors {
                    base /= f[i] as f64;
                }
                if let Some(f) = cfg.opts.rope_linear_factor {
                    base /= f;
                }
            }
            let f = match cfg.rope_scaling.filter(|_| global) {
                None => base,
                Some(s) => {
                    let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
                    let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
                    let wavelen = 2.0 * std::f64::consts::PI / base;
                    if wavelen < high_wavelen {
                        base
                    } else if wavelen > low_wavelen {
                        base / s.factor
                    } else {
                        let smooth = (s.original_max_position_embeddings / wavelen
                            - s.low_freq_factor)
                            / (s.high_freq_factor - s.low_freq_factor);
                        (1.0 - smooth) * base / s.factor + smooth * base
                    }
                }
            };
            // transformers keeps the frequencies in the checkpoint's dtype (a buffer cast with the
            // model), so a bf16 or f16 checkpoint rotates by rounded frequencies.
            cfg.rope_precision.round(f)
        })
        .collect()
}

/// A configuration and shard spec (as a worker receives them from its coordinator) checked
/// against the weights before anything is sized by them: the configuration's own rules, the
/// embedding, first and last layers' shapes (so the layer count, widths and heads describe
/// these weights), and the spec's ranges within them.
fn check_assignment(weights: &Weights, cfg: &ModelConfig, spec: &ShardSpec) -> Result<()> {
    cfg.validate()?;
    let bad = |why: String| Err(ModelError::Backend(format!("shard spec: {why}")));
    let q_width = cfg
        .heads
        .checked_mul(cfg.head_dim)
        .ok_or_else(|| ModelError::Backend("heads x head_dim overflows".into()))?;
    // A tied or separate LM head: the embedding is [vocab, hidden] either way.
    weights.expect_shape(W::Embed, &[cfg.vocab, cfg.hidden])?;
    for l in [0, cfg.layers - 1] {
        weights.expect_shape(W::Q(l), &[q_width, cfg.hidden])?;
    }
    let ffn = match &cfg.opts.moe {
        Some(m) if cfg.moe_at(0).is_some() => m.expert_ffn.max(cfg.intermediate),
        _ => cfg.intermediate,
    };
    for (what, r, n) in [
        ("query heads", &spec.q_heads, cfg.heads),
        ("KV heads", &spec.kv_heads, cfg.kv_heads),
        ("FFN columns", &spec.ffn, ffn.max(cfg.intermediate)),
        ("vocabulary rows", &spec.vocab, cfg.vocab),
    ] {
        if r.start > r.end || r.end > n {
            return bad(format!("{what} {r:?} outside 0..{n}"));
        }
    }
    if let Some(m) = &cfg.opts.moe
        && (spec.expert_ffn.start > spec.expert_ffn.end || spec.expert_ffn.end > m.expert_ffn)
    {
        return bad(format!(
            "expert FFN columns {:?} outside 0..{}",
            spec.expert_ffn, m.expert_ffn
        ));
    }
    if spec.world == 0 || spec.rank >= spec.world {
        return bad(format!("rank {} of {} shards", spec.rank, spec.world));
    }
    Ok(())
}

/// Every (tensor, rows, cols) block [`ShardModel::load`] reads for `spec`: what a coordinator
/// ships a worker that does not have the model file.
pub fn shard_reads(
    cfg: &ModelConfig,
    spec: &ShardSpec,
    weights: &Weights,
) -> Vec<(W, Range<usize>, Range<usize>)> {
    let (h, hd) = (cfg.hidden, cfg.head_dim);
    let q = spec.q_heads.start * hd..spec.q_heads.end * hd;
    let kv = spec.kv_heads.start * hd..spec.kv_heads.end * hd;
    let f = spec.ffn.clone();
    let one = 0..1;
    let mut v = Vec::new();
    let ef = spec.expert_ffn.clone();
    for l in 0..cfg.layers {
        v.push((W::AttnNorm(l), one.clone(), 0..h));
        if cfg.opts.qk_norm {
            v.push((W::QNorm(l), one.clone(), 0..hd));
            v.push((W::KNorm(l), one.clone(), 0..hd));
        }
        if cfg.opts.post_norms {
            v.push((W::PostAttnNorm(l), one.clone(), 0..h));
            v.push((W::PostFfnNorm(l), one.clone(), 0..h));
        }
        v.push((W::Q(l), q.clone(), 0..h));
        v.push((W::K(l), kv.clone(), 0..h));
        v.push((W::V(l), kv.clone(), 0..h));
        if cfg.qkv_bias {
            v.push((W::QBias(l), one.clone(), q.clone()));
            v.push((W::KBias(l), one.clone(), kv.clone()));
            v.push((W::VBias(l), one.clone(), kv.clone()));
        }
        v.push((W::O(l), 0..h, q.clone()));
        if cfg.o_bias {
            v.push((W::OBias(l), one.clone(), 0..h));
        }
        v.push((W::FfnNorm(l), one.clone(), 0..h));
        if let Some(m) = cfg.moe_at(l) {
            v.push((W::Router(l), 0..m.experts, 0..h));
            for e in 0..m.experts {
                v.push((W::ExpGate(l, e), ef.clone(), 0..h));
                v.push((W::ExpUp(l, e), ef.clone(), 0..h));
                v.push((W::ExpDown(l, e), 0..h, ef.clone()));
            }
            continue;
        }
        v.push((W::Gate(l), f.clone(), 0..h));
        v.push((W::Up(l), f.clone(), 0..h));
        v.push((W::Down(l), 0..h, f.clone()));
        if cfg.mlp_bias {
            v.push((W::GateBias(l), one.clone(), f.clone()));
            v.push((W::UpBias(l), one.clone(), f.clone()));
            v.push((W::DownBias(l), one.clone(), 0..h));
        }
    }
    let head = head_source(cfg, weights);
    v.push((head, spec.vocab.clone(), 0..h));
    if head != W::Embed {
        v.push((W::Embed, spec.vocab.clone(), 0..h));
    }
    v.push((W::FinalNorm, one, 0..h));
    v
}

/// The tensor holding the LM head: the embedding when tied (or when no head is stored).
fn head_source(cfg: &ModelConfig, weights: &Weights) -> W {
    if cfg.tie_word_embeddings || !weights.has(W::LmHead) {
        W::Embed
    } else {
        W::LmHead
    }
}

impl ShardModel {
    /// Reads this shard's slice of every tensor from `weights` onto `device`. The weights stay
    /// in their stored format; `precision` says how activations meet quantized ones, `cache`
    /// what the KV cache holds on the CPU (`ModelFiles::cache_type` gives the default).
    pub fn load(
        weights: &Weights,
        cfg: &ModelConfig,
        spec: &ShardSpec,
        device: &Device,
        precision: Precision,
        cache: CacheType,
    ) -> Result<ShardModel> {
        check_assignment(weights, cfg, spec)?;
        let (h, hd) = (cfg.hidden, cfg.head_dim);
        let q_rows = spec.q_heads.start * hd..spec.q_heads.end * hd;
        let kv_rows = spec.kv_heads.start * hd..spec.kv_heads.end * hd;
        let dev = device.clone();
        // A column-parallel matrix: rows `rows` of a `[out, h]` tensor.
        let col_par = |t: W, out: usize, rows: Range<usize>, bias: Option<W>| -> Result<Linear> {
            weights.expect_shape(t, &[out, h])?;
            let raw = weights.raw(t, rows.clone(), 0..h)?;
            let b = match bias {
                Some(bt) => {
                    weights.expect_shape(bt, &[out])?;
                    Some(weights.read(bt, 0..1, rows)?)
                }
                None => None,
            };
            Linear::new(raw, b, &dev)
        };
        let offset = cfg.opts.norm_offset;
        let norm = |t: W, n: usize| -> Result<Norm> {
            weights.expect_shape(t, &[n])?;
            let mut w = weights.read(t, 0..1, 0..n)?;
            w.iter_mut().for_each(|x| *x += offset);
            Ok(Norm::new(w, device))
        };
        // RoPE tables: the global layers' first; a sliding layer with its own base gets the
        // second.
        let mut inv_freqs = vec![inv_freq(cfg)];
        let layer_rope: Vec<usize> = (0..cfg.layers)
            .map(|l| {
                let theta = cfg.rope_theta_at(l);
                if theta == cfg.rope_theta && cfg.window_at(l).is_none() {
                    return 0;
                }
                let global = cfg.window_at(l).is_none() || cfg.opts.rope_theta_local.is_none();
                let f = inv_freq_at(cfg, theta, global);
                match inv_freqs.iter().position(|x| *x == f) {
                    Some(i) => i,
                    None => {
                        inv_freqs.push(f);
                        inv_freqs.len() - 1
                    }
                }
            })
            .collect();
        let mut layers = Vec::with_capacity(cfg.layers);
        for (l, &rope) in layer_rope.iter().enumerate() {
            let _span = tracing::debug_span!("load_layer", layer = l, rank = spec.rank).entered();
            let q_out = cfg.heads * hd;
            let kv_out = cfg.kv_heads * hd;
            let opt = |t: W, on: bool| on.then_some(t);
            let q = col_par(
                W::Q(l),
                q_out,
                q_rows.clone(),
                opt(W::QBias(l), cfg.qkv_bias),
            )?;
            let k = col_par(
                W::K(l),
                kv_out,
                kv_rows.clone(),
                opt(W::KBias(l), cfg.qkv_bias),
            )?;
            let v = col_par(
                W::V(l),
                kv_out,
                kv_rows.clone(),
                opt(W::VBias(l), cfg.qkv_bias),
            )?;
            // Row-parallel matrices: all `h` output rows, the shard's input columns.
            let row_par = |t: W, width: usize, cols: Range<usize>| -> Result<Linear> {
                weights.expect_shape(t, &[h, width])?;
                Linear::new(weights.raw(t, 0..h, cols)?, None, device)
            };
            let vector = |t: W| -> Result<Vec<f32>> {
                weights.expect_shape(t, &[h])?;
                weights.read(t, 0..1, 0..h)
            };
            let ffn = match cfg.moe_at(l) {
                Some(m) => {
                    let ef = spec.expert_ffn.clone();
                    let experts = (0..m.experts)
                        .map(|e| -> Result<[Linear; 3]> {
                            Ok([
                                col_par(W::ExpGate(l, e), m.expert_ffn, ef.clone(), None)?,
                                col_par(W::ExpUp(l, e), m.expert_ffn, ef.clone(), None)?,
                                row_par(W::ExpDown(l, e), m.expert_ffn, ef.clone())?,
                            ])
                        })
                        .collect::<Result<Vec<_>>>()?;
                    Ffn::Moe {
                        router: col_par(W::Router(l), m.experts, 0..m.experts, None)?,
                        experts,
                        top_k: m.top_k,
                        norm_topk: m.norm_topk,
                    }
                }
                None => Ffn::Dense {
                    gate: col_par(
                        W::Gate(l),
                        cfg.intermediate,
                        spec.ffn.clone(),
                        opt(W::GateBias(l), cfg.mlp_bias),
                    )?,
                    up: col_par(
                        W::Up(l),
                        cfg.intermediate,
                        spec.ffn.clone(),
                        opt(W::UpBias(l), cfg.mlp_bias),
                    )?,
                    down: row_par(W::Down(l), cfg.intermediate, spec.ffn.clone())?,
                    down_bias: cfg
                        .mlp_bias
                        .then(|| vector(W::DownBias(l)))
                        .transpose()?
                        .map(|b| Tensor::<2>::from_data(TensorData::new(b, [1, h]), device)),
                },
            };
            let post = cfg.opts.post_norms;
            layers.push(Layer {
                attn_norm: norm(W::AttnNorm(l), h)?,
                qk_norm: if cfg.opts.qk_norm {
                    Some((norm(W::QNorm(l), hd)?, norm(W::KNorm(l), hd)?))
                } else {
                    None
                },
                q,
                k,
                v,
                o: row_par(W::O(l), q_out, q_rows.clone())?,
                o_bias: cfg
                    .o_bias
                    .then(|| vector(W::OBias(l)))
                    .transpose()?
                    .map(|b| Tensor::<2>::from_data(TensorData::new(b, [1, h]), device)),
                post_attn_norm: post.then(|| norm(W::PostAttnNorm(l), h)).transpose()?,
                ffn_norm: norm(W::FfnNorm(l), h)?,
                ffn,
                post_ffn_norm: post.then(|| norm(W::PostFfnNorm(l), h)).transpose()?,
                window: cfg.window_at(l),
                rope,
            });
        }
        let head_src = head_source(cfg, weights);
        let head = col_par(head_src, cfg.vocab, spec.vocab.clone(), None)?;
        let embed = if head_src == W::Embed {
            None
        } else {
            Some(col_par(W::Embed, cfg.vocab, spec.vocab.clone(), None)?)
        };
        let final_norm = norm(W::FinalNorm, h)?;

        // Bytes read per token: a mixture of experts reads its top-k experts of each layer.
        let (mut weight_bytes, mut held_bytes) = (head.bytes() + 4 * h as u64, 0);
        for l in &layers {
            let mut b = 0;
            for lin in [&l.q, &l.k, &l.v, &l.o] {
                b += lin.bytes();
            }
            let norms = 2 + 2 * l.post_attn_norm.is_some() as u64;
            b += norms * 4 * h as u64 + 2 * 4 * hd as u64 * l.qk_norm.is_some() as u64;
            match &l.ffn {
                Ffn::Dense { gate, up, down, .. } => {
                    b += gate.bytes() + up.bytes() + down.bytes();
                    weight_bytes += b;
                    held_bytes += b;
                }
                Ffn::Moe {
                    router,
                    experts,
                    top_k,
                    ..
                } => {
                    let all: u64 = experts.iter().flatten().map(Linear::bytes).sum();
                    b += router.bytes();
                    weight_bytes += b + all * *top_k as u64 / experts.len() as u64;
                    held_bytes += b + all;
                }
            }
        }
        held_bytes += head.bytes() + 4 * h as u64;
        let kv_of: Vec<usize> = (0..spec.n_q())
            .map(|j| spec.kv_index_for_local_q(cfg, j))
            .collect();
        let identity = kv_of.iter().enumerate().all(|(j, &k)| j == k);
        let g = spec.n_q() / spec.n_kv().max(1);
        let group = (!identity
            && g > 1
            && spec.n_q() == g * spec.n_kv()
            && kv_of.iter().enumerate().all(|(j, &k)| k == j / g))
        .then_some(g);
        let kv_index = (!identity && group.is_none() && !ops::is_host(device)).then(|| {
            let idx: Vec<i64> = kv_of.iter().map(|&k| k as i64).collect();
            Tensor::<1, Int>::from_data(TensorData::new(idx, [spec.n_q()]), device)
        });
        let kv_map = (!ops::is_host(device)).then(|| {
            let idx: Vec<u32> = kv_of.iter().map(|&k| k as u32).collect();
            Tensor::<1, Int>::from_data(
                TensorData::new(idx, [spec.n_q()]),
                (device, burn::tensor::DType::U32),
            )
        });
        let embed_bytes = embed.as_ref().map_or(0, |e| e.bytes());
        Ok(ShardModel {
            cfg: cfg.clone(),
            spec: spec.clone(),
            device: device.clone(),
            precision,
            cache_type: cache,
            layers,
            final_norm,
            head,
            embed,
            heads: Heads {
                nq: spec.n_q(),
                nkv: spec.n_kv(),
                hd,
                kv_of,
                group,
                kv_index,
                kv_map,
                scale: match cfg.opts.query_pre_attn_scalar {
                    Some(s) => (1.0 / s.sqrt()) as f32,
                    None => 1.0 / (hd as f32).sqrt(),
                },
            },
            inv_freqs,
            caches: HashMap::new(),
            weight_bytes,
            held_bytes: held_bytes + embed_bytes,
        })
    }

    /// Bytes of weights read per decoded token by this shard, in their stored format.
    pub fn weight_bytes_per_token(&self) -> u64 {
        self.weight_bytes
    }

    /// Bytes of weights this shard holds (its whole slice, the embedding table included).
    pub fn weight_bytes_held(&self) -> u64 {
        self.held_bytes
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// What the KV cache holds (on the CPU; a GPU's cache is f32).
    pub fn cache_type(&self) -> CacheType {
        if ops::is_host(&self.device) {
            self.cache_type
        } else {
            CacheType::F32
        }
    }

    /// Drops every sequence's KV cache.
    pub fn free_all(&mut self) {
        self.caches.clear();
    }

    pub fn free(&mut self, seq: u64) {
        self.caches.remove(&seq);
    }

    fn kv_width(&self) -> usize {
        self.heads.nkv * self.heads.hd
    }

    /// Cached positions of a sequence (0 if unknown).
    pub fn cached_len(&self, seq: u64) -> usize {
        let w = self.kv_width();
        self.caches
            .get(&seq)
            .and_then(|c| c.first())
            .map_or(0, |c| c.len(w))
    }

    fn all_reduce(&self, x: Tensor<2>, coll: &mut dyn Collective) -> Result<Tensor<2>> {
        if coll.world() == 1 {
            return Ok(x);
        }
        let shape = x.dims();
        let mut v = x
            .into_data()
            .try_into_vec::<f32>()
            .map_err(|e| ModelError::Backend(format!("reading activations: {e:?}")))?;
        coll.all_reduce_sum(&mut v)?;
        Ok(Tensor::<2>::from_data(
            TensorData::new(v, shape),
            &self.device,
        ))
    }

    /// Checks a batch before touching any cache, so a refused batch changes nothing.
    fn check_batch(&self, steps: &[SeqStep]) -> Result<()> {
        let cfg = &self.cfg;
        let mut seen = std::collections::HashSet::new();
        for s in steps {
            if s.ids.is_empty() {
                return Err(ModelError::EmptyPrompt);
            }
            if let Some(&id) = s.ids.iter().find(|&&id| id as usize >= cfg.vocab) {
                return Err(ModelError::BadToken {
                    id,
                    vocab: cfg.vocab,
                });
            }
            if !seen.insert(s.seq) {
                return Err(ModelError::Shard {
                    rank: self.spec.rank,
                    msg: format!("sequence {} appears twice in one step", s.seq),
                });
            }
            let cached = self.cached_len(s.seq);
            if cached != s.pos {
                return Err(ModelError::Shard {
                    rank: self.spec.rank,
                    msg: format!(
                        "sequence {} has {cached} cached positions, step asked for position {}",
                        s.seq, s.pos
                    ),
                });
            }
            if s.pos + s.ids.len() > cfg.max_context {
                return Err(ModelError::PromptTooLong {
                    prompt: s.pos + s.ids.len(),
                    context: cfg.max_context,
                });
            }
        }
        Ok(())
    }

    /// Runs the shard on `ids` at positions `pos..pos+len` of sequence `seq` and returns the
    /// logits of the last position for the shard's vocabulary slice.
    pub fn forward(
        &mut self,
        seq: u64,
        ids: &[u32],
        pos: usize,
        coll: &mut dyn Collective,
    ) -> Result<Vec<f32>> {
        let step = SeqStep {
            seq,
            ids: ids.to_vec(),
            pos,
        };
        self.forward_batch(std::slice::from_ref(&step), coll)
    }

    /// One step for several sequences at once: their new tokens go through every matrix
    /// product together (the weights are read once for the whole batch), each attends to its
    /// own KV cache, and the two all-reduces per layer carry all of the batch's rows. Returns
    /// the last position's logits of each sequence, in order, `steps.len() x vocab slice`.
    pub fn forward_batch(
        &mut self,
        steps: &[SeqStep],
        coll: &mut dyn Collective,
    ) -> Result<Vec<f32>> {
        if steps.is_empty() {
            return Ok(Vec::new());
        }
        let logits = self.forward_logits(steps, coll)?;
        read_rows(logits)
    }

    /// One step, each sequence's row of logits picked as `want` asks: its candidates for a
    /// [`TopSpec`] (and the row itself too when the spec wants mass, for a later
    /// `last_logits`), the row alone for None. On a GPU a step of greedy rows reads back only
    /// each row's best (id, logit); every other step reads the rows and picks on the host.
    pub fn forward_pick(
        &mut self,
        steps: &[SeqStep],
        coll: &mut dyn Collective,
        want: &[Option<TopSpec>],
    ) -> Result<Vec<Picked>> {
        if steps.is_empty() {
            return Ok(Vec::new());
        }
        let logits = self.forward_logits(steps, coll)?;
        let first = self.spec.vocab.start as u32;
        #[cfg(feature = "wgpu")]
        if !ops::is_host(&self.device) && want.iter().all(|w| w.is_some_and(|s| s.greedy_only())) {
            return Ok(crate::gpu::argmax_rows(logits)
                .into_iter()
                .map(|best| Picked {
                    top: Some(Candidates {
                        top: best.map(|(i, x)| (first + i, x)).into_iter().collect(),
                        ..Candidates::empty()
                    }),
                    row: None,
                })
                .collect());
        }
        let all = read_rows(logits)?;
        let width = all.len() / steps.len();
        Ok(all
            .chunks_exact(width.max(1))
            .zip(want)
            .map(|(row, spec)| match spec {
                None => Picked {
                    top: None,
                    row: Some(row.to_vec()),
                },
                Some(spec) => Picked {
                    top: Some(candidates(row, spec, first)),
                    row: spec.mass.then(|| row.to_vec()),
                },
            })
            .collect())
    }

    /// The step's last position's logits of each sequence, on the device.
    fn forward_logits(
        &mut self,
        steps: &[SeqStep],
        coll: &mut dyn Collective,
    ) -> Result<Tensor<2>> {
        let _span = tracing::debug_span!(
            "step",
            rank = self.spec.rank,
            seqs = steps.len(),
            tokens = steps.iter().map(|s| s.ids.len()).sum::<usize>()
        )
        .entered();
        self.check_batch(steps)?;
        let cfg = &self.cfg;
        let (h, prec) = (cfg.hidden, self.precision);
        let ids: Vec<u32> = steps.iter().flat_map(|s| s.ids.iter().copied()).collect();
        let positions: Vec<usize> = steps
            .iter()
            .flat_map(|s| s.pos..s.pos + s.ids.len())
            .collect();

        // Embedding: look up the ids that fall in this shard's vocabulary slice; the others
        // contribute zero rows, and the all-reduce assembles the full rows.
        let vr = self.spec.vocab.clone();
        let local: Vec<Option<usize>> = ids
            .iter()
            .map(|&id| vr.contains(&(id as usize)).then(|| id as usize - vr.start))
            .collect();
        let table = self.embed.as_ref().unwrap_or(&self.head);
        let x = table.rows(&local, &self.device);
        let mut x = self.all_reduce(x, coll)?;
        if cfg.opts.embed_scale {
            x = ops::scale(x, embed_scale(cfg));
        }

        // Rows of prompts (steps of several tokens) take the CPU's GEMM; a sequence's rows
        // take the same kernels whatever else is in the batch.
        let prompt: Vec<bool> = steps
            .iter()
            .flat_map(|s| std::iter::repeat_n(s.ids.len() > 1, s.ids.len()))
            .collect();
        let ropes: Vec<Rope> = self
            .inv_freqs
            .iter()
            .map(|f| Rope::new(positions.clone(), f, cfg.rope_interleaved, &self.device))
            .collect();
        let (nq, nkv) = (self.heads.nq, self.heads.nkv);
        let n_layers = cfg.layers;
        let (device, cache_type) = (self.device.clone(), self.cache_type);
        let mut caches: Vec<Vec<Kv>> = steps
            .iter()
            .map(|s| {
                self.caches.remove(&s.seq).unwrap_or_else(|| {
                    (0..n_layers)
                        .map(|_| Kv::new(&device, cache_type))
                        .collect()
                })
            })
            .collect();
        let result = (|| -> Result<Tensor<2>> {
            // Each residual add and the norm after it go together (one kernel on a GPU): `hn`
            // is the normed input of the next block.
            let mut hn = ops::rms_norm(x.clone(), &self.layers[0].attn_norm, cfg.rms_eps);
            for (l, layer) in self.layers.iter().enumerate() {
                // Attention.
                let mut qkv = Linear::forward_group(
                    &[&layer.q, &layer.k, &layer.v],
                    hn.clone(),
                    prec,
                    &prompt,
                );
                let v = qkv.pop().expect("v");
                let (mut k, mut q) = (qkv.pop().expect("k"), qkv.pop().expect("q"));
                if let Some((qn, kn)) = &layer.qk_norm {
                    q = ops::rms_norm_heads(q, qn, cfg.rms_eps);
                    k = ops::rms_norm_heads(k, kn, cfg.rms_eps);
                }
                let (rope, freqs) = (&ropes[layer.rope], &self.inv_freqs[layer.rope]);
                let (q, k) = rope.apply(q, k, nq, nkv, freqs);
                let mut layer_caches: Vec<&mut Kv> = caches.iter_mut().map(|c| &mut c[l]).collect();
                let attn =
                    ops::attention(q, k, v, steps, &mut layer_caches, &self.heads, layer.window);
                let partial = layer.o.forward(attn, prec, &prompt);
                let mut out = self.all_reduce(partial, coll)?;
                if let Some(b) = &layer.o_bias {
                    out = out + b.clone();
                }
                if let Some(n) = &layer.post_attn_norm {
                    out = ops::rms_norm(out, n, cfg.rms_eps);
                }
                let (sum, hn_ffn) = ops::add_rms_norm(x, out, &layer.ffn_norm, cfg.rms_eps);
                x = sum;

                // FFN.
                let act = cfg.opts.activation;
                let (partial, bias) = match &layer.ffn {
                    Ffn::Dense {
                        gate,
                        up,
                        down,
                        down_bias,
                    } => {
                        let mut gu = Linear::forward_group(&[gate, up], hn_ffn, prec, &prompt);
                        let up = gu.pop().expect("up");
                        let a = ops::glu(gu.pop().expect("gate"), up, act);
                        (down.forward(a, prec, &prompt), down_bias.as_ref())
                    }
                    Ffn::Moe {
                        router,
                        experts,
                        top_k,
                        norm_topk,
                    } => (
                        moe_ffn(
                            hn_ffn, router, experts, *top_k, *norm_topk, act, prec, &prompt,
                        )?,
                        None,
                    ),
                };
                let mut out = self.all_reduce(partial, coll)?;
                if let Some(b) = bias {
                    out = out + b.clone();
                }
                if let Some(n) = &layer.post_ffn_norm {
                    out = ops::rms_norm(out, n, cfg.rms_eps);
                }
                match self.layers.get(l + 1) {
                    Some(next) => {
                        let (sum, normed) = ops::add_rms_norm(x, out, &next.attn_norm, cfg.rms_eps);
                        x = sum;
                        hn = normed;
                    }
                    None => x = ops::add(x, out),
                }
            }
            Ok(x)
        })();
        // A failed step leaves the sequences' caches incomplete: `?` drops them entirely.
        let x = result?;
        for (s, c) in steps.iter().zip(caches) {
            self.caches.insert(s.seq, c);
        }
        let last: Vec<i64> = steps
            .iter()
            .scan(0usize, |o, s| {
                *o += s.ids.len();
                Some(*o as i64 - 1)
            })
            .collect();
        let b = last.len();
        // A step of one token per sequence has its last rows already.
        let last = if b == x.dims()[0] {
            x
        } else {
            x.select(
                0,
                Tensor::<1, Int>::from_data(TensorData::new(last, [b]), &self.device),
            )
        };
        debug_assert_eq!(last.dims(), [b, h]);
        let last = ops::rms_norm(last, &self.final_norm, cfg.rms_eps);
        // One row per sequence: the head takes the decode kernels, prompt or not. A GEMM pads
        // its rows to a tile of columns, so a prompt's last row through it cost a 32-column
        // product of the whole head (67 ms on Gemma 3's 262k rows, against the mat-vec's few).
        Ok(self.head.forward(last, prec, &[]))
    }

    /// Sequences with a KV cache on this shard, and the positions cached over all of them.
    pub fn cache_usage(&self) -> (usize, usize) {
        let seqs = self.caches.len();
        let positions = self.caches.keys().map(|&s| self.cached_len(s)).sum();
        (seqs, positions)
    }
}

/// A step's rows of logits, read to the host.
fn read_rows(logits: Tensor<2>) -> Result<Vec<f32>> {
    logits
        .into_data()
        .try_into_vec::<f32>()
        .map_err(|e| ModelError::Backend(format!("reading logits: {e:?}")))
}

/// One sequence's share of a step, as [`ShardModel::forward_pick`] picked it.
#[derive(Debug, Clone, PartialEq)]
pub struct Picked {
    /// Its candidates, when it asked for some.
    pub top: Option<Candidates>,
    /// Its row of logits, when it asked for them (or for mass, to be kept).
    pub row: Option<Vec<f32>>,
}

/// Gemma's embedding multiplier √hidden, in the model's dtype as transformers casts it.
fn embed_scale(cfg: &ModelConfig) -> f32 {
    cfg.rope_precision.round((cfg.hidden as f64).sqrt())
}

/// Each token's experts and their weights: softmax over the router's logits, the `top_k`
/// largest (the lower index first on ties), renormalized to sum to 1 if `norm_topk`.
pub fn route(
    logits: &[f32],
    experts: usize,
    top_k: usize,
    norm_topk: bool,
) -> Vec<Vec<(usize, f32)>> {
    logits
        .chunks_exact(experts)
        .map(|row| {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let exp: Vec<f32> = row.iter().map(|&x| (x - max).exp()).collect();
            let sum: f32 = exp.iter().sum();
            let mut order: Vec<usize> = (0..experts).collect();
            order.sort_by(|&a, &b| exp[b].total_cmp(&exp[a]).then(a.cmp(&b)));
            let mut top: Vec<(usize, f32)> =
                order[..top_k].iter().map(|&e| (e, exp[e] / sum)).collect();
            if norm_topk {
                let s: f32 = top.iter().map(|t| t.1).sum();
                top.iter_mut().for_each(|t| t.1 /= s);
            }
            top
        })
        .collect()
}

/// A mixture-of-experts FFN over a step's rows: route every row, then run each expert once
/// on all the rows that chose it (its weights are read once per step) and add its output,
/// weighted, into those rows. Returns this shard's partial sums, like a dense `down`.
#[allow(clippy::too_many_arguments)]
fn moe_ffn(
    hn: Tensor<2>,
    router: &Linear,
    experts: &[[Linear; 3]],
    top_k: usize,
    norm_topk: bool,
    act: tessera_core::Activation,
    prec: Precision,
    prompt: &[bool],
) -> Result<Tensor<2>> {
    let [t, h] = hn.dims();
    let n = experts.len();
    let logits = router
        .forward(hn.clone(), Precision::Exact, prompt)
        .into_data()
        .try_into_vec::<f32>()
        .map_err(|e| ModelError::Backend(format!("reading router logits: {e:?}")))?;
    let mut rows: Vec<Vec<(usize, f32)>> = vec![Vec::new(); n];
    for (r, choice) in route(&logits, n, top_k, norm_topk).into_iter().enumerate() {
        for (e, w) in choice {
            rows[e].push((r, w));
        }
    }
    let mut acc = Tensor::<2>::zeros([t, h], &hn.device());
    for (e, chosen) in rows.iter().enumerate() {
        if chosen.is_empty() {
            continue;
        }
        let idx: Vec<usize> = chosen.iter().map(|c| c.0).collect();
        let weights: Vec<f32> = chosen.iter().map(|c| c.1).collect();
        let flags: Vec<bool> = idx.iter().map(|&r| prompt[r]).collect();
        let x = ops::gather_rows(&hn, &idx);
        let [gate, up, down] = &experts[e];
        let mut gu = Linear::forward_group(&[gate, up], x, prec, &flags);
        let u = gu.pop().expect("up");
        let a = ops::glu(gu.pop().expect("gate"), u, act);
        let y = down.forward(a, prec, &flags);
        acc = ops::scatter_add_rows(acc, &idx, y, &weights);
    }
    Ok(acc)
}

/// One sequence's part of a step: new tokens `ids` at positions `pos..`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqStep {
    pub seq: u64,
    pub ids: Vec<u32>,
    pub pos: usize,
}
