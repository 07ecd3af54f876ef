"""Choosing the next token from logits: greedy, or temperature + top-p with a seeded generator.

The random draw for a position depends only on (seed, position), not on what was drawn
before, so a session whose tokens are replayed on another stage (failover) samples the
same continuation as an undisturbed one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0   # 0 = greedy (argmax)
    top_p: float = 1.0         # nucleus mass kept; 1 = off
    seed: int = 0              # seeds the session's generator

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits: torch.Tensor, s: Sampling, position: int) -> int:
    """Next token id from logits [vocab]; `position` is the index the new token will take."""
    if s.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.to(torch.float64) / s.temperature, dim=-1)
    if s.top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < s.top_p   # always keeps the top token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=_generator(s.seed, position)))


def _generator(seed: int, position: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + position) % (1 << 63))
    return g
