//! From a path on disk to a model configuration, its weights and its tokenizer.
//! A path is a Hugging Face folder (config.json, safetensors, tokenizer.json) or a .gguf file.

use crate::error::{ModelError, Result};
use crate::gguf::{GgufFile, Value};
use crate::tokenizer::Tokenizer;
use crate::weights::{Tensor as W, Weights};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tessera_core::{Arch, ConfigError, ModelConfig, PlanError, ShardPlan};

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
        let weights = Weights::open_safetensors(dir)?;
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

    /// Width of the FFN's `down` blocks (the widest over the layers): where its rows can be
    /// cut without straddling a block.
    pub fn ffn_block(&self) -> usize {
        (0..self.cfg.layers)
            .filter_map(|l| self.weights.ty(W::Down(l)))
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
        let mut total = 0;
        for (t, rows, cols) in crate::shard_reads(&self.cfg, spec, &self.weights) {
            let ty = self
                .weights
                .ty(t)
                .ok_or_else(|| ModelError::MissingTensor {
                    path: self.path.clone(),
                    name: t.key(),
                })?;
            let (per, bytes) = ty.block();
            let stored = cols.end.div_ceil(per) - cols.start / per;
            total += (rows.len() * stored * bytes) as u64;
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
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| ModelError::format(&self.path, "the model has no chat template"))?;
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
    let cfg = ModelConfig {
        arch,
        hidden,
        intermediate: num("feed_forward_length")?,
        layers: num("block_count")?,
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
    };
    if g.tensors.contains_key("rope_freqs.weight") {
        return Err(ConfigError::Invalid {
            field: "rope_freqs.weight",
            why: "GGUF rope frequency factors (Llama 3.1 scaling) are not supported yet".into(),
        });
    }
    cfg.validate()?;
    Ok(cfg)
}
