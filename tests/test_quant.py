"""Quantization and dequantization are llama.cpp's own code (through ctypes): the floats equal
the gguf package's numpy reference bit for bit, and the bytes equal it where gguf documents
its quantizer as exact."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as ref_dequantize
from gguf.quants import quantize as ref_quantize

from agent.quant import dequantize, quantize, row_bytes
from solver.ggml_types import LAYER_TYPES, bits_per_weight


@pytest.mark.parametrize("qtype", LAYER_TYPES + ("BF16", "Q4_1", "Q5_1", "IQ4_NL"))
def test_dequantize_matches_gguf_reference_bit_for_bit(qtype):
    rng = np.random.default_rng(abs(hash(qtype)) % 2**32)
    w = (rng.standard_normal((64, 512)) * rng.uniform(0.01, 3, size=(64, 1))).astype(np.float32)
    w[3, :256] = 0.0                      # an all-zero block
    w[5, 7] = 40.0                        # an outlier
    raw = quantize(w, qtype)
    ours = dequantize(raw, qtype, w.size).reshape(w.shape)
    ref = ref_dequantize(raw, GGMLQuantizationType[qtype])
    assert ours.dtype == np.float32
    assert np.array_equal(ours.view(np.uint32), ref.reshape(w.shape).view(np.uint32)), f"{qtype}: not bit-identical"


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_0", "F16"])
def test_llama_cpp_quantizer_agrees_with_gguf_for_reference_types(qtype):
    # gguf's numpy quantizers for these types are documented as bit-exact with ggml's.
    w = np.random.default_rng(1).standard_normal((16, 256)).astype(np.float32)
    assert np.array_equal(quantize(w, qtype), ref_quantize(w, GGMLQuantizationType[qtype]).view(np.uint8).reshape(16, -1))


def test_quantization_error_shrinks_with_bits():
    w = np.random.default_rng(2).standard_normal((128, 256)).astype(np.float32)
    errs = {t: float(np.sqrt(np.mean((dequantize(quantize(w, t), t, w.size) - w.reshape(-1)) ** 2)))
            for t in LAYER_TYPES}
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
    with pytest.raises(ValueError, match="unknown GGUF type 'Q9_9'"):
        quantize(np.zeros((1, 256), np.float32), "Q9_9")
    with pytest.raises(ValueError, match="do not hold"):
        dequantize(np.zeros(10, np.uint8), "Q8_0", 32)
