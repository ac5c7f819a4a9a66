//! From a path on disk to a model configuration, its weights and its tokenizer.
//! A path is a Hugging Face folder (config.json, safetensors, tokenizer.json) or a .gguf file.

use crate::error::{ModelError, Result};
use crate::gguf::{GgufFile, Value};
use crate::tokenizer::Tokenizer;
use crate::weights::{HfNames, Tensor as W, Weights};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tessera_core::{
    Activation, Arch, ConfigError, LayerOptions, ModelConfig, MoeConfig, PlanError, ShardPlan,
};

pub struct ModelFiles {
    pub path: PathBuf,
    pub cfg: ModelConfig,
    pub weights: Weights,
    pub tokenizer: Tokenizer,
    /// The model's chat template (Jinja), when the files carry one.
    pub chat_template: Option<String>,
    /// Short description of the on-disk format, for logs and stats.
    pub format: String,
}

impl ModelFiles {
    pub fn open(path: &Path) -> Result<ModelFiles> {
        if path.is_dir() {
            Self::open_hf(path)
        } else if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
            || path.is_file()
        {
            Self::open_gguf(path)
        } else {
            Err(ModelError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such model file or folder"),
            ))
        }
    }

    fn open_hf(dir: &Path) -> Result<ModelFiles> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
        let mut cfg = ModelConfig::from_hf_json(&text)
            .map_err(|e| ModelError::format(&cfg_path, e.to_string()))?;
        if cfg.eos_token_ids.is_empty() {
            // generation_config.json often carries the end-of-turn tokens.
            if let Ok(gen_text) = std::fs::read_to_string(dir.join("generation_config.json"))
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&gen_text)
            {
                cfg.eos_token_ids = match v.get("eos_token_id") {
                    Some(serde_json::Value::Number(n)) => {
                        n.as_u64().map(|n| vec![n as u32]).unwrap_or_default()
                    }
                    Some(serde_json::Value::Array(a)) => a
                        .iter()
                        .filter_map(|x| x.as_u64())
                        .map(|n| n as u32)
                        .collect(),
                    _ => vec![],
                };
            }
        }
        let weights = Weights::open_safetensors(dir, HfNames::of(cfg.arch))?;
        let tokenizer =
            Tokenizer::from_file(&dir.join("tokenizer.json"), cfg.eos_token_ids.clone())?;
        let chat_template = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| {
                v.get("chat_template")
                    .and_then(|c| c.as_str())
                    .map(String::from)
            });
        let format = "safetensors".to_string();
        let files = ModelFiles {
            path: dir.into(),
            cfg,
            weights,
            tokenizer,
            chat_template,
            format,
        };
        files.check_tensors()?;
        Ok(files)
    }

    fn open_gguf(path: &Path) -> Result<ModelFiles> {
        let g = GgufFile::open(path)?;
        let cfg = gguf_config(&g).map_err(|e| ModelError::format(path, e.to_string()))?;
        let tokenizer = Tokenizer::from_gguf(&g)?;
        let mut cfg = cfg;
        cfg.eos_token_ids = tokenizer.eos_ids.clone();
        cfg.bos_token_id = g
            .get("tokenizer.ggml.bos_token_id")
            .and_then(Value::as_u64)
            .map(|v| v as u32);
        let chat_template = g
            .get("tokenizer.chat_template")
            .and_then(Value::as_str)
            .map(String::from);
        let mut types: Vec<&str> = g.tensors.values().map(|t| t.ty.name()).collect();
        types.sort();
        types.dedup();
        let format = format!("GGUF v{} ({})", g.version, types.join(", "));
        let weights = Weights::gguf(Arc::new(g));
        let files = ModelFiles {
            path: path.into(),
            cfg,
            weights,
            tokenizer,
            chat_template,
            format,
        };
        files.check_tensors()?;
        Ok(files)
    }

    /// What a worker's KV cache holds on the CPU on `precision`'s path: `choice` where given,
    /// else f16 on the fast path over quantized weights (the first layer's Q projection in
    /// GGML blocks) and f32 otherwise.
    pub fn cache_type(
        &self,
        precision: tessera_quant::Precision,
        choice: Option<tessera_core::CacheType>,
    ) -> tessera_core::CacheType {
        let quantized = match &self.weights {
            Weights::Gguf { file } => file
                .tensors
                .get(&crate::weights::Tensor::Q(0).gguf_name())
                .is_some_and(|t| !t.ty.is_dense()),
            _ => false,
        };
        let fast = precision == tessera_quant::Precision::Fast;
        tessera_core::CacheType::choose(choice, fast, quantized)
    }

    /// Width of the FFN's `down` blocks (the widest over the layers): where its rows can be
    /// cut without straddling a block.
    pub fn ffn_block(&self) -> usize {
        (0..self.cfg.layers)
            .filter_map(|l| match self.cfg.moe_at(l) {
                Some(_) => self.weights.ty(W::ExpDown(l, 0)),
                None => self.weights.ty(W::Down(l)),
            })
            .map(|t| t.block_values())
            .max()
            .unwrap_or(1)
    }

    /// The shard plan for shards weighted by `weights` (e.g. each worker's memory), cutting the
    /// FFN on whole blocks of this model's weights where it can.
    pub fn plan(&self, weights: &[f64]) -> std::result::Result<ShardPlan, PlanError> {
        ShardPlan::weighted_blocks(&self.cfg, weights, self.ffn_block())
    }

    /// Bytes of weights shard `spec` holds, in their stored formats (straddling blocks of
    /// row-parallel slices included).
    pub fn shard_bytes(&self, spec: &tessera_core::ShardSpec) -> Result<u64> {
        self.shard_bytes_as(spec, false)
    }

    /// Bytes of weights shard `spec` reads per decoded token: everything it holds but the
    /// embedding table (unless tied to the LM head) and, in a mixture of experts, only the
    /// top-k experts' share of each layer's experts.
    pub fn shard_bytes_read(&self, spec: &tessera_core::ShardSpec) -> Result<u64> {
        self.shard_bytes_as(spec, true)
    }

    fn shard_bytes_as(&self, spec: &tessera_core::ShardSpec, per_token: bool) -> Result<u64> {
        let mut total = 0;
        for (t, rows, cols) in crate::shard_reads(&self.cfg, spec, &self.weights) {
            let share = match t {
                W::ExpGate(l, _) | W::ExpUp(l, _) | W::ExpDown(l, _) if per_token => self
                    .cfg
                    .moe_at(l)
                    .map_or(1.0, |m| m.top_k as f64 / m.experts as f64),
                W::Embed
                    if per_token
                        && self.weights.has(W::LmHead)
                        && !self.cfg.tie_word_embeddings =>
                {
                    0.0
                }
                _ => 1.0,
            };
            let ty = self
                .weights
                .ty(t)
                .ok_or_else(|| ModelError::MissingTensor {
                    path: self.path.clone(),
                    name: t.key(),
                })?;
            let (per, bytes) = ty.block();
            let stored = cols.end.div_ceil(per) - cols.start / per;
            total += ((rows.len() * stored * bytes) as f64 * share).round() as u64;
        }
        Ok(total)
    }

    /// Tokens that end generation: the model's end-of-sequence tokens and, for chat, the
    /// end-of-turn markers of the common templates that this vocabulary has.
    pub fn stop_ids(&self, chat: bool) -> Vec<u32> {
        let mut ids = self.cfg.eos_token_ids.clone();
        if chat {
            for t in [
                "<|im_end|>",
                "<|eot_id|>",
                "<|end|>",
                "<end_of_turn>",
                "<|endoftext|>",
            ] {
                if let Some(id) = self.tokenizer.token_to_id(t)
                    && !ids.contains(&id)
                {
                    ids.push(id);
                }
            }
        }
        ids
    }

    /// Renders a conversation with the model's own chat template, opening the assistant's turn.
    pub fn render_chat(&self, messages: &[crate::chat::Message]) -> Result<String> {
        let template = match (self.chat_template.as_deref(), self.cfg.arch) {
            (Some(t), _) => t,
            // Base models ship without a template; their family's turn format is known.
            (None, Arch::Gemma3) => GEMMA_TURNS,
            (None, arch) => {
                return Err(ModelError::format(
                    &self.path,
                    format!(
                        "the model has no chat template, and Tessera knows no turn format for \
                         {} models: prompt it without --chat",
                        arch.name()
                    ),
                ));
            }
        };
        let text = |id: Option<u32>| {
            id.and_then(|i| self.tokenizer.id_to_token(i))
                .unwrap_or_default()
        };
        let bos = text(self.cfg.bos_token_id);
        let eos = text(self.cfg.eos_token_ids.first().copied());
        crate::chat::render(template, messages, true, &bos, &eos)
    }

    /// Checks every tensor the model needs exists with the right shape before any is loaded.
    fn check_tensors(&self) -> Result<()> {
        let c = &self.cfg;
        let (h, q, kv) = (c.hidden, c.heads * c.head_dim, c.kv_heads * c.head_dim);
        let w = &self.weights;
        w.expect_shape(W::Embed, &[c.vocab, h])?;
        if !c.tie_word_embeddings && w.has(W::LmHead) {
            w.expect_shape(W::LmHead, &[c.vocab, h])?;
        }
        w.expect_shape(W::FinalNorm, &[h])?;
        for l in 0..c.layers {
            w.expect_shape(W::AttnNorm(l), &[h])?;
            w.expect_shape(W::Q(l), &[q, h])?;
            w.expect_shape(W::K(l), &[kv, h])?;
            w.expect_shape(W::V(l), &[kv, h])?;
            w.expect_shape(W::O(l), &[h, q])?;
            w.expect_shape(W::FfnNorm(l), &[h])?;
            if c.opts.qk_norm {
                w.expect_shape(W::QNorm(l), &[c.head_dim])?;
                w.expect_shape(W::KNorm(l), &[c.head_dim])?;
            }
            if c.opts.post_norms {
                w.expect_shape(W::PostAttnNorm(l), &[h])?;
                w.expect_shape(W::PostFfnNorm(l), &[h])?;
            }
            if let Some(m) = c.moe_at(l) {
                w.expect_shape(W::Router(l), &[m.experts, h])?;
                for e in 0..m.experts {
                    w.expect_shape(W::ExpGate(l, e), &[m.expert_ffn, h])?;
                    w.expect_shape(W::ExpUp(l, e), &[m.expert_ffn, h])?;
                    w.expect_shape(W::ExpDown(l, e), &[h, m.expert_ffn])?;
                }
                continue;
            }
            w.expect_shape(W::Gate(l), &[c.intermediate, h])?;
            w.expect_shape(W::Up(l), &[c.intermediate, h])?;
            w.expect_shape(W::Down(l), &[h, c.intermediate])?;
            if c.qkv_bias {
                w.expect_shape(W::QBias(l), &[q])?;
                w.expect_shape(W::KBias(l), &[kv])?;
                w.expect_shape(W::VBias(l), &[kv])?;
            }
        }
        Ok(())
    }
}

