"""Solver speed and plan quality.

    python bench/solver.py                 # our solver on all sizes, plan quality vs baselines
    python bench/solver.py --naive         # also the naive (LLM-PQ-style) ILP under a 120 s limit
    python bench/solver.py --only naive --sizes 80x16   # one part, one size

Sizes are layers × nodes with the real model of that depth (32: Llama-3.1-8B, 80: Llama-3-70B,
126: Llama-3.1-405B), 7 types, seeded heterogeneous fleets from the device catalog.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from solver import solve  # noqa: E402
from solver.baselines import SPLITS, baseline, naive_ilp  # noqa: E402
from solver.catalog import DEVICES, model_profile, random_fleet  # noqa: E402
from solver.problem import Options, Problem, Workload  # noqa: E402

TYPES = ("F16", "Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K")
SIZES = {"32x8": ("llama-3.1-8b", 8, 5.0), "80x16": ("llama-3-70b", 16, 5.0),
         "126x32": ("llama-3.1-405b", 32, 12.0), "80x64": ("llama-3-70b", 64, 5.0)}
BIG = tuple(d for d in DEVICES if not d.startswith("rpi"))   # 405B's 3.5 GB runtime matrix rules out the Pis


def problem(size: str, seed: int, objective: str = "latency", limit: float = 60.0, solver: str = "highs") -> Problem:
    model, n, budget = SIZES[size]
    fleet = random_fleet(n, seed, BIG if model.endswith("405b") else tuple(DEVICES))
    return Problem(model_profile(model), fleet, Workload(512, 128, 1),
                   Options(objective=objective, max_ppl_increase=budget, types=TYPES, time_limit=limit, solver=solver))


def fmt(xs: list[float]) -> str:
    return f"median {statistics.median(xs):7.2f}  worst {max(xs):7.2f}" if xs else "n/a"


def speed(sizes, seeds, which: str, limit: float, first_seed: int = 0) -> dict:
    out = {}
    for size in sizes:
        rows = []
        for seed in range(first_seed, first_seed + seeds):
            p = problem(size, seed, limit=limit)
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
              f"proven {proven}/{len(rows)}", flush=True)
        out[size] = rows
    return out


def quality(n_fleets: int) -> dict:
    """Baseline / ours on realistic fleets (Llama-3.1-8B on 4–8 devices, Llama-3-70B on 16)."""
    ratios: dict = {(h, o): [] for h in SPLITS for o in ("latency", "throughput")}
    infeasible: dict = {(h, o): 0 for h in SPLITS for o in ("latency", "throughput")}
    for i in range(n_fleets):
        size = "80x16" if i % 2 else "32x8"
        for objective in ("latency", "throughput"):
            p = problem(size, 100 + i, objective, limit=30)
            ours = solve(p)
            if not ours.ok:
                continue
            for how in SPLITS:
                b = baseline(p, how)
                if b.ok:
                    ratios[how, objective].append(b.objective / ours.objective)
                else:
                    infeasible[how, objective] += 1
    print(f"\nplan quality on {n_fleets} catalog fleets: baseline predicted time / ours (>1: ours is better)")
    for (how, objective), xs in ratios.items():
        bad = infeasible[how, objective]
        print(f"  {how:8s} {objective:10s}: {fmt(xs)}   (no uniform type fits the budget on {bad} fleets)")
    return {f"{h}/{o}": {"ratios": xs, "infeasible": infeasible[h, o]} for (h, o), xs in ratios.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=0, help="(to split a run over processes)")
    ap.add_argument("--naive", action="store_true", help="also run the naive ILP")
    ap.add_argument("--only", choices=["ours", "naive", "quality"])
    ap.add_argument("--limit", type=float, default=60.0, help="our solver's time limit")
    ap.add_argument("--naive-limit", type=float, default=120.0)
    ap.add_argument("--fleets", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    sizes = a.sizes.split(",")
    result = {}
    if a.only in (None, "ours"):
        result["ours"] = speed(sizes, a.seeds, "ours", a.limit, a.first_seed)
    if a.naive or a.only == "naive":
        result["naive"] = speed(sizes, a.seeds, "naive", a.naive_limit, a.first_seed)
    if a.only in (None, "quality"):
        result["quality"] = quality(a.fleets)
    if a.json:
        a.json.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
