"""The objective's terms, written once for every formulation: the full ILP (ilp.build), the
aggregate master (fast.master), the per-layer types sub-problem (fast.assign_types) and the
LLM-PQ-style baseline (baselines.naive_ilp).

Every coefficient comes from the cost model (solver/cost.py). A formulation hands over its
own variables: per stage, (layer, type) pairs with the variable that puts that layer at that
type there; per node, the expressions "holds a stage" and "holds the first stage"; per
pipeline hop, the variable that says the hop is taken.
"""
from __future__ import annotations

import pulp

from solver import cost as C
from solver.problem import Node, Problem


def layer_time(problem: Problem, node: Node, l: int, q: str) -> float:
    """A layer's time on a node at type q, in the objective's terms (latency share or decode step)."""
    lp, w = problem.model.layers[l], problem.workload
    if problem.options.objective == "latency":
        return C.layer_latency_s(node, lp, q, w)
    return C.decode_s(node, lp, q, w, w.concurrency)


def stage_time(problem: Problem, node: Node, layers) -> pulp.LpAffineExpression:
    """A stage's compute in the objective's terms: Σ layer_time × variable over its
    ((layer, type), variable) pairs."""
    return pulp.lpSum(layer_time(problem, node, l, q) * v for (l, q), v in layers)


def latency(problem: Problem, net: C.Network, stages, used: dict, hops, first: dict) -> pulp.LpAffineExpression:
    """One request's latency: the stages' compute (stage_time expressions), each used node's
    step overheads (node -> "holds a stage"), each hop taken ((a, b), variable) and the
    controller's link to the first node (node -> "holds the first stage")."""
    m, w, fleet = problem.model, problem.workload, problem.fleet
    return (pulp.lpSum(stages)
            + pulp.lpSum(C.stage_overhead_latency_s(fleet.node(n), w) * u for n, u in used.items())
            + pulp.lpSum(C.hop_latency_s(net, m, w, a, b) * v for (a, b), v in hops)
            + pulp.lpSum(C.controller_latency_s(net, w, n) * x for n, x in first.items()))


def step_time(node: Node, stage: pulp.LpAffineExpression, used) -> pulp.LpAffineExpression:
    """A stage's decode step: its compute (stage_time) and the node's step overhead if used."""
    return stage + node.step_overhead_s * used


def bottleneck(lp: pulp.LpProblem, problem: Problem, net: C.Network, steps: dict, hops: dict) -> None:
    """The throughput objective: the least T that no stage's step (row name -> step_time) and
    no hop's transfer of a decode step (row name -> (a, b, variable)) exceeds."""
    m, w = problem.model, problem.workload
    T = pulp.LpVariable("T", lowBound=0)
    lp += T, "bottleneck"
    for name, step in steps.items():
        lp += step <= T, name
    for name, (a, b, v) in hops.items():
        lp += C.hop_step_s(net, m, w, a, b) * v <= T, name
