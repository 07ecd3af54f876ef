"""GGUF tensor types: sizes, and the type a tensor really gets when its rows do not split
into a type's blocks (llama.cpp's own rule, src/llama-quant.cpp `tensor_type_fallback` in
the llama.cpp that llama-cpp-python 0.3.36 vendors).

The one place these facts live: the solver's model profile, the shard builder and the
agent's memory admission all ask here. Pure Python on the gguf package's block table.
"""
from __future__ import annotations

import gguf

# Types a plan chooses among for an F16 master, best quality first (names as llama.cpp prints them).
LAYER_TYPES: tuple[str, ...] = ("F16", "Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K", "Q4_0", "Q3_K", "Q2_K")
# Every type a layer may have, best quality first: LAYER_TYPES and the types a quantized
# master may store, which its layers can keep (the bytes are copied, nothing is lost).
TYPE_ORDER: tuple[str, ...] = ("F16", "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "Q3_K",
                               "Q2_K")

# A 256-block type on rows that are not a multiple of 256 becomes this 32-block type.
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def known(name: str) -> bool:
    return name in gguf.GGMLQuantizationType.__members__


def block(name: str) -> tuple[int, int]:
    """(elements per block, bytes per block) of a GGUF type."""
    if not known(name):
        raise ValueError(f"unknown GGUF type {name!r}; layer types are {', '.join(TYPE_ORDER)}")
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]


def stored_type(name: str, n_per_row: int) -> str:
    """The type a tensor with rows of n_per_row elements gets when `name` is asked for."""
    elems, _ = block(name)
    if n_per_row % elems == 0:
        return name
    fallback = FALLBACK.get(name, name)
    return fallback if n_per_row % block(fallback)[0] == 0 else "F16"


def tensor_bytes(name: str, rows: int, n_per_row: int) -> int:
    """Bytes of a [rows, n_per_row] tensor asked for at `name` (after the fallback)."""
    elems, size = block(stored_type(name, n_per_row))
    return rows * (n_per_row // elems) * size


def bits_per_weight(name: str) -> float:
    elems, size = block(name)
    return 8.0 * size / elems


def parse_type(text: str) -> str:
    """A layer type as a user may type it ("q4_k", "Q8_0"), checked against TYPE_ORDER."""
    name = text.strip().upper()
    if name not in TYPE_ORDER:
        raise ValueError(f"unsupported GGUF type {text.strip()!r} for a layer; choose from {', '.join(TYPE_ORDER)}")
    return name
