"""Why no plan exists, in one sentence naming the binding resource.

Plain sentences from figures: the solvers (solver/fast.py) decide which question to ask,
and run the one optimization the last question needs (the least ΔNLL of any placement).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from solver import cost as C
from solver.memory import fmt_bytes
from solver.problem import Node, Problem


def unplaceable_pin(problem: Problem, cand: dict) -> str:
    """A sentence if a pinned node cannot hold even one layer (else "")."""
    holders = {n for (_, n) in cand}
    for name in problem.options.pinned:
        if name not in holders:
            node = problem.fleet.node(name)
            return (f"pinned node {name} cannot hold even one layer at an allowed type it supports "
                    f"(it offers {fmt_bytes(node.memory)}); unpin it or give it more memory")
    return ""


@dataclass(frozen=True)
class Need:
    """The least memory any plan needs: every layer at its smallest type some usable node supports."""
    usable: tuple[Node, ...]   # nodes not excluded
    offered: int               # their memory together
    layers: int                # every layer's weights at its smallest type
    embed: int                 # the token embedding (first stage)
    head: int                  # what the last stage holds beyond a middle one
    runtime: int               # what every stage holds beyond its layers (llama.cpp's compute buffer)
    kv: int                    # every layer's KV cache
    q_min: str                 # the type of the largest of those layers
    layer: int                 # the first layer at its smallest type, with its KV cache

    @property
    def weights(self) -> int:
        """One stage's worth: layers, embedding, head and one compute buffer."""
        return self.layers + self.embed + self.head + self.runtime

    def terms(self, w) -> str:
        return (f"layers {fmt_bytes(self.layers)}, KV cache {fmt_bytes(self.kv)} for {w.concurrency} × {w.ctx} tokens, "
                f"embedding {fmt_bytes(self.embed)} and head {fmt_bytes(self.head)}, and llama.cpp's compute buffer "
                f"of {fmt_bytes(self.runtime)} on every stage")


def need(problem: Problem) -> Need | str:
    """The least memory any plan needs, or a sentence when no node or type is usable at all."""
    m, w, o = problem.model, problem.workload, problem.options
    allowed = [q for q in m.types if not o.types or q in o.types]
    usable = tuple(n for n in problem.fleet.nodes if n.name not in o.excluded)
    if not usable:
        return "every node is excluded; remove some --exclude options"
    smallest = []
    for lp in m.layers:
        sizes = [(lp.bytes[q], q) for q in allowed if lp.takes(q) and any(q in n.speed for n in usable)]
        if not sizes:
            return f"no node supports any of the allowed types ({', '.join(allowed)})"
        smallest.append(min(sizes))
    return Need(usable=usable, offered=sum(n.memory for n in usable), layers=sum(b for b, _ in smallest),
                embed=m.embed_bytes, head=C.head_bytes(m, w), runtime=C.runtime_bytes(m, w),
                kv=sum(C.kv_bytes(lp, w) for lp in m.layers), q_min=max(smallest)[1],
                layer=smallest[0][0] + C.kv_bytes(m.layers[0], w))


def shortfall(problem: Problem) -> str:
    """A sentence when no placement can exist whatever the budget: nothing usable, or less
    memory in the whole fleet than the model needs at its smallest types (else "")."""
    n, w = need(problem), problem.workload
    if isinstance(n, str):
        return n
    if n.weights + n.kv > n.offered:
        return (f"the fleet offers {fmt_bytes(n.offered)}; the model needs at least {fmt_bytes(n.weights)} "
                f"at {n.q_min} plus {fmt_bytes(n.kv)} of KV cache for {w.concurrency} × {w.ctx} tokens "
                f"({n.terms(w)}); add {fmt_bytes(n.weights + n.kv - n.offered)} or more, or lower --concurrency or "
                f"the context")
    return ""


def verdict(problem: Problem, status: str, best: float) -> str:
    """The sentence once the fleet has room in all: `status` and `best` are those of the
    least ΔNLL of any placement without the budget (solved, timeout, or none exists)."""
    o, n, w = problem.options, need(problem), problem.workload
    if status == "solved":
        return (f"no assignment meets a {o.max_ppl_increase:g} % perplexity budget on this fleet: the best possible "
                f"is {100 * math.expm1(best):.2f} %; raise --max-ppl-increase or add memory")
    largest = max(n.usable, key=lambda x: x.memory)
    if status == "timeout":
        return f"the solver could not decide within {o.time_limit:g} s whether any plan fits; raise --time-limit"
    if o.max_stages:
        return (f"the model does not fit on {o.max_stages} stage(s) of this fleet (largest node {largest.name}: "
                f"{fmt_bytes(largest.memory)}); raise --max-stages")
    if o.pinned:
        return f"no plan uses every pinned node ({', '.join(o.pinned)}) within memory; unpin some"
    alone = n.weights + n.kv - largest.memory
    return (f"the fleet offers {fmt_bytes(n.offered)} in total but the layers cannot be split to fit each node: "
            f"the model needs {fmt_bytes(n.weights + n.kv)} at {n.q_min} as one stage ({n.terms(w)}), every further "
            f"stage another compute buffer, and a layer {fmt_bytes(n.layer)}; giving {largest.name} "
            f"{fmt_bytes(alone)} more would let it hold the model alone, or lower --concurrency or the context")
