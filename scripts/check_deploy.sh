#!/usr/bin/env bash
# Checks deploy/ and helm/ offline with the real tools (installed by deploy_tools.sh):
# hadolint on both Dockerfiles, docker-compose config, promtool (config, rules, rule unit
# tests, every dashboard query parsed), helm lint and template with the default and the
# GPU-TLS values, kubernetes-validate --strict on what helm renders, and that every gpo flag
# the manifests pass exists in the binary's source or is a declared pending one that stays
# off by default. Prints each check; exits non-zero if any fails.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
tools_bin=$(scripts/deploy_tools.sh | tail -1)
export PATH="$tools_bin:$PATH"
py=$repo/.tools/venv/bin/python # has PyYAML (a kubernetes-validate dependency)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chart=helm/gpo
failed=()
start=$(date +%s)

# check NAME CMD...: runs CMD, prints ok or its output.
check() {
  local name=$1
  shift
  if "$@" >"$work/out" 2>&1; then
    echo "ok    $name"
  else
    echo "FAIL  $name"
    sed 's/^/      /' "$work/out"
    failed+=("$name")
  fi
}
# check_fails NAME CMD...: CMD must fail (a negative test of a guard).
check_fails() {
  local name=$1
  shift
  if "$@" >"$work/out" 2>&1; then
    echo "FAIL  $name (it succeeded, it should have been refused)"
    failed+=("$name")
  else
    echo "ok    $name"
  fi
}

echo "== containers"
check "hadolint deploy/Dockerfile deploy/Dockerfile.cuda" hadolint deploy/Dockerfile deploy/Dockerfile.cuda
check "shellcheck deploy/healthcheck.sh scripts/deploy_tools.sh scripts/check_deploy.sh" \
  shellcheck deploy/healthcheck.sh scripts/deploy_tools.sh scripts/check_deploy.sh

echo "== compose"
check "docker-compose -f deploy/compose.yaml config -q" docker-compose -f deploy/compose.yaml config -q
check "docker-compose -f deploy/compose.yaml --profile ha config -q" \
  docker-compose -f deploy/compose.yaml --profile ha config -q
docker-compose -f deploy/compose.yaml config >"$work/compose-default.yaml"
docker-compose -f deploy/compose.yaml --profile ha config >"$work/compose-ha.yaml"
GPO_METRICS_FLAGS="--metrics-addr 0.0.0.0:9464" GPO_ETCD_FLAGS="--etcd http://etcd:2379" \
  docker-compose -f deploy/compose.yaml --profile ha config >"$work/compose-pending.yaml"

echo "== prometheus"
check "promtool check config deploy/prometheus/prometheus.yml" promtool check config deploy/prometheus/prometheus.yml
check "promtool check rules deploy/prometheus/alerts.yml" promtool check rules deploy/prometheus/alerts.yml
check "promtool test rules deploy/prometheus/alerts_test.yml (each alert fires and resolves)" \
  promtool test rules deploy/prometheus/alerts_test.yml

# Every scrape target is a compose service; every alert has a unit test that fires it.
cat >"$work/prom_consistency.py" <<'EOF'
import sys, yaml
prom = yaml.safe_load(open("deploy/prometheus/prometheus.yml"))
services = set(yaml.safe_load(open(sys.argv[1]))["services"])
for job in prom["scrape_configs"]:
    for sc in job.get("static_configs", []):
        for t in sc["targets"]:
            host = t.rsplit(":", 1)[0]
            if host != "localhost" and host not in services:
                sys.exit(f"scrape target {t} of job {job['job_name']} is no compose service")
alerts = {r["alert"] for g in yaml.safe_load(open("deploy/prometheus/alerts.yml"))["groups"] for r in g["rules"] if "alert" in r}
tests = yaml.safe_load(open("deploy/prometheus/alerts_test.yml"))["tests"]
fired = {t["alertname"] for c in tests for t in c.get("alert_rule_test", []) if t.get("exp_alerts")}
quiet = {t["alertname"] for c in tests for t in c.get("alert_rule_test", []) if not t.get("exp_alerts")}
for a in sorted(alerts):
    if a not in fired or a not in quiet:
        sys.exit(f"alert {a} lacks a unit test where it fires and one where it is quiet")
print(f"{len(alerts)} alerts, each tested firing and quiet")
EOF
check "scrape targets are compose services; every alert tested firing and quiet" \
  "$py" "$work/prom_consistency.py" "$work/compose-ha.yaml"

