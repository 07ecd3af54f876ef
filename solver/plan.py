"""A plan (ordered stages) and what the cost model predicts for it.

`evaluate` is the single definition of a plan's objective: the ILP's objective value, the
brute-force reference in the tests and the baselines are all compared through it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from solver import jsonio
from solver import cost as C
from solver.memory import decode_groups, group_batch, group_rounds
from solver.problem import Problem


@dataclass(frozen=True)
class Stage:
    node: str
    first: int                     # first layer (inclusive)
    last: int                      # last layer (exclusive)
    types: tuple[str, ...]         # GGUF type of each layer in [first, last)


@dataclass(frozen=True)
class StagePrediction:
    node: str
    prefill_s: float               # the stage's compute for the whole prompt (the last's with the LM head)
    decode_s: float                # one decode step, batch 1
    step_s: float                  # one decode step at the workload's concurrency
    transfer_s: float              # this stage → next: the request's share of link time (0 for the last)
    memory: int                    # bytes used: weights + KV cache + runtime
    memory_available: int
    group_steps_s: tuple[float, ...] = ()   # one decode step of a group of group_batch(concurrency, g) sessions, g = 1 .. stages


@dataclass(frozen=True)
class Prediction:
    ttft_s: float
    tpot_s: float
    latency_s: float               # ttft + (output − 1) × tpot: the latency objective
    bottleneck_s: float            # busiest stage or hop, seconds per request with `concurrency` in
                                   # flight (its prompt and its share of decode steps): the throughput objective
    tokens_per_s: float            # output tokens / bottleneck, pipeline kept full
    dnll: float                    # predicted ΔNLL (sum of per-layer sensitivities)
    ppl_increase_pct: float
    stages: tuple[StagePrediction, ...]
    links_s: float = 0.0           # a decode step's time on the links: the hops, and the last stage's step round to the first

    def objective(self, kind: str) -> float:
        return self.latency_s if kind == "latency" else self.bottleneck_s

    def decode_groups(self) -> int:
        """Groups the sessions go round the stages in (solver/memory.py decode_groups); one per
        stage for a prediction saved without its group steps."""
        if not self.has_group_steps:
            return max(1, len(self.stages))
        return decode_groups([s.group_steps_s for s in self.stages], self.links_s)

    def group_rounds(self) -> list[float]:
        """A round's seconds in 1 .. stages groups (solver/memory.py group_rounds); [] without group steps."""
        return group_rounds([s.group_steps_s for s in self.stages], self.links_s) if self.has_group_steps else []

    @property
    def has_group_steps(self) -> bool:
        return all(len(s.group_steps_s) == len(self.stages) for s in self.stages)


@dataclass(frozen=True)
class Plan:
    stages: tuple[Stage, ...]
    status: str                    # optimal | feasible (time limit / gap) | infeasible | error
    objective: float               # value of the chosen objective (seconds); nan if none
    bound: float                   # best proven lower bound on it
    gap: float                     # (objective − bound) / objective
    solve_s: float
    solver: str
    message: str = ""              # for infeasible plans: the binding resource, in one sentence
    prediction: Prediction | None = None
    stats: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status in ("optimal", "feasible")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stages"] = [asdict(s) for s in self.stages]
        return d

    def to_json(self) -> str:
        return jsonio.dumps(self.to_dict(), indent=1)


