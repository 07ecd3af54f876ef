"""Build shards: GGUF files that hold one stage's tensors, quantized to the plan's per-layer types.

A shard keeps the master's metadata (so it is a self-describing llama-family GGUF) and adds
the edgefleet.* keys of agent/weights.py. Written for the whole layer range, the same code
produces a mixed-precision model that llama.cpp loads as is.
"""
from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

from agent import weights as W
from agent.quant import LAYER_TYPES, QTensor, quantize

log = logging.getLogger(__name__)

_LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    sha256: str          # of the shard file
    first: int
    last: int
    layer_types: tuple[str, ...]
    bytes: int           # file size


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def parse_types(spec: str, n_layer: int) -> list[str]:
    """Per-layer types from "Q4_K" (all layers), "Q8_0,Q4_K,..." (one per layer) or
    "0-3:Q8_0,4-7:Q4_K" (ranges, inclusive)."""
    spec = spec.strip()
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise ValueError("empty type list; give one GGUF type, one per layer, or ranges like 0-3:Q8_0")
    if all(":" in p for p in parts):
        types: list[str | None] = [None] * n_layer
        for p in parts:
            rng, t = p.split(":", 1)
            a, _, b = rng.partition("-")
            try:
                lo, hi = int(a), int(b or a)
            except ValueError:
                raise ValueError(f"bad layer range {rng!r} in {spec!r}; write e.g. 0-3:Q8_0") from None
            if not (0 <= lo <= hi < n_layer):
                raise ValueError(f"layer range {rng} is out of bounds for a model of {n_layer} layers")
            for i in range(lo, hi + 1):
                types[i] = t
        missing = [i for i, t in enumerate(types) if t is None]
        if missing:
            raise ValueError(f"no type given for layers {missing}; cover every layer 0-{n_layer - 1}")
        parts = types  # type: ignore[assignment]
    elif len(parts) == 1:
        parts = parts * n_layer
    elif len(parts) != n_layer:
        raise ValueError(f"{len(parts)} types given for a model of {n_layer} layers; give 1 or {n_layer}")
    for t in parts:
        if t not in LAYER_TYPES:
            raise ValueError(f"unsupported GGUF type {t!r}; choose from {', '.join(LAYER_TYPES)}")
    return list(parts)


def _copy_metadata(reader, writer: GGUFWriter) -> None:
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key.startswith("edgefleet."):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, f.contents(), vtype, sub_type=sub)


def _float_rows(t) -> np.ndarray:
    """A master tensor as float32 [rows, n_per_row] (dequantized if the master is quantized)."""
    shape = tuple(int(s) for s in reversed(t.shape.tolist()))
    if t.tensor_type.name == "F32":
        return np.asarray(t.data, dtype=np.float32).reshape(shape[0] if len(shape) > 1 else 1, -1)
    q = QTensor.from_bytes(t.data, t.tensor_type.name, shape)
    return q.dequantize().numpy().reshape(shape[0] if len(shape) > 1 else 1, -1)


def write_shard(master: str | Path, out: str | Path, layer_types: list[str],
                first: int = 0, last: int | None = None, master_sha256: str | None = None) -> ShardInfo:
    """Write layers [first, last) of `master` to `out`, layer i's matrices quantized to
    layer_types[i] (a list over all layers of the model) with llama.cpp's quantizer."""
    reader = W.open_gguf(master)
    cfg = W.read_config(reader)
    last = cfg.n_layer if last is None else last
    if not (0 <= first < last <= cfg.n_layer):
        raise ValueError(f"layer range [{first}, {last}) is out of bounds for a model of {cfg.n_layer} layers")
    if len(layer_types) != cfg.n_layer:
        raise ValueError(f"{len(layer_types)} layer types given for a model of {cfg.n_layer} layers")
    for t in layer_types:
        if t not in LAYER_TYPES:
            raise ValueError(f"unsupported GGUF type {t!r}; choose from {', '.join(LAYER_TYPES)}")
    master_sha256 = master_sha256 or file_sha256(master)
    has_embd, has_head = first == 0, last == cfg.n_layer

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    writer = GGUFWriter(str(tmp), cfg.arch)
    _copy_metadata(reader, writer)
    writer.add_string(W.KEY_MODEL_ID, str(W.field_value(reader, "general.name", Path(master).stem)))
    writer.add_string(W.KEY_MASTER_SHA, master_sha256)
    writer.add_uint32(W.KEY_FIRST, first)
    writer.add_uint32(W.KEY_LAST, last)
    writer.add_array(W.KEY_TYPES, list(layer_types[first:last]))
    writer.add_bool(W.KEY_EMBED, has_embd)
    writer.add_bool(W.KEY_HEAD, has_head)
    writer.add_bool(W.KEY_TIED, cfg.tied_embeddings)

    for t in reader.tensors:
        m = _LAYER_TENSOR.match(t.name)
        if m:
            layer = int(m.group(1))
            if not first <= layer < last:
                continue
            is_matrix = len(t.shape) == 2
            target = layer_types[layer] if is_matrix else "F32"
        elif t.name == "token_embd.weight":
            if not (has_embd or (has_head and cfg.tied_embeddings)):
                continue
            target = None  # keep the master's encoding
        elif t.name in ("output_norm.weight", "output.weight"):
            if not has_head:
                continue
            target = None
        else:
            target = None  # rope_freqs and other global tensors travel with every shard
        if target is None or target == t.tensor_type.name:
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
            continue
        data = quantize(_float_rows(t), target)
        writer.add_tensor(t.name, data, raw_dtype=GGMLQuantizationType[target])

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out)
    info = ShardInfo(path=out, sha256=file_sha256(out), first=first, last=last,
                     layer_types=tuple(layer_types[first:last]), bytes=out.stat().st_size)
    log.info("wrote shard %s: layers [%d, %d), %d bytes", out, first, last, info.bytes)
    return info
