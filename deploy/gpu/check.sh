#!/usr/bin/env bash
# The GPU check: the wgpu backend's reference ids and its decode speed on a lent GPU machine
# (the session's `device` tool), in one short run. That machine has no network and no Rust
# cache, and a run carries at most 64 MiB of ignored files, so everything is prepared here:
#
#   deploy/gpu/check.sh pack     # here: stripped binaries and the tiny fixtures, xz'd, in .gpu/
#   deploy/gpu/check.sh run      # there (carry .gpu): writes its results under $OUT
#
# `run` checks the GPU kernels against the CPU's decoding for every weight format (gpu.rs's unit
# tests) and the reference greedy ids of every tiny fixture and GGUF format on wgpu (1 and 2
# shards, exact and fast path: tests/engine.rs's wgpu tests), then writes random models of
# TinyLlama-1.1B's and SmolLM2-135M's shapes (`tessera synth`) in Q4_0 and Q8_0 and times each
# on wgpu and on the CPU (`tessera bench --json`: decode, prefill, bytes read per token, kernel
# launches per token).
set -euo pipefail
cd "$(dirname "$0")/../.."

case "${1:-}" in
pack)
  cargo build --release --workspace --all-targets
  rm -rf .gpu
  mkdir -p .gpu/bin .gpu/fixtures
  strip -o .gpu/bin/tessera target/release/tessera
  f=$(ls -t target/release/deps/engine-* | grep -v '\.d$' | head -1)
  strip -o .gpu/bin/engine "$f"
  # tessera-model's unit tests: the GPU kernels against the CPU, format by format.
  f=$(ls -t target/release/deps/tessera_model-* | grep -v '\.d$\|\.rlib$\|\.rmeta$' | head -1)
  strip -o .gpu/bin/model "$f"
  for f in tiny-llama tiny-llama-gguf tiny-gemma3 tiny-qwen3-moe; do
    cp -r "../shared/fixtures/$f" .gpu/fixtures/
  done
  # The run carries at most 64 MiB.
  tar -C .gpu -cf - bin fixtures | xz -T0 -6 >.gpu.tar.xz
  rm -rf .gpu
  mkdir .gpu
  mv .gpu.tar.xz .gpu/
  du -sh .gpu
  ;;
run)
  out=${OUT:-/tmp/gpu-check}
  mkdir -p "$out"
  log="$out/gpu-check.txt"
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true; nproc; } >"$log" 2>&1
  work=/tmp/gpu-check-files
  mkdir -p "$work"
  xz -dc .gpu/.gpu.tar.xz | tar -C "$work" -xf -
  export TESSERA_FIXTURES="$work/fixtures"
  echo "== the kernels against the CPU, every format" >>"$log"
  timeout 300 "$work/bin/model" gpu:: 2>&1 | grep -E "^test |test result|panicked" >>"$log" ||
    echo "kernel tests: exit $?" >>"$log"
  echo "== reference ids on wgpu" >>"$log"
  # (not the real Gemma 3 270M: that machine has no network to pull it)
  timeout 300 "$work/bin/engine" wgpu --skip gemma3_270m 2>&1 | grep -E "^test |test result|panicked" >>"$log" ||
    echo "engine tests: exit $?" >>"$log"
  echo "== speed" >>"$log"
  for shape in ${GPU_CHECK_SHAPES:-tinyllama-1.1b smollm2-135m}; do
    for ty in Q4_0 Q8_0; do
      m="/tmp/$shape-$ty.gguf"
      "$work/bin/tessera" synth "$shape" "$ty" "$m" 2>>"$log"
      for be in wgpu cpu; do
        timeout 120 "$work/bin/tessera" bench --model "$m" --backend "$be" --prompt-tokens 128 \
          --gen-tokens 64 --runs 1 --json 2>>"$log" | tail -1 >>"$out/bench.jsonl" ||
          echo "bench $shape $ty $be: exit $?" >>"$log"
      done
      rm -f "$m"
    done
  done
  cat "$log" "$out/bench.jsonl"
  ;;
*)
  echo "usage: $0 pack|run" >&2
  exit 2
  ;;
esac
