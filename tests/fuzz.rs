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
use tessera_core::CacheType;
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

/// One arbitrary step message, as an authenticated coordinator could send it: sequence ids
/// that collide, positions past the cache or the context, token ids past the vocabulary,
/// candidate counts up to u32::MAX, temperatures that are 0, negative, NaN or infinite, and
/// requests for kept rows that may not exist.
fn step_request(vocab: u32) -> impl Strategy<Value = tessera_proto::StepRequest> {
    let seq_step = (
        0..4u64,
        prop_oneof![8 => Just(0u32), 2 => 0..80u32, 1 => any::<u32>()],
        prop_oneof![
            9 => proptest::collection::vec(
                prop_oneof![16 => 0..vocab, 1 => vocab..vocab + 4, 1 => any::<u32>()],
                1..6
            ),
            1 => Just(vec![])
        ],
        prop_oneof![2 => Just(0u32), 2 => 1..3u32, 1 => any::<u32>()],
        prop_oneof![
            Just(0.0f32),
            Just(-1.0),
            Just(f32::NAN),
            Just(f32::INFINITY),
            0.05f32..2.0
        ],
        (
            any::<bool>(),
            any::<u64>(),
            any::<u64>(),
            any::<bool>(),
            any::<bool>(),
        ),
    )
        .prop_map(
            |(seq, pos, ids, top, temperature, (gumbel, seed, draw, mass, raw_lse))| {
                tessera_proto::SeqStep {
                    seq,
                    pos,
                    ids,
                    top,
                    temperature,
                    gumbel,
                    seed,
                    draw,
                    mass,
                    raw_lse,
                }
            },
        );
    (
        proptest::collection::vec(seq_step, 0..3),
        proptest::collection::vec(0..6u64, 0..3),
        prop_oneof![4 => Just(vec![]), 1 => proptest::collection::vec(0..6u64, 0..4)],
    )
        .prop_map(|(steps, free, last_logits)| tessera_proto::StepRequest {
            steps,
            free,
            last_logits,
        })
}

/// The step messages a worker accepts from its (authenticated) coordinator, fuzzed through
/// the worker's own step function on a real shard: every message gets a reply, an error one
/// where it asks for the impossible, never a panic, and no reply larger than its steps'
/// candidates or logits allow.
#[test]
fn mutated_step_messages_get_a_reply_or_an_error() {
    let files = ModelFiles::open(&common::fixtures().join("tiny-llama")).unwrap();
    let plan = files.plan(&[1.0]).unwrap();
    let spec = plan.shards[0].clone();
    let device = tessera_model::Backend::Cpu.device().unwrap();
    let model = tessera_model::ShardModel::load(
        &files.weights,
        &files.cfg,
        &spec,
        &device,
        Precision::Exact,
        CacheType::F32,
    )
    .unwrap();
    let vocab = files.cfg.vocab as u32;
    let state = std::sync::Mutex::new((model, tessera_collective::Single));
    let strategy = proptest::collection::vec(step_request(vocab), 1..6);
    fuzz(
        file!(),
        "step messages",
        cases(256),
        strategy,
        0.3,
        |reqs: Vec<tessera_proto::StepRequest>| {
            let mut g = state.lock().unwrap_or_else(|p| p.into_inner());
            let (model, coll) = &mut *g;
            model.free_all();
            let mut kept = tessera_worker::KeptRows::new();
            let mut answered = false;
            for req in reqs {
                let n_steps = req.steps.len();
                let n_rows = req.last_logits.len();
                let t0 = Instant::now();
                let out = tessera_worker::run_step(model, coll, req, &mut kept);
                assert!(t0.elapsed() < Duration::from_secs(10));
                assert!(!out.mesh_down, "a single shard's mesh cannot break");
                let room = (n_steps + n_rows) * files.cfg.vocab;
                assert!(out.logits.len() <= room, "{} logits", out.logits.len());
                assert!(
                    out.top_ids.len() <= n_steps * (tessera_model::MAX_CANDIDATES + 1),
                    "{} candidates",
                    out.top_ids.len()
                );
                answered |= out.error.is_empty() && n_steps > 0;
            }
            answered
        },
    );
}

