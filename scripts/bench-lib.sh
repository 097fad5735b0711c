# shellcheck shell=bash disable=SC2154,SC2034
# Shared by the benchmark scripts (sourced, not run): start and stop one `swapd serve`.
# Needs $bin (the swapd binary) and $TOKEN, and takes $DEVICE (default cpu); sets $server (its
# pid) and $server_url.

server=""
server_url=""

# start_server LOG PORT METRICS_PORT ARGS...: serves in the background and waits until it
# answers (the models are loaded and checked), or exits with its log.
start_server() {
    local log=$1 port=$2 metrics_port=$3
    shift 3
    "$bin" serve --device "${DEVICE:-cpu}" --listen "127.0.0.1:$port" \
        --metrics-listen "127.0.0.1:$metrics_port" --admin-token "$TOKEN" "$@" >"$log" 2>&1 &
    server=$!
    server_url="http://127.0.0.1:$port"
    for _ in $(seq 1 600); do
        if "$bin" models --server "$server_url" >/dev/null 2>&1; then return; fi
        kill -0 "$server" 2>/dev/null || { cat "$log"; exit 1; }
        sleep 0.1
    done
    echo "the server did not start (log: $log)" >&2
    exit 1
}

# two_versions ROOT NAME: a models root serving SmolLM2 as model NAME from ROOT/smollm2/a.gguf
# (the shipped GGUF), beside b.gguf, a perturbed copy (a real second version); sets $sha_a
# and $sha_b.
two_versions() {
    local root=$1 name=$2
    mkdir -p "$root/smollm2"
    cp models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf "$root/smollm2/a.gguf"
    "$bin" bench perturb "$root/smollm2/a.gguf" "$root/smollm2/b.gguf" >/dev/null
    sha_a=$(sha256sum "$root/smollm2/a.gguf" | cut -d' ' -f1)
    sha_b=$(sha256sum "$root/smollm2/b.gguf" | cut -d' ' -f1)
    cat >"$root/models.toml" <<TOML
[[model]]
name = "$name"
kind = "llm"
source = "smollm2/a.gguf"
[model.sha256]
"a.gguf" = "$sha_a"
[model.defaults]
context_length = 2048
TOML
}

# scratch: sets $work, a scratch folder that is removed, with the server stopped, on exit.
scratch() {
    work=$(mktemp -d)
    trap 'stop_server; rm -rf "$work"' EXIT
}

stop_server() {
    [[ -n "$server" ]] || return 0
    kill -TERM "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    server=""
}

# peer_venv: llama.cpp through llama-cpp-python, compiled from source into a scratch
# virtualenv on first use (~10 min on 2 cores); sets $venv. Never a test dependency.
# On a CPU with AVX-512 VNNI, built with the x86 extensions up to AVX-512 (VNNI, and VBMI, BF16
# and AVX-VNNI where /proc/cpuinfo lists them) but not AMX (elsewhere GGML_NATIVE): on the machine
# this was written on, ggml's AMX matmul (GGML_NATIVE picks it where the CPU reports AMX)
# crashes with SIGSEGV in ggml_backend_amx_mul_mat on the Q4_1 model. LLAMA_CMAKE_ARGS
# chooses others (e.g. "-DGGML_NATIVE=ON"); LLAMA_CPP_PYTHON the version (0.3.36).
peer_venv() {
    local version=${LLAMA_CPP_PYTHON:-0.3.36}
    local args=${LLAMA_CMAKE_ARGS:-}
    if [[ -z "$args" ]] && grep -qE 'avx512_?vnni' /proc/cpuinfo; then
        args="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON"
        # Each of the rest only where the CPU reports it: AMD's Zen 4 has AVX-512 VBMI and
        # BF16 but not the VEX-coded AVX-VNNI, and a build with it dies of SIGILL.
        local flag
        for flag in avx_vnni:AVX_VNNI avx512vbmi:AVX512_VBMI avx512_bf16:AVX512_BF16; do
            grep -qw "${flag%%:*}" /proc/cpuinfo && args+=" -DGGML_${flag##*:}=ON"
        done
    elif [[ -z "$args" ]]; then
        # No AVX-512 here (so no AMX either): the compiler's view of this CPU.
        args="-DGGML_NATIVE=ON"
    fi
    venv=target/peers/venv
    local stamp="llama-cpp-python==$version $args"
    if [[ "$(cat "$venv/built" 2>/dev/null)" != "$stamp" ]]; then
        echo "== building llama-cpp-python $version from source into $venv ($args)"
        rm -rf "$venv"
        python3 -m venv "$venv"
        CMAKE_ARGS="$args" "$venv/bin/pip" install --quiet --no-cache-dir \
            --no-binary llama-cpp-python "llama-cpp-python==$version" numpy
        echo "$stamp" >"$venv/built"
    fi
}

# models_and_binary: fetches and verifies the models, sets $bin to $BIN or (unset) a fresh
# release build, and makes $OUT.
models_and_binary() {
    scripts/fetch-models.sh
    if [[ -z "${BIN:-}" ]]; then
        cargo build --release --quiet
        BIN=target/release/swapd
    fi
    bin=$BIN
    mkdir -p "$OUT"
}
