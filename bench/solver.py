"""Solver speed and plan quality.

    python bench/solver.py                 # our solver on all sizes, why-analysis, plan quality vs baselines
    python bench/solver.py --naive         # also the naive (LLM-PQ-style) ILP under a 120 s limit
    python bench/solver.py --only naive --sizes 80x16   # one part, one size

Sizes are layers × nodes with the real model of that depth (32: Llama-3.1-8B, 80: Llama-3-70B,
126: Llama-3.1-405B), 7 types, seeded heterogeneous fleets from the device catalog. Each size
runs at the issue's target: proven optimal (gap 0.1 %) for 32×8 and 80×16 under a 60 s limit,
gap 1 % under a 10 s limit for the largest sizes (126×32, 80×64).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

import pulp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from solver.fast import solve  # noqa: E402
from solver.baselines import SPLITS, baseline, naive_ilp  # noqa: E402
from solver.fast import master  # noqa: E402
from solver.ilp import candidates  # noqa: E402
from solver.catalog import DEVICES, model_profile, random_fleet  # noqa: E402
from solver.problem import Options, Problem, Workload  # noqa: E402

TYPES = ("F16", "Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K")
SIZES = {"32x8": ("llama-3.1-8b", 8, 5.0), "80x16": ("llama-3-70b", 16, 5.0),
         "126x32": ("llama-3.1-405b", 32, 12.0), "80x64": ("llama-3-70b", 64, 5.0)}
# the targets per size: (gap, time limit s, median seconds)
TARGETS = {"32x8": (0.001, 60.0, 2.0), "80x16": (0.001, 60.0, 2.0), "126x32": (0.01, 10.0, 10.0),
           "80x64": (0.01, 10.0, 10.0)}
BIG = tuple(d for d in DEVICES if not d.startswith("rpi"))   # 405B's 3.5 GB runtime matrix rules out the Pis


def problem(size: str, seed: int, objective: str = "latency", limit: float = 60.0, solver: str = "highs",
            gap: float = 0.001, nodes: int = 0) -> Problem:
    model, n, budget = SIZES[size]
    fleet = random_fleet(nodes or n, seed, BIG if model.endswith("405b") else tuple(DEVICES))
    return Problem(model_profile(model), fleet, Workload(512, 128, 1, 0),
                   Options(objective=objective, max_ppl_increase=budget, types=TYPES, time_limit=limit, solver=solver,
                           gap=gap))


def fmt(xs: list[float]) -> str:
    return f"median {statistics.median(xs):7.2f}  worst {max(xs):7.2f}" if xs else "n/a"


def speed(sizes, seeds, which: str, limit: float | None, first_seed: int = 0) -> dict:
    """limit None: our solver at each size's target gap and limit (TARGETS)."""
    out = {}
    for size in sizes:
        rows = []
        gap, target_limit, target_s = TARGETS[size]
        for seed in range(first_seed, first_seed + seeds):
            p = problem(size, seed, limit=limit or target_limit, gap=gap if which == "ours" else 0.001)
            t0 = time.perf_counter()
            plan = solve(p) if which == "ours" else naive_ilp(p)
            rows.append({"seed": seed, "status": plan.status, "objective": plan.objective, "gap": plan.gap,
                         "seconds": time.perf_counter() - t0, "stages": len(plan.stages)})
            print(f"  {which:5s} {size:7s} seed {seed}: {plan.status:10s} gap {100 * plan.gap:8.3f} %  "
                  f"{rows[-1]['seconds']:7.2f} s  objective {plan.objective:.4f}", flush=True)
        times = [r["seconds"] for r in rows]
        gaps = [100 * r["gap"] for r in rows if r["gap"] == r["gap"]]
        proven = sum(r["status"] == "optimal" for r in rows)
        print(f"{which:5s} {size:7s}: time {fmt(times)} s | gap % {fmt(gaps) if gaps else 'no plan'} | "
              f"within {100 * gap:g} %: {proven}/{len(rows)}", flush=True)
        if which == "ours":
            met = statistics.median(times) <= target_s and statistics.median(gaps or [math.inf]) <= 100 * gap
            print(f"      target: median ≤ {target_s:g} s at gap ≤ {100 * gap:g} % — {'met' if met else 'NOT met'}")
        out[size] = rows
    return out


