//! GGUF layouts written here from the tiny safetensors fixtures the way llama.cpp's converter
//! writes them: mixture-of-experts files with stacked expert tensors, and Llama 3.1 files whose
//! RoPE scaling is stored as per-dimension factors (`rope_freqs.weight`).

mod common;

use common::gguf::{F32Tensor, Meta, bpe_tokenizer, read_safetensors, write};
use common::{fixtures, greedy, max_abs_diff, reference, tessera};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tessera_model::{Backend, LocalCluster, ModelFiles, Precision, Runner};

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tessera-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn take(st: &mut BTreeMap<String, F32Tensor>, name: &str) -> F32Tensor {
    st.remove(name)
        .unwrap_or_else(|| panic!("fixture lacks {name}"))
}

/// The tensors outside the layers, under GGUF's names: embedding, output head, final norm.
fn outer_tensors(st: &mut BTreeMap<String, F32Tensor>) -> BTreeMap<String, F32Tensor> {
    let mut t = BTreeMap::new();
    for (hf, gg) in [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("lm_head.weight", "output.weight"),
        ("model.norm.weight", "output_norm.weight"),
    ] {
        t.insert(gg.to_string(), take(st, hf));
    }
    t
}

/// Logits of the last position and the greedy ids for `ids` on `n` shards (exact path).
fn run(path: &Path, n: usize, ids: &[u32], steps: usize) -> (Vec<f32>, Vec<u32>) {
    let files = ModelFiles::open(path).expect("model opens");
    let mut c = LocalCluster::load(&files, n, Backend::Cpu, Precision::Exact).expect("loads");
    let logits = c.forward(1, ids, 0).expect("forward");
    c.free(1);
    (logits, greedy(&mut c, ids, steps))
}

