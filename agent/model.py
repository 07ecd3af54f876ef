"""A llama-family decoder stage in torch: runs any contiguous range of layers.

Shapes: N = tokens in one forward (all steps together), T = tokens of one step,
L = cached + new positions of one session, H = query heads, G = kv heads, D = head dim.

One `Stage.forward` call takes several *steps* (a step is one session's new tokens: a whole
prompt for prefill, one token for decode). The matrix products run once over all tokens
of all steps, which is what batches the decode steps of concurrent sessions; attention
runs per step against that session's own KV cache.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from agent.quant import linear
from agent.weights import ModelConfig, StageWeights


# ------------------------------------------------------------------ pure building blocks

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x [..., d], weight [d]
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope_angles(positions: torch.Tensor, head_dim: int, base: float,
                freq_factors: torch.Tensor | None = None, linear_scale: float = 1.0) -> torch.Tensor:
    """Rotation angles [T, D/2] for absolute positions [T] (llama-3 factors divide the frequencies)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors.to(torch.float64)
    return (positions.to(torch.float64)[:, None] / linear_scale) * inv_freq[None, :]


def apply_rope(x: torch.Tensor, angles: torch.Tensor, neox: bool) -> torch.Tensor:
    """Rotate x [T, heads, D] by angles [T, D/2]: adjacent pairs (llama) or halves (neox)."""
    cos = torch.cos(angles).to(x.dtype)[:, None, :]
    sin = torch.sin(angles).to(x.dtype)[:, None, :]
    if neox:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.flatten(-2)


# ------------------------------------------------------------------ KV cache

class KVCache:
    """Keys and values of one session for the layers of one stage; grows by doubling.

    Stored as float16, as llama.cpp's default KV cache is (half the memory of float32).
    """

    def __init__(self, n_layers: int, n_head_kv: int, head_dim: int, capacity: int = 64,
                 limit: int | None = None):
        self.length = 0
        self.limit = limit        # never grow beyond this many positions (None = unbounded)
        capacity = min(capacity, limit) if limit else capacity
        self._k = [torch.empty(n_head_kv, capacity, head_dim, dtype=torch.float16) for _ in range(n_layers)]
        self._v = [torch.empty(n_head_kv, capacity, head_dim, dtype=torch.float16) for _ in range(n_layers)]

    @property
    def capacity(self) -> int:
        return self._k[0].shape[1] if self._k else 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._k + self._v)

    def truncate(self, length: int) -> None:
        """Forget positions >= length (used when a session's tokens are replayed)."""
        self.length = min(self.length, length)

    def _reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        if self.limit is not None and needed > self.limit:
            raise ValueError(f"the session needs {needed} positions but its KV cache holds at most {self.limit}")
        cap = max(needed, 2 * self.capacity)
        cap = min(cap, self.limit) if self.limit is not None else cap
        for lst in (self._k, self._v):
            for i, t in enumerate(lst):
                grown = torch.empty(t.shape[0], cap, t.shape[2], dtype=t.dtype)
                grown[:, : self.length] = t[:, : self.length]
                lst[i] = grown

    def append(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [G, T, D] at positions start.. and return the whole [G, start+T, D] view."""
        end = start + k.shape[1]
        self._reserve(end)
        self._k[layer][:, start:end] = k
        self._v[layer][:, start:end] = v
        return self._k[layer][:, :end], self._v[layer][:, :end]


@dataclass
class Step:
    """One session's new tokens for one forward pass."""

    cache: KVCache
    position: int                       # absolute position of the first new token
    tokens: torch.Tensor | None = None  # [T] int64 (first stage)
    hidden: torch.Tensor | None = None  # [T, n_embd] float32 (later stages)

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.numel() if self.tokens is not None else self.hidden.shape[0])


# ------------------------------------------------------------------ the stage

