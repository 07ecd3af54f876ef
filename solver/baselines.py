"""What users of the public systems get, evaluated with the same cost model.

- equal:   the same number of layers on every node (distributed-llama, petals-style manual)
- memory:  layers in proportion to free memory (exo, llama.cpp RPC default)
- compute: layers in proportion to compute speed (Cake)
each with one uniform type for the whole model: the best-predicted one that fits memory and
meets the budget; and `naive_ilp`, an LLM-PQ-style formulation (a binary per layer × node ×
type, pairwise contiguity rows, per-layer transition variables for links).
"""
from __future__ import annotations

import math
import time

import pulp

from solver import cost as C
from solver import terms
from solver.ilp import run
from solver.plan import Plan, Stage, evaluate, finished, stages_from_layers, violations
from solver.problem import Problem

SPLITS = ("equal", "memory", "compute")


def split(weights: list[float], n_layer: int) -> list[int]:
    """Layer counts proportional to weights (largest remainder), every node ≥ 0, sum = n_layer."""
    total = sum(weights)
    raw = [w / total * n_layer for w in weights]
    counts = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True)[: n_layer - sum(counts)]:
        counts[i] += 1
    return counts


def baseline(problem: Problem, how: str) -> Plan:
    """A proportional split over all usable nodes (fleet order), best uniform type."""
    t0 = time.perf_counter()
    m, o = problem.model, problem.options
    nodes = [n for n in problem.fleet.nodes if n.name not in o.excluded]
    if how == "equal":
        weights = [1.0] * len(nodes)
    elif how == "memory":
        weights = [float(n.memory) for n in nodes]
    elif how == "compute":
        weights = [max(s.prefill_flops for s in n.speed.values()) for n in nodes]
    else:
        raise ValueError(f"unknown baseline {how!r}; use one of {SPLITS}")
    counts = split(weights, m.n_layer)
    best, best_value = None, math.inf
    for q in (q for q in m.types if not o.types or q in o.types):
        stages, a = [], 0
        for node, k in zip(nodes, counts):
            if k:
                stages.append(Stage(node.name, a, a + k, (q,) * k))
                a += k
        if violations(problem, stages):
            continue
        value = evaluate(problem, stages).objective(o.objective)
        if value < best_value:
            best, best_value = stages, value
    elapsed = time.perf_counter() - t0
    if best is None:
        return Plan((), "infeasible", math.nan, math.nan, math.nan, elapsed, how,
                    f"no single type fits the {how} split within memory and the budget")
    return Plan(tuple(best), "feasible", best_value, math.nan, math.nan, elapsed, how, "", evaluate(problem, best))


def naive_ilp(problem: Problem) -> Plan:
    """The LLM-PQ-style formulation on open solvers: y[l,n,q] binaries, contiguity by pairwise
    rows (layers i < k on n imply layer k−1 on n), a transition variable per layer and node
    pair for link costs. Same data, same cost model, same solver options."""
    t0 = time.perf_counter()
    problem.validate()
    o, L = problem.options, problem.model.n_layer
    lp, y = naive_model(problem)
    build_s = time.perf_counter() - t0
    status, _, bound = run(lp, o, o.time_limit, o.gap)
    elapsed = time.perf_counter() - t0
    stats = {"build_s": build_s, "variables": len(lp.variables()), "constraints": len(lp.constraints)}
    if status != "solved":
        return Plan((), "infeasible" if status == "infeasible" else "timeout", math.nan, bound, math.nan, elapsed,
                    "naive-ilp", "", None, stats)
    choice = [next((n, q) for (l2, n, q), v in y.items() if l2 == l and (v.varValue or 0) > 0.5) for l in range(L)]
    return finished(problem, stages_from_layers(choice), bound, elapsed, "naive-ilp", stats)


