"""The placement ILP: build, run, extract, every constraint named (fast.solve_ilp chains them).

Variables (after filtering, see `candidates`):
  z[l,n,q]  binary   layer l runs on node n at type q
  s[l,n]    ≥ 0      node n's stage starts at layer l (exact: s = f[l,n]·(1 − f[l-1,n]))
  t[n,m]    binary   node m's stage directly follows node n's
  T         ≥ 0      bottleneck step time (throughput objective only)
with f[l,n] = Σ_q z[l,n,q] (an expression, not a variable).

Contiguity is one start per node (Σ_l s[l,n] ≤ 1) rather than the pairwise rows of the
naive formulation; stage order enters only through t and the start positions
P[n] = Σ_l l·s[l,n], so the model has O(L·N·Q + N²) variables instead of O(L·N²·Q).
"""
from __future__ import annotations

import logging
import math
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pulp

from solver import cost as C
from solver import terms
from solver.plan import Stage, stages_from_layers
from solver.problem import Options, Problem
from solver.quiet import no_stdout

log = logging.getLogger(__name__)


@dataclass
class Model:
    lp: pulp.LpProblem
    z: dict           # (l, n, q) -> var
    t: dict           # (n, m) -> var
    problem: Problem
    nodes: list       # node names that may be used
    stats: dict


@dataclass(frozen=True)
class Vars:
    """The ILP's variables and the expressions on them (module doc)."""
    cand: dict        # (l, n) -> candidate types
    nodes: list       # node names that may be used
    z: dict           # (l, n, q) -> binary
    f: dict           # (l, n) -> Σ_q z[l, n, q]
    s: dict           # (l, n) -> stage start
    t: dict           # (n, m) -> binary
    start: dict       # n -> first layer of n (0 if unused)
    used: dict        # n -> 1 if n holds a stage
    count: dict       # n -> layers on n


def candidates(problem: Problem) -> dict[tuple[int, str], list[str]]:
    """Types worth considering for each (layer, node): supported, allowed, fits on the node
    on its own, and not dominated by another type that is no larger, no slower and no less
    accurate (ties keep the better-quality type)."""
    m, w, o = problem.model, problem.workload, problem.options
    allowed = [q for q in m.types if not o.types or q in o.types]
    out = {}
    for node in problem.fleet.nodes:
        if node.name in o.excluded:
            continue
        for l, lp in enumerate(m.layers):
            room = node.memory - C.runtime_bytes(m, w) - (m.embed_bytes if l == 0 else 0) \
                - (C.head_bytes(m, w) if l == m.n_layer - 1 else 0)
            opts = []
            for q in allowed:
                if not lp.takes(q) or q not in node.speed or C.layer_bytes(m, l, q, w) > room:
                    continue
                key = (C.layer_bytes(m, l, q, w), terms.layer_time(problem, node, l, q), lp.sensitivity[q])
                opts.append((q, key))
            keep = [q for i, (q, k) in enumerate(opts)
                    if not any(all(a <= b for a, b in zip(k2, k)) and (k2 != k or j < i)
                               for j, (q2, k2) in enumerate(opts) if j != i)]
            if keep:
                out[(l, node.name)] = keep
    return out


def variables(problem: Problem, cand: dict) -> Vars:
    """z, s and t for the nodes that may hold a layer, and f, start, used and count on them."""
    L = problem.model.n_layer
    nodes = [n.name for n in problem.fleet.nodes if any((l, n.name) in cand for l in range(L))]
    z = {(l, n, q): pulp.LpVariable(f"z_{l}_{i}_{q}", cat="Binary")
         for i, n in enumerate(nodes) for l in range(L) for q in cand.get((l, n), [])}
    f = {(l, n): pulp.lpSum(z[l, n, q] for q in cand.get((l, n), [])) for l in range(L) for n in nodes}
    s = {(l, n): pulp.LpVariable(f"s_{l}_{i}", lowBound=0) for i, n in enumerate(nodes) for l in range(L)}
    t = {(a, b): pulp.LpVariable(f"t_{i}_{j}", cat="Binary")
         for i, a in enumerate(nodes) for j, b in enumerate(nodes) if a != b}
    return Vars(cand=cand, nodes=nodes, z=z, f=f, s=s, t=t,
                start={n: pulp.lpSum(l * s[l, n] for l in range(L)) for n in nodes},
                used={n: pulp.lpSum(s[l, n] for l in range(L)) for n in nodes},
                count={n: pulp.lpSum(f[l, n] for l in range(L)) for n in nodes})


