"""The fast exact path: an aggregate relaxation for the bound, a constructed plan for the
incumbent, and the full ILP (warm-started, with the bound as a cut) only when they differ.

Transformer blocks of one model are the same shape, so a stage's time and memory depend
only on how many of its layers are at each type, not on which. The *master* problem
therefore chooses, per node, a count of layers per type (N×Q integers instead of L×N×Q
binaries). It meets the accuracy budget through cuts on those counts: the least ΔNLL of a
count vector is a transportation problem (any layer may take any counted type), and its
dual gives a plane below it that `solve_master` adds while the counts exceed the budget.
The pipeline order is a path through the used nodes (pair variables with Miller–Tucker–
Zemlin positions), so hops cost exactly what they cost in a plan. Every real plan is
feasible for the master, so its optimum is a lower bound. The plan is then built from it:
the master's nodes with the middle ones reordered so that each block's counts suit its
layers' sensitivities (`block_orders`), the counts placed directly when they meet the
budget (`sorted_types`), else each layer's type chosen exactly for those blocks (a small
ILP). When plan and bound agree within the gap, the plan is proven optimal; otherwise the
full ILP (solver/ilp.py) runs from the plan with `objective ≥ bound` added.
"""
from __future__ import annotations

import itertools
import logging
import math
import time

import numpy as np
import pulp

from solver import cost as C
from solver import ilp
from solver.baselines import split
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
    ls = problem.model.layers
    return all(l.bytes == ls[0].bytes and l.flops == ls[0].flops and l.attn_flops_per_ctx == ls[0].attn_flops_per_ctx
               and l.kv_bytes_per_token == ls[0].kv_bytes_per_token for l in ls)


