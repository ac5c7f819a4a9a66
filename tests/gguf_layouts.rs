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
        // A tied model has no head of its own: GGUF then has no `output.weight`.
        if st.contains_key(hf) {
            t.insert(gg.to_string(), take(st, hf));
        }
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

/// Writes `fixture` (tiny safetensors) as a GGUF of architecture `arch` the way llama.cpp's
/// converter lays it out: GGUF names, Q/K rows permuted for the `llama` architecture's
/// interleaved RoPE, a mixture's router as `ffn_gate_inp` and its experts stacked in
/// `ffn_{gate,up,down}_exps` (`[experts, out, in]`), the byte-level BPE vocabulary.
fn convert(fixture: &str, arch: &str, dir: &Path) -> PathBuf {
    let src = fixtures().join(fixture);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let u = |k: &str| cfg[k].as_u64().map(|v| v as u32);
    let (hidden, heads) = (u("hidden_size").unwrap(), u("num_attention_heads").unwrap());
    let kv_heads = u("num_key_value_heads").unwrap();
    let head_dim = u("head_dim").unwrap_or(hidden / heads);
    let layers = u("num_hidden_layers").unwrap();
    let experts = u("num_local_experts").or(u("num_experts"));
    let mixtral = cfg["model_type"] == "mixtral";
    let mut st = read_safetensors(&src.join("model.safetensors"));
    let mut t = outer_tensors(&mut st);
    for l in 0..layers {
        let hf = |s: &str| format!("model.layers.{l}.{s}");
        let gg = |s: &str| format!("blk.{l}.{s}.weight");
        let mut names = vec![
            ("input_layernorm.weight", "attn_norm"),
            ("post_attention_layernorm.weight", "ffn_norm"),
            ("self_attn.v_proj.weight", "attn_v"),
            ("self_attn.o_proj.weight", "attn_output"),
            ("self_attn.q_norm.weight", "attn_q_norm"),
            ("self_attn.k_norm.weight", "attn_k_norm"),
            ("mlp.gate_proj.weight", "ffn_gate"),
            ("mlp.up_proj.weight", "ffn_up"),
            ("mlp.down_proj.weight", "ffn_down"),
            ("mlp.gate.weight", "ffn_gate_inp"),
            ("block_sparse_moe.gate.weight", "ffn_gate_inp"),
        ];
        names.retain(|(h, _)| st.contains_key(&hf(h)));
        for (h, g) in names {
            t.insert(gg(g), take(&mut st, &hf(h)));
        }
        let (q, k) = (
            take(&mut st, &hf("self_attn.q_proj.weight")),
            take(&mut st, &hf("self_attn.k_proj.weight")),
        );
        let llama = arch == "llama";
        t.insert(
            gg("attn_q"),
            if llama { permute(q, heads as usize) } else { q },
        );
        t.insert(
            gg("attn_k"),
            if llama {
                permute(k, kv_heads as usize)
            } else {
                k
            },
        );
        let Some(experts) = experts else { continue };
        let parts = if mixtral {
            [
                ("w1", "ffn_gate_exps"),
                ("w3", "ffn_up_exps"),
                ("w2", "ffn_down_exps"),
            ]
        } else {
            [
                ("gate_proj", "ffn_gate_exps"),
                ("up_proj", "ffn_up_exps"),
                ("down_proj", "ffn_down_exps"),
            ]
        };
        for (h, g) in parts {
            let mut data = Vec::new();
            let mut shape = Vec::new();
            for e in 0..experts {
                let name = if mixtral {
                    hf(&format!("block_sparse_moe.experts.{e}.{h}.weight"))
                } else {
                    hf(&format!("mlp.experts.{e}.{h}.weight"))
                };
                let x = take(&mut st, &name);
                shape = x.shape.clone();
                data.extend(x.data);
            }
            shape.insert(0, experts as usize);
            t.insert(gg(g), F32Tensor { shape, data });
        }
    }
    assert!(st.is_empty(), "tensors left unconverted: {:?}", st.keys());
    let key = |k: &str| -> &'static str { Box::leak(format!("{arch}.{k}").into_boxed_str()) };
    let theta = cfg["rope_parameters"]["rope_theta"].as_f64().unwrap() as f32;
    let mut meta = vec![
        ("general.architecture", Meta::Str(arch.into())),
        (key("block_count"), Meta::U32(layers)),
        (
            key("context_length"),
            Meta::U32(u("max_position_embeddings").unwrap()),
        ),
        (key("embedding_length"), Meta::U32(hidden)),
        (
            key("feed_forward_length"),
            Meta::U32(u("intermediate_size").unwrap()),
        ),
        (key("attention.head_count"), Meta::U32(heads)),
        (key("attention.head_count_kv"), Meta::U32(kv_heads)),
        (key("attention.key_length"), Meta::U32(head_dim)),
        (key("attention.value_length"), Meta::U32(head_dim)),
        (
            key("attention.layer_norm_rms_epsilon"),
            Meta::F32(cfg["rms_norm_eps"].as_f64().unwrap() as f32),
        ),
        (key("rope.freq_base"), Meta::F32(theta)),
    ];
    if let Some(e) = experts {
        meta.push((key("expert_count"), Meta::U32(e)));
        meta.push((
            key("expert_used_count"),
            Meta::U32(u("num_experts_per_tok").unwrap()),
        ));
        let width = u("moe_intermediate_size")
            .or(u("intermediate_size"))
            .unwrap();
        meta.push((key("expert_feed_forward_length"), Meta::U32(width)));
    }
    meta.extend(bpe_tokenizer(&src.join("tokenizer.json")));
    let path = dir.join(format!("{fixture}.gguf"));
    write(&path, &meta, &t);
    path
}

