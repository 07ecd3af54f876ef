"""GGUF quantization types: llama.cpp's own quantizers (through ctypes) and torch dequantizers.

Quantization calls `ggml_quantize_chunk` from the libggml that llama-cpp-python ships, so a
tensor quantized here has exactly the bytes llama.cpp's own tools would write.
Dequantization is done in torch, block-wise, and follows the gguf package's numpy reference
(`gguf.quants`) operation for operation so that the float32 results agree bit for bit
(tests/test_quant.py checks every type against it).

A weight matrix stays quantized in memory as a `QTensor` (raw GGUF bytes in a uint8 tensor);
`QTensor.dequantize()` builds a float32 copy of that one matrix only for the duration of a
matmul, so a stage never holds a float copy of all its weights.
"""
from __future__ import annotations

import ctypes
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

log = logging.getLogger(__name__)

QK_K = 256

# Types a layer may be assigned, from most to least precise. Names are GGUF type names.
LAYER_TYPES: tuple[str, ...] = ("F16", "Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K", "Q4_0", "Q3_K", "Q2_K")
# Types a tensor may have in a file we load (norms and biases are F32).
LOADABLE_TYPES: tuple[str, ...] = LAYER_TYPES + ("F32", "BF16")


def ggml_type(name: str) -> GGMLQuantizationType:
    """GGML type enum for a GGUF type name such as "Q4_K"; ValueError if unsupported."""
    if name not in LOADABLE_TYPES:
        raise ValueError(f"unsupported GGUF type {name!r}; supported: {', '.join(LAYER_TYPES)}")
    return GGMLQuantizationType[name]


def block_shape(name: str) -> tuple[int, int]:
    """(elements per block, bytes per block) of a GGUF type."""
    return GGML_QUANT_SIZES[ggml_type(name)]


def row_bytes(name: str, n_per_row: int) -> int:
    """Bytes of one row of n_per_row elements at a GGUF type."""
    block, size = block_shape(name)
    if n_per_row % block:
        raise ValueError(f"a row of {n_per_row} elements cannot be stored as {name} (blocks of {block})")
    return n_per_row // block * size


def bits_per_weight(name: str) -> float:
    block, size = block_shape(name)
    return 8.0 * size / block


# ------------------------------------------------------------------ quantize (llama.cpp's code)

@functools.cache
def _libggml() -> ctypes.CDLL:
    import llama_cpp  # lazily: only shard building needs it

    lib_dir = Path(llama_cpp.__file__).resolve().parent / "lib"
    for name in ("libggml-base.so", "libggml.so", "libggml-base.dylib", "libggml.dylib"):
        path = lib_dir / name
        if path.exists():
            lib = ctypes.CDLL(str(path))
            break
    else:
        raise RuntimeError(f"libggml not found in {lib_dir}; reinstall llama-cpp-python")
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
    ]
    return lib


def quantize(weights: np.ndarray, name: str) -> np.ndarray:
    """Quantize a 2-D float array [rows, n_per_row] to GGUF type `name` with llama.cpp.

    Returns uint8 bytes shaped [rows, row_bytes(name, n_per_row)] (F32 returns float32 rows).
    """
    src = np.ascontiguousarray(weights, dtype=np.float32)
    if src.ndim == 1:
        src = src.reshape(1, -1)
    if src.ndim != 2:
        raise ValueError(f"quantize expects a 2-D array, got shape {weights.shape}")
    if name == "F32":
        return src.copy()
    rows, n_per_row = src.shape
    dst = np.empty((rows, row_bytes(name, n_per_row)), dtype=np.uint8)
    written = _libggml().ggml_quantize_chunk(
        int(ggml_type(name)), src.ctypes.data, dst.ctypes.data, 0, rows, n_per_row, None)
    assert written == dst.nbytes, (written, dst.nbytes)
    return dst


# ------------------------------------------------------------------ dequantize (torch)

def _f16(raw: torch.Tensor) -> torch.Tensor:
    """[n, 2] uint8 -> [n, 1] float32 via float16."""
    return raw.contiguous().view(torch.float16).to(torch.float32)


def _shift(x: torch.Tensor, shifts: list[int], dim_shape: tuple[int, ...]) -> torch.Tensor:
    return torch.bitwise_right_shift(x, torch.tensor(shifts, dtype=torch.uint8).reshape(dim_shape))


