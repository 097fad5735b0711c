#!/usr/bin/env bash
# Continuous batching, measured side by side in one run (one command, a fresh machine is
# fine; needs network for PyPI once):
#   scripts/bench-batching.sh
# On SmolLM2-135M-Instruct Q4_1, greedy, THREADS threads everywhere:
#   - swapd over gRPC: N concurrent streaming clients (SCALING, "1 2 4 8 16") for DURATION s
#     each: aggregate decode tokens/s, and per stream time to first token and inter-token
#     latency p50/p99 (`swapd bench reload` with no reloads);
#   - the same with RELOAD_CLIENTS (8) clients while the model reloads every RELOAD_EVERY s
#     between two real versions (the GGUF and a perturbed copy): inter-token p99 during the
#     reloads against steady, failed requests, mixed streams;
#   - llama.cpp decoding the same numbers of sequences in one multi-sequence batch
#     (`llama_batch` with N sequence ids, scripts/peers/llama_cpp_batched.py), as its
#     batched-bench does, in the peer virtualenv (target/peers/venv).
# Writes OUT/*.json and OUT/batching.md.
# Environment: THREADS (nproc), SCALING ("1 2 4 8 16"), DURATION (20), RELOAD_CLIENTS (8),
# RELOAD_DURATION (300), RELOAD_EVERY (5), MAX_TOKENS (64), DECODE (64, llama.cpp's steps),
# OUT (target/bench/batching), PORT (50171), METRICS_PORT (9584), BIN (build release).
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-$(nproc)}
SCALING=${SCALING:-1 2 4 8 16}
DURATION=${DURATION:-20}
RELOAD_CLIENTS=${RELOAD_CLIENTS:-8}
RELOAD_DURATION=${RELOAD_DURATION:-300}
RELOAD_EVERY=${RELOAD_EVERY:-5}
MAX_TOKENS=${MAX_TOKENS:-64}
DECODE=${DECODE:-64}
OUT=${OUT:-target/bench/batching}
PORT=${PORT:-50171}
METRICS_PORT=${METRICS_PORT:-9584}
TOKEN=bench-token
GGUF=models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
export RAYON_NUM_THREADS=$THREADS

source scripts/bench-lib.sh
models_and_binary
peer_venv
scratch
max=16
for n in $SCALING; do ((n > max)) && max=$n; done

two_versions "$work/models" smollm2-135m-instruct
start_server "$OUT/server.log" "$PORT" "$METRICS_PORT" --models-root "$work/models" \
    --state-dir "$work/state" --max-concurrent "$max" --max-batch "$max"
"$bin" generate --server "$server_url" --max-tokens 8 "Hello" >/dev/null
for n in $SCALING; do
    echo "== swapd: $n concurrent streams"
    "$bin" bench reload --server "$server_url" --clients "$n" --reload-every 0 \
        --max-tokens "$MAX_TOKENS" --duration "$DURATION" --label "streams-$n" \
        --out "$OUT/streams-$n" >/dev/null
done
echo "== swapd: $RELOAD_CLIENTS streams through reloads every ${RELOAD_EVERY}s"
"$bin" bench reload --server "$server_url" --token "$TOKEN" \
    --metrics "http://127.0.0.1:$METRICS_PORT/metrics" --clients "$RELOAD_CLIENTS" \
    --max-tokens "$MAX_TOKENS" --duration "$RELOAD_DURATION" --reload-every "$RELOAD_EVERY" \
    --label reloads --out "$OUT/reloads" \
    --version "smollm2/a.gguf=$sha_a" --version "smollm2/b.gguf=$sha_b" >/dev/null
curl -s "http://127.0.0.1:$METRICS_PORT/metrics" >"$OUT/metrics.txt" 2>/dev/null || true
stop_server

echo "== llama.cpp: the same sequences in one multi-sequence batch"
"$venv/bin/python" scripts/peers/llama_cpp_batched.py "$GGUF" "$THREADS" "$DECODE" \
    "$SCALING" "Once upon a time, in a quiet town," >"$OUT/llama.cpp-batched.json"

python3 - "$OUT" "$SCALING" "$THREADS" >"$OUT/batching.md" <<'PY'
import json, sys
out, scaling, threads = sys.argv[1], [int(n) for n in sys.argv[2].split()], sys.argv[3]
llama = {r["streams"]: r for r in json.load(open(f"{out}/llama.cpp-batched.json"))["results"]}
rows = []
one = None
for n in scaling:
    s = json.load(open(f"{out}/streams-{n}.json"))["steady"]
    one = one or s["aggregate_tokens_per_s"]
    l = llama.get(n, {})
    rows.append(
        f"| {n} | {s['aggregate_tokens_per_s']:.1f} | {s['aggregate_tokens_per_s'] / one:.2f}x "
        f"| {s['ttft_ms_p50']:.0f} / {s['ttft_ms_p99']:.0f} | {s['itl_ms_p50']:.1f} / {s['itl_ms_p99']:.1f} "
        f"| {l.get('decode_tok_s', 0):.1f} | {l.get('step_p50_ms', 0):.1f} / {l.get('step_p99_ms', 0):.1f} "
        f"| {s['aggregate_tokens_per_s'] / l['decode_tok_s'] if l else 0:.2f} |"
    )
r = json.load(open(f"{out}/reloads.json"))
print(f"SmolLM2-135M Q4_1, {threads} threads, greedy; swapd over gRPC (streams of up to the "
      "configured max_tokens, end-of-sequence honoured), llama.cpp in one multi-sequence batch.\n")
print("| streams | swapd tok/s | vs 1 | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) "
      "| llama.cpp batched tok/s | llama.cpp step p50 / p99 (ms) | swapd / llama.cpp |")
print("|---|---|---|---|---|---|---|---|")
print("\n".join(rows))
st, dr = r["steady"], r["during_reload"]
print(f"\nReloads under {r['clients']} batched streams: {r['reloads_committed']}/{r['reloads']} "
      f"committed, {r['failed_requests']} failed and {r['mixed_version_streams']} mixed of "
      f"{r['requests']} requests; inter-token p99 {dr['itl_ms_p99']:.1f} ms during reloads vs "
      f"{st['itl_ms_p99']:.1f} ms steady ({dr['itl_ms_p99'] / max(st['itl_ms_p99'], 1e-9):.2f}x).")
PY
cat "$OUT/batching.md"