/// Every case on 1..4 shards: the GGUF's tokenizer gives the reference ids, logits within
/// tolerance, the same greedy ids.
fn check_gguf(path: &Path, fixture: &str) {
    let r = reference(fixture);
    let files = ModelFiles::open(path).expect("the GGUF opens");
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
                "{fixture}, {n} shards, case {i}: logits off by {worst}"
            );
            let got = greedy(&mut c, &case.input_ids, case.greedy_ids.len());
            assert_eq!(got, case.greedy_ids, "{fixture}, {n} shards, case {i}");
        }
    }
}

/// Qwen3-MoE as a GGUF with stacked experts, and `tessera plan` on it.
#[test]
fn moe_gguf_with_stacked_experts_matches_reference_on_1_to_4_shards() {
    let dir = scratch("moe-gguf");
    let path = convert("tiny-qwen3-moe", "qwen3moe", &dir);
    let files = ModelFiles::open(&path).expect("the MoE GGUF opens");
    let m = files.cfg.opts.moe.as_ref().expect("a mixture of experts");
    assert_eq!((m.experts, m.top_k, m.expert_ffn), (8, 2, 64));
    check_gguf(&path, "tiny-qwen3-moe");
    // `tessera plan` tells held from read: 2 of 8 experts per token.
    let out = tessera()
        .args(["plan", "--model", path.to_str().unwrap(), "--workers", "2"])
        .args(["--bandwidth", "10"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("(2 of 8 experts per token)"), "{text}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Mixtral as llama.cpp writes it (architecture `llama` with experts, Q/K permuted), and a
/// dense Qwen3 (per-head Q/K norms in `attn_{q,k}_norm`): both equal transformers' references.
#[test]
fn mixtral_and_qwen3_ggufs_match_reference_on_1_to_4_shards() {
    let dir = scratch("more-gguf");
    for (fixture, arch) in [("tiny-mixtral", "llama"), ("tiny-qwen3", "qwen3")] {
        let path = convert(fixture, arch, &dir);
        check_gguf(&path, fixture);
    }
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
