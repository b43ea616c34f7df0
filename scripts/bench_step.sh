#!/usr/bin/env bash
# Side-by-side benchmark of one meta-training step at the official shape: gpo (release
# build) and the PyTorch reference of the official step, in one run, same machine.
# Usage: PY=/path/to/python-with-torch scripts/bench_step.sh [DIM_X ...]   (default 384 4096)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
ITERS=${ITERS:-20}
dims=("$@"); [ ${#dims[@]} -gt 0 ] || dims=(384 4096)
cargo build --release -q
"$PY" -c 'import torch' 2>/dev/null || { echo "bench_step: $PY has no torch (set PY=...)" >&2; exit 1; }
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for d in "${dims[@]}"; do
  ours=$(target/release/gpo bench step --dim-x "$d" --groups 8 --iters "$ITERS" | tail -1 | cut -d= -f2)
  ref=$("$PY" tools/reference/gpo_reference.py bench --dim-x "$d" --groups 8 --iters "$ITERS" | tail -1 | cut -d= -f2)
  ratio=$(python3 -c "print(f'{$ours / $ref:.2f}')")
  echo "dim_x $d: gpo median_step_s=$ours  pytorch median_step_s=$ref  ratio=$ratio"
done
