"""Realistic inputs for studies: edge devices with published figures, real model shapes,
a documented sensitivity proxy, and seeded random heterogeneous fleets.

Declared speeds are roofline figures (peak memory bandwidth and FLOP/s from the vendors'
spec pages) times an efficiency per type (DEFAULT_EFFICIENCY, an assumption documented in
docs/cost-model.md); an agent's measured profile replaces them for a real fleet.
"""
from __future__ import annotations

import math
import random

from solver.problem import (GiB, LAYER_TYPES, Fleet, Link, ModelProfile, Node, TypeSpeed, model_from_shape)

# fraction of peak (memory bandwidth, FLOP/s) reached at each type: dequantization costs
# compute, so lower-bit types read fewer bytes but reach a smaller share of the bandwidth.
DEFAULT_EFFICIENCY = {
    "F16": (0.70, 0.50), "Q8_0": (0.65, 0.45), "Q6_K": (0.55, 0.35), "Q5_K": (0.55, 0.35),
    "Q5_0": (0.55, 0.35), "Q4_K": (0.60, 0.40), "Q4_0": (0.60, 0.40), "Q3_K": (0.50, 0.30),
    "Q2_K": (0.50, 0.30),
}


def declared_speed(bandwidth: float, flops: float, efficiency: dict | None = None,
                   types=LAYER_TYPES) -> dict[str, TypeSpeed]:
    eff = {**DEFAULT_EFFICIENCY, **(efficiency or {})}
    out = {}
    for q in types:
        e = eff[q]
        mem_e, cmp_e = (e, e) if isinstance(e, (int, float)) else e
        out[q] = TypeSpeed(bandwidth * mem_e, flops * cmp_e)
    return out


# memory: what the device may give the model (total minus OS and other work);
# memory_bandwidth / flops: vendor figures (fp32 peak for CPUs, fp16 non-tensor for GPUs).
DEVICES: dict[str, dict] = {
    "rpi4-4gb": {  # raspberrypi.com product brief: LPDDR4-3200, 32-bit bus; 4x Cortex-A72 @ 1.8 GHz
        "memory": 3.0 * GiB, "memory_bandwidth": 12.8e9, "flops": 4 * 1.8e9 * 8},
    "rpi5-8gb": {  # raspberrypi.com product brief: LPDDR4X-4267, 32-bit; 4x Cortex-A76 @ 2.4 GHz, 2x128-bit FMA
        "memory": 6.5 * GiB, "memory_bandwidth": 17.1e9, "flops": 4 * 2.4e9 * 16},
    "jetson-orin-nano-8gb": {  # NVIDIA Jetson Orin Nano datasheet: 68 GB/s LPDDR5; 1024 CUDA cores @ 625 MHz
        "memory": 6.0 * GiB, "memory_bandwidth": 68e9, "flops": 1024 * 625e6 * 2 * 2},
    "laptop-16gb": {  # DDR4-3200 dual channel (2 x 25.6 GB/s); 8 cores AVX2 @ 3 GHz, 2x256-bit FMA
        "memory": 12.0 * GiB, "memory_bandwidth": 51.2e9, "flops": 8 * 3.0e9 * 32},
    "mac-mini-m2-16gb": {  # apple.com M2 specs: 100 GB/s unified memory; 10-core GPU 3.6 TFLOPS fp32
        "memory": 12.0 * GiB, "memory_bandwidth": 100e9, "flops": 3.6e12},
    "desktop-rtx3060-12gb": {  # nvidia.com RTX 3060 specs: 360 GB/s GDDR6, 12.74 TFLOPS fp32
        "memory": 11.0 * GiB, "memory_bandwidth": 360e9, "flops": 12.74e12,
        "efficiency": {q: (0.8, 0.6) for q in LAYER_TYPES}},
}

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