echo "== grafana dashboard"
# Parses the JSON, checks its structure and metric names, and writes every panel query as a
# recording rule so that promtool parses each PromQL expression.
cat >"$work/dashboard.py" <<'EOF'
import json, re, sys, yaml
# The metric names of issue 10 §1 (histograms also as _bucket, _sum, _count).
ISSUE_METRICS = {
    "gpo_step_duration_seconds", "gpo_allreduce_bytes_total", "gpo_episodes_total",
    "gpo_train_loss", "gpo_alignment_score", "gpo_workers", "gpo_membership_generation",
    "gpo_worker_restarts_total", "gpo_steps_aborted_total", "gpo_recoveries_total",
    "gpo_fenced_messages_total", "gpo_last_step_timestamp_seconds", "gpo_embed_tokens_total",
    "gpo_embed_duration_seconds", "gpo_auth_failures_total", "gpo_build_info",
}
HISTOGRAMS = {"gpo_step_duration_seconds", "gpo_embed_duration_seconds"}
def names(expr):
    out = set()
    for m in re.findall(r"\bgpo_[a-z0-9_]+", expr):
        base = re.sub(r"_(bucket|sum|count)$", "", m)
        out.add(base if base in HISTOGRAMS else m)
    return out
def known(expr, where):
    for n in names(expr):
        if n not in ISSUE_METRICS:
            sys.exit(f"{where}: {n} is not a metric name of issue 10 §1")

d = json.load(open(sys.argv[1]))
assert d.get("uid") and d.get("title"), "dashboard needs uid and title"
tvars = {v["name"]: v for v in d["templating"]["list"]}
assert tvars.get("datasource", {}).get("type") == "datasource", "needs a datasource variable"
for v in tvars.values():
    if v["type"] == "query":
        known(v["definition"], f"variable {v['name']}")
rules, ids, used = [], set(), set()
for p in d["panels"]:
    pid = p["id"]
    assert pid not in ids, f"duplicate panel id {pid}"
    ids.add(pid)
    assert p.get("title"), f"panel {pid} has no title"
    assert p.get("datasource", {}).get("uid") == "${datasource}", f"panel {pid} does not use $datasource"
    g = p["gridPos"]
    assert all(k in g for k in "xywh") and g["x"] + g["w"] <= 24, f"panel {pid} gridPos"
    assert p.get("targets"), f"panel {pid} ({p['title']}) has no query"
    for t in p["targets"]:
        expr = t["expr"]
        known(expr, f"panel {pid} ({p['title']})")
        used |= names(expr)
        e = expr.replace("$__rate_interval", "5m").replace("$namespace", ".*")
        assert "$" not in e, f"panel {pid}: unknown variable in {expr}"
        rules.append({"record": f"dashboard:panel_{pid}:{t['refId'].lower()}", "expr": e})
# What the dashboard must show (issue 10 §5), with the labels it breaks them down by.
need = {
    "gpo_step_duration_seconds": "phase", "gpo_train_loss": None, "gpo_alignment_score": "split",
    "gpo_workers": "state", "gpo_embed_tokens_total": None, "gpo_recoveries_total": None,
}
allexpr = " ".join(t["expr"] + " " + t.get("legendFormat", "") for p in d["panels"] for t in p["targets"])
for m, label in need.items():
    assert m in used, f"no panel shows {m}"
    if label:
        assert label in allexpr, f"no panel breaks {m} down by {label}"
yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, open(sys.argv[2], "w"))
for f in ["deploy/prometheus/alerts.yml"]:
    for g in yaml.safe_load(open(f))["groups"]:
        for r in g["rules"]:
            known(r["expr"], f"{f}: {r.get('alert')}")
print(f"{len(d['panels'])} panels, {len(rules)} queries, metric names all from issue 10 §1")
EOF
check "dashboard JSON structure and metric names (deploy/grafana/dashboards/gpo.json)" \
  "$py" "$work/dashboard.py" deploy/grafana/dashboards/gpo.json "$work/dashboard_rules.yml"
check "promtool check rules on every dashboard query" promtool check rules "$work/dashboard_rules.yml"
check "jq parses the dashboard" jq -e '.panels | length > 0' deploy/grafana/dashboards/gpo.json
check "helm/gpo/files/alerts.yml is deploy/prometheus/alerts.yml" cmp deploy/prometheus/alerts.yml $chart/files/alerts.yml
check "helm/gpo/files/gpo.json is deploy/grafana/dashboards/gpo.json" cmp deploy/grafana/dashboards/gpo.json $chart/files/gpo.json

echo "== helm"
check "helm lint --strict $chart" helm lint --strict $chart
check "helm lint --strict $chart -f $chart/ci/gpu-tls-values.yaml" helm lint --strict $chart -f $chart/ci/gpu-tls-values.yaml
check "helm template (default values)" sh -c "helm template gpo $chart --namespace ml > '$work/default.yaml'"
check "helm template (ci/gpu-tls-values.yaml)" \
  sh -c "helm template gpo $chart --namespace ml -f $chart/ci/gpu-tls-values.yaml > '$work/gpu-tls.yaml'"
check_fails "helm template refuses 2 coordinators without etcd" helm template gpo $chart --set coordinator.replicas=2
check_fails "helm template refuses values outside values.schema.json" helm template gpo $chart --set run.workers=0

# kubernetes-validate has no schema for the Prometheus Operator's kinds: they are split out
# and only counted; everything else is validated strictly.
cat >"$work/split.py" <<'EOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
crd = [d for d in docs if d["apiVersion"].startswith("monitoring.coreos.com/")]
core = [d for d in docs if d not in crd]
yaml.safe_dump_all(core, open(sys.argv[2], "w"))
print(f"{len(core)} objects to validate; not validated (no schema): " +
      (", ".join(f"{d['kind']}/{d['metadata']['name']}" for d in crd) or "none"))