/// Qwen3-MoE as a GGUF: `ffn_gate_inp` (the router) and every layer's experts stacked in
/// `ffn_{gate,up,down}_exps` (`[experts, out, in]`). Same logits and greedy ids as transformers
/// on 1..4 shards, and its tokenizer (byte-level BPE in the GGUF) gives the reference ids.
#[test]
fn moe_gguf_with_stacked_experts_matches_reference_on_1_to_4_shards() {
    let src = fixtures().join("tiny-qwen3-moe");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let u = |k: &str| cfg[k].as_u64().unwrap() as u32;
    let mut st = read_safetensors(&src.join("model.safetensors"));
    let (layers, experts) = (u("num_hidden_layers"), u("num_local_experts"));
    let mut t = outer_tensors(&mut st);
    for l in 0..layers {
        let hf = |s: &str| format!("model.layers.{l}.{s}");
        let gg = |s: &str| format!("blk.{l}.{s}.weight");
        for (h, g) in [
            ("input_layernorm.weight", "attn_norm"),
            ("post_attention_layernorm.weight", "ffn_norm"),
            ("self_attn.q_proj.weight", "attn_q"),
            ("self_attn.k_proj.weight", "attn_k"),
            ("self_attn.v_proj.weight", "attn_v"),
            ("self_attn.o_proj.weight", "attn_output"),
            ("self_attn.q_norm.weight", "attn_q_norm"),
            ("self_attn.k_norm.weight", "attn_k_norm"),
            ("mlp.gate.weight", "ffn_gate_inp"),
        ] {
            t.insert(gg(g), take(&mut st, &hf(h)));
        }
        for (h, g) in [
            ("gate_proj", "ffn_gate_exps"),
            ("up_proj", "ffn_up_exps"),
            ("down_proj", "ffn_down_exps"),
        ] {
            let mut data = Vec::new();
            let mut shape = Vec::new();
            for e in 0..experts {
                let x = take(&mut st, &hf(&format!("mlp.experts.{e}.{h}.weight")));
                shape = x.shape.clone();
                data.extend(x.data);
            }
            shape.insert(0, experts as usize);
            t.insert(gg(g), F32Tensor { shape, data });
        }
    }
    assert!(st.is_empty(), "tensors left unconverted: {:?}", st.keys());
    let a = "qwen3moe";
    let mut meta = vec![
        ("general.architecture", Meta::Str(a.into())),
        ("qwen3moe.block_count", Meta::U32(layers)),
        (
            "qwen3moe.context_length",
            Meta::U32(u("max_position_embeddings")),
        ),
        ("qwen3moe.embedding_length", Meta::U32(u("hidden_size"))),
        (
            "qwen3moe.feed_forward_length",
            Meta::U32(u("intermediate_size")),
        ),
        (
            "qwen3moe.expert_feed_forward_length",
            Meta::U32(u("moe_intermediate_size")),
        ),
        ("qwen3moe.expert_count", Meta::U32(experts)),
        (
            "qwen3moe.expert_used_count",
            Meta::U32(u("num_experts_per_tok")),
        ),
        (
            "qwen3moe.attention.head_count",
            Meta::U32(u("num_attention_heads")),
        ),
        (
            "qwen3moe.attention.head_count_kv",
            Meta::U32(u("num_key_value_heads")),
        ),
        ("qwen3moe.attention.key_length", Meta::U32(u("head_dim"))),
        ("qwen3moe.attention.value_length", Meta::U32(u("head_dim"))),
        ("qwen3moe.attention.layer_norm_rms_epsilon", Meta::F32(1e-6)),
        ("qwen3moe.rope.freq_base", Meta::F32(1e6)),
    ];
    meta.extend(bpe_tokenizer(&src.join("tokenizer.json")));
    let dir = scratch("moe-gguf");
    let path = dir.join("tiny-qwen3-moe.gguf");
    write(&path, &meta, &t);

    let r = reference("tiny-qwen3-moe");
    let files = ModelFiles::open(&path).expect("the MoE GGUF opens");
    let m = files.cfg.opts.moe.as_ref().expect("a mixture of experts");
    assert_eq!((m.experts, m.top_k, m.expert_ffn), (8, 2, 64));
    for n in 1..=4 {
        let mut c = LocalCluster::load(&files, n, Backend::Cpu, Precision::Exact).expect("loads");
        for (i, case) in r.cases.iter().enumerate() {
            assert_eq!(
                files.tokenizer.encode(&case.prompt).unwrap(),
                case.input_ids
            );
            let logits = c.forward(1, &case.input_ids, 0).expect("forward");
            c.free(1);
            let worst = max_abs_diff(&logits, case.last_logits.as_ref().unwrap());
            assert!(
                worst <= r.logit_abs,
                "{n} shards, case {i}: logits off by {worst}"
            );
            let got = greedy(&mut c, &case.input_ids, case.greedy_ids.len());
            assert_eq!(got, case.greedy_ids, "{n} shards, case {i}");
        }
    }
    // `tessera plan` tells held from read: 2 of 8 experts per token.
    let out = tessera()
        .args(["plan", "--model", path.to_str().unwrap(), "--workers", "2"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("(2 of 8 experts per token)"), "{text}");
    let _ = std::fs::remove_dir_all(dir);
}

/// llama.cpp's permutation of Q and K rows for its interleaved RoPE.
fn permute(t: F32Tensor, heads: usize) -> F32Tensor {
    let (rows, cols) = (t.shape[0], t.shape[1]);
    let hd = rows / heads;
    let mut data = vec![0f32; t.data.len()];
    for h in 0..heads {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let (to, from) = (h * hd + i * 2 + j, h * hd + j * hd / 2 + i);
                data[to * cols..(to + 1) * cols]
                    .copy_from_slice(&t.data[from * cols..(from + 1) * cols]);
            }
        }
    }
    F32Tensor {
        shape: t.shape,
        data,
    }
}

