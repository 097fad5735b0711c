#!/usr/bin/env bash
# The CUDA build on a real GPU, one command: builds the cuda binary, runs the test suite on the
# CUDA device, measures device memory through a reload with two versions resident and after
# the drain, runs the reload-under-load benchmark on the GPU and on the CPU, and prints
#   - decode tokens/s, GPU vs CPU;
#   - VRAM before the load, with two versions resident and after the drain (swapd's cudarc
#     figures from /metrics, and nvidia-smi);
#   - inter-token latency p99 during reloads vs steady.
# Needs no network when the models (scripts/fetch-models.sh), the crates (`cargo fetch`) and a
# CUDA toolkit are already there; the toolkit is CUDA_HOME if set, else the wheels that
# scripts/check-cuda-build.sh installs under target/cuda-check (downloaded once).
#
# Variables (all optional):
#   DEVICE            cuda (default), cuda:N, or cpu: a dry run of every step on the CPU
#                     (no nvidia-smi, no cuda feature), for checking the script itself
#   CUDA_HOME, CUDA_COMPUTE_CAP, CUDA_CHECK_DIR   as for scripts/check-cuda-build.sh
#   TESTS             arguments for `cargo test` (default: the whole suite; `skip` skips it)
#   DURATION          seconds of each benchmark run (default 60)
#   CLIENTS           streaming clients of the benchmark (default 8)
#   RELOAD_EVERY      seconds between reloads in the benchmark (default 3)
#   OUT               where the results go (default target/gpu-check); OUT/summary.md at the end
#
# On a lent GPU machine (no Rust toolchain, no network) this is the bundle's device run:
# with no `cargo` on the PATH, or BUNDLE_RUN set, it runs scripts/gpu-device.sh on the bundle
# that scripts/gpu-bundle.sh made (carried as target/gpu-bundle). The rest of this script is
# for a GPU machine that can build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${BUNDLE_RUN:-}" ]] || ! command -v cargo >/dev/null; then
    exec scripts/gpu-device.sh
fi
DEVICE=${DEVICE:-cuda}
TESTS=${TESTS:-}
DURATION=${DURATION:-60}
CLIENTS=${CLIENTS:-8}
RELOAD_EVERY=${RELOAD_EVERY:-3}
OUT=${OUT:-target/gpu-check}
PORT=${PORT:-50171}
METRICS_PORT=${METRICS_PORT:-9584}
TOKEN="gpu-check-token"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
summary="$OUT/summary.md"
: >"$summary"
say() { echo "$*" | tee -a "$summary"; }

case "$DEVICE" in
cpu) features=() ;;
cuda | cuda:*) features=(--features cuda) ;;
*)
    echo "DEVICE=$DEVICE: expected cuda, cuda:N or cpu" >&2
    exit 2
    ;;
esac
gpu=0
[[ "$DEVICE" == cuda* ]] && gpu=1
index=0
[[ "$DEVICE" == cuda:* ]] && index=${DEVICE#cuda:}

# VRAM used on the GPU as nvidia-smi sees it (MiB), or n/a.
smi_used() {
    if ((gpu)) && command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "$index" | xargs
    else
        echo n/a
    fi
}

say "# scripts/gpu-check.sh, DEVICE=$DEVICE, $(date -u +%Y-%m-%dT%H:%MZ)"
say ""
if ((gpu)); then
    command -v nvidia-smi >/dev/null || {
        echo "nvidia-smi not found: this is not a machine with an NVIDIA driver (DEVICE=cpu for a dry run)" >&2
        exit 1
    }
    say "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader -i "$index")"
    # The toolkit (nvcc for the kernels, the libraries to link and to run with).
    env_file="$(CUDA_CHECK_ENV_ONLY=1 scripts/check-cuda-build.sh | tail -1)"
    # shellcheck source=/dev/null
    source "$env_file"
    export LD_LIBRARY_PATH="$SWAPD_CUDA_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    say "toolkit: CUDA_HOME=$CUDA_HOME, $(nvcc --version | tail -1), CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
fi
say "CPU: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
say ""

scripts/fetch-models.sh
echo "== building the release binary (${features[*]:-no features})"
cargo build --release --locked "${features[@]}"
bin=target/release/swapd

# 1. The test suite, its servers on DEVICE (SWAPD_TEST_DEVICE, see tests/common).
if [[ "$TESTS" != skip ]]; then
    echo "== cargo test on $DEVICE"
    # shellcheck disable=SC2086 # TESTS is a list of cargo test arguments
    if SWAPD_TEST_DEVICE="$DEVICE" cargo test --release --locked "${features[@]}" $TESTS \
        >"$OUT/tests.log" 2>&1; then
        tests_result=passed
    else
        tests_result="FAILED (see $OUT/tests.log)"
    fi
    say "tests on $DEVICE: $tests_result; $(grep -E '^test result:' "$OUT/tests.log" |
        awk '{p+=$4; f+=$6} END {print p+0 " passed, " f+0 " failed"}')"
