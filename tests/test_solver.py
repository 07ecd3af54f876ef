"""The solver against a brute-force enumerator, property tests, infeasibility sentences."""
from __future__ import annotations

import dataclasses
import itertools
import math
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from solver import cost as C
from solver import ilp
from solver.baselines import SPLITS, baseline, naive_ilp, split
from solver.catalog import model_profile, random_fleet
from solver.fast import least_dnll, solve, solve_ilp, sorted_types
from solver.memory import MAX_BATCH, decode_group, decode_groups, group_batch
from solver.plan import evaluate, violations
from solver.devices import GiB
from solver.problem import (Fleet, LayerProfile, Link, ModelProfile, Node, Options, Problem, TypeSpeed,
                            Workload, node_from_dict)
from solver_instances import brute_force, random_problem


def check_against_brute_force(p: Problem):
    want, want_stages = brute_force(p)
    plan = solve(p)
    if math.isinf(want):
        assert plan.status == "infeasible", (plan, p)
        assert plan.message and "\n" not in plan.message
        return "infeasible"
    assert plan.status == "optimal", plan
    assert not violations(p, plan.stages), violations(p, plan.stages)
    # the brute force's own number is the cost model's number for its plan
    assert evaluate(p, want_stages).objective(p.options.objective) == pytest.approx(want, rel=1e-9)
    assert plan.objective == pytest.approx(want, rel=1e-6, abs=1e-12), (plan.stages, want_stages)
    assert plan.bound <= plan.objective + 1e-12 and plan.gap <= 1e-6 + 1e-9
    return "optimal"


