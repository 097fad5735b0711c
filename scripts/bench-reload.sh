#!/usr/bin/env bash
# The reload-under-load benchmark, one command on a fresh machine:
#   scripts/bench-reload.sh
# Builds the release binary, serves SmolLM2 from a scratch models root holding the shipped
# GGUF (a.gguf) and a perturbed copy (b.gguf, a real second version), then runs, back to back,
#   1. steady:     CLIENTS streaming clients for DURATION s, no reload;
#   2. reloads:    the same while a reload alternates a <-> b every RELOAD_EVERY s;
#   3. preserving: the same with a memory budget that fits one version only, so each reload
#                  takes the resource-preserving path.
# Each run writes OUT/NAME.json, OUT/NAME.md and OUT/NAME.svg; OUT/summary.md joins the three.
# Environment: CLIENTS (8), DURATION (300), RELOAD_EVERY (3), MAX_TOKENS (64), OUT
# (target/bench), PORT (50151), METRICS_PORT (9564), DEVICE (cpu; cuda[:N] builds with the
# cuda feature and serves on that GPU, see scripts/gpu-check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS=${CLIENTS:-8}
DURATION=${DURATION:-300}
RELOAD_EVERY=${RELOAD_EVERY:-3}
MAX_TOKENS=${MAX_TOKENS:-64}
OUT=${OUT:-target/bench}
PORT=${PORT:-50151}
METRICS_PORT=${METRICS_PORT:-9564}
TOKEN=bench-token
DEVICE=${DEVICE:-cpu}
features=()
[[ "$DEVICE" == cuda* ]] && features=(--features cuda)

scripts/fetch-models.sh
cargo build --release --quiet "${features[@]}"
bin=target/release/swapd
mkdir -p "$OUT"

work=$(mktemp -d)
server=""
cleanup() {
    [[ -n "$server" ]] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/models/smollm2"
cp models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf "$work/models/smollm2/a.gguf"
"$bin" bench perturb "$work/models/smollm2/a.gguf" "$work/models/smollm2/b.gguf" >/dev/null
sha_a=$(sha256sum "$work/models/smollm2/a.gguf" | cut -d' ' -f1)
sha_b=$(sha256sum "$work/models/smollm2/b.gguf" | cut -d' ' -f1)
cat >"$work/models/models.toml" <<TOML
[[model]]
name = "smollm2-135m-instruct"
kind = "llm"
source = "smollm2/a.gguf"
[model.sha256]
"a.gguf" = "$sha_a"
[model.defaults]
context_length = 2048
TOML

start_server() {
    "$bin" serve --device "$DEVICE" --models-root "$work/models" --state-dir "$work/state-$1" \
        --listen "127.0.0.1:$PORT" --metrics-listen "127.0.0.1:$METRICS_PORT" \
        --admin-token "$TOKEN" --max-concurrent "$CLIENTS" --max-queue 64 "${@:2}" \
        >"$OUT/server-$1.log" 2>&1 &
    server=$!
    for _ in $(seq 1 600); do
        if "$bin" models --server "http://127.0.0.1:$PORT" >/dev/null 2>&1; then return; fi
        kill -0 "$server" 2>/dev/null || { cat "$OUT/server-$1.log"; exit 1; }
        sleep 0.1
    done
    echo "the server did not start" >&2
    exit 1
}
stop_server() {
    kill -TERM "$server"
    wait "$server" || true
    server=""
}
bench() {
    local name=$1
    shift
    "$bin" bench reload --server "http://127.0.0.1:$PORT" --token "$TOKEN" \
        --metrics "http://127.0.0.1:$METRICS_PORT/metrics" --clients "$CLIENTS" \
        --duration "$DURATION" --max-tokens "$MAX_TOKENS" --label "$name" --out "$OUT/$name" \
        --version "smollm2/a.gguf=$sha_a" --version "smollm2/b.gguf=$sha_b" "$@"
}

status=0
start_server main
bench steady --reload-every 0 || status=1
bench reloads --reload-every "$RELOAD_EVERY" || status=1
stop_server
# One version of SmolLM2 holds ~210 MB of weights: a 300 MB budget fits one, not two.
start_server preserving --memory-budget-bytes 300000000 --memory-policy resource-preserving
bench preserving --reload-every "$RELOAD_EVERY" --resource-preserving || status=1
stop_server

{
    echo "## Reload under load: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
    echo
    echo "\`CLIENTS=$CLIENTS DURATION=$DURATION RELOAD_EVERY=$RELOAD_EVERY MAX_TOKENS=$MAX_TOKENS scripts/bench-reload.sh\`"
    echo
    cat "$OUT/steady.md" "$OUT/reloads.md" "$OUT/preserving.md"
} >"$OUT/summary.md"
echo "summary: $OUT/summary.md (plots: $OUT/*.svg)"
exit $status
