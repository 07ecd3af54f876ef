"""The controller's behaviour: deploy, undeploy, drain, generate, and failover.

One deploy or failover runs at a time. A request that meets a failed stage waits for the
failover (re-plan on the nodes that answer, push only changed shards, switch), then
replays its tokens from position 0 so that the new stages rebuild its KV cache; a greedy
request's output is the same as without the failure.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from agent.sampling import Sampling
from controller import deploy as D
from controller.agents import AgentClient, AgentError, PipelineStream, StepFailed
from controller.metrics import Metrics
from controller.registry import Registry
from controller.state import Deployment, State
from proto import adapter as A
from proto.security import Security
from solver.fast import solve

log = logging.getLogger(__name__)

RETRYABLE = {"UNAVAILABLE", "NOT_FOUND", "FAILED_PRECONDITION", "CANCELLED", "DEADLINE_EXCEEDED", "INTERNAL"}


class NoDeployment(ValueError):
    pass


class BadRequest(ValueError):
    """A request that cannot be served as asked (the caller must change it)."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


class Busy(RuntimeError):
    """Every KV-cache slot is taken and the waiting queue is full (the caller should retry later)."""


class StopText:
    """Cuts generated text at the first stop sequence. Text that could be the start of a stop
    sequence is held back until it is known not to be one, so no part of a stop is shown."""

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text that may be shown now, whether a stop sequence was reached)."""
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[:min(hits)], True
        keep = max((k for s in self.stops for k in range(1, len(s)) if buf.endswith(s[:k])), default=0)
        self.held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


@dataclass(frozen=True)
class Piece:
    """One generated token and the text it adds (possibly empty: see StopText)."""
    token: int
    text: str
    finish_reason: str = ""     # "", "eos", "stop" (a stop sequence) or "length"
    recovered_s: float = 0.0    # > 0: a failover happened before this token


def stage_nodes(dep: Deployment, skip: set[str] = frozenset()) -> list[A.NodeInfo]:
    """The nodes holding a deployment's stages, enough to reach them."""
    return [A.NodeInfo(s["node"], s["address"], 0, (), 0) for s in dep.stages if s["node"] not in skip]


@dataclass(frozen=True)
class Token:
    token: int
    recovered_s: float = 0.0    # > 0: a failover happened before this token