def build(problem: Problem) -> Model:
    """The ILP of a problem (module doc), every row named."""
    problem.validate()
    t0 = time.perf_counter()
    o, L = problem.options, problem.model.n_layer
    v = variables(problem, candidates(problem))
    net = C.Network(problem.fleet)
    lp = pulp.LpProblem("placement", pulp.LpMinimize)
    for l in range(L):
        lp += pulp.lpSum(v.f[l, n] for n in v.nodes) == 1, f"assign_{l}"
    for i, n in enumerate(v.nodes):
        node_rows(lp, problem, v, i, n)
    for (a, b), x in v.t.items():   # m follows n only where n ends: P[m] = P[n] + count[n]
        i, j = v.nodes.index(a), v.nodes.index(b)
        lp += v.start[b] - v.start[a] - v.count[a] <= L * (1 - x), f"follow_hi_{i}_{j}"
        lp += v.start[b] - v.start[a] - v.count[a] >= -L * (1 - x), f"follow_lo_{i}_{j}"
    lp += pulp.lpSum(problem.model.layers[l].sensitivity[q] * x for (l, n, q), x in v.z.items()) <= o.budget, "budget"
    if o.max_stages:
        lp += pulp.lpSum(v.used.values()) <= o.max_stages, "max_stages"
    symmetry_rows(lp, problem, v, net)
    objective(lp, problem, v, net)
    stats = {"variables": len(lp.variables()), "constraints": len(lp.constraints),
             "binaries": len(v.z) + len(v.t), "build_s": time.perf_counter() - t0}
    return Model(lp=lp, z=v.z, t=v.t, problem=problem, nodes=v.nodes, stats=stats)


def node_rows(lp: pulp.LpProblem, problem: Problem, v: Vars, i: int, n: str) -> None:
    """Node n's rows: one contiguous stage, memory, a predecessor unless first, pinned."""
    L = problem.model.n_layer
    for l in range(L):
        prev = v.f[l - 1, n] if l else 0
        lp += v.s[l, n] >= v.f[l, n] - prev, f"start_lo_{l}_{i}"
        lp += v.s[l, n] <= v.f[l, n], f"start_hi_{l}_{i}"
        if l:
            lp += v.s[l, n] <= 1 - prev, f"start_first_{l}_{i}"
    lp += v.used[n] <= 1, f"contiguous_{i}"
    memory_rows(lp, problem, v, i, n)
    # a stage after the first needs a predecessor; each node hands over to at most one
    lp += pulp.lpSum(v.t[a, n] for a in v.nodes if a != n) >= v.used[n] - v.f[0, n], f"pred_{i}"
    lp += pulp.lpSum(v.t[a, n] for a in v.nodes if a != n) <= 1, f"pred_max_{i}"
    lp += pulp.lpSum(v.t[n, b] for b in v.nodes if b != n) <= 1, f"succ_max_{i}"
    if n in problem.options.pinned:
        lp += v.count[n] >= 1, f"pinned_{i}"


