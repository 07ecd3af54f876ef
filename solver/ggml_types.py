"""GGUF tensor types: sizes, llama.cpp's mixes, and the type a tensor really gets when its
rows do not split into a type's blocks (llama.cpp's own rules, src/llama-quant.cpp
`llama_tensor_get_type` and `tensor_type_fallback` in the llama.cpp that llama-cpp-python
0.3.36 vendors).

A layer type is a GGML type (every matrix of the layer at that type) or one of llama.cpp's
mixes, the names `llama-quantize` takes (Q4_K_M: Q4_K, with Q6_K for attn_v and ffn_down in
some layers). The one place these facts live: the solver's model profile, the shard builder
and the agent's memory admission all ask here. Pure Python on the gguf package's block table.
"""
from __future__ import annotations

import gguf

# Types a plan chooses among for an F16 master, best quality first (names as llama.cpp prints them).
LAYER_TYPES: tuple[str, ...] = ("F16", "Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K", "Q4_0", "Q3_K", "Q2_K")
# Every type a layer may have, best quality first: LAYER_TYPES, the types a quantized master
# may store, which its layers can keep (the bytes are copied, nothing is lost), and MIXES.
TYPE_ORDER: tuple[str, ...] = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_K", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S",
                               "Q4_K", "Q4_1", "Q4_0", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q3_K", "Q2_K")
# llama.cpp's mixes (llama-quantize's names) and the GGML type most of their matrices get.
# llama.cpp's "Q2_K" file is a mix too, but here Q2_K is the GGML type on every matrix.
MIXES = {"Q5_K_M": "Q5_K", "Q5_K_S": "Q5_K", "Q4_K_M": "Q4_K", "Q4_K_S": "Q4_K", "Q3_K_L": "Q3_K", "Q3_K_M": "Q3_K",
         "Q3_K_S": "Q3_K"}
# general.file_type (llama_ftype in llama.h) of the files llama.cpp's quantizer writes as a mix
MIX_FILE_TYPES = {11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M"}

# A 256-block type on rows that are not a multiple of 256 becomes this 32-block type.
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def _more_bits(layer: int, n_layer: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers and every third between."""
    return layer < n_layer // 8 or layer >= 7 * n_layer // 8 or (layer - n_layer // 8) % 3 == 2


def llama_70b(n_layer: int, n_head: int, n_head_kv: int) -> bool:
    """Whether llama.cpp takes a model for a 70B one (80 layers with grouped-query attention),
    whose attn_v its K mixes give Q5_K instead of Q3_K or Q4_K."""
    return n_layer == 80 and n_head_kv < n_head


def matrix_type(name: str, matrix: str, n_per_row: int, layer: int = 0, n_layer: int = 1, big: bool = False) -> str:
    """The type a layer's matrix (attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up or
    ffn_down) with rows of n_per_row elements is stored at when its layer is asked for `name`:
    a GGML type as it is; a mix as llama.cpp chooses for that matrix of layer `layer` of
    n_layer (big: llama_70b); then llama.cpp's fallback (stored_type)."""
    base = MIXES.get(name)
    if base is None:
        return stored_type(name, n_per_row)
    q, more = base, _more_bits(layer, n_layer)
    if matrix == "attn_v":
        if name == "Q3_K_M":
            q = "Q5_K" if layer < 2 else "Q4_K"
        elif name == "Q3_K_L":
            q = "Q5_K"
        elif name in ("Q4_K_M", "Q5_K_M") and more:
            q = "Q6_K"
        elif name == "Q4_K_S" and layer < 4:
            q = "Q5_K"
        if big and q in ("Q3_K", "Q4_K"):
            q = "Q5_K"
    elif matrix == "ffn_down":
        if name == "Q3_K_M":
            q = "Q5_K" if layer < n_layer // 16 else "Q4_K"
        elif name == "Q3_K_L":
            q = "Q5_K"
        elif name in ("Q4_K_M", "Q5_K_M") and more:
            q = "Q6_K"
        elif name == "Q4_K_S" and layer < n_layer // 8:
            q = "Q5_K"
    elif matrix == "attn_output" and name in ("Q3_K_M", "Q3_K_L"):
        q = "Q4_K" if name == "Q3_K_M" else "Q5_K"
    return stored_type(q, n_per_row)


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
    """A layer type as a user may type it ("q4_k", "Q8_0", "q4_k_m"), checked against TYPE_ORDER."""
    name = text.strip().upper()
    if name not in TYPE_ORDER:
        raise ValueError(f"unsupported GGUF type {text.strip()!r} for a layer; choose from {', '.join(TYPE_ORDER)}")
    return name
