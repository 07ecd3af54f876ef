"""The controller's deployments: plan on the live fleet, deploy, undeploy, drain, and fail
over around lost nodes. One of these runs at a time.

Each step is a function of controller/deploy.py; this class strings them together, keeps
the active deployment and its record in the state, and tells the request side
(`on_retired`) when a deployment stops serving.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from controller import calibrate
from controller import deploy as D
from controller.agents import AgentClient, AgentError
from controller.errors import NoDeployment, Refused
from controller.metrics import Metrics
from controller.planning import load_profile
from controller.registry import Registry
from controller.state import Deployment, StageRef, State
from proto import adapter as A
from proto.security import Security
from solver.fast import solve
from solver.plan import Plan, stage_decode_s
from solver.problem import Problem, problem_for
from solver.request import PlacementRequest

log = logging.getLogger(__name__)

Report = Callable[..., None]      # report(phase, message, done=0, total=0, plan_json="")


def quiet(*_args, **_kw) -> None:
    """A report that shows nothing."""


def stage_nodes(dep: Deployment, skip: set[str] = frozenset()) -> list[A.NodeInfo]:
    """The nodes holding a deployment's stages, enough to reach them."""
    return [A.NodeInfo(s.node, s.address, 0, (), 0) for s in dep.stages if s.node not in skip]


def without(request: PlacementRequest, names: list[str], exclude: bool) -> PlacementRequest:
    """The request with these nodes unpinned (and excluded, when `exclude`)."""
    o = request.options
    excluded = tuple(sorted(set(o.excluded) | set(names))) if exclude else o.excluded
    return replace(request, options=replace(o, excluded=excluded,
                                            pinned=tuple(p for p in o.pinned if p not in names)))


