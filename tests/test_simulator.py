"""The simulator on a 2-stage toy whose times are computed by hand, the trace readers, the
what-if sentences, and `edgefleet simulate` end to end.

The toy: two identical layers, one per node. A layer reads 1 MB of weights at 100 MB/s
(10 ms) and does 1 MFLOP per token at 1 GFLOP/s (1 ms per token), so a stage takes
max(10 ms, tokens × 1 ms): a 20-token prefill 20 ms, a 10-token prefill 10 ms, a decode step
10 ms. Activations are 1000 bytes per token over a 1 MB/s link with 5 ms latency. No step
overhead, no controller vertex (so requests enter and replies leave the fleet for free; a
test with one is below), and no vocabulary: the LM head costs only reading its `head` bytes
at 100 MB/s, once per step of the last stage.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from simulations.engine import SimOptions, WhatIf, simulate
from simulations.workload import Request, read_trace, scale_lengths, select, spike, synthetic, write_jsonl
from simulations.whatif import Spike, parse
from solver import cost as C
from solver.plan import Plan, Stage, evaluate, plan_from_dict, stage_memory
from solver.problem import Fleet, LayerProfile, Link, ModelProfile, Node, Problem, TypeSpeed, Workload

ROOT = Path(__file__).resolve().parent.parent
AZURE = ROOT.parent / "shared" / "data" / "AzureLLMInferenceTrace_conv.csv"
REPLY = 0.0     # the last stage's reply goes straight to the controller, which the toy does not place
RING = 0.005 + 4 / 1e6      # each further step's token id, round from n1 to n0 over their link


def toy(memory: int = 10 ** 9, nodes=("n0", "n1"), concurrency: int = 2, head: int = 0) -> Problem:
    lp = LayerProfile(bytes={"F16": 1_000_000}, flops=1e6, attn_flops_per_ctx=0.0, kv_bytes_per_token=100,
                      sensitivity={"F16": 0.0})
    model = ModelProfile(name="toy", n_embd=250, n_vocab=0, layers=(lp, lp), embed_bytes=0, head_bytes=head,
                         scratch_bytes_per_token=0, scratch_bytes=0)
    speed = {"F16": TypeSpeed(1e8, 1e9)}
    fleet = Fleet(tuple(Node(n, memory, speed, step_overhead_s=0.0) for n in nodes),
                  tuple(Link(nodes[0], n, 1e6, 0.005) for n in nodes[1:]))
    return Problem(model, fleet, Workload(20, 3, concurrency, 64))


PLAN = Plan((Stage("n0", 0, 1, ("F16",)), Stage("n1", 1, 2, ("F16",))), "feasible", 0.0, 0.0, 0.0, 0.0, "test")


def times(result):
    return [(r.first_s, r.done_s, r.status) for r in result.records]


def close(a, b):
    return math.isclose(a, b, abs_tol=1e-9)


def test_with_a_controller_the_reply_goes_straight_to_it_and_the_next_step_round_to_the_first_stage():
    p = toy()
    fleet = replace(p.fleet, controller="ctl",
                    links=p.fleet.links + (Link("ctl", "n0", 1e6, 0.001), Link("ctl", "n1", 1e6, 0.003)))
    (first, done, status), = times(simulate(replace(p, fleet=fleet), PLAN, [Request(0, 0.0, 20, 3)]))
    reply = 0.003 + 16 / 1e6            # n1 -> ctl; back up the chain it would be n1 -> n0 -> ctl, 6.032 ms
    # 20 token ids in, prefill 20 ms, 20 kB over the link 20 ms + 5 ms, prefill 20 ms, the reply
    assert close(first, 0.001 + 80 / 1e6 + 0.020 + 0.025 + 0.020 + reply)
    # each further token: the last stage sends the token id round to the first, by the
    # cheapest route (n1 -> ctl -> n0, 4.008 ms, not the 5.004 ms link), without the
    # controller's reply on the way; the last token reaches the controller a reply later
    ring = 0.003 + 4 / 1e6 + 0.001 + 4 / 1e6
    assert close(C.ring_s(C.Network(fleet), "n1", "n0"), ring)
    assert close(done, first + 2 * (ring + 0.010 + 0.006 + 0.010)) and status == "ok"


def test_one_request_by_hand():
    (first, done, status), = times(simulate(toy(), PLAN, [Request(0, 0.0, 20, 3)]))
    # prefill 20 ms, 20 kB over the link 20 ms + 5 ms, prefill 20 ms, reply: first token
    assert close(first, 0.020 + 0.025 + 0.020 + REPLY)
    # each further token: round to n0 5.004 ms, 10 ms, 1 ms + 5 ms, 10 ms
    assert close(done, first + 2 * (RING + 0.010 + 0.006 + 0.010)) and status == "ok"


def test_the_last_stage_runs_the_lm_head_once_per_step():
    # a 1 MB head read at 100 MB/s: 10 ms more on n1 for the first token and for each further one
    (first, done, status), = times(simulate(toy(head=1_000_000), PLAN, [Request(0, 0.0, 20, 3)]))
    assert close(first, 0.020 + 0.025 + 0.020 + 0.010 + REPLY)
    assert close(done, first + 2 * (RING + 0.010 + 0.006 + 0.010 + 0.010)) and status == "ok"


def test_two_overlapping_requests_queue_at_each_stage_and_on_the_link():
    a, b = times(simulate(toy(), PLAN, [Request(0, 0.0, 20, 3), Request(1, 0.005, 10, 2)]))
    # B waits for A's prefill on n0 (until 20 ms), runs 10 ms; its 10 kB wait for A's 20 kB on
    # the link (until 40 ms) and arrive at 55 ms; n1 is busy with A until 65 ms, then B: 75 ms.
    assert close(b[0], 0.075 + REPLY)
    # A is never delayed by B: n0 is free when its decode steps come, and so is n1
    assert close(a[0], 0.065 + REPLY) and close(a[1], a[0] + 2 * (RING + 0.026))
    # B's decode step: round to n0 at 80.004 ms (A's step ends just then), link, n1 as A's
    # step ends there
    assert close(b[1], b[0] + RING + 0.010 + 0.006 + 0.010)


def test_prompts_that_pass_the_batch_tokens_together_run_one_after_the_other():
    # the toy deployment's batch is 20 tokens (its prompt): two 20-token prompts at once do not
    # share a batch (as in the agents' engine). A: n0 0-20 ms, link 20-40 + 5, n1 45-65. B: n0
    # 20-40 ms, link after A's 40-60 + 5, n1 65-85. One 40-token batch would give both 125 ms.
    a, b = times(simulate(toy(), PLAN, [Request(0, 0.0, 20, 3), Request(1, 0.0, 20, 3)]))
    assert close(a[0], 0.065 + REPLY) and close(b[0], 0.085 + REPLY)


def test_decode_steps_go_round_in_as_many_groups_as_there_are_stages():
    # 4 requests on 2 stages: a decode step takes at most ceil(4 / 2) = 2 sessions, as the
    # agents run it (solver/memory.py decode_group), and a larger group splits at the stage
    reqs = [Request(i, 0.0, 20, 12) for i in range(4)]
    two = simulate(toy(concurrency=4), PLAN, reqs)
    assert [r.status for r in two.records] == ["ok"] * 4
    assert max(n for _, n in two.token_times) == 2
    assert sum(n for _, n in two.token_times) == 4 * 12
    # on one stage (a group of up to 4) the same steps merge into larger groups
    one_stage = Plan((Stage("n0", 0, 2, ("F16", "F16")),), "feasible", 0.0, 0.0, 0.0, 0.0, "test")
    one = simulate(toy(concurrency=4), one_stage, reqs)
    assert [r.status for r in one.records] == ["ok"] * 4
    assert max(n for _, n in one.token_times) > 2


def test_a_chain_with_a_small_stage_goes_round_in_fewer_groups_than_stages():
    # 3 stages of a layer whose step costs each session its own time (10 ms of FLOPs, more
    # than its weights' 10 ms read from 2 sessions on), the middle one 10 times slower than
    # the others: 2 groups keep it busy as 3 would, in a round of 600 ms (one group: 720), so
    # 2 (solver/memory.py decode_groups, as the controller tells the agents), and 6 sessions'
    # decode steps go round 3 at a time, not ceil(6 / 3) = 2
    p = toy(concurrency=6, nodes=("n0", "n1", "n2"))
    p = replace(p, model=replace(p.model, layers=(replace(p.model.layers[0], flops=1e7),) * 3))
    slow = replace(p.fleet.nodes[1], speed={"F16": TypeSpeed(1e8 / 10, 1e9 / 10)})
    p = replace(p, fleet=replace(p.fleet, nodes=(p.fleet.nodes[0], slow, p.fleet.nodes[2])))
    plan = Plan((Stage("n0", 0, 1, ("F16",)), Stage("n1", 1, 2, ("F16",)), Stage("n2", 2, 3, ("F16",))),
                "feasible", 0.0, 0.0, 0.0, 0.0, "test")
    pred = evaluate(p, plan.stages)
    assert pred.decode_groups() == 2
    assert [s.group_steps_s[0] for s in pred.stages] == [s.step_s for s in pred.stages]   # one group: all 6
    # a plan's JSON keeps the groups; one saved before the group steps goes one group per stage
    saved = json.loads(replace(plan, prediction=pred).to_json())
    assert plan_from_dict(saved).prediction.decode_groups() == 2
    for st in saved["prediction"]["stages"]:
        del st["group_steps_s"]
    assert plan_from_dict(saved).prediction.decode_groups() == 3
    result = simulate(p, plan, [Request(i, 0.0, 20, 12) for i in range(6)])
    assert [r.status for r in result.records] == ["ok"] * 6
    assert max(n for _, n in result.token_times) == 3
    assert sum(n for _, n in result.token_times) == 6 * 12


def test_a_full_kv_cache_makes_the_next_request_wait():
    # each node holds exactly 30 tokens of KV cache: A needs 23, B 12, so B waits for A
    small = toy()
    kv = C.kv_bytes(small.model.layers[0], small.workload)      # the stage's KV cache as the plan counts it
    need = stage_memory(small, PLAN.stages[0], True, False) - kv + 30 * small.model.layers[0].kv_bytes_per_token
    problem = toy(memory=need)
    (a_first, a_done, _), (b_first, b_done, b_status) = times(
        simulate(problem, PLAN, [Request(0, 0.0, 20, 3), Request(1, 0.005, 10, 2)]))
    assert close(a_done, 0.065 + REPLY + 2 * (RING + 0.026))
    # B starts when A finishes: 10 ms, 10 kB 10 ms + 5 ms, 10 ms, reply
    assert close(b_first, a_done + 0.035 + REPLY) and close(b_done, b_first + RING + 0.026)
    assert b_status == "ok"
    # a request that can never fit is rejected, not queued forever
    (_, _, status), = times(simulate(problem, PLAN, [Request(0, 0.0, 40, 3)]))
    assert status == "rejected"


def test_a_failure_replans_pushes_the_changed_shard_and_replays():
    # n0 holds a layer with the embedding (1.551 MB with its KV cache) but not with the head
    # (1.571 MB); n1 and n2 hold either: the re-plan without n1 is n0 -> n2 (and nothing else)
    problem = toy(memory=1_600_000, nodes=("n0", "n1", "n2"), head=520_000)
    problem = replace(problem, model=replace(problem.model, embed_bytes=500_000),
                      fleet=replace(problem.fleet, nodes=(replace(problem.fleet.nodes[0], memory=1_560_000),
                                                          *problem.fleet.nodes[1:])))
    opts = SimOptions(replan_s=1.0, switch_s=0.5, push_bandwidth=1e7)
    result = simulate(problem, PLAN, [Request(0, 0.0, 20, 3)], [WhatIf(0.09, "fail", node="n1")], opts)
    (first, done, status), = times(result)
    assert [s.node for s in result.plans[-1][1].stages] == ["n0", "n2"]
    ready = 0.09 + 1.0 + 1_000_000 / 1e7 + 0.5     # only n2's 1 MB shard is pushed
    head = 520_000 / 1e8                            # the last stage's LM head, each step
    assert close(first, 0.065 + head + REPLY)       # before the failure
    # one token was out: the replay is a 21-token prefill, which yields token 2, then token 3
    # (round from n2 to n0 over their link, as long as n1's)
    t2 = ready + 0.021 + 0.021 + 0.005 + 0.021 + head + REPLY
    assert close(done, t2 + RING + 0.026 + head) and status == "ok"
    assert result.records[0].replays == 1
    assert "n1 fails" in result.events[0][1] and "serving again" in result.events[1][1]


def test_the_simulator_is_deterministic_and_rejects_only_what_exceeds_the_context():
    reqs = synthetic(300, rate=20, seed=3, prompt_mean=16, output_mean=8)
    problem = toy(concurrency=8)          # context 64 tokens
    r1, r2 = (simulate(problem, PLAN, reqs) for _ in range(2))
    assert times(r1) == times(r2)
    too_long = [r.prompt_tokens + r.output_tokens > 64 for r in reqs]
    assert [s for *_, s in times(r1)] == ["rejected" if x else "ok" for x in too_long]


# ------------------------------------------------------------------ workloads

def test_azure_trace_reader_and_transformations():
    reqs = read_trace(AZURE)
    assert len(reqs) == 19366 and reqs[0].arrival_s == 0.0
    assert (reqs[0].prompt_tokens, reqs[0].output_tokens) == (374, 44)
    assert math.isclose(reqs[1].arrival_s, 4.314579, abs_tol=1e-6)       # 18:15:50.995169 - 18:15:46.680590
    part = select(reqs, start_s=60, duration_s=60, time_scale=0.5)
    assert part[0].arrival_s == 0 and part[-1].arrival_s < 30
    assert len(select(reqs, limit=100)) == 100
    small = scale_lengths(reqs[:50], 0.1, max_total=64)
    assert all(r.prompt_tokens + r.output_tokens <= 64 for r in small)
    more = spike(reqs[:200], 3, reqs[50].arrival_s, reqs[150].arrival_s)
    assert 380 <= len(more) <= 420


def test_jsonl_and_bad_traces(tmp_path):
    reqs = synthetic(20, rate=5, seed=1, arrival="gamma", burstiness=2.0)
    write_jsonl(reqs, tmp_path / "t.jsonl")
    back = read_trace(tmp_path / "t.jsonl")
    assert [(r.prompt_tokens, r.output_tokens) for r in back] == [(r.prompt_tokens, r.output_tokens) for r in reqs]
    (tmp_path / "bad.csv").write_text("time,a,b\n1,2,3\n")
    with pytest.raises(ValueError, match="not an Azure trace"):
        read_trace(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="does not exist"):
        read_trace(tmp_path / "missing.csv")


def test_what_if_sentences():
    fleet = toy(nodes=("n0", "n1", "n2")).fleet
    assert parse("fail n1 at 600s", fleet) == WhatIf(600.0, "fail", node="n1")
    w = parse("link n0-n1 10Mbit latency 20ms at 30s", fleet)
    assert (w.kind, w.bandwidth, w.latency, w.at_s) == ("link", 1.25e6, 0.02, 30.0)
    assert parse("spike x3 from 600s to 900s", fleet) == Spike(3.0, 600.0, 900.0)
    j = parse("join pi2 as rpi5-8gb at 60s via n0", fleet)
    assert j.joined.name == "pi2" and j.link.b == "n0"
    for bad in ("fail n9 at 600s", "explode n1", "link n1-n2 1Mbit at 5s", "join x as toaster at 1s"):
        with pytest.raises(ValueError):
            parse(bad, fleet)


def test_link_slowdown_changes_later_transfers_only():
    slow = WhatIf(1.0, "link", node="n0", other="n1", bandwidth=1e5)
    reqs = [Request(0, 0.0, 20, 3), Request(1, 2.0, 20, 3)]
    r = simulate(toy(), PLAN, reqs, [slow]).records
    assert close(r[0].first_s, 0.065 + REPLY)
    # 20 kB at 100 kB/s = 200 ms instead of 20 ms
    assert close(r[1].first_s - 2.0, 0.020 + 0.205 + 0.020 + REPLY)


# ------------------------------------------------------------------ the command

def strict_json(text: str):
    """JSON as any parser reads it: NaN and Infinity are not JSON."""
    def refuse(name):
        raise AssertionError(f"{name} in a JSON file")
    return json.loads(text, parse_constant=refuse)


def test_simulate_command_with_a_failure_writes_metrics_and_figures(tmp_path):
    out = tmp_path / "sim"
    r = subprocess.run([sys.executable, "-m", "controller.cli", "simulate", "--model", "llama-3.1-8b",
                        "--fleet", "examples/fleet-home4.yaml", "--trace", str(AZURE), "--limit", "300",
                        "--concurrency", "8", "--context", "4096", "--what-if", "fail mini at 20s",
                        "--slo-ttft", "5", "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "mini fails" in r.stdout and "TTFT" in r.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["requests"] == 300 and m["completed"] + m["rejected"] + m["failed"] == 300
    assert m["ttft_s"]["p99"] >= m["ttft_s"]["p50"] > 0 and 0 <= m["slo"]["attainment"] <= 1
    assert any("mini" not in " ".join(s["node"] for s in p["stages"]) for p in m["simulation"]["plans"][1:])
    assert (out / "latency_cdf.png").stat().st_size > 10_000 and (out / "timeline.png").stat().st_size > 10_000
    strict_json((out / "metrics.json").read_text())             # failed requests have no TTFT: null, not NaN
    for line in (out / "requests.jsonl").read_text().splitlines():
        strict_json(line)
    r = subprocess.run([sys.executable, "-m", "controller.cli", "simulate", "--model", "llama-3.1-8b",
                        "--fleet", "examples/fleet-home4.yaml", "--trace", str(tmp_path / "none.csv")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "plan.json"
    bad.write_text("stages: [laptop]\n")
    r = subprocess.run([sys.executable, "-m", "controller.cli", "simulate", "--model", "llama-3.1-8b",
                        "--fleet", "examples/fleet-home4.yaml", "--trace", str(AZURE), "--plan", str(bad)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "is not a plan JSON" in r.stderr and "Traceback" not in r.stderr


def test_sweep_runs_every_combination_in_processes(tmp_path):
    r = subprocess.run([sys.executable, "-m", "controller.cli", "simulate", "sweep", "--model", "llama-3.2-1b",
                        "--fleet", "examples/fleet-home4.yaml", "--fleet", "examples/fleet-edge.yaml",
                        "--trace", str(AZURE), "--limit", "60", "--rates", "0.5,2", "--context", "4096",
                        "--workers", "2", "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "sweep.json").read_text())
    assert [x["label"] for x in rows] == ["fleet-home4 | 5 % | load x0.5", "fleet-home4 | 5 % | load x2",
                                          "fleet-edge | 5 % | load x0.5", "fleet-edge | 5 % | load x2"]
    assert all(x["requests"] == 60 for x in rows)
    # twice the load on the same fleet never makes requests faster
    assert rows[1]["e2e_s"]["mean"] >= rows[0]["e2e_s"]["mean"]
    assert "4 simulations" in r.stdout
    assert "…" not in r.stdout and max(map(len, r.stdout.splitlines())) <= 80, r.stdout     # an 80-column terminal


def test_plot_labels_never_overlap():
    import matplotlib.pyplot as plt
    import numpy as np

    from simulations.plots import event_labels, percentile_lines

    fig, (a1, a2) = plt.subplots(2, 1)
    a1.plot([0, 1000], [0, 10])
    # four events within 6 seconds of each other on a 1000 s axis, and percentiles close together
    marks = event_labels(a1, [(600, "fail mini"), (601, "mini back"), (603, "fail pi"), (606, "link pi-switch")])
    labels = percentile_lines(a2, np.array([1.0, 1.0, 1.01, 1.02, 1.02]))
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    for group in (marks, labels):
        boxes = [t.get_window_extent(r) for t in group]
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert [t.get_text().split()[0] for t in labels] == ["p50", "p90", "p99"]
    assert "4: link pi-switch" in marks[-1].get_text()
    plt.close(fig)


def test_attention_priced_apart_by_hand():
    # the toy's layer attends at 1000 FLOPs per position: a prompt token's attention at
    # 1e8 FLOP/s, a decode step's at 5e7, on top of the roofline (solver/cost.py:compute_s).
    # A prompt of fewer than 64 tokens goes through llama.cpp's one-row attention kernel, at
    # the decode's rate (solver/cost.py:FA_TILE_ROWS): the 20-token prompt attends 20 × 10
    # positions, 4 ms more per stage; a decode step at the mean context 20 + 3/2 positions:
    # 0.43 ms more.
    p = toy()
    lp = replace(p.model.layers[0], attn_flops_per_ctx=1000.0)
    speed = {"F16": TypeSpeed(1e8, 1e9, 1e8, 5e7)}
    p = replace(p, model=replace(p.model, layers=(lp, lp)),
                fleet=replace(p.fleet, nodes=tuple(replace(n, speed=speed) for n in p.fleet.nodes)))
    node, bare = p.fleet.nodes[0], replace(lp, attn_flops_per_ctx=0.0)
    for tokens, rate in ((63, 5e7), (64, 1e8), (200, 1e8)):   # the tiled kernel from 64 tokens
        attention = C.layer_step_s(node, lp, "F16", tokens, tokens / 2) - \
            C.layer_step_s(node, bare, "F16", tokens, tokens / 2)
        assert attention == pytest.approx(tokens * tokens / 2 * 1000 / rate), tokens
    (first, done, status), = times(simulate(p, PLAN, [Request(0, 0.0, 20, 3)]))
    prefill, decode = 0.020 + 0.004, 0.010 + 1000 * 21.5 / 5e7
    assert close(first, prefill + 0.025 + prefill + REPLY)
    assert close(done, first + 2 * (RING + decode + 0.006 + decode)) and status == "ok"
    # the cost model's prediction for one request is the same
    pred = evaluate(p, PLAN.stages)
    assert close(pred.ttft_s, first) and close(pred.tpot_s, (done - first) / 2)
    # unmeasured (0), attention joins the roofline's FLOPs at prefill_flops: hidden under the
    # 10 ms weight read in a decode step, 0.2 ms more in the 20 ms prefill
    slow = {"F16": TypeSpeed(1e8, 1e9)}
    q = replace(p, fleet=replace(p.fleet, nodes=tuple(replace(n, speed=slow) for n in p.fleet.nodes)))
    (first, done, _), = times(simulate(q, PLAN, [Request(0, 0.0, 20, 3)]))
    assert close(first, 2 * 0.0202 + 0.025 + REPLY) and close(done, first + 2 * (RING + 0.020 + 0.006))


def test_a_step_of_several_tokens_pays_its_fixed_part_by_hand():
    # llama.cpp's step of several tokens streams the weights on a slower path than its
    # one-token step (agent/profile.py:fit_step): here 1 MB at 50 MB/s, 20 ms, then 1 ms per
    # token; a one-token step stays the 10 ms roofline. A 20-token prefill: 20 + 20 ms.
    p = toy()
    speed = {"F16": TypeSpeed(1e8, 1e9, batch_bytes_per_s=5e7)}
    p = replace(p, fleet=replace(p.fleet, nodes=tuple(replace(n, speed=speed) for n in p.fleet.nodes)))
    (first, done, status), = times(simulate(p, PLAN, [Request(0, 0.0, 20, 3)]))
    assert close(first, 0.040 + 0.025 + 0.040 + REPLY)
    assert close(done, first + 2 * (RING + 0.010 + 0.006 + 0.010)) and status == "ok"
    pred = evaluate(p, PLAN.stages)
    assert close(pred.ttft_s, first) and close(pred.tpot_s, (done - first) / 2)
    # the cost model's steps: one token 10 ms; two tokens 20 + 2 ms, where the roofline said
    # 10; but two sequences' decode step runs as two one-token steps, 20 ms, where that is
    # cheaper (agent/engine.py:_parts); 20 tokens 40 ms; unmeasured (0), the roofline again
    node, lp = p.fleet.nodes[0], p.model.layers[0]
    assert [C.layer_step_s(node, lp, "F16", b, 0.0) for b in (1, 2, 20)] == \
        [pytest.approx(x) for x in (0.010, 0.022, 0.040)]
    assert [C.layer_step_s(node, lp, "F16", b, 0.0, decode=True) for b in (1, 2, 20)] == \
        [pytest.approx(x) for x in (0.010, 0.020, 0.040)]
    plain = replace(node, speed={"F16": TypeSpeed(1e8, 1e9)})
    assert [C.layer_step_s(plain, lp, "F16", b, 0.0) for b in (1, 2, 20)] == [pytest.approx(x) for x in (0.010, 0.010, 0.020)]
    # the simulator's stage decides as the agent does, for the stage as a whole: two
    # requests' decode step as two one-token steps (20 ms), a 2-token prompt as one (22 ms)
    from simulations.engine import _StageState, _stage_groups

    stage = _StageState(0, node, _stage_groups(p, PLAN.stages[0], node), 1 << 40)
    assert stage.batch_s(2, 0.0, 2) == pytest.approx(0.020) and stage.batch_s(2, 0.0, 1) == pytest.approx(0.022)
    assert stage.batch_s(20, 0.0, 20) == pytest.approx(0.040)

