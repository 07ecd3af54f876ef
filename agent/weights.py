"""Read llama-family GGUF files (whole models and stage shards): configuration and layout.

Tensor names follow llama.cpp: token_embd, blk.N.{attn_norm,attn_q,attn_k,attn_v,attn_output,
ffn_norm,ffn_gate,ffn_up,ffn_down}, output_norm, output (absent when embeddings are tied),
rope_freqs (llama-3 rope scaling factors). A shard is itself a llama.cpp model of the
stage's layers renumbered from 0; its `edgefleet.*` keys say where they sit in the whole
model (controller/shards.py writes them).
"""
from __future__ import annotations

import functools
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType
from gguf.gguf_reader import ReaderField

log = logging.getLogger(__name__)

SUPPORTED_ARCHS = ("llama", "qwen2")
LAYER_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
LAYER_VECTORS = ("attn_norm", "ffn_norm", "attn_q.bias", "attn_k.bias", "attn_v.bias")

# Shard metadata keys (see controller/shards.py).
KEY_MODEL_ID = "edgefleet.model_id"
KEY_MASTER_SHA = "edgefleet.master_sha256"
KEY_FIRST = "edgefleet.first_layer"
KEY_LAST = "edgefleet.last_layer"
KEY_TYPES = "edgefleet.layer_types"
KEY_EMBED = "edgefleet.has_embedding"
KEY_HEAD = "edgefleet.has_head"
KEY_TIED = "edgefleet.tied_embeddings"
KEY_MODEL_LAYERS = "edgefleet.model_layers"      # layers of the whole model (block_count is the stage's)
KEY_INPUT_TYPE = "edgefleet.input_embedding.type"  # a first stage that is not last: the token
KEY_INPUT_ROWS = "edgefleet.input_embedding.rows"  # embedding table follows the GGUF data


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a llama-family decoder, as read from GGUF metadata."""

    arch: str                 # "llama" or "qwen2"
    n_layer: int              # transformer blocks
    n_embd: int               # hidden size
    n_head: int               # query heads
    n_head_kv: int            # key/value heads (GQA when < n_head)
    n_ff: int                 # SwiGLU inner size
    n_vocab: int              # vocabulary size
    n_ctx_train: int          # context length the model was trained for
    rope_base: float          # RoPE theta
    rope_neox: bool           # True: rotate halves (qwen2); False: rotate adjacent pairs (llama)
    rope_linear_scale: float  # positions are divided by this (1 = off)
    rms_eps: float            # RMSNorm epsilon
    tied_embeddings: bool     # LM head reuses token_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def open_master(path: str | Path) -> GGUFReader:
    """open_gguf, kept while the file is unchanged: for the controller, which reads one master
    many times (parsing a real vocabulary's metadata takes seconds). Not for agents: a kept
    reader keeps the pages it touched resident."""
    p = Path(path).resolve()
    st = p.stat() if p.is_file() else None
    return _open_kept(str(p), st.st_size if st else -1, st.st_mtime_ns if st else -1)


@functools.lru_cache(maxsize=4)
def _open_kept(path: str, size: int, mtime_ns: int) -> GGUFReader:
    return open_gguf(path)


class _LayoutReader(GGUFReader):
    """A GGUFReader that leaves out the elements of long arrays (a vocabulary's tokens, types,
    scores and merges) and keeps only their lengths, in `skipped`. gguf's reader makes numpy
    views of every element: opening the shard of SmolLM2's last stage, with its 49,152-token
    vocabulary, held ~150 MiB of them, on top of whatever stage the agent already held
    (docs/fleet.md, Memory). An agent reads configuration and tensors, never a vocabulary."""

    LONG = 1024     # elements; edgefleet's own arrays (a type per layer) are far shorter

    def _build_fields(self, offs: int, count: int) -> int:
        self.skipped: dict[str, int] = {}
        for _ in range(count):
            start = offs
            klen, kdata = self._get_str(offs)
            offs += int(klen.nbytes + kdata.nbytes)
            raw_type = self._get(offs, np.uint32)
            offs += int(raw_type.nbytes)
            name = str(bytes(kdata), encoding="utf-8")
            if raw_type[0] == GGUFValueType.ARRAY:
                item, n = int(self._get(offs, np.uint32)[0]), int(self._get(offs + 4, np.uint64)[0])
                if n > self.LONG:
                    self.skipped[name] = n
                    offs = self._past_array(offs + 12, item, n)
                    continue
            size, parts, idxs, types = self._get_field_parts(offs, raw_type[0])
            self._push_field(ReaderField(start, name, [klen, kdata, raw_type, *parts], [i + 3 for i in idxs], types),
                             skip_sum=True)
            offs += size
        return offs

    def _past_array(self, offs: int, item: int, n: int) -> int:
        """The offset past n elements of type item starting at offs."""
        if item == GGUFValueType.STRING:
            length = struct.Struct(">Q" if self.byte_order == "S" else "<Q")
            buf = memoryview(self.data)
            for _ in range(n):
                offs += 8 + length.unpack_from(buf, offs)[0]
            return offs
        scalar = self.gguf_scalar_to_np.get(GGUFValueType(item))
        if scalar is None:
            raise ValueError(f"an array of {GGUFValueType(item).name} cannot be skipped")
        return offs + n * np.dtype(scalar).itemsize


def array_length(reader: GGUFReader, key: str) -> int | None:
    """Elements of an array field, also where the reader skipped them (open_gguf's layout_only)."""
    f = reader.fields.get(key)
    if f is not None:
        return len(f.data)
    return getattr(reader, "skipped", {}).get(key)


def open_gguf(path: str | Path, layout_only: bool = False) -> GGUFReader:
    """Open a GGUF file, turning every way it can fail into one clear ValueError. layout_only:
    without the elements of long arrays (a vocabulary), as an agent reads a shard."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"model file {p} does not exist; pass the path of a GGUF file")
    if not p.is_file():
        raise ValueError(f"{p} is not a file; pass the path of a GGUF file")
    with open(p, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{p} is not a GGUF file (bad magic); convert the model to GGUF first")
    try:
        return (_LayoutReader if layout_only else GGUFReader)(p, "r")
    except Exception as exc:  # truncated or corrupt file
        raise ValueError(f"{p} is not a readable GGUF file ({exc}); re-download or rebuild it") from None


def field_value(reader: GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def read_config(reader: GGUFReader) -> ModelConfig:
    arch = field_value(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"unsupported architecture {arch!r}; edgefleet runs {', '.join(SUPPORTED_ARCHS)} GGUF models")

    def key(name, default=None):
        v = field_value(reader, f"{arch}.{name}", default)
        if v is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{name}; the file is not a complete {arch} model")
        return v

    n_head = int(key("attention.head_count"))
    names = {t.name for t in reader.tensors}
    n_vocab = int(field_value(reader, f"{arch}.vocab_size", array_length(reader, "tokenizer.ggml.tokens") or 0))
    if not n_vocab:
        embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        n_vocab = int(embd.shape[1]) if embd is not None else 0
    scaling = field_value(reader, f"{arch}.rope.scaling.type", "none")
    return ModelConfig(
        arch=arch,
        n_layer=int(field_value(reader, KEY_MODEL_LAYERS, key("block_count"))),
        n_embd=int(key("embedding_length")),
        n_head=n_head,
        n_head_kv=int(key("attention.head_count_kv", n_head)),
        n_ff=int(key("feed_forward_length")),
        n_vocab=n_vocab,
        n_ctx_train=int(key("context_length")),
        rope_base=float(key("rope.freq_base", 10000.0)),
        rope_neox=(arch == "qwen2"),
        rope_linear_scale=float(key("rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0,
        rms_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        # A shard records this explicitly (a middle stage has no output.weight either way).
        tied_embeddings=bool(field_value(reader, KEY_TIED, "output.weight" not in names)),
    )


def stage_range(reader: GGUFReader, cfg: ModelConfig) -> tuple[int, int]:
    """Layers a file holds: a shard's declared range, or every layer of a whole model."""
    first = field_value(reader, KEY_FIRST)
    last = field_value(reader, KEY_LAST)
    if first is None:
        return 0, cfg.n_layer
    return int(first), int(last)


def layer_types(reader: GGUFReader) -> list[str]:
    """Per layer, its type: a shard's record, else the master's own name for the layer (see
    own_types)."""
    recorded = field_value(reader, KEY_TYPES)
    if recorded is not None:
        return [str(t) for t in recorded]
    return own_types(reader)


def own_types(reader: GGUFReader) -> list[str]:
    """A whole model's name for each layer: the first of the file's own (general.file_type,
    when llama.cpp's quantizer wrote it as a mix like Q4_K_M), the GGML types and the mixes
    whose rule gives every matrix of the layer the type it is stored at; where none does, the
    file's mix or else its ffn_down's type. A layer asked for its own name keeps its bytes
    (controller/shards.py)."""
    from solver.ggml_types import MIX_FILE_TYPES, MIXES, TYPE_ORDER, llama_70b, matrix_type

    cfg = read_config(reader)
    big = llama_70b(cfg.n_layer, cfg.n_head, cfg.n_head_kv)
    stored: list[dict[str, tuple[str, int]]] = [{} for _ in range(cfg.n_layer)]   # matrix -> (type, row length)
    for t in reader.tensors:
        parts = t.name.split(".")
        if parts[0] == "blk" and len(t.shape) == 2:
            stored[int(parts[1])][parts[2]] = (t.tensor_type.name, int(t.shape[0]))
    mix = MIX_FILE_TYPES.get(field_value(reader, "general.file_type"))
    names = [mix] * (mix is not None) + [q for q in TYPE_ORDER if q not in MIXES] + list(MIXES)
    out = []
    for l, matrices in enumerate(stored):
        out.append(next((q for q in names if all(matrix_type(q, m, n, l, cfg.n_layer, big) == t
                                                 for m, (t, n) in matrices.items())),
                        mix or matrices.get("ffn_down", ("?", 0))[0]))
    return out


def input_embedding_shape(reader: GGUFReader, cfg: ModelConfig) -> tuple[str, int, int] | None:
    """(type, rows, bytes per row) of the token embedding table a first stage that is not
    last carries after its GGUF data; None for any other file."""
    qtype = field_value(reader, KEY_INPUT_TYPE)
    if qtype is None:
        return None
    from solver.ggml_types import block

    elems, size = block(str(qtype))
    return str(qtype), int(field_value(reader, KEY_INPUT_ROWS)), cfg.n_embd // elems * size


def input_embedding(path: str | Path, reader: GGUFReader, cfg: ModelConfig) -> tuple[np.ndarray, str] | None:
    """A first stage's token embedding table, kept after the GGUF data: (raw rows, type)."""
    shape = input_embedding_shape(reader, cfg)
    if shape is None:
        return None
    qtype, rows, row_bytes = shape
    total = rows * row_bytes
    size_on_disk = Path(path).stat().st_size
    if total > size_on_disk:
        raise ValueError(f"{Path(path).name} is truncated: its embedding table needs {total} bytes")
    table = np.memmap(path, dtype=np.uint8, mode="r", offset=size_on_disk - total, shape=(rows, row_bytes))
    return np.asarray(table), qtype     # a plain array on the map: indexing it skips np.memmap's Python code


def copy_metadata(reader: GGUFReader, writer, drop=lambda key: False, values: dict | None = None) -> None:
    """Copy a GGUF's key-values to a GGUFWriter (not the reader's own GGUF.* keys nor the
    architecture, which the writer sets); keys `drop` accepts stay out, `values` replaces some."""
    from gguf import GGUFValueType

    values = values or {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or drop(key):
            continue
        sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, values.get(key, f.contents()), f.types[0], sub_type=sub)


def add_one_token_vocabulary(writer, arch: str, n_embd: int) -> None:
    """What makes a stage without the LM head a llama.cpp model: a one-token vocabulary, its
    1 x n_embd embedding and a unit output norm (the head then costs nothing)."""
    writer.add_string("tokenizer.ggml.model", "none")
    writer.add_uint32(f"{arch}.vocab_size", 1)
    writer.add_tensor("token_embd.weight", np.zeros((1, n_embd), np.float32))
    writer.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))


def write_out(writer) -> None:
    """Write a GGUFWriter's header, metadata and tensors, and close it."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
