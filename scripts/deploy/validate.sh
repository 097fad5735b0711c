#!/usr/bin/env bash
# Validates the deploy files, offline once the validator is installed:
#   - every Kubernetes manifest against the schemas of Kubernetes $K8S_VERSION, strictly
#     (an unknown or misspelt field is an error), with kubernetes-validate pinned in
#     requirements.txt and installed into a scratch virtualenv under target/;
#   - the shutdown arithmetic: terminationGracePeriodSeconds > shutdown_grace_secs + preStop sleep,
#     maxUnavailable 0, gRPC probes, the admin token from a Secret;
#   - the systemd unit with `systemd-analyze verify` (any diagnostic fails), if available,
#     and its TimeoutStopSec > shutdown_grace_secs.
# Usage: scripts/deploy/validate.sh [MANIFEST.yaml...]   (default: scripts/deploy/kubernetes/*.yaml)
# Exits non-zero on the first kind of check that fails.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
K8S_VERSION="${K8S_VERSION:-1.31.0}"
venv="${SWAPD_DEPLOY_VENV:-$root/target/deploy-venv}"

if (($#)); then
    manifests=("$@")
else
    manifests=("$here"/kubernetes/*.yaml)
fi

# The virtualenv is rebuilt whenever requirements.txt changes.
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
if [[ ! -x "$venv/bin/kubernetes-validate" || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
    echo "== installing the validator into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps \
        -r "$here/requirements.txt"
    echo "$want" >"$stamp"
fi

echo "== kubernetes-validate --strict -k $K8S_VERSION"
"$venv/bin/kubernetes-validate" --strict --no-warn -k "$K8S_VERSION" "${manifests[@]}"

echo "== shutdown and rollout settings"
"$venv/bin/python" - "${manifests[@]}" <<'PY'
import sys, tomllib, yaml

docs = []
for path in sys.argv[1:]:
    with open(path) as f:
        docs += [(path, d) for d in yaml.safe_load_all(f) if d]

grace, grace_from = 30.0, "the server's default"
for path, d in docs:
    if d.get("kind") == "ConfigMap" and "swapd.toml" in d.get("data", {}):
        cfg = tomllib.loads(d["data"]["swapd.toml"])
        if "shutdown_grace_secs" in cfg:
            grace = float(cfg["shutdown_grace_secs"])
            grace_from = f"{path}: ConfigMap {d['metadata']['name']}"

errors = []
for path, d in docs:
    if d.get("kind") != "Deployment":
        continue
    name = f"{path}: Deployment {d['metadata']['name']}"
    spec = d["spec"]
    ru = spec.get("strategy", {}).get("rollingUpdate", {})
    if spec.get("strategy", {}).get("type") != "RollingUpdate" or ru.get("maxUnavailable") not in (0, "0%"):
        errors.append(f"{name}: strategy must be RollingUpdate with maxUnavailable 0")
    pod = spec["template"]["spec"]
    tgp = pod.get("terminationGracePeriodSeconds", 30)
    for c in pod["containers"]:
        pre = c.get("lifecycle", {}).get("preStop", {})
        sleep = pre.get("sleep", {}).get("seconds", 0)
        if tgp <= grace + sleep:
            errors.append(
                f"{name}: terminationGracePeriodSeconds {tgp} must exceed shutdown_grace_secs {grace:g} "
                f"({grace_from}) + preStop sleep {sleep} s")
        for probe in ("readinessProbe", "livenessProbe"):
            if "grpc" not in c.get(probe, {}):
                errors.append(f"{name}: container {c['name']}: {probe} must be a gRPC health probe")
        token = [e for e in c.get("env", []) if e.get("name") == "SWAPD_ADMIN_TOKEN"]
        if not token or "secretKeyRef" not in token[0].get("valueFrom", {}):
            errors.append(f"{name}: container {c['name']}: SWAPD_ADMIN_TOKEN must come from a Secret")
    print(f"{name}: terminationGracePeriodSeconds {tgp}, shutdown_grace_secs {grace:g}")
for e in errors:
    print(f"ERROR {e}", file=sys.stderr)
sys.exit(1 if errors else 0)
PY

unit="$here/systemd/swapd.service"
echo "== systemd unit $unit"
stop="$(sed -n 's/^TimeoutStopSec=\([0-9]*\)$/\1/p' "$unit")"
if [[ -z "$stop" ]] || ((stop <= 30)); then
    echo "ERROR $unit: TimeoutStopSec (${stop:-unset}) must be a number of seconds above shutdown_grace_secs (30)" >&2
    exit 1
fi
if command -v systemd-analyze >/dev/null; then
    # verify insists that ExecStart's binary exists: check a copy that runs a binary that does.
    scratch="$(mktemp -d)"
    trap 'rm -rf "$scratch"' EXIT
    bin="$root/target/release/swapd"
    [[ -x "$bin" ]] || bin="$root/target/debug/swapd"
    [[ -x "$bin" ]] || bin="$(command -v true)"
    sed "s#/usr/local/bin/swapd#$bin#" "$unit" >"$scratch/swapd.service"
    out="$(cd "$scratch" && systemd-analyze verify ./swapd.service 2>&1)" || { echo "$out" >&2; exit 1; }
    if [[ -n "$out" ]]; then
        echo "$out" >&2
        echo "ERROR $unit: systemd-analyze verify reported the above" >&2
        exit 1
    fi
    echo "systemd-analyze verify: ok"
else
    echo "systemd-analyze not found: skipping the unit's verify"
fi
echo "deploy files: ok"