EOF
for v in default gpu-tls; do
  if [ -s "$work/$v.yaml" ]; then
    "$py" "$work/split.py" "$work/$v.yaml" "$work/$v-core.yaml" | sed 's/^/      /'
    check "kubernetes-validate --strict ($v render)" kubernetes-validate --strict --quiet "$work/$v-core.yaml"
  fi
done
# The validator itself rejects an unknown field (so a pass above means something).
cat >"$work/bad.yaml" <<'EOF'
apiVersion: v1
kind: Service
metadata: {name: bad}
spec:
  ports: [{port: 1}]
  notAField: true
EOF
check_fails "kubernetes-validate --strict rejects an unknown field (self-test)" kubernetes-validate --strict --quiet "$work/bad.yaml"

echo "== gpo flags the manifests pass"
# Flags of `gpo coordinator` and `gpo worker` as the source declares them (clap derive:
# field foo_bar -> --foo-bar), against what compose and the chart pass. Flags that other
# issues are adding are allowed only as pending, and never in the default configuration.
cat >"$work/flags.py" <<'EOF'
import re, shlex, sys, yaml
PENDING = {  # flag -> the issue that adds it
}
def flags_of(*files):
    out = set()
    for f in files:
        src = open(f).read()
        for attr, field in re.findall(r"#\[arg\(([^\]]*)\)\]\s*(?:///[^\n]*\n\s*)*(?:pub )?(\w+):", src):
            if re.search(r"\blong\b", attr):
                m = re.search(r'long\s*=\s*"([^"]+)"', attr)
                out.add("--" + (m.group(1) if m else field.replace("_", "-")))
    return out
known = {
    "coordinator": flags_of("src/cmd/coordinator/mod.rs", "src/cmd/train.rs", "src/inputs.rs", "src/cmd/credentials.rs"),
    "worker": flags_of("src/cmd/worker.rs", "src/cmd/credentials.rs"),
}
assert "--listen" in known["coordinator"] and "--ring-bind" in known["worker"], known
def commands_k8s(path):
    for d in yaml.safe_load_all(open(path)):
        if not d or d["kind"] not in ("Deployment", "StatefulSet"):
            continue
        for c in d["spec"]["template"]["spec"]["containers"]:
            args = c.get("args") or []
            if args and args[0] in known:
                probes = [p for p in ("livenessProbe", "readinessProbe", "startupProbe") if "httpGet" in c.get(p, {})]
                yield f"{path.rsplit('/', 1)[-1]}:{d['metadata']['name']}", args, probes
def commands_compose(path, default):
    for name, s in yaml.safe_load(open(path))["services"].items():
        # docker-compose 1.29's `config` lists every profile's services: the default
        # configuration is the services without a profile.
        if default and s.get("profiles"):
            continue
        cmd = s.get("command")
        if cmd:
            args = shlex.split(cmd) if isinstance(cmd, str) else cmd
            if args[0] in known:
                yield f"{path.rsplit('/', 1)[-1]}:{name}", args, []
bad, pending_used, landed = [], {}, set()
for kind, path in [(k, p) for k, p in (a.split("=", 1) for a in sys.argv[1:])]:
    gen = commands_k8s(path) if kind.startswith("k8s") else commands_compose(path, kind.endswith("default"))
    for where, args, http_probes in gen:
        sub = args[0]
        for a in args[1:]:
            if not a.startswith("--"):
                continue
            flag = a.split("=", 1)[0]
            if flag in known[sub]:
                if flag in PENDING:
                    landed.add(flag)
                continue
            if flag in PENDING:
                pending_used.setdefault(flag, set()).add(where)
                if kind.endswith("default"):
                    bad.append(f"{where}: pending flag {flag} ({PENDING[flag]}) in the default configuration")
            else:
                bad.append(f"{where}: `gpo {sub}` has no flag {flag}")
for f in sorted(landed):
    print(f"note: {f} is in the binary now; deploy/README.md's pending list can lose it")
for f, where in sorted(pending_used.items()):
    print(f"pending {f} ({PENDING[f]}): only where switched on ({len(where)} places)")
if bad:
    sys.exit("\n".join(bad))
print("every flag exists in the source, or is pending and off by default")
EOF
check "flags exist in src/cmd (pending ones off by default)" "$py" "$work/flags.py" \
  "k8s-default=$work/default.yaml" "k8s-pending=$work/gpu-tls.yaml" \
  "compose-default=$work/compose-default.yaml" "compose-pending=$work/compose-pending.yaml"
[ "${failed[*]}" = "${failed[*]%flags exist*}" ] && sed 's/^/      /' "$work/out"

echo "== checked in $(( $(date +%s) - start )) s"
if [ ${#failed[@]} -gt 0 ]; then
  echo "check_deploy: ${#failed[@]} check(s) failed: ${failed[*]}" >&2
  exit 1
fi
echo "check_deploy: all checks passed"
