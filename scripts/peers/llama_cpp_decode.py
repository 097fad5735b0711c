"""llama.cpp's side of scripts/bench-peers.sh, through llama-cpp-python: the same workloads
and the same JSON as `swapd bench decode`, on the same GGUF, prompts and threads.

Each round: a fresh context fed the long prompt, then DECODE more greedy tokens (prefill
tokens/s = prompt tokens / time to the first token; decode after it = tokens / time from the
first to the last token); then the short prompt and DECODE more (plain decode tokens/s).
Greedy is argmax over the logits llama.cpp leaves for the last position; end-of-sequence is
ignored, as swapd's `ignore_eos` does.

usage: python llama_cpp_decode.py GGUF THREADS DECODE ROUNDS LONG_PROMPT_FILE SHORT_PROMPT
"""
import json
import statistics
import sys
import time

import llama_cpp
import numpy as np
from llama_cpp import Llama

gguf, threads, decode, rounds, long_file, short = sys.argv[1:7]
threads, decode, rounds = int(threads), int(decode), int(rounds)
long_prompt = open(long_file, encoding="utf-8").read()

llm = Llama(
    model_path=gguf,
    n_threads=threads,
    n_threads_batch=threads,
    n_ctx=2048,
    n_batch=512,
    verbose=False,
)
n_vocab = llm.n_vocab()


def generate(prompt, n):
    """Times a fresh greedy generation of 1 + n tokens after `prompt`."""
    t = time.perf_counter()
    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
    llm.reset()
    times, out, nxt = [], [], ids
    for _ in range(n + 1):
        llm.eval(nxt)
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
        tok = int(np.argmax(logits))
        times.append(time.perf_counter() - t)
        out.append(tok)
        nxt = [tok]
    return len(ids), times, out


generate(short, 8)  # warm-up
llama_cpp.llama_perf_context_reset(llm.ctx)
results, prompt_tokens, short_tokens, first_ids = [], 0, 0, []
for _ in range(rounds):
    prompt_tokens, lt, _ = generate(long_prompt, decode)
    short_tokens, st, ids = generate(short, decode)
    first_ids = ids[:16]
    results.append(
        {
            "prefill_tok_s": prompt_tokens / lt[0],
            "decode_after_prompt_tok_s": decode / (lt[-1] - lt[0]),
            "decode_tok_s": decode / (st[-1] - st[0]),
        }
    )
median = {k: statistics.median(r[k] for r in results) for k in results[0]}
# llama.cpp's own clock over the same rounds (inside llama_decode, without this script's
# Python loop): how much of the wall time above is the binding's.
perf = llama_cpp.llama_perf_context(llm.ctx)
internal = {
    "prompt_eval_tok_s": perf.n_p_eval / perf.t_p_eval_ms * 1e3 if perf.t_p_eval_ms else 0.0,
    "eval_tok_s": perf.n_eval / perf.t_eval_ms * 1e3 if perf.t_eval_ms else 0.0,
    "system_info": llama_cpp.llama_print_system_info().decode(),
}
print(
    json.dumps(
        {
            "engine": "llama.cpp",
            "threads": threads,
            "prompt_tokens": prompt_tokens,
            "short_prompt_tokens": short_tokens,
            "decode_tokens": decode,
            "first_ids": first_ids,
            "rounds": results,
            "median": median,
            "llama_internal": internal,
        },
        indent=2,
    )
)
