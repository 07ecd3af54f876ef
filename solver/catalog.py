"""Realistic inputs for studies: real model shapes, a documented sensitivity proxy, and
seeded random heterogeneous fleets of the devices in solver/devices.py.
"""
from __future__ import annotations

import math
import random

from solver.devices import DEVICES, declared_speed
from solver.problem import Fleet, Link, ModelProfile, Node, model_from_shape

# public config.json shapes: layers, hidden, heads, KV heads, FFN, vocab, tied embeddings
MODEL_SHAPES: dict[str, tuple] = {
    "llama-3.2-1b": (16, 2048, 32, 8, 8192, 128256, True),
    "llama-3.2-3b": (28, 3072, 24, 8, 8192, 128256, True),
    "llama-3.1-8b": (32, 4096, 32, 8, 14336, 128256, False),
    "qwen2.5-7b": (28, 3584, 28, 4, 18944, 152064, False),
    "llama-3-70b": (80, 8192, 64, 8, 28672, 128256, False),
    "llama-3.1-405b": (126, 16384, 128, 8, 53248, 128256, False),
}

# Whole-model perplexity increase of each type on LLaMA-v1-7B (base perplexity 5.91, wikitext),
# as printed by llama.cpp's `llama-quantize --help` (QUANT_OPTIONS; the *_S mixes for K types).
LLAMA_CPP_PPL_INCREASE = {"F16": 0.0, "Q8_0": 0.0004, "Q6_K": 0.0008, "Q5_K": 0.0400, "Q5_0": 0.0683,
                          "Q4_K": 0.0992, "Q4_0": 0.2166, "Q3_K": 0.5551, "Q2_K": 0.6717}
LLAMA_V1_7B_PPL = 5.91


def proxy_sensitivity(n_layer: int) -> list[dict[str, float]]:
    """ΔNLL per layer and type when not measured: the whole-model ΔNLL of llama.cpp's table,
    spread over layers with weights that make the first layers (and to a lesser degree the
    last) more sensitive, as measured on our reference model and reported for llama models."""
    raw = [1.0 + 1.5 * math.exp(-l / 2.0) + 1.0 * math.exp(-(n_layer - 1 - l) / 2.0) for l in range(n_layer)]
    total = sum(raw)
    out = []
    for r in raw:
        out.append({q: math.log1p(d / LLAMA_V1_7B_PPL) * r / total for q, d in LLAMA_CPP_PPL_INCREASE.items()})
    return out


def model_profile(name: str) -> ModelProfile:
    if name not in MODEL_SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known: {', '.join(MODEL_SHAPES)}")
    n_layer, d, h, hkv, ff, vocab, tied = MODEL_SHAPES[name]
    return model_from_shape(name, n_layer, d, h, hkv, ff, vocab, tied, proxy_sensitivity(n_layer),
                            sensitivity_source="proxy: llama.cpp quantize table spread over layers")


def device_node(name: str, device: str, memory_fraction: float = 1.0, address: str = "") -> Node:
    d = DEVICES[device]
    return Node(name=name, memory=int(d["memory"] * memory_fraction),
                speed=declared_speed(d["memory_bandwidth"], d["flops"], d.get("efficiency")), address=address)


def random_fleet(n_nodes: int, seed: int, devices: tuple[str, ...] = tuple(DEVICES)) -> Fleet:
    """A heterogeneous edge fleet: devices drawn from the catalog with 60–100 % of their memory
    free, on 1–3 switches (1 Gbit wired or 100–400 Mbit Wi-Fi access links, 0.2–3 ms), the
    switches joined by 1 Gbit uplinks. Some devices repeat with equal figures, as real fleets do."""
    rng = random.Random(seed)
    n_switch = 1 if n_nodes <= 4 else rng.randint(2, 3)
    nodes, links = [], []
    for i in range(n_nodes):
        dev = rng.choice(devices)
        frac = rng.choice((0.6, 0.8, 1.0))
        nodes.append(device_node(f"{dev.split('-')[0]}{i}", dev, frac))
        sw = f"sw{rng.randrange(n_switch)}"
        if rng.random() < 0.6:
            links.append(Link(sw, nodes[-1].name, 125e6, 0.0002))
        else:
            links.append(Link(sw, nodes[-1].name, rng.choice((12.5e6, 25e6, 50e6)), rng.choice((0.001, 0.003))))
    for s in range(1, n_switch):
        links.append(Link("sw0", f"sw{s}", 125e6, 0.0005))
    return Fleet(nodes=tuple(nodes), links=tuple(links), controller="sw0")
