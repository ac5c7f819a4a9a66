//! Fuzzing the parsers of untrusted files with mutations of real ones (proptest, on stable Rust,
//! a bounded number of cases): GGUF headers, metadata, tensor directories and blocks; safetensors
//! headers, config.json and tokenizer.json; chat templates. Every mutated file must open and run
//! a forward pass, or fail with an error: never a panic, a hang or an allocation that a header
//! field asked for. `TESSERA_FUZZ_CASES` sets the cases per target (default 256). A failure is
//! kept in tests/fuzz.proptest-regressions and replayed first on every later run.

mod common;

use common::mutate::{Edit, apply, cases, edits, fuzz, json_edits};
use proptest::prelude::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tessera_model::{Backend, LocalCluster, ModelFiles, Precision};

/// Opens the model at `path` and, if it opens, tokenizes, loads one shard and decodes two
/// tokens; errors are fine, and each step must be quick.
/// Returns whether the model opened and loaded.
fn exercise(path: &Path) -> bool {
    let t0 = Instant::now();
    let mut ran = false;
    if let Ok(files) = ModelFiles::open(path) {
        if let Ok(ids) = files.tokenizer.encode("Hello, world") {
            let _ = files.tokenizer.decode(&ids);
        }
        if let Ok(mut cluster) = LocalCluster::load(&files, 1, Backend::Cpu, Precision::Exact) {
            ran = true;
            let params = tessera_model::GenerateParams {
                max_tokens: 2,
                ignore_eos: true,
                ..Default::default()
            };
            let _ =
                tessera_model::generate(&mut cluster, 1, &[1, 2, 3], &params, &[], &mut |_| true);
        }
    }
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t0.elapsed()
    );
    ran
}

fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("fuzz-{name}"));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or(0)
}

/// The GGUF seeds: K-quant, Q8_0 and IQ4 blocks, and a SentencePiece vocabulary.
fn gguf_seed(i: usize) -> Vec<u8> {
    let f = common::fixtures();
    let p = [
        f.join("tiny-llama-gguf/model.Q4_K_M.gguf"),
        f.join("tiny-llama-gguf/model.Q8_0.gguf"),
        f.join("tiny-llama-gguf/model.IQ4_XS.gguf"),
        std::fs::read_dir(f.join("tiny-llama-spm-gguf"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "gguf"))
            .unwrap(),
    ];
    std::fs::read(&p[i]).unwrap()
}

#[test]
fn mutated_gguf_files_error_or_run() {
    for seed in 0..4 {
        let bytes = gguf_seed(seed);
        // The header and metadata, the tensor directory (from the first tensor name), and the
        // blocks after it.
        let dir = find(&bytes, b"token_embd.weight").max(64);
        let regions = vec![0..dir, dir - 64..dir + 4096, dir + 4096..bytes.len()];
        let path = scratch(&format!("gguf-{seed}")).join("model.gguf");
        fuzz(
            file!(),
            "gguf",
            cases(256),
            edits(regions, bytes.len()),
            0.1,
            |e| {
                std::fs::write(&path, apply(bytes.clone(), &e)).unwrap();
                exercise(&path)
            },
        );
    }
}

#[test]
fn mutated_safetensors_configs_and_tokenizers_error_or_run() {
    let src = common::fixtures().join("tiny-llama");
    // The safetensors header (an 8-byte length and JSON) and its data, config.json, and
    // tokenizer.json.
    for target in ["model.safetensors", "config.json", "tokenizer.json"] {
        let dir = scratch(&format!("hf-{target}"));
        let bytes = std::fs::read(src.join(target)).unwrap();
        let strategy = if target == "model.safetensors" {
            let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            edits(vec![0..header, header..bytes.len()], bytes.len()).boxed()
        } else {
            json_edits(bytes.len()).boxed()
        };
        // Most tokenizer.json edits break its vocabulary; a few of each kind still load.
        let min = if target == "tokenizer.json" {
            0.01
        } else {
            0.1
        };
        fuzz(file!(), "hf", cases(256), strategy, min, |e| {
            for f in ["config.json", "model.safetensors", "tokenizer.json"] {
                std::fs::copy(src.join(f), dir.join(f)).unwrap();
            }
            std::fs::write(dir.join(target), apply(bytes.clone(), &e)).unwrap();
            exercise(&dir)
        });
    }
}

#[test]
fn mutated_chat_templates_error_or_render() {
    // A template with loops, conditions, filters, string methods and raise_exception.
    let template = "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}\
        <|system|>{{ m.content | trim }}{% elif m.role == 'user' %}<|user|>\
        {{ m.content.strip() }}{% else %}<|assistant|>{{ m.content }}{{ eos_token }}\
        {% endif %}{% if loop.last and add_generation_prompt %}<|assistant|>{% endif %}\
        {% endfor %}{% set n = messages | length %}{{ '' if n < 3 else raise_exception('x') }}";
    let msgs = vec![tessera_model::chat::Message {
        role: "user".into(),
        content: "Hi!".into(),
    }];
    fuzz(
        file!(),
        "template",
        cases(256),
        edits(std::iter::once(0..template.len()).collect(), template.len()),
        0.03,
        |e| {
            let text =
                String::from_utf8_lossy(&apply(template.as_bytes().to_vec(), &e)).into_owned();
            let t0 = Instant::now();
            let ok = tessera_model::chat::render(&text, &msgs, true, "<s>", "</s>").is_ok();
            assert!(t0.elapsed() < Duration::from_secs(5));
            ok
        },
    );
}

/// Header fields that claim huge sizes are refused before anything is allocated for them: a
/// GGUF claiming 2^60 tensors and 2^60 metadata entries, and one whose first string claims a
/// terabyte, each open with an error at once.
#[test]
fn huge_counts_and_lengths_are_refused_before_allocation() {
    let seed = gguf_seed(0);
    let dir = scratch("huge");
    // Magic (4), version (4), tensor count (8), metadata count (8), then the first key's length.
    for (at, v) in [(8, 1u64 << 60), (16, 1u64 << 60), (24, 1u64 << 40)] {
        let path = dir.join(format!("at{at}.gguf"));
        std::fs::write(&path, apply(seed.clone(), &[Edit::Huge(at, v)])).unwrap();
        let t0 = Instant::now();
        let e = ModelFiles::open(&path).err().expect("refused");
        assert!(t0.elapsed() < Duration::from_secs(2), "{e}");
        eprintln!("{at}: {e}");
    }
}

/// The crashes the fuzzers found, kept as plain cases: each must stay an error.
#[test]
fn crashes_found_by_fuzzing_stay_errors() {
    // tokenizer.json with 8 bytes (2^60, little-endian) over offset 805: the tokenizers crate
    // panicked deserializing the decoder (`expect("Helper")`).
    let src = common::fixtures().join("tiny-llama/tokenizer.json");
    let bad = apply(std::fs::read(src).unwrap(), &[Edit::Huge(805, 1 << 60)]);
    let path = scratch("crashes").join("tokenizer.json");
    std::fs::write(&path, bad).unwrap();
    let e = tessera_model::Tokenizer::from_file(&path, vec![])
        .err()
        .expect("refused");
    assert!(e.to_string().contains("tokenizer"), "{e}");
}
