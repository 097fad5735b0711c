"""llama.cpp's own chat rendering (`llama_chat_apply_template`) for the fixture scripts: the
template is a built-in name (b"gemma") or a Jinja source llama.cpp recognizes by its markers."""
import ctypes

import llama_cpp


def render(template, messages):
    arr = (llama_cpp.llama_chat_message * len(messages))()
    keep = []  # the encoded strings must outlive the call
    for i, m in enumerate(messages):
        r, c = m["role"].encode(), m["content"].encode()
        keep += [r, c]
        arr[i].role = r
        arr[i].content = c
    buf = ctypes.create_string_buffer(1 << 16)
    n = llama_cpp.llama_chat_apply_template(template, arr, len(messages), True, buf, len(buf))
    assert 0 < n < len(buf), n
    return buf.raw[:n].decode()
