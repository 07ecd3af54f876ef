"""Choosing the next token from logits: greedy, or temperature + top-p with a seeded generator.

The random draw for a position depends only on (seed, position), not on what was drawn
before, so a session whose tokens are replayed on another stage (failover) samples the
same continuation as an undisturbed one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0   # 0 = greedy (argmax)
    top_p: float = 1.0         # nucleus mass kept; 1 = off
    seed: int = 0              # seeds the session's generator

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits: np.ndarray, s: Sampling, position: int) -> int:
    """Next token id from logits [vocab]; `position` is the index the new token will take."""
    if s.temperature == 0:      # the order of float32 values is that of their float64 copies
        return int(np.argmax(np.asarray(logits).reshape(-1)))
    logits = np.asarray(logits, dtype=np.float64).reshape(-1)
    z = logits / s.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if s.top_p < 1:
        order = np.argsort(-p, kind="stable")
        sorted_p = p[order]
        keep = np.cumsum(sorted_p) - sorted_p < s.top_p   # always keeps the top token
        p = np.zeros_like(p)
        p[order[keep]] = sorted_p[keep]
        p /= p.sum()
    rng = np.random.default_rng([s.seed % (1 << 64), position])
    return int(rng.choice(len(p), p=p))