def naive_model(problem: Problem) -> tuple[pulp.LpProblem, dict]:
    """The naive model (naive_ilp) and its y variables: (layer, node, type) -> binary."""
    m, o, fleet = problem.model, problem.options, problem.fleet
    L = m.n_layer
    net = C.Network(fleet)
    nodes = [n.name for n in fleet.nodes if n.name not in o.excluded]
    allowed = [q for q in m.types if not o.types or q in o.types]
    lp = pulp.LpProblem("naive", pulp.LpMinimize)
    y = {(l, n, q): pulp.LpVariable(f"y_{l}_{i}_{q}", cat="Binary") for i, n in enumerate(nodes)
         for l in range(L) for q in allowed if q in fleet.node(n).speed and m.layers[l].takes(q)}
    x = {(l, n): pulp.lpSum(y[l, n, q] for q in allowed if (l, n, q) in y) for l in range(L) for n in nodes}
    u = {n: pulp.LpVariable(f"u_{i}", cat="Binary") for i, n in enumerate(nodes)}
    tr = {(l, a, b): pulp.LpVariable(f"w_{l}_{i}_{j}", lowBound=0)
          for l in range(L - 1) for i, a in enumerate(nodes) for j, b in enumerate(nodes) if a != b}
    for l in range(L):
        lp += pulp.lpSum(x[l, n] for n in nodes) == 1, f"assign_{l}"
    for i, n in enumerate(nodes):
        naive_node_rows(lp, problem, i, n, y, x, u[n])
    for (l, a, b), v in tr.items():
        lp += v >= x[l, a] + x[l + 1, b] - 1, f"trans_{l}_{nodes.index(a)}_{nodes.index(b)}"
    lp += pulp.lpSum(m.layers[l].sensitivity[q] * v for (l, n, q), v in y.items()) <= o.budget, "budget"
    if o.max_stages:
        lp += pulp.lpSum(u.values()) <= o.max_stages, "max_stages"
    stages = {n: terms.stage_time(problem, fleet.node(n), [((l, q), y[l, n, q])
                                                           for l in range(L) for q in allowed if (l, n, q) in y])
              for n in nodes}
    if o.objective == "latency":
        first, last = {n: x[0, n] for n in nodes}, {n: x[L - 1, n] for n in nodes}
        lp += terms.latency(problem, net, stages.values(), u, (((a, b), v) for (l, a, b), v in tr.items()),
                            first, last) + terms.ring(lp, problem, net, first, last), "latency"
    else:
        steps = {f"stage_time_{i}": terms.step_time(problem, fleet.node(n), stages[n], u[n], x[L - 1, n])
                 for i, n in enumerate(nodes)}
        hops = {f"hop_time_{l}_{nodes.index(a)}_{nodes.index(b)}": (a, b, v) for (l, a, b), v in tr.items()}
        terms.bottleneck(lp, problem, net, steps, hops)
    return lp, y


def naive_node_rows(lp: pulp.LpProblem, problem: Problem, i: int, n: str, y: dict, x: dict, used) -> None:
    """Node n's rows: used if it holds a layer, contiguity by pairwise rows, memory, pinned."""
    m, w, o, L = problem.model, problem.workload, problem.options, problem.model.n_layer
    allowed = [q for q in m.types if not o.types or q in o.types]
    for l in range(L):
        lp += x[l, n] <= used, f"used_{l}_{i}"
    for a in range(L):
        for k in range(a + 2, L):
            lp += x[a, n] + x[k, n] - 1 <= x[k - 1, n], f"contig_{a}_{k}_{i}"
    lp += (pulp.lpSum(C.layer_bytes(m, l, q, w) * y[l, n, q] for l in range(L) for q in allowed if (l, n, q) in y)
           + m.embed_bytes * x[0, n] + C.head_bytes(m, w) * x[L - 1, n] + C.runtime_bytes(m, w) * used
           <= problem.fleet.node(n).memory), f"memory_{i}"
    if n in o.pinned:
        lp += pulp.lpSum(x[l, n] for l in range(L)) >= 1, f"pinned_{i}"
