#!/usr/bin/env bash
# The reload-under-load benchmark, one command on a fresh machine:
#   scripts/bench-reload.sh
# Builds the release binary, serves SmolLM2 from a scratch models root holding the shipped
# GGUF (a.gguf) and a perturbed copy (b.gguf, a real second version), then runs, back to back,
#   1. steady:     CLIENTS streaming clients for STEADY_DURATION s, no reload;
#   2. reloads:    CLIENTS clients for DURATION s while a reload alternates a <-> b every
#                  RELOAD_EVERY s (a reload takes ~5.6 s on 2 cores, most of it the drain of
#                  64-token streams, so 600 s gives over 100 reloads);
#   3. preserving: the same for PRESERVING_DURATION s with a memory budget that fits one
#                  version only, so each reload takes the resource-preserving path.
# Each run writes OUT/NAME.json, OUT/NAME.md and OUT/NAME.svg; OUT/summary.md joins the three.
# Environment: CLIENTS (8), STEADY_DURATION (120), DURATION (600), PRESERVING_DURATION (300),
# RELOAD_EVERY (3), MAX_TOKENS (64), OUT (target/bench), PORT (50151), METRICS_PORT (9564),
# DEVICE (cpu; cuda[:N] builds with the cuda feature and serves on that GPU, see
# scripts/gpu-check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS=${CLIENTS:-8}
STEADY_DURATION=${STEADY_DURATION:-120}
DURATION=${DURATION:-600}
PRESERVING_DURATION=${PRESERVING_DURATION:-300}
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

source scripts/bench-lib.sh
scratch

two_versions "$work/models" smollm2-135m-instruct

start_server_for() {
    start_server "$OUT/server-$1.log" "$PORT" "$METRICS_PORT" --models-root "$work/models" \
        --state-dir "$work/state-$1" --max-concurrent "$CLIENTS" --max-queue 64 "${@:2}"
}
bench() {
    local name=$1
    shift
    "$bin" bench reload --server "$server_url" --token "$TOKEN" \
        --metrics "http://127.0.0.1:$METRICS_PORT/metrics" --clients "$CLIENTS" \
        --max-tokens "$MAX_TOKENS" --label "$name" --out "$OUT/$name" \
        --version "smollm2/a.gguf=$sha_a" --version "smollm2/b.gguf=$sha_b" "$@"
}

status=0
start_server_for main
bench steady --duration "$STEADY_DURATION" --reload-every 0 || status=1
bench reloads --duration "$DURATION" --reload-every "$RELOAD_EVERY" || status=1
stop_server
# A budget that fits one version of SmolLM2, not two: a version holds ~97 MB on the CPU,
# where the embedding table stays packed, and ~210 MB on a GPU, with candle's f32 copy of it.
budget=150000000
[[ "$DEVICE" == cuda* ]] && budget=300000000
start_server_for preserving --memory-budget-bytes "$budget" --memory-policy resource-preserving
bench preserving --duration "$PRESERVING_DURATION" --reload-every "$RELOAD_EVERY" \
    --resource-preserving || status=1
stop_server

{
    echo "## Reload under load: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
    echo
    echo "\`CLIENTS=$CLIENTS STEADY_DURATION=$STEADY_DURATION DURATION=$DURATION PRESERVING_DURATION=$PRESERVING_DURATION RELOAD_EVERY=$RELOAD_EVERY MAX_TOKENS=$MAX_TOKENS scripts/bench-reload.sh\`"
    echo
    cat "$OUT/steady.md" "$OUT/reloads.md" "$OUT/preserving.md"
} >"$OUT/summary.md"
echo "summary: $OUT/summary.md (plots: $OUT/*.svg)"
exit $status
