"""Stages chained in one process: generation and held-out NLL through any split of a model.

The distributed path (agents over gRPC) runs the same `runtime.Stage.forward` per hop; this
module is the single-process form of it, which sensitivity profiling, the tests and the
benchmarks use. One session (sequence 0) at a time.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from agent.runtime import Settings, Stage, Step
from agent.sampling import Sampling, sample


def split_evenly(n_layer: int, n_stages: int) -> list[tuple[int, int]]:
    """Contiguous layer ranges, as equal as possible."""
    if not 1 <= n_stages <= n_layer:
        raise ValueError(f"cannot split {n_layer} layers into {n_stages} stages")
    bounds = [round(i * n_layer / n_stages) for i in range(n_stages + 1)]
    return list(zip(bounds, bounds[1:]))


def token_nll(logits: np.ndarray, targets) -> np.ndarray:
    """-log softmax(logits)[target] per row: logits [T, V] float32, targets [T].
    In float32 (exp of T x V values dominates); the sum over a vocabulary of 5e4 carries a
    relative error ~1e-6, far below the NLL differences it is used for (~1e-3)."""
    m = logits.max(-1)
    z = logits - m[:, None]
    np.exp(z, out=z)
    lse = m.astype(np.float64) + np.log(z.sum(-1, dtype=np.float64))
    return lse - logits[np.arange(len(logits)), np.asarray(targets)]


class LocalPipeline:
    def __init__(self, stages: list[Stage]):
        if not stages or not stages[0].has_embedding or not stages[-1].has_head:
            raise ValueError("a pipeline must start with the embedding stage and end with the head stage")
        for a, b in zip(stages, stages[1:]):
            if a.last != b.first:
                raise ValueError(f"stages are not contiguous: [{a.first},{a.last}) then [{b.first},{b.last})")
        self.stages = stages

    @classmethod
    def from_files(cls, paths: list[str | Path], settings: Settings = Settings(context=1024)) -> "LocalPipeline":
        """One stage per shard file, in order."""
        return cls([Stage(p, settings) for p in paths])

    def close(self) -> None:
        for s in self.stages:
            s.close()

    def forward(self, position: int, tokens: list[int], all_logits: bool = False) -> np.ndarray:
        """Tokens at `position` through every stage; logits of the last (or every) token."""
        x: np.ndarray | None = None
        for i, stage in enumerate(self.stages):
            last = i == len(self.stages) - 1
            step = (Step(0, position, tokens=np.asarray(tokens), all_logits=last and all_logits) if x is None
                    else Step(0, position, hidden=x, all_logits=last and all_logits))
            x = stage.forward([step])[0]
        return x

    def generate(self, prompt: list[int], max_tokens: int, sampling: Sampling = Sampling(),
                 eos: int | None = None) -> Iterator[int]:
        """Yield up to max_tokens new tokens (stops after `eos`)."""
        logits = self.forward(0, prompt)[-1]
        pos = len(prompt)
        for _ in range(max_tokens):
            tok = sample(logits, sampling, pos)
            yield tok
            if tok == eos:
                return
            logits = self.forward(pos, [tok])[-1]
            pos += 1

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits [len(ids), vocab] of every position (one prefill pass)."""
        return self.forward(0, ids, all_logits=True)

    def token_nll(self, ids: list[int]) -> np.ndarray:
        """Per-position NLL [len(ids)-1] of ids[1:] given the prefix (one prefill pass)."""
        return token_nll(self.logits(ids)[:-1], ids[1:])
