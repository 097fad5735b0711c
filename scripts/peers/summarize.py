"""Joins scripts/bench-peers.sh's JSON files into one Markdown report (stdout).

usage: python3 summarize.py OUT THREADS "1 2 4 8" COMMAND
"""
import glob
import json
import os
import platform
import statistics
import sys

out, threads, scaling, command = sys.argv[1:5]
ENGINES = [
    ("server", "swapd, served over gRPC"),
    ("local", "swapd's model code, bare loop (no server)"),
    ("candle", "candle-transformers quantized_llama (candle kernels)"),
    ("llama.cpp", "llama.cpp (llama-cpp-python)"),
]
KEYS = ["prefill_tok_s", "decode_tok_s", "decode_after_prompt_tok_s"]


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


runs = {}
for engine, _ in ENGINES:
    files = sorted(glob.glob(os.path.join(out, f"{engine}-[0-9]*.json")))
    reports = [load(f) for f in files]
    if not reports:
        sys.exit(f"no {engine} results in {out}")
    rounds = [r for rep in reports for r in rep["rounds"]]
    runs[engine] = {
        "report": reports[-1],
        "median": {k: statistics.median(r[k] for r in rounds) for k in KEYS},
        "rounds": len(rounds),
    }

cpu = "unknown CPU"
try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
except (OSError, StopIteration):
    pass
llama = runs["llama.cpp"]
rep = llama["report"]
print(f"## Peers: {os.cpu_count()} cores ({cpu}), {threads} threads, {platform.system()}")
print()
print(f"`{command}`")
print()
print(
    f"SmolLM2-135M-Instruct Q4_1, greedy, end-of-sequence ignored. Prefill: the "
    f"{rep['prompt_tokens']}-token prompt (benches/data/long-prompt.txt), tokens / time to "
    f"the first token. Decode: {rep['decode_tokens']} tokens after a "
    f"{rep['short_prompt_tokens']}-token prompt, and after the long one. Medians of "
    f"{llama['rounds']} rounds per engine, the engines taking turns."
)
print()
print(
    "| engine | prompt tokens | prefill tok/s | decode tok/s | decode after prompt tok/s "
    "| decode ÷ llama.cpp | prefill ÷ llama.cpp | same first tokens as llama.cpp |"
)
print("|---|---:|---:|---:|---:|---:|---:|---:|")
ref_ids = rep["first_ids"]
for engine, name in ENGINES:
    r = runs[engine]
    m = r["median"]
    ids = r["report"]["first_ids"]
    same = next((i for i, (a, b) in enumerate(zip(ids, ref_ids)) if a != b), min(len(ids), len(ref_ids)))
    print(
        f"| {name} | {r['report']['prompt_tokens']} | {m['prefill_tok_s']:.1f} "
        f"| {m['decode_tok_s']:.1f} | {m['decode_after_prompt_tok_s']:.1f} "
        f"| {m['decode_tok_s'] / llama['median']['decode_tok_s']:.2f} "
        f"| {m['prefill_tok_s'] / llama['median']['prefill_tok_s']:.2f} | {same}/{len(ref_ids)} |"
    )
internal = rep.get("llama_internal")
if internal:
    print()
    print(
        f"llama.cpp's own timers over its rounds (inside llama_decode, without the Python loop): "
        f"prompt eval {internal['prompt_eval_tok_s']:.1f} tok/s (all prompt batches, long and "
        f"short), eval {internal['eval_tok_s']:.1f} tok/s. Its build: `{internal['system_info'].strip()}`."
    )
print()
s, l = runs["server"]["median"], runs["local"]["median"]
print(
    f"Server overhead (served ÷ bare loop, single stream): decode "
    f"{s['decode_tok_s'] / l['decode_tok_s']:.3f}, prefill {s['prefill_tok_s'] / l['prefill_tok_s']:.3f}, "
    f"decode after the prompt {s['decode_after_prompt_tok_s'] / l['decode_after_prompt_tok_s']:.3f}."
)
c = runs["candle"]["median"]
print(
    f"swapd's kernels ÷ candle's (bare loops): decode {l['decode_tok_s'] / c['decode_tok_s']:.2f}, "
    f"prefill {l['prefill_tok_s'] / c['prefill_tok_s']:.2f}."
)
print()
bw = load(os.path.join(out, "membw.json"))
floor = bw["floor_tok_s"]
print(
    f"Memory floor: {bw['weight_bytes'] / 1e6:.1f} MB of weights read per token at "
    f"{bw['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s measured ({bw['threads']} threads reading "
    f"1 GiB) = {1e3 / floor:.2f} ms/token, {floor:.0f} tokens/s at most."
)
print()
print("| engine | decode ms/token | floor ÷ that (1.0 = bandwidth-bound) |")
print("|---|---:|---:|")
for engine, name in ENGINES:
    d = runs[engine]["median"]["decode_tok_s"]
    print(f"| {name} | {1e3 / d:.2f} | {d / floor:.2f} |")
print()
print("Concurrency (swapd served, `swapd bench reload --reload-every 0`, 64-token greedy stories):")
print()
print("| streams | aggregate tok/s | ×1 stream | per-stream tok/s p50 | TTFT p50 ms | ITL p99 ms |")
print("|---:|---:|---:|---:|---:|---:|")
base = None
for n in scaling.split():
    st = load(os.path.join(out, f"streams-{n}.json"))["steady"]
    base = base or st["aggregate_tokens_per_s"]
    print(
        f"| {n} | {st['aggregate_tokens_per_s']:.1f} | {st['aggregate_tokens_per_s'] / base:.2f} "
        f"| {st['per_stream_tokens_per_s_p50']:.1f} | {st['ttft_ms_p50']:.1f} | {st['itl_ms_p99']:.1f} |"
    )

profile = os.path.join(out, "profile.txt")
if os.path.exists(profile):
    print()
    print("Where the bare loop's time goes (perf, cpu-clock samples, self time):")
    print()
    print("```")
    with open(profile, encoding="utf-8") as f:
        print(f.read().rstrip())
    print("```")
