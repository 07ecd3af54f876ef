"""Measure how fast this machine runs a real layer at each GGUF type.

The layer is one of the loaded model's: its matrices are dequantized and re-quantized to
each type with llama.cpp's quantizer, then timed for prefill (many tokens at once) and for
decode (one token against a cache of that many positions). The median of the repeats is
reported, which is what the solver's measured node speeds are built from.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch

from agent.model import Stage, Step
from agent.quant import LAYER_TYPES, QTensor
from agent.weights import StageWeights
from proto.adapter import TypeTiming


def _requantized(layer: dict, qtype: str) -> dict:
    out = {}
    for name, t in layer.items():
        if isinstance(t, QTensor):
            t = t if t.qtype == qtype else QTensor.from_float(t.dequantize().numpy(), qtype)
        out[name] = t
    return out


def _single_layer(w: StageWeights, qtype: str) -> Stage:
    """A stage of one middle layer (no embedding, no head) at qtype."""
    cfg = replace(w.cfg, n_layer=3)
    return Stage(StageWeights(cfg=cfg, first=1, last=2, layer_types=[qtype],
                              layers=[_requantized(w.layers[0], qtype)]))


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def time_types(w: StageWeights, types: list[str] | None = None, prefill_tokens: int = 64,
               repeats: int = 5) -> list[TypeTiming]:
    types = list(types or LAYER_TYPES)
    bad = [t for t in types if t not in LAYER_TYPES]
    if bad:
        raise ValueError(f"cannot profile GGUF type {bad[0]}; choose from {', '.join(LAYER_TYPES)}")
    if not w.layers:
        raise ValueError("the loaded stage has no layers to time")
    prefill_tokens = max(1, prefill_tokens)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(prefill_tokens, w.cfg.n_embd, generator=gen)
    out = []
    for q in types:
        stage = _single_layer(w, q)
        cache = stage.new_cache(capacity=prefill_tokens + 1)
        prefill = _median_time(lambda: stage.forward([Step(cache, 0, hidden=x)]), repeats)
        decode = _median_time(lambda: stage.forward([Step(cache, prefill_tokens - 1, hidden=x[-1:])]), repeats)
        out.append(TypeTiming(q, decode, prefill / prefill_tokens))
    return out
