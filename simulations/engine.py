"""The discrete-event simulator: a plan's pipeline under a request trace, with what-if events.

The system modelled is the one the agents run (docs/simulator.md):
- the controller admits a request when a KV-cache slot is free and every stage has room for
  its prompt + output tokens; otherwise it waits, first come first served;
- each stage is one compute thread: when it is free it takes the steps queued for it, in
  order, up to MAX_BATCH steps (decode_group steps, for the plan's decode_groups, where the
  first is a decode step: a larger group splits there) and the deployment's batch tokens (a
  first step over that runs alone), and runs them as one batch; a batch's time is the cost
  model's roofline (solver/cost.py) for its prompt and decode tokens, plus the node's step
  overhead;
- steps that leave a stage together travel on together as a *cohort*; a message occupies
  each link of its route for bytes / bandwidth (first come first served) and arrives
  `latency` later; the sampled tokens go from the last stage straight to the controller,
  and the last stage goes on by itself: the next step goes round to the first stage (a
  few bytes; nothing with one stage), while the controller learns of the tokens;
- a failed node stops the pipeline: the solver re-plans on the nodes left, the changed
  shards are pushed from the controller, and in-flight requests are replayed (a prefill of
  prompt + tokens so far), as the controller's failover does.

Events are per cohort and stage, not per token, and a request's tokens are counted from
its cohort's cycle counter, so the cost grows with batches, not with tokens. Deterministic:
no randomness at all (a trace's randomness is in its reader).
"""
from __future__ import annotations

import heapq
import itertools
import math
import time
from collections import deque
from dataclasses import dataclass, replace

import networkx as nx

from solver import cost as C
from solver.cost import compute_s
from solver import memory as M
from solver.memory import MAX_BATCH, decode_group
from solver.plan import Plan, Stage, evaluate, stage_memory
from solver.problem import Fleet, Link, ModelProfile, Node, Problem
from simulations.workload import Request


@dataclass(frozen=True)
class WhatIf:
    at_s: float
    kind: str                   # fail | recover | link | join
    node: str = ""
    other: str = ""             # link: the other end
    bandwidth: float = 0.0      # link: new bytes/s (0 = unchanged)
    latency: float = -1.0       # link: new one-way seconds (< 0 = unchanged)
    joined: Node | None = None  # join: the new node
    link: Link | None = None    # join: how it connects


@dataclass(frozen=True)
class SimOptions:
    max_sequences: int = 0          # KV-cache slots (0 = the plan's workload concurrency)
    replan_s: float = 1.0           # failure detection + solving, before pushes start
    switch_s: float = 0.5           # prepare + activate on the agents
    push_bandwidth: float = 12.5e6  # bytes/s for shard pushes when the fleet has no controller vertex


@dataclass
class Record:
    id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    first_s: float = math.nan       # first token (absolute simulated time)
    done_s: float = math.nan
    status: str = "waiting"         # waiting | running | ok | rejected | failed
    replays: int = 0


@dataclass
class Result:
    records: list[Record]
    token_times: list[tuple[float, int]]       # (time, tokens produced) per cycle
    queue_samples: list[tuple[float, int, int]]  # (time, waiting, running)
    busy_s: dict[str, float]                   # compute seconds per node
    events: list[tuple[float, str]]            # what-if events and their consequences
    plans: list[tuple[float, Plan]]
    end_s: float
    wall_s: float = 0.0


class _Member:
    __slots__ = ("rec", "start_g", "join_cycle", "ctx", "fresh_tokens")

    def __init__(self, rec: Record, start_g: int, join_cycle: int, fresh_tokens: int):
        self.rec = rec
        self.start_g = start_g              # tokens generated before joining this cohort
        self.join_cycle = join_cycle
        self.ctx = rec.prompt_tokens + rec.output_tokens / 2      # decode context (cost model's mean)
        self.fresh_tokens = fresh_tokens    # > 0: this step is a prefill of that many tokens


