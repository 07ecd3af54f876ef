"""Build shards: GGUF files that hold one stage's tensors, quantized to the plan's per-layer types.

A shard is a llama.cpp model of the stage's layers renumbered from 0 (`block_count` = the
stage's layer count), with the master's metadata and the edgefleet.* keys of agent/weights.py.
- A stage that is not last has a one-token vocabulary (`tokenizer.ggml.model` "none"), a
  1 x n_embd token_embd and a unit output_norm: llama.cpp loads it as it is, and its head
  costs nothing. It takes hidden states, not tokens.
- A first stage that is not last looks tokens up itself: the master's token_embd rows follow
  the GGUF data (llama.cpp and the gguf reader ignore bytes after the last tensor).
- The last stage keeps the real vocabulary, token_embd, output_norm and output.
Written for the whole layer range, the same code produces a mixed-precision model that
llama.cpp loads and runs as is. Each matrix gets the type the plan asks for its layer (a
llama.cpp mix like Q4_K_M gives each matrix the type llama.cpp's quantizer would), or
llama.cpp's own fallback when its rows do not split into that type's blocks
(solver/ggml_types.py). A layer asked for its master's own type (agent/weights.own_types)
keeps the master's bytes, a mix of types included.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFWriter

from agent import weights as W
from agent.quant import dequantize, requantize
from agent.store import file_sha256
from solver.ggml_types import LAYER_TYPES, TYPE_ORDER, parse_type
from solver.problem import model_from_shape

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


_MASTER_SHA: dict[tuple[str, int, int], str] = {}


def master_sha256(path: str | Path) -> str:
    """A master's SHA-256, hashed once per path, size and modification time."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _MASTER_SHA:
        _MASTER_SHA[key] = file_sha256(p)
    return _MASTER_SHA[key]


def kept_layers(master: str | Path) -> tuple[tuple[str, int], ...]:
    """Per layer of a master: its own name (agent/weights.own_types) and the bytes of its
    matrices as stored, which a layer asked for that name keeps."""
    reader = W.open_master(master)
    stored = [0] * W.read_config(reader).n_layer
    for t in reader.tensors:
        m = _LAYER_TENSOR.match(t.name)
        if m and len(t.shape) == 2:
            stored[int(m.group(1))] += int(t.n_bytes)
    return tuple(zip(W.layer_types(reader), stored))


def candidate_types(master: str | Path, asked: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Per layer of a master, the types it may take, best first: of `asked` (default: LAYER_TYPES
    and the layer's own), its own and those that need no more bytes than it has as stored (a
    quantized layer never gains precision; an F16 master's may take any type)."""
    reader = W.open_master(master)
    cfg = W.read_config(reader)
    kept = kept_layers(master)
    sizes = model_from_shape("", cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_head_kv, cfg.n_ff, cfg.n_vocab,
                             cfg.tied_embeddings, [{}] * cfg.n_layer, kept=kept).layers
    out = []
    for lp, (own, _) in zip(sizes, kept):
        may = set(asked or LAYER_TYPES + (own,))
        out.append(tuple(q for q in TYPE_ORDER if q in may and (q == own or lp.bytes[q] <= lp.bytes[own])))
    return out


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
    return [parse_type(t) for t in parts]


def write_shard(master: str | Path, out: str | Path, layer_types: list[str],
                first: int = 0, last: int | None = None, master_sha256: str | None = None) -> ShardInfo:
    """Write layers [first, last) of `master` to `out`, layer i's matrices quantized to
    layer_types[i] (a list over all layers of the model) with llama.cpp's quantizer."""
    reader = W.open_master(master)
    cfg = W.read_config(reader)
    last = cfg.n_layer if last is None else last
    if W.field_value(reader, W.KEY_FIRST) is not None:
        raise ValueError(f"{Path(master).name} is a shard, not a whole model; build shards from the master GGUF")
    if not (0 <= first < last <= cfg.n_layer):
        raise ValueError(f"layer range [{first}, {last}) is out of bounds for a model of {cfg.n_layer} layers")
    if len(layer_types) != cfg.n_layer:
        raise ValueError(f"{len(layer_types)} layer types given for a model of {cfg.n_layer} layers")
    own = W.layer_types(reader)     # a layer may keep its own type, even one no plan chooses (F32, BF16)
    layer_types = [o if t.strip().upper() == o else parse_type(t) for t, o in zip(layer_types, own)]
    master_sha256 = master_sha256 or file_sha256(master)
    has_embd, has_head = first == 0, last == cfg.n_layer
    tensors = {t.name: t for t in reader.tensors}

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    writer = GGUFWriter(str(tmp), cfg.arch)
    vocab = ("tokenizer.", f"{cfg.arch}.vocab_size")       # a stage without the head gets a one-token one
    W.copy_metadata(reader, writer, drop=lambda k: k.startswith("edgefleet.") or (not has_head and k.startswith(vocab)),
                    values={f"{cfg.arch}.block_count": last - first})
    writer.add_string(W.KEY_MODEL_ID, str(W.field_value(reader, "general.name", Path(master).stem)))
    writer.add_string(W.KEY_MASTER_SHA, master_sha256)
    writer.add_uint32(W.KEY_MODEL_LAYERS, cfg.n_layer)
    writer.add_uint32(W.KEY_FIRST, first)
    writer.add_uint32(W.KEY_LAST, last)
    writer.add_array(W.KEY_TYPES, list(layer_types[first:last]))
    writer.add_bool(W.KEY_EMBED, has_embd)
    writer.add_bool(W.KEY_HEAD, has_head)
    writer.add_bool(W.KEY_TIED, cfg.tied_embeddings)
    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise ValueError(f"{Path(master).name} lacks token_embd.weight; it is not a complete {cfg.arch} model")
    trailer = has_embd and not has_head
    if trailer:
        writer.add_string(W.KEY_INPUT_TYPE, embd.tensor_type.name)
        writer.add_uint32(W.KEY_INPUT_ROWS, int(embd.shape[1]))

    def copy(t, name: str | None = None) -> None:
        writer.add_tensor(name or t.name, np.asarray(t.data), raw_dtype=t.tensor_type)

    for t in reader.tensors:
        m = _LAYER_TENSOR.match(t.name)
        if m:
            layer = int(m.group(1))
            if not first <= layer < last:
                continue
            name = f"blk.{layer - first}.{m.group(2)}"
            if len(t.shape) == 2 and layer_types[layer] == own[layer]:
                copy(t, name)               # the layer keeps its master's types, a mix included
            elif len(t.shape) == 2:
                data, stored = requantize(t, layer_types[layer], layer, cfg)
                writer.add_tensor(name, data, raw_dtype=stored)
            elif t.tensor_type.name == "F32":
                copy(t, name)
            else:   # norms and biases run in F32
                writer.add_tensor(name, dequantize(np.asarray(t.data), t.tensor_type.name, int(t.n_elements)))
        elif t.name in ("token_embd.weight", "output_norm.weight", "output.weight"):
            if has_head:
                copy(t)
        else:
            copy(t)  # rope_freqs and other global tensors travel with every shard
    if not has_head:
        W.add_one_token_vocabulary(writer, cfg.arch, cfg.n_embd)
    W.write_out(writer)
    if trailer:
        with open(tmp, "ab") as f:
            f.write(np.asarray(embd.data).tobytes())
    tmp.replace(out)
    info = ShardInfo(path=out, sha256=file_sha256(out), first=first, last=last,
                     layer_types=tuple(layer_types[first:last]), bytes=out.stat().st_size)
    log.info("wrote shard %s: layers [%d, %d), %d bytes", out, first, last, info.bytes)
    return info
