//! Shared helpers for the end-to-end tests: where the fixtures and the demo model are, and
//! the reference cases that Hugging Face transformers produced for them.
#![allow(dead_code)]

pub mod mutate;

use serde_json::Value;
use std::path::PathBuf;

/// `tessera worker` joining `coordinator` as `name`, its gRPC service on `listen` and QUIC
/// on any free loopback port, offering `memory_gib` GiB; the caller adds flags and stdio.
pub fn worker_cmd(
    coordinator: &str,
    token: &str,
    name: &str,
    memory_gib: &str,
    listen: &str,
) -> std::process::Command {
    let mut c = tessera();
    c.args(["worker", "--coordinator", coordinator, "--name", name])
        .args(["--listen", listen, "--quic-listen", "127.0.0.1:0"])
        .args(["--memory-gib", memory_gib])
        .env("TESSERA_TOKEN", token);
    c
}

/// The `tessera` binary of this build.
pub fn tessera() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
}

/// A TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn fixtures() -> PathBuf {
    match std::env::var_os("TESSERA_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"),
    }
}

pub struct Case {
    pub prompt: String,
    pub input_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    pub last_logits: Option<Vec<f32>>,
    pub last_logits_top: Vec<(u32, f32)>,
    pub messages: Option<Value>,
    pub greedy_text: Option<String>,
}

pub struct Reference {
    pub logit_abs: f32,
    pub cases: Vec<Case>,
}

impl Reference {
    /// The chat case and its messages.
    pub fn chat(&self) -> (&Case, Vec<tessera_model::chat::Message>) {
        let case = self
            .cases
            .iter()
            .find(|c| c.messages.is_some())
            .expect("a chat case");
        let messages = serde_json::from_value(case.messages.clone().unwrap()).expect("messages");
        (case, messages)
    }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

pub fn reference(fixture: &str) -> Reference {
    reference_file(&fixtures().join(fixture).join("reference.json"))
}

pub fn reference_file(path: &std::path::Path) -> Reference {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v: Value = serde_json::from_str(&text).expect("reference.json is JSON");
    let cases = v["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| Case {
            prompt: c["prompt"].as_str().expect("prompt").to_string(),
            input_ids: ids(&c["input_ids"]),
            greedy_ids: ids(&c["greedy_ids"]),
            last_logits: c.get("last_logits").map(|l| {
                l.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect()
            }),
            last_logits_top: c["last_logits_top"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (p[0].as_u64().unwrap() as u32, p[1].as_f64().unwrap() as f32))
                .collect(),
            messages: c.get("messages").cloned(),
            greedy_text: c["greedy_text"].as_str().map(str::to_string),
        })
        .collect();
    Reference {
        logit_abs: v["tolerance"]["logit_abs"].as_f64().expect("tolerance") as f32,
        cases,
    }
}

/// The demo model, as `tessera pull smollm2-135m` caches it (or `TESSERA_SMOLLM2`).
pub fn smollm2() -> PathBuf {
    pulled(
        "TESSERA_SMOLLM2",
        "smollm2-135m",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    )
}

/// Gemma 3 270M Q4_K_M, as `tessera pull gemma3-270m` caches it (or `TESSERA_GEMMA3`).
pub fn gemma3() -> PathBuf {
    pulled("TESSERA_GEMMA3", "gemma3-270m", "gemma-3-270m-q4_k_m.gguf")
}

fn pulled(var: &str, name: &str, file: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var) {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("TESSERA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|x| PathBuf::from(x).join("tessera")))
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/tessera")
        });
    let p = home.join("models").join(name).join(file);
    assert!(
        p.exists(),
        "{name} is not at {}: run `cargo run --release -- pull {name}` (or set {var})",
        p.display()
    );
    p
}
/// The greedy continuation of `prompt` (`n` tokens, end of sequence ignored) on a local cluster.
pub fn greedy(cluster: &mut tessera_model::LocalCluster, prompt: &[u32], n: usize) -> Vec<u32> {
    let params = tessera_model::GenerateParams {
        max_tokens: n,
        ignore_eos: true,
        ..Default::default()
    };
    let mut out = Vec::new();
    tessera_model::generate(cluster, 7, prompt, &params, &[], &mut |t| {
        out.push(t);
        true
    })
    .expect("generation");
    out
}

/// The largest absolute difference between two vectors.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// Whether this run leaves the wgpu backend out (`TESSERA_SKIP_WGPU`), saying so.
pub fn skip_wgpu() -> bool {
    let skip = std::env::var_os("TESSERA_SKIP_WGPU").is_some();
    if skip {
        eprintln!("SKIPPED: TESSERA_SKIP_WGPU is set, the wgpu backend is not tested in this run");
    }
    skip
}

pub mod gguf;
pub mod http;