@pytest.mark.parametrize("chunk", range(11))
def test_matches_brute_force(chunk):
    """220 random instances (≤ 8 layers, ≤ 4 nodes, ≤ 4 types; both objectives; uniform and
    non-uniform layers, i.e. both the aggregate path and the plain ILP)."""
    outcomes = []
    for i in range(20):
        seed = chunk * 20 + i
        rng = random.Random(seed)
        kind = seed % 4
        if kind == 3:   # the larger shapes, fewer choices so that enumeration stays quick
            p = random_problem(rng, homogeneous=seed % 8 == 3, objective=("latency", "throughput")[seed % 2],
                               max_layers=8, max_nodes=3, max_types=2)
        elif kind == 2:
            p = random_problem(rng, homogeneous=True, objective=("latency", "throughput")[seed % 3 == 0],
                               max_layers=5, max_nodes=4, max_types=4)
        else:
            p = random_problem(rng, homogeneous=kind == 0, objective=("latency", "throughput")[(seed // 4) % 2])
        outcomes.append(check_against_brute_force(p))
    assert outcomes  # both feasible and infeasible cases occur across the chunks (see below)


def test_matches_brute_force_with_unordered_sensitivities():
    """40 uniform-layer instances (the aggregate path) whose ΔNLL is drawn per layer and type, so
    no single order of layers by sensitivity holds for every type: the master's count cuts and
    the placement of its counts on blocks must still give the enumerator's optimum."""
    outcomes = set()
    for seed in range(40):
        p = random_problem(random.Random(5000 + seed), homogeneous=True, objective=("latency", "throughput")[seed % 2],
                           max_layers=7, max_nodes=3, max_types=3, product=False)
        outcomes.add(check_against_brute_force(p))
    assert outcomes == {"optimal", "infeasible"}


def test_least_dnll_is_the_transport_optimum_and_its_cuts_are_valid():
    """least_dnll against enumeration of every type vector, and each cut below the least ΔNLL of
    every other count vector, touching it at its own."""
    rng = random.Random(7)
    p = random_problem(rng, homogeneous=True, objective="latency", max_layers=6, max_types=3, product=False)
    while p.model.n_layer < 4 or len(p.model.types) < 3:
        p = random_problem(rng, homogeneous=True, objective="latency", max_layers=6, max_types=3, product=False)
    m, types = p.model, list(p.model.types)
    best: dict = {}
    for vec in itertools.product(types, repeat=m.n_layer):
        key = tuple(vec.count(q) for q in types)
        best[key] = min(best.get(key, math.inf), sum(m.layers[l].sensitivity[q] for l, q in enumerate(vec)))
    for key, want in best.items():
        used, a, b = least_dnll(p, dict(zip(types, map(float, key))))
        assert used == pytest.approx(want, rel=1e-7, abs=1e-12)
        assert a + sum(b[q] * k for q, k in zip(types, key)) == pytest.approx(want, rel=1e-6, abs=1e-12)
        for other, value in best.items():
            assert a + sum(b[q] * k for q, k in zip(types, other)) <= value + 1e-12


def test_sorted_types_is_exact_for_product_sensitivities():
    """Each block's most accurate types on its most sensitive layers: the least ΔNLL over every
    arrangement of the block's types, when ΔNLL is a layer weight times a type factor."""
    rng = random.Random(3)
    p = random_problem(rng, homogeneous=True, objective="latency", max_layers=8, max_types=3)
    while p.model.n_layer < 6 or len(p.model.types) < 3:
        p = random_problem(rng, homogeneous=True, objective="latency", max_layers=8, max_types=3)
    m, types = p.model, list(p.model.types)
    for trial in range(20):
        sizes = [3, m.n_layer - 3]
        order = [f"x{i}" for i in range(2)]
        mix = {}
        for n, k in zip(order, sizes):
            cut = sorted(rng.choices(range(k + 1), k=len(types) - 1))
            mix[n] = {q: hi - lo for q, lo, hi in zip(types, [0, *cut], [*cut, k])}
        stages = sorted_types(p, order, mix)
        assert [(s.first, s.last) for s in stages] == [(0, 3), (3, m.n_layer)]
        for s, n in zip(stages, order):
            assert {q: s.types.count(q) for q in types} == mix[n]
            got = sum(m.layers[l].sensitivity[q] for l, q in zip(range(s.first, s.last), s.types))
            want = min(sum(m.layers[l].sensitivity[q] for l, q in zip(range(s.first, s.last), perm))
                       for perm in set(itertools.permutations(s.types)))
            assert got == pytest.approx(want, rel=1e-12, abs=1e-15)


def slow_head_problem(objective: str) -> Problem:
    """Four equal layers on two nodes that each hold three at most (with both ends): equal at
    the layers' type, but node a reads the LM head's type (Q8_0) 100 × slower than node b, and
    b is nearer the controller (so without the head b would go first)."""
    lp = LayerProfile(bytes={"Q4_0": 1_000_000}, flops=2e6, attn_flops_per_ctx=1024.0, kv_bytes_per_token=256,
                      sensitivity={"Q4_0": 0.0})
    model = ModelProfile(name="toy", n_embd=256, n_vocab=4000, layers=(lp,) * 4, embed_bytes=500_000,
                         head_bytes=2_000_000, scratch_bytes_per_token=4096, scratch_bytes=100_000, head_type="Q8_0")
    w = Workload(prompt_tokens=16, output_tokens=8, concurrency=2, context=0)
    memory = C.runtime_bytes(model, w) + model.embed_bytes + C.head_bytes(model, w) + 3 * C.layer_bytes(model, 0, "Q4_0", w)
    nodes = tuple(Node(n, memory, {"Q4_0": TypeSpeed(1e9, 1e11), "Q8_0": TypeSpeed(head, 1e11)})
                  for n, head in (("a", 1e8), ("b", 1e10)))
    fleet = Fleet(nodes, (Link("sw", "a", 125e6, 0.002), Link("sw", "b", 125e6, 0.0002)), controller="sw")
    return Problem(model, fleet, w, Options(objective=objective, gap=1e-6, time_limit=60))


@pytest.mark.parametrize("objective", ["latency", "throughput"])
def test_the_last_stage_pays_for_the_lm_head(objective):
    """The plan's prediction counts the LM head on the last stage (one row per request step;
    the decode batch in a throughput step), so the node with the fast head takes the end; the
    aggregate path, the full ILP and the naive ILP agree with the enumerator."""
    p = slow_head_problem(objective)
    want, want_stages = brute_force(p)
    assert want_stages[-1].node == "b"
    for plan in (solve(p), solve_ilp(p), naive_ilp(p)):
        assert plan.status == "optimal" and plan.stages[-1].node == "b"
        assert plan.objective == pytest.approx(want, rel=1e-6)
    head = {n.name: (C.head_s(n, p.model, 1), C.head_s(n, p.model, 2, decode=True)) for n in p.fleet.nodes}
    assert head["a"][0] == pytest.approx(0.020) and head["b"][0] == pytest.approx(0.0002)
    got = evaluate(p, want_stages)
    for i, st in enumerate(want_stages):
        node, last = p.fleet.node(st.node), i == len(want_stages) - 1
        layers = [(p.model.layers[l], q) for l, q in zip(range(st.first, st.last), st.types)]
        dec = sum(C.decode_s(node, lp, q, p.workload) for lp, q in layers)
        step = sum(C.decode_s(node, lp, q, p.workload, 2) for lp, q in layers) + node.step_overhead_s
        assert got.stages[i].decode_s == pytest.approx(dec + (head[st.node][0] if last else 0.0))
        assert got.stages[i].step_s == pytest.approx(step + (head[st.node][1] if last else 0.0))
    # the same layers with the nodes swapped: the layers cost the same; the head, the
    # controller's link to the first stage and the last stage's reply to it move, and the
    # way round from the last stage to the first is the same link the other way
    assert [s.node for s in want_stages] == ["a", "b"]
    other = evaluate(p, [dataclasses.replace(s, node="ab"[s.node == "a"]) for s in want_stages])
    net = C.Network(p.fleet)
    reply = C.reply_s(net, "a") - C.reply_s(net, "b")
    assert reply == pytest.approx(0.002 - 0.0002, rel=1e-3)      # the links' latencies
    ctl_first = C.controller_first_s(net, p.workload, "b") - C.controller_first_s(net, p.workload, "a") + reply
    ring = C.ring_s(net, "a", "b") - C.ring_s(net, "b", "a")
    assert C.ring_s(net, "b", "a") > 0 and ring == pytest.approx(0.0)
    assert other.ttft_s - got.ttft_s == pytest.approx(head["a"][0] - head["b"][0] + ctl_first)
    assert other.tpot_s - got.tpot_s == pytest.approx(head["a"][0] - head["b"][0] + ring)


def test_instance_mix_has_both_outcomes():
    seen = set()
    for seed in range(0, 220, 7):
        p = random_problem(random.Random(seed), homogeneous=seed % 2 == 0, objective="latency")
        seen.add(math.isinf(brute_force(p)[0]))
    assert seen == {True, False}


def test_cbc_agrees_with_highs():
    for seed in range(6):
        p = random_problem(random.Random(1000 + seed), homogeneous=seed % 2 == 0, objective="latency")
        a = solve(p)
        b = solve(dataclasses.replace(p, options=dataclasses.replace(p.options, solver="cbc")))
        assert a.status == b.status
        if a.ok:
            assert b.objective == pytest.approx(a.objective, rel=1e-6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10 ** 6), homogeneous=st.booleans(), objective=st.sampled_from(["latency", "throughput"]))
def test_every_plan_meets_memory_contiguity_and_budget(seed, homogeneous, objective):
    p = random_problem(random.Random(seed), homogeneous, objective, max_layers=10, max_nodes=5, max_types=4)
    plan = solve(p)
    if plan.ok:
        assert violations(p, plan.stages) == []
        covered = [l for s in plan.stages for l in range(s.first, s.last)]
        assert covered == list(range(p.model.n_layer))
        assert plan.prediction.dnll <= p.options.budget + 1e-9
        for s, sp in zip(plan.stages, evaluate(p, plan.stages).stages):
            assert sp.memory <= p.fleet.node(s.node).memory
    else:
        assert plan.status == "infeasible" and plan.message


def real_problem(n_nodes=8, seed=0, **opts):
    return Problem(model_profile("llama-3.1-8b"), random_fleet(n_nodes, seed), Workload(512, 128, 1, 0),
                   Options(**opts))


def test_real_shapes_proven_optimal_and_fast_path_equals_plain_ilp():
    p = real_problem(4, 3, max_ppl_increase=5, gap=1e-4)
    a = solve(p)
    b = solve_ilp(p)
    assert a.status == "optimal" and b.status == "optimal"
    assert a.objective == pytest.approx(b.objective, rel=2e-4)


def with_memory(p: Problem, gib: float) -> Problem:
    """The same problem with every node offering `gib` GiB."""
    nodes = tuple(dataclasses.replace(n, memory=int(gib * GiB)) for n in p.fleet.nodes)
    return dataclasses.replace(p, fleet=dataclasses.replace(p.fleet, nodes=nodes))


def test_infeasible_memory_names_the_resource():
    plan = solve(with_memory(real_problem(2, 5, max_ppl_increase=5), 1))
    assert plan.status == "infeasible"
    assert plan.message.startswith("the fleet offers 2.00 GiB; the model needs at least")
    assert "KV cache for 1 × 640 tokens" in plan.message


def test_infeasible_budget_reports_best_possible():
    plan = solve(with_memory(real_problem(2, 5, max_ppl_increase=0.01), 2.5))
    assert plan.status == "infeasible"
    assert plan.message.startswith("no assignment meets a 0.01 % perplexity budget on this fleet: the best possible is ")
    best = float(plan.message.split("best possible is ")[1].split(" %")[0])
    assert best > 0.01


def test_time_limited_run_is_never_called_optimal():
    p = Problem(model_profile("llama-3-70b"), random_fleet(16, 1), Workload(512, 128, 1, 0),
                Options(max_ppl_increase=5, time_limit=0.5))
    plan = solve_ilp(p)
    assert plan.status in ("feasible", "timeout")
    if plan.status == "feasible":
        assert plan.gap > p.options.gap


@pytest.mark.parametrize("seed", [0, 3])
def test_greedy_fallback_gives_valid_plans_no_better_than_the_optimum(seed):
    from solver.fast import assign_types, greedy_blocks

    p = real_problem(8, seed, max_ppl_increase=5)
    cand = ilp.candidates(p)
    best = solve(p)
    assert best.status == "optimal"
    tried = 0
    for blocks in greedy_blocks(p, cand):
        tried += 1
        assert [b[1] for b in blocks] == [0] + [b[2] for b in blocks[:-1]] and blocks[-1][2] == p.model.n_layer
        stages = assign_types(p, blocks, cand, 10)
        if stages is not None:
            assert violations(p, stages) == []
            assert evaluate(p, stages).latency_s >= best.objective * (1 - p.options.gap)
            break
    else:
        pytest.fail(f"no greedy split of {tried} gave a plan")


def test_throughput_objective_is_the_bottleneck():
    p = real_problem(6, 2, max_ppl_increase=5, objective="throughput", time_limit=5)
    plan = solve(p)
    assert plan.ok
    assert plan.gap == pytest.approx((plan.objective - plan.bound) / plan.objective)
    assert (plan.status == "optimal") == (plan.gap <= p.options.gap + 1e-9)   # unproven: gap reported
    pred = plan.prediction
    assert plan.objective == pytest.approx(pred.bottleneck_s)
    # the busiest stage per request: its prompt, then its share of the batch's decode steps
    w = p.workload
    busy = [s.prefill_s + p.fleet.node(s.node).step_overhead_s + (w.output_tokens - 1) / w.concurrency * s.step_s
            for s in pred.stages]
    assert pred.bottleneck_s >= max(busy) - 1e-12
    assert pred.tokens_per_s == pytest.approx(w.output_tokens / pred.bottleneck_s)


def test_naive_ilp_matches_brute_force():
    for seed in range(8):
        p = random_problem(random.Random(500 + seed), homogeneous=seed % 2 == 0,
                           objective=("latency", "throughput")[seed % 3 == 0], max_layers=5, max_nodes=3)
        want, _ = brute_force(p)
        plan = naive_ilp(p)
        if math.isinf(want):
            assert plan.status == "infeasible"
        else:
            assert plan.objective == pytest.approx(want, rel=1e-6)


def test_baselines_are_valid_and_never_beat_the_optimum():
    p = real_problem(5, 4, max_ppl_increase=5)
    best = solve(p)
    for how in SPLITS:
        b = baseline(p, how)
        if b.ok:
            assert violations(p, b.stages) == []
            assert b.objective >= best.objective * (1 - 1e-9)
            assert len(set(q for s in b.stages for q in s.types)) == 1


def test_split_is_proportional_and_complete():
    assert split([1, 1, 1], 8) == [3, 3, 2]
    assert split([3, 1], 8) == [6, 2]
    assert sum(split([0.3, 5, 2.2], 31)) == 31


def test_a_fleet_file_gives_measured_speeds_with_their_optional_rates():
    d = {"name": "pi", "memory": "1GiB", "types": ["Q8_0"],
         "speed": {"Q8_0": {"decode_bytes_per_s": "2e9", "prefill_flops": "1e10", "decode_attention_flops": "1e9",
                            "batch_bytes_per_s": "1e9"}}}
    assert node_from_dict(d, "fleet").speed["Q8_0"] == TypeSpeed(2e9, 1e10, 0.0, 1e9, 1e9)
    d["speed"]["Q8_0"]["batch_bytes_per_s"] = -1
    with pytest.raises(ValueError, match="needs a positive memory and speeds"):
        node_from_dict(d, "fleet")


def test_the_sessions_go_round_in_the_fewest_groups_that_make_the_shortest_round():
    assert [decode_group(8, g) for g in (1, 2, 3, 4)] == [MAX_BATCH, 4, 3, 2]
    assert [group_batch(8, g) for g in (1, 2, 3, 4)] == [8, 4, 3, 2]

    def steps(*stages: tuple[float, float], sessions: int = 8) -> list[list[float]]:
        """Each stage's step for one group of g = 1 .. stages: fixed + per session x batch (s)."""
        return [[f + u * group_batch(sessions, g) for g in range(1, len(stages) + 1)] for f, u in stages]

    # a step that costs each session its own time (no gain in a batch): one group per stage,
    # every stage busy (3 x 3 sessions a round, against 8 x 3 for one group going round)
    assert decode_groups(steps((0, 1e-3), (0, 1e-3), (0, 1e-3))) == 3
    # a step that costs the same for any batch: one group of all 8 takes one step per stage
    assert decode_groups(steps((5e-3, 0), (5e-3, 0), (5e-3, 0))) == 1
    # Q8_0 on the emulated 0.6- and 1-CPU nodes, 15 layers each: a step of 8 costs 1.34 x a
    # step of 4, the fast node 0.6 x the mid one: one group would take 2.14 of mid's 4-step,
    # two groups 2 (mid computes both while the other goes round): two
    assert decode_groups([[1.34, 1.0], [0.6 * 1.34, 0.6]]) == 2
    # one stage far slower than the rest, whose batch costs little more than one session:
    # more groups would only queue at it
    assert decode_groups(steps((40e-3, 1e-3), (2e-3, 1e-3), (3e-3, 1e-3))) == 1
    # where groups tie, the fewest
    assert decode_groups([[2.0, 1.0], [0.0, 0.0]]) == 1
    assert decode_groups([[0.05]]) == 1
    assert decode_groups([]) == 1
    assert decode_groups([[0.0, 0.0], [0.0, 0.0]]) == 2      # nothing predicted: one group per stage
