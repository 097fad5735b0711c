#!/usr/bin/env bash
# The device run: what a lent GPU machine checks, from the bundle scripts/gpu-bundle.sh made
# (carry target/gpu-bundle). Needs nothing that machine lacks: no network, no Rust, no model
# file (random-weight models are written there by `swapd bench synth`); PyTorch's CUDA
# libraries are found through its python3. One summary, $OUT/summary.md, and at most 8 files.
#
#   1. the driver's CUDA version against the toolkit's the binary was built with (a driver
#      older than the toolkit cannot compile candle's PTX: stop there);
#   2. the binary's libraries resolve (ldd, and LD_BIND_NOW=1 to run it);
#   3. `swapd bench parity`: one model's logits on the device against the CPU's along greedy
#      paths, and batched against alone on the device (tolerance 2% of the logit range;
#      top-1 disagreements only where the CPU's margin is under 0.2);
#   4. the same models served on the device and on the CPU side by side: greedy text and
#      embeddings compared over gRPC;
#   5. RELOADS reloads alternating --keep-previous and not, device memory read from swapd's
#      cudarc figures and nvidia-smi before, with two versions resident and after each drain;
#      memory after the drains must not grow;
#   6. decode tokens/s with 1, 8 and 16 concurrent streams.
#
# DEVICE=cpu is a dry run of every step on the CPU (CI runs it with BIN=target/debug/swapd
# and SHAPE=tiny), so the script cannot rot between lent machines.
#
# Variables: DEVICE (cuda, cuda:N or cpu), BIN (a swapd binary; default: the bundle's),
# BUNDLE (target/gpu-bundle), OUT (target/gpu-device; the device tool sets it), SHAPE
# (smollm2: SmolLM2-135M's shape; or tiny), RELOADS (6), DURATION (seconds per streams
# run, 15), STREAMS ("1 8 16"), PORT (50271).
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
BUNDLE=${BUNDLE:-target/gpu-bundle}
OUT=${OUT:-target/gpu-device}
SHAPE=${SHAPE:-smollm2}
RELOADS=${RELOADS:-6}
DURATION=${DURATION:-15}
STREAMS=${STREAMS:-1 8 16}
PORT=${PORT:-50271}
TOKEN=gpu-device-token
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
summary="$OUT/summary.md"
: >"$summary"
say() { echo "$*" | tee -a "$summary"; }
status=0
fail() {
    say "**FAILED**: $*"
    status=1
}
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
    wait 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
case "$DEVICE" in
cpu) gpu=0 ;;
cuda | cuda:*) gpu=1 ;;
*)
    echo "DEVICE=$DEVICE: expected cuda, cuda:N or cpu" >&2
    exit 2
    ;;
esac
index=0
[[ "$DEVICE" == cuda:* ]] && index=${DEVICE#cuda:}
json() { python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))" "$@"; }
started=$SECONDS

say "# scripts/gpu-device.sh, DEVICE=$DEVICE, SHAPE=$SHAPE, $(date -u +%Y-%m-%dT%H:%MZ)"
say ""

# The binary: the bundle's, unpacked and checked against its recorded digest.
if [[ -n "${BIN:-}" ]]; then
    bin=$BIN
    say "binary: $bin (given)"
else
    [[ -f "$BUNDLE/swapd.xz" && -f "$BUNDLE/bundle.json" ]] || {
        fail "no bundle at $BUNDLE (make it with scripts/gpu-bundle.sh and carry it)"
        exit 1
    }
    bin="$work/swapd"
    if command -v xz >/dev/null; then
        xz -dc "$BUNDLE/swapd.xz" >"$bin"
    else
        python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" \
            "$BUNDLE/swapd.xz" "$bin"
    fi
    chmod +x "$bin"
    want=$(json "$BUNDLE/bundle.json" 'r["binary_sha256"]')
    got=$(sha256sum "$bin" | cut -d' ' -f1)
    [[ "$want" == "$got" ]] || {
        fail "the unpacked binary's sha256 $got is not the bundle's $want"
        exit 1
    }
    say "binary: bundle of commit $(json "$BUNDLE/bundle.json" 'r["commit"]'), built $(json "$BUNDLE/bundle.json" 'r["built"]'), CUDA $(json "$BUNDLE/bundle.json" 'r["toolkit_cuda"]') for sm_$(json "$BUNDLE/bundle.json" 'r["compute_cap"]')"
fi

