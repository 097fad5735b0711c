#!/usr/bin/env bash
# The peer comparison, one command on a fresh machine (needs network for PyPI once):
#   scripts/bench-peers.sh
# On SmolLM2-135M-Instruct Q4_1, the same prompts, greedy, end-of-sequence ignored, THREADS
# threads everywhere, it measures side by side, PASSES times in turn:
#   - swapd serving it over gRPC (a client's view: prefill = prompt tokens / time to first
#     token, decode = tokens / time from first to last token);
#   - the bare decode loop: swapd's model code in one process, no server, no gRPC;
#   - candle-transformers' quantized_llama (candle's own kernels), in one process;
#   - llama.cpp through llama-cpp-python, built from source into a scratch virtualenv
#     (target/peers/venv; never a test dependency);
# then the memory floor (weight bytes / this machine's measured read bandwidth) and the
# aggregate decode tokens/s of 1, 2, 4 and 8 concurrent streams against the server.
# Writes OUT/*.json and OUT/peers.md.
# Environment: THREADS (nproc), DECODE (128 tokens), ROUNDS (5 per pass), PASSES (2),
# SCALING (1 2 4 8), SCALING_DURATION (30 s), OUT (target/bench/peers), PORT (50161),
# METRICS_PORT (9574), LLAMA_CPP_PYTHON (0.3.36), LLAMA_CMAKE_ARGS (see peer_venv in bench-lib.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-$(nproc)}
DECODE=${DECODE:-128}
ROUNDS=${ROUNDS:-5}
PASSES=${PASSES:-2}
SCALING=${SCALING:-1 2 4 8}
SCALING_DURATION=${SCALING_DURATION:-30}
OUT=${OUT:-target/bench/peers}
PORT=${PORT:-50161}
METRICS_PORT=${METRICS_PORT:-9574}
LLAMA_CPP_PYTHON=${LLAMA_CPP_PYTHON:-0.3.36}
TOKEN=bench-token
GGUF=models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
SHORT_PROMPT="Once upon a time"
export RAYON_NUM_THREADS=$THREADS

scripts/fetch-models.sh
cargo build --release --quiet
bin=target/release/swapd
mkdir -p "$OUT"

source scripts/bench-lib.sh
peer_venv
trap stop_server EXIT
# The server runs only while it is measured, so each engine has the machine to itself.
serve() {
    start_server "$OUT/server.log" "$PORT" "$METRICS_PORT" --models-root models --max-concurrent 8
}

for pass in $(seq 1 "$PASSES"); do
    echo "== pass $pass/$PASSES"
    serve
    "$bin" bench decode --engine server --server "$server_url" --gguf "$GGUF" \
        --decode-tokens "$DECODE" --rounds "$ROUNDS" >"$OUT/server-$pass.json"
    stop_server
    for engine in local candle; do
        "$bin" bench decode --engine "$engine" --gguf "$GGUF" \
            --decode-tokens "$DECODE" --rounds "$ROUNDS" >"$OUT/$engine-$pass.json"
    done
    "$venv/bin/python" scripts/peers/llama_cpp_decode.py "$GGUF" "$THREADS" "$DECODE" \
        "$ROUNDS" benches/data/long-prompt.txt "$SHORT_PROMPT" >"$OUT/llama.cpp-$pass.json"
done

echo "== memory bandwidth"
"$bin" bench membw --gguf "$GGUF" --threads "$THREADS" >"$OUT/membw.json"

serve
for n in $SCALING; do
    echo "== $n concurrent streams"
    "$bin" bench reload --server "$server_url" --clients "$n" --reload-every 0 \
        --duration "$SCALING_DURATION" --label "streams-$n" --out "$OUT/streams-$n" >/dev/null
done
stop_server

# Where decode time goes: a sampling profile of the bare loop (perf's cpu-clock event, which
# works without hardware counters), self time per function.
if command -v perf >/dev/null; then
    echo "== profile (perf)"
    perf record -q -e cpu-clock -F 999 -g -o "$OUT/perf.data" -- "$bin" bench decode \
        --engine local --gguf "$GGUF" --decode-tokens "$DECODE" --rounds 2 >/dev/null 2>&1
    perf report -q -i "$OUT/perf.data" --no-children --sort symbol --fields overhead,sym \
        --percent-limit 0.7 --stdio -g none 2>/dev/null |
        sed -e 's/[[:space:]-]*$//' | grep -v '^$' | sort -rn >"$OUT/profile.txt"
else
    echo "perf not found (Debian: linux-perf): no profile" | tee "$OUT/profile.txt"
fi

python3 scripts/peers/summarize.py "$OUT" "$THREADS" "$SCALING" \
    "DECODE=$DECODE ROUNDS=$ROUNDS PASSES=$PASSES SCALING_DURATION=$SCALING_DURATION THREADS=$THREADS scripts/bench-peers.sh" \
    >"$OUT/peers.md"
cat "$OUT/peers.md"
