"""Read llama-family GGUF files (whole models and shards) into a config and per-stage weights.

Tensor names follow llama.cpp: token_embd, blk.N.{attn_norm,attn_q,attn_k,attn_v,attn_output,
ffn_norm,ffn_gate,ffn_up,ffn_down}, output_norm, output (absent when embeddings are tied),
rope_freqs (llama-3 rope scaling factors). A shard keeps the master's names and metadata and
adds `edgefleet.*` keys that say which layers it holds.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader

from agent.quant import QTensor, LOADABLE_TYPES

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


@dataclass
class StageWeights:
    """Weights of layers [first, last) plus the embedding and/or head when the stage has them."""

    cfg: ModelConfig
    first: int
    last: int
    layer_types: list[str]                       # GGUF type of each layer's matrices
    layers: list[dict[str, QTensor | torch.Tensor]]
    token_embd: QTensor | None = None            # first stage (and last, when tied)
    output_norm: torch.Tensor | None = None      # last stage
    output: QTensor | None = None                # last stage
    rope_freqs: torch.Tensor | None = None       # llama-3 frequency factors
    meta: dict = field(default_factory=dict)

    @property
    def has_embedding(self) -> bool:
        return self.first == 0

    @property
    def has_head(self) -> bool:
        return self.last == self.cfg.n_layer

    def tensor_bytes(self) -> int:
        """Bytes of all tensors held (the GGUF encoding size)."""
        total = 0
        for t in self._all_tensors():
            total += t.nbytes if isinstance(t, QTensor) else t.numel() * t.element_size()
        return total

    def _all_tensors(self):
        for layer in self.layers:
            yield from layer.values()
        for t in (self.token_embd, self.output_norm, self.output, self.rope_freqs):
            if t is not None:
                yield t


def open_gguf(path: str | Path) -> GGUFReader:
    """Open a GGUF file, turning every way it can fail into one clear ValueError."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"model file {p} does not exist; pass the path of a GGUF file")
    if not p.is_file():
        raise ValueError(f"{p} is not a file; pass the path of a GGUF file")
    with open(p, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{p} is not a GGUF file (bad magic); convert the model to GGUF first")
    try:
        return GGUFReader(p, "r")
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
    vocab = field_value(reader, "tokenizer.ggml.tokens")
    n_vocab = int(field_value(reader, f"{arch}.vocab_size", len(vocab) if vocab is not None else 0))
    if not n_vocab:
        embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        n_vocab = int(embd.shape[1]) if embd is not None else 0
    scaling = field_value(reader, f"{arch}.rope.scaling.type", "none")
    return ModelConfig(
        arch=arch,
        n_layer=int(key("block_count")),
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


def _qtensor(t) -> QTensor:
    name = t.tensor_type.name
    if name not in LOADABLE_TYPES:
        raise ValueError(f"tensor {t.name} has GGUF type {name}, which edgefleet cannot run; "
                         f"re-quantize it to one of {', '.join(LOADABLE_TYPES)}")
    torch_shape = tuple(int(s) for s in reversed(t.shape.tolist()))
    return QTensor.from_bytes(t.data, name, torch_shape)


def _vector(t) -> torch.Tensor:
    if t.tensor_type.name != "F32":
        return _qtensor(t).dequantize().reshape(-1)
    return torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(-1))


def stage_range(reader: GGUFReader, cfg: ModelConfig) -> tuple[int, int]:
    """Layers a file holds: a shard's declared range, or every layer of a whole model."""
    first = field_value(reader, KEY_FIRST)
    last = field_value(reader, KEY_LAST)
    if first is None:
        return 0, cfg.n_layer
    return int(first), int(last)


def load_stage(path: str | Path, first: int | None = None, last: int | None = None) -> StageWeights:
    """Load layers [first, last) of a GGUF model or shard (default: all the file holds)."""
    reader = open_gguf(path)
    cfg = read_config(reader)
    have_first, have_last = stage_range(reader, cfg)
    first = have_first if first is None else first
    last = have_last if last is None else last
    if not (have_first <= first < last <= have_last):
        raise ValueError(f"layer range [{first}, {last}) is out of bounds: {Path(path).name} holds "
                         f"layers [{have_first}, {have_last}) of {cfg.n_layer}")
    tensors = {t.name: t for t in reader.tensors}

    def need(name: str):
        if name not in tensors:
            raise ValueError(f"{Path(path).name} lacks tensor {name}; the file is incomplete or not a {cfg.arch} model")
        return tensors[name]

    layers, types = [], []
    for i in range(first, last):
        layer: dict[str, QTensor | torch.Tensor] = {}
        for m in LAYER_MATRICES:
            layer[m] = _qtensor(need(f"blk.{i}.{m}.weight"))
        for v in LAYER_VECTORS:
            name = f"blk.{i}.{v}" if v.endswith(".bias") else f"blk.{i}.{v}.weight"
            if name in tensors:
                layer[v] = _vector(tensors[name])
            elif not v.endswith(".bias"):
                need(name)
        layers.append(layer)
        types.append(layer["ffn_down"].qtype)

    w = StageWeights(cfg=cfg, first=first, last=last, layer_types=types, layers=layers)
    if first == 0 or (last == cfg.n_layer and cfg.tied_embeddings):
        w.token_embd = _qtensor(need("token_embd.weight"))
    if last == cfg.n_layer:
        w.output_norm = _vector(need("output_norm.weight"))
        if not cfg.tied_embeddings:
            w.output = _qtensor(need("output.weight"))
    if "rope_freqs.weight" in tensors:
        w.rope_freqs = _vector(tensors["rope_freqs.weight"])
    w.meta = {k: field_value(reader, k) for k in (KEY_MODEL_ID, KEY_MASTER_SHA) if k in reader.fields}
    log.info("loaded layers [%d, %d) of %s (%s)", first, last, Path(path).name, ",".join(sorted(set(types))))
    return w