class _Cohort:
    """Requests whose steps move through the pipeline together."""
    __slots__ = ("members", "cycle", "heap", "ntok", "ctxw", "tiled", "decode_ctx", "fresh")

    def __init__(self):
        self.members: dict[int, _Member] = {}
        self.cycle = 0
        self.heap: list[tuple[int, int]] = []     # (finish cycle, request id)
        self.ntok = 0                             # tokens in the current step
        self.ctxw = 0.0                           # Σ tokens × attention span of the current step
        self.tiled = 0.0                          # the part of ctxw in prompts of FA_TILE_ROWS tokens or more
        self.decode_ctx = 0.0                     # Σ ctx of the members (a decode step's ctxw)
        self.fresh: list[_Member] = []

    def generated(self, m: _Member) -> int:
        return m.start_g + self.cycle - m.join_cycle

    def add(self, m: _Member) -> None:
        self.members[m.rec.id] = m
        heapq.heappush(self.heap, (m.join_cycle + m.rec.output_tokens - m.start_g, m.rec.id))
        self.decode_ctx += m.ctx
        if m.fresh_tokens:
            self.fresh.append(m)
            self.ntok += m.fresh_tokens
            self.ctxw += m.fresh_tokens * m.fresh_tokens / 2
            if m.fresh_tokens >= C.FA_TILE_ROWS:
                self.tiled += m.fresh_tokens * m.fresh_tokens / 2
        else:
            self.ntok += 1
            self.ctxw += m.ctx

    def split(self, k: int) -> "_Cohort":
        """Keep the first k members of a decode step (no prefill) and return the others as a
        cohort of their own, at the same step."""
        rest = _Cohort()
        rest.cycle = self.cycle
        for rid in list(self.members)[k:]:
            rest.add(self.members.pop(rid))
        self.heap = [e for e in self.heap if e[1] in self.members]
        heapq.heapify(self.heap)
        self.decode_ctx = sum(m.ctx for m in self.members.values())
        self.ntok, self.ctxw, self.tiled = len(self.members), self.decode_ctx, 0.0
        return rest

    def absorb(self, other: "_Cohort") -> None:
        fresh = {id(m) for m in other.fresh}
        for m in other.members.values():
            g = other.generated(m)
            nm = _Member(m.rec, g, self.cycle, m.fresh_tokens if id(m) in fresh else 0)
            self.add(nm)


class _StageState:
    __slots__ = ("node", "groups", "head", "overhead", "queue", "busy", "kv_capacity", "kv_used", "index", "busy_s")

    def __init__(self, index: int, node: Node, groups, kv_capacity: int, head: ModelProfile | None = None):
        self.index = index
        self.node = node
        self.groups = groups            # [(count, read_s, flops, attn, prefill_flops, attention_flops,
                                        #   decode_attention_flops, several-token fixed part)]
        self.head = head                # the model, on the last stage (it runs the LM head)
        self.overhead = node.step_overhead_s
        self.queue: list[_Cohort] = []
        self.busy = False
        self.kv_capacity = kv_capacity  # tokens of KV cache the node can hold beside its weights
        self.kv_used = 0
        self.busy_s = 0.0

    def batch_s(self, ntok: int, ctxw: float, rows: int, tiled: float = 0.0) -> float:
        """One batch of ntok tokens whose attention spans ctxw positions in all, `tiled` of them
        in prompts that llama.cpp's tiled attention kernel takes (solver/cost.py:FA_TILE_ROWS),
        with `rows` output rows (one per request): each layer group's time
        (solver/cost.py:compute_s; the tiled part of attention at the prompt's rate, the rest,
        decode steps and short prompts, at the decode's; the fixed part of a step of several
        tokens where measured), the LM head's on the last stage, and the node's step
        overhead. A decode batch costs the cheaper of one step and one step per request, as
        the agent chooses (agent/engine.py:_parts)."""
        compute = self._compute_s(ntok, ctxw, rows, tiled)
        if ntok == rows and ntok > 1:
            compute = min(compute, ntok * self._compute_s(1, ctxw / ntok, 1, 0.0))
        return self.overhead + compute

    def _compute_s(self, ntok: int, ctxw: float, rows: int, tiled: float) -> float:
        total = 0.0
        for n, read, flops, attn, pf, attn_pf, attn_dec, fixed in self.groups:
            if tiled <= 0 or tiled >= ctxw:     # one kernel for all of it (as solver/cost.py:layer_step_s)
                t = compute_s(read, ntok * flops, attn * ctxw, pf, attn_pf if tiled > 0 else attn_dec, fixed, ntok)
            else:
                t = compute_s(read, ntok * flops, attn * tiled, pf, attn_pf, fixed, ntok) + \
                    attn * (ctxw - tiled) / (attn_dec or pf)
            total += n * t
        if self.head is not None:
            total += C.head_s(self.node, self.head, rows)
        return total


