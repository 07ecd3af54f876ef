"""llama.cpp's own quantizers and dequantizers, called through ctypes on the libggml that
llama-cpp-python ships: a tensor quantized here has exactly the bytes llama.cpp's tools
would write, and a row dequantized here has exactly the floats llama.cpp computes with
(`get_rows` on the CPU uses the same `to_float` of the type's traits).
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from solver.ggml_types import block, llama_70b, matrix_type


@functools.cache
def libggml() -> ctypes.CDLL:
    import llama_cpp  # lazily: loads the shared libraries llama-cpp-python was built with

    lib_dir = Path(llama_cpp.__file__).resolve().parent / "lib"
    for name in ("libggml-base.so", "libggml-base.dylib"):
        if (lib_dir / name).exists():
            lib = ctypes.CDLL(str(lib_dir / name))
            break
    else:
        raise RuntimeError(f"libggml-base not found in {lib_dir}; reinstall llama-cpp-python")
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return lib


_ToFloat = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class _TypeTraits(ctypes.Structure):
    # struct ggml_type_traits in ggml.h
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


def _type_id(name: str) -> int:
    block(name)   # a clear error for an unknown name
    return int(GGMLQuantizationType[name])


def row_bytes(name: str, n_per_row: int) -> int:
    """Bytes of one row of n_per_row elements at a GGUF type."""
    elems, size = block(name)
    if n_per_row % elems:
        raise ValueError(f"a row of {n_per_row} elements cannot be stored as {name} (blocks of {elems})")
    return n_per_row // elems * size


def quantize(weights: np.ndarray, name: str) -> np.ndarray:
    """Quantize float rows [rows, n_per_row] to GGUF type `name` with llama.cpp's quantizer.

    Returns the raw bytes as uint8 [rows, row_bytes] (float32 rows for F32)."""
    src = np.ascontiguousarray(weights, dtype=np.float32)
    src = src.reshape(1, -1) if src.ndim == 1 else src
    if src.ndim != 2:
        raise ValueError(f"quantize expects a 2-D array, got shape {weights.shape}")
    if name == "F32":
        return src.copy()
    rows, n_per_row = src.shape
    t = _type_id(name)
    if libggml().ggml_quantize_requires_imatrix(t):
        raise ValueError(f"{name} needs an importance matrix, which edgefleet does not compute; choose another type")
    dst = np.empty((rows, row_bytes(name, n_per_row)), dtype=np.uint8)
    written = libggml().ggml_quantize_chunk(t, src.ctypes.data, dst.ctypes.data, 0, rows, n_per_row, None)
    assert written == dst.nbytes, (written, dst.nbytes)
    return dst


@functools.cache
def _to_float(name: str):
    traits = libggml().ggml_get_type_traits(_type_id(name)).contents
    if not traits.to_float:
        raise ValueError(f"llama.cpp cannot convert {name} to float")
    return _ToFloat(traits.to_float)


def dequantize(raw: np.ndarray, name: str, n_elements: int) -> np.ndarray:
    """Raw GGUF bytes of `n_elements` values at type `name` -> float32 [n_elements]."""
    data = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if name == "F32":
        return data.view(np.float32)[:n_elements].copy()
    if name == "F16":       # IEEE half to single is exact: what ggml's to_float gives, without a call through ctypes
        if data.nbytes < 2 * n_elements:
            raise ValueError(f"{data.nbytes} bytes do not hold {n_elements} F16 values")
        return data.view(np.float16)[:n_elements].astype(np.float32)
    elems, size = block(name)
    if n_elements % elems or data.nbytes < n_elements // elems * size:
        raise ValueError(f"{data.nbytes} bytes do not hold {n_elements} {name} values")
    out = np.empty(n_elements, dtype=np.float32)
    _to_float(name)(data.ctypes.data, out.ctypes.data, n_elements)
    return out


def requantize(t, qtype: str, layer: int, cfg) -> tuple[np.ndarray, GGMLQuantizationType]:
    """A matrix of layer `layer` (a tensor of a GGUFReader, named blk.N.MATRIX.weight) as
    layer type `qtype` asks (a GGML type or a llama.cpp mix, solver/ggml_types.matrix_type),
    with llama.cpp's fallback where its rows do not split into that type's blocks: (raw data,
    stored type). cfg: the model's agent.weights.ModelConfig. The bytes are copied when the
    tensor already has that type, else dequantized and quantized with llama.cpp's code."""
    n_per_row = int(t.shape[0])
    target = matrix_type(qtype, t.name.split(".")[2], n_per_row, layer, cfg.n_layer,
                         llama_70b(cfg.n_layer, cfg.n_head, cfg.n_head_kv))
    if target == t.tensor_type.name:
        return np.asarray(t.data), t.tensor_type
    rows = dequantize(np.asarray(t.data), t.tensor_type.name, int(t.n_elements)).reshape(-1, n_per_row)
    return quantize(rows, target), GGMLQuantizationType[target]
