//! One shard's slice of every layer, on Burn tensors. World size 1 is simply shard 0 of 1:
//! there is no other, unsharded code path.
//!
//! Per layer: RMSNorm (replicated) -> Q/K/V for the shard's heads (column-parallel) -> RoPE ->
//! attention against the shard's own KV cache -> O over the matching rows (row-parallel) ->
//! all-reduce #1 -> residual; RMSNorm -> gate/up for the shard's FFN columns -> SiLU(gate)*up ->
//! down over the same rows -> all-reduce #2 -> residual. The LM head holds the shard's
//! vocabulary rows, and the embedding is looked up in those same rows and all-reduced.

use crate::error::{ModelError, Result};
use crate::weights::{Tensor as W, Weights};
use burn::tensor::activation::{silu, softmax};
use burn::tensor::{Device, Int, Tensor, TensorData};
use std::collections::HashMap;
use std::ops::Range;
use tessera_collective::Collective;
use tessera_core::{ModelConfig, RopePrecision, ShardSpec};

/// The weight seam: every matrix product of the model goes through this type, so a quantized
/// kernel can replace it later without touching the layers.
pub struct Linear {
    /// `[in, out]`, so that `x @ w` maps `[tokens, in]` to `[tokens, out]`.
    w: Tensor<2>,
    b: Option<Tensor<2>>,
}

impl Linear {
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let y = x.matmul(self.w.clone());
        match &self.b {
            Some(b) => y + b.clone(),
            None => y,
        }
    }
    pub fn bytes(&self) -> u64 {
        let [i, o] = self.w.dims();
        (i * o * 4) as u64
    }
}

struct Layer {
    attn_norm: Tensor<2>,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    o_bias: Option<Tensor<2>>,
    ffn_norm: Tensor<2>,
    gate: Linear,
    up: Linear,
    down: Linear,
    down_bias: Option<Tensor<2>>,
}

struct KvCache {
    k: Tensor<3>,
    v: Tensor<3>,
}

pub struct ShardModel {
    pub cfg: ModelConfig,
    pub spec: ShardSpec,
    device: Device,
    layers: Vec<Layer>,
    final_norm: Tensor<2>,
    /// LM head rows for the shard's vocabulary slice, stored `[hidden, vocab_slice]`.
    head: Tensor<2>,
    /// Embedding rows for the same slice, `[hidden, vocab_slice]`; None when tied to the head.
    embed: Option<Tensor<2>>,
    /// For each local query head, the local KV head it reads.
    kv_index: Option<Tensor<1, Int>>,
    /// When every local KV head serves the same number of consecutive local query heads, that
    /// number: attention then groups the query heads instead of copying K and V per head.
    group: Option<usize>,
    inv_freq: Vec<f32>,
    caches: HashMap<u64, Vec<Option<KvCache>>>,
    weight_bytes: u64,
}

fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; data.len()];
    const B: usize = 32;
    for r0 in (0..rows).step_by(B) {
        for c0 in (0..cols).step_by(B) {
            for r in r0..(r0 + B).min(rows) {
                for c in c0..(c0 + B).min(cols) {
                    out[c * rows + r] = data[r * cols + c];
                }
            }
        }
    }
    out
}

