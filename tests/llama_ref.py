"""llama-cpp-python's own runner of a whole GGUF: the independent reference the runtime and
the agents are compared with, at the same context settings as the stages under test."""
from __future__ import annotations

import numpy as np

from agent.runtime import Settings, whole_model

CTX, BATCH, THREADS = 512, 512, 2
SETTINGS = Settings(sessions=1, context=CTX, batch_tokens=BATCH, threads=THREADS)


class LlamaCpp:
    """llama-cpp-python's Llama on the whole GGUF, with SETTINGS' context, batch and threads."""

    def __init__(self, path, logits_all: bool):
        # logits_all decides which rows llama.cpp's last layer computes (all, or the last
        # token's), and so which kernel shapes run there: compare like with like
        self.llm = whole_model(path, n_ctx=CTX, n_batch=BATCH, n_ubatch=BATCH, n_threads=THREADS,
                               n_threads_batch=THREADS, flash_attn=SETTINGS.flash_attn, logits_all=logits_all,
                               verbose=False)

    def greedy(self, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
        """Greedy tokens and the logits each was chosen from (one eval per token, as we decode)."""
        self.llm.reset()
        self.llm.eval(prompt)
        tokens, logits = [], []
        import llama_cpp

        for _ in range(n):
            ptr = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)      # the last output's row
            row = np.ctypeslib.as_array(ptr, (self.llm.n_vocab(),)).copy()
            logits.append(row)
            tokens.append(int(row.argmax()))
            self.llm.eval([tokens[-1]])
        return tokens, logits

    def close(self):
        self.llm.close()