# 1 and 2: driver against toolkit, libraries.
if ((gpu)); then
    command -v nvidia-smi >/dev/null || {
        fail "nvidia-smi not found: no NVIDIA driver here (DEVICE=cpu for a dry run)"
        exit 1
    }
    say "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader -i "$index")"
    driver_cuda=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p' | head -1)
    toolkit_cuda=$(json "$BUNDLE/bundle.json" 'r["toolkit_cuda"]' 2>/dev/null || echo unknown)
    say "driver's CUDA: $driver_cuda; toolkit's: $toolkit_cuda"
    if [[ "$toolkit_cuda" != unknown && "$(printf '%s\n%s\n' "$toolkit_cuda" "$driver_cuda" | sort -V | head -1)" != "$toolkit_cuda" ]]; then
        fail "the driver (CUDA $driver_cuda) is older than the toolkit (CUDA $toolkit_cuda): it cannot compile the kernels' PTX (CUDA_ERROR_UNSUPPORTED_PTX_VERSION); rebuild the bundle with a toolkit no newer than the driver"
        exit 1
    fi
    libs=$(python3 - <<'PY'
import glob, os, sys
dirs = []
for p in sys.path:
    for d in sorted(glob.glob(os.path.join(p, "nvidia", "*", "lib"))):
        if d not in dirs:
            dirs.append(d)
print(":".join(dirs))
PY
)
    export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    missing=$(ldd "$bin" | grep 'not found' | xargs)
    [[ -z "$missing" ]] || fail "libraries not found: $missing"
    say "libraries: $(ldd "$bin" | grep -E 'cuda|cublas|curand|nvrtc' | awk '{print $1 " -> " $3}' | tr '\n' ';' | sed 's/;$//')"
    if ! LD_BIND_NOW=1 "$bin" --version >"$work/version.txt" 2>&1; then
        fail "the binary does not start with every symbol bound (LD_BIND_NOW=1): $(head -3 "$work/version.txt")"
        exit 1
    fi
fi
say "CPU: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
smi_used() {
    if ((gpu)); then nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "$index" | xargs; else echo n/a; fi
}
smi_before=$(smi_used)

# The models: random weights, written here.
models="$work/models"
if ! timeout 300 "$bin" bench synth "$models" --shape "$SHAPE" --versions 3 >"$work/synth.json" 2>"$work/synth.err"; then
    fail "bench synth: $(tail -3 "$work/synth.err")"
    exit 1
fi
src() { json "$work/synth.json" "r['llm'][$1]['source']"; }
pin() { json "$work/synth.json" "r['llm'][$1]['file'] + '=' + r['llm'][$1]['sha256']"; }
say "models: 3 versions of a random-weight llama of shape $SHAPE ($(json "$work/synth.json" '"%.1f" % (r["llm"][0]["bytes"] / 1048576)') MiB each), a tiny BERT"
say ""

# 3. Logits on the device against the CPU's.
say "### Logits, $DEVICE against the CPU (bench parity, 3 prompts x 32 greedy steps)"
say ""
if timeout 300 "$bin" bench parity --gguf "$models/llm/v1.gguf" --device "$DEVICE" --steps 32 \
    >"$OUT/parity.json" 2>"$work/parity.err"; then
    parity=pass
else
    parity=FAIL
fi
if [[ -s "$OUT/parity.json" ]]; then
    say "$(json "$OUT/parity.json" '"max |logit diff| %.4g (%.3g%% of the range, tolerance %.3g%%); top-1: %d agree, %d near-ties, %d disagree; batched vs alone on the device: %.4g (%.3g%%)" % (r["max_abs_diff"], 100*r["max_rel_diff"], 100*r["tolerance_rel"], r["top1_agree"], r["top1_near_ties"], len(r["top1_disagree"]), r["batched_vs_alone_on_device"]["max_abs_diff"], 100*r["batched_vs_alone_on_device"]["max_rel_diff"])') -> $parity"
else
    say "no report: $(tail -3 "$work/parity.err")"
fi
[[ $parity == pass ]] || fail "logit parity (see parity.json)"
say ""

