"""llama.cpp decoding N sequences in one multi-sequence batch, as its batched-bench does:
the peer of swapd's continuous batching in scripts/bench-batching.sh.

For each N: a context with N sequences; the N prompts are fed in one batch (each sequence
its own id), then DECODE steps each decode one greedy token for every sequence in one
`llama_decode` over an N-token batch. Reports aggregate decode tokens/s (N x DECODE / time
of the decode steps) and the per-step time (every sequence's inter-token time) p50/p99.
End-of-sequence is ignored, as swapd's `ignore_eos` does.

usage: python llama_cpp_batched.py GGUF THREADS DECODE "1 2 4 8 16" PROMPT
"""
import ctypes
import json
import statistics
import sys
import time

import llama_cpp
import numpy as np

gguf, threads, decode, ns, prompt = sys.argv[1:6]
threads, decode = int(threads), int(decode)
ns = [int(n) for n in ns.split()]


def fn(*names):
    """The first of `names` this llama-cpp-python has (the C API renamed some)."""
    for n in names:
        f = getattr(llama_cpp, n, None)
        if f is not None:
            return f
    raise AttributeError(f"none of {names} in llama_cpp {llama_cpp.__version__}")


llama_cpp.llama_backend_init()
mparams = llama_cpp.llama_model_default_params()
model = fn("llama_model_load_from_file", "llama_load_model_from_file")(gguf.encode(), mparams)
vocab = llama_cpp.llama_model_get_vocab(model)
n_vocab = fn("llama_vocab_n_tokens", "llama_n_vocab")(vocab)


def tokenize(text):
    raw = text.encode("utf-8")
    buf = (llama_cpp.llama_token * (len(raw) + 8))()
    n = llama_cpp.llama_tokenize(vocab, raw, len(raw), buf, len(buf), True, True)
    return list(buf[:n])


ids = tokenize(prompt)


def run(n):
    """Feeds n copies of the prompt, then decodes `decode` steps for all n sequences."""
    cparams = llama_cpp.llama_context_default_params()
    per_seq = len(ids) + decode + 8
    cparams.n_ctx = n * per_seq
    cparams.n_batch = max(512, n * len(ids))
    cparams.n_ubatch = cparams.n_batch
    cparams.n_seq_max = n
    cparams.n_threads = threads
    cparams.n_threads_batch = threads
    ctx = fn("llama_init_from_model", "llama_new_context_with_model")(model, cparams)
    batch = llama_cpp.llama_batch_init(max(n * len(ids), n), 0, 1)

    def fill(entries):
        """entries: (token, pos, seq, wants_logits)."""
        batch.n_tokens = len(entries)
        for j, (tok, pos, seq, logits) in enumerate(entries):
            batch.token[j] = tok
            batch.pos[j] = pos
            batch.n_seq_id[j] = 1
            batch.seq_id[j][0] = seq
            batch.logits[j] = 1 if logits else 0

    def argmax(j):
        row = llama_cpp.llama_get_logits_ith(ctx, j)
        return int(np.argmax(np.ctypeslib.as_array(row, shape=(n_vocab,))))

    fill([(t, p, s, p == len(ids) - 1) for s in range(n) for p, t in enumerate(ids)])
    assert llama_cpp.llama_decode(ctx, batch) == 0, "prompt decode failed"
    nxt = [argmax((s + 1) * len(ids) - 1) for s in range(n)]
    steps, first_ids = [], [nxt[0]]
    t0 = time.perf_counter()
    for step in range(decode):
        t = time.perf_counter()
        fill([(nxt[s], len(ids) + step, s, True) for s in range(n)])
        assert llama_cpp.llama_decode(ctx, batch) == 0, "decode failed"
        nxt = [argmax(s) for s in range(n)]
        first_ids.append(nxt[0])
        steps.append(time.perf_counter() - t)
    total = time.perf_counter() - t0
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    steps.sort()
    return {
        "streams": n,
        "decode_tok_s": n * decode / total,
        "step_p50_ms": 1e3 * statistics.median(steps),
        "step_p99_ms": 1e3 * steps[min(len(steps) - 1, int(0.99 * len(steps)))],
        "first_ids": first_ids[:16],
    }


run(1)  # warm-up
results = [run(n) for n in ns]
print(
    json.dumps(
        {
            "engine": "llama.cpp batched",
            "threads": threads,
            "prompt_tokens": len(ids),
            "decode_tokens": decode,
            "results": results,
            "system_info": llama_cpp.llama_print_system_info().decode(),
        },
        indent=2,
    )
)