def _bits_le(raw: torch.Tensor, nbits: int) -> torch.Tensor:
    """[n, nbits/8] uint8 little-endian bitfield -> [n, nbits] uint8 of 0/1."""
    bits = _shift(raw.reshape(raw.shape[0], -1, 1), list(range(8)), (1, 1, 8)) & 1
    return bits.reshape(raw.shape[0], nbits)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = _f16(b[:, :2])
    qs = _shift(b[:, 2:].reshape(n, -1, 1, 16), [0, 4], (1, 1, 2, 1))
    qs = (qs & 0x0F).reshape(n, -1).to(torch.int8) - 8
    return d * qs.to(torch.float32)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = _f16(b[:, :2])
    qh = _bits_le(b[:, 2:6], 32)
    ql = _shift(b[:, 6:].reshape(n, -1, 1, 16), [0, 4], (1, 1, 2, 1))
    ql = (ql & 0x0F).reshape(n, -1)
    qs = (ql | (qh << 4)).to(torch.int8) - 16
    return d * qs.to(torch.float32)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    x = b[:, 2:].contiguous().view(torch.int8).to(torch.float32)
    return x * d


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0xF).to(torch.float32)).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).reshape(n, 16, 1)
    q = _shift(qs.reshape(n, -1, 1, 32), [0, 2, 4, 6], (1, 1, 4, 1)) & 3
    q = q.reshape(n, 16, 16).to(torch.float32)
    return (dl * q - ml).reshape(n, -1)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, scales = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = _f16(b[:, 108:110])
    lsc = _shift(scales[:, :8].reshape(n, 1, 8), [0, 4], (1, 2, 1)).reshape(n, 16)
    hsc = _shift(scales[:, 8:].reshape(n, 1, 4), [0, 2, 4, 6], (1, 4, 1)).reshape(n, 16)
    sc = (lsc & 0x0F) | ((hsc & 0x03) << 4)
    sc = (sc.to(torch.int8) - 32).to(torch.float32)
    dl = (d * sc).reshape(n, 16, 1)
    ql = _shift(qs.reshape(n, -1, 1, 32), [0, 2, 4, 6], (1, 1, 4, 1)).reshape(n, 16, 16) & 3
    qh = _shift(hmask.reshape(n, -1, 1, 32), list(range(8)), (1, 1, 8, 1)).reshape(n, 16, 16) & 1
    qh = qh ^ 1
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).to(torch.float32)
    return (dl * q).reshape(n, QK_K)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, m_d = s[:, 0:1], s[:, 1:2], s[:, 2:3]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.reshape(n, 8), mn.reshape(n, 8)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, m = _scale_min_k4(b[:, 4:16])
    d = (d * sc.to(torch.float32)).reshape(n, -1, 1)
    dm = (dmin * m.to(torch.float32)).reshape(n, -1, 1)
    qs = _shift(b[:, 16:].reshape(n, -1, 1, 32), [0, 4], (1, 1, 2, 1))
    qs = (qs & 0x0F).reshape(n, -1, 32).to(torch.float32)
    return (d * qs - dm).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, m = _scale_min_k4(b[:, 4:16])
    qh, qs = b[:, 16:48], b[:, 48:]
    d = (d * sc.to(torch.float32)).reshape(n, -1, 1)
    dm = (dmin * m.to(torch.float32)).reshape(n, -1, 1)
    ql = (_shift(qs.reshape(n, -1, 1, 32), [0, 4], (1, 1, 2, 1)) & 0x0F).reshape(n, -1, 32)
    qh = (_shift(qh.reshape(n, -1, 1, 32), list(range(8)), (1, 1, 8, 1)) & 1).reshape(n, -1, 32)
    q = (ql | (qh << 4)).to(torch.float32)
    return (d * q - dm).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh, scales = b[:, :128], b[:, 128:192], b[:, 192:208]
    sc = scales.contiguous().view(torch.int8).to(torch.float32)
    d = _f16(b[:, 208:210])
    d = (d * sc).reshape(n, 16, 1)
    ql = (_shift(ql.reshape(n, -1, 1, 64), [0, 4], (1, 1, 2, 1)) & 0x0F).reshape(n, -1, 32)
    qh = (_shift(qh.reshape(n, -1, 1, 32), [0, 2, 4, 6], (1, 1, 4, 1)) & 3).reshape(n, -1, 32)
    q = (ql | (qh << 4)).to(torch.int8) - 32
    q = q.reshape(n, 16, -1).to(torch.float32)
    return (d * q).reshape(n, QK_K)


def _f16_blocks(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).to(torch.float32)


def _bf16_blocks(b: torch.Tensor) -> torch.Tensor:
    return (b.contiguous().view(torch.int16).to(torch.int32) << 16).view(torch.float32)


def _f32_blocks(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float32)


_DEQUANT = {
    "F32": _f32_blocks, "F16": _f16_blocks, "BF16": _bf16_blocks,
    "Q4_0": _q4_0, "Q5_0": _q5_0, "Q8_0": _q8_0,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}


