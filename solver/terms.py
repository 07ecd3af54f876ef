"""The objective's terms, written once for every formulation: the full ILP (ilp.build), the
aggregate master (fast.master), the per-layer types sub-problem (fast.assign_types) and the
LLM-PQ-style baseline (baselines.naive_ilp).

Every coefficient comes from the cost model (solver/cost.py). A formulation hands over its
own variables: per stage, (layer, type) pairs with the variable that puts that layer at that
type there; per node, the expressions "holds a stage", "holds the first stage" and "holds the
last stage" (which runs the LM head); per pipeline hop, the variable that says the hop is taken.
"""
from __future__ import annotations

import pulp

from solver import cost as C
from solver.problem import Node, Problem


def layer_time(problem: Problem, node: Node, l: int, q: str) -> float:
    """A layer's time on a node at type q, in the objective's terms (its share of one request's
    latency, or its busy time per request with `concurrency` in flight)."""
    lp, w = problem.model.layers[l], problem.workload
    if problem.options.objective == "latency":
        return C.layer_latency_s(node, lp, q, w)
    return C.layer_busy_s(node, lp, q, w)


def head_time(problem: Problem, node: Node) -> float:
    """The LM head's time on a node holding the last stage, in the objective's terms."""
    m, w = problem.model, problem.workload
    if problem.options.objective == "latency":
        return C.head_latency_s(node, m, w)
    return C.head_busy_s(node, m, w)


def stage_time(problem: Problem, node: Node, layers) -> pulp.LpAffineExpression:
    """A stage's compute in the objective's terms: Σ layer_time × variable over its
    ((layer, type), variable) pairs."""
    return pulp.lpSum(layer_time(problem, node, l, q) * v for (l, q), v in layers)


def latency(problem: Problem, net: C.Network, stages, used: dict, hops, first: dict,
            last: dict) -> pulp.LpAffineExpression:
    """One request's latency but the way round (`ring`): the stages' compute (stage_time
    expressions), each used node's step overheads (node -> "holds a stage"), each hop taken
    ((a, b), variable), the controller's link to the first node (node -> "holds the first
    stage"), and the LM head on the last and its reply to the controller (node -> "holds the
    last stage")."""
    m, w, fleet = problem.model, problem.workload, problem.fleet
    return (pulp.lpSum(stages)
            + pulp.lpSum(C.stage_overhead_latency_s(fleet.node(n), w) * u for n, u in used.items())
            + pulp.lpSum((head_time(problem, fleet.node(n)) + C.reply_s(net, n)) * x for n, x in last.items())
            + pulp.lpSum(C.hop_latency_s(net, m, w, a, b) * v for (a, b), v in hops)
            + pulp.lpSum(C.controller_first_s(net, w, n) * x for n, x in first.items()))


def ring(lp: pulp.LpProblem, problem: Problem, net: C.Network, first: dict, last: dict) -> pulp.LpAffineExpression:
    """The way round's share of one request's latency (cost.ring_latency_s) for the pair of
    nodes holding the last and the first stage: a variable r ≥ last[a] + first[b] − 1 per
    pair, which the minimised objective holds at that bound, so that it is exact where the
    ends are whole (and 0 for one stage, which goes on inside its node)."""
    w, names = problem.workload, list(first)
    parts = []
    for a, x in last.items():
        for b, y in first.items():
            cost = C.ring_latency_s(net, w, a, b)
            if a == b or cost <= 0:
                continue
            i, j = names.index(a), names.index(b)
            r = pulp.LpVariable(f"ring_{i}_{j}", lowBound=0)
            lp += r >= x + y - 1, f"ring_{i}_{j}"
            parts.append(cost * r)
    return pulp.lpSum(parts)


def step_time(problem: Problem, node: Node, stage: pulp.LpAffineExpression, used, last) -> pulp.LpAffineExpression:
    """A stage's busy time per request (throughput objective): its compute (stage_time), the
    node's step overheads if used, and the LM head if it holds the last stage."""
    return stage + C.stage_overhead_busy_s(node, problem.workload) * used + head_time(problem, node) * last


def bottleneck(lp: pulp.LpProblem, problem: Problem, net: C.Network, steps: dict, hops: dict) -> None:
    """The throughput objective: the least T that no stage's busy time per request (row name
    -> step_time) and no hop's (row name -> (a, b, variable)) exceeds."""
    m, w = problem.model, problem.workload
    T = pulp.LpVariable("T", lowBound=0)
    lp += T, "bottleneck"
    for name, step in steps.items():
        lp += step <= T, name
    for name, (a, b, v) in hops.items():
        lp += C.hop_busy_s(net, m, w, a, b) * v <= T, name
