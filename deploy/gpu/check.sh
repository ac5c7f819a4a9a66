#!/usr/bin/env bash
# The GPU check: the wgpu backend's reference ids and its decode speed on a lent GPU machine
# (the session's `device` tool), in one short run. That machine has no network and no Rust
# cache, and a run carries at most 64 MiB of ignored files, so everything is prepared here:
#
#   deploy/gpu/check.sh pack     # here: stripped binaries and the tiny fixtures, xz'd, in .gpu/,
#                                # and Vulkan's loader and glvnd as Debian packages in .gl/
#   deploy/gpu/check.sh run      # there (carry .gpu and .gl): writes its results under $OUT
#   deploy/gpu/check.sh tune     # there: the mat-vec's row split (TESSERA_GPU_LANES) compared
#
# `run` checks the GPU kernels against the CPU's decoding for every weight format (gpu.rs's unit
# tests), times the mat-vec kernels alone (`tessera bench --kernels`, on wgpu and on the CPU:
# GB/s of weights, and on wgpu the host's cost of a launch and of a readback), writes random
# models of TinyLlama-1.1B's shape in Q4_0 and Q8_0 and SmolLM2-135M's in Q4_0 (`tessera
# synth`) and times each on wgpu and on the CPU (`tessera bench --json`: decode, prefill, bytes
# read per token, kernel launches per token), checks the reference greedy ids of every tiny
# fixture and GGUF format on wgpu (1 and 2 shards, exact and fast path: tests/engine.rs's wgpu
# tests), and, where time is left, times Llama 3 8B's shape in Q4_0 too. On a lent H100
# (2026-11-27) wgpu found no adapter with Vulkan's loader alone, and found the H100 once glvnd's
# libraries from `.gl` were unpacked too (NVIDIA's Vulkan driver, libGLX_nvidia, links glvnd's
# libGLdispatch).
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
  if ! ls .gl/libvulkan1_*.deb >/dev/null 2>&1; then
    mkdir -p .gl /tmp/gl-lists/partial
    o=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/gl-lists)
    apt-get "${o[@]}" update -qq
    (cd .gl && apt-get "${o[@]}" download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
  fi
  # The run carries at most 64 MiB.
  tar -C .gpu -cf - bin fixtures | xz -T0 -6 >.gpu.tar.xz
  rm -rf .gpu
  mkdir .gpu
  mv .gpu.tar.xz .gpu/
  du -sh .gpu
  ;;
run | tune)
  out=${OUT:-/tmp/gpu-check}
  mkdir -p "$out"
  log="$out/gpu-check.txt"
  : >"$log"
  t0=$SECONDS
  # Steps past this many seconds are skipped (a lent machine's time is short).
  budget=${GPU_CHECK_SECONDS:-420}
  left() { [ $((SECONDS - t0)) -lt "$budget" ] || { echo "skipped (time): $*" >>"$log"; false; }; }
  # Vulkan's loader where the image has none (carried as .gl/*.deb, made as the device notes
  # say), and NVIDIA's driver manifest where the loader's own folders name none.
  # (NVIDIA's Vulkan driver, libGLX_nvidia, needs glvnd's libGLdispatch too.)
  if ls .gl/*.deb >/dev/null 2>&1; then
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
  fi
  if ! ls /usr/share/vulkan/icd.d/nvidia* /etc/vulkan/icd.d/nvidia* >/dev/null 2>&1; then
    for j in /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json /usr/local/nvidia/icd.d/nvidia_icd.json; do
      if [ -f "$j" ]; then
        export VK_DRIVER_FILES=$j VK_ICD_FILENAMES=$j
        export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
        break
      fi
    done
  fi
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    echo "cpus: $(nproc)"
    ldconfig -p | grep -i vulkan || echo "no Vulkan loader"
    echo "VK_DRIVER_FILES=${VK_DRIVER_FILES:-}"
  } >>"$log" 2>&1
  work=/tmp/gpu-check-files
  mkdir -p "$work"
  xz -dc .gpu/.gpu.tar.xz | tar -C "$work" -xf -
  export TESSERA_FIXTURES="$work/fixtures"
  probe() { timeout 60 "$work/bin/model" gpu::tests::argmax >/dev/null 2>&1; }
  if ! probe; then
    # Where the driver's libraries are not on the loader's path, name their folders.
    for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do
      [ -d "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    done
    echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}" >>"$log"
    if ! probe; then
      {
        echo "== no wgpu adapter: what the Vulkan loader saw"
        cat "${VK_DRIVER_FILES:-/dev/null}" || true
        lib=$(grep -o '"library_path"[^,]*' "${VK_DRIVER_FILES:-/dev/null}" | cut -d'"' -f4 || true)
        [ -n "$lib" ] && { ldconfig -p | grep "$lib"; ldd "$(ldconfig -p | grep "$lib" | head -1 | sed 's/.*=> //')" | grep "not found"; } || true
        VK_LOADER_DEBUG=error,driver timeout 60 "$work/bin/model" gpu::tests::argmax 2>&1 | head -40 || true
      } >>"$log" 2>&1
    fi
  fi
  if [ "$1" = tune ]; then
    # How the mat-vec splits a row across a workgroup's units (TESSERA_GPU_LANES: the most
    # units a row), timed alone (bench --kernels) and in decode, to choose it for a GPU class.
    for l in ${GPU_TUNE_LANES-64 32 16 8}; do
      left "kernels, lanes $l" && { TESSERA_GPU_LANES=$l timeout 90 "$work/bin/tessera" bench --kernels \
        --backend wgpu --json 2>>"$log" | tee -a "$log" | tail -1 | sed "s/^/lanes $l: /" >>"$out/tune.txt" ||
        echo "kernels lanes $l: exit $?" >>"$log"; }
    done
    for shape in ${GPU_TUNE_SHAPES-tinyllama-1.1b llama3-8b}; do
      m="/tmp/$shape.gguf"
      left "synth $shape" || continue
      "$work/bin/tessera" synth "$shape" Q4_0 "$m" >/dev/null 2>>"$log" || continue
      for l in ${GPU_TUNE_DECODE_LANES-64 16}; do
        left "decode $shape, lanes $l" && { TESSERA_GPU_LANES=$l timeout 120 "$work/bin/tessera" bench \
          --model "$m" --backend wgpu --prompt-tokens 16 --gen-tokens 64 --runs 1 --bandwidth-mib 256 \
          --json 2>>"$log" | tail -1 | sed "s/^/lanes $l: /" >>"$out/tune.txt" ||
          echo "decode $shape lanes $l: exit $?" >>"$log"; }
      done
      rm -f "$m"
    done
    echo "== done in $((SECONDS - t0)) s" >>"$log"
    cat "$log" "$out/tune.txt"
    exit 0
  fi
  echo "== the kernels against the CPU, every format" >>"$log"
  timeout 120 "$work/bin/model" gpu:: 2>&1 | grep -E "^test |test result|panicked|adapter" >>"$log" ||
    echo "kernel tests: exit $?" >>"$log"
  echo "== the mat-vec kernels alone" >>"$log"
  for be in wgpu cpu; do
    left "kernels $be" && { timeout 120 "$work/bin/tessera" bench --kernels --backend "$be" --json \
      2>>"$log" | tee -a "$log" | tail -1 >>"$out/bench.jsonl" || echo "kernels $be: exit $?" >>"$log"; }
  done
  bench() { # shape, type, backend...
    local m="/tmp/$1-$2.gguf"
    left "synth $1 $2" || return 0
    "$work/bin/tessera" synth "$1" "$2" "$m" >/dev/null 2>>"$log" || { echo "synth $1 $2: failed" >>"$log"; return 0; }
    for be in "${@:3}"; do
      left "bench $1 $2 $be" && { timeout 150 "$work/bin/tessera" bench --model "$m" --backend "$be" \
        --prompt-tokens 128 --gen-tokens 64 --runs 1 --json 2>>"$log" | tail -1 >>"$out/bench.jsonl" ||
        echo "bench $1 $2 $be: exit $?" >>"$log"; }
    done
    rm -f "$m"
  }
  echo "== speed" >>"$log"
  shapes=${GPU_CHECK_SHAPES:-tinyllama-1.1b smollm2-135m}
  for shape in $shapes; do
    for ty in Q4_0 Q8_0; do
      [ "$shape" = smollm2-135m ] && [ "$ty" = Q8_0 ] && continue
      bench "$shape" "$ty" wgpu cpu
    done
  done
  echo "== reference ids on wgpu" >>"$log"
  # (not the real Gemma 3 270M: that machine has no network to pull it)
  left "engine tests" && { timeout 150 "$work/bin/engine" wgpu --skip gemma3_270m 2>&1 |
    grep -E "^test |test result|panicked" >>"$log" || echo "engine tests: exit $?" >>"$log"; }
  # A larger model last, where time is left: fixed costs matter less against 4.3 GB a token.
  [ -n "${GPU_CHECK_LARGE-llama3-8b}" ] && bench "${GPU_CHECK_LARGE-llama3-8b}" Q4_0 wgpu cpu
  echo "== done in $((SECONDS - t0)) s" >>"$log"
  cat "$log" "$out/bench.jsonl"
  ;;
*)
  echo "usage: $0 pack|run|tune" >&2
  exit 2
  ;;
esac
