"""Random small placement instances and a brute-force enumerator, independent of the solver.

The enumerator tries every ordered choice of distinct nodes, every cut of the layers into
that many contiguous stages and every type vector (numpy over type vectors), and keeps the
best plan that fits memory, types, pins, stage limit and budget. It shares only the cost
model's per-item functions with the solver, not its formulation.
"""
from __future__ import annotations

import itertools
import math
import random

import numpy as np

from solver import cost as C
from solver.plan import Stage
from solver.ggml_types import LAYER_TYPES
from solver.problem import (Fleet, LayerProfile, Link, ModelProfile, Node, Options, Problem,
                            TypeSpeed, Workload)

BPW = {"F16": 16, "Q8_0": 8.5, "Q6_K": 6.5625, "Q5_K": 5.5, "Q5_0": 5.5, "Q4_K": 4.5, "Q4_0": 4.5,
       "Q3_K": 3.4375, "Q2_K": 2.625}


def random_problem(rng: random.Random, homogeneous: bool, objective: str, max_layers: int = 6,
                   max_nodes: int = 4, max_types: int = 3, product: bool = True) -> Problem:
    """product: ΔNLL[l][q] = layer weight × type factor (as the proxy); else each (l, q) drawn apart."""
    L = rng.randint(1, max_layers)
    Q = rng.randint(1, max_types)
    types = tuple(sorted(rng.sample(LAYER_TYPES, Q), key=LAYER_TYPES.index))
    params = 1_000_000
    layers = []
    base_sens = {q: rng.uniform(0, 0.02) * (16 - BPW[q]) / 14 for q in types}
    for l in range(L):
        scale = 1.0 if homogeneous else rng.choice((0.5, 1.0, 2.0))
        w = rng.uniform(0.3, 3.0)
        layers.append(LayerProfile(bytes={q: int(params * scale * BPW[q] / 8) for q in types},
                                   flops=2.0 * params * scale, attn_flops_per_ctx=4.0 * 256,
                                   kv_bytes_per_token=2 * 64 * 2,
                                   sensitivity={q: 0.0 if q == "F16" else
                                                base_sens[q] * (w if product else rng.uniform(0.3, 3.0))
                                                for q in types}))
    model = ModelProfile(name="toy", n_embd=256, n_vocab=1000, layers=tuple(layers), embed_bytes=512_000,
                         head_bytes=600_000, scratch_bytes_per_token=4096, scratch_bytes=100_000)
    N = rng.randint(1, max_nodes)
    nodes = []
    total_need = sum(lp.bytes[types[-1]] for lp in layers)
    for i in range(N):
        supp = [q for q in types if rng.random() < 0.8] or [types[-1]]
        bw = rng.choice((1e9, 4e9, 20e9))
        fl = rng.choice((1e10, 1e11, 1e12))
        eff = {q: rng.uniform(0.4, 0.9) for q in supp}
        mem = int(rng.uniform(0.3, 1.4) * total_need + 1_000_000 + 600_000 * rng.random())
        # odd nodes price attention apart, at a measured-like rate several times below the
        # prefill's, and a step of several tokens with a fixed part of twice the weights'
        # read (cost.compute_s); even nodes inside the roofline (declared speeds)
        attn = (4.0, 6.0, 2.0) if i % 2 else (math.inf, math.inf, math.inf)
        nodes.append(Node(f"n{i}", mem, {q: TypeSpeed(bw * eff[q], fl * eff[q], fl * eff[q] / attn[0],
                                                      fl * eff[q] / attn[1], bw * eff[q] / attn[2]) for q in supp},
                          step_overhead_s=rng.choice((0.0, 0.0005, 0.002))))
    links = []
    for n in nodes:
        links.append(Link("sw", n.name, rng.choice((12.5e6, 125e6)), rng.choice((0.0002, 0.002))))
    if N >= 2 and rng.random() < 0.5:   # a direct fast link between two nodes: multi-hop routes differ
        a, b = rng.sample([n.name for n in nodes], 2)
        links.append(Link(a, b, 1.25e9, 0.0001))
    fleet = Fleet(tuple(nodes), tuple(links), controller="sw" if rng.random() < 0.5 else "")
    w = Workload(prompt_tokens=rng.choice((16, 128)), output_tokens=rng.choice((1, 8, 32)),
                 concurrency=rng.choice((1, 4)), context=0)
    names = [n.name for n in nodes]
    pinned = tuple(rng.sample(names, 1)) if N > 1 and rng.random() < 0.15 else ()
    excluded = tuple(n for n in rng.sample(names, 1) if n not in pinned) if N > 2 and rng.random() < 0.15 else ()
    opts = Options(objective=objective, max_ppl_increase=rng.choice((0.0, 0.5, 1.0, 3.0, 50.0)),
                   pinned=pinned, excluded=excluded, max_stages=rng.choice((0, 0, 0, 2)), gap=1e-6,
                   time_limit=60)
    return Problem(model, fleet, w, opts)