fi

# 2. Device memory through a reload that keeps the previous version resident, then one that
#    frees both old versions. SmolLM2 (a.gguf) and a perturbed copy (b.gguf).
source scripts/bench-lib.sh # scratch, two_versions, start_server (on $DEVICE), stop_server
scratch
two_versions "$work/models" smollm2

# swapd's view of the device (what admission uses): free and total from /metrics.
device_mem() {
    local m
    m=$(curl -fsS "http://127.0.0.1:$METRICS_PORT/metrics" 2>/dev/null ||
        python3 -c "import urllib.request,sys; sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:$METRICS_PORT/metrics').read().decode())")
    awk '/^swapd_device_memory_free_bytes/ {f=$2} /^swapd_device_memory_total_bytes/ {t=$2}
        END {printf "%.0f MiB used of %.0f MiB (%.0f MiB free)", (t-f)/1048576, t/1048576, f/1048576}' <<<"$m"
}
mem_row() { say "| $1 | $(device_mem) | $(smi_used) |"; }

echo "== device memory through reloads"
smi_before=$(smi_used)
start_server "$OUT/server-memory.log" "$PORT" "$METRICS_PORT" --models-root "$work/models"
reload() {
    "$bin" reload smollm2 --server "$server_url" --token "$TOKEN" "$@" >>"$OUT/reloads.log" 2>&1
}
say ""
say "### Device memory ($DEVICE), SmolLM2 Q4_1"
say ""
say "| | swapd (cudarc on a GPU, /proc on the CPU) | nvidia-smi used (MiB) |"
say "|---|---|---|"
say "| before the load (no swapd) | - | $smi_before |"
mem_row "one version loaded"
reload --source smollm2/b.gguf --sha256 "b.gguf=$sha_b" --keep-previous
mem_row "two versions resident (b active, a standby)"
reload --source smollm2/a.gguf --sha256 "a.gguf=$sha_a"
mem_row "after the drain (a active, b and the standby freed)"
say ""
say "free phase of the last reload: $(grep -E 'free.*(came back|still referenced)' "$OUT/reloads.log" | tail -1 | xargs)"
stop_server

# 3. The reload-under-load benchmark on DEVICE and, for the decode comparison, on the CPU.
bench() {
    echo "== scripts/bench-reload.sh on $1"
    local d=$DURATION
    DEVICE=$1 OUT="$OUT/bench-$2" STEADY_DURATION=$d DURATION=$d \
        PRESERVING_DURATION=$d CLIENTS=$CLIENTS RELOAD_EVERY=$RELOAD_EVERY \
        PORT=$PORT METRICS_PORT=$METRICS_PORT scripts/bench-reload.sh >"$OUT/bench-$2.log" 2>&1 ||
        echo "bench-reload.sh on $1 reported a failure: see $OUT/bench-$2.log" >&2
}
json() { python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))" "$@"; }
bench "$DEVICE" device
if ((gpu)); then bench cpu cpu; fi
say ""
say "### Decode and inter-token latency ($CLIENTS clients, $DURATION s per run, reload every $RELOAD_EVERY s)"
say ""
# One column per device run: the GPU's and the CPU's, or the CPU's alone in a dry run.
runs=("$OUT/bench-device")
heads="| | $DEVICE |"
if ((gpu)); then
    runs+=("$OUT/bench-cpu")
    heads="$heads cpu |"
fi
row() { # NAME FILE EXPR
    local line="| $1 |" r
    for r in "${runs[@]}"; do line="$line $(json "$r/$2" "$3") |"; done
    say "$line"
}
say "$heads"
say "|---|---|${runs[1]:+---|}"
row "decode tokens/s (steady, aggregate)" steady.json '"%.1f" % r["steady"]["aggregate_tokens_per_s"]'
row "inter-token p99, steady (ms)" steady.json '"%.1f" % r["steady"]["itl_ms_p99"]'
row "inter-token p99, during reloads (ms)" reloads.json '"%.1f" % r["during_reload"]["itl_ms_p99"]'
say ""
say "benchmark reports: $OUT/bench-*/summary.md"
echo
echo "summary: $summary"