/// Rotary inverse frequencies as Hugging Face computes them, with Llama 3 scaling if set.
pub fn inv_freq(cfg: &ModelConfig) -> Vec<f32> {
    let d = cfg.head_dim;
    (0..d / 2)
        .map(|i| {
            let base = 1.0 / cfg.rope_theta.powf((2 * i) as f64 / d as f64);
            let f = match cfg.rope_scaling {
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
            match cfg.rope_precision {
                RopePrecision::F32 => f as f32,
                RopePrecision::Bf16 => half::bf16::from_f64(f).to_f32(),
                RopePrecision::F16 => half::f16::from_f64(f).to_f32(),
            }
        })
        .collect()
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
    for l in 0..cfg.layers {
        v.push((W::AttnNorm(l), one.clone(), 0..h));
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
    /// Reads this shard's slice of every tensor from `weights` onto `device`.
    pub fn load(
        weights: &Weights,
        cfg: &ModelConfig,
        spec: &ShardSpec,
        device: &Device,
    ) -> Result<ShardModel> {
        let (h, hd) = (cfg.hidden, cfg.head_dim);
        let q_rows = spec.q_heads.start * hd..spec.q_heads.end * hd;
        let kv_rows = spec.kv_heads.start * hd..spec.kv_heads.end * hd;
        let mut weight_bytes = 0u64;
        let dev = device.clone();
        // A column-parallel matrix: rows `rows` of a `[out, in]` tensor, stored `[in, rows]`.
        let col_par =
            |t: W, out: usize, rows: std::ops::Range<usize>, bias: Option<W>| -> Result<Linear> {
                weights.expect_shape(t, &[out, h])?;
                let n = rows.len();
                let data = transpose(&weights.read(t, rows.clone(), 0..h)?, n, h);
                let w = Tensor::<2>::from_data(TensorData::new(data, [h, n]), &dev);
                let b = match bias {
                    Some(bt) => {
                        weights.expect_shape(bt, &[out])?;
                        let v = weights.read(bt, 0..1, rows)?;
                        Some(Tensor::<2>::from_data(TensorData::new(v, [1, n]), &dev))
                    }
                    None => None,
                };
                Ok(Linear { w, b })
            };
        // A row-parallel matrix: columns `cols` of a `[h, in]` tensor, stored `[cols, h]`.
        let row_par = |t: W, inp: usize, cols: std::ops::Range<usize>| -> Result<Linear> {
            weights.expect_shape(t, &[h, inp])?;
            let n = cols.len();
            let data = transpose(&weights.read(t, 0..h, cols)?, h, n);
            Ok(Linear {
                w: Tensor::<2>::from_data(TensorData::new(data, [n, h]), &dev),
                b: None,
            })
        };
        let vector = |t: W, len: usize| -> Result<Tensor<2>> {
            weights.expect_shape(t, &[len])?;
            let v = weights.read(t, 0..1, 0..len)?;
            Ok(Tensor::<2>::from_data(TensorData::new(v, [1, len]), &dev))
        };
        let opt_bias = |t: W, on: bool| if on { Some(t) } else { None };

        let mut layers = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
            let _span = tracing::debug_span!("load_layer", layer = l, rank = spec.rank).entered();
            let q_out = cfg.heads * hd;
            let kv_out = cfg.kv_heads * hd;
            let layer = Layer {
                attn_norm: vector(W::AttnNorm(l), h)?,
                q: col_par(
                    W::Q(l),
                    q_out,
                    q_rows.clone(),
                    opt_bias(W::QBias(l), cfg.qkv_bias),
                )?,
                k: col_par(
                    W::K(l),
                    kv_out,
                    kv_rows.clone(),
                    opt_bias(W::KBias(l), cfg.qkv_bias),
                )?,
                v: col_par(
                    W::V(l),
                    kv_out,
                    kv_rows.clone(),
                    opt_bias(W::VBias(l), cfg.qkv_bias),
                )?,
                o: row_par(W::O(l), q_out, q_rows.clone())?,
                o_bias: if cfg.o_bias {
                    Some(vector(W::OBias(l), h)?)
                } else {
                    None
                },
                ffn_norm: vector(W::FfnNorm(l), h)?,
                gate: col_par(
                    W::Gate(l),
                    cfg.intermediate,
                    spec.ffn.clone(),
                    opt_bias(W::GateBias(l), cfg.mlp_bias),
                )?,
                up: col_par(
                    W::Up(l),
                    cfg.intermediate,
                    spec.ffn.clone(),
                    opt_bias(W::UpBias(l), cfg.mlp_bias),
                )?,
                down: row_par(W::Down(l), cfg.intermediate, spec.ffn.clone())?,
                down_bias: if cfg.mlp_bias {
                    Some(vector(W::DownBias(l), h)?)
                } else {
                    None
                },
            };
            for lin in [
                &layer.q,
                &layer.k,
                &layer.v,
                &layer.o,
                &layer.gate,
                &layer.up,
                &layer.down,
            ] {
                weight_bytes += lin.bytes();
            }
            weight_bytes += 2 * h as u64 * 4;
            layers.push(layer);
        }
        let vocab_rows = spec.vocab.clone();
        let head_src = if cfg.tie_word_embeddings || !weights.has(W::LmHead) {
            W::Embed
        } else {
            W::LmHead
        };
        let head = col_par(head_src, cfg.vocab, vocab_rows.clone(), None)?.w;
        let embed = if head_src == W::Embed {
            None
        } else {
            Some(col_par(W::Embed, cfg.vocab, vocab_rows.clone(), None)?.w)
        };
        weight_bytes += (vocab_rows.len() * h * 4 + h * 4) as u64;
        let final_norm = vector(W::FinalNorm, h)?;

        let identity = (0..spec.n_q()).all(|j| spec.kv_index_for_local_q(cfg, j) == j);
        let g = spec.n_q() / spec.n_kv().max(1);
        let group = (!identity
            && g > 1
            && spec.n_q() == g * spec.n_kv()
            && (0..spec.n_q()).all(|j| spec.kv_index_for_local_q(cfg, j) == j / g))
        .then_some(g);
        let kv_index = (!identity).then(|| {
            let idx: Vec<i64> = (0..spec.n_q())
                .map(|j| spec.kv_index_for_local_q(cfg, j) as i64)
                .collect();
            Tensor::<1, Int>::from_data(TensorData::new(idx, [spec.n_q()]), &dev)
        });
        Ok(ShardModel {
            cfg: cfg.clone(),
            spec: spec.clone(),
            device: device.clone(),
            layers,
            final_norm,
            head,
            embed,
            kv_index,
            group,
            inv_freq: inv_freq(cfg),
            caches: HashMap::new(),
            weight_bytes,
        })
    }

    /// Bytes of weights read per decoded token by this shard (f32 after dequantization).
    pub fn weight_bytes_per_token(&self) -> u64 {
        self.weight_bytes
    }

    pub fn free(&mut self, seq: u64) {
        self.caches.remove(&seq);
    }

    /// Cached positions of a sequence (0 if unknown).
    pub fn cached_len(&self, seq: u64) -> usize {
        self.caches
            .get(&seq)
            .and_then(|c| c.first())
            .and_then(|c| c.as_ref())
            .map_or(0, |c| c.k.dims()[1])
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

    fn rms_norm(&self, x: Tensor<2>, w: &Tensor<2>) -> Tensor<2> {
        let var = x.clone().square().mean_dim(1);
        x * (var + self.cfg.rms_eps).sqrt().recip() * w.clone()
    }

    /// cos and sin tables `[1, tokens, head_dim]` for the given positions, one row each.
    fn rope_tables(&self, positions: &[usize]) -> (Tensor<3>, Tensor<3>) {
        let hd = self.cfg.head_dim;
        let t = positions.len();
        let mut cos = Vec::with_capacity(t * hd);
        let mut sin = Vec::with_capacity(t * hd);
        for &p in positions {
            // f32 product, like transformers' `inv_freq @ position_ids` in float32.
            let row: Vec<f32> = self.inv_freq.iter().map(|f| *f * p as f32).collect();
            for _ in 0..2 {
                cos.extend(row.iter().map(|a| a.cos()));
                sin.extend(row.iter().map(|a| a.sin()));
            }
        }
        (
            Tensor::<3>::from_data(TensorData::new(cos, [1, t, hd]), &self.device),
            Tensor::<3>::from_data(TensorData::new(sin, [1, t, hd]), &self.device),
        )
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

    /// Attention of one sequence's new tokens: `q` `[nq, t, hd]`, `k`/`v` `[nkv, t, hd]`
    /// appended to its cache. Returns `[nq, t, hd]`.
    fn attend(
        &self,
        q: Tensor<3>,
        k: Tensor<3>,
        v: Tensor<3>,
        cache: &mut Option<KvCache>,
        pos: usize,
    ) -> Tensor<3> {
        let t = q.dims()[1];
        let (k, v) = match cache.take() {
            Some(c) => (Tensor::cat(vec![c.k, k], 1), Tensor::cat(vec![c.v, v], 1)),
            None => (k, v),
        };
        *cache = Some(KvCache {
            k: k.clone(),
            v: v.clone(),
        });
        let scale = 1.0 / (self.cfg.head_dim as f64).sqrt();
        let s = pos + t;
        // The causal mask of the new tokens: t x s values, in the given shape.
        let mask = |shape: Vec<usize>| {
            let m: Vec<f32> = (0..t)
                .flat_map(|i| {
                    (0..s).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 })
                })
                .collect();
            TensorData::new(m, shape)
        };
        if let Some(g) = self.group {
            // Query heads of one KV head as rows of one product, [nkv, g*t, hd] x [nkv, hd, L],
            // instead of copying K and V once per query head.
            let [nq, _, hd] = q.dims();
            let nkv = nq / g;
            let q = q.reshape([nkv, g * t, hd]);
            let mut scores = q.matmul(k.swap_dims(1, 2)) * scale;
            if t > 1 {
                let m = Tensor::<4>::from_data(mask(vec![1, 1, t, s]), &self.device);
                scores = (scores.reshape([nkv, g, t, s]) + m).reshape([nkv, g * t, s]);
            }
            return softmax(scores, 2).matmul(v).reshape([nq, t, hd]);
        }
        let (k, v) = match &self.kv_index {
            Some(idx) => (k.select(0, idx.clone()), v.select(0, idx.clone())),
            None => (k, v),
        };
        let mut scores = q.matmul(k.swap_dims(1, 2)) * scale;
        if t > 1 {
            scores = scores + Tensor::<3>::from_data(mask(vec![1, t, s]), &self.device);
        }
        softmax(scores, 2).matmul(v)
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
        let _span = tracing::debug_span!(
            "step",
            rank = self.spec.rank,
            seqs = steps.len(),
            tokens = steps.iter().map(|s| s.ids.len()).sum::<usize>()
        )
        .entered();
        if steps.is_empty() {
            return Ok(Vec::new());
        }
        self.check_batch(steps)?;
        let cfg = &self.cfg;
        let (h, hd) = (cfg.hidden, cfg.head_dim);
        let ids: Vec<u32> = steps.iter().flat_map(|s| s.ids.iter().copied()).collect();
        let positions: Vec<usize> = steps
            .iter()
            .flat_map(|s| s.pos..s.pos + s.ids.len())
            .collect();
        let t = ids.len();

        // Embedding: look up the ids that fall in this shard's vocabulary slice; the others
        // contribute zero rows, and the all-reduce assembles the full rows.
        let vr = self.spec.vocab.clone();
        let local: Vec<i64> = ids
            .iter()
            .map(|&id| {
                if vr.contains(&(id as usize)) {
                    (id as usize - vr.start) as i64
                } else {
                    0
                }
            })
            .collect();
        let table = self.embed.as_ref().unwrap_or(&self.head);
        let idx = Tensor::<1, Int>::from_data(TensorData::new(local, [t]), &self.device);
        let mut x = table.clone().select(1, idx).transpose(); // [t, h]
        if ids.iter().any(|&id| !vr.contains(&(id as usize))) {
            let mask: Vec<f32> = ids
                .iter()
                .map(|&id| f32::from(u8::from(vr.contains(&(id as usize)))))
                .collect();
            x = x * Tensor::<2>::from_data(TensorData::new(mask, [t, 1]), &self.device);
        }
        let mut x = self.all_reduce(x, coll)?;

        let (cos, sin) = self.rope_tables(&positions);
        let (nq, nkv) = (self.spec.n_q(), self.spec.n_kv());
        let n_layers = cfg.layers;
        let mut caches: Vec<Vec<Option<KvCache>>> = steps
            .iter()
            .map(|s| {
                self.caches
                    .remove(&s.seq)
                    .unwrap_or_else(|| (0..n_layers).map(|_| None).collect())
            })
            .collect();
        let rope = |x: Tensor<3>, n: usize| -> Tensor<3> {
            let x1 = x.clone().slice([0..n, 0..t, 0..hd / 2]);
            let x2 = x.clone().slice([0..n, 0..t, hd / 2..hd]);
            let rotated = Tensor::cat(vec![x2.neg(), x1], 2);
            x * cos.clone() + rotated * sin.clone()
        };
        let result = (|| -> Result<Tensor<2>> {
            for (l, layer) in self.layers.iter().enumerate() {
                // Attention.
                let hn = self.rms_norm(x.clone(), &layer.attn_norm);
                let q = layer
                    .q
                    .forward(hn.clone())
                    .reshape([t, nq, hd])
                    .swap_dims(0, 1);
                let k = layer
                    .k
                    .forward(hn.clone())
                    .reshape([t, nkv, hd])
                    .swap_dims(0, 1);
                let v = layer.v.forward(hn).reshape([t, nkv, hd]).swap_dims(0, 1);
                let q = rope(q, nq);
                let k = rope(k, nkv);
                let attn = if steps.len() == 1 {
                    self.attend(q, k, v, &mut caches[0][l], steps[0].pos)
                } else {
                    let mut parts = Vec::with_capacity(steps.len());
                    let mut o = 0;
                    for (s, cache) in steps.iter().zip(caches.iter_mut()) {
                        let r = o..o + s.ids.len();
                        o = r.end;
                        parts.push(self.attend(
                            q.clone().slice([0..nq, r.clone(), 0..hd]),
                            k.clone().slice([0..nkv, r.clone(), 0..hd]),
                            v.clone().slice([0..nkv, r, 0..hd]),
                            &mut cache[l],
                            s.pos,
                        ));
                    }
                    Tensor::cat(parts, 1)
                };
                let attn = attn.swap_dims(0, 1).reshape([t, nq * hd]);
                let partial = layer.o.forward(attn);
                let mut out = self.all_reduce(partial, coll)?;
                if let Some(b) = &layer.o_bias {
                    out = out + b.clone();
                }
                x = x + out;

                // MLP.
                let hn = self.rms_norm(x.clone(), &layer.ffn_norm);
                let act = silu(layer.gate.forward(hn.clone())) * layer.up.forward(hn);
                let partial = layer.down.forward(act);
                let mut out = self.all_reduce(partial, coll)?;
                if let Some(b) = &layer.down_bias {
                    out = out + b.clone();
                }
                x = x + out;
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
        let last = x.select(
            0,
            Tensor::<1, Int>::from_data(TensorData::new(last, [b]), &self.device),
        );
        debug_assert_eq!(last.dims(), [b, h]);
        let last = self.rms_norm(last, &self.final_norm);
        let logits = last.matmul(self.head.clone());
        logits
            .into_data()
            .try_into_vec::<f32>()
            .map_err(|e| ModelError::Backend(format!("reading logits: {e:?}")))
    }

    /// Sequences with a KV cache on this shard, and the positions cached over all of them.
    pub fn cache_usage(&self) -> (usize, usize) {
        let seqs = self.caches.len();
        let positions = self.caches.keys().map(|&s| self.cached_len(s)).sum();
        (seqs, positions)
    }
}

/// One sequence's part of a step: new tokens `ids` at positions `pos..`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqStep {
    pub seq: u64,
    pub ids: Vec<u32>,
    pub pos: usize,
}
