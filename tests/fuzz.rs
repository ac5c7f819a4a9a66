//! Fuzzing the parsers of untrusted files with mutations of real ones (proptest, on stable Rust,
//! a bounded number of cases): GGUF headers, metadata, tensor directories and blocks; safetensors
//! headers, config.json and tokenizer.json; chat templates. Every mutated file must open and run
//! a forward pass, or fail with an error: never a panic, a hang or an allocation that a header
//! field asked for. `TESSERA_FUZZ_CASES` sets the cases per target (default 256). A failure is
//! kept in tests/fuzz.proptest-regressions and replayed first on every later run.

mod common;

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tessera_model::{Backend, LocalCluster, ModelFiles, Precision};

fn config() -> Config {
    Config {
        cases: std::env::var("TESSERA_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(256),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..Config::default()
    }
}

/// One change to a file's bytes.
#[derive(Debug, Clone)]
enum Edit {
    Byte(usize, u8),
    /// A little-endian u64 written over the bytes there: counts, lengths and offsets that claim
    /// far more than the file holds.
    Huge(usize, u64),
    Truncate(usize),
    /// Text inserted there (for JSON files: numbers grow, types change, strings break).
    Insert(usize, &'static str),
}

/// Up to 3 edits spread over `regions` (the file's header, its index, its data...), and now
/// and then a truncation anywhere in `len` bytes.
fn edits(regions: Vec<std::ops::Range<usize>>, len: usize) -> impl Strategy<Value = Vec<Edit>> {
    let pos = proptest::sample::select(regions).prop_flat_map(|r| r);
    let huge = prop_oneof![
        Just(u64::MAX),
        Just(1u64 << 60),
        Just(1u64 << 40),
        Just(u64::from(u32::MAX)),
        any::<u64>()
    ];
    let edit = prop_oneof![
        8 => (pos.clone(), any::<u8>()).prop_map(|(p, b)| Edit::Byte(p, b)),
        3 => (pos, huge).prop_map(|(p, v)| Edit::Huge(p, v)),
        1 => (0..len.max(1)).prop_map(Edit::Truncate),
    ];
    proptest::collection::vec(edit, 1..4)
}

/// Up to 3 textual edits of a JSON file of `len` bytes.
fn json_edits(len: usize) -> impl Strategy<Value = Vec<Edit>> {
    let text = proptest::sample::select(vec![
        "9",
        "0",
        "-1",
        "999999999999",
        "1e309",
        "18446744073709551616",
        "null",
        "\"\"",
        "[]",
        "{}",
        "\"x\"",
        ",",
        "\\u0000",
        "true",
    ]);
    let edit = prop_oneof![
        6 => (0..len, text).prop_map(|(p, t)| Edit::Insert(p, t)),
        2 => (0..len, 0x20u8..0x7f).prop_map(|(p, b)| Edit::Byte(p, b)),
        1 => (0..len).prop_map(Edit::Truncate),
    ];
    proptest::collection::vec(edit, 1..4)
}

fn apply(mut b: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        match *e {
            Edit::Byte(p, v) if p < b.len() => b[p] = v,
            Edit::Huge(p, v) if p + 8 <= b.len() => b[p..p + 8].copy_from_slice(&v.to_le_bytes()),
            Edit::Truncate(n) => b.truncate(n),
            Edit::Insert(p, t) if p <= b.len() => {
                b.splice(p..p, t.bytes());
            }
            _ => {}
        }
    }
    b
}

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

/// Runs `cases` mutations through `test`, keeping failures in the regression file and replaying
/// them first; at least `min_ran` of the cases must have loaded a model, so that the mutations
/// reach past the first header check.
fn fuzz<S: Strategy>(name: &'static str, strategy: S, min_ran: f64, test: impl Fn(S::Value) -> bool)
where
    S::Value: std::fmt::Debug,
{
    let ran = std::sync::atomic::AtomicUsize::new(0);
    let cfg = config();
    let cases = cfg.cases as usize;
    // A fixed seed unless TESSERA_FUZZ_SEED asks for another: CI runs the same cases each time.
    let seed = std::env::var("TESSERA_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20261126);
    let mut runner = proptest::test_runner::TestRunner::new(Config {
        source_file: Some(file!()),
        test_name: Some(name),
        rng_seed: proptest::test_runner::RngSeed::Fixed(seed),
        ..cfg
    });
    let result = runner.run(&strategy, |v| {
        if test(v) {
            ran.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
    let ran = ran.into_inner();
    eprintln!("{name}: {ran} of {cases} mutated files loaded and ran");
    assert!(
        ran as f64 >= min_ran * cases as f64,
        "{name}: only {ran} of {cases} loaded"
    );
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
        fuzz("gguf", edits(regions, bytes.len()), 0.1, |e| {
            std::fs::write(&path, apply(bytes.clone(), &e)).unwrap();
            exercise(&path)
        });
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
        fuzz("hf", strategy, min, |e| {
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
        "template",
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