# 4. Served side by side.
serve() { # NAME DEVICE PORT
    local log="$OUT/server-$1.log"
    NO_COLOR=1 "$bin" serve --device "$2" --listen "127.0.0.1:$3" --metrics-listen "127.0.0.1:$(($3 + 1))" \
        --admin-token "$TOKEN" --models-root "$models" --state-dir "$work/state-$1" \
        --max-concurrent 16 --max-batch 16 >"$log" 2>&1 &
    pids+=($!)
    local pid=$!
    for _ in $(seq 1 1200); do
        "$bin" models --server "http://127.0.0.1:$3" >/dev/null 2>&1 && return 0
        kill -0 "$pid" 2>/dev/null || {
            fail "the $1 server exited: $(tail -3 "$log")"
            return 1
        }
        sleep 0.1
    done
    fail "the $1 server did not answer in 120 s"
    return 1
}
dev_url="http://127.0.0.1:$PORT"
cpu_url="http://127.0.0.1:$((PORT + 10))"
metrics_url="http://127.0.0.1:$((PORT + 1))/metrics"
serve device "$DEVICE" "$PORT" || exit 1
serve cpu cpu $((PORT + 10)) || exit 1
say "### Served side by side ($DEVICE and cpu), greedy over gRPC"
say ""
greedy() { timeout 60 "$bin" generate --server "$1" --model llm --temperature 0 --repetition-penalty 1 --max-tokens 24 --ignore-eos "$2" 2>/dev/null; }
same=0
prompts=("The quick brown fox" "hello world, the model" "in the beginning")
for p in "${prompts[@]}"; do
    a=$(greedy "$dev_url" "$p")
    b=$(greedy "$cpu_url" "$p")
    if [[ -n "$a" && "$a" == "$b" ]]; then
        same=$((same + 1))
    else
        say "- \`$p\`: $DEVICE \`${a:0:60}\` vs cpu \`${b:0:60}\`"
    fi
done
say "greedy text equal on $same of ${#prompts[@]} prompts (24 tokens each; a difference after a near-tie is allowed, see the parity line)"
emb() { timeout 60 "$bin" embed --server "$1" --model embed --json "hello world" "the quick brown fox" 2>/dev/null; }
emb "$dev_url" >"$work/emb-dev.json"
emb "$cpu_url" >"$work/emb-cpu.json"
cos=$(python3 - "$work/emb-dev.json" "$work/emb-cpu.json" <<'PY'
import json, math, sys
def vecs(p):
    r = json.load(open(p))
    return [e if isinstance(e, list) else e["values"] for e in r["embeddings"]]
worst = 1.0
for a, b in zip(vecs(sys.argv[1]), vecs(sys.argv[2])):
    dot = sum(x * y for x, y in zip(a, b))
    worst = min(worst, dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))))
print(f"{worst:.6f}")
PY
) || cos="n/a"
say "embeddings: lowest cosine similarity $DEVICE vs cpu: $cos"
python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) >= 0.999 else 1)" "$cos" 2>/dev/null ||
    fail "embeddings differ between $DEVICE and the CPU (cosine $cos < 0.999)"
kill -TERM "${pids[1]}" 2>/dev/null
say ""

# 5. Device memory through reloads.
device_mem() { # MiB in use: the device's by swapd's cudarc figures on a GPU, the process's RSS on the CPU
    python3 - "$metrics_url" "$gpu" <<'PY'
import sys, urllib.request
m = urllib.request.urlopen(sys.argv[1], timeout=10).read().decode()
v = {l.split()[0].split("{")[0]: float(l.split()[1]) for l in m.splitlines() if l.startswith("swapd_")}
if sys.argv[2] == "1":
    used = v["swapd_device_memory_total_bytes"] - v["swapd_device_memory_free_bytes"]
else:
    used = v["swapd_resident_memory_bytes"]
print("%.0f" % (used / 1048576))
PY
}
say "### Device memory through $RELOADS reloads ($DEVICE)"
say ""
say "| step | used (MiB; cudarc on a GPU, RSS on the CPU) | nvidia-smi used (MiB) | free phase |"
say "|---|---|---|---|"
say "| before swapd | - | $smi_before | |"
say "| v1 loaded | $(device_mem) | $(smi_used) | |"
drained=()
for i in $(seq 1 "$RELOADS"); do
    v=$((i % 3)) # v2, v3, v1, ...
    keep=()
    what="free"
    if ((i % 2)); then
        keep=(--keep-previous)
        what="keep previous"
    fi
    log="$OUT/reloads.log"
    echo "== reload $i: $(src $v) ($what)" >>"$log"
    if ! timeout 120 "$bin" reload llm --server "$dev_url" --token "$TOKEN" --source "$(src $v)" \
        --sha256 "$(pin $v)" "${keep[@]}" >>"$log" 2>&1; then
        fail "reload $i to $(src $v) did not commit (see reloads.log)"
    fi
    free_line=$(grep -E 'previous version (freed|kept|still)' "$log" | tail -1 | sed -e 's/.*\(previous version\)/\1/' -e 's/ (.*//')
    used=$(device_mem)
    label="reload $i to v$((v + 1)) ($what)"
    if ((i % 2)); then
        label="$label: two resident"
    else
        label="$label: after the drain"
        drained+=("$used")
    fi
    say "| $label | $used | $(smi_used) | $free_line |"
