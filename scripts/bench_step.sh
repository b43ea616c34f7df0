#!/usr/bin/env bash
# Side-by-side benchmark of one meta-training step at the official shape, in one run on one
# machine: gpo (release build, the hand-written backward), gpo with candle's autograd
# instead, and the PyTorch twin of the official step replaying gpo's exact batch shapes
# (`gpo bench step --shapes-out` → `gpo_reference.py bench --shapes`).
# Usage: PY=/path/to/python-with-torch scripts/bench_step.sh [DIM_X ...]   (default 384 4096)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
ITERS=${ITERS:-20}
THREADS=${THREADS:-2}
dims=("$@"); [ ${#dims[@]} -gt 0 ] || dims=(384 4096)
cargo build --release -q --bin gpo
"$PY" -c 'import torch' 2>/dev/null || { echo "bench_step: $PY has no torch (set PY=...)" >&2; exit 1; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load $(cut -d' ' -f1 /proc/loadavg)"
median() { grep '^median_step_s=' "$1" | cut -d= -f2; }
for d in "${dims[@]}"; do
  target/release/gpo bench step --dim-x "$d" --groups 8 --iters "$ITERS" --threads "$THREADS" \
    --shapes-out "$tmp/shapes-$d.json" > "$tmp/tape-$d.txt"
  target/release/gpo bench step --dim-x "$d" --groups 8 --iters "$ITERS" --threads "$THREADS" \
    --autograd > "$tmp/autograd-$d.txt"
  "$PY" tools/reference/gpo_reference.py bench --dim-x "$d" --groups 8 --threads "$THREADS" \
    --shapes "$tmp/shapes-$d.json" > "$tmp/torch-$d.txt"
  ours=$(median "$tmp/tape-$d.txt"); auto=$(median "$tmp/autograd-$d.txt"); ref=$(median "$tmp/torch-$d.txt")
  grep -E '^(dim_x|achieved|gemm_peak|fraction)' "$tmp/tape-$d.txt" | sed 's/^/  gpo: /'
  grep -E '^mean points' "$tmp/torch-$d.txt" | sed 's/^/  pytorch: /'
  echo "dim_x $d: gpo median_step_s=$ours  gpo+autograd median_step_s=$auto  pytorch median_step_s=$ref  ratio=$(python3 -c "print(f'{$ours / $ref:.3f}')")  autograd/tape=$(python3 -c "print(f'{$auto / $ours:.3f}')")"
done
