//! The `tessera` binary as a user runs it: streamed output, the stats line, and clear errors
//! with exit code 2 on bad model files and prompts.

mod common;

use common::{fixtures, reference, smollm2};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tessera(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .output()
        .expect("tessera runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tessera-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Exit code 2, a message containing every `needles`, and no panic.
fn assert_clear_error(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "exit code; stderr: {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in: {err}");
    }
}

#[test]
fn generate_prints_reference_ids_and_stats_for_any_shard_count() {
    let r = reference("tiny-qwen2");
    let case = &r.cases[0];
    let model = fixtures().join("tiny-qwen2");
    let want: Vec<String> = case.greedy_ids.iter().map(|t| t.to_string()).collect();
    for shards in ["1", "3"] {
        let n = case.greedy_ids.len().to_string();
        let o = tessera(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            &case.prompt,
            "--max-tokens",
            &n,
            "--ids",
            "--ignore-eos",
            "--shards",
            shards,
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), want.join(" "));
        let err = stderr(&o);
        for field in [
            "prompt tokens: 27",
            "prefill:",
            "generated tokens: 24",
            "decode:",
            "weights read per token:",
            "GB/s",
        ] {
            assert!(err.contains(field), "stats line lacks {field:?}: {err}");
        }
    }
}

#[test]
fn generate_streams_reference_text_of_the_demo_model() {
    let r = reference("smollm2-135m-q4_1");
    let case = &r.cases[1];
    let o = tessera(&[
        "generate",
        "--model",
        smollm2().to_str().unwrap(),
        "--exact",
        "--prompt",
        &case.prompt,
        "--max-tokens",
        "32",
        "--shards",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text =
        std::fs::read_to_string(fixtures().join("smollm2-135m-q4_1/reference.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let want = v["cases"][1]["greedy_text"].as_str().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), format!("{want}\n"));
}

#[test]
fn truncated_gguf_is_a_clear_error() {
    let d = scratch("gguf");
    let bytes = std::fs::read(smollm2()).unwrap();
    let cut = d.join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let o = tessera(&[
        "generate",
        "--model",
        cut.to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert_clear_error(&o, &["truncated GGUF", "cut.gguf"]);
    // Cut inside the header as well.
    std::fs::write(&cut, &bytes[..100]).unwrap();
    let o = tessera(&[
        "generate",
        "--model",
        cut.to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert_clear_error(&o, &["truncated or corrupt GGUF"]);
}

/// Where the type id of tensor `name` sits in a GGUF's tensor directory (after the name come
/// the dimension count, the dimensions and the type).
fn tensor_type_at(bytes: &[u8], name: &str) -> (usize, usize) {
    let pat = name.as_bytes();
    let at = bytes
        .windows(pat.len() + 1)
        .position(|w| &w[..pat.len()] == pat && w[pat.len()] < 8)
        .expect("tensor in directory")
        + pat.len();
    let nd = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    (at + 4, at + 4 + 8 * nd)
}

/// Quantized tensors that do not add up: an unknown GGML type, a row that is not a whole
/// number of blocks, and a file cut inside a K-quant tensor's blocks. Each is exit 2 with a
/// message naming the tensor, not a panic.
#[test]
fn malformed_quantized_tensors_are_clear_errors() {
    let d = scratch("quant");
    let model = fixtures().join("tiny-llama-gguf/model.Q4_K_M.gguf");
    let bytes = std::fs::read(&model).unwrap();
    let name = "blk.1.ffn_down.weight";
    let (dims, ty) = tensor_type_at(&bytes, name);
    let run = |b: &[u8], file: &str| {
        let p = d.join(file);
        std::fs::write(&p, b).unwrap();
        tessera(&["generate", "--model", p.to_str().unwrap(), "--prompt", "hi"])
    };
    // An unknown type id.
    let mut b = bytes.clone();
    b[ty..ty + 4].copy_from_slice(&77u32.to_le_bytes());
    assert_clear_error(
        &run(&b, "unknown.gguf"),
        &[name, "GGML type 77", "supported"],
    );
    // Q6_K (256-value blocks) over a row of 768 + 1 values.
    let mut b = bytes.clone();
    let cols = u64::from_le_bytes(b[dims..dims + 8].try_into().unwrap());
    b[dims..dims + 8].copy_from_slice(&(cols + 1).to_le_bytes());
    assert_clear_error(&run(&b, "row.gguf"), &[name, "not a multiple"]);
    // Cut inside the last tensor's blocks.
    assert_clear_error(
        &run(&bytes[..bytes.len() - 100], "cut.gguf"),
        &["truncated GGUF"],
    );
}

#[test]
fn truncated_safetensors_is_a_clear_error() {
    let d = scratch("st");
    copy_dir(&fixtures().join("tiny-llama"), &d);
    let f = d.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 1000]).unwrap();
    let o = tessera(&["generate", "--model", d.to_str().unwrap(), "--prompt", "hi"]);
    assert_clear_error(&o, &["model.safetensors", "truncated"]);
}

#[test]
fn wrong_tensor_shape_is_a_clear_error() {
    let d = scratch("shape");
    copy_dir(&fixtures().join("tiny-llama"), &d);
    let cfg = d.join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"intermediate_size\": 176", "\"intermediate_size\": 192");
    std::fs::write(&cfg, text).unwrap();
    let o = tessera(&["generate", "--model", d.to_str().unwrap(), "--prompt", "hi"]);
    assert_clear_error(
        &o,
        &[
            "model.layers.0.mlp.gate_proj.weight",
            "[176, 64]",
            "expected [192, 64]",
        ],
    );
}

#[test]
fn unknown_architecture_is_a_clear_error() {
    let d = scratch("arch");
    copy_dir(&fixtures().join("tiny-llama"), &d);
    let cfg = d.join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"model_type\": \"llama\"", "\"model_type\": \"gpt_neox\"");
    std::fs::write(&cfg, text).unwrap();
    let o = tessera(&["generate", "--model", d.to_str().unwrap(), "--prompt", "hi"]);
    assert_clear_error(&o, &["unknown model architecture", "gpt_neox"]);
}

#[test]
fn prompt_longer_than_context_is_a_clear_error() {
    // tiny-llama's context is 256 tokens.
    let prompt = "memory bandwidth ".repeat(200);
    let model = fixtures().join("tiny-llama");
    let o = tessera(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        &prompt,
        "--shards",
        "2",
    ]);
    assert_clear_error(&o, &["context is 256 tokens"]);
}

#[test]
fn missing_model_and_bad_shard_count_are_clear_errors() {
    let o = tessera(&[
        "generate",
        "--model",
        "/nonexistent/model.gguf",
        "--prompt",
        "hi",
    ]);
    assert_clear_error(&o, &["/nonexistent/model.gguf"]);
    let model = fixtures().join("tiny-llama");
    let o = tessera(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "hi",
        "--shards",
        "5",
    ]);
    assert_clear_error(&o, &["5 shards", "4 attention heads"]);
}

#[test]
fn plan_prints_each_workers_share_and_exits_1_when_it_does_not_fit() {
    let m = smollm2();
    let o = tessera(&[
        "plan",
        "--model",
        m.to_str().unwrap(),
        "--workers",
        "2",
        "--memory",
        "4",
        "--context",
        "8192",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    // 9 query heads over 3 KV heads: 5+4 heads, the middle KV group on both, and the FFN
    // evening out the rest; KV cache 2 x 30 layers x kv_heads x 64 x 2 bytes (f16, the fast
    // path's cache on quantized weights).
    assert!(
        out.contains("worker 0: q heads 0..5, KV heads 0..2, FFN columns 0..736"),
        "{out}"
    );
    assert!(
        out.contains("worker 1: q heads 5..9, KV heads 1..3, FFN columns 736..1536"),
        "{out}"
    );
    assert!(
        out.contains(&format!("KV cache {} B/token", 2 * 30 * 2 * 64 * 2)),
        "{out}"
    );
    assert!(out.contains("the KV cache is f16"), "{out}");
    assert!(out.contains("fits in 4.00 GiB"), "{out}");
    // The exact path keeps an f32 cache: twice the bytes; --kv-cache chooses either.
    let plan = |extra: &[&str]| {
        let mut args = vec!["plan", "--model", m.to_str().unwrap(), "--workers", "2"];
        args.extend(["--memory", "4", "--context", "8192"]);
        args.extend(extra);
        let o = tessera(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    for (extra, bytes) in [
        (&["--exact"][..], 4),
        (&["--exact", "--kv-cache", "f16"][..], 2),
        (&["--kv-cache", "f32"][..], 4),
    ] {
        let out = plan(extra);
        let want = format!("KV cache {} B/token", 2 * 30 * 2 * 64 * bytes);
        assert!(out.contains(&want), "{extra:?}: {out}");
    }
    let o = tessera(
        &["plan", "--model", m.to_str().unwrap(), "--workers", "1"]
            .into_iter()
            .chain(["--kv-cache", "q8"])
            .collect::<Vec<_>>(),
    );
    assert_clear_error(&o, &["q8", "f32 or f16"]);
    let o = tessera(&[
        "plan",
        "--model",
        m.to_str().unwrap(),
        "--workers",
        "2",
        "--memory",
        "0.1,4",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("DOES NOT FIT"));
}

#[test]
fn chat_flag_applies_the_models_template_locally_and_on_a_cluster() {
    let text =
        std::fs::read_to_string(fixtures().join("smollm2-135m-q4_1/reference.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let case = v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c.get("messages").is_some())
        .unwrap();
    let question = case["messages"][0]["content"].as_str().unwrap();
    // Generation stops at <|im_end|>, which is not part of the answer text.
    let want = case["greedy_text"]
        .as_str()
        .unwrap()
        .trim_end_matches("<|im_end|>")
        .to_string();
    let m = smollm2();
    let local = tessera(&[
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--exact",
        "--chat",
        "--prompt",
        question,
        "--max-tokens",
        "64",
    ]);
    assert!(local.status.success(), "{}", stderr(&local));
    assert_eq!(String::from_utf8_lossy(&local.stdout), format!("{want}\n"));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let cluster = tessera(&[
        "run",
        "--model",
        m.to_str().unwrap(),
        "--exact",
        "--workers",
        "2",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--chat",
        "--prompt",
        question,
        "--max-tokens",
        "64",
    ]);
    assert!(cluster.status.success(), "{}", stderr(&cluster));
    assert_eq!(
        String::from_utf8_lossy(&cluster.stdout),
        format!("{want}\n")
    );
}

/// `tessera tokenize` prints the ids the model sees (BOS included where it adds it), and with
/// `--pieces` each id's piece, for a SentencePiece GGUF; `--chat` on a model with neither a
/// template nor a known turn format is refused with a message saying so.
#[test]
fn tokenize_prints_ids_and_pieces_and_chat_without_a_template_is_refused() {
    let spm = fixtures().join("tiny-llama-spm-gguf/model.F32.gguf");
    let m = spm.to_str().unwrap();
    let o = tessera(&["tokenize", "--model", m, "Hello world"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "1 415 422 279 426 273 264 430 431"
    );
    let o = tessera(&["tokenize", "--model", m, "--pieces", "café"]);
    let out = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "1 \"<s>\"",
            "270 \"▁c\"",
            "425 \"a\"",
            "444 \"f\"",
            "198 \"<0xC3>\"",
            "172 \"<0xA9>\""
        ]
    );
    let o = tessera(&["generate", "--model", m, "--prompt", "hi", "--chat"]);
    assert_clear_error(&o, &["no chat template", "llama"]);
}

/// `tessera bench --kernels`: the CPU's mat-vec alone, for each of its four formats a 14336 x
/// 4096 matrix of exactly that format's size, with consistent timings and bandwidth shares.
#[test]
fn kernel_bench_times_each_format_over_its_real_size() {
    let o = tessera(&["bench", "--kernels", "--bandwidth-mib", "64", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(v["backend"], "cpu", "{out}");
    let bw = v["memory_bandwidth_gb_s"]
        .as_f64()
        .expect("the host's bandwidth");
    // Bytes a block over values a block: 18/32, 34/32, 144/256, 210/256.
    let want = [
        ("Q4_0", 18, 32),
        ("Q8_0", 34, 32),
        ("Q4_K", 144, 256),
        ("Q6_K", 210, 256),
    ];
    let got = v["kernels"].as_array().expect("kernels");
    assert_eq!(got.len(), want.len(), "{out}");
    for (k, (name, block, per)) in got.iter().zip(want) {
        assert_eq!(k["format"], name, "{out}");
        assert_eq!(k["bytes"], 14336 * 4096 / per * block, "{name}: {out}");
        let us = k["us_per_product"].as_f64().unwrap();
        let gb_s = k["gb_s"].as_f64().unwrap();
        assert!(us > 0.0, "{name}: {out}");
        let bytes = k["bytes"].as_f64().unwrap();
        assert!(
            (gb_s - bytes / us / 1e3).abs() <= 1e-6 * gb_s,
            "{name}: {out}"
        );
        let share = k["bandwidth_fraction"].as_f64().unwrap();
        assert!((share - gb_s / bw).abs() <= 1e-6 * share, "{name}: {out}");
    }
}

/// `tessera bench --collective`: the all-reduce alone between 2 processes (this one and a
/// `collective-peer` child) and between 2 QUIC endpoints of one process, reported per vector
/// length as p50 and p99 microseconds in the JSON's last line; small messages take the datagram
/// lane.
#[test]
fn collective_bench_reports_p50_and_p99_per_vector_length() {
    for (extra, place) in [(None, "processes"), (Some("--in-process"), "in-process")] {
        let mut args = vec!["bench", "--collective", "--workers", "2", "--json"];
        args.extend(extra);
        let o = tessera(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let out = String::from_utf8_lossy(&o.stdout);
        let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
        assert_eq!(v["collective"], place, "{out}");
        // On loopback the peers reach each other's datagram lane, and on one machine they
        // share memory.
        assert_eq!(v["lane_peers"], 1, "{out}");
        assert_eq!(v["shm_peers"], 1, "{out}");
        for len in ["576", "4096", "16384", "1048576"] {
            let (p50, p99) = (v["p50_us"][len].as_f64(), v["p99_us"][len].as_f64());
            assert!(
                matches!((p50, p99), (Some(a), Some(b)) if a > 0.0 && a <= b),
                "{place}, {len}: {out}"
            );
        }
    }
}
