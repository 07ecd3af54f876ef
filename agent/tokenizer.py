"""Tokenization with llama.cpp's own tokenizer, read from the GGUF's vocabulary.

Using llama.cpp's code (vocab-only load: no weights) makes our token ids identical to
llama.cpp's by construction, which the parity checks rely on.
"""
from __future__ import annotations

import codecs
import functools
from pathlib import Path


class Tokenizer:
    def __init__(self, gguf_path: str | Path):
        import llama_cpp
        from llama_cpp._internals import LlamaModel

        from agent.runtime import init_llama
        from agent.weights import open_gguf

        init_llama()   # llama.cpp's log goes to our logger, never to stdout

        open_gguf(gguf_path)  # clear error for a missing / non-GGUF file
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self._model = LlamaModel(path_model=str(gguf_path), params=params, verbose=False)
        self.n_vocab = self._model.n_vocab()
        self.bos = self._model.token_bos()
        self.eos = self._model.token_eos()
        self.bos_text = self._model.token_get_text(self.bos)
        self.eos_text = self._model.token_get_text(self.eos)
        self.chat_template: str | None = self._model.metadata().get("tokenizer.chat_template")

    def encode(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of text; special=True parses control tokens written in it (chat templates)."""
        return list(self._model.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special))

    def decode(self, tokens: list[int]) -> str:
        return self._model.detokenize(list(tokens)).decode("utf-8", errors="replace")

    def piece(self, token: int) -> bytes:
        """The bytes of one token (may be part of a multi-byte UTF-8 character)."""
        import ctypes

        import llama_cpp

        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self._model.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:max(n, 0)]

    def stream(self) -> "codecs.IncrementalDecoder":
        """An incremental UTF-8 decoder: feed it piece() bytes, print what it returns."""
        return codecs.getincrementaldecoder("utf-8")(errors="replace")


@functools.lru_cache(maxsize=4)
def tokenizer_for(gguf_path: str) -> Tokenizer:
    return Tokenizer(gguf_path)
