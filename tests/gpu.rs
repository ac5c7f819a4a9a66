//! Kernel launches on wgpu (Mesa's lavapipe in CI). In a file of its own: CubeCL's launch
//! observer counts every launch of the process, and the other test files run their tests in
//! parallel threads.

mod common;

use common::{fixtures, skip_wgpu};
use tessera_model::{Backend, LocalCluster, ModelFiles, Precision, Runner};

/// One decode step on wgpu launches a bounded number of kernels per layer: each product one
/// kernel, each residual add fused with the norm after it, RoPE one kernel for Q and K, the KV
/// cache written in place, decode attention one kernel over the cache.
/// Counted by CubeCL's launch observer (the same counter `tessera bench` reports).
#[test]
fn wgpu_decode_step_launches_few_kernels_per_layer() {
    if skip_wgpu() {
        return;
    }
    let files = ModelFiles::open(&fixtures().join("tiny-llama")).expect("model opens");
    let layers = files.cfg.layers as u64;
    let mut cluster =
        LocalCluster::load(&files, 1, Backend::Wgpu, Precision::Exact).expect("model loads");
    cluster.forward(1, &[1, 2, 3], 0).expect("prefill");
    let (r, by) = tessera_model::count_launches(|| cluster.forward(1, &[4], 3));
    r.expect("decode step");
    let n: u64 = by.iter().map(|k| k.1).sum();
    eprintln!("{n} kernel launches for one decode step of {layers} layers: {by:?}");
    assert!(n >= 8 * layers, "the counter sees the launches: {n}");
    assert!(
        n <= LAUNCHES_PER_LAYER * layers + 4,
        "{n} launches for {layers} layers: more than {LAUNCHES_PER_LAYER} a layer"
    );
}

/// Per layer of a dense decode step on wgpu: Q, K and V (a product each), RoPE of Q and K,
/// the cache write of K and V, attention, O, the residual add with the FFN's norm, gate, up,
/// the GLU, down, and the residual add with the next layer's norm.
const LAUNCHES_PER_LAYER: u64 = 10;
