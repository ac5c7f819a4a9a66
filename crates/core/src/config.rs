//! The architecture-independent description of a Llama-family decoder.

use serde_json::Value;

/// Which family of decoder the weights belong to. They share one layer code path; the
/// differences (biases, tied heads, rope layout) are fields of [`ModelConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Arch {
    Llama,
    Qwen2,
    Mistral,
    Qwen3,
    Qwen3Moe,
    Mixtral,
    Gemma3,
}

impl Arch {
    pub fn parse(name: &str) -> Result<Arch, ConfigError> {
        match name {
            "llama" => Ok(Arch::Llama),
            "qwen2" => Ok(Arch::Qwen2),
            "mistral" => Ok(Arch::Mistral),
            "qwen3" => Ok(Arch::Qwen3),
            // transformers' `model_type`, and GGUF's `general.architecture`.
            "qwen3_moe" | "qwen3moe" => Ok(Arch::Qwen3Moe),
            "mixtral" => Ok(Arch::Mixtral),
            "gemma3" | "gemma3_text" => Ok(Arch::Gemma3),
            other => Err(ConfigError::UnknownArchitecture(other.to_string())),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Mistral => "mistral",
            Arch::Qwen3 => "qwen3",
            Arch::Qwen3Moe => "qwen3moe",
            Arch::Mixtral => "mixtral",
            Arch::Gemma3 => "gemma3",
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

impl RopePrecision {
    /// `x` as the reference holds a buffer of the model's dtype: rounded to bf16 or f16 for
    /// such checkpoints.
    pub fn round(self, x: f64) -> f32 {
        match self {
            RopePrecision::F32 => x as f32,
            RopePrecision::Bf16 => half::bf16::from_f64(x).to_f32(),
            RopePrecision::F16 => half::f16::from_f64(x).to_f32(),
        }
    }
}

/// The FFN's activation: `act(gate) * up`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Activation {
    /// SiLU (SwiGLU): Llama, Qwen, Mistral.
    #[default]
    Silu,
    /// GELU with the tanh approximation (GeGLU): Gemma.
    GeluTanh,
}

/// A mixture-of-experts FFN (Mixtral, Qwen3-MoE): a replicated router picks `top_k` of
/// `experts` per token; each expert is a gated FFN of width `expert_ffn`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MoeConfig {
    pub experts: usize,
    pub top_k: usize,
    pub expert_ffn: usize,
    /// Renormalize the top-k routing weights to sum to 1 (Mixtral always; Qwen3-MoE with
    /// `norm_topk_prob`).
    pub norm_topk: bool,
    /// Layers whose FFN is dense instead (Qwen3-MoE's `mlp_only_layers` and
    /// `decoder_sparse_step`).
    pub dense_layers: Vec<usize>,
}

/// What varies between decoder families inside the one layer path. Every field's default is
/// the Llama layer.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct LayerOptions {
    /// Per-head RMSNorm on Q and K before RoPE (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Added to every stored norm weight at load: Gemma's RMSNorm multiplies by `1 + w`
    /// (its GGUF files store `1 + w` already, so 0 there).
    pub norm_offset: f32,
    /// A norm on the attention output and on the FFN output before each residual add
    /// (Gemma's "sandwich" norms).
    pub post_norms: bool,
    pub activation: Activation,
    /// The embedding is multiplied by √hidden (Gemma).
    pub embed_scale: bool,
    /// Attention scores are scaled by `query_pre_attn_scalar^-1/2` instead of `head_dim^-1/2`.
    pub query_pre_attn_scalar: Option<f64>,
    /// Sliding-window attention: each query sees this many positions (itself included).
    pub sliding_window: Option<usize>,
    /// Which layers use the sliding window (empty: all, when `sliding_window` is set).
    pub sliding_layers: Vec<bool>,
    /// RoPE base of the sliding-window layers, when it differs from `rope_theta` (Gemma 3).
    pub rope_theta_local: Option<f64>,
    /// Per-dimension RoPE frequency divisors (GGUF `rope_freqs.weight`, Llama 3.1+).
    pub rope_freq_factors: Option<Vec<f32>>,
    /// Linear RoPE scaling (positions divided by this) of the global layers (Gemma 3 4B+).
    pub rope_linear_factor: Option<f64>,
    pub moe: Option<MoeConfig>,
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
    /// The family's optional parts of the one layer path.
    #[serde(default)]
    pub opts: LayerOptions,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "unknown model architecture {0:?} (supported: llama, mistral, mixtral, qwen2, qwen3, qwen3moe, gemma3)"
    )]
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
        let mut v: Value = serde_json::from_str(text)?;
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or(ConfigError::Missing("model_type"))?
            .to_string();
        let arch = Arch::parse(&model_type)?;
        // Gemma 3's multimodal checkpoints nest the decoder's settings.
        if let Some(t) = v.get("text_config").filter(|t| t.is_object()) {
            v = t.clone();
        }
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
        // Gemma 3 keys them by layer type: global layers' settings, and the local base.
        let by_type = v
            .get("rope_parameters")
            .filter(|r| r.get("full_attention").is_some());
        let rope = match by_type {
            Some(r) => r.get("full_attention").filter(|r| r.is_object()),
            None => v.get("rope_parameters").filter(|r| r.is_object()),
        };
        let rope_theta_local = match by_type.and_then(|r| r.get("sliding_attention")) {
            Some(r) => get_f64(r, "rope_theta")?,
            None => get_f64(&v, "rope_local_base_freq")?,
        };
        let rope_theta = rope
            .map(|r| get_f64(r, "rope_theta"))
            .transpose()?
            .flatten()
            .or(get_f64(&v, "rope_theta")?)
            .unwrap_or(10000.0);
        let scaling_obj = rope.or(v.get("rope_scaling").filter(|r| r.is_object()));
        let mut rope_linear_factor = None;
        let rope_scaling = match scaling_obj {
            Some(s) => {
                let kind = s
                    .get("rope_type")
                    .or(s.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                match kind {
                    "default" => None,
                    "linear" => {
                        rope_linear_factor = get_f64(s, "factor")?
                            .filter(|f| *f != 1.0 && f.is_finite() && *f > 0.0);
                        None
                    }
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
                            why: format!(
                                "rope type {other:?} is not supported (default, linear, llama3)"
                            ),
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
        let layers = need_usize(&v, "num_hidden_layers")?;
        let gemma = arch == Arch::Gemma3;
        let moe = match get_usize(&v, "num_local_experts")?.or(get_usize(&v, "num_experts")?) {
            Some(experts) if experts > 0 => {
                let step = get_usize(&v, "decoder_sparse_step")?.unwrap_or(1).max(1);
                let mut dense_layers: Vec<usize> = v
                    .get("mlp_only_layers")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_u64())
                            .map(|x| x as usize)
                            .collect()
                    })
                    .unwrap_or_default();
                dense_layers.extend((0..layers).filter(|l| (l + 1) % step != 0));
                dense_layers.sort();
                dense_layers.dedup();
                Some(MoeConfig {
                    experts,
                    top_k: need_usize(&v, "num_experts_per_tok")?,
                    expert_ffn: match get_usize(&v, "moe_intermediate_size")? {
                        Some(n) => n,
                        None => need_usize(&v, "intermediate_size")?,
                    },
                    // Mixtral always renormalizes the top-k weights.
                    norm_topk: arch == Arch::Mixtral
                        || v.get("norm_topk_prob")
                            .and_then(Value::as_bool)
                            .unwrap_or(false),
                    dense_layers,
                })
            }
            _ => None,
        };
        // Sliding windows: Gemma 3 per layer type; Mistral and Mixtral on every layer when
        // set; Qwen only with `use_sliding_window`, which Tessera does not run.
        let window = get_usize(&v, "sliding_window")?;
        let sliding_layers: Vec<bool> = match v.get("layer_types").and_then(Value::as_array) {
            Some(types) if gemma => types
                .iter()
                .map(|t| t.as_str() == Some("sliding_attention"))
                .collect(),
            _ if gemma => {
                let pattern = get_usize(&v, "sliding_window_pattern")?
                    .or(get_usize(&v, "_sliding_window_pattern")?)
                    .unwrap_or(6)
                    .max(1);
                (0..layers).map(|l| (l + 1) % pattern != 0).collect()
            }
            _ => Vec::new(),
        };
        if v.get("use_sliding_window").and_then(Value::as_bool) == Some(true) {
            return Err(ConfigError::Invalid {
                field: "use_sliding_window",
                why: "Qwen's sliding-window layers are not supported".into(),
            });
        }
        let sliding_window = match arch {
            Arch::Gemma3 | Arch::Mistral | Arch::Mixtral => window,
            _ => None,
        };
        for field in ["final_logit_softcapping", "attn_logit_softcapping"] {
            if get_f64(&v, field)?.is_some() {
                return Err(ConfigError::Invalid {
                    field,
                    why: "logit soft-capping (Gemma 2) is not supported".into(),
                });
            }
        }
        let opts = LayerOptions {
            qk_norm: matches!(arch, Arch::Qwen3 | Arch::Qwen3Moe | Arch::Gemma3),
            norm_offset: if gemma { 1.0 } else { 0.0 },
            post_norms: gemma,
            activation: match v
                .get("hidden_activation")
                .or(v.get("hidden_act"))
                .and_then(Value::as_str)
            {
                None | Some("silu") | Some("swish") => Activation::Silu,
                Some("gelu_pytorch_tanh") | Some("gelu_tanh") => Activation::GeluTanh,
                Some(other) => {
                    return Err(ConfigError::Invalid {
                        field: "hidden_act",
                        why: format!(
                            "activation {other:?} is not supported (silu, gelu_pytorch_tanh)"
                        ),
                    });
                }
            },
            embed_scale: gemma,
            query_pre_attn_scalar: if gemma {
                get_f64(&v, "query_pre_attn_scalar")?
            } else {
                None
            },
            sliding_window,
            sliding_layers,
            rope_theta_local: if gemma {
                Some(rope_theta_local.unwrap_or(10000.0))
            } else {
                None
            },
            rope_freq_factors: None,
            rope_linear_factor,
            moe,
        };
        let cfg = ModelConfig {
            arch,
            hidden,
            intermediate: need_usize(&v, "intermediate_size")?,
            layers,
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
            opts,
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
        let o = &self.opts;
        if let Some(m) = &o.moe
            && (m.experts == 0 || m.top_k == 0 || m.top_k > m.experts || m.expert_ffn == 0)
        {
            return bad(
                "num_experts_per_tok",
                format!(
                    "{} experts per token of {} experts of width {} do not fit",
                    m.top_k, m.experts, m.expert_ffn
                ),
            );
        }
        if !o.sliding_layers.is_empty() && o.sliding_layers.len() != self.layers {
            return bad(
                "layer_types",
                format!(
                    "{} entries for {} layers",
                    o.sliding_layers.len(),
                    self.layers
                ),
            );
        }
        if o.sliding_window == Some(0) {
            return bad("sliding_window", "must be greater than zero".into());
        }
        if let Some(f) = &o.rope_freq_factors
            && (f.len() != self.head_dim / 2 || f.iter().any(|x| !(x.is_finite() && *x > 0.0)))
        {
            return bad(
                "rope_freqs",
                format!(
                    "{} factors for head_dim {} (need {} positive ones)",
                    f.len(),
                    self.head_dim,
                    self.head_dim / 2
                ),
            );
        }
        Ok(())
    }

    /// The mixture of experts of layer `l`, if its FFN is one.
    pub fn moe_at(&self, l: usize) -> Option<&MoeConfig> {
        self.opts
            .moe
            .as_ref()
            .filter(|m| !m.dense_layers.contains(&l))
    }

    /// The attention window of layer `l` (positions a query sees, itself included), if limited.
    pub fn window_at(&self, l: usize) -> Option<usize> {
        let o = &self.opts;
        let w = o.sliding_window?;
        (o.sliding_layers.is_empty() || o.sliding_layers.get(l) == Some(&true)).then_some(w)
    }

    /// RoPE base of layer `l`: a sliding layer's own base where the family has one.
    pub fn rope_theta_at(&self, l: usize) -> f64 {
        match self.opts.rope_theta_local {
            Some(local) if self.opts.sliding_layers.get(l) == Some(&true) => local,
            _ => self.rope_theta,
        }
    }

    /// Query heads that share one KV head.
    pub fn group_size(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// Number of parameters in the whole model.
    pub fn param_count(&self) -> u64 {
        self.params(false)
    }

    /// Parameters one token reads: a mixture of experts' active experts only, and the LM head
    /// but not the rest of the embedding table.
    pub fn active_param_count(&self) -> u64 {
        self.params(true)
    }

    fn params(&self, active: bool) -> u64 {
        let (h, v) = (self.hidden as u64, self.vocab as u64);
        let q = (self.heads * self.head_dim) as u64;
        let kv = (self.kv_heads * self.head_dim) as u64;
        let mut total = 0;
        for l in 0..self.layers {
            total += h * q + 2 * h * kv + q * h + 2 * h;
            total += match self.moe_at(l) {
                Some(m) => {
                    let n = if active { m.top_k } else { m.experts } as u64;
                    n * 3 * h * m.expert_ffn as u64 + m.experts as u64 * h
                }
                None => 3 * h * self.intermediate as u64,
            };
        }
        // The LM head is read whole per token; a separate embedding table only held.
        let tables = if active || self.tie_word_embeddings {
            v * h
        } else {
            2 * v * h
        };
        total + tables + h
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
