//! The architecture-independent description of a Llama-family decoder.

use serde_json::Value;

/// Which family of decoder the weights belong to. They share one layer code path; the
/// differences (biases, tied heads, rope layout) are fields of [`ModelConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Arch {
    Llama,
    Qwen2,
    Mistral,
}

impl Arch {
    pub fn parse(name: &str) -> Result<Arch, ConfigError> {
        match name {
            "llama" => Ok(Arch::Llama),
            "qwen2" => Ok(Arch::Qwen2),
            "mistral" => Ok(Arch::Mistral),
            other => Err(ConfigError::UnknownArchitecture(other.to_string())),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Mistral => "mistral",
        }
    }
}

/// Llama 3 style frequency scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

/// The precision in which the reference implementation holds the rotary inverse frequencies.
/// transformers stores them as a buffer in the model's dtype, so for a checkpoint declared
/// `bfloat16` or `float16` in config.json they are rounded to that type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum RopePrecision {
    #[default]
    F32,
    Bf16,
    F16,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub max_context: usize,
    pub rms_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub rope_precision: RopePrecision,
    /// RoPE rotates adjacent pairs (2i, 2i+1) instead of halves (i, i + d/2): GGUF's Llama
    /// files store Q and K permuted for it, so they are used as stored.
    #[serde(default)]
    pub rope_interleaved: bool,
    pub tie_word_embeddings: bool,
    /// Q, K and V projections carry a bias (Qwen2, or Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// The O projection carries a bias (Llama with `attention_bias`).
    pub o_bias: bool,
    /// The MLP projections carry biases (Llama with `mlp_bias`).
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("unknown model architecture {0:?} (supported: llama, qwen2, mistral)")]
    UnknownArchitecture(String),
    #[error("config: missing field {0:?}")]
    Missing(&'static str),
    #[error("config: field {field:?} is invalid: {why}")]
    Invalid { field: &'static str, why: String },
    #[error("config.json is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
}

fn get_usize(v: &Value, field: &'static str) -> Result<Option<usize>, ConfigError> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .map(|n| Some(n as usize))
            .ok_or(ConfigError::Invalid {
                field,
                why: format!("expected a non-negative integer, found {x}"),
            }),
    }
}

fn need_usize(v: &Value, field: &'static str) -> Result<usize, ConfigError> {
    get_usize(v, field)?.ok_or(ConfigError::Missing(field))
}

fn get_f64(v: &Value, field: &'static str) -> Result<Option<f64>, ConfigError> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_f64().map(Some).ok_or(ConfigError::Invalid {
            field,
            why: format!("expected a number, found {x}"),
        }),
    }
}

fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|n| n as u32)
            .collect(),
        _ => Vec::new(),
    }
}