/// Gemma's turn format (as in its instruction-tuned models' template): a system message is
/// folded into the first user turn, the assistant is "model".
const GEMMA_TURNS: &str = "{{ bos_token }}\
{% if messages[0]['role'] == 'system' %}\
{% set first = messages[0]['content'] + '\\n\\n' %}{% set rest = messages[1:] %}\
{% else %}{% set first = '' %}{% set rest = messages %}{% endif %}\
{% for m in rest %}\
<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n\
{{ (first if loop.first else '') + m['content'] | trim }}<end_of_turn>\n\
{% endfor %}\
{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}";

fn gguf_config(g: &GgufFile) -> Result<ModelConfig, ConfigError> {
    let arch_name = g
        .get("general.architecture")
        .and_then(Value::as_str)
        .ok_or(ConfigError::Missing("general.architecture"))?;
    let arch = Arch::parse(arch_name)?;
    let key = |k: &str| format!("{arch_name}.{k}");
    let num = |k: &'static str| -> Result<usize, ConfigError> {
        g.get(&key(k))
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or(ConfigError::Missing(k))
    };
    let hidden = num("embedding_length")?;
    let heads = num("attention.head_count")?;
    let kv_heads = num("attention.head_count_kv").unwrap_or(heads);
    let head_dim = num("attention.key_length").unwrap_or(hidden / heads.max(1));
    let vocab = g
        .tensors
        .get("token_embd.weight")
        .map(|t| t.dims.get(1).copied().unwrap_or(0))
        .or_else(|| {
            g.get("tokenizer.ggml.tokens")
                .and_then(Value::as_array)
                .map(|a| a.len())
        })
        .ok_or(ConfigError::Missing("vocab size"))?;
    let f = |k: &str| g.get(&key(k)).and_then(Value::as_f64);
    let layers = num("block_count")?;
    let gemma = arch == Arch::Gemma3;
    let has = |t: &str| g.tensors.contains_key(t);
    let moe = match num("expert_count") {
        Ok(experts) if experts > 0 => Some(MoeConfig {
            experts,
            top_k: num("expert_used_count")?,
            expert_ffn: num("expert_feed_forward_length")
                .or_else(|_| num("feed_forward_length"))?,
            // llama.cpp renormalizes the top-k weights of Mixtral-style (llama) and Qwen3-MoE
            // files unless the file says otherwise.
            norm_topk: g
                .get(&key("expert_weights_norm"))
                .and_then(Value::as_bool)
                .unwrap_or(true),
            dense_layers: (0..layers)
                .filter(|l| !has(&format!("blk.{l}.ffn_gate_inp.weight")))
                .collect(),
        }),
        _ => None,
    };
    // Gemma 3 files omit the layer pattern and the local RoPE base: transformers and llama.cpp
    // both default them (every 6th layer global, local base 10000).
    let sliding_window = if gemma {
        Some(num("attention.sliding_window").unwrap_or(512))
    } else {
        num("attention.sliding_window").ok()
    };
    let sliding_layers = if gemma {
        (0..layers).map(|l| (l + 1) % 6 != 0).collect()
    } else {
        Vec::new()
    };
    let rope_freq_factors = match g.tensors.get("rope_freqs.weight") {
        Some(t) => Some(
            g.read_f32(t, 0..1, 0..t.dims[0])
                .map_err(|e| ConfigError::Invalid {
                    field: "rope_freqs.weight",
                    why: e.to_string(),
                })?,
        ),
        None => None,
    };
    let rope_linear_factor = match (
        g.get(&key("rope.scaling.type")).and_then(Value::as_str),
        f("rope.scaling.factor"),
    ) {
        (Some("linear"), Some(x)) if x != 1.0 => Some(x),
        (None | Some("none"), _) => None,
        (Some("linear"), _) => None,
        (Some(other), _) => {
            return Err(ConfigError::Invalid {
                field: "rope.scaling.type",
                why: format!("rope scaling {other:?} is not supported (linear, or rope_freqs)"),
            });
        }
    };
    let opts = LayerOptions {
        qk_norm: has("blk.0.attn_q_norm.weight"),
        norm_offset: 0.0,
        post_norms: has("blk.0.post_attention_norm.weight"),
        activation: if gemma {
            Activation::GeluTanh
        } else {
            Activation::Silu
        },
        embed_scale: gemma,
        // llama.cpp: Gemma 3 27B scales by hidden/heads, the others by head_dim.
        query_pre_attn_scalar: gemma.then(|| {
            if layers == 62 {
                (hidden / heads.max(1)) as f64
            } else {
                head_dim as f64
            }
        }),
        sliding_window,
        sliding_layers,
        rope_theta_local: gemma.then_some(10000.0),
        rope_freq_factors,
        rope_linear_factor,
        moe,
    };
    let cfg = ModelConfig {
        arch,
        hidden,
        intermediate: num("feed_forward_length")?,
        layers,
        heads,
        kv_heads,
        head_dim,
        vocab,
        max_context: num("context_length").unwrap_or(2048),
        rms_eps: f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        rope_theta: f("rope.freq_base").unwrap_or(10000.0),
        rope_scaling: None,
        rope_precision: Default::default(),
        // llama.cpp's converter permutes Q/K rows of Llama-arch files for interleaved RoPE.
        rope_interleaved: arch == Arch::Llama || arch == Arch::Mistral,
        tie_word_embeddings: !g.tensors.contains_key("output.weight"),
        qkv_bias: g.tensors.contains_key("blk.0.attn_q.bias"),
        o_bias: g.tensors.contains_key("blk.0.attn_output.bias"),
        mlp_bias: g.tensors.contains_key("blk.0.ffn_up.bias"),
        bos_token_id: None,
        eos_token_ids: vec![],
        opts,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// The sha256 of a file, in hex: a model file's identity (a worker with the same file reads its
/// slice locally; `tessera pull` checks downloads against it).
pub fn sha256_file(path: &std::path::Path) -> std::io::Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}
