"""Quantization uses llama.cpp's code; torch dequantization equals gguf's reference bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as ref_dequantize
from gguf.quants import quantize as ref_quantize

from agent.quant import LAYER_TYPES, QTensor, bits_per_weight, dequantize, quantize, row_bytes


@pytest.mark.parametrize("qtype", LAYER_TYPES + ("BF16",))
def test_dequantize_matches_gguf_reference_bit_for_bit(qtype):
    rng = np.random.default_rng(hash(qtype) % 2**32)
    w = (rng.standard_normal((64, 512)) * rng.uniform(0.01, 3, size=(64, 1))).astype(np.float32)
    w[3, :256] = 0.0                      # an all-zero block
    w[5, 7] = 40.0                        # an outlier
    raw = quantize(w, qtype) if qtype != "BF16" else ref_quantize(w, GGMLQuantizationType.BF16)
    ours = dequantize(torch.from_numpy(raw), qtype, w.shape).numpy()
    ref = ref_dequantize(raw, GGMLQuantizationType[qtype])
    assert ours.dtype == np.float32 and ours.shape == w.shape
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32)), f"{qtype}: not bit-identical"


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_0", "F16"])
def test_llama_cpp_quantizer_agrees_with_gguf_for_reference_types(qtype):
    # gguf's numpy quantizers for these types are documented as bit-exact with ggml's.
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 256)).astype(np.float32)
    assert np.array_equal(quantize(w, qtype), ref_quantize(w, GGMLQuantizationType[qtype]).view(np.uint8).reshape(16, -1))


def test_quantization_error_shrinks_with_bits():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((128, 256)).astype(np.float32)
    errs = {t: float(np.sqrt(np.mean((QTensor.from_float(w, t).dequantize().numpy() - w) ** 2))) for t in LAYER_TYPES}
    order = sorted(LAYER_TYPES, key=bits_per_weight)
    assert errs["F16"] < 1e-3 and errs["Q2_K"] > 0.1
    for lo, hi in zip(order, order[1:]):
        if bits_per_weight(lo) < bits_per_weight(hi) - 0.6:  # clearly more bits => clearly less error
            assert errs[hi] < errs[lo], (lo, hi, errs)


def test_sizes_and_errors():
    assert row_bytes("Q4_K", 256) == 144 and row_bytes("Q8_0", 256) == 272 and row_bytes("F16", 256) == 512
    assert bits_per_weight("Q4_K") == 4.5
    with pytest.raises(ValueError, match="cannot be stored as Q4_K"):
        row_bytes("Q4_K", 100)
    with pytest.raises(ValueError, match="unsupported GGUF type 'Q9_9'"):
        quantize(np.zeros((1, 256), np.float32), "Q9_9")


def test_embedding_rows_match_full_dequantization():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((50, 256)).astype(np.float32)
    q = QTensor.from_float(w, "Q6_K")
    ids = torch.tensor([[3, 49], [0, 3]])
    assert torch.equal(q.embedding(ids), q.dequantize()[ids])


def test_linear_in_row_slices_equals_whole_matrix(monkeypatch):
    """Big matrices are dequantized a slice of rows at a time; the result is the same."""
    from agent import quant as Q
    g = torch.Generator().manual_seed(0)
    w = Q.QTensor.from_float(torch.randn(96, 256, generator=g).numpy(), "Q4_K")
    x = torch.randn(3, 256, generator=g)
    bias = torch.randn(96, generator=g)
    whole = Q.linear(x, w, bias)
    monkeypatch.setattr(Q, "DEQUANT_CHUNK_BYTES", 4 * 256 * 10)   # 10 rows per slice
    sliced = Q.linear(x, w, bias)
    # The slices dequantize the same floats; only the order of the float32 sums differs
    # (BLAS blocking, the bias added apart). Any two orders of a K-term sum differ by at most
    # 2·γ_K·Σ|terms| with γ_K = K·u/(1 − K·u), u = 2^-24 (Higham, Accuracy and Stability, §3.1).
    K, u = 256 + 1, 2.0 ** -24
    gamma = K * u / (1 - K * u)
    bound = 2 * gamma * (x.abs() @ w.dequantize().abs().T + bias.abs())
    assert bool(((whole - sliced).abs() <= bound).all())
