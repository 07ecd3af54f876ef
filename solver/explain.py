"""Why no plan exists, in one sentence naming the binding resource."""
from __future__ import annotations

import dataclasses
import math

import pulp

from solver import cost as C
from solver.problem import GiB, Problem


def unplaceable_pin(problem: Problem, cand: dict) -> str:
    """A sentence if a pinned node cannot hold even one layer (else "")."""
    holders = {n for (_, n) in cand}
    for name in problem.options.pinned:
        if name not in holders:
            node = problem.fleet.node(name)
            return (f"pinned node {name} cannot hold even one layer at an allowed type it supports "
                    f"(it offers {node.memory / GiB:.2f} GiB); unpin it or give it more memory")
    return ""


def explain(problem: Problem) -> str:
    m, w, o, fleet = problem.model, problem.workload, problem.options, problem.fleet
    allowed = [q for q in m.types if not o.types or q in o.types]
    usable = [n for n in fleet.nodes if n.name not in o.excluded]
    offered = sum(n.memory for n in usable)
    if not usable:
        return "every node is excluded; remove some --exclude options"
    # the least memory any plan needs: every layer at its smallest type any node supports
    smallest = []
    for lp in m.layers:
        sizes = [(lp.bytes[q], q) for q in allowed if any(q in n.speed for n in usable)]
        if not sizes:
            return f"no node supports any of the allowed types ({', '.join(allowed)})"
        smallest.append(min(sizes))
    weights = sum(b for b, _ in smallest) + m.embed_bytes + C.head_bytes(m, w) + C.runtime_bytes(m, w)
    kv = sum(C.kv_bytes(lp, w) for lp in m.layers)
    q_min = max(smallest)[1]
    if weights + kv > offered:
        return (f"the fleet offers {offered / GiB:.2f} GiB; the model needs at least {weights / GiB:.2f} GiB "
                f"at {q_min} plus {kv / GiB:.2f} GiB of KV cache for {w.concurrency} × {w.ctx} tokens; "
                f"add nodes, or lower --concurrency or the context")
    # drop the budget: is there any placement at all, and what is the least ΔNLL it can reach?
    from solver import fast, ilp

    free = dataclasses.replace(problem, options=dataclasses.replace(o, max_ppl_increase=1e12, objective="latency"))
    if fast.homogeneous(free):   # the aggregate model has the same feasible type choices
        lp, v = fast.master(free, ilp.candidates(free), transport=True)
        lp.setObjective(pulp.lpSum(m.layers[l].sensitivity[q] * g for (l, q), g in v["g"].items()))
    else:
        model = ilp.build(free)
        lp = model.lp
        lp.setObjective(pulp.lpSum(m.layers[l].sensitivity[q] * z for (l, n, q), z in model.z.items()))
    lp.constraints.pop("budget", None)
    status, best, _ = ilp.run(lp, o, o.time_limit, o.gap / 4)
    if status == "solved":
        return (f"no assignment meets a {o.max_ppl_increase:g} % perplexity budget on this fleet: the best possible "
                f"is {100 * math.expm1(best):.2f} %; raise --max-ppl-increase or add memory")
    largest = max(usable, key=lambda n: n.memory)
    if status == "timeout":
        return f"the solver could not decide within {o.time_limit:g} s whether any plan fits; raise --time-limit"
    if o.max_stages:
        return (f"the model does not fit on {o.max_stages} stage(s) of this fleet (largest node {largest.name}: "
                f"{largest.memory / GiB:.2f} GiB); raise --max-stages")
    if o.pinned:
        return f"no plan uses every pinned node ({', '.join(o.pinned)}) within memory; unpin some"
    return (f"the fleet offers {offered / GiB:.2f} GiB in total but the layers cannot be split to fit each node "
            f"(the model needs {(weights + kv) / GiB:.2f} GiB at {q_min}, a layer "
            f"{(smallest[0][0] + C.kv_bytes(m.layers[0], w)) / GiB:.3f} GiB); add memory or lower the context")