class Deployments:
    def __init__(self, state: State, registry: Registry, security: Security, workdir: Path, metrics: Metrics,
                 on_retired: Callable[[str], None] = lambda dep_id: None):
        self.state = state
        self.registry = registry
        self.security = security
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.metrics = metrics
        self.on_retired = on_retired        # a deployment stopped serving: close its streams
        self.active: Deployment | None = state.active()
        self.recoveries: dict[str, float] = {}     # failed deployment id -> seconds until its successor served
        self._lock = threading.Lock()
        registry.on_lost = self._node_lost
        registry.on_back = self._node_back

    # ---------------------------------------------------------- plan

    def plan(self, request: PlacementRequest, report: Report = quiet,
             keep_types: tuple[str, ...] = ()) -> tuple[Problem, Plan, list[A.NodeInfo]]:
        """(problem, plan, live nodes) for the request on the live fleet; nothing is deployed.
        keep_types (one per layer): first try a plan with exactly these types (failover keeps
        the output the same); if the fleet cannot hold them, plan freely."""
        try:
            return self._plan(request, report, keep_types)
        except (ValueError, AgentError) as exc:
            raise Refused(str(exc)) from None

    def _plan(self, request: PlacementRequest, report: Report, keep_types: tuple[str, ...]):
        model_path = Path(request.model)
        if not model_path.is_file():
            raise ValueError(f"model {request.model} does not exist on the controller's machine; "
                             "give the path of a GGUF file there")
        nodes = [n for n in self.registry.usable() if n.name not in request.options.excluded]
        if not nodes:
            raise ValueError("no live agents to plan on; start agents with --controller pointing here "
                             "(see `edgefleet status`)")
        missing = [p for p in request.options.pinned if p not in {n.name for n in nodes}]
        if missing:
            raise ValueError(f"pinned node {missing[0]} is not alive; start it or drop --pin {missing[0]}")
        report("plan", "reading the model and its sensitivity table", 0, 0)
        model = load_profile(request, lambda what, done, total: report("profile", what, done, total))
        fleet = self._live_fleet(nodes, model_path, model, request.options.types or model.types, report)
        # excluded nodes are already left out of the live fleet
        problem = problem_for(replace(request, options=replace(request.options, excluded=())), model, fleet)
        report("plan", f"solving placement on {len(nodes)} nodes", 0, 0)
        plan = solve(replace(problem, model=D.keeping_types(model, keep_types))) if keep_types else None
        if plan is None or not plan.ok:
            plan = solve(problem)
        if not plan.ok:
            raise ValueError(plan.message)
        report("plan", f"{len(plan.stages)} stages, {plan.status}", 1, 1, plan.to_json())
        return problem, plan, nodes

    def _live_fleet(self, nodes: list[A.NodeInfo], model_path: Path, model, types: tuple[str, ...], report: Report):
        sha = model.sha256
        profiles = D.profile_agents(nodes, model_path, sha, model.n_layer, D.profiled_types(model, types),
                                    self.workdir, self.security,
                                    lambda name: self.state.profile(name, sha),
                                    lambda name, t: self.state.save_profile(name, sha, t), report)
        links = D.measure_links(nodes, self.state.links(), self.security, self.state.save_link)
        return D.live_fleet(nodes, model, profiles, links)

    # ---------------------------------------------------------- deploy

    def deploy(self, request: PlacementRequest, report: Report = quiet) -> Deployment:
        with self._lock:
            return self._deploy(request, report, "deploy")

    def _deploy(self, request: PlacementRequest, report: Report, reason: str,
                keep_types: tuple[str, ...] = ()) -> Deployment:
        problem, plan, nodes = self.plan(request, report, keep_types)
        targets = self._push(request, problem, plan, nodes, report)
        dep = Deployment(id=uuid.uuid4().hex[:12], model_path=request.model, model_sha=problem.model.sha256,
                         request=request, plan=plan,
                         stages=tuple(StageRef(n.name, n.address, s.sha256, s.first, s.last, tuple(s.layer_types))
                                      for n, s in targets),
                         status="preparing", created_at=time.time())
        self.state.save_deployment(dep)
        try:
            self._switch(dep, targets, request, report)
        except AgentError as exc:
            self.metrics.deploys.labels(reason, "failed").inc()
            self.state.set_status(dep.id, "failed")
            self.state.event(f"{reason}-failed", f"{exc}; the previous deployment stays active")
            raise Refused(f"{reason} failed and was rolled back ({exc}); the previous deployment stays active") \
                from None
        calibration = self._calibrate(dep, problem, report) if reason == "deploy" else ""
        self._activate(dep, reason, calibration)
        return self.active

    def _calibrate(self, dep: Deployment, problem: Problem, report: Report) -> str:
        """Time one request through the new stages (controller/calibrate.py) and price every
        node's step overhead and decode weight times by what it found; a calibration that
        fails leaves the profiled figures and the deploy goes on. What was measured, in words
        ("" if nothing)."""
        report("calibrate", "timing one request through the stages", 0, 1)
        pred = dep.plan.prediction
        try:
            c = calibrate.run(dep.stages[0].address, dep.stages[-1].address, dep.id, pred.links_s if pred else 0.0,
                              len(dep.stages), dep.request.workload.ctx, self.security)
        except Exception as exc:    # AgentError, or anything else: the deployment still serves
            log.warning("deployment %s: the calibration request failed: %s", dep.id, exc)
            self.state.event("calibrate-failed", f"deployment {dep.id}: the calibration request failed ({exc}); "
                                                 "plans keep the profiled step overheads")
            return ""
        if c is None:
            return ""
        profiles = {n.name: t for n, _ in self.state.agents()
                    if (t := self.state.profile(n.name, dep.model_sha)) is not None and D.STEP in t}
        weights, attention = self._predicted_decode(dep, problem, profiles, c.span)
        factor = c.factor(sum(D.profiled_overhead(profiles[n]) for n in dep.nodes if n in profiles))
        for name, timings in profiles.items():
            self.state.save_profile(name, dep.model_sha, D.calibrated(timings, factor,
                                                                      c.compute_factor(weights, attention)))
        text = c.text(factor, weights, attention)
        report("calibrate", text, 1, 1)
        return text

    @staticmethod
    def _predicted_decode(dep: Deployment, problem: Problem, profiles: dict[str, dict],
                          span: float) -> tuple[float, float]:
        """The cost model's decode step of the deployment's stages at `span` positions, summed:
        (the weights' and the LM head's part as profiled, attention's part). The plan priced
        each node's weight times at its decode factor then: the profiled part is that much less."""
        stages, weights, attention = dep.plan.stages, 0.0, 0.0
        for i, st in enumerate(stages):
            last = i == len(stages) - 1
            none = stage_decode_s(problem, st, last, 0.0)
            weights += none / D.decode_factor(profiles.get(st.node, {}))
            attention += stage_decode_s(problem, st, last, span) - none
        return weights, attention

    def _push(self, request: PlacementRequest, problem: Problem, plan: Plan, nodes: list[A.NodeInfo],
              report: Report) -> list:
        """Build every stage's shard and push it to its node: [(node, shard)] in stage order."""
        by_name = {n.name: n for n in nodes}
        try:
            shards = D.build_shards(Path(request.model), problem.model.sha256, plan, problem.model.n_layer,
                                    self.workdir, report)
            targets = [(by_name[st.node], sh) for st, sh in zip(plan.stages, shards)]
            D.push_all(targets, self.security, report)
        except (ValueError, AgentError) as exc:
            raise Refused(f"building and pushing the shards failed ({exc}); the previous deployment stays "
                          "active") from None
        return targets

    def _switch(self, dep: Deployment, targets: list, request: PlacementRequest, report: Report) -> None:
        """The two-phase switch; an agent that no longer holds its shard intact (it deleted a
        corrupt one) gets it pushed again, once."""
        groups = dep.plan.prediction.decode_groups() if dep.plan.prediction else 0
        try:
            D.switch(dep.id, targets, request.workload, self.security, report, groups)
        except AgentError as exc:
            if exc.code != "NOT_FOUND":
                raise
            log.warning("%s; pushing the shards again", exc)
            report("push", f"{exc}; pushing again", 0, 0)
            D.push_all(targets, self.security, report)
            D.switch(dep.id, targets, request.workload, self.security, report, groups)

    def _activate(self, dep: Deployment, reason: str, calibration: str = "") -> None:
        """The new deployment serves from now; the old one is unloaded where it still is."""
        previous = self.active
        self.metrics.deploys.labels(reason, "ok").inc()
        self.state.activate(dep.id)
        self.active = replace(dep, status="active")
        if previous is not None:
            # nodes of the old plan that are not in the new one still hold it; a lost node is
            # not waited on (it drops the old stage when it answers again: _node_back)
            lost = {x.node.name for x in self.registry.all() if x.lost}
            D.unload_everywhere(previous.id, stage_nodes(previous, skip=set(dep.nodes) | lost), self.security)
            self.on_retired(previous.id)
        pred = dep.plan.prediction
        self.state.event(reason, f"deployment {dep.id}: {Path(dep.model_path).name} on {' -> '.join(dep.nodes)}, "
                                 f"predicted {pred.tpot_s * 1e3:.1f} ms/token, perplexity "
                                 f"+{pred.ppl_increase_pct:.2f} %" + (f"; {calibration}" if calibration else ""))

    def undeploy(self) -> str:
        with self._lock:
            dep = self.active
            if dep is None:
                raise NoDeployment("no deployment is active; nothing to undeploy")
            nodes = stage_nodes(dep)
            missed = D.unload_everywhere(dep.id, nodes, self.security)
            self.state.set_status(dep.id, "retired")
            self.active = None
            self.on_retired(dep.id)
            self.state.event("undeploy", f"deployment {dep.id} unloaded" +
                             (f" (unreachable: {', '.join(missed)})" if missed else ""))
            return f"deployment {dep.id} unloaded from {len(nodes) - len(missed)} of {len(nodes)} nodes"

    def drain(self, name: str) -> str:
        if self.registry.get(name) is None:
            raise Refused(f"no node named {name!r}; see `edgefleet status`")
        with self._lock:
            dep = self.active
            if dep is None or name not in dep.nodes:
                self.registry.set_drained(name, True)
                self.state.event("drain", f"{name} drained")
                return f"{name} drained (it held no stage)"
            self.registry.set_drained(name, True)
            try:
                new = self._deploy(without(dep.request, [name], exclude=True), quiet, "drain")
            except Refused as exc:
                self.registry.set_drained(name, False)
                raise Refused(f"cannot drain {name}: {exc}") from None
            self.state.event("drain", f"{name} drained")
            return f"{name} drained; deployment {new.id} runs on {', '.join(new.nodes)}"

    def resume(self, name: str) -> str:
        """A drained node may take stages again (from the next deploy, drain or failover)."""
        live = self.registry.get(name)
        if live is None:
            raise Refused(f"no node named {name!r}; see `edgefleet status`")
        if not live.drained:
            raise Refused(f"{name} is not drained; nothing to resume")
        self.registry.set_drained(name, False)
        self.state.event("resume", f"{name} may take stages again")
        return f"{name} resumed: the next deploy may place stages on it"

    # ---------------------------------------------------------- failover

    def _node_lost(self, name: str) -> None:
        dep = self.active
        if dep is not None and name in dep.nodes:
            threading.Thread(target=self._recover_quietly, args=(dep.id, f"{name} stopped sending heartbeats"),
                             daemon=True).start()

    def _node_back(self, st: A.AgentState) -> None:
        """A node declared lost answers again: it drops every stage that is not part of the
        active deployment (a retired plan's stage and its sessions would hold its memory)."""
        def drop() -> None:
            with self._lock:
                active = self.active.id if self.active is not None else ""
                stale = sorted({s.deployment_id for s in st.stages if s.deployment_id != active})
                if not stale:
                    return
                failed = [d for d in stale if D.unload_everywhere(d, [st.node], self.security)]
                self.state.event("node-back", f"{st.node.name} dropped the stages of retired deployments "
                                              f"{', '.join(d for d in stale if d not in failed)}"
                                 + (f"; it could not be reached for {', '.join(failed)}" if failed else ""))
        threading.Thread(target=drop, name="node-back", daemon=True).start()

    def _recover_quietly(self, dep_id: str, why: str) -> None:
        try:
            self.recover(dep_id, why)
        except (NoDeployment, Refused) as exc:
            log.error("failover: %s", exc)

    def _unanswered(self, dep: Deployment) -> list[str]:
        """The stages' nodes that do not answer, or answer without the deployment active."""
        dead = []
        for s in dep.stages:
            try:
                with AgentClient(s.address, self.security, s.node, timeout_s=2) as c:
                    if c.state().active_deployment_id != dep.id:
                        dead.append(s.node)     # restarted or lost its stage
            except AgentError:
                dead.append(s.node)
        return dead

    def recover(self, dep_id: str, why: str) -> bool:
        """Re-plan around the stages that do not answer. Returns True if a new deployment is
        active (or another caller already replaced dep_id); raises Refused when the remaining
        fleet cannot hold the model."""
        t0 = time.monotonic()          # the failure is known from here (a missed heartbeat or step)
        with self._lock:
            dep = self.active
            if dep is None:
                raise NoDeployment("no deployment is active")
            if dep.id != dep_id:
                return True
            dead = self._unanswered(dep)
            if not dead:
                return False
            for name in dead:
                self.registry.mark_lost(name, why)
            # the broken deployment cannot serve any more: free its memory on the survivors so
            # that the new stages fit there (a switch otherwise needs room for both)
            D.unload_everywhere(dep.id, stage_nodes(dep, skip=set(dead)), self.security)
            self.on_retired(dep.id)
            try:    # lost nodes are out of registry.usable(); only pins on them must go
                new = self._deploy(without(dep.request, dead, exclude=False), quiet, "failover",
                                   keep_types=dep.types)
            except Refused as exc:
                self.metrics.failovers.labels("failed").inc()
                self.state.event("failover-failed", f"lost {', '.join(dead)}: {exc}")
                raise Refused(f"lost {', '.join(dead)} and cannot re-plan: {exc}") from None
            took = self.recoveries[dep.id] = time.monotonic() - t0
            self.metrics.failovers.labels("ok").inc()
            self.state.event("failover", f"lost {', '.join(dead)} ({why}); deployment {new.id} active after "
                                         f"{took:.2f} s; {same_output(dep, new)}")
            return True


def same_output(old: Deployment, new: Deployment) -> str:
    """What a failover did to the output, in words."""
    if new.types == old.types:
        return "every layer keeps its type, so the output is the one an undisturbed run gives"
    changed = sum(a != b for a, b in zip(old.types, new.types))
    return (f"the survivors cannot hold the old types: {changed} layers changed type, so the output may differ "
            f"(predicted perplexity +{new.plan.prediction.ppl_increase_pct:.2f} %)")