def why(sizes, seeds: int) -> dict:
    """Why the proof takes the time it takes: how far the master's LP relaxation is from the plan
    (what branch-and-bound must close), and the solve time at looser gaps."""
    out = {}
    print("\nwhy: LP relaxation of the aggregate master vs the plan, and time to reach each gap")
    for size in sizes:
        for seed in range(seeds):
            p = problem(size, seed)
            lp, _ = master(p, candidates(p), transport=True)
            lp.solve(pulp.HiGHS(mip=False, msg=False))
            relax = pulp.value(lp.objective)
            row = {"lp_relaxation": relax, "seconds": {}, "objective": {}, "gap": {}}
            gaps = (0.01, 0.005, 0.001) if size == "80x16" else (0.01,)
            for gap in gaps:
                q = problem(size, seed, gap=gap)
                t0 = time.perf_counter()
                plan = solve(q)
                row["seconds"][gap], row["objective"][gap] = time.perf_counter() - t0, plan.objective
                row["gap"][gap] = plan.gap
            best = min(row["objective"].values())
            row["lp_gap"] = (best - relax) / best
            out[f"{size}/{seed}"] = row
            times = ", ".join(f"{100 * g:g} %: {row['seconds'][g]:6.2f} s (reached {100 * row['gap'][g]:.2f} %)"
                              for g in gaps)
            print(f"  {size:7s} seed {seed}: LP relaxation {100 * row['lp_gap']:5.2f} % below the plan "
                  f"(one layer is {100 / p.model.n_layer:.2f} % of the model) | 60 s limit, time to gap {times}",
                  flush=True)
    return out


def quality(n_fleets: int, naive_limit: float) -> dict:
    """Baseline / ours on realistic catalog fleets: Llama-3.1-8B on 8 devices and Llama-3-70B
    on 16, alternately, both objectives, at the same budget; the naive ILP with the time a user
    would give it (naive_limit; 0 leaves it out)."""
    hows = (*SPLITS, "naive") if naive_limit > 0 else SPLITS
    ratios: dict = {(h, o): [] for h in hows for o in ("latency", "throughput")}
    infeasible: dict = {(h, o): 0 for h in hows for o in ("latency", "throughput")}
    for i in range(n_fleets):
        size = "80x16" if i % 2 else "32x8"
        for objective in ("latency", "throughput"):
            p = problem(size, 100 + i, objective, limit=30)
            ours = solve(p)
            if not ours.ok:
                continue
            for how in hows:
                b = baseline(p, how) if how != "naive" else naive_ilp(
                    dataclasses.replace(p, options=dataclasses.replace(p.options, time_limit=naive_limit)))
                if b.ok:
                    ratios[how, objective].append(b.objective / ours.objective)
                else:
                    infeasible[how, objective] += 1
    print(f"\nplan quality on {n_fleets} catalog fleets: baseline's predicted latency (or busiest stage's time per request, "
          "the inverse of throughput) / ours; > 1: ours is better")
    for (how, objective), xs in ratios.items():
        bad = infeasible[how, objective]
        span = (f"median {statistics.median(xs):6.2f}  least {min(xs):6.2f}  most {max(xs):6.2f}" if xs else "n/a")
        why_not = (f"found no plan in {naive_limit:g} s" if how == "naive" else
                   "no uniform type fits memory and the budget")
        print(f"  {how:8s} {objective:10s}: {span}   (on {len(xs)} fleets; on {bad} {why_not})")
    return {f"{h}/{o}": {"ratios": xs, "infeasible": infeasible[h, o]} for (h, o), xs in ratios.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=0, help="(to split a run over processes)")
    ap.add_argument("--naive", action="store_true", help="also run the naive ILP")
    ap.add_argument("--only", choices=["ours", "naive", "why", "quality"])
    ap.add_argument("--limit", type=float, default=None, help="our solver's time limit (default: per size target)")
    ap.add_argument("--naive-limit", type=float, default=120.0)
    ap.add_argument("--fleets", type=int, default=20)
    ap.add_argument("--quality-naive-limit", type=float, default=20.0,
                    help="the naive ILP's time limit in the quality part (0: leave it out)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    sizes = a.sizes.split(",")
    result = {}
    if a.only in (None, "ours"):
        result["ours"] = speed(sizes, a.seeds, "ours", a.limit, a.first_seed)
    if a.naive or a.only == "naive":
        result["naive"] = speed(sizes, a.seeds, "naive", a.naive_limit, a.first_seed)
    if a.only in (None, "why"):
        result["why"] = why([x for x in sizes if x in ("80x16", "126x32")], a.seeds)
    if a.only in (None, "quality"):
        result["quality"] = quality(a.fleets, a.quality_naive_limit)
    if a.json:
        a.json.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