class Control:
    def __init__(self, state: State, registry: Registry, security: Security, workdir: Path, max_queue: int = 256):
        self.state = state
        self.registry = registry
        self.security = security
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._deploy_lock = threading.Lock()
        self._streams: dict[str, PipelineStream] = {}
        self._streams_lock = threading.Lock()
        self.active: Deployment | None = state.active()
        self._slots = threading.BoundedSemaphore(int(self.active.request["concurrency"]) if self.active else 8)
        self._tokenizers: dict = {}
        self.max_queue = max_queue          # requests that may wait for a KV-cache slot
        self._admitted = 0
        self._admit_lock = threading.Lock()
        registry.on_lost = self._node_lost
        self.last_recovery_s = 0.0
        self.metrics = Metrics(lambda: [(x.node.name, registry.health(x), x.state) for x in registry.all()])

    def tokenizer(self, model_path: str):
        from agent.tokenizer import Tokenizer

        with self._streams_lock:
            if model_path not in self._tokenizers:
                self._tokenizers[model_path] = Tokenizer(model_path)
            return self._tokenizers[model_path]

    # ---------------------------------------------------------- deploy

    def deploy(self, opts: D.DeployOptions, report: Callable = lambda *a: None) -> Deployment:
        with self._deploy_lock:
            return self._deploy(opts, report, "deploy")

    def plan(self, opts: D.DeployOptions, report: Callable = lambda *a: None, keep_types: tuple[str, ...] = ()):
        """(problem, plan, live nodes) for these options on the live fleet; nothing is deployed.
        keep_types (one per layer): first try a plan with exactly these types (failover keeps
        the output the same); if the fleet cannot hold them, plan freely."""
        if not opts.model_path.is_file():
            raise ValueError(f"model {opts.model_path} does not exist on the controller's machine; "
                             "give the path of a GGUF file there")
        nodes = [n for n in self.registry.usable() if n.name not in opts.exclude]
        if not nodes:
            raise ValueError("no live agents to plan on; start agents with --controller pointing here "
                             "(see `edgefleet status`)")
        report("plan", "reading the model and its sensitivity table", 0, 0)
        model = D.model_profile_for(opts)
        sha = model.sha256
        types = tuple(opts.types) or model.types
        profiles = D.profile_agents(nodes, opts.model_path, sha, len(model.layers), types, self.workdir,
                                    self.security, lambda name: self.state.profile(name, sha),
                                    lambda name, t: self.state.save_profile(name, sha, t), report)
        links = D.measure_links(nodes, self.state.links(), self.security, self.state.save_link)
        names = {n.name for n in nodes}
        missing = [p for p in opts.pin if p not in names]
        if missing:
            raise ValueError(f"pinned node {missing[0]} is not alive; start it or drop --pin {missing[0]}")
        # excluded nodes are already left out of the live fleet
        problem = D.make_problem(replace(opts, exclude=()), model, D.live_fleet(nodes, model, profiles, links))
        report("plan", f"solving placement on {len(nodes)} nodes", 0, 0)
        plan = solve(replace(problem, model=D.keeping_types(model, keep_types))) if keep_types else None
        if plan is None or not plan.ok:
            plan = solve(problem)
        if not plan.ok:
            raise ValueError(plan.message)
        report("plan", f"{len(plan.stages)} stages, {plan.status}", 1, 1, plan.to_json())
        return problem, plan, nodes

    def _deploy(self, opts: D.DeployOptions, report: Callable, reason: str,
                keep_types: tuple[str, ...] = ()) -> Deployment:
        problem, plan, nodes = self.plan(opts, report, keep_types)
        model = problem.model
        sha = model.sha256
        by_name = {n.name: n for n in nodes}
        shards = D.build_shards(opts.model_path, sha, plan, len(model.layers), self.workdir, report)
        targets = [(by_name[st.node], sh) for st, sh in zip(plan.stages, shards)]
        D.push_all(targets, self.security, report)
        dep = Deployment(
            id=uuid.uuid4().hex[:12], model_path=str(opts.model_path), model_sha=sha, request=opts.to_dict(),
            plan=plan.to_dict(),
            stages=[{"node": n.name, "address": n.address, "sha256": s.sha256, "first": s.first, "last": s.last,
                     "types": list(s.layer_types)} for n, s in targets],
            status="preparing", created_at=time.time())
        self.state.save_deployment(dep)
        try:
            D.switch(dep.id, targets, opts, self.security, report)
        except AgentError as exc:
            self.metrics.deploys.labels(reason, "failed").inc()
            self.state.set_status(dep.id, "failed")
            self.state.event(f"{reason}-failed", f"{exc}; the previous deployment stays active")
            raise ValueError(f"{reason} failed and was rolled back ({exc}); the previous deployment stays active") \
                from None
        previous = self.active
        self.metrics.deploys.labels(reason, "ok").inc()
        self.state.activate(dep.id)
        self.active = replace(dep, status="active")
        self._slots = threading.BoundedSemaphore(opts.concurrency)
        if previous is not None:
            # nodes of the old plan that are not in the new one still hold it
            left = stage_nodes(previous, skip={n.name for n, _ in targets})
            D.unload_everywhere(previous.id, left, self.security)
            self._close_stream(previous.id)
        pred = plan.prediction
        self.state.event(reason, f"deployment {dep.id}: {opts.model_path.name} on "
                                 f"{' -> '.join(s.node for s in plan.stages)}, predicted {pred.tpot_s * 1e3:.1f} "
                                 f"ms/token, perplexity +{pred.ppl_increase_pct:.2f} %")
        return self.active

    def undeploy(self) -> str:
        with self._deploy_lock:
            dep = self.active
            if dep is None:
                raise NoDeployment("no deployment is active; nothing to undeploy")
            nodes = stage_nodes(dep)
            missed = D.unload_everywhere(dep.id, nodes, self.security)
            self.state.set_status(dep.id, "retired")
            self.active = None
            self._close_stream(dep.id)
            self.state.event("undeploy", f"deployment {dep.id} unloaded" +
                             (f" (unreachable: {', '.join(missed)})" if missed else ""))
            return f"deployment {dep.id} unloaded from {len(nodes) - len(missed)} of {len(nodes)} nodes"

    def drain(self, name: str) -> str:
        if self.registry.get(name) is None:
            raise ValueError(f"no node named {name!r}; see `edgefleet status`")
        with self._deploy_lock:
            self.registry.set_drained(name, True)
            self.state.event("drain", f"{name} drained")
            dep = self.active
            if dep is None or name not in {s["node"] for s in dep.stages}:
                return f"{name} drained (it held no stage)"
            opts = D.with_exclusions(D.DeployOptions.from_dict(dep.request), [name])
            try:
                new = self._deploy(opts, lambda *a: None, "drain")
            except (ValueError, AgentError) as exc:
                self.registry.set_drained(name, False)
                raise ValueError(f"cannot drain {name}: {exc}") from None
            return f"{name} drained; deployment {new.id} runs on {', '.join(s['node'] for s in new.stages)}"

    # ---------------------------------------------------------- failover

    def _node_lost(self, name: str) -> None:
        dep = self.active
        if dep is not None and name in {s["node"] for s in dep.stages}:
            threading.Thread(target=self._recover_quietly, args=(dep.id, f"{name} stopped sending heartbeats"),
                             daemon=True).start()

    def _recover_quietly(self, dep_id: str, why: str) -> None:
        try:
            self.recover(dep_id, why)
        except ValueError as exc:
            log.error("failover: %s", exc)

    def recover(self, dep_id: str, why: str) -> bool:
        """Re-plan around the stages that do not answer. Returns True if a new deployment is
        active (or another caller already replaced dep_id); raises ValueError when the
        remaining fleet cannot hold the model."""
        with self._deploy_lock:
            dep = self.active
            if dep is None:
                raise NoDeployment("no deployment is active")
            if dep.id != dep_id:
                return True
            dead = []
            for s in dep.stages:
                try:
                    with AgentClient(s["address"], self.security, s["node"], timeout_s=2) as c:
                        st = c.state()
                    if st.active_deployment_id != dep.id:
                        dead.append(s["node"])     # restarted or lost its stage
                except AgentError:
                    dead.append(s["node"])
            if not dead:
                return False
            for name in dead:
                self.registry.mark_lost(name, why)
            t0 = time.monotonic()
            # the broken deployment cannot serve any more: free its memory on the survivors so
            # that the new stages fit there (a switch otherwise needs room for both)
            D.unload_everywhere(dep.id, stage_nodes(dep, skip=set(dead)), self.security)
            self._close_stream(dep.id)
            # lost nodes are out of registry.usable(); only pins on them must go
            opts = D.DeployOptions.from_dict(dep.request)
            opts = replace(opts, pin=tuple(p for p in opts.pin if p not in dead))
            old_types = tuple(q for st in dep.plan["stages"] for q in st["types"])
            try:
                new = self._deploy(opts, lambda *a: None, "failover", keep_types=old_types)
            except (ValueError, AgentError) as exc:
                self.metrics.failovers.labels("failed").inc()
                self.state.event("failover-failed", f"lost {', '.join(dead)}: {exc}")
                raise ValueError(f"lost {', '.join(dead)} and cannot re-plan: {exc}") from None
            self.last_recovery_s = time.monotonic() - t0
            self.metrics.failovers.labels("ok").inc()
            new_types = tuple(q for st in new.plan["stages"] for q in st["types"])
            same = ("every layer keeps its type, so the output is the one an undisturbed run gives"
                    if new_types == old_types else
                    f"the survivors cannot hold the old types: {sum(a != b for a, b in zip(old_types, new_types))} "
                    f"layers changed type, so the output may differ (predicted perplexity "
                    f"+{new.plan['prediction']['ppl_increase_pct']:.2f} %)")
            self.state.event("failover", f"lost {', '.join(dead)} ({why}); deployment {new.id} active after "
                                         f"{self.last_recovery_s:.2f} s; {same}")
            return True

    # ---------------------------------------------------------- requests

    def _stream(self, dep: Deployment) -> PipelineStream:
        with self._streams_lock:
            s = self._streams.get(dep.id)
            if s is None or s.broken is not None:
                s = PipelineStream(dep.stages[0]["address"], self.security, dep.id)
                self._streams[dep.id] = s
            return s

    def _close_stream(self, dep_id: str) -> None:
        with self._streams_lock:
            s = self._streams.pop(dep_id, None)
        if s is not None:
            threading.Thread(target=s.close, daemon=True).start()

    def generate(self, prompt: list[int], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, eos: int | None = None) -> Iterator[Token]:
        """Tokens of one request; survives the loss of stages by failover and replay."""
        if self.active is None:
            raise NoDeployment("no deployment is active; run `edgefleet deploy MODEL.gguf` first")
        if not prompt:
            raise BadRequest("the prompt is empty; send at least one token")
        if max_tokens < 1:
            raise BadRequest(f"max_tokens must be at least 1, not {max_tokens}")
        try:
            Sampling(temperature, top_p, seed)
        except ValueError as exc:
            raise BadRequest(f"{exc}; fix the request") from None
        n_vocab = self.tokenizer(self.active.model_path).n_vocab
        bad = [t for t in prompt if not 0 <= t < n_vocab]
        if bad:
            raise BadRequest(f"token id {bad[0]} is outside the model's vocabulary; send ids from 0 to {n_vocab - 1}")
        ctx = int(self.active.request.get("context", 512))
        if len(prompt) + max_tokens > ctx:
            raise BadRequest(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceed the deployment's "
                             f"context of {ctx} tokens; shorten the prompt or lower max_tokens", "context_length_exceeded")
        limit = int(self.active.request["concurrency"]) + self.max_queue
        with self._admit_lock:
            if self._admitted >= limit:
                raise Busy(f"the fleet is at capacity ({limit} requests running or queued); retry later")
            self._admitted += 1
        self.metrics.in_flight.inc()
        try:
            slots = self._slots
            with slots:
                yield from self._generate(prompt, max_tokens, temperature, top_p, seed, eos)
        finally:
            with self._admit_lock:
                self._admitted -= 1
            self.metrics.in_flight.dec()

    def complete(self, model_path: str, prompt: list[int], max_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, stop: Iterable[str] = (), api: str = "grpc",
                 ignore_eos: bool = False) -> Iterator[Piece]:
        """Text generation: token pieces decoded incrementally, ended by EOS, a stop sequence
        (never shown) or max_tokens; counted in the metrics under `api`."""
        tok = self.tokenizer(model_path)
        decoder, stops = tok.stream(), StopText(stop)
        m = self.metrics
        last = time.monotonic()
        n, outcome = 0, "error"
        try:
            eos = None if ignore_eos else tok.eos
            for t in self.generate(prompt, max_tokens, temperature, top_p, seed, eos):
                now = time.monotonic()
                (m.ttft if n == 0 else m.tpot).observe(now - last)
                last = now
                n += 1
                m.generated_tokens.inc()
                text, stopped = stops.feed(decoder.decode(tok.piece(t.token)) if t.token != eos else "")
                reason = "eos" if t.token == eos else "stop" if stopped else "length" if n == max_tokens else ""
                if reason in ("eos", "length"):
                    text += stops.flush()
                yield Piece(t.token, text, reason, t.recovered_s)
                if reason:
                    outcome = "length" if reason == "length" else "stop"
                    return      # closing self.generate() frees the session on the agents
        except (BadRequest, Busy, NoDeployment):
            outcome = "rejected"
            raise
        except GeneratorExit:
            outcome = "cancelled"
            raise
        finally:
            if n:
                m.prompt_tokens.inc(len(prompt))
            m.requests.labels(api, outcome).inc()

    def _generate(self, prompt, max_tokens, temperature, top_p, seed, eos) -> Iterator[Token]:
        sid = uuid.uuid4().hex
        try:
            yield from self._steps(sid, prompt, max_tokens, temperature, top_p, seed, eos)
        except GeneratorExit:   # the caller stopped early: free the session's KV cache now
            dep = self.active
            if dep is not None:
                self._stream(dep).cancel_session(sid)
            raise

    def _steps(self, sid, prompt, max_tokens, temperature, top_p, seed, eos) -> Iterator[Token]:
        produced: list[int] = []
        pos, pending = 0, tuple(prompt)
        replay: list[int] = []      # tokens already produced that new stages must see again
        recovered = 0.0
        attempts = 0
        while len(produced) < max_tokens:
            dep = self.active
            if dep is None:
                raise NoDeployment("the deployment was removed while the request ran")
            last = not replay and len(produced) == max_tokens - 1
            try:
                out = self._stream(dep).step(A.StepIn(sid, pos, tokens=pending, temperature=temperature, top_p=top_p,
                                                      seed=seed, finish=last, deployment_id=dep.id), timeout_s=120)
            except (StepFailed, AgentError) as exc:
                if exc.code not in RETRYABLE or attempts >= 3:
                    raise
                attempts += 1
                t0 = time.monotonic()
                log.warning("request %s: %s; recovering", sid[:8], exc)
                self.recover(dep.id, str(exc))
                recovered += time.monotonic() - t0
                # replay on the new stages in the steps the request was first computed in (the
                # prompt at once, then one token a step): llama.cpp's sums depend on a batch's
                # shape, so only the same steps rebuild the very same KV cache and output
                pos, pending, replay = 0, tuple(prompt), list(produced)
                continue
            attempts = 0
            if replay:              # this step recomputed a token the caller already has
                pos, pending = pos + len(pending), (replay.pop(0),)
                continue
            self.metrics.observe_stages(out.stage_times)
            produced.append(out.token)
            yield Token(out.token, recovered)
            recovered = 0.0
            if out.token == eos:
                if not last:
                    self._stream(dep).cancel_session(sid)
                return
            pos, pending = len(prompt) + len(produced) - 1, (out.token,)