def dequantize(raw: torch.Tensor, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw GGUF bytes (uint8, any shape) of type `name` -> float32 tensor of `shape`."""
    block, size = block_shape(name)
    blocks = raw.reshape(-1, size)
    return _DEQUANT[name](blocks).reshape(shape)


@dataclass
class QTensor:
    """A weight kept in its GGUF encoding. shape is torch order: [out_features, in_features]."""

    raw: torch.Tensor            # uint8 bytes exactly as stored in the GGUF file
    qtype: str                   # GGUF type name
    shape: tuple[int, ...]

    @classmethod
    def from_bytes(cls, data: np.ndarray, qtype: str, shape: tuple[int, ...]) -> "QTensor":
        ggml_type(qtype)  # validates the name
        raw = torch.from_numpy(np.ascontiguousarray(data).view(np.uint8).reshape(-1).copy())
        return cls(raw=raw, qtype=qtype, shape=tuple(int(s) for s in shape))

    @classmethod
    def from_float(cls, weights: np.ndarray, qtype: str) -> "QTensor":
        """Quantize a float matrix [out, in] with llama.cpp's quantizer."""
        w = np.asarray(weights, dtype=np.float32)
        return cls.from_bytes(quantize(w.reshape(-1, w.shape[-1]), qtype), qtype, w.shape)

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.raw, self.qtype, self.shape)

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of a [vocab, dim] matrix, dequantizing only those rows."""
        rb = self.raw.numel() // self.shape[0]
        rows = self.raw.reshape(self.shape[0], rb)[ids.reshape(-1)]
        return dequantize(rows, self.qtype, (ids.numel(), self.shape[1])).reshape(*ids.shape, self.shape[1])


# ------------------------------------------------------------------ activations as llama.cpp sees them
#
# llama.cpp's CPU matmul converts the activations to the weight type's "vec_dot_type" before
# the dot products: F16 for F16 weights, Q8_0 for Q8_0/Q5_0/Q4_0, Q8_K for the K-quants.
# Rounding x the same way here is what makes our logits agree with llama.cpp's (the dot
# products then differ only in float summation order).

def _act_q8_0(x: torch.Tensor) -> torch.Tensor:
    # ggml quantize_row_q8_0: d = amax/127 stored as f16, q = round(x * 127/amax)
    b = x.reshape(-1, 32)
    amax = b.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(b * inv)
    return ((amax / 127.0).half().float() * q).reshape(x.shape)


def _act_q8_k(x: torch.Tensor) -> torch.Tensor:
    # ggml quantize_row_q8_K_ref: iscale = -127/max (max = the signed value of largest |x|),
    # q = min(127, nearest_int(iscale * x)), d = 1/iscale (float32)
    b = x.reshape(-1, QK_K)
    mx = b.gather(-1, b.abs().argmax(-1, keepdim=True))
    iscale = torch.where(mx != 0, -127.0 / mx, torch.zeros_like(mx))
    q = torch.round(iscale * b).clamp(max=127)
    d = torch.where(mx != 0, 1.0 / iscale, torch.zeros_like(mx))
    return (d * q).reshape(x.shape)


def _act_f16(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


def _act_bf16(x: torch.Tensor) -> torch.Tensor:
    return x.bfloat16().float()


_ACT = {"F16": _act_f16, "BF16": _act_bf16, "Q8_0": _act_q8_0, "Q5_0": _act_q8_0, "Q4_0": _act_q8_0,
        "Q2_K": _act_q8_k, "Q3_K": _act_q8_k, "Q4_K": _act_q8_k, "Q5_K": _act_q8_k, "Q6_K": _act_q8_k}


def as_llama_cpp_activations(x: torch.Tensor, weight_type: str) -> torch.Tensor:
    """x [..., in] rounded as llama.cpp's CPU backend rounds it for a `weight_type` matmul."""
    act = _ACT.get(weight_type)
    return act(x.contiguous()) if act is not None else x


# Largest float32 slice of a weight matrix dequantized at once: bounds a stage's working
# memory on big models (the cost model's runtime memory assumes the same figure).
DEQUANT_CHUNK_BYTES = 64 * 2 ** 20


def linear(x: torch.Tensor, w: QTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ w^T -> [..., out], dequantizing w for this call only, in row slices of at
    most DEQUANT_CHUNK_BYTES (each row is whole blocks, so slices are exact)."""
    xa = as_llama_cpp_activations(x, w.qtype)
    out_f, in_f = w.shape
    rows = max(1, DEQUANT_CHUNK_BYTES // (4 * in_f))
    if rows >= out_f:
        return torch.nn.functional.linear(xa, w.dequantize(), bias)
    rb = w.raw.numel() // out_f
    raw = w.raw.reshape(out_f, rb)
    parts = [torch.nn.functional.linear(xa, dequantize(raw[a:a + rows], w.qtype, (min(rows, out_f - a), in_f)))
             for a in range(0, out_f, rows)]
    y = torch.cat(parts, dim=-1)
    return y + bias if bias is not None else y
