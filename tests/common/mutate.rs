//! Mutations of real inputs for the fuzz tests (proptest on stable Rust): byte edits, huge
//! little-endian numbers, truncations and textual JSON edits, and a runner with a fixed seed
//! that keeps failures in a regression file and checks that enough cases got past the first
//! parser check.

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};

/// Cases per target: `TESSERA_FUZZ_CASES`, else `default`.
pub fn cases(default: u32) -> u32 {
    std::env::var("TESSERA_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..Config::default()
    }
}

/// One change to a file's bytes.
#[derive(Debug, Clone)]
pub enum Edit {
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
pub fn edits(regions: Vec<std::ops::Range<usize>>, len: usize) -> impl Strategy<Value = Vec<Edit>> {
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
pub fn json_edits(len: usize) -> impl Strategy<Value = Vec<Edit>> {
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

pub fn apply(mut b: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
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

/// Runs `cases` mutations through `test`, keeping failures in the regression file beside
/// `file` (the calling test's `file!()`) and replaying them first; at least `min_ran` of the cases must have loaded a model, so that the mutations
/// reach past the first header check.
pub fn fuzz<S: Strategy>(
    file: &'static str,
    name: &'static str,
    cases: u32,
    strategy: S,
    min_ran: f64,
    test: impl Fn(S::Value) -> bool,
) where
    S::Value: std::fmt::Debug,
{
    let ran = std::sync::atomic::AtomicUsize::new(0);
    let cfg = config(cases);
    let cases = cases as usize;
    // A fixed seed unless TESSERA_FUZZ_SEED asks for another: CI runs the same cases each time.
    let seed = std::env::var("TESSERA_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20261126);
    let mut runner = proptest::test_runner::TestRunner::new(Config {
        source_file: Some(file),
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
    eprintln!("{name}: {ran} of {cases} mutated inputs got through");
    assert!(
        ran as f64 >= min_ran * cases as f64,
        "{name}: only {ran} of {cases} loaded"
    );
}