class Stage:
    """Layers [w.first, w.last) of a model; embeds tokens if first, applies the head if last."""

    def __init__(self, w: StageWeights):
        self.w = w
        self.cfg: ModelConfig = w.cfg
        self.n_layers = w.last - w.first

    def new_cache(self, capacity: int = 64, limit: int | None = None) -> KVCache:
        return KVCache(self.n_layers, self.cfg.n_head_kv, self.cfg.head_dim, capacity, limit)

    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one position of one session takes in this stage (float16 K and V)."""
        return self.n_layers * 2 * self.cfg.n_head_kv * self.cfg.head_dim * 2

    @torch.inference_mode()
    def forward(self, steps: list[Step], all_logits: bool = False) -> list[torch.Tensor]:
        """Run the steps through this stage.

        Returns, per step, the hidden states [T, n_embd] (non-final stage), or logits
        (final stage): [T, vocab] if all_logits else [1, vocab] for the step's last token.
        """
        cfg = self.cfg
        for s in steps:
            if s.position > s.cache.length:
                raise ValueError(f"step starts at position {s.position} but the session holds only {s.cache.length}")
            s.cache.truncate(s.position)
        if self.w.has_embedding:
            ids = torch.cat([s.tokens.reshape(-1).to(torch.int64) for s in steps])
            if int(ids.max()) >= cfg.n_vocab or int(ids.min()) < 0:
                raise ValueError(f"token id out of range for a vocabulary of {cfg.n_vocab}")
            x = self.w.token_embd.embedding(ids)                     # [N, d]
        else:
            x = torch.cat([s.hidden.to(torch.float32) for s in steps])  # [N, d]
        sizes = [s.n_tokens for s in steps]
        positions = torch.cat([torch.arange(s.position, s.position + n) for s, n in zip(steps, sizes)])
        angles = rope_angles(positions, cfg.head_dim, cfg.rope_base, self.w.rope_freqs, cfg.rope_linear_scale)

        for li, layer in enumerate(self.w.layers):
            x = x + self._attention(li, layer, rms_norm(x, layer["attn_norm"], cfg.rms_eps), steps, sizes, angles)
            h = rms_norm(x, layer["ffn_norm"], cfg.rms_eps)
            x = x + linear(F.silu(linear(h, layer["ffn_gate"])) * linear(h, layer["ffn_up"]), layer["ffn_down"])
        for s, n in zip(steps, sizes):
            s.cache.length = s.position + n

        if not self.w.has_head:
            return list(torch.split(x, sizes))
        if not all_logits:
            ends = torch.tensor(sizes).cumsum(0) - 1
            x = x[ends]                                               # [len(steps), d]
            sizes = [1] * len(steps)
        x = rms_norm(x, self.w.output_norm, cfg.rms_eps)
        head = self.w.output if self.w.output is not None else self.w.token_embd
        return list(torch.split(linear(x, head), sizes))

    def _attention(self, li: int, layer: dict, h: torch.Tensor, steps: list[Step],
                   sizes: list[int], angles: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        H, G, D = cfg.n_head, cfg.n_head_kv, cfg.head_dim
        q = linear(h, layer["attn_q"], layer.get("attn_q.bias")).view(-1, H, D)   # [N, H, D]
        k = linear(h, layer["attn_k"], layer.get("attn_k.bias")).view(-1, G, D)   # [N, G, D]
        v = linear(h, layer["attn_v"], layer.get("attn_v.bias")).view(-1, G, D)
        q = apply_rope(q, angles, cfg.rope_neox)
        k = apply_rope(k, angles, cfg.rope_neox)
        outs = []
        offset = 0
        for s, n in zip(steps, sizes):
            qs = q[offset:offset + n].transpose(0, 1)                 # [H, T, D]
            ks, vs = s.cache.append(li, s.position, k[offset:offset + n].transpose(0, 1),
                                    v[offset:offset + n].transpose(0, 1))  # [G, L, D]
            ks = ks.repeat_interleave(H // G, dim=0).float()          # [H, L, D]
            vs = vs.repeat_interleave(H // G, dim=0).float()
            L = ks.shape[1]
            # query t (absolute position s.position + t) sees keys 0 .. s.position + t
            mask = torch.arange(L)[None, :] <= (s.position + torch.arange(n))[:, None]   # [T, L]
            # as llama.cpp (no flash attention): Q rounded to f16 against the f16 cache,
            # softmax in f32, probabilities rounded to f16 for the product with V
            scores = (qs.half().float() @ ks.transpose(1, 2)) * (1.0 / math.sqrt(D))   # [H, T, L]
            probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
            o = probs.half().float() @ vs                             # [H, T, D]
            outs.append(o.transpose(0, 1).reshape(n, H * D))          # [T, H*D]
            offset += n
        return linear(torch.cat(outs), layer["attn_output"])