def memory_rows(lp: pulp.LpProblem, problem: Problem, v: Vars, i: int, n: str) -> None:
    """Node n's memory, and the most layers it can hold at its smallest type."""
    m, w, L = problem.model, problem.workload, problem.model.n_layer
    node = problem.fleet.node(n)
    mem = (pulp.lpSum(C.layer_bytes(m, l, q, w) * v.z[l, n, q] for l in range(L) for q in v.cand.get((l, n), []))
           + m.embed_bytes * v.f[0, n] + C.head_bytes(m, w) * v.f[L - 1, n] + C.runtime_bytes(m, w) * v.used[n])
    # capacity scaled by `used`: in the LP relaxation a node cannot hold a fraction of the
    # model while paying only a fraction of its fixed (runtime, embedding) memory
    lp += mem * (1.0 / node.memory) <= v.used[n], f"memory_{i}"
    smallest = min(C.layer_bytes(m, l, q, w) for l in range(L) for q in v.cand.get((l, n), []))
    most = (node.memory - C.runtime_bytes(m, w)) // smallest
    if most < L:
        lp += v.count[n] <= most * v.used[n], f"max_layers_{i}"


def symmetry_rows(lp: pulp.LpProblem, problem: Problem, v: Vars, net: C.Network) -> None:
    """Of identical nodes (same figures, same routes), use them in name order."""
    L = problem.model.n_layer
    for group in identical_nodes(problem, v.nodes, net):
        for a, b in zip(group, group[1:]):
            i, j = v.nodes.index(a), v.nodes.index(b)
            lp += v.used[a] >= v.used[b], f"sym_used_{i}_{j}"
            lp += v.start[a] <= v.start[b] + L * (1 - v.used[b]), f"sym_order_{i}_{j}"


def objective(lp: pulp.LpProblem, problem: Problem, v: Vars, net: C.Network) -> None:
    """The chosen objective on the ILP's variables (solver/terms.py)."""
    fleet, L = problem.fleet, problem.model.n_layer
    stages = {n: terms.stage_time(problem, fleet.node(n), [((l, q), v.z[l, n, q])
                                                           for l in range(L) for q in v.cand.get((l, n), [])])
              for n in v.nodes}
    if problem.options.objective == "latency":
        first, last = {n: v.f[0, n] for n in v.nodes}, {n: v.f[L - 1, n] for n in v.nodes}
        lp += terms.latency(problem, net, stages.values(), v.used, v.t.items(), first, last) \
            + terms.ring(lp, problem, net, first, last), "latency"
        return
    steps = {f"stage_time_{i}": terms.step_time(problem, fleet.node(n), stages[n], v.used[n], v.f[L - 1, n])
             for i, n in enumerate(v.nodes)}
    hops = {f"hop_time_{v.nodes.index(a)}_{v.nodes.index(b)}": (a, b, x) for (a, b), x in v.t.items()}
    terms.bottleneck(lp, problem, net, steps, hops)


def identical_nodes(problem: Problem, nodes: list[str], net: C.Network) -> list[list[str]]:
    """Groups of interchangeable nodes: same memory, speeds, overhead and pin status, and the
    same route cost to every other vertex (for a token's and a prompt's activations)."""
    fleet, o = problem.fleet, problem.options
    sizes = (problem.model.act_bytes_per_token, problem.model.act_bytes_per_token * problem.workload.prompt_tokens)
    verts = list(net.graph.nodes)

    def figures(n):
        node = fleet.node(n)
        return (node.memory, tuple(sorted(node.speed.items())), node.step_overhead_s, n in o.pinned)

    def same(a, b):
        return figures(a) == figures(b) and all(
            math.isclose(net.transfer_s(a, v, x), net.transfer_s(b, v, x), rel_tol=1e-12, abs_tol=0)
            for v in verts if v not in (a, b) for x in sizes)

    groups: list[list[str]] = []
    for n in nodes:
        for g in groups:
            if same(g[0], n):
                g.append(n)
                break
        else:
            groups.append([n])
    return [g for g in groups if len(g) > 1]


