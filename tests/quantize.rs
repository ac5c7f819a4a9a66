//! `tessera quantize` against llama.cpp's quantizer: the tiny-llama-gguf fixtures are llama.cpp's
//! own quantizations of `model.F32.gguf`, so the same source requantized by Tessera must give
//! the same tensor types and file size, the same bytes where llama.cpp rounds to nearest, and
//! weights at least as close to the source where it searches; the demo model requantized still
//! answers like the reference.

mod common;

use common::{fixtures, greedy, reference, reference_file, smollm2};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use tessera_model::gguf::GgufFile;
use tessera_model::{Backend, LocalCluster, ModelFiles, Precision, Runner};

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tessera-quantize-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn quantize(input: &Path, output: &Path, ty: &str) -> Output {
    common::tessera()
        .args([
            "quantize",
            input.to_str().unwrap(),
            output.to_str().unwrap(),
            ty,
        ])
        .output()
        .expect("tessera runs")
}

fn quantize_ok(input: &Path, output: &Path, ty: &str) {
    let o = quantize(input, output, ty);
    assert!(
        o.status.success(),
        "tessera quantize {ty}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn weights(f: &GgufFile, name: &str) -> Vec<f32> {
    let t = f.info(name).unwrap();
    let (rows, cols) = t.rows_cols();
    f.read_f32(t, 0..rows, 0..cols).unwrap()
}

fn squared_error(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum()
}

/// The types llama.cpp rounds to nearest, as Tessera does: their blocks must be the same bytes.
const NEAREST: [&str; 4] = ["Q8_0", "Q4_0", "Q5_0", "Q5_1"];

#[test]
fn quantizing_the_tiny_model_writes_what_llama_cpp_writes() {
    let dir = fixtures().join("tiny-llama-gguf");
    let src_path = dir.join("model.F32.gguf");
    let src = GgufFile::open(&src_path).unwrap();
    let out = scratch("tiny");
    for fmt in ["Q8_0", "Q4_0", "Q5_0", "Q5_1", "Q6_K", "Q4_K_M", "Q5_K_M"] {
        let ours_path = out.join(format!("model.{fmt}.gguf"));
        quantize_ok(&src_path, &ours_path, fmt);
        let theirs_path = dir.join(format!("model.{fmt}.gguf"));
        let ours = GgufFile::open(&ours_path).unwrap();
        let theirs = GgufFile::open(&theirs_path).unwrap();
        assert_eq!(
            std::fs::metadata(&ours_path).unwrap().len(),
            std::fs::metadata(&theirs_path).unwrap().len(),
            "{fmt}: file size"
        );
        assert_eq!(
            ours.metadata.len(),
            theirs.metadata.len(),
            "{fmt}: metadata"
        );
        // Squared error against the source, per type: Tessera's, llama.cpp's.
        let mut err: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
        for (name, t) in &theirs.tensors {
            let o = ours.info(name).unwrap();
            assert_eq!((o.ty, &o.dims), (t.ty, &t.dims), "{fmt}: {name}");
            let same = ours.bytes(o.offset..o.offset + o.bytes())
                == theirs.bytes(t.offset..t.offset + t.bytes());
            if NEAREST.contains(&t.ty.name()) || t.ty.name() == "F32" {
                assert!(
                    same,
                    "{fmt}: {name} ({}) differs from llama.cpp's",
                    t.ty.name()
                );
            }
            let x = weights(&src, name);
            let e = err.entry(t.ty.name()).or_default();
            e.0 += squared_error(&weights(&ours, name), &x);
            e.1 += squared_error(&weights(&theirs, name), &x);
        }
        for (ty, (a, b)) in err {
            eprintln!("{fmt}: {ty} squared error against the source {a:.4} (llama.cpp {b:.4})");
            assert!(a <= b * 1.01, "{fmt}: {ty} error {a} over llama.cpp's {b}");
        }
        // On the model: logits against transformers' on the source weights.
        let r = reference_file(&dir.join("reference.F32.json"));
        let files = ModelFiles::open(&ours_path).unwrap();
        let theirs_files = ModelFiles::open(&theirs_path).unwrap();
        let mut a = LocalCluster::load(&files, 1, Backend::Cpu, Precision::Exact).unwrap();
        let mut a2 = LocalCluster::load(&files, 2, Backend::Cpu, Precision::Exact).unwrap();
        let mut b = LocalCluster::load(&theirs_files, 1, Backend::Cpu, Precision::Exact).unwrap();
        let (mut ea, mut eb) = (0.0, 0.0);
        for (i, case) in r.cases.iter().enumerate() {
            let want = case.last_logits.as_ref().unwrap();
            let la = a.forward(1, &case.input_ids, 0).unwrap();
            let lb = b.forward(1, &case.input_ids, 0).unwrap();
            a.free(1);
            b.free(1);
            ea += squared_error(&la, want);
            eb += squared_error(&lb, want);
            let ids = greedy(&mut a, &case.input_ids, case.greedy_ids.len());
            let ids2 = greedy(&mut a2, &case.input_ids, case.greedy_ids.len());
            assert_eq!(ids, ids2, "{fmt}, case {i}: 1 and 2 shards");
        }
        // Random weights make logits swing with any change of rounding: measured from 0.5x to
        // 1.6x llama.cpp's file's error, where a wrong block layout gives 10x and more.
        eprintln!("{fmt}: logits' squared error {ea:.1} (llama.cpp's file {eb:.1})");
        assert!(
            ea <= 2.0 * eb,
            "{fmt}: logits' error {ea} against llama.cpp's {eb}"
        );
    }
}

/// Where the fast path may leave the exact path's greedy ids: only at a step where the exact
/// path's two candidates are closer than this (its logits are within ~0.002 of the exact path's
/// on this model; a wrong kernel errs by far more).
const TIE: f32 = 0.01;

/// The fast path's greedy ids against the exact path's: equal, or parting at a near tie.
fn fast_follows_exact(
    fast: &mut LocalCluster,
    exact: &mut LocalCluster,
    prompt: &[u32],
    n: usize,
    what: &str,
) {
    let want = greedy(exact, prompt, n);
    let got = greedy(fast, prompt, n);
    let Some(k) = (0..n).find(|&k| got[k] != want[k]) else {
        return;
    };
    let mut ctx = prompt.to_vec();
    ctx.extend_from_slice(&want[..k]);
    let logits = exact.forward(99, &ctx, 0).unwrap();
    exact.free(99);
    let margin = logits[want[k] as usize] - logits[got[k] as usize];
    eprintln!("{what}: the fast path parts from the exact one at step {k}, margin {margin}");
    assert!(
        margin < TIE,
        "{what}: the fast path parts from the exact path at step {k}, where the exact path's \
         choice leads by {margin}"
    );
}

/// Every reference case on a SmolLM2 file: the exact path's greedy ids equal f32 arithmetic on
/// the file's dequantized weights (`oracle`, an F32 rewrite of it), and are the same on 1 and
/// 2 shards; both paths' first token is the reference's; the fast path follows the exact one.
fn check_requantized(path: &Path, oracle: &Path, what: &str) {
    let r = reference("smollm2-135m-q4_1");
    let files = ModelFiles::open(path).unwrap();
    let oracle_files = ModelFiles::open(oracle).unwrap();
    let mut one = LocalCluster::load(&files, 1, Backend::Cpu, Precision::Exact).unwrap();
    let mut two = LocalCluster::load(&files, 2, Backend::Cpu, Precision::Exact).unwrap();
    let mut fast = LocalCluster::load(&files, 1, Backend::Cpu, Precision::Fast).unwrap();
    let mut f32s = LocalCluster::load(&oracle_files, 1, Backend::Cpu, Precision::Exact).unwrap();
    for (i, case) in r.cases.iter().enumerate() {
        let n = case.greedy_ids.len();
        let ids = greedy(&mut one, &case.input_ids, n);
        assert_eq!(ids[0], case.greedy_ids[0], "{what} case {i}: first token");
        assert_eq!(
            ids,
            greedy(&mut f32s, &case.input_ids, n),
            "{what} case {i}: f32 oracle"
        );
        assert_eq!(
            ids,
            greedy(&mut two, &case.input_ids, n),
            "{what} case {i}: 2 shards"
        );
        let fast_ids = greedy(&mut fast, &case.input_ids, 1);
        assert_eq!(
            fast_ids[0], case.greedy_ids[0],
            "{what} case {i}: fast, first token"
        );
        let what = format!("{what} case {i}");
        fast_follows_exact(&mut fast, &mut one, &case.input_ids, n, &what);
    }
}

/// The demo model (Q4_1) requantized by `tessera quantize`. To F32: the same weights
/// (dequantization is exact), so transformers' logits and greedy ids. To Q8_0, Q6_K and
/// Q4_K_M (llama.cpp's type choices; 576-wide rows are not whole 256-value blocks, so mostly
/// Q8_0 and Q5_0): [`check_requantized`], against an F32 rewrite of each file.
#[test]
fn the_demo_model_requantized_still_answers_like_the_reference() {
    let r = reference("smollm2-135m-q4_1");
    let out = scratch("demo");
    let f32_path = out.join("smollm2.F32.gguf");
    quantize_ok(&smollm2(), &f32_path, "F32");
    let files = ModelFiles::open(&f32_path).unwrap();
    let mut c = LocalCluster::load(&files, 1, Backend::Cpu, Precision::Exact).unwrap();
    for (i, case) in r.cases.iter().enumerate() {
        assert_eq!(
            files.tokenizer.encode(&case.prompt).unwrap(),
            case.input_ids
        );
        let logits = c.forward(1, &case.input_ids, 0).unwrap();
        c.free(1);
        for (id, want) in &case.last_logits_top {
            let got = logits[*id as usize];
            assert!(
                (got - want).abs() <= r.logit_abs,
                "F32 case {i}: logit {id} {got} vs {want}"
            );
        }
        let ids = greedy(&mut c, &case.input_ids, case.greedy_ids.len());
        assert_eq!(ids, case.greedy_ids, "F32 case {i}: greedy ids");
    }
    drop(c);
    let oracle = out.join("oracle.F32.gguf");
    for fmt in ["Q8_0", "Q6_K", "Q4_K_M"] {
        let q = out.join(format!("smollm2.{fmt}.gguf"));
        quantize_ok(&smollm2(), &q, fmt);
        quantize_ok(&q, &oracle, "F32");
        check_requantized(&q, &oracle, fmt);
        std::fs::remove_file(&q).unwrap();
    }
    // llama.cpp's own requantizations (`lquant`, ../shared/peer), where a run has them: not
    // in CI, which never builds the peer.
    if let Some(dir) = std::env::var_os("TESSERA_LQUANT_DIR") {
        for fmt in ["Q8_0", "Q6_K", "Q4_K_M"] {
            let q = Path::new(&dir).join(format!("smollm2-135m.{fmt}.gguf"));
            quantize_ok(&q, &oracle, "F32");
            check_requantized(&q, &oracle, &format!("llama.cpp's {fmt}"));
        }
    }
}

/// Bad requests fail with exit 2 and a clear message, and leave no file behind.
#[test]
fn bad_quantize_requests_are_clear_errors_and_write_nothing() {
    let out = scratch("bad");
    let src = fixtures().join("tiny-llama-gguf/model.F32.gguf");
    let bytes = std::fs::read(&src).unwrap();
    let cut = out.join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
    let dest = out.join("out.gguf");
    let check = |o: Output, needle: &str| {
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains(needle), "expected {needle:?} in {err}");
        assert!(!err.contains("panicked"), "{err}");
        let left: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n != "cut.gguf")
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    };
    check(quantize(&cut, &dest, "Q8_0"), "truncated GGUF");
    check(quantize(&src, &dest, "Q3_K"), "unknown type");
    check(quantize(&cut, &cut, "Q8_0"), "truncated GGUF");
    let copy = out.join("copy.gguf");
    std::fs::copy(&src, &copy).unwrap();
    let o = quantize(&copy, &copy, "Q8_0");
    std::fs::remove_file(&copy).unwrap();
    check(o, "would overwrite the input");
    check(
        quantize(&out.join("missing.gguf"), &dest, "Q8_0"),
        "no such model",
    );
}

