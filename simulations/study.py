"""One simulation study from its inputs: model profile, fleet, plan (given or solved), trace
with its transformations, what-if sentences, SLOs; and a sweep over fleets, budgets and
request rates in parallel processes. Used by `edgefleet simulate` and the benchmarks.
"""
from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from solver import jsonio
from simulations import workload as W
from simulations.engine import Result, SimOptions, simulate
from simulations.metrics import Outcome, summarize
from simulations.whatif import Spike, parse
from solver.plan import Plan, plan_from_dict
from solver.problem import Fleet, ModelProfile, Problem
from solver.request import PlacementRequest, Workload


@dataclass(frozen=True)
class TraceSpec:
    path: str
    time_scale: float = 1.0
    start_s: float = 0.0
    duration_s: float = 0.0
    limit: int = 0
    length_scale: float = 1.0
    max_total: int = 0          # cap prompt + output (a model with a small context)

    def load(self) -> list[W.Request]:
        reqs = W.select(W.read_trace(self.path), self.start_s, self.duration_s, self.limit, self.time_scale)
        return W.scale_lengths(reqs, self.length_scale, max_total=self.max_total)


@dataclass(frozen=True)
class StudySpec:
    model: ModelProfile
    fleet: Fleet
    trace: TraceSpec
    # objective, budget, types, pins, stage limit, solver; the workload's concurrency and
    # context (0: p99 of prompt + output over the trace, rounded up to 256); prompt and
    # output lengths come from the trace
    request: PlacementRequest = PlacementRequest("", Workload(context=0))
    whatifs: tuple[str, ...] = ()
    plan: dict | None = None            # a plan JSON; solved when None
    slo_ttft_s: float = 0.0
    slo_tpot_s: float = 0.0
    options: SimOptions = SimOptions()
    label: str = ""


def workload_for(requests: list[W.Request], concurrency: int, context: int) -> Workload:
    p = max(1, round(float(np.mean([r.prompt_tokens for r in requests]))))
    o = max(1, round(float(np.mean([r.output_tokens for r in requests]))))
    if not context:
        p99 = float(np.percentile([r.prompt_tokens + r.output_tokens for r in requests], 99))
        context = int(math.ceil(p99 / 256) * 256)
    return Workload(p, o, concurrency, max(context, p + o))


def prepare(spec: StudySpec) -> tuple[Problem, Plan, list[W.Request], list]:
    requests = spec.trace.load()
    events = []
    for text in spec.whatifs:
        w = parse(text, spec.fleet)
        if isinstance(w, Spike):
            requests = W.spike(requests, w.factor, w.start_s, w.end_s)
        else:
            events.append(w)
    w = spec.request.workload
    problem = Problem(spec.model, spec.fleet, workload_for(requests, w.concurrency, w.context), spec.request.options)
    if spec.plan is not None:
        plan = plan_from_dict(spec.plan)
    else:
        from solver.fast import solve

        plan = solve(problem)
        if not plan.ok:
            raise ValueError(plan.message)
    return problem, plan, requests, events


def outcomes(result: Result) -> list[Outcome]:
    return [Outcome(r.id, r.arrival_s, r.prompt_tokens, r.output_tokens, r.first_s, r.done_s,
                    r.status if r.status in ("ok", "rejected") else "failed") for r in result.records]


def run(spec: StudySpec) -> tuple[dict, Result, list[Outcome], Problem, Plan]:
    problem, plan, requests, events = prepare(spec)
    result = simulate(problem, plan, requests, events, spec.options)
    outs = outcomes(result)
    summary = summarize(outs, spec.slo_ttft_s, spec.slo_tpot_s, result.busy_s, result.token_times)
    summary["simulation"] = {"wall_s": result.wall_s, "simulated_s": result.end_s,
                             "speedup": result.end_s / result.wall_s if result.wall_s > 0 else None,
                             "events": [{"t_s": t, "what": e} for t, e in result.events],
                             "plans": [{"t_s": t, "stages": [asdict(s) for s in p.stages]} for t, p in result.plans],
                             "workload": asdict(problem.workload)}
    return summary, result, outs, problem, plan


def write(out: Path, summary: dict, outs: list[Outcome], events, title: str) -> list[Path]:
    from simulations.plots import latency_cdfs, timeline

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(jsonio.dumps(summary, indent=1))
    (out / "requests.jsonl").write_text("".join(jsonio.dumps(asdict(o)) + "\n" for o in outs))
    latency_cdfs(outs, out / "latency_cdf.png", title)
    timeline(summary, events, out / "timeline.png", title)
    return [out / "metrics.json", out / "requests.jsonl", out / "latency_cdf.png", out / "timeline.png"]


# ------------------------------------------------------------------ sweeps

def _sweep_one(spec: StudySpec) -> dict:
    try:
        summary, result, _, _, plan = run(spec)
    except ValueError as exc:
        return {"label": spec.label, "error": str(exc)}
    summary.pop("timeline", None)
    summary["label"] = spec.label
    summary["stages"] = " -> ".join(s.node for s in plan.stages)
    return summary


def sweep(specs: list[StudySpec], workers: int, progress=None) -> list[dict]:
    """Run every study in its own process; results in the order of specs."""
    results: list[dict | None] = [None] * len(specs)
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(_sweep_one, s): i for i, s in enumerate(specs)}
        for f in as_completed(futures):
            results[futures[f]] = f.result()
            if progress:
                progress()
    return results


def variants(base: StudySpec, fleets: list[tuple[str, Fleet]], budgets: list[float], rates: list[float]) -> list[StudySpec]:
    """The grid of a sweep: every fleet × budget × request-rate factor (rate 2 = gaps halved)."""
    out = []
    for name, fleet in fleets:
        for b in budgets:
            for r in rates:
                request = replace(base.request, options=replace(base.request.options, max_ppl_increase=b))
                out.append(replace(base, fleet=fleet, request=request, plan=None,
                                   trace=replace(base.trace, time_scale=base.trace.time_scale / r),
                                   label=f"{name} | {b:g} % | load x{r:g}"))
    return out
