#!/usr/bin/env bash
# The whole test suite: setup, formatting, lints, then every unit, integration and
# end-to-end test of the workspace. This is what .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/check_deploy.sh # deploy/ and helm/, offline with the real tools (about 10 s once they are installed)
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
# The `cuda` feature (candle's CUDA backend and NCCL), compiled and linked against the CUDA
# toolkit from PyPI and a stub driver, all inside the clone (.cuda/, target/): the code no
# CPU test runs must still build (BENCHMARKS.md "GPU" has its time).
scripts/cuda_build.sh