def master(problem: Problem, cand: dict, transport: bool = False) -> tuple[pulp.LpProblem, dict]:
    """The aggregate relaxation (see module doc). Returns the model and its variables.
    transport: meet the budget through the layer × type transportation rows (L×Q more columns);
    without it the budget is left to the cuts that solve_master adds (budget_cut)."""
    m, w, o, fleet = problem.model, problem.workload, problem.options, problem.fleet
    L = m.n_layer
    lp0 = m.layers[0]
    net = C.Network(fleet)
    nodes = [n.name for n in fleet.nodes if any((l, n.name) in cand for l in range(L))]
    types = {n: sorted({q for l in range(L) for q in cand.get((l, n), [])}, key=m.types.index) for n in nodes}
    all_types = sorted({q for n in nodes for q in types[n]}, key=m.types.index)
    rt = C.runtime_bytes(m, w)
    lp = pulp.LpProblem("master", pulp.LpMinimize)
    c, u, first, last, most = {}, {}, {}, {}, {}
    for i, n in enumerate(nodes):
        node = fleet.node(n)
        most[n] = min(L, max(0, (node.memory - rt) // min(C.layer_bytes(m, 0, q, w) for q in types[n])))
        for q in types[n]:
            c[n, q] = pulp.LpVariable(f"c_{i}_{q}", lowBound=0, upBound=most[n], cat="Integer")
        u[n] = pulp.LpVariable(f"u_{i}", cat="Binary")
        first[n] = pulp.LpVariable(f"first_{i}", cat="Binary")
        last[n] = pulp.LpVariable(f"last_{i}", cat="Binary")
    k = {n: pulp.lpSum(c[n, q] for q in types[n]) for n in nodes}
    for i, n in enumerate(nodes):
        node = fleet.node(n)
        lp += k[n] <= most[n] * u[n], f"count_hi_{i}"
        lp += k[n] >= u[n], f"count_lo_{i}"
        lp += first[n] <= u[n], f"first_used_{i}"
        lp += last[n] <= u[n], f"last_used_{i}"
        if node.memory - rt - m.embed_bytes - C.head_bytes(m, w) < L * min(C.layer_bytes(m, 0, q, w) for q in types[n]):
            # cannot hold the whole model, so never both ends: without this row the relaxation
            # makes one node fractionally first and last, and the ends' memory all but vanishes
            lp += first[n] + last[n] <= u[n], f"one_end_{i}"
        lp += (pulp.lpSum(C.layer_bytes(m, 0, q, w) * c[n, q] for q in types[n]) + m.embed_bytes * first[n]
               + C.head_bytes(m, w) * last[n] + rt * u[n]) * (1.0 / node.memory) <= u[n], f"memory_{i}"
        if n in o.pinned:
            lp += u[n] == 1, f"pinned_{i}"
    lp += pulp.lpSum(k.values()) == L, "all_layers"
    lp += pulp.lpSum(first.values()) == 1, "one_first"
    lp += pulp.lpSum(last.values()) == 1, "one_last"
    if o.max_stages:
        lp += pulp.lpSum(u.values()) <= o.max_stages, "max_stages"
    for group in ilp.identical_nodes(problem, nodes, net):   # interchangeable: fill them in name order
        for a, b in zip(group, group[1:]):
            lp += k[a] >= k[b], f"symmetry_{nodes.index(a)}_{nodes.index(b)}"
    count = {q: pulp.lpSum(c[n, q] for n in nodes if q in types[n]) for q in all_types}
    g = {}
    if transport:
        g = {(l, q): pulp.LpVariable(f"g_{l}_{q}", lowBound=0, upBound=1) for l in range(L) for q in all_types}
        for l in range(L):
            lp += pulp.lpSum(g[l, q] for q in all_types) == 1, f"layer_type_{l}"
        for q in all_types:
            lp += pulp.lpSum(g[l, q] for l in range(L)) == count[q], f"type_count_{q}"
        lp += pulp.lpSum(m.layers[l].sensitivity[q] * g[l, q] for (l, q) in g) <= o.budget, "budget"

    # the pipeline order: a path from the first node to the last through every used node
    # (degree rows + Miller–Tucker–Zemlin positions against cycles)
    t = {(a, b): pulp.LpVariable(f"t_{i}_{j}", cat="Binary")
         for i, a in enumerate(nodes) for j, b in enumerate(nodes) if a != b}
    pos = {n: pulp.LpVariable(f"pos_{i}", lowBound=0, upBound=len(nodes) - 1) for i, n in enumerate(nodes)}
    N = len(nodes)
    for i, n in enumerate(nodes):
        lp += pulp.lpSum(t[n, b] for b in nodes if b != n) == u[n] - last[n], f"succ_{i}"
        lp += pulp.lpSum(t[a, n] for a in nodes if a != n) == u[n] - first[n], f"pred_{i}"
    for (a, b), var in t.items():
        lp += pos[b] >= pos[a] + 1 - N * (1 - var), f"order_{nodes.index(a)}_{nodes.index(b)}"

    if o.objective == "latency":
        lp += (pulp.lpSum(C.layer_latency_s(fleet.node(n), lp0, q, w) * c[n, q] for (n, q) in c)
               + pulp.lpSum(C.stage_overhead_latency_s(fleet.node(n), w) * u[n] for n in nodes)
               + pulp.lpSum(C.hop_latency_s(net, m, w, a, b) * var for (a, b), var in t.items())
               + pulp.lpSum(C.controller_latency_s(net, w, n) * first[n] for n in nodes)), "latency"
    else:
        T = pulp.LpVariable("T", lowBound=0)
        lp += T, "bottleneck"
        for i, n in enumerate(nodes):
            node = fleet.node(n)
            lp += (pulp.lpSum(C.decode_s(node, lp0, q, w, w.concurrency) * c[n, q] for q in types[n])
                   + node.step_overhead_s * u[n] <= T), f"stage_time_{i}"
        for (a, b), var in t.items():
            lp += C.hop_step_s(net, m, w, a, b) * var <= T, f"hop_time_{nodes.index(a)}_{nodes.index(b)}"
    return lp, {"c": c, "u": u, "first": first, "last": last, "t": t, "g": g, "nodes": nodes, "types": types,
                "count": count}


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
    cuts, used = 0, math.inf
    status, bound = "error", -math.inf

    def over(dnll: float) -> bool:
        return dnll > o.budget * (1 + BUDGET_TOL) + 1e-12

    for relaxed in (True, False):
        for var in lp.variables():
            var.cat = pulp.LpContinuous if relaxed else kinds[var.name]
        while True:
            status, _, bound = ilp.run(lp, o, deadline - time.perf_counter(), gap)
            if status != "solved":
                break
            counts = {q: pulp.value(expr) or 0.0 for q, expr in v["count"].items()}
            used, a, b = least(counts)
            # stop when the counts meet the budget, or (numerically) the cut would not cut them off
            if not over(used) or not over(a + sum(b[q] * counts[q] for q in b)) or time.perf_counter() > deadline:
                break
            lp += (a + pulp.lpSum(b[q] * v["count"][q] for q in b)) * least.scale <= o.budget * least.scale, \
                f"budget_cut_{cuts}"
            cuts += 1
        if status != "solved":
            break
    v["cuts"] = cuts
    if status == "solved" and over(used):
        status = "incumbent"   # out of time before the counts met the budget: a bound and a start
    return status, bound, v


def assign_types(problem: Problem, blocks: list[tuple[str, int, int]], cand: dict,
                 time_limit: float, gap_abs: float | None = None) -> list[Stage] | None:
    """Exact per-layer types for fixed blocks (node, first, last): memory per block, budget.
    gap_abs: stop once within this many seconds of optimal (the caller's gap budget)."""
    m, w, o, fleet = problem.model, problem.workload, problem.options, problem.fleet
    lp = pulp.LpProblem("types", pulp.LpMinimize)
    z = {}
    for node_name, a, b in blocks:
        for l in range(a, b):
            opts = cand.get((l, node_name), [])
            if not opts:
                return None
            for q in opts:
                z[l, q] = pulp.LpVariable(f"z_{l}_{q}", cat="Binary")
    for l in range(m.n_layer):
        lp += pulp.lpSum(v for (l2, q), v in z.items() if l2 == l) == 1, f"one_type_{l}"
    stage_time = []
    for i, (node_name, a, b) in enumerate(blocks):
        node = fleet.node(node_name)
        fixed = C.runtime_bytes(m, w) + (m.embed_bytes if i == 0 else 0) + (C.head_bytes(m, w) if i == len(blocks) - 1 else 0)
        lp += pulp.lpSum(C.layer_bytes(m, l, q, w) * z[l, q] for l in range(a, b) for q in cand[(l, node_name)]) \
            <= node.memory - fixed, f"memory_{i}"
        if o.objective == "latency":
            stage_time.append(pulp.lpSum(C.layer_latency_s(node, m.layers[l], q, w) * z[l, q]
                                         for l in range(a, b) for q in cand[(l, node_name)]))
        else:
            stage_time.append(pulp.lpSum(C.decode_s(node, m.layers[l], q, w, w.concurrency) * z[l, q]
                                         for l in range(a, b) for q in cand[(l, node_name)]))
    lp += pulp.lpSum(m.layers[l].sensitivity[q] * v for (l, q), v in z.items()) <= o.budget, "budget"
    if o.objective == "latency":
        lp += pulp.lpSum(stage_time)
    else:
        T = pulp.LpVariable("T", lowBound=0)
        lp += T
        for i, (node_name, _, _) in enumerate(blocks):
            lp += stage_time[i] + fleet.node(node_name).step_overhead_s <= T, f"stage_time_{i}"
    status, _, _ = ilp.run(lp, o, time_limit, o.gap / 4, gap_abs)
    if status != "solved":
        return None
    stages = []
    for node_name, a, b in blocks:
        types = tuple(next(q for q in cand[(l, node_name)] if (z[l, q].varValue or 0) > 0.5) for l in range(a, b))
        stages.append(Stage(node_name, a, b, types))
    return stages


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
    hop = C.hop_latency_s if o.objective == "latency" else C.hop_step_s
    H = {(a, b): hop(net, m, w, a, b) for a in seq for b in seq if a != b}

    def score(order):
        hops = [H[a, b] for a, b in zip(order, order[1:])]
        used = sum(m.layers[l].sensitivity[q] for st in sorted_types(problem, order, mix)
                   for l, q in zip(range(st.first, st.last), st.types))
        over = max(0.0, used - o.budget)
        return (over > 1e-12, over, sum(hops) if o.objective == "latency" else max(hops))

    middle = seq[1:-1]
    if math.factorial(len(middle)) <= MAX_ORDERS:
        orders = [[seq[0], *p, seq[-1]] for p in itertools.permutations(middle)]
    else:   # pairwise swaps from the master's order while they improve
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
    out = []
    for order in sorted(orders, key=score):   # orders holds the master's own
        if order not in out:
            out.append(order)
        if len(out) == keep:
            break
    return out if seq in out else [*out, seq]


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
    rt = C.runtime_bytes(m, w)
    ranked = []
    for node in fleet.nodes:
        opts = {q for l in range(L) for q in cand.get((l, node.name), [])}
        if opts:
            small = min(opts, key=lambda q: C.layer_bytes(m, 0, q, w))
            size = C.layer_bytes(m, 0, small, w)
            ranked.append((ilp.layer_time(problem, node, 0, small), node.name, node.memory - rt, size))
    ranked.sort()
    for used in range(1, len(ranked) + 1):
        chosen = ranked[:used]
        order, here, todo = [], fleet.controller or chosen[0][1], [c[1] for c in chosen]
        while todo:
            nxt = min(todo, key=lambda n: net.transfer_s(here, n, m.act_bytes_per_token))
            order.append(nxt)
            todo.remove(nxt)
            here = nxt
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


def solve_fast(problem: Problem) -> Plan:
    """Bound from the master, plan from its counts, the full ILP only to close a gap."""
    from solver.explain import explain, unplaceable_pin

    problem.validate()
    if not homogeneous(problem):
        return ilp.solve_ilp(problem)
    o = problem.options
    t0 = time.perf_counter()
    deadline = t0 + o.time_limit
    cand = ilp.candidates(problem)
    stats: dict = {"method": "aggregate"}
    why = unplaceable_pin(problem, cand)
    if why or any(not any((l, n.name) in cand for n in problem.fleet.nodes) for l in range(problem.model.n_layer)):
        return Plan((), "infeasible", math.nan, math.nan, math.nan, time.perf_counter() - t0, o.solver,
                    why or explain(problem), None, stats)
    # the master may take most of the time; building the plan from it must still fit
    status, bound, v = solve_master(problem, cand, MASTER_SHARE * (deadline - time.perf_counter()), 0.6 * o.gap)
    stats["master_s"] = time.perf_counter() - t0
    stats["budget_cuts"] = v["cuts"]
    if status == "infeasible":
        return Plan((), "infeasible", math.nan, math.nan, math.nan, time.perf_counter() - t0, o.solver,
                    explain(problem), None, stats)
    best: list[Stage] | None = None
    if status in ("solved", "incumbent"):   # an incumbent's blocks still make a plan with exact types
        used = [n for n in v["nodes"] if (v["u"][n].varValue or 0) > 0.5]
        seq = [next(n for n in used if (v["first"][n].varValue or 0) > 0.5)]
        while len(seq) < len(used):
            seq.append(next(b for b in used if b != seq[-1] and (v["t"][seq[-1], b].varValue or 0) > 0.5))
        mix = {n: {q: round(v["c"][n, q].varValue or 0) for q in v["types"][n]} for n in used}
        counts = {n: sum(mix[n].values()) for n in used}
        value = math.inf
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
    if best is None:
        # no plan from the master in its time: build one greedily so the user still gets a plan
        stats["greedy"] = True
        for blocks in greedy_blocks(problem, cand):
            best = assign_types(problem, blocks, cand, deadline - time.perf_counter())
            if best is not None or time.perf_counter() > deadline:
                break
    broken = violations(problem, best) if best is not None else []
    if broken:
        log.warning("constructed plan violates constraints: %s", broken)
        best = None
    stats["construct_s"] = time.perf_counter() - t0
    value = evaluate(problem, best).objective(o.objective) if best else math.inf
    if math.isnan(bound):
        bound = -math.inf
    gap = (value - bound) / value if best else math.inf
    left = deadline - time.perf_counter()
    binaries = sum(len(types) for types in cand.values())
    if gap > o.gap and left > FULL_ILP_MIN_SHARE * o.time_limit and FULL_ILP_S_PER_BINARY * binaries < 0.5 * left:
        # close the gap with the full ILP, started from the plan, with the bound as a cut
        stats["full_ilp"] = True
        model = ilp.build(problem)
        obj = model.lp.objective
        if bound > -math.inf:
            model.lp += obj >= bound * (1 - 1e-9), "master_bound"
        warm = _warm_start(model, best) if best else None
        left = deadline - time.perf_counter()
        status2, _, bound2 = ilp.run(model.lp, o, left, o.gap / 4, warm=warm) if left > 0 else ("timeout", 0, math.nan)
        if status2 == "solved":
            stages = ilp.extract(model)
            v2 = evaluate(problem, stages).objective(o.objective)
            if not violations(problem, stages) and v2 < value:
                best, value = stages, v2
        if not math.isnan(bound2):
            bound = max(bound, bound2)
        elif status2 == "infeasible" and best is None:
            return Plan((), "infeasible", math.nan, math.nan, math.nan, time.perf_counter() - t0, o.solver,
                        explain(problem), None, stats)
    elapsed = time.perf_counter() - t0
    if best is None:
        return Plan((), "timeout", math.nan, bound, math.nan, elapsed, o.solver,
                    f"no plan found within {o.time_limit:g} s; raise --time-limit", None, stats)
    return finished(problem, best, bound, elapsed, o.solver, stats)


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