/// `tessera synth`: a random model of a named shape, in the formats `quantize` would choose,
/// loads and generates through the ordinary path (1 and 2 shards agree), and the same seed
/// writes the same bytes.
#[test]
fn synth_writes_a_random_model_that_loads_and_generates() {
    let dir = scratch("synth");
    let (a, b, c) = (dir.join("a.gguf"), dir.join("b.gguf"), dir.join("c.gguf"));
    for (path, seed) in [(&a, "7"), (&b, "7"), (&c, "8")] {
        let o = common::tessera()
            .args([
                "synth",
                "tiny",
                "Q4_0",
                path.to_str().unwrap(),
                "--seed",
                seed,
            ])
            .output()
            .expect("tessera runs");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let bytes = |p: &Path| std::fs::read(p).unwrap();
    assert_eq!(bytes(&a), bytes(&b), "the same seed, the same file");
    assert_ne!(bytes(&a), bytes(&c), "another seed, other weights");
    let g = GgufFile::open(&a).expect("a GGUF file");
    assert_eq!(g.tensors.len(), 2 + 2 * 9 + 1);
    assert_eq!(g.tensors["blk.1.ffn_up.weight"].dims, vec![64, 256]);
    assert_eq!(
        g.tensors["blk.0.attn_q.weight"].ty,
        tessera_quant::GgmlType::Q4_0
    );
    let files = ModelFiles::open(&a).expect("model opens");
    assert_eq!(files.cfg.vocab, 512);
    let prompt = files
        .tokenizer
        .encode("Hello, world")
        .expect("bytes encode");
    assert_eq!(prompt.len(), "Hello, world".len(), "a token a byte");
    let mut one = LocalCluster::load(&files, 1, Backend::Cpu, Precision::Exact).unwrap();
    let mut two = LocalCluster::load(&files, 2, Backend::Cpu, Precision::Exact).unwrap();
    let got = greedy(&mut one, &prompt, 8);
    assert_eq!(got.len(), 8);
    assert_eq!(greedy(&mut two, &prompt, 8), got, "1 and 2 shards agree");
    let bad = common::tessera()
        .args([
            "synth",
            "huge",
            "Q4_0",
            dir.join("d.gguf").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown shape"));
    let _ = std::fs::remove_dir_all(&dir);
}