done
if ((${#drained[@]} >= 2)); then
    growth=$((drained[${#drained[@]} - 1] - drained[0]))
    say ""
    say "after the drains: ${drained[*]} MiB (growth $growth MiB from the first to the last)"
    # On the CPU, RSS moves with the allocator; on a GPU nothing should stay behind.
    limit=64
    ((gpu)) || limit=256
    ((growth <= limit)) || fail "device memory after the drains grew by $growth MiB over $RELOADS reloads (limit $limit)"
fi
shared=$(grep -c 'every version stream is in use' "$OUT/server-device.log" || true)
say "versions that had to share a pooled stream: $shared"
say ""

# 6. Concurrent streams.
say "### Decode with concurrent streams ($DEVICE, $DURATION s each, 64 tokens per request)"
say ""
say "| streams | tok/s (aggregate) | vs 1 | TTFT p50 (ms) | ITL p50 / p99 (ms) |"
say "|---|---|---|---|---|"
one=""
for n in $STREAMS; do
    if timeout $((DURATION + 60)) "$bin" bench reload --server "$dev_url" --model llm --clients "$n" \
        --reload-every 0 --max-tokens 64 --duration "$DURATION" --label "streams-$n" \
        --out "$work/streams-$n" >/dev/null 2>"$work/streams-$n.err"; then
        tps=$(json "$work/streams-$n.json" '"%.1f" % r["steady"]["aggregate_tokens_per_s"]')
        one=${one:-$tps}
        say "| $n | $tps | $(python3 -c "print('%.2fx' % ($tps / max($one, 1e-9)))") | $(json "$work/streams-$n.json" '"%.0f | %.1f / %.1f" % (r["steady"]["ttft_ms_p50"], r["steady"]["itl_ms_p50"], r["steady"]["itl_ms_p99"])') |"
    else
        fail "$n streams: $(tail -2 "$work/streams-$n.err")"
    fi
done
python3 -c "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())" \
    "$metrics_url" >"$OUT/metrics.txt" 2>/dev/null || true
# The same 8 streams with cudarc's per-argument event tracking off on the version streams
# (SWAPD_CUDA_EVENT_TRACKING=off): what those ~1000 events per decode token cost.
kill -TERM "${pids[0]}" 2>/dev/null
wait "${pids[0]}" 2>/dev/null
untracked_url="http://127.0.0.1:$((PORT + 20))"
if SWAPD_CUDA_EVENT_TRACKING=off serve untracked "$DEVICE" $((PORT + 20)) &&
    timeout $((DURATION + 60)) "$bin" bench reload --server "$untracked_url" --model llm --clients 8 \
        --reload-every 0 --max-tokens 64 --duration "$DURATION" --label untracked-8 \
        --out "$work/untracked-8" >/dev/null 2>"$work/untracked-8.err"; then
    tps=$(json "$work/untracked-8.json" '"%.1f" % r["steady"]["aggregate_tokens_per_s"]')
    say "| 8, event tracking off | $tps | $(python3 -c "print('%.2fx' % ($tps / max($one, 1e-9)))") | $(json "$work/untracked-8.json" '"%.0f | %.1f / %.1f" % (r["steady"]["ttft_ms_p50"], r["steady"]["itl_ms_p50"], r["steady"]["itl_ms_p99"])') |"
else
    fail "8 streams with event tracking off: $(tail -2 "$work/untracked-8.err" 2>/dev/null)"
fi
python3 - "$work" "$STREAMS" >"$OUT/streams.json" <<'PY' || true
import json, sys
r = {n: json.load(open(f"{sys.argv[1]}/streams-{n}.json"))["steady"] for n in sys.argv[2].split()}
r["8-untracked"] = json.load(open(f"{sys.argv[1]}/untracked-8.json"))["steady"]
print(json.dumps(r, indent=1))
PY
say ""
say "done in $((SECONDS - started)) s: $([[ $status == 0 ]] && echo "every check passed" || echo "SOME CHECKS FAILED")"
exit $status