def plan_from_dict(d: dict) -> Plan:
    """Read back a plan JSON, with the prediction it was saved with (if any)."""
    try:
        stages = tuple(Stage(s["node"], int(s["first"]), int(s["last"]), tuple(s["types"])) for s in d["stages"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("not a plan JSON: expected `stages` with node, first, last and types") from None
    prediction = None
    if d.get("prediction"):
        pd = dict(d["prediction"])
        pd["stages"] = tuple(StagePrediction(**sp) for sp in pd.get("stages", ()))
        prediction = Prediction(**{k: (math.inf if v is None and k == "tokens_per_s" else v) for k, v in pd.items()})
    return Plan(stages=stages, status=d.get("status", "feasible"), objective=d.get("objective") or math.nan,
                bound=d.get("bound") or math.nan, gap=d.get("gap") or math.nan, solve_s=d.get("solve_s", 0.0),
                solver=d.get("solver", ""), message=d.get("message", ""), prediction=prediction)


def stages_from_layers(choice: list[tuple[str, str]]) -> list[Stage]:
    """Per-layer (node, type) in layer order, grouped into stages of consecutive layers."""
    stages: list[Stage] = []
    for l, (n, q) in enumerate(choice):
        if stages and stages[-1].node == n:
            last = stages[-1]
            stages[-1] = Stage(n, last.first, l + 1, last.types + (q,))
        else:
            stages.append(Stage(n, l, l + 1, (q,)))
    return stages


def finished(problem: Problem, stages: list[Stage], bound: float, elapsed: float, solver: str,
             stats: dict | None = None) -> Plan:
    """A solved plan: objective recomputed by the cost model, bound clipped to it, the gap,
    and 'optimal' only when the gap is within the requested one (never PuLP's label)."""
    pred = evaluate(problem, stages)
    value = pred.objective(problem.options.objective)
    bound = min(bound, value) if not math.isnan(bound) else -math.inf
    gap = max(0.0, (value - bound) / value) if value > 0 else 0.0
    status = "optimal" if gap <= problem.options.gap + 1e-9 else "feasible"
    return Plan(tuple(stages), status, value, bound, gap, elapsed, solver, "", pred, stats or {})


def evaluate(problem: Problem, stages: tuple[Stage, ...] | list[Stage]) -> Prediction:
    """The cost model's prediction for an ordered list of stages (assumed valid: see violations)."""
    m, w, fleet = problem.model, problem.workload, problem.fleet
    net = C.Network(fleet)
    preds = []
    ttft = tpot = links = 0.0
    bottleneck = 0.0
    dnll = 0.0
    span = C.decode_span(w)
    for i, st in enumerate(stages):
        node = fleet.node(st.node)
        layers = list(zip(range(st.first, st.last), st.types))
        pre = sum(C.prefill_s(node, m.layers[l], q, w) for l, q in layers)
        last = i == len(stages) - 1
        dec = stage_decode_s(problem, st, last, span)

        def step_s(batch: int) -> float:       # one decode step of `batch` sessions (the head: a row each)
            return stage_decode_s(problem, st, last, span, batch) + node.step_overhead_s

        step = step_s(w.concurrency)
        group_steps = tuple(step_s(group_batch(w.concurrency, g)) for g in range(1, len(stages) + 1))
        if last:   # the LM head: one row per request step (cost.head_s)
            pre += C.head_s(node, m, 1)
        dnll += sum(m.layers[l].sensitivity[q] for l, q in layers)
        mem = stage_memory(problem, st, first=i == 0, last=last)
        transfer = 0.0
        ttft += pre + node.step_overhead_s
        tpot += dec + node.step_overhead_s
        busy = sum(C.layer_busy_s(node, m.layers[l], q, w) for l, q in layers) + C.stage_overhead_busy_s(node, w)
        if i == len(stages) - 1:
            busy += C.head_busy_s(node, m, w)
        bottleneck = max(bottleneck, busy)        # the throughput objective's terms (solver/terms.py)
        if i + 1 < len(stages):
            nxt = stages[i + 1].node
            hop_ttft = C.hop_first_s(net, m, w, st.node, nxt)
            hop_tpot = C.hop_next_s(net, m, w, st.node, nxt)
            ttft += hop_ttft
            tpot += hop_tpot
            links += hop_tpot
            transfer = hop_ttft + (w.output_tokens - 1) * hop_tpot
            bottleneck = max(bottleneck, C.hop_busy_s(net, m, w, st.node, nxt))
        preds.append(StagePrediction(st.node, pre, dec, step, transfer, mem, node.memory, group_steps))
    if stages:
        ttft += C.controller_first_s(net, w, stages[0].node) + C.reply_s(net, stages[-1].node)
        ring = C.ring_s(net, stages[-1].node, stages[0].node)
        tpot += ring
        links += ring
    latency = ttft + (w.output_tokens - 1) * tpot
    return Prediction(ttft_s=ttft, tpot_s=tpot, latency_s=latency, bottleneck_s=bottleneck,
                      tokens_per_s=w.output_tokens / bottleneck if bottleneck > 0 else math.inf, dnll=dnll,
                      ppl_increase_pct=100.0 * math.expm1(dnll), stages=tuple(preds), links_s=links)


def stage_decode_s(problem: Problem, st: Stage, last: bool, ctx: float, batch: int = 1) -> float:
    """The stage's compute for a decode step of `batch` sessions whose attention spans `ctx`
    positions: its layers (cost.layer_step_s), and the LM head's rows (a row each) on the last
    stage. A plan's prediction takes it at the workload's mean span (prompt + output / 2);
    the deploy's calibration at its own request's (controller/calibrate.py)."""
    node = problem.fleet.node(st.node)
    layers = sum(C.layer_step_s(node, problem.model.layers[l], q, batch, ctx, decode=True)
                 for l, q in zip(range(st.first, st.last), st.types))
    return layers + (C.head_s(node, problem.model, batch, decode=True) if last else 0.0)


def stage_memory(problem: Problem, st: Stage, first: bool, last: bool) -> int:
    """Bytes the stage needs on its node: the figure the agent admits the shard by (solver/memory.py)."""
    m, w = problem.model, problem.workload
    b = sum(C.layer_bytes(m, l, q, problem.workload) for l, q in zip(range(st.first, st.last), st.types))
    # one stage with both ends of a tied model holds the embedding once (the ILP counts it twice)
    embed = m.embed_bytes if first and not (last and m.tied_embeddings) else 0
    return b + C.runtime_bytes(m, w) + embed + (C.head_bytes(m, w) if last else 0)


def violations(problem: Problem, stages: tuple[Stage, ...] | list[Stage], tol: float = 1e-6) -> list[str]:
    """Every constraint a plan breaks, as sentences (empty list: the plan is valid). The budget
    is met within a relative `tol` (MIP solvers' feasibility tolerance)."""
    out = []
    m, o = problem.model, problem.options
    allowed = set(o.types or m.types)
    expect = 0
    seen = set()
    for i, st in enumerate(stages):
        if st.first != expect or st.last <= st.first:
            out.append(f"stage {i} covers [{st.first}, {st.last}) but should start at layer {expect}")
        expect = st.last
        if len(st.types) != st.last - st.first:
            out.append(f"stage {i} lists {len(st.types)} types for {st.last - st.first} layers")
            continue
        if st.node in seen:
            out.append(f"node {st.node} holds two stages")
        seen.add(st.node)
        if st.node in o.excluded:
            out.append(f"node {st.node} is excluded")
        node = problem.fleet.node(st.node)
        for l, q in zip(range(st.first, st.last), st.types):
            if q not in node.speed or q not in allowed:
                out.append(f"node {st.node} cannot run type {q}")
            elif not m.layers[l].takes(q):
                out.append(f"layer {l} cannot take type {q}")
        mem = stage_memory(problem, st, i == 0, i == len(stages) - 1)
        if mem > node.memory:
            out.append(f"node {st.node} needs {mem} bytes but offers {node.memory}")
    if expect != m.n_layer:
        out.append(f"the stages cover layers up to {expect}, not all {m.n_layer}")
    for n in o.pinned:
        if n not in seen:
            out.append(f"pinned node {n} holds no stage")
    if o.max_stages and len(stages) > o.max_stages:
        out.append(f"{len(stages)} stages exceed the limit of {o.max_stages}")
    if not out:
        dnll = sum(m.layers[l].sensitivity[q] for st in stages for l, q in zip(range(st.first, st.last), st.types))
        if dnll > o.budget * (1 + tol) + tol:
            out.append(f"predicted ΔNLL {dnll:.5f} exceeds the budget {o.budget:.5f}")
    return out