def run(lp: pulp.LpProblem, o: Options, time_limit: float, gap_rel: float, gap_abs: float | None = None,
        warm: dict | None = None) -> tuple[str, float, float]:
    """Run the chosen MIP solver on a PuLP model; returns (status, objective, best bound) with
    status solved | infeasible | timeout | error, from the solver's own verdict rather than
    PuLP's label. warm: variable name -> value, a MIP start (HiGHS only)."""
    if o.solver == "highs":
        import highspy

        # time rows are in seconds: HiGHS's default feasibility tolerance (1e-6) would let a
        # bottleneck of a few ms sit 1e-6 s (0.05 %) below its true value, and the bound with it
        s = _WarmHiGHS(warm, msg=False, timeLimit=max(time_limit, 0.05), gapRel=gap_rel, gapAbs=gap_abs,
                       threads=o.threads or None, mip_feasibility_tolerance=1e-9)
        lp.solve(s)
        info = lp.solverModel.getInfo()
        ms = lp.solverModel.getModelStatus()
        if ms in (highspy.HighsModelStatus.kInfeasible, highspy.HighsModelStatus.kUnboundedOrInfeasible):
            return "infeasible", math.nan, math.nan
        if info.primal_solution_status != 2:   # 2 = feasible point available
            return ("timeout" if ms == highspy.HighsModelStatus.kTimeLimit else "error"), math.nan, info.mip_dual_bound
        # a model without integer variables has no MIP bound: its LP optimum is the bound
        bound = info.mip_dual_bound if not math.isinf(info.mip_dual_bound) else info.objective_function_value
        return "solved", info.objective_function_value, bound
    if o.solver == "cbc":
        with tempfile.TemporaryDirectory() as d:
            logf = Path(d) / "cbc.log"
            s = pulp.PULP_CBC_CMD(msg=False, timeLimit=max(time_limit, 1.0), gapRel=gap_rel, gapAbs=gap_abs,
                                  threads=o.threads or None, logPath=str(logf))
            lp.solve(s)
            text = logf.read_text() if logf.exists() else ""
        if "infeasible" in text.lower().split("result -")[-1][:80] or lp.status == pulp.LpStatusInfeasible:
            return "infeasible", math.nan, math.nan
        if lp.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
            return "timeout", math.nan, math.nan
        obj = pulp.value(lp.objective)
        return "solved", obj, _cbc_bound(text, obj)
    raise ValueError(f"unknown solver {o.solver!r}; use highs or cbc")


class _WarmHiGHS(pulp.HiGHS):
    """PuLP's HiGHS with a MIP start: `warm` maps variable names to values."""

    def __init__(self, warm: dict | None, **kw):
        super().__init__(**kw)
        self.warm = warm

    def actualSolve(self, lp):
        with no_stdout():   # the banner of the highspy.Highs() that PuLP makes
            return super().actualSolve(lp)

    def callSolver(self, lp):
        if self.warm:
            start = [(v.index, float(self.warm[v.name])) for v in lp.variables() if v.name in self.warm]
            idx, val = zip(*start)
            lp.solverModel.setSolution(len(idx), np.array(idx, dtype=np.int32), np.array(val, dtype=np.float64))
        lp.solverModel.run()


def _cbc_bound(log_text: str, obj: float) -> float:
    """CBC prints 'Lower bound:' at the end; 'Optimal solution found' means bound = objective
    within its gap; a time-limited run prints the bound it reached."""
    m = re.search(r"Lower bound:\s+([-+0-9.eE]+)", log_text)
    if m:
        return float(m.group(1))
    if "Optimal solution found" in log_text:
        return obj
    return -math.inf


def extract(model: Model) -> list[Stage]:
    """The stages of the solved model, in layer order."""
    chosen = {}
    for (l, n, q), v in model.z.items():
        if (v.varValue or 0) > 0.5:
            assert l not in chosen, f"layer {l} assigned twice"
            chosen[l] = (n, q)
    assert len(chosen) == model.problem.model.n_layer, "the solver returned a partial assignment"
    return stages_from_layers([chosen[l] for l in range(len(chosen))])