/// A Llama 3.1-style GGUF stores its RoPE scaling as `rope_freqs.weight` (one divisor per
/// frequency, as llama.cpp's converter computes them from `rope_scaling`): written here from
/// tiny-llama with a llama3 scaling strong enough to matter at these positions, it gives the
/// same logits and greedy ids as the safetensors model with that scaling in its config.json,
/// and not those of the model without it.
#[test]
fn llama31_rope_freqs_in_gguf_equal_the_configs_llama3_scaling() {
    let src = fixtures().join("tiny-llama");
    let (factor, low, high, old_ctx, theta, hd) = (8.0f64, 1.0, 4.0, 64.0, 10000.0f64, 16usize);
    // The scaled model as a Hugging Face folder.
    let hf = scratch("llama31-hf");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["rope_parameters"] = serde_json::json!({"rope_type": "llama3", "rope_theta": theta,
        "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
        "original_max_position_embeddings": old_ctx});
    std::fs::write(hf.join("config.json"), cfg.to_string()).unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(src.join(f), hf.join(f)).unwrap();
    }
    // The same as a GGUF with rope_freqs, computed as convert_hf_to_gguf.py does.
    let factors: Vec<f32> = (0..hd / 2)
        .map(|i| {
            let freq = 1.0 / theta.powf((2 * i) as f64 / hd as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < old_ctx / high {
                1.0
            } else if wavelen > old_ctx / low {
                factor as f32
            } else {
                let smooth = (old_ctx / wavelen - low) / (high - low);
                (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
            }
        })
        .collect();
    assert!(factors.contains(&1.0) && factors.contains(&8.0));
    let mut st = read_safetensors(&src.join("model.safetensors"));
    let mut t = outer_tensors(&mut st);
    t.insert(
        "rope_freqs.weight".into(),
        F32Tensor {
            shape: vec![hd / 2],
            data: factors,
        },
    );
    for l in 0..2 {
        let h = |s: &str| format!("model.layers.{l}.{s}");
        let g = |s: &str| format!("blk.{l}.{s}.weight");
        let q = take(&mut st, &h("self_attn.q_proj.weight"));
        let k = take(&mut st, &h("self_attn.k_proj.weight"));
        t.insert(g("attn_q"), permute(q, 4));
        t.insert(g("attn_k"), permute(k, 2));
        for (hn, gn) in [
            ("input_layernorm.weight", "attn_norm"),
            ("post_attention_layernorm.weight", "ffn_norm"),
            ("self_attn.v_proj.weight", "attn_v"),
            ("self_attn.o_proj.weight", "attn_output"),
            ("mlp.gate_proj.weight", "ffn_gate"),
            ("mlp.up_proj.weight", "ffn_up"),
            ("mlp.down_proj.weight", "ffn_down"),
        ] {
            t.insert(g(gn), take(&mut st, &h(hn)));
        }
    }
    assert!(st.is_empty(), "tensors left unconverted: {:?}", st.keys());
    let mut meta = vec![
        ("general.architecture", Meta::Str("llama".into())),
        ("llama.block_count", Meta::U32(2)),
        ("llama.context_length", Meta::U32(256)),
        ("llama.embedding_length", Meta::U32(64)),
        ("llama.feed_forward_length", Meta::U32(176)),
        ("llama.attention.head_count", Meta::U32(4)),
        ("llama.attention.head_count_kv", Meta::U32(2)),
        ("llama.attention.layer_norm_rms_epsilon", Meta::F32(1e-5)),
        ("llama.rope.freq_base", Meta::F32(theta as f32)),
        ("llama.rope.dimension_count", Meta::U32(hd as u32)),
    ];
    meta.extend(bpe_tokenizer(&src.join("tokenizer.json")));
    let gguf = hf.join("llama31.gguf");
    write(&gguf, &meta, &t);

    let r = reference("tiny-llama");
    for case in r.cases.iter().take(2) {
        let n = case.greedy_ids.len();
        let (want, want_ids) = run(&hf, 1, &case.input_ids, n);
        let plain = case.last_logits.as_ref().unwrap();
        assert!(
            max_abs_diff(&want, plain) > 1e-2,
            "the scaling should change the logits"
        );
        for shards in [1, 2] {
            let (got, ids) = run(&gguf, shards, &case.input_ids, n);
            let d = max_abs_diff(&got, &want);
            assert!(d < 1e-4, "{shards} shards: rope_freqs logits differ by {d}");
            assert_eq!(ids, want_ids, "{shards} shards");
        }
    }
    let _ = std::fs::remove_dir_all(hf);
}

/// A GGUF of an architecture Tessera does not run: refused with its name, exit code 2.
#[test]
fn gguf_of_an_unknown_architecture_is_a_clear_error() {
    let dir = scratch("unknown-arch");
    let path = dir.join("bert.gguf");
    let mut t = BTreeMap::new();
    t.insert(
        "token_embd.weight".to_string(),
        F32Tensor {
            shape: vec![4, 8],
            data: vec![0.0; 32],
        },
    );
    write(
        &path,
        &[("general.architecture", Meta::Str("bert".into()))],
        &t,
    );
    let o = tessera()
        .args([
            "generate",
            "--model",
            path.to_str().unwrap(),
            "--prompt",
            "hi",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("unknown model architecture \"bert\""), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}
