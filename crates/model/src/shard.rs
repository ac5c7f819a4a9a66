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
use crate::weights::{Tensor as W, Weights};
use burn::tensor::{Device, Int, Tensor, TensorData};
use std::collections::HashMap;
use std::ops::Range;
use tessera_collective::Collective;
use tessera_core::{ModelConfig, RopePrecision, ShardSpec};
pub use tessera_quant::Precision;

struct Layer {
    attn_norm: Norm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    o_bias: Option<Tensor<2>>,
    ffn_norm: Norm,
    gate: Linear,
    up: Linear,
    down: Linear,
    down_bias: Option<Tensor<2>>,
}

pub struct ShardModel {
    pub cfg: ModelConfig,
    pub spec: ShardSpec,
    device: Device,
    precision: Precision,
    layers: Vec<Layer>,
    final_norm: Norm,
    /// LM head rows for the shard's vocabulary slice.
    head: Linear,
    /// Embedding rows for the same slice; None when tied to the head.
    embed: Option<Linear>,
    heads: Heads,
    inv_freq: Vec<f32>,
    caches: HashMap<u64, Vec<Kv>>,
    weight_bytes: u64,
    held_bytes: u64,
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
    /// Reads this shard's slice of every tensor from `weights` onto `device`. The weights stay
    /// in their stored format; `precision` says how activations meet quantized ones.
    pub fn load(
        weights: &Weights,
        cfg: &ModelConfig,
        spec: &ShardSpec,
        device: &Device,
        precision: Precision,
    ) -> Result<ShardModel> {
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
        let mut layers = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
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
            let gate = col_par(
                W::Gate(l),
                cfg.intermediate,
                spec.ffn.clone(),
                opt(W::GateBias(l), cfg.mlp_bias),
            )?;
            let up = col_par(
                W::Up(l),
                cfg.intermediate,
                spec.ffn.clone(),
                opt(W::UpBias(l), cfg.mlp_bias),
            )?;
            // Row-parallel matrices: all `h` output rows, the shard's input columns.
            weights.expect_shape(W::O(l), &[h, q_out])?;
            weights.expect_shape(W::Down(l), &[h, cfg.intermediate])?;
            let o_raw = weights.raw(W::O(l), 0..h, q_rows.clone())?;
            let down_raw = weights.raw(W::Down(l), 0..h, spec.ffn.clone())?;
            let vector = |t: W| -> Result<Vec<f32>> {
                weights.expect_shape(t, &[h])?;
                weights.read(t, 0..1, 0..h)
            };
            layers.push(Layer {
                attn_norm: Norm::new(vector(W::AttnNorm(l))?, device),
                q,
                k,
                v,
                o: Linear::new(o_raw, None, device)?,
                o_bias: cfg
                    .o_bias
                    .then(|| vector(W::OBias(l)))
                    .transpose()?
                    .map(|b| Tensor::<2>::from_data(TensorData::new(b, [1, h]), device)),
                ffn_norm: Norm::new(vector(W::FfnNorm(l))?, device),
                gate,
                up,
                down: Linear::new(down_raw, None, device)?,
                down_bias: cfg
                    .mlp_bias
                    .then(|| vector(W::DownBias(l)))
                    .transpose()?
                    .map(|b| Tensor::<2>::from_data(TensorData::new(b, [1, h]), device)),
            });
        }
        let head_src = head_source(cfg, weights);
        let head = col_par(head_src, cfg.vocab, spec.vocab.clone(), None)?;
        let embed = if head_src == W::Embed {
            None
        } else {
            Some(col_par(W::Embed, cfg.vocab, spec.vocab.clone(), None)?)
        };
        weights.expect_shape(W::FinalNorm, &[h])?;
        let final_norm = Norm::new(weights.read(W::FinalNorm, 0..1, 0..h)?, device);

        let mut weight_bytes = head.bytes() + 4 * h as u64;
        for l in &layers {
            for lin in [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down] {
                weight_bytes += lin.bytes();
            }
            weight_bytes += 2 * 4 * h as u64;
        }
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
        let embed_bytes = embed.as_ref().map_or(0, |e| e.bytes());
        Ok(ShardModel {
            cfg: cfg.clone(),
            spec: spec.clone(),
            device: device.clone(),
            precision,
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
            },
            inv_freq: inv_freq(cfg),
            caches: HashMap::new(),
            weight_bytes,
            held_bytes: weight_bytes + embed_bytes,
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

        // Rows of prompts (steps of several tokens) take the CPU's f32 GEMM; a sequence's rows
        // take the same kernels whatever else is in the batch.
        let prompt: Vec<bool> = steps
            .iter()
            .flat_map(|s| std::iter::repeat_n(s.ids.len() > 1, s.ids.len()))
            .collect();
        let prompt_last: Vec<bool> = steps.iter().map(|s| s.ids.len() > 1).collect();
        let rope = Rope::new(
            positions,
            &self.inv_freq,
            cfg.rope_interleaved,
            &self.device,
        );
        let (nq, nkv) = (self.heads.nq, self.heads.nkv);
        let n_layers = cfg.layers;
        let device = self.device.clone();
        let mut caches: Vec<Vec<Kv>> = steps
            .iter()
            .map(|s| {
                self.caches
                    .remove(&s.seq)
                    .unwrap_or_else(|| (0..n_layers).map(|_| Kv::new(&device)).collect())
            })
            .collect();
        let result = (|| -> Result<Tensor<2>> {
            for (l, layer) in self.layers.iter().enumerate() {
                // Attention.
                let hn = ops::rms_norm(x.clone(), &layer.attn_norm, cfg.rms_eps);
                let mut qkv =
                    Linear::forward_group(&[&layer.q, &layer.k, &layer.v], hn, prec, &prompt);
                let v = qkv.pop().expect("v");
                let k = rope.apply(qkv.pop().expect("k"), nkv, &self.inv_freq);
                let q = rope.apply(qkv.pop().expect("q"), nq, &self.inv_freq);
                let mut layer_caches: Vec<&mut Kv> = caches.iter_mut().map(|c| &mut c[l]).collect();
                let attn = ops::attention(q, k, v, steps, &mut layer_caches, &self.heads);
                let partial = layer.o.forward(attn, prec, &prompt);
                let mut out = self.all_reduce(partial, coll)?;
                if let Some(b) = &layer.o_bias {
                    out = out + b.clone();
                }
                x = ops::add(x, out);

                // MLP.
                let hn = ops::rms_norm(x.clone(), &layer.ffn_norm, cfg.rms_eps);
                let mut gu = Linear::forward_group(&[&layer.gate, &layer.up], hn, prec, &prompt);
                let up = gu.pop().expect("up");
                let act = ops::swiglu(gu.pop().expect("gate"), up);
                let partial = layer.down.forward(act, prec, &prompt);
                let mut out = self.all_reduce(partial, coll)?;
                if let Some(b) = &layer.down_bias {
                    out = out + b.clone();
                }
                x = ops::add(x, out);
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
        let last = ops::rms_norm(last, &self.final_norm, cfg.rms_eps);
        let logits = self.head.forward(last, prec, &prompt_last);
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
