"""The solver's entry point and its fast exact path: an aggregate relaxation for the bound, a
constructed plan for the incumbent, and the full ILP (warm-started, with the bound as a cut)
only when they differ.

`solve` takes this path when every transformer block has the same shape, and the full ILP
alone (`solve_ilp`, solver/ilp.py) otherwise. Blocks of one shape make a stage's time and
memory depend only on how many of its layers are at each type, not on which. The *master*
problem therefore chooses, per node, a count of layers per type (N×Q integers instead of
L×N×Q binaries). It meets the accuracy budget through cuts on those counts: the least ΔNLL
of a count vector is a transportation problem (any layer may take any counted type), and
its dual gives a plane below it that `solve_master` adds while the counts exceed the budget.
The pipeline order is a path through the used nodes (pair variables with Miller–Tucker–
Zemlin positions), so hops cost exactly what they cost in a plan. Every real plan is
feasible for the master, so its optimum is a lower bound. The plan is then built from it:
the master's nodes with the middle ones reordered so that each block's counts suit its
layers' sensitivities (`block_orders`), the counts placed directly when they meet the
budget (`sorted_types`), else each layer's type chosen exactly for those blocks (a small
ILP). When plan and bound agree within the gap, the plan is proven optimal; otherwise the
full ILP (solver/ilp.py) runs from the plan with `objective ≥ bound` added. When no plan
exists, solver/explain.py says why.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import time

import numpy as np
import pulp

from solver import cost as C
from solver import ilp, terms
from solver.baselines import split
from solver.explain import shortfall, unplaceable_pin, verdict
from solver.plan import Plan, Stage, evaluate, finished, violations
from solver.quiet import no_stdout
from solver.problem import Problem

log = logging.getLogger(__name__)

MASTER_SHARE = 0.8          # of the time limit; the rest builds the plan (and may close a gap)
FULL_ILP_MIN_SHARE = 0.25   # the full ILP runs only with at least this share of the limit left
FULL_ILP_S_PER_BINARY = 4e-4   # building the full ILP and handing it to HiGHS (measured: 7 s for 80×64×7);
                               # it runs only when that takes at most half the time left
BUDGET_TOL = 1e-6           # relative: the MIP solver meets a cut only to its feasibility tolerance


def homogeneous(problem: Problem) -> bool:
    """Whether every layer has the same shape at the allowed types: the same sizes and FLOPs,
    and the same types it may take (a mixed master's layers differ)."""
    m, o = problem.model, problem.options
    allowed = [q for q in m.types if not o.types or q in o.types]

    def shape(lp) -> tuple:
        return ({q: lp.bytes[q] for q in allowed if lp.takes(q)}, lp.flops, lp.attn_flops_per_ctx,
                lp.kv_bytes_per_token)

    first = shape(m.layers[0])
    return all(shape(lp) == first for lp in m.layers)


def master(problem: Problem, cand: dict, transport: bool = False) -> tuple[pulp.LpProblem, dict]:
    """The aggregate relaxation (see module doc). Returns the model and its variables.
    transport: meet the budget through the layer × type transportation rows (L×Q more columns);
    without it the budget is left to the cuts that solve_master adds (budget_cut)."""
    m, L = problem.model, problem.model.n_layer
    nodes = [n.name for n in problem.fleet.nodes if any((l, n.name) in cand for l in range(L))]
    types = {n: sorted({q for l in range(L) for q in cand.get((l, n), [])}, key=m.types.index) for n in nodes}
    all_types = sorted({q for n in nodes for q in types[n]}, key=m.types.index)
    net = C.Network(problem.fleet)
    lp = pulp.LpProblem("master", pulp.LpMinimize)
    v = master_variables(problem, nodes, types)
    for i, n in enumerate(nodes):
        master_node_rows(lp, problem, v, i, n)
    master_fleet_rows(lp, problem, v, net)
    v["count"] = {q: pulp.lpSum(v["c"][n, q] for n in nodes if q in types[n]) for q in all_types}
    v["g"] = transport_rows(lp, problem, v["count"]) if transport else {}
    v["t"] = path_rows(lp, v)
    master_objective(lp, problem, v, net)
    return lp, v


def master_variables(problem: Problem, nodes: list[str], types: dict) -> dict:
    """Per node: layers per type (c, at most what fits), used (u), first and last stage, and
    k, its layer count."""
    m, w, L = problem.model, problem.workload, problem.model.n_layer
    rt = C.runtime_bytes(m, w)
    v: dict = {"nodes": nodes, "types": types, "c": {}, "u": {}, "first": {}, "last": {}, "most": {}}
    for i, n in enumerate(nodes):
        node = problem.fleet.node(n)
        v["most"][n] = min(L, max(0, (node.memory - rt) // min(C.layer_bytes(m, 0, q, w) for q in types[n])))
        for q in types[n]:
            v["c"][n, q] = pulp.LpVariable(f"c_{i}_{q}", lowBound=0, upBound=v["most"][n], cat="Integer")
        v["u"][n] = pulp.LpVariable(f"u_{i}", cat="Binary")
        v["first"][n] = pulp.LpVariable(f"first_{i}", cat="Binary")
        v["last"][n] = pulp.LpVariable(f"last_{i}", cat="Binary")
    v["k"] = {n: pulp.lpSum(v["c"][n, q] for q in types[n]) for n in nodes}
    return v


def master_node_rows(lp: pulp.LpProblem, problem: Problem, v: dict, i: int, n: str) -> None:
    """Node n's rows in the master: its count within what fits, its ends, its memory, pinned."""
    m, w, L = problem.model, problem.workload, problem.model.n_layer
    node, rt = problem.fleet.node(n), C.runtime_bytes(m, w)
    c, u, k, first, last, types = v["c"], v["u"], v["k"], v["first"], v["last"], v["types"]
    lp += k[n] <= v["most"][n] * u[n], f"count_hi_{i}"
    lp += k[n] >= u[n], f"count_lo_{i}"
    lp += first[n] <= u[n], f"first_used_{i}"
    lp += last[n] <= u[n], f"last_used_{i}"
    if node.memory - rt - m.embed_bytes - C.head_bytes(m, w) < L * min(C.layer_bytes(m, 0, q, w) for q in types[n]):
        # cannot hold the whole model, so never both ends: without this row the relaxation
        # makes one node fractionally first and last, and the ends' memory all but vanishes
        lp += first[n] + last[n] <= u[n], f"one_end_{i}"
    lp += (pulp.lpSum(C.layer_bytes(m, 0, q, w) * c[n, q] for q in types[n]) + m.embed_bytes * first[n]
           + C.head_bytes(m, w) * last[n] + rt * u[n]) * (1.0 / node.memory) <= u[n], f"memory_{i}"
    if n in problem.options.pinned:
        lp += u[n] == 1, f"pinned_{i}"


def master_fleet_rows(lp: pulp.LpProblem, problem: Problem, v: dict, net: C.Network) -> None:
    """Every layer placed, one first and one last stage, the stage limit, and interchangeable
    nodes filled in name order."""
    nodes, k, o = v["nodes"], v["k"], problem.options
    lp += pulp.lpSum(k.values()) == problem.model.n_layer, "all_layers"
    lp += pulp.lpSum(v["first"].values()) == 1, "one_first"
    lp += pulp.lpSum(v["last"].values()) == 1, "one_last"
    if o.max_stages:
        lp += pulp.lpSum(v["u"].values()) <= o.max_stages, "max_stages"
    for group in ilp.identical_nodes(problem, nodes, net):
        for a, b in zip(group, group[1:]):
            lp += k[a] >= k[b], f"symmetry_{nodes.index(a)}_{nodes.index(b)}"


def transport_rows(lp: pulp.LpProblem, problem: Problem, count: dict) -> dict:
    """The budget met exactly: each layer's share of each counted type (g), the counts as the
    column sums, and the ΔNLL of that assignment within the budget."""
    m, L = problem.model, problem.model.n_layer
    g = {(l, q): pulp.LpVariable(f"g_{l}_{q}", lowBound=0, upBound=1) for l in range(L) for q in count}
    for l in range(L):
        lp += pulp.lpSum(g[l, q] for q in count) == 1, f"layer_type_{l}"
    for q in count:
        lp += pulp.lpSum(g[l, q] for l in range(L)) == count[q], f"type_count_{q}"
    lp += pulp.lpSum(m.layers[l].sensitivity[q] * g[l, q] for (l, q) in g) <= problem.options.budget, "budget"
    return g


def path_rows(lp: pulp.LpProblem, v: dict) -> dict:
    """The pipeline order: a path from the first node to the last through every used node
    (degree rows + Miller–Tucker–Zemlin positions against cycles). Returns its pair variables."""
    nodes, u, first, last = v["nodes"], v["u"], v["first"], v["last"]
    t = {(a, b): pulp.LpVariable(f"t_{i}_{j}", cat="Binary")
         for i, a in enumerate(nodes) for j, b in enumerate(nodes) if a != b}
    pos = {n: pulp.LpVariable(f"pos_{i}", lowBound=0, upBound=len(nodes) - 1) for i, n in enumerate(nodes)}
    N = len(nodes)
    for i, n in enumerate(nodes):
        lp += pulp.lpSum(t[n, b] for b in nodes if b != n) == u[n] - last[n], f"succ_{i}"
        lp += pulp.lpSum(t[a, n] for a in nodes if a != n) == u[n] - first[n], f"pred_{i}"
    for (a, b), var in t.items():
        lp += pos[b] >= pos[a] + 1 - N * (1 - var), f"order_{nodes.index(a)}_{nodes.index(b)}"
    return t


def master_objective(lp: pulp.LpProblem, problem: Problem, v: dict, net: C.Network) -> None:
    """The chosen objective on the master's counts (solver/terms.py): every layer is shaped
    like the first."""
    fleet, nodes, t = problem.fleet, v["nodes"], v["t"]
    stages = {n: terms.stage_time(problem, fleet.node(n), [((0, q), v["c"][n, q]) for q in v["types"][n]])
              for n in nodes}
    if problem.options.objective == "latency":
        lp += terms.latency(problem, net, stages.values(), v["u"], t.items(), v["first"], v["last"]) \
            + terms.ring(lp, problem, net, v["first"], v["last"]), "latency"
        return
    steps = {f"stage_time_{i}": terms.step_time(problem, fleet.node(n), stages[n], v["u"][n], v["last"][n])
             for i, n in enumerate(nodes)}
    hops = {f"hop_time_{nodes.index(a)}_{nodes.index(b)}": (a, b, var) for (a, b), var in t.items()}
    terms.bottleneck(lp, problem, net, steps, hops)


class LeastDnll:
    """The least total ΔNLL of L layers with k_q layers at each type q (a transportation
    problem: any layer may take any counted type), and a cut that bounds it from below for
    every other count vector: least(k') ≥ a + Σ_q b_q·k'_q. b is the LP's dual on the count
    rows; a = Σ_l min_q (ΔNLL[l][q] − b_q) keeps (a, b) dual-feasible, so the cut holds whatever
    the LP solver's sign conventions, and it is tight at k. One HiGHS model serves every call
    (only the count rows' bounds change): the master asks for many count vectors."""

    def __init__(self, problem: Problem, types: list[str]):
        import highspy

        m = problem.model
        self.types, self.sens = list(types), [[lp.sensitivity[q] for q in types] for lp in m.layers]
        L, Q = m.n_layer, len(self.types)
        self.scale = dnll_scale(problem)   # ΔNLLs are ~1e-3: scaled so the LP's absolute tolerances are small
        with no_stdout():
            h = self.h = highspy.Highs()
        h.setOptionValue("output_flag", False)
        h.addVars(L * Q, np.zeros(L * Q), np.full(L * Q, highspy.kHighsInf))
        h.changeColsCost(L * Q, np.arange(L * Q, dtype=np.int32),
                         np.array([self.scale * x for row in self.sens for x in row]))
        for l in range(L):   # each layer takes one type
            h.addRow(1.0, 1.0, Q, np.arange(l * Q, (l + 1) * Q, dtype=np.int32), np.ones(Q))
        for i in range(Q):   # k_q layers at type q
            h.addRow(0.0, 0.0, L, np.arange(i, L * Q, Q, dtype=np.int32), np.ones(L))
        self.first_count_row = L

    def __call__(self, counts: dict[str, float]) -> tuple[float, float, dict[str, float]]:
        for i, q in enumerate(self.types):
            k = max(0.0, counts[q])   # an LP's counts may sit a rounding error below zero
            self.h.changeRowBounds(self.first_count_row + i, k, k)
        self.h.run()
        duals = self.h.getSolution().row_dual
        b = {q: duals[self.first_count_row + i] / self.scale for i, q in enumerate(self.types)}
        a = sum(min(row[i] - b[q] for i, q in enumerate(self.types)) for row in self.sens)
        return self.h.getInfo().objective_function_value / self.scale, a, b


def least_dnll(problem: Problem, counts: dict[str, float]) -> tuple[float, float, dict[str, float]]:
    """LeastDnll for one count vector: (least ΔNLL, a, b)."""
    return LeastDnll(problem, list(counts))(counts)


def dnll_scale(problem: Problem) -> float:
    """A factor that brings the budget (or, for a zero budget, the largest possible ΔNLL) to ~1."""
    m = problem.model
    worst = sum(max(lp.sensitivity.values()) for lp in m.layers)
    return 1.0 / max(problem.options.budget, 1e-3 * worst, 1e-12)


def solve_master(problem: Problem, cand: dict, time_limit: float, gap: float) -> tuple[str, float, dict]:
    """The master with the budget met by cuts (Benders): solve, compute the least ΔNLL of the
    chosen type counts, and while it exceeds the budget add the cut that forbids those counts
    (and every count vector as bad) and solve again. The transportation rows are thus replaced
    by a handful of cuts (a model of ~110 columns instead of ~530 at 80 × 16). Cuts are
    first gathered on the LP relaxation (cheap), then on integer solutions. Every cut is valid,
    so the bound holds at any stop. Returns (status, bound, variables); status is solved,
    incumbent (a master solution whose counts still exceed the budget: the time ran out),
    timeout (none) or infeasible."""
    o = problem.options
    deadline = time.perf_counter() + time_limit
    lp, v = master(problem, cand)
    least = LeastDnll(problem, list(v["count"]))
    kinds = {var.name: var.cat for var in lp.variables()}
    v["cuts"], dnll = 0, math.inf
    for relaxed in (True, False):
        for var in lp.variables():
            var.cat = pulp.LpContinuous if relaxed else kinds[var.name]
        status, bound, dnll = cut_until_within(problem, lp, v, least, deadline, gap, dnll)
        if status != "solved":
            break
    if status == "solved" and over_budget(dnll, o.budget):
        status = "incumbent"   # out of time before the counts met the budget: a bound and a start
    return status, bound, v


def over_budget(dnll: float, budget: float) -> bool:
    """Whether a ΔNLL exceeds the budget beyond the MIP solver's tolerance (BUDGET_TOL)."""
    return dnll > budget * (1 + BUDGET_TOL) + 1e-12


def cut_until_within(problem: Problem, lp: pulp.LpProblem, v: dict, least: LeastDnll, deadline: float,
                     gap: float, dnll: float) -> tuple[str, float, float]:
    """Solve the master, and while its counts exceed the budget add the cut that forbids them
    (counted in v["cuts"]) and solve again. Returns (status, bound, least ΔNLL of the last
    counts; `dnll` if none were found)."""
    o = problem.options
    while True:
        status, _, bound = ilp.run(lp, o, deadline - time.perf_counter(), gap)
        if status != "solved":
            return status, bound, dnll
        counts = {q: pulp.value(expr) or 0.0 for q, expr in v["count"].items()}
        dnll, a, b = least(counts)
        # stop when the counts meet the budget, or (numerically) the cut would not cut them off
        if (not over_budget(dnll, o.budget) or not over_budget(a + sum(b[q] * counts[q] for q in b), o.budget)
                or time.perf_counter() > deadline):
            return status, bound, dnll
        lp += (a + pulp.lpSum(b[q] * v["count"][q] for q in b)) * least.scale <= o.budget * least.scale, \
            f"budget_cut_{v['cuts']}"
        v["cuts"] += 1


def assign_types(problem: Problem, blocks: list[tuple[str, int, int]], cand: dict,
                 time_limit: float, gap_abs: float | None = None) -> list[Stage] | None:
    """Exact per-layer types for fixed blocks (node, first, last): memory per block, budget.
    gap_abs: stop once within this many seconds of optimal (the caller's gap budget)."""
    o = problem.options
    if any(not cand.get((l, n), []) for n, a, b in blocks for l in range(a, b)):
        return None
    z = {(l, q): pulp.LpVariable(f"z_{l}_{q}", cat="Binary") for n, a, b in blocks for l in range(a, b)
         for q in cand[(l, n)]}
    lp = types_model(problem, blocks, cand, z)
    status, _, _ = ilp.run(lp, o, time_limit, o.gap / 4, gap_abs)
    if status != "solved":
        return None
    return [Stage(n, a, b, tuple(next(q for q in cand[(l, n)] if (z[l, q].varValue or 0) > 0.5) for l in range(a, b)))
            for n, a, b in blocks]


def types_model(problem: Problem, blocks: list[tuple[str, int, int]], cand: dict, z: dict) -> pulp.LpProblem:
    """The types sub-problem on z[l, q]: one type per layer, each block within its node's
    memory, the budget, and the objective without the terms the blocks fix (hops, overheads
    and the LM head in the latency)."""
    m, w, o, fleet = problem.model, problem.workload, problem.options, problem.fleet
    lp = pulp.LpProblem("types", pulp.LpMinimize)
    for l in range(m.n_layer):
        lp += pulp.lpSum(v for (l2, q), v in z.items() if l2 == l) == 1, f"one_type_{l}"
    stages = []
    for i, (n, a, b) in enumerate(blocks):
        node = fleet.node(n)
        fixed = C.runtime_bytes(m, w) + (m.embed_bytes if i == 0 else 0) + (C.head_bytes(m, w) if i == len(blocks) - 1 else 0)
        lp += pulp.lpSum(C.layer_bytes(m, l, q, w) * z[l, q] for l in range(a, b) for q in cand[(l, n)]) \
            <= node.memory - fixed, f"memory_{i}"
        stages.append(terms.stage_time(problem, node, [((l, q), z[l, q]) for l in range(a, b) for q in cand[(l, n)]]))
    lp += pulp.lpSum(m.layers[l].sensitivity[q] * v for (l, q), v in z.items()) <= o.budget, "budget"
    net = C.Network(fleet)
    if o.objective == "latency":
        lp += terms.latency(problem, net, stages, {}, (), {}, {}), "latency"
    else:   # the last block's step runs the LM head
        steps = {f"stage_time_{i}": terms.step_time(problem, fleet.node(n), stages[i], 1, int(i == len(blocks) - 1))
                 for i, (n, _, _) in enumerate(blocks)}
        terms.bottleneck(lp, problem, net, steps, {})
    return lp


def to_blocks(order: list[str], counts: dict[str, int]) -> list[tuple[str, int, int]]:
    """Consecutive layer blocks (node, first, last) for nodes in pipeline order; nodes with no
    layers are skipped."""
    blocks, a = [], 0
    for n in order:
        if counts[n]:
            blocks.append((n, a, a + counts[n]))
            a += counts[n]
    return blocks


MAX_ORDERS = 720   # middle permutations tried exhaustively; beyond that, pairwise swaps


def block_orders(problem: Problem, seq: list[str], mix: dict[str, dict[str, int]], keep: int = 3) -> list[list[str]]:
    """Orders of the master's stages worth building a plan from, best first. The master places
    type counts on layers freely, but a plan puts each node's types on its own contiguous block,
    and early (and late) layers are the sensitive ones, so which node sits where decides whether
    the counts meet the budget. The ends stay (they hold the embedding and the head); the middle
    nodes are permuted, each order scored by its hops (the compute is fixed by the counts) and
    by the budget its counts use when each block gives its best types to its most sensitive
    layers. Orders that meet the budget come first, by hop cost; then the rest, by budget used."""
    m, w, o = problem.model, problem.workload, problem.options
    net = C.Network(problem.fleet)
    if len(seq) < 3:
        return [seq]
    hop = C.hop_latency_s if o.objective == "latency" else C.hop_busy_s
    H = {(a, b): hop(net, m, w, a, b) for a in seq for b in seq if a != b}
    score = functools.partial(order_score, problem, mix, H)
    middle = seq[1:-1]
    if math.factorial(len(middle)) <= MAX_ORDERS:
        orders = [[seq[0], *p, seq[-1]] for p in itertools.permutations(middle)]
    else:   # pairwise swaps from the master's order while they improve
        orders = swapped_orders(seq, score)
    out = []
    for order in sorted(orders, key=score):   # orders holds the master's own
        if order not in out:
            out.append(order)
        if len(out) == keep:
            break
    return out if seq in out else [*out, seq]


def order_score(problem: Problem, mix: dict[str, dict[str, int]], hops: dict, order: list[str]) -> tuple:
    """(over the budget?, by how much, hop cost) of a stage order, its counts placed by
    sorted_types; hops: (a, b) -> the objective's cost of that hop."""
    m, o = problem.model, problem.options
    costs = [hops[a, b] for a, b in zip(order, order[1:])]
    used = sum(m.layers[l].sensitivity[q] for st in sorted_types(problem, order, mix)
               for l, q in zip(range(st.first, st.last), st.types))
    over = max(0.0, used - o.budget)
    return (over > 1e-12, over, sum(costs) if o.objective == "latency" else max(costs))


def swapped_orders(seq: list[str], score) -> list[list[str]]:
    """seq and every order tried while swapping two middle stages improves the score."""
    orders, current, best = [seq], list(seq), score(seq)
    improved = True
    while improved:
        improved = False
        for i in range(1, len(seq) - 1):
            for j in range(i + 1, len(seq) - 1):
                trial = list(current)
                trial[i], trial[j] = trial[j], trial[i]
                orders.append(trial)
                if (s := score(trial)) < best:
                    current, best, improved = trial, s, True
    return orders


def sorted_types(problem: Problem, order: list[str], mix: dict[str, dict[str, int]]) -> list[Stage]:
    """Stages for nodes in pipeline order, each node's type counts (mix) placed on its block
    with the most accurate types on the most sensitive layers (exact when ΔNLL[l][q] is a
    layer weight times a type factor, as for the proxy; a good guess otherwise)."""
    m = problem.model
    weight = [sum(lp.sensitivity.values()) for lp in m.layers]
    quality = sorted({q for n in order for q in mix[n]}, key=lambda q: sum(lp.sensitivity[q] for lp in m.layers))
    stages, first = [], 0
    for n in order:
        k = sum(mix[n].values())
        if k:
            layers = sorted(range(first, first + k), key=lambda l: -weight[l])
            at = dict(zip(layers, [q for q in quality for _ in range(mix[n].get(q, 0))]))
            stages.append(Stage(n, first, first + k, tuple(at[l] for l in range(first, first + k))))
        first += k
    return stages


def greedy_blocks(problem: Problem, cand: dict):
    """A quick block split for when the master has no plan in time: the nodes fastest per
    layer (at their smallest type), as many as it takes to hold every layer at that type plus
    the embedding on the first and the head on the last, visited from the controller along
    the cheapest next hop, filled fastest first or in proportion to room. The types are then
    chosen exactly (assign_types). Yields such splits over ever more nodes (more room for
    better types when the budget binds)."""
    m, w, fleet = problem.model, problem.workload, problem.fleet
    L = m.n_layer
    net = C.Network(fleet)
    ranked = ranked_nodes(problem, cand)
    for used in range(1, len(ranked) + 1):
        chosen = ranked[:used]
        order = nearest_first(net, fleet.controller or chosen[0][1], [c[1] for c in chosen], m.act_bytes_per_token)
        room = {}
        for _, name, free, size in chosen:
            free -= (m.embed_bytes if name == order[0] else 0) + (C.head_bytes(m, w) if name == order[-1] else 0)
            room[name] = max(0, free) // size
        if sum(room.values()) < L:
            continue
        fastest, left = {}, L
        for _, name, _, _ in chosen:
            fastest[name] = min(room[name], left)
            left -= fastest[name]
        # filled fastest first, then spread in proportion to room (headroom for better types)
        spread = dict(zip(order, split([float(room[n]) for n in order], L)))
        yield to_blocks(order, fastest)
        yield to_blocks(order, spread)


def ranked_nodes(problem: Problem, cand: dict) -> list[tuple[float, str, int, int]]:
    """The nodes that can hold a layer, fastest per layer first at their smallest type:
    (layer time, name, memory beside the runtime, layer bytes)."""
    m, w = problem.model, problem.workload
    rt = C.runtime_bytes(m, w)
    ranked = []
    for node in problem.fleet.nodes:
        opts = {q for l in range(m.n_layer) for q in cand.get((l, node.name), [])}
        if opts:
            small = min(opts, key=lambda q: C.layer_bytes(m, 0, q, w))
            size = C.layer_bytes(m, 0, small, w)
            ranked.append((terms.layer_time(problem, node, 0, small), node.name, node.memory - rt, size))
    ranked.sort()
    return ranked


def nearest_first(net: C.Network, here: str, todo: list[str], nbytes: int) -> list[str]:
    """The nodes of todo visited from `here` along the cheapest next hop for nbytes."""
    order, todo = [], list(todo)
    while todo:
        nxt = min(todo, key=lambda n: net.transfer_s(here, n, nbytes))
        order.append(nxt)
        todo.remove(nxt)
        here = nxt
    return order


def solve(problem: Problem) -> Plan:
    """The best plan for a problem, proven optimal or with its gap: the aggregate path when
    every layer has the same shape (solve_fast), else the full ILP (solve_ilp)."""
    problem.validate()
    if not homogeneous(problem):
        return solve_ilp(problem)
    return solve_fast(problem)


def solve_fast(problem: Problem) -> Plan:
    """Bound from the master, plan from its counts, the full ILP only to close a gap (for
    layers of one shape: see solve)."""
    o = problem.options
    t0 = time.perf_counter()
    deadline = t0 + o.time_limit
    cand = ilp.candidates(problem)
    stats: dict = {"method": "aggregate"}
    why = unplaceable_pin(problem, cand)
    if why or any(not any((l, n.name) in cand for n in problem.fleet.nodes) for l in range(problem.model.n_layer)):
        return infeasible(problem, t0, stats, why)
    # the master may take most of the time; building the plan from it must still fit
    status, bound, v = solve_master(problem, cand, MASTER_SHARE * (deadline - time.perf_counter()), 0.6 * o.gap)
    stats["master_s"] = time.perf_counter() - t0
    stats["budget_cuts"] = v["cuts"]
    if status == "infeasible":
        return infeasible(problem, t0, stats)
    # an incumbent's blocks still make a plan with exact types
    best = from_master(problem, v, cand, bound, deadline) if status in ("solved", "incumbent") else None
    if best is None:
        # no plan from the master in its time: build one greedily so the user still gets a plan
        stats["greedy"] = True
        best = from_greedy(problem, cand, deadline)
    best = valid_or_none(problem, best)
    stats["construct_s"] = time.perf_counter() - t0
    value = evaluate(problem, best).objective(o.objective) if best else math.inf
    if math.isnan(bound):
        bound = -math.inf
    gap = (value - bound) / value if best else math.inf
    if worth_full_ilp(problem, cand, gap, deadline):
        stats["full_ilp"] = True
        best, bound, status = full_ilp(problem, best, value, bound, deadline)
        if status == "infeasible" and best is None:
            return infeasible(problem, t0, stats)
    elapsed = time.perf_counter() - t0
    if best is None:
        return Plan((), "timeout", math.nan, bound, math.nan, elapsed, o.solver,
                    f"no plan found within {o.time_limit:g} s; raise --time-limit", None, stats)
    return finished(problem, best, bound, elapsed, o.solver, stats)


def infeasible(problem: Problem, t0: float, stats: dict, why: str = "") -> Plan:
    """The answer when no plan exists: `why`, or else the sentence of solver/explain.py."""
    elapsed = time.perf_counter() - t0
    return Plan((), "infeasible", math.nan, math.nan, math.nan, elapsed, problem.options.solver,
                why or why_infeasible(problem), None, stats)


def valid_or_none(problem: Problem, stages: list[Stage] | None) -> list[Stage] | None:
    """The constructed plan, or None (with a warning) if it breaks a constraint."""
    broken = violations(problem, stages) if stages is not None else []
    if broken:
        log.warning("constructed plan violates constraints: %s", broken)
        return None
    return stages


def master_order(v: dict) -> tuple[list[str], dict[str, dict[str, int]]]:
    """The master's used nodes in pipeline order, and each one's layer count per type."""
    used = [n for n in v["nodes"] if (v["u"][n].varValue or 0) > 0.5]
    seq = [next(n for n in used if (v["first"][n].varValue or 0) > 0.5)]
    while len(seq) < len(used):
        seq.append(next(b for b in used if b != seq[-1] and (v["t"][seq[-1], b].varValue or 0) > 0.5))
    return seq, {n: {q: round(v["c"][n, q].varValue or 0) for q in v["types"][n]} for n in used}


def from_master(problem: Problem, v: dict, cand: dict, bound: float, deadline: float) -> list[Stage] | None:
    """The best plan built from the master's solution: in each promising stage order
    (block_orders), the master's counts as they are if they fit within the gap, else each
    layer's type chosen exactly (assign_types); stops once within the gap of the bound."""
    o = problem.options
    seq, mix = master_order(v)
    counts = {n: sum(k.values()) for n, k in mix.items()}
    best, value = None, math.inf
    for order in block_orders(problem, seq, mix):
        stages = sorted_types(problem, order, mix)   # the master's counts as they are, if they fit
        v2 = math.inf if violations(problem, stages) else evaluate(problem, stages).objective(o.objective)
        if math.isinf(v2) or v2 - bound > o.gap * bound:
            stages = assign_types(problem, to_blocks(order, counts), cand, deadline - time.perf_counter(),
                                  0.3 * o.gap * bound)
            v2 = evaluate(problem, stages).objective(o.objective) if stages else math.inf
        if v2 < value:
            best, value = stages, v2
        if value - bound <= o.gap * value or time.perf_counter() > deadline:
            break
    return best


def from_greedy(problem: Problem, cand: dict, deadline: float) -> list[Stage] | None:
    """The first greedy split (greedy_blocks) whose types can be chosen within the budget."""
    best = None
    for blocks in greedy_blocks(problem, cand):
        best = assign_types(problem, blocks, cand, deadline - time.perf_counter())
        if best is not None or time.perf_counter() > deadline:
            break
    return best


def worth_full_ilp(problem: Problem, cand: dict, gap: float, deadline: float) -> bool:
    """Whether the full ILP should try to close the gap: enough time left, and little enough
    of it taken by building the ILP (FULL_ILP_MIN_SHARE, FULL_ILP_S_PER_BINARY)."""
    o = problem.options
    left = deadline - time.perf_counter()
    binaries = sum(len(types) for types in cand.values())
    return gap > o.gap and left > FULL_ILP_MIN_SHARE * o.time_limit and FULL_ILP_S_PER_BINARY * binaries < 0.5 * left


def full_ilp(problem: Problem, best: list[Stage] | None, value: float, bound: float,
             deadline: float) -> tuple[list[Stage] | None, float, str]:
    """The full ILP started from the plan (best, worth value) with the bound as a cut, in the
    time left: (the better plan, the better bound, the ILP's status)."""
    o = problem.options
    model = ilp.build(problem)
    obj = model.lp.objective
    if bound > -math.inf:
        model.lp += obj >= bound * (1 - 1e-9), "master_bound"
    warm = _warm_start(model, best) if best else None
    left = deadline - time.perf_counter()
    status, _, bound2 = ilp.run(model.lp, o, left, o.gap / 4, warm=warm) if left > 0 else ("timeout", 0, math.nan)
    if status == "solved":
        stages = ilp.extract(model)
        v2 = evaluate(problem, stages).objective(o.objective)
        if not violations(problem, stages) and v2 < value:
            best = stages
    if not math.isnan(bound2):
        bound = max(bound, bound2)
    return best, bound, status


def solve_ilp(problem: Problem) -> Plan:
    """The full ILP alone (solver/ilp.py: build, run, extract), with status, objective
    (recomputed by the cost model), bound, gap and time. A run stopped by the time limit is
    'feasible', never 'optimal'."""
    t0 = time.perf_counter()
    o = problem.options
    why = unplaceable_pin(problem, ilp.candidates(problem))
    if why:
        return Plan((), "infeasible", math.nan, math.nan, math.nan, 0.0, o.solver, why)
    model = ilp.build(problem)
    status, _, bound = ilp.run(model.lp, o, o.time_limit, o.gap)
    if status == "infeasible":
        return infeasible(problem, t0, model.stats)
    elapsed = time.perf_counter() - t0
    if status != "solved":
        msg = (f"the solver found no plan within {o.time_limit:g} s; raise --time-limit"
               if status == "timeout" else "the solver failed; try --solver cbc")
        return Plan((), status, math.nan, bound, math.nan, elapsed, o.solver, msg, None, model.stats)
    return finished(problem, ilp.extract(model), bound, elapsed, o.solver, model.stats)


def least_possible_dnll(problem: Problem) -> tuple[str, float]:
    """The least ΔNLL of any placement, the budget dropped: (status, value) of that solve, on
    the aggregate master with transportation rows where layers are of one shape, else on the
    full ILP."""
    m, o = problem.model, problem.options
    free = dataclasses.replace(problem, options=dataclasses.replace(o, max_ppl_increase=1e12, objective="latency"))
    if homogeneous(free):   # the aggregate model has the same feasible type choices
        lp, v = master(free, ilp.candidates(free), transport=True)
        lp.setObjective(pulp.lpSum(m.layers[l].sensitivity[q] * g for (l, q), g in v["g"].items()))
    else:
        model = ilp.build(free)
        lp = model.lp
        lp.setObjective(pulp.lpSum(m.layers[l].sensitivity[q] * z for (l, n, q), z in model.z.items()))
    lp.constraints.pop("budget", None)
    status, best, _ = ilp.run(lp, o, o.time_limit, o.gap / 4)
    return status, best


def why_infeasible(problem: Problem) -> str:
    """Why no plan exists, in one sentence (solver/explain.py): too little memory in all, or
    else what the least ΔNLL of any placement says."""
    return shortfall(problem) or verdict(problem, *least_possible_dnll(problem))


def _warm_start(model: ilp.Model, stages: list[Stage]) -> dict:
    """Variable values of the full ILP for a given plan (z, s, t; T for throughput)."""
    warm = {}
    nodes = model.nodes
    for (l, n, q), var in model.z.items():
        warm[var.name] = 0.0
    for st in stages:
        for l, q in zip(range(st.first, st.last), st.types):
            if (l, st.node, q) in model.z:
                warm[model.z[l, st.node, q].name] = 1.0
    for var in model.lp.variables():
        if var.name.startswith("s_"):
            warm[var.name] = 0.0
    for st in stages:
        if st.node in nodes:
            warm[f"s_{st.first}_{nodes.index(st.node)}"] = 1.0
    for (a, b), var in model.t.items():
        warm[var.name] = 0.0
    for x, y in zip(stages, stages[1:]):
        if (x.node, y.node) in model.t:
            warm[model.t[x.node, y.node].name] = 1.0
    if model.problem.options.objective == "throughput":
        warm["T"] = evaluate(model.problem, stages).bottleneck_s
    return warm
