#!/usr/bin/env bash
# The peer comparison's model axis: decode and prefill tokens/s of swapd's model code (the
# bare loop, `swapd bench decode --engine local`) against llama.cpp (llama-cpp-python built
# from source into target/peers/venv, never a test dependency) on the same GGUF files, the
# same prompts and THREADS threads, side by side in one run (PASSES passes, each engine in
# turn). The files:
#   - gemma3-q4_k_m: Gemma 3 270M Q4_K_M (Q5_0, Q4_K, Q6_K, Q8_0 tensors);
#   - smollm2-q4_k_m, smollm2-q5_k_m: SmolLM2-135M-Instruct requantized to Q4_K_M and
#     Q5_K_M by llama.cpp's own quantizer in the peer virtualenv (target/peers/);
#   - smollm2-q4_1: the shipped SmolLM2 Q4_1 file, as the control.
# Writes OUT/<model>-<engine>-<pass>.json and OUT/models.md.
# Environment: THREADS (nproc), DECODE (128), ROUNDS (3), PASSES (2), OUT
# (target/bench/models), MODELS (the four names above).
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-$(nproc)}
DECODE=${DECODE:-128}
ROUNDS=${ROUNDS:-3}
PASSES=${PASSES:-2}
OUT=${OUT:-target/bench/models}
MODELS=${MODELS:-gemma3-q4_k_m smollm2-q4_k_m smollm2-q5_k_m smollm2-q4_1}
SHORT_PROMPT="Once upon a time"
export RAYON_NUM_THREADS=$THREADS

scripts/fetch-models.sh
cargo build --release --quiet
bin=target/release/swapd
mkdir -p "$OUT"
source scripts/bench-lib.sh
peer_venv

# SmolLM2 requantized by llama.cpp's own quantizer. Its 576-wide rows are not whole 256-value
# super-blocks, so llama.cpp falls back for most tensors: Q4_K_M gives Q5_0 166, Q4_K 16,
# Q6_K 14, Q8_0 15; Q5_K_M gives Q5_1 166, Q5_K 16, Q6_K 14, Q8_0 15.
requant() { # requant FTYPE-SUFFIX (q4_k_m, q5_k_m) -> path
    local out=target/peers/smollm2-$1.gguf
    if [[ ! -s $out ]]; then
        echo "== requantizing SmolLM2 to ${1^^} with llama.cpp's quantizer" >&2
        "$venv/bin/python" - models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf "$out" "${1^^}" <<'PY' >&2
import sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3])
p.allow_requantize = True
if llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p) != 0:
    sys.exit("quantization failed")
PY
    fi
    echo "$out"
}
gguf_of() {
    case $1 in
        gemma3-q4_k_m) echo models/gemma3-270m/gemma-3-270m-q4_k_m.gguf ;;
        smollm2-q4_k_m) requant q4_k_m ;;
        smollm2-q5_k_m) requant q5_k_m ;;
        smollm2-q4_1) echo models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf ;;
        *) echo "unknown model $1" >&2; exit 2 ;;
    esac
}

for pass in $(seq 1 "$PASSES"); do
    for model in $MODELS; do
        gguf=$(gguf_of "$model")
        echo "== pass $pass/$PASSES: $model"
        "$bin" bench decode --engine local --gguf "$gguf" --decode-tokens "$DECODE" \
            --rounds "$ROUNDS" >"$OUT/$model-swapd-$pass.json"
        "$venv/bin/python" scripts/peers/llama_cpp_decode.py "$gguf" "$THREADS" "$DECODE" \
            "$ROUNDS" benches/data/long-prompt.txt "$SHORT_PROMPT" >"$OUT/$model-llama.cpp-$pass.json"
    done
done

python3 - "$OUT" "$PASSES" "$MODELS" "THREADS=$THREADS DECODE=$DECODE ROUNDS=$ROUNDS PASSES=$PASSES scripts/bench-models.sh" >"$OUT/models.md" <<'PY'
import json, statistics, sys
out, passes, models, cmd = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4]
keys = [("prefill_tok_s", "prefill"), ("decode_tok_s", "decode")]
print(f"Bare loops, median of each pass's median, `{cmd}`\n")
print("| model | engine | prefill tok/s | decode tok/s |")
print("|---|---|---:|---:|")
ratios = []
for m in models:
    med = {}
    for e in ["swapd", "llama.cpp"]:
        runs = [json.load(open(f"{out}/{m}-{e}-{p}.json"))["median"] for p in range(1, passes + 1)]
        med[e] = {k: statistics.median(r[k] for r in runs) for k, _ in keys}
        print(f"| {m} | {e} | {med[e]['prefill_tok_s']:.1f} | {med[e]['decode_tok_s']:.1f} |")
    ratios.append((m, [med["swapd"][k] / med["llama.cpp"][k] for k, _ in keys]))
print("\n| model | prefill swapd/llama.cpp | decode swapd/llama.cpp |")
print("|---|---:|---:|")
for m, (p, d) in ratios:
    print(f"| {m} | {p:.2f}x | {d:.2f}x |")
PY
cat "$OUT/models.md"
