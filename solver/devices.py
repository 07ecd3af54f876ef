"""The device catalog: edge devices with published figures, and the per-type speeds those
figures declare.

Declared speeds are roofline figures (peak memory bandwidth and FLOP/s from the vendors'
spec pages) times an efficiency per type (DEFAULT_EFFICIENCY, an assumption documented in
docs/cost-model.md); an agent's measured profile replaces them for a real fleet. Below
solver/problem.py (which reads `device:` entries of fleet files) and solver/catalog.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from solver.ggml_types import MIXES, TYPE_ORDER

GiB = 1024 ** 3


@dataclass(frozen=True)
class TypeSpeed:
    decode_bytes_per_s: float   # effective weight bytes/s of a batch-1 decode step at this type
    prefill_flops: float        # effective FLOP/s of a prefill (many tokens) at this type
    # attention's own FLOP/s over cached positions, measured apart (agent/profile.py) because
    # llama.cpp's CPU attention is several times slower per FLOP than its matrix products;
    # 0 = not measured: attention counts at prefill_flops, inside the roofline (solver/cost.py)
    attention_flops: float = 0.0          # prompt tokens (many queries at once)
    decode_attention_flops: float = 0.0   # decode steps (one query per sequence)
    # a step of several tokens streams the weights once at this rate, then each token's
    # FLOPs follow at prefill_flops (llama.cpp's multi-token path; agent/profile.py:fit_step);
    # 0 = not measured: such a step is a roofline (solver/cost.py)
    batch_bytes_per_s: float = 0.0


# fraction of peak (memory bandwidth, FLOP/s) reached at each type: dequantization costs
# compute, so lower-bit types read fewer bytes but reach a smaller share of the bandwidth.
DEFAULT_EFFICIENCY = {
    "F16": (0.70, 0.50), "Q8_0": (0.65, 0.45), "Q6_K": (0.55, 0.35), "Q5_K": (0.55, 0.35),
    "Q5_1": (0.55, 0.35), "Q5_0": (0.55, 0.35), "Q4_K": (0.60, 0.40), "Q4_1": (0.60, 0.40), "Q4_0": (0.60, 0.40),
    "Q3_K": (0.50, 0.30), "Q2_K": (0.50, 0.30),
}
DEFAULT_EFFICIENCY.update({m: DEFAULT_EFFICIENCY[base] for m, base in MIXES.items()})   # a mix: its base type's


def declared_speed(bandwidth: float, flops: float, efficiency: dict | None = None,
                   types=TYPE_ORDER) -> dict[str, TypeSpeed]:
    """Per-type speeds from peak figures times each type's efficiency (one share, or a
    (memory, compute) pair)."""
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
        "efficiency": {q: (0.8, 0.6) for q in TYPE_ORDER}},
}