def brute_force(p: Problem) -> tuple[float, list[Stage] | None]:
    """(best objective, its stages), or (inf, None) when no plan exists."""
    m, w, o, fleet = p.model, p.workload, p.options, p.fleet
    L = m.n_layer
    types = [q for q in m.types if not o.types or q in o.types]
    names = [n.name for n in fleet.nodes if n.name not in o.excluded]
    net = C.Network(fleet)
    TV = np.array(list(itertools.product(range(len(types)), repeat=L)), dtype=np.int64).reshape(-1, L)
    sens = np.array([[m.layers[l].sensitivity[q] for q in types] for l in range(L)])
    lbytes = np.array([[C.layer_bytes(m, l, q, w) for q in types] for l in range(L)], dtype=np.float64)
    tot_sens = sens[np.arange(L), TV].sum(axis=1)
    ok_budget = tot_sens <= o.budget + 1e-12
    per = {}
    for name in names:
        node = fleet.node(name)
        sup = np.array([q in node.speed for q in types])
        lat = np.array([[C.layer_latency_s(node, m.layers[l], q, w) if q in node.speed else np.inf
                         for q in types] for l in range(L)])
        step = np.array([[C.layer_busy_s(node, m.layers[l], q, w) if q in node.speed else np.inf
                          for q in types] for l in range(L)])
        per[name] = (sup, lat, step)
    best, arg = math.inf, None
    max_s = min(len(names), L, o.max_stages or L)
    for S in range(1, max_s + 1):
        for seq in itertools.permutations(names, S):
            if any(pn not in seq for pn in o.pinned):
                continue
            for cuts in itertools.combinations(range(1, L), S - 1):
                bounds = [0, *cuts, L]
                ok = ok_budget.copy()
                lat_total = np.zeros(len(TV))
                step_max = np.zeros(len(TV))
                fixed = 0.0
                hop_max = 0.0
                for i, name in enumerate(seq):
                    a, b = bounds[i], bounds[i + 1]
                    node = fleet.node(name)
                    sup, lat, step = per[name]
                    sub = TV[:, a:b]
                    ok &= sup[sub].all(axis=1)
                    mem = lbytes[np.arange(a, b), sub].sum(axis=1) + C.runtime_bytes(m, w) \
                        + (m.embed_bytes if i == 0 else 0) + (C.head_bytes(m, w) if i == S - 1 else 0)
                    ok &= mem <= node.memory
                    head = C.head_busy_s(node, m, w) if i == S - 1 else 0.0   # the last stage runs the LM head
                    with np.errstate(invalid="ignore"):
                        lat_total += lat[np.arange(a, b), sub].sum(axis=1)
                        step_max = np.maximum(step_max, step[np.arange(a, b), sub].sum(axis=1)
                                              + C.stage_overhead_busy_s(node, w) + head)
                    fixed += C.stage_overhead_latency_s(node, w) + (C.head_latency_s(node, m, w) if i == S - 1 else 0.0)
                    if i + 1 < S:
                        fixed += C.hop_latency_s(net, m, w, name, seq[i + 1])
                        hop_max = max(hop_max, C.hop_busy_s(net, m, w, name, seq[i + 1]))
                fixed += C.controller_first_s(net, w, seq[0]) + C.reply_s(net, seq[-1]) \
                    + C.ring_latency_s(net, w, seq[-1], seq[0])
                if not ok.any():
                    continue
                value = lat_total + fixed if o.objective == "latency" else np.maximum(step_max, hop_max)
                value = np.where(ok, value, np.inf)
                j = int(np.argmin(value))
                if value[j] < best:
                    best = float(value[j])
                    arg = [Stage(name, bounds[i], bounds[i + 1], tuple(types[t] for t in TV[j, bounds[i]:bounds[i + 1]]))
                           for i, name in enumerate(seq)]
    return best, arg
