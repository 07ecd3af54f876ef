"""bench/versus.py's reading of its runs: which figure each target is read on, and the split
handed to llama.cpp. (The runs themselves need root and minutes: bench/, not tests.)"""
from __future__ import annotations

from bench.emulated import Node
from bench.versus import Figures, targets, tensor_split


def figs(**kw) -> dict[str, Figures]:
    base = {"(a)": Figures(3.9, 9.7, 9.9), "(b)": Figures(2.4, 15.1, 17.3),
            "(c)": Figures(2.5, 18.6, 21.2, paired=(1.24, 0.97, 1.31)), "(d)": Figures(2.6, 21.4, 26.6),
            "(e)": Figures(3.5, 14.5, 24.4), "(f)": Figures(3.3, 13.7, 12.1)}
    base.update(kw)
    return base


def test_each_target_is_read_on_the_plan_for_its_workload():
    one, many, own = targets(figs())
    # one request: the median of (c)/(b)'s pairs by turns, not the ratio of the medians
    assert one == "one request, tok/s, (c)/(b) >= 1.0: 1.24 met"
    # 8 requests: the throughput plan (e) against llama.cpp on its split (f), (c)'s beside
    assert many == "8 requests, tok/s, (e)/(f) >= 1.5: 2.02 met (on the one-request plan, (c)/(b): 1.23)"
    assert own == "one request, tok/s, (d)/(a) >= 1.5: 2.21 met"


def test_a_target_below_its_bound_is_not_met():
    lines = targets(figs(**{"(c)": Figures(2.5, 18.6, 21.2, paired=(0.99, 0.98, 1.02)),
                            "(e)": Figures(3.5, 14.5, 18.0), "(d)": Figures(2.6, 14.0, 26.6)}))
    assert lines[0].endswith("0.99 not met")
    assert lines[1].startswith("8 requests, tok/s, (e)/(f) >= 1.5: 1.49 not met")
    assert lines[2].endswith("1.44 not met")


def test_only_b_and_c_give_the_one_request_target_alone():
    got = targets({k: v for k, v in figs().items() if k in ("(b)", "(c)")})
    assert got == ["one request, tok/s, (c)/(b) >= 1.0: 1.24 met"]
    # without pairs by turns, the ratio of the two systems' single-request speeds
    got = targets({"(b)": Figures(2.4, 15.0, 17.3), "(c)": Figures(2.5, 16.5, 21.2)})
    assert got == ["one request, tok/s, (c)/(b) >= 1.0: 1.10 met"]


def test_the_split_follows_the_stages_and_counts_the_output_layer_on_the_last():
    nodes = [Node("fast", 1.0, 1), Node("mid", 0.6, 1), Node("slow", 0.4, 1), Node("slowest", 0.25, 1)]
    plan = {"stages": [{"node": "mid", "first": 0, "last": 9}, {"node": "slow", "first": 9, "last": 15},
                       {"node": "slowest", "first": 15, "last": 18}, {"node": "fast", "first": 18, "last": 30}]}
    assert tensor_split(plan, nodes) == ([1, 2, 3, 0], [9, 6, 3, 13])
