"""Reference fixtures for Gemma 3 from llama.cpp (llama-cpp-python in the peer virtualenv):
prompt token ids (BOS added, special tokens parsed), greedy token ids with each step's top-1
minus top-2 logit margin, and the greedy text. Also the chat rendering of llama.cpp's
built-in `gemma` template. Run once; the output is committed under tests/fixtures/ and is
never a build or test dependency.

Usage: target/peers/venv/bin/python scripts/peers/gemma3_fixtures.py GGUF OUT.json
"""
import json
import sys

import llama_cpp
import numpy as np
from llama_cpp import Llama

from chat_render import render

gguf, out = sys.argv[1], sys.argv[2]
llm = Llama(model_path=gguf, n_ctx=1024, n_threads=2, n_batch=512, verbose=False)

TOKENIZE = [
    ("unicode", "Café naïve — 東京 🚀 Ünïcödé ⁇ ñ"),
    ("digits", "In 2024, 1234567 people paid $89.99 each (3.14159)."),
    ("spaces", "a  b   c\n\n\nd\t\te    f \n end  "),
    ("leading_space", " hello world"),
    ("special", "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n"),
    ("html", "<table><tr><td>1</td></tr></table>"),
]
GREEDY = [
    ("capital", "The capital of France is"),
    ("count", "One, two, three, four,"),
    ("code", "def fibonacci(n):\n"),
    ("story", "Once upon a time, in a small village,"),
]
CHAT = [
    ("chat_haiku", [{"role": "system", "content": "You are a poet."},
                    {"role": "user", "content": "Write a haiku about the sea."}]),
    ("chat_capital", [{"role": "user", "content": "What is the capital of France?"}]),
]


def greedy(ids, steps=24):
    llm.reset()
    llm.eval(ids)
    out, margins = [], []
    for _ in range(steps):
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()
        order = logits.argsort()[::-1]
        t = int(order[0])
        out.append(t)
        margins.append(round(float(logits[order[0]] - logits[order[1]]), 4))
        if t in (1, 106):  # <eos>, <end_of_turn>
            break
        llm.eval([t])
    return out, margins


cases = []
for cid, text in TOKENIZE:
    ids = llm.tokenize(text.encode(), add_bos=True, special=True)
    cases.append({"id": cid, "prompt": text, "prompt_ids": ids})
for cid, text in GREEDY:
    ids = llm.tokenize(text.encode(), add_bos=True, special=True)
    g, m = greedy(ids)
    cases.append({"id": cid, "prompt": text, "prompt_ids": ids, "greedy_ids": g,
                  "margins": m, "greedy_text": llm.detokenize(g).decode("utf-8", "replace")})
for cid, messages in CHAT:
    text = render(b"gemma", messages)
    ids = llm.tokenize(text.encode(), add_bos=True, special=True)
    g, m = greedy(ids)
    cases.append({"id": cid, "messages": messages, "prompt": text, "prompt_ids": ids,
                  "greedy_ids": g, "margins": m,
                  "greedy_text": llm.detokenize(g).decode("utf-8", "replace")})
json.dump({"model": "gemma-3-270m-q4_k_m.gguf",
           "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
           "generator": f"llama-cpp-python {llama_cpp.__version__}, n_threads=2, greedy",
           "cases": cases}, open(out, "w"), indent=1, ensure_ascii=False)
print(f"wrote {len(cases)} cases to {out}")