def _stage_groups(problem: Problem, st: Stage, node: Node):
    groups: dict[tuple, int] = {}
    for l, q in zip(range(st.first, st.last), st.types):
        lp = problem.model.layers[l]
        s = node.speed[q]
        key = (lp.bytes[q] / s.decode_bytes_per_s, lp.flops, lp.attn_flops_per_ctx, s.prefill_flops,
               s.attention_flops, s.decode_attention_flops, C.fixed_s(lp.bytes[q], s))
        groups[key] = groups.get(key, 0) + 1
    return [(n, *k) for k, n in groups.items()]


def _kv_capacity(problem: Problem, st: Stage, first: bool, last: bool, memory: int) -> int:
    """Tokens of KV cache that fit on the node beside the stage's weights and runtime."""
    layers = [problem.model.layers[l] for l in range(st.first, st.last)]
    per_token = sum(lp.kv_bytes_per_token for lp in layers)
    fixed = stage_memory(problem, st, first, last) - sum(C.kv_bytes(lp, problem.workload) for lp in layers)
    return max(0, (memory - fixed) // per_token) if per_token else 1 << 62


class Simulator:
    def __init__(self, problem: Problem, plan: Plan, requests: list[Request], whatifs: list[WhatIf] = (),
                 options: SimOptions = SimOptions()):
        if not plan.ok or not plan.stages:
            raise ValueError(f"the plan cannot serve: {plan.message or plan.status}")
        self.problem = problem
        self.opts = options
        self.act_bytes = problem.model.act_bytes_per_token
        self.slots = options.max_sequences or problem.workload.concurrency
        self.context = problem.workload.ctx
        self.batch_tokens = M.batch_tokens(problem.workload.prompt_tokens, problem.workload.concurrency)
        self.requests = requests
        self.whatifs = sorted(whatifs, key=lambda w: w.at_s)
        self.fleet = problem.fleet
        self.down: set[str] = set()
        self.records = [Record(r.id, r.arrival_s, r.prompt_tokens, r.output_tokens) for r in requests]
        self.heap: list = []
        self.seq = itertools.count()
        self.epoch = 0
        self.waiting: deque[tuple[Record, int]] = deque()   # (record, tokens already generated)
        self.running = 0
        self.cohorts: set = set()       # cohorts in flight in the current epoch
        self.token_times: list[tuple[float, int]] = []
        self.queue_samples: list[tuple[float, int, int]] = []
        self.busy_s: dict[str, float] = {n.name: 0.0 for n in self.fleet.nodes}
        self.events: list[tuple[float, str]] = []
        self.plans: list[tuple[float, Plan]] = []
        self.serving = False
        self.deploys = 0
        self.links: dict[tuple[str, str], list[float]] = {}   # directed edge -> [bandwidth, latency, free at]
        self._install(plan, 0.0)

    # ------------------------------------------------------------ topology

    def _fold_busy(self) -> None:
        for st in getattr(self, "stages", ()):
            self.busy_s[st.node.name] = self.busy_s.get(st.node.name, 0.0) + st.busy_s
            st.busy_s = 0.0

    def _install(self, plan: Plan, t: float) -> None:
        self._fold_busy()
        self.plan = plan
        self.plans.append((t, plan))
        p = replace(self.problem, fleet=self.fleet)
        self.net = C.Network(self.fleet)
        n = len(plan.stages)
        self.stages = []
        for i, st in enumerate(plan.stages):
            node = self.fleet.node(st.node)
            self.stages.append(_StageState(i, node, _stage_groups(p, st, node),
                                           _kv_capacity(p, st, i == 0, i == n - 1, node.memory),
                                           p.model if i == n - 1 else None))
        self.groups = evaluate(p, plan.stages).decode_groups()    # as the controller tells the agents
        self._routes()
        self.serving = True

    def _routes(self) -> None:
        """Per-hop links of each stage-to-stage route, for per-link queueing."""
        g = self.fleet.graph()
        act = self.problem.model.act_bytes_per_token
        for a, b, d in g.edges(data=True):
            d["_w"] = d["latency"] + act / d["bandwidth"]
        for a, b, d in g.edges(data=True):
            for u, v in ((a, b), (b, a)):
                old = self.links.get((u, v))
                self.links[(u, v)] = [d["bandwidth"], d["latency"], old[2] if old else 0.0]
        self._small_cache: dict[tuple[str, int], float] = {}
        self.route = []             # per stage-to-stage hop: the links, forward
        names = [s.node.name for s in self.stages]
        for a, b in zip(names, names[1:]):
            path = nx.shortest_path(g, a, b, weight="_w")
            self.route.append(list(zip(path, path[1:])))
        # a reply (a few bytes per token) goes from the last stage straight to the controller
        self.first_node, self.last_node = names[0], names[-1]

    def _small_s(self, kind: str, k: int) -> float:
        """Seconds for a small message about k tokens (no queueing), cached per (kind, k) until
        the routes change: "reply", k sampled tokens from the last stage to the controller;
        "ring", a continued step of k tokens round from the last stage to the first; "ctrl", a
        step of k tokens from the controller to the first stage."""
        cached = self._small_cache.get((kind, k))
        if cached is None:
            if kind == "reply":
                cached = C.reply_s(self.net, self.last_node, k)
            elif kind == "ring":
                cached = C.ring_s(self.net, self.last_node, self.first_node, k)
            else:
                cached = (self.net.transfer_s(self.fleet.controller, self.first_node, C.TOKEN_BYTES * k)
                          if self.fleet.controller else 0.0)
            self._small_cache[(kind, k)] = cached
        return cached

    def _send(self, hops, t: float, nbytes: int) -> float:
        for edge in hops:
            link = self.links[edge]
            start = t if t > link[2] else link[2]
            link[2] = start + nbytes / link[0]
            t = link[2] + link[1]
        return t

    # ------------------------------------------------------------ events

    def _push(self, t: float, kind: int, data=None) -> None:
        heapq.heappush(self.heap, (t, next(self.seq), kind, self.epoch, data))

    ARRIVE, STAGE_IN, STAGE_DONE, WHATIF, DEPLOYED, RELEASE = range(6)

    def run(self) -> Result:
        t0 = time.perf_counter()
        for i, r in enumerate(self.requests):
            self._push(r.arrival_s, self.ARRIVE, i)
        for w in self.whatifs:
            self._push(w.at_s, self.WHATIF, w)
        now = 0.0
        heap = self.heap
        pop = heapq.heappop
        while heap:
            now, _, kind, epoch, data = pop(heap)
            if kind == self.STAGE_DONE:
                if epoch == self.epoch:
                    self._stage_done(now, *data)
            elif kind == self.STAGE_IN:
                if epoch == self.epoch:
                    stage = self.stages[data[0]]
                    stage.queue.append(data[1])
                    if not stage.busy:
                        self._start(now, stage)
            elif kind == self.RELEASE:
                if epoch == self.epoch:
                    self._release(data)
                    self._admit(now)
            elif kind == self.ARRIVE:
                self._arrive(now, self.records[data])
            elif kind == self.WHATIF:
                self._whatif(now, data)
            elif kind == self.DEPLOYED:
                if data[0] == self.deploys:     # a later re-plan supersedes this one
                    self._deployed(now, data[1])
        self._fold_busy()
        for rec in self.records:
            if rec.status in ("waiting", "running"):
                rec.status = "failed"
        return Result(self.records, self.token_times, self.queue_samples, self.busy_s, self.events, self.plans, now,
                      time.perf_counter() - t0)

    def _arrive(self, t: float, rec: Record) -> None:
        need = rec.prompt_tokens + rec.output_tokens
        if need > self.context:
            rec.status = "rejected"     # the controller answers 400 (over the deployment's context)
            return
        self.waiting.append((rec, 0))
        self._admit(t)

    def _admit(self, t: float) -> None:
        if not self.serving:
            return
        while self.waiting and self.running < self.slots:
            rec, g = self.waiting[0]
            need = rec.prompt_tokens + rec.output_tokens
            if any(s.kv_used + need > s.kv_capacity for s in self.stages):
                if not any(s.kv_used for s in self.stages):     # it can never fit
                    self.waiting.popleft()
                    rec.status = "rejected"
                    continue
                break
            self.waiting.popleft()
            for s in self.stages:
                s.kv_used += need
            self.running += 1
            rec.status = "running"
            c = _Cohort()
            c.add(_Member(rec, g, 0, rec.prompt_tokens + g))
            self.cohorts.add(c)
            self._push(t + self._small_s("ctrl", c.ntok), self.STAGE_IN, (0, c))
        self.queue_samples.append((t, len(self.waiting), self.running))

    def _start(self, t: float, stage: _StageState) -> None:
        q = stage.queue
        cohort = q.pop(0)
        most = MAX_BATCH
        if not cohort.fresh:        # a decode step: at most decode_group steps, as the agents run it
            most = decode_group(self.running, self.groups)
            if len(cohort.members) > most:
                rest = cohort.split(most)
                self.cohorts.add(rest)
                q.insert(0, rest)
        while (q and len(cohort.members) + len(q[0].members) <= most
               and cohort.ntok + q[0].ntok <= self.batch_tokens):
            other = q.pop(0)
            cohort.absorb(other)
            self.cohorts.discard(other)
        dt = stage.batch_s(cohort.ntok, cohort.ctxw, len(cohort.members), cohort.tiled)
        stage.busy = True
        stage.busy_s += dt
        heapq.heappush(self.heap, (t + dt, next(self.seq), self.STAGE_DONE, self.epoch, (stage.index, cohort)))

    def _stage_done(self, t: float, i: int, cohort: _Cohort) -> None:
        stage = self.stages[i]
        stage.busy = False
        if i + 1 < len(self.stages):
            arrive = self._send(self.route[i], t, self.act_bytes * cohort.ntok)
            heapq.heappush(self.heap, (arrive, next(self.seq), self.STAGE_IN, self.epoch, (i + 1, cohort)))
        else:
            self._cycle_done(t, cohort)
        if stage.queue:
            self._start(t, stage)

    def _cycle_done(self, t: float, c: _Cohort) -> None:
        """The last stage is done with a step of the cohort at t: the controller has the tokens
        a reply later, and the cohort's next step goes round at once."""
        seen = t + self._small_s("reply", len(c.members))
        c.cycle += 1
        self.token_times.append((seen, len(c.members)))
        for m in c.fresh:
            if math.isnan(m.rec.first_s):
                m.rec.first_s = seen
            m.fresh_tokens = 0
        c.fresh = []
        while c.heap and c.heap[0][0] <= c.cycle:
            _, rid = heapq.heappop(c.heap)
            m = c.members.pop(rid)
            m.rec.done_s = seen
            m.rec.status = "ok"
            c.decode_ctx -= m.ctx
            self._push(seen, self.RELEASE, m.rec)     # the controller frees its slot when it has the last token
        if c.members:
            c.ntok = len(c.members)
            c.ctxw, c.tiled = c.decode_ctx, 0.0
            self._push(t + self._small_s("ring", c.ntok), self.STAGE_IN, (0, c))
        else:
            self.cohorts.discard(c)

    def _release(self, rec: Record) -> None:
        need = rec.prompt_tokens + rec.output_tokens
        for s in self.stages:
            s.kv_used -= need
        self.running -= 1

    # ------------------------------------------------------------ what-if

    def _whatif(self, t: float, w: WhatIf) -> None:
        if w.kind == "fail":
            self.down.add(w.node)
            self.events.append((t, f"{w.node} fails"))
            if w.node in {s.node.name for s in self.stages} and self.serving:
                self._stop_serving(t)
                self._replan(t, f"re-plan without {w.node}")
            elif not self.serving:
                self._replan(t, f"re-plan without {w.node}")
        elif w.kind == "recover":
            self.down.discard(w.node)
            self.events.append((t, f"{w.node} is back"))
            if not self.serving and self.plan is None:
                self._replan(t, f"re-plan with {w.node}")
        elif w.kind == "link":
            self.events.append((t, f"link {w.node}-{w.other}: " + ", ".join(
                x for x in ((f"{w.bandwidth * 8 / 1e6:g} Mbit/s" if w.bandwidth else ""),
                            (f"{w.latency * 1e3:g} ms" if w.latency >= 0 else "")) if x)))
            self.fleet = _with_link(self.fleet, w)
            self.net = C.Network(self.fleet)
            self._routes()
        elif w.kind == "join":
            self.fleet = replace(self.fleet, nodes=self.fleet.nodes + (w.joined,),
                                 links=self.fleet.links + ((w.link,) if w.link else ()))
            self.busy_s.setdefault(w.joined.name, 0.0)
            self.events.append((t, f"{w.joined.name} joins"))
            self._replan(t, f"re-plan with {w.joined.name}", keep_serving=True)

    def _stop_serving(self, t: float) -> None:
        """Every in-flight request loses its KV cache and waits to be replayed."""
        self.epoch += 1
        replay = []
        for c in self.cohorts:
            for m in c.members.values():
                replay.append((m.rec, c.generated(m)))
        self.cohorts = set()
        replay.sort(key=lambda x: x[0].id)
        for rec, _ in replay:
            rec.replays += 1
            rec.status = "waiting"
        self.waiting = deque(replay + list(self.waiting))
        self.running = 0
        self.serving = False

    def _replan(self, t: float, why: str, keep_serving: bool = False) -> None:
        from solver.fast import solve

        alive = tuple(n for n in self.fleet.nodes if n.name not in self.down)
        problem = replace(self.problem, fleet=replace(self.fleet, nodes=alive),
                          options=replace(self.problem.options, pinned=tuple(p for p in self.problem.options.pinned
                                                                              if p not in self.down)))
        plan = solve(problem) if alive else None
        if plan is None or not plan.ok:
            self.events.append((t, f"{why}: no plan ({plan.message if plan else 'no node left'}); requests fail"))
            if not keep_serving:
                self.plan = None
                for rec, _ in self.waiting:
                    rec.status = "failed"
                self.waiting.clear()
            return
        old = {(s.node, s.first, s.last, s.types) for s in (self.plan.stages if self.plan else ())}
        shard = {}
        for st in plan.stages:
            if (st.node, st.first, st.last, st.types) not in old:
                nbytes = sum(problem.model.layers[l].bytes[q] for l, q in zip(range(st.first, st.last), st.types))
                if self.fleet.controller:
                    shard[st.node] = self.net.transfer_s(self.fleet.controller, st.node, nbytes)
                else:
                    shard[st.node] = nbytes / self.opts.push_bandwidth
        ready = t + self.opts.replan_s + max(shard.values(), default=0.0) + self.opts.switch_s
        self.events.append((t, f"{why}: {len(plan.stages)} stage{'s' if len(plan.stages) != 1 else ''} on {' -> '.join(s.node for s in plan.stages)}, "
                               f"{len(shard)} shards pushed, serving again at {ready:.1f} s"))
        self.deploys += 1
        self._push(ready, self.DEPLOYED, (self.deploys, plan))

    def _deployed(self, t: float, plan: Plan) -> None:
        if self.serving:            # a join's new plan: the old one served until now
            self._stop_serving(t)
        self._install(plan, t)
        self._admit(t)


def _with_link(fleet: Fleet, w: WhatIf) -> Fleet:
    links = []
    found = False
    for l in fleet.links:
        if {l.a, l.b} == {w.node, w.other}:
            found = True
            l = Link(l.a, l.b, w.bandwidth or l.bandwidth, w.latency if w.latency >= 0 else l.latency)
        links.append(l)
    if not found:
        raise ValueError(f"the fleet has no link between {w.node} and {w.other}")
    return replace(fleet, links=tuple(links))


def simulate(problem: Problem, plan: Plan, requests: list[Request], whatifs: list[WhatIf] = (),
             options: SimOptions = SimOptions()) -> Result:
    return Simulator(problem, plan, requests, whatifs, options).run()

