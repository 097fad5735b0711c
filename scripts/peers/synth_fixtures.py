"""Reference fixtures for the synthetic llama-family GGUFs (`swapd bench synth --arch A`,
random weights, written deterministically by swapd) from llama.cpp through llama-cpp-python:
for fixed prompt ids, the next-token logits and 32 greedy ids with each step's top-1 minus
top-2 margin; the ids of texts (with the file's own BOS rule, as `add_special`); and chats
rendered by llama.cpp's built-in template for the file's `tokenizer.chat_template` (llama 3's,
phi3's), with their ids. Run once; the output is committed under tests/fixtures/ and is never
a build or test dependency.

Usage: target/peers/venv/bin/python scripts/peers/synth_fixtures.py OUT.json ARCH=GGUF...
"""
import hashlib
import json
import sys

import llama_cpp
import numpy as np
from llama_cpp import Llama

from chat_render import render

PROMPTS = [[5, 40, 77, 120, 9, 200, 31, 64], [250, 3, 3, 18, 101, 140, 260, 7, 33, 90, 12, 4]]
# Text for the pre-tokenizer (qwen2's regex: single digits, contractions, runs of spaces).
TEXTS = ["the 12345 in there's  a\n\nthing!!  ", "Héllo wörld 2024 — I'LL win; tabs\t\there", "  leading and trailing  "]
CHATS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello to the world"}],
    [{"role": "user", "content": " the answer  is 42 "}],
]


out, specs = sys.argv[1], sys.argv[2:]
cases, cases_text, chats = [], [], []
for spec in specs:
    arch, path = spec.split("=", 1)
    llm = Llama(model_path=path, n_ctx=256, n_threads=2, n_batch=256, verbose=False)
    n_vocab = llm.n_vocab()
    for ids in PROMPTS:
        llm.reset()
        llm.eval(ids)
        first = None
        greedy, margins = [], []
        for _ in range(32):
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,)).copy()
            if first is None:
                first = [round(float(x), 5) for x in logits]
            order = logits.argsort()[::-1]
            greedy.append(int(order[0]))
            margins.append(round(float(logits[order[0]] - logits[order[1]]), 5))
            llm.eval([int(order[0])])
        cases.append({"arch": arch, "sha256": hashlib.sha256(open(path, "rb").read()).hexdigest(),
                      "prompt_ids": ids, "logits": first, "greedy_ids": greedy, "margins": margins})
    for text in TEXTS:
        cases_text.append({"arch": arch, "text": text,
                           "ids": llm.tokenize(text.encode(), add_bos=True, special=True)})
    template = llm.metadata.get("tokenizer.chat_template", "")
    if arch in ("llama3", "phi3"):
        for messages in CHATS:
            text = render(template.encode(), messages)
            chats.append({"arch": arch, "messages": messages, "text": text,
                          "ids": llm.tokenize(text.encode(), add_bos=True, special=True)})
json.dump({"generator": f"llama-cpp-python {llama_cpp.__version__}, n_threads=2, greedy",
           "cases": cases, "texts": cases_text, "chats": chats}, open(out, "w"), indent=None)
print(f"wrote {len(cases)} cases to {out}")