impl ModelConfig {
    /// Reads a Hugging Face `config.json` (llama, qwen2, mistral; both rope layouts).
    pub fn from_hf_json(text: &str) -> Result<ModelConfig, ConfigError> {
        let v: Value = serde_json::from_str(text)?;
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or(ConfigError::Missing("model_type"))?;
        let arch = Arch::parse(model_type)?;
        let hidden = need_usize(&v, "hidden_size")?;
        let heads = need_usize(&v, "num_attention_heads")?;
        let kv_heads = get_usize(&v, "num_key_value_heads")?.unwrap_or(heads);
        let head_dim = match get_usize(&v, "head_dim")? {
            Some(d) => d,
            None if heads > 0 => hidden / heads,
            None => 0,
        };
        // transformers 5 moved rope settings into `rope_parameters`; older files keep
        // `rope_theta` and `rope_scaling` at the top level.
        let rope = v.get("rope_parameters").filter(|r| r.is_object());
        let rope_theta = rope
            .map(|r| get_f64(r, "rope_theta"))
            .transpose()?
            .flatten()
            .or(get_f64(&v, "rope_theta")?)
            .unwrap_or(10000.0);
        let scaling_obj = rope.or(v.get("rope_scaling").filter(|r| r.is_object()));
        let rope_scaling = match scaling_obj {
            Some(s) => {
                let kind = s
                    .get("rope_type")
                    .or(s.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                match kind {
                    "default" => None,
                    "llama3" => Some(RopeScaling {
                        factor: get_f64(s, "factor")?.ok_or(ConfigError::Missing("rope factor"))?,
                        low_freq_factor: get_f64(s, "low_freq_factor")?.unwrap_or(1.0),
                        high_freq_factor: get_f64(s, "high_freq_factor")?.unwrap_or(4.0),
                        original_max_position_embeddings: get_f64(
                            s,
                            "original_max_position_embeddings",
                        )?
                        .unwrap_or(8192.0),
                    }),
                    other => {
                        return Err(ConfigError::Invalid {
                            field: "rope_scaling",
                            why: format!("rope type {other:?} is not supported (default, llama3)"),
                        });
                    }
                }
            }
            None => None,
        };
        let attention_bias = v
            .get("attention_bias")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let cfg = ModelConfig {
            arch,
            hidden,
            intermediate: need_usize(&v, "intermediate_size")?,
            layers: need_usize(&v, "num_hidden_layers")?,
            heads,
            kv_heads,
            head_dim,
            vocab: need_usize(&v, "vocab_size")?,
            max_context: get_usize(&v, "max_position_embeddings")?.unwrap_or(2048),
            rms_eps: get_f64(&v, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            rope_precision: match v
                .get("dtype")
                .or(v.get("torch_dtype"))
                .and_then(Value::as_str)
            {
                Some("bfloat16") => RopePrecision::Bf16,
                Some("float16") => RopePrecision::F16,
                _ => RopePrecision::F32,
            },
            rope_interleaved: false,
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            qkv_bias: arch == Arch::Qwen2 || attention_bias,
            o_bias: arch != Arch::Qwen2 && attention_bias,
            mlp_bias: v.get("mlp_bias").and_then(Value::as_bool).unwrap_or(false),
            bos_token_id: token_ids(v.get("bos_token_id")).first().copied(),
            eos_token_ids: token_ids(v.get("eos_token_id")),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the numbers fit together, so a bad file fails here with a clear message instead
    /// of a shape error deep inside a layer.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, why: String| Err(ConfigError::Invalid { field, why });
        for (field, value) in [
            ("hidden_size", self.hidden),
            ("intermediate_size", self.intermediate),
            ("num_hidden_layers", self.layers),
            ("num_attention_heads", self.heads),
            ("num_key_value_heads", self.kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab),
            ("max_position_embeddings", self.max_context),
        ] {
            if value == 0 {
                return bad(field, "must be greater than zero".into());
            }
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return bad(
                "num_key_value_heads",
                format!(
                    "{} query heads are not a multiple of {} KV heads",
                    self.heads, self.kv_heads
                ),
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(
                "head_dim",
                format!("{} is odd; RoPE needs pairs", self.head_dim),
            );
        }
        if self.rms_eps.is_nan() || self.rms_eps <= 0.0 {
            return bad("rms_norm_eps", format!("{} must be positive", self.rms_eps));
        }
        Ok(())
    }

    /// Query heads that share one KV head.
    pub fn group_size(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// Number of parameters in the whole model.
    pub fn param_count(&self) -> u64 {
        let (h, i, l, v) = (
            self.hidden as u64,
            self.intermediate as u64,
            self.layers as u64,
            self.vocab as u64,
        );
        let q = (self.heads * self.head_dim) as u64;
        let kv = (self.kv_heads * self.head_dim) as u64;
        let per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        l * per_layer + v * h + head + h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_rope_layouts_and_llama3_scaling() {
        let new = r#"{"model_type":"llama","hidden_size":64,"intermediate_size":176,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":384,
            "rope_parameters":{"rope_theta":500000.0,"rope_type":"llama3","factor":8.0,
            "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192},
            "eos_token_id":[128001,128009]}"#;
        let c = ModelConfig::from_hf_json(new).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.rope_scaling.unwrap().factor, 8.0);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.eos_token_ids, vec![128001, 128009]);
        let old = r#"{"model_type":"qwen2","hidden_size":96,"intermediate_size":240,
            "num_hidden_layers":3,"num_attention_heads":6,"num_key_value_heads":2,"vocab_size":384,
            "rope_theta":1000000.0,"tie_word_embeddings":true}"#;
        let c = ModelConfig::from_hf_json(old).unwrap();
        assert_eq!(c.rope_theta, 1e6);
        assert!(c.qkv_bias && !c.o_bias && c.tie_word_embeddings);
    }

    #[test]
    fn rejects_unknown_architecture_and_bad_heads() {
        let e = ModelConfig::from_hf_json(r#"{"model_type":"gpt_neox"}"#).unwrap_err();
        assert!(e.to_string().contains("gpt_neox"), "{e}");
        let bad = r#"{"model_type":"llama","hidden_size":64,"intermediate_size":176,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":3,"vocab_size":384}"#;
        let e = ModelConfig::from_hf_json(bad).unwrap_err();
        assert!(e.to_string().contains("multiple"), "{e}");
    }
}
