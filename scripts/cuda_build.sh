#!/usr/bin/env bash
# Compiles gpo's `cuda` feature (candle's CUDA backend and NCCL) on a machine with no GPU
# and no CUDA installed, as CI does, so that code no CPU test runs cannot rot.
#
#   scripts/cuda_build.sh            # CI: `cargo build --features cuda --bin gpo` (dev
#                                    # profile, in target/, sharing the CPU build's deps;
#                                    # the crates it recompiles at opt-level 0)
#   scripts/cuda_build.sh --release  # the carriable binary: target/cuda/release/gpo
#                                    # (own target dir; what scripts/gpu_check.sh runs)
#   scripts/cuda_build.sh --env      # only prints the environment (eval "$(...)"), e.g.
#                                    # for `cargo clippy --features cuda`
#
# Everything lives inside the clone, in .cuda/ (gitignored) and target/; nothing outside
# it is cached but cargo's own registry. Re-runnable: each step is skipped when its output
# is already there.
#   - .cuda/pkgs: the CUDA 13.0 toolkit from PyPI (nvcc, cudart, nvrtc, cuBLAS, cuRAND,
#     CCCL: without it nvcc fails on `nv/target`) and NCCL (candle's `nccl` feature links
#     libnccl), installed with pip --target;
#   - .cuda/lib: unversioned links to the toolkit's `.so.N` libraries (PyPI ships only
#     those) and a stub libcuda.so (soname libcuda.so.1) built here with gcc: PyPI has no
#     driver. The stub exports every driver entry point cudarc binds, each returning
#     CUDA_ERROR_NO_DEVICE (100), so the link resolves; on a GPU host the real driver's
#     libcuda.so.1 is found instead at run time.
# CUDA_COMPUTE_CAP=90 (H100/H200): nvcc cannot detect it without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
mode="${1:-ci}"

cuda_dir="$root/.cuda"
pkgs="$cuda_dir/pkgs"
lib="$cuda_dir/lib"
toolkit="cuda-toolkit[nvcc,cudart,nvrtc,cublas,curand,cccl]==13.0.3"
nccl="nvidia-nccl-cu13==2.32.3"
stamp="$pkgs/.installed"
want="$toolkit $nccl"

if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  py=""
  for c in python3 python; do
    if command -v "$c" >/dev/null && "$c" -m pip --version >/dev/null 2>&1; then py="$c"; break; fi
  done
  [ -n "$py" ] || { echo "cuda_build: python3 with pip is needed to install the CUDA toolkit from PyPI" >&2; exit 1; }
  echo "cuda_build: installing $want into .cuda/pkgs" >&2
  rm -rf "$pkgs" "$pkgs.tmp" "$lib"
  mkdir -p "$cuda_dir"
  "$py" -m pip install --quiet --disable-pip-version-check --no-compile --target "$pkgs.tmp" \
    "$toolkit" "$nccl"
  mv "$pkgs.tmp" "$pkgs"
  echo "$want" >"$stamp"
fi

cu="$pkgs/nvidia/cu13"
nccl_dir="$pkgs/nvidia/nccl"
if [ ! -f "$lib/libcuda.so" ]; then
  rm -rf "$lib.tmp"
  mkdir -p "$lib.tmp"
  for so in "$cu"/lib/lib*.so.* "$nccl_dir"/lib/libnccl.so.*; do
    base="$(basename "$so")"
    ln -sf "$so" "$lib.tmp/${base%%.so.*}.so"
  done
  # The driver's entry points, as cudarc's bindings name them (the union over every CUDA
  # version they cover: extra symbols in a stub cost nothing).
  bindings="$(cargo metadata --format-version 1 --locked --features cuda 2>/dev/null | "${PYTHON:-python3}" -c '
import json, os, sys
m = json.load(sys.stdin)
for p in m["packages"]:
    if p["name"] == "cudarc":
        print(os.path.join(os.path.dirname(p["manifest_path"]), "src", "driver", "sys", "mod.rs"))
        break
')"
  [ -f "$bindings" ] || { echo "cuda_build: cudarc's driver bindings not found (cargo fetch first)" >&2; exit 1; }
  grep -o 'pub unsafe fn cu[A-Za-z0-9_]*' "$bindings" | awk '{print $4}' | sort -u |
    awk '{print "int " $1 "(void) { return 100; }"}' >"$lib.tmp/cuda_stub.c"
  gcc -shared -fPIC -O0 -Wl,-soname,libcuda.so.1 -o "$lib.tmp/libcuda.so" "$lib.tmp/cuda_stub.c"
  echo "cuda_build: stub libcuda.so with $(wc -l <"$lib.tmp/cuda_stub.c") driver symbols" >&2
  rm -rf "$lib"
  mv "$lib.tmp" "$lib"
fi

# CUDAFORGE_THREADS: candle-kernels' build script compiles its CUDA kernels on cudaforge's
# pool, which takes half the cores by default; while it runs, the rest of the build mostly
# waits for it. In the environment, so `--env` users (clippy with the feature) get it too.
env_lines="export PATH=\"$cu/bin:\$PATH\" CUDA_HOME=\"$cu\" CUDA_PATH=\"$cu\" CUDA_ROOT=\"$cu\" NCCL_HOME=\"$nccl_dir\" CUDA_COMPUTE_CAP=90 LIBRARY_PATH=\"$lib\${LIBRARY_PATH:+:\$LIBRARY_PATH}\" CUDAFORGE_THREADS=\"${CUDAFORGE_THREADS:-$(nproc)}\""
# The linker (cc) finds the unversioned names and the stub through LIBRARY_PATH. Not
# RUSTFLAGS: that would replace .cargo/config.toml's flags and change every crate's
# fingerprint, so nothing of the CPU build could be shared.
eval "$env_lines"

case "$mode" in
  --env)
    echo "$env_lines"
    ;;
  ci)
    nvcc --version | tail -2 >&2
    t0=$(date +%s)
    # What CI asks of this step is that the feature compiles and links, not fast code, so
    # the crates the feature recompiles anyway (the candle chain and the workspace's own)
    # are built at opt-level 0 without line tables; every other crate keeps the profile it
    # has in `cargo test`, so it is shared, not rebuilt. The carriable binary (--release)
    # is optimised as usual.
    cargo build --locked --features cuda --bin gpo \
      --config 'profile.dev.opt-level=0' --config 'profile.dev.debug=false' \
      --config 'profile.dev.package.gpo-core.opt-level=0' \
      --config 'profile.dev.package.candle-core.opt-level=0' \
      --config 'profile.dev.package.candle-nn.opt-level=0' \
      --config 'profile.dev.package.cudarc.opt-level=0'
    echo "cuda_build: cargo build --features cuda took $(($(date +%s) - t0)) s" >&2
    ;;
  --release)
    t0=$(date +%s)
    CARGO_TARGET_DIR="$root/target/cuda" cargo build --locked --release --features cuda --bin gpo
    bin="$root/target/cuda/release/gpo"
    strip "$bin"
    echo "cuda_build: $bin ($(du -h "$bin" | cut -f1)) in $(($(date +%s) - t0)) s" >&2
    ;;
  *)
    echo "usage: scripts/cuda_build.sh [--release|--env]" >&2
    exit 2
    ;;
esac
