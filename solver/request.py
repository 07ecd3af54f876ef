"""The placement request: what an operator asks for, whole, with the one set of defaults.

The CLI builds it, proto/adapter.py carries it to the controller, the controller and the
simulator's studies keep it as it is, and `solver.problem.problem_for` turns it, with a
model profile and a fleet, into the solver's problem. A new option is a field here (and on
the wire, in proto/edgefleet.proto and proto/adapter.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

OBJECTIVES = ("latency", "throughput")
SOLVERS = ("highs", "cbc")


@dataclass(frozen=True)
class Workload:
    prompt_tokens: int = 256
    output_tokens: int = 128
    concurrency: int = 8        # sequences decoded together (and KV caches held) per stage
    context: int = 512          # KV cache tokens per sequence; 0 = prompt + output

    @property
    def ctx(self) -> int:
        return self.context or self.prompt_tokens + self.output_tokens


@dataclass(frozen=True)
class Options:
    objective: str = "latency"                 # latency | throughput
    max_ppl_increase: float = 5.0              # percent; ΔNLL budget = ln(1 + x/100)
    types: tuple[str, ...] = ()                # allowed layer types (empty: all the model has)
    pinned: tuple[str, ...] = ()               # nodes that must hold a stage
    excluded: tuple[str, ...] = ()             # nodes that must not
    max_stages: int = 0                        # 0 = no limit
    solver: str = "highs"                      # highs | cbc
    time_limit: float = 60.0                   # seconds
    gap: float = 0.001                         # relative gap at which a solution counts as optimal
    threads: int = 0                           # 0 = solver default

    @property
    def budget(self) -> float:
        return math.log1p(self.max_ppl_increase / 100.0)


@dataclass(frozen=True)
class PlacementRequest:
    model: str                                  # MODEL.gguf, a model profile JSON, or a catalog shape name
    workload: Workload = field(default_factory=Workload)
    options: Options = field(default_factory=Options)
    text: str = ""                              # held-out text for sensitivity ("": heldout.txt beside the model)
    tokens: int = 1024                          # held-out tokens a sensitivity table must cover


def check(request: PlacementRequest) -> None:
    """Raise ValueError with one sentence if the request cannot be a placement problem,
    whatever the model and fleet."""
    w, o = request.workload, request.options
    if not request.model:
        raise ValueError("the request names no model; give a GGUF file, a profile JSON or a catalog shape")
    if o.objective not in OBJECTIVES:
        raise ValueError(f"objective must be latency or throughput, not {o.objective!r}")
    if o.solver not in SOLVERS:
        raise ValueError(f"solver must be highs or cbc, not {o.solver!r}")
    if not (math.isfinite(o.max_ppl_increase) and o.max_ppl_increase >= 0):
        raise ValueError(f"the perplexity budget must be a number ≥ 0 %, not {o.max_ppl_increase}")
    if min(w.prompt_tokens, w.output_tokens, w.concurrency) < 1:
        raise ValueError("prompt tokens, output tokens and concurrency must all be ≥ 1")
    if w.context < 0 or o.max_stages < 0 or request.tokens < 1:
        raise ValueError("context, stage limit and held-out tokens cannot be negative")
    if not (math.isfinite(o.time_limit) and o.time_limit > 0):
        raise ValueError(f"the solver time limit must be > 0 seconds, not {o.time_limit}")
