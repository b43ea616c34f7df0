#!/usr/bin/env bash
# Side-by-side benchmark of one meta-training step at the official shape, in one run on one
# machine: gpo (release build, the hand-written backward), gpo with candle's autograd
# instead, and the PyTorch twin of the official step replaying gpo's exact batch shapes
# (`gpo bench step --shapes-out` → `gpo_reference.py bench --shapes`). The three run in
# turn, ROUNDS times, so that a shared machine's drift falls on all of them alike: gpo
# first in odd rounds, the twin first in even ones, so that a drift within a round does not
# favour one side. Each round's ratio is printed, then the median of the rounds. The batch
# shapes depend on the seed alone, so the first round's serve every round.
# Usage: PY=/path/to/python-with-torch scripts/bench_step.sh [DIM_X ...]   (default 384 4096)
# Environment: ITERS (timed steps per run, 20), ROUNDS (3), THREADS (2), NGROUPS (8);
# GPO_BIN, a gpo binary to time as it is (another build, say), instead of building this
# checkout's release binary under CARGO_TARGET_DIR (default target).
set -euo pipefail
# GPO_BIN as given from the caller's directory, before the script moves to the checkout.
[ -z "${GPO_BIN:-}" ] || GPO_BIN=$(realpath -m "$GPO_BIN")
cd "$(dirname "$0")/.."
PY=${PY:-python3}
ITERS=${ITERS:-20}
ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-2}
NGROUPS=${NGROUPS:-8}
dims=("$@"); [ ${#dims[@]} -gt 0 ] || dims=(384 4096)
if [ -n "${GPO_BIN:-}" ]; then
  gpo=$GPO_BIN
  [ -x "$gpo" ] || { echo "bench_step: GPO_BIN=$gpo is not an executable file" >&2; exit 1; }
else
  cargo build --release -q --bin gpo
  gpo=${CARGO_TARGET_DIR:-target}/release/gpo
fi
"$PY" -c 'import torch' 2>/dev/null || { echo "bench_step: $PY has no torch (set PY=...)" >&2; exit 1; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
echo "binary: $gpo"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load $(cut -d' ' -f1 /proc/loadavg)"
median_of() { grep '^median_step_s=' "$1" | cut -d= -f2; }
med() { python3 -c "import statistics,sys; print(f'{statistics.median(float(x) for x in sys.argv[1:]):.4f}')" "$@"; }
gpo_step() {
  "$gpo" bench step --dim-x "$1" --groups "$NGROUPS" --iters "$ITERS" --threads "$THREADS" "${@:2}"
}
for d in "${dims[@]}"; do
  tape=(); auto=(); ref=(); ratio=()
  twin() {
    "$PY" tools/reference/gpo_reference.py bench --dim-x "$d" --groups "$NGROUPS" --threads "$THREADS" \
      --shapes "$tmp/shapes.json" > "$tmp/torch.txt"
  }
  for r in $(seq "$ROUNDS"); do
    # Round 1 (gpo first) writes the shapes the twin replays in every round.
    out=(); [ "$r" -eq 1 ] && out=(--shapes-out "$tmp/shapes.json")
    if [ $((r % 2)) -eq 1 ]; then
      first="gpo first"
      gpo_step "$d" "${out[@]}" > "$tmp/tape.txt"
      gpo_step "$d" --autograd > "$tmp/autograd.txt"
      twin
    else
      first="twin first"
      twin
      gpo_step "$d" --autograd > "$tmp/autograd.txt"
      gpo_step "$d" > "$tmp/tape.txt"
    fi
    t=$(median_of "$tmp/tape.txt"); a=$(median_of "$tmp/autograd.txt"); p=$(median_of "$tmp/torch.txt")
    tape+=("$t"); auto+=("$a"); ref+=("$p"); ratio+=("$(python3 -c "print(f'{$t / $p:.3f}')")")
    echo "dim_x $d round $r ($first): gpo $t s  gpo+autograd $a s  pytorch $p s  ratio ${ratio[-1]}  load $(cut -d' ' -f1 /proc/loadavg)"
    grep -E '^(dim_x|official_flops|achieved|gemm_peak|fma_peak|fraction)' "$tmp/tape.txt" | sed 's/^/    gpo: /'
    # gpo's operations per step done in 0.3 of the twin's median step: the speed, as a
    # fraction of the measured GEMM peak, that a ratio of 0.3 takes.
    ops=$(grep '^flops_per_step=' "$tmp/tape.txt" | cut -d= -f2 | cut -d' ' -f1)
    peak=$(grep '^gemm_peak_gflops=' "$tmp/tape.txt" | cut -d= -f2 | cut -d' ' -f1)
    fma=$(grep '^fma_peak_gflops=' "$tmp/tape.txt" | cut -d= -f2 | cut -d' ' -f1)
    mem=$(grep '^gemm_peak_from_memory_gflops=' "$tmp/tape.txt" | cut -d= -f2 | cut -d' ' -f1)
    echo "    gpo: fraction of the GEMM peak a ratio of 0.3 takes: $(python3 -c "print(f'{$ops / (0.3 * $p) / 1e9 / $peak:.2f}')"), of the peak from memory: $(python3 -c "print(f'{$ops / (0.3 * $p) / 1e9 / $mem:.2f}')"), of the FMA ceiling: $(python3 -c "print(f'{$ops / (0.3 * $p) / 1e9 / $fma:.2f}')")"
    grep -E '^mean points' "$tmp/torch.txt" | sed 's/^/    pytorch: /'
  done
  echo "dim_x $d median of $ROUNDS rounds: gpo median_step_s=$(med "${tape[@]}")  gpo+autograd median_step_s=$(med "${auto[@]}")  pytorch median_step_s=$(med "${ref[@]}")  ratio=$(med "${ratio[@]}")"
done