/// The assignment a worker accepts with its shard (the model configuration and the shard
/// spec, as JSON), mutated: each must load a shard that then answers a step, or be refused
/// with an error: never a panic or an allocation that a field asked for.
#[test]
fn mutated_assignments_error_or_load() {
    let files = ModelFiles::open(&common::fixtures().join("tiny-llama")).unwrap();
    let plan = files.plan(&[1.0, 1.0]).unwrap();
    let cfg_json = serde_json::to_string(&files.cfg).unwrap();
    let spec_json = serde_json::to_string(&plan.shards[1]).unwrap();
    let device = tessera_model::Backend::Cpu.device().unwrap();
    let strategy = prop_oneof![
        json_edits(cfg_json.len()).prop_map(|e| (true, e)),
        json_edits(spec_json.len()).prop_map(|e| (false, e)),
    ];
    fuzz(
        file!(),
        "assignments",
        cases(256),
        strategy,
        0.05,
        |(in_cfg, e)| {
            let (c, s) = if in_cfg {
                (
                    apply(cfg_json.clone().into_bytes(), &e),
                    spec_json.clone().into_bytes(),
                )
            } else {
                (
                    cfg_json.clone().into_bytes(),
                    apply(spec_json.clone().into_bytes(), &e),
                )
            };
            let Ok(cfg) = serde_json::from_slice::<tessera_core::ModelConfig>(&c) else {
                return false;
            };
            let Ok(spec) = serde_json::from_slice::<tessera_core::ShardSpec>(&s) else {
                return false;
            };
            let t0 = Instant::now();
            let Ok(mut model) = tessera_model::ShardModel::load(
                &files.weights,
                &cfg,
                &spec,
                &device,
                Precision::Exact,
                CacheType::F32,
            ) else {
                return false;
            };
            let req = tessera_proto::StepRequest {
                steps: vec![tessera_proto::SeqStep {
                    seq: 1,
                    ids: vec![1, 2, 3],
                    top: 1,
                    ..Default::default()
                }],
                ..Default::default()
            };
            // One shard of two, alone: its all-reduces are local (a single-shard stand-in).
            let _out = tessera_worker::run_step(
                &mut model,
                &mut tessera_collective::Single,
                req,
                &mut Default::default(),
            );
            assert!(t0.elapsed() < Duration::from_secs(20));
            true
        },
    );
}

/// The crash the assignment fuzzer found (seed 2: a head_dim of 10^12 sized the RoPE table
/// before any weight was checked, and the allocation aborted the worker), and its kin: each
/// is refused before anything is sized by it.
#[test]
fn assignments_that_claim_huge_sizes_are_refused_before_allocation() {
    let files = ModelFiles::open(&common::fixtures().join("tiny-llama")).unwrap();
    let spec = files.plan(&[1.0]).unwrap().shards[0].clone();
    let device = tessera_model::Backend::Cpu.device().unwrap();
    let huge = 999_999_999_998usize;
    let mut cases = Vec::new();
    for field in [
        "head_dim",
        "layers",
        "hidden",
        "intermediate",
        "vocab",
        "heads",
    ] {
        let mut c = files.cfg.clone();
        match field {
            "head_dim" => c.head_dim = huge,
            "layers" => c.layers = huge,
            "hidden" => c.hidden = huge,
            "intermediate" => c.intermediate = huge,
            "vocab" => c.vocab = huge,
            _ => c.heads = huge,
        }
        cases.push((field, c, spec.clone()));
    }
    let mut s = spec.clone();
    s.vocab = 0..huge;
    cases.push(("spec vocab", files.cfg.clone(), s));
    let mut s = spec.clone();
    s.rank = 3;
    cases.push(("spec rank", files.cfg.clone(), s));
    for (what, cfg, spec) in cases {
        let t0 = Instant::now();
        let r = tessera_model::ShardModel::load(
            &files.weights,
            &cfg,
            &spec,
            &device,
            Precision::Exact,
            CacheType::F32,
        );
        let e = r.err().unwrap_or_else(|| panic!("{what}: loaded"));
        assert!(t0.elapsed() < Duration::from_secs(2), "{what}: {e}");
        eprintln!("{what}: {e}");
    }
}
