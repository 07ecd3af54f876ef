"""Stages chained in one process: generation and held-out NLL through any split of a model.

The distributed path (agents over gRPC) runs the same `Stage.forward` per hop; this module
is the single-process reference it is compared against, and what profiling and the
benchmarks use.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from agent.model import KVCache, Stage, Step
from agent.sampling import Sampling, sample
from agent.weights import load_stage


def split_evenly(n_layer: int, n_stages: int) -> list[tuple[int, int]]:
    """Contiguous layer ranges, as equal as possible."""
    if not 1 <= n_stages <= n_layer:
        raise ValueError(f"cannot split {n_layer} layers into {n_stages} stages")
    bounds = [round(i * n_layer / n_stages) for i in range(n_stages + 1)]
    return list(zip(bounds, bounds[1:]))


class LocalPipeline:
    def __init__(self, stages: list[Stage]):
        if not stages or not stages[0].w.has_embedding or not stages[-1].w.has_head:
            raise ValueError("a pipeline must start with the embedding stage and end with the head stage")
        for a, b in zip(stages, stages[1:]):
            if a.w.last != b.w.first:
                raise ValueError(f"stages are not contiguous: [{a.w.first},{a.w.last}) then [{b.w.first},{b.w.last})")
        self.stages = stages

    @classmethod
    def from_files(cls, paths: list[str | Path]) -> "LocalPipeline":
        """One stage per shard file, in order."""
        return cls([Stage(load_stage(p)) for p in paths])

    @classmethod
    def from_model(cls, path: str | Path, n_stages: int = 1) -> "LocalPipeline":
        """Split one whole-model GGUF into n_stages even stages."""
        from agent.weights import open_gguf, read_config

        n_layer = read_config(open_gguf(path)).n_layer
        return cls([Stage(load_stage(path, a, b)) for a, b in split_evenly(n_layer, n_stages)])

    def new_session(self) -> list[KVCache]:
        return [s.new_cache() for s in self.stages]

    def forward(self, caches: list[KVCache], position: int, tokens: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Tokens [T] at `position` through every stage; logits of the last (or every) token."""
        x: torch.Tensor | None = None
        for stage, cache in zip(self.stages, caches):
            step = Step(cache, position, tokens=tokens) if x is None else Step(cache, position, hidden=x)
            x = stage.forward([step], all_logits=all_logits)[0]
        return x

    def generate(self, prompt: list[int], max_tokens: int, sampling: Sampling = Sampling(),
                 eos: int | None = None) -> Iterator[int]:
        """Yield up to max_tokens new tokens (stops after `eos`)."""
        caches = self.new_session()
        logits = self.forward(caches, 0, torch.tensor(prompt))[-1]
        pos = len(prompt)
        for _ in range(max_tokens):
            tok = sample(logits, sampling, pos)
            yield tok
            if tok == eos:
                return
            logits = self.forward(caches, pos, torch.tensor([tok]))[-1]
            pos += 1

    def token_nll(self, ids: list[int]) -> torch.Tensor:
        """Per-position NLL [len(ids)-1] of ids[1:] given the prefix (one prefill pass)."""
        logits = self.forward(self.new_session(), 0, torch.tensor(ids), all_logits=True)
        return F.cross_entropy(logits[:-1].to(torch.float64), torch.tensor(ids[1:]), reduction="none")

    def logits(self, ids: list[int]) -> torch.Tensor:
        return self.forward(self.new_session(), 0, torch.tensor(ids), all_logits=True)
