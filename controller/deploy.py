"""Deploying a model on the live fleet: profile, plan, build shards, push, two-phase switch.

Each step is a function; `controller/service.py` strings them together and reports
progress. Any failure before the switch unloads what was prepared, so the previous
deployment stays active and serving.
"""
from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from controller.agents import AgentClient, AgentError
from controller.shards import ShardInfo, file_sha256, write_shard
from proto.adapter import NodeInfo
from proto.security import Security
from solver.ggml_types import TYPE_ORDER
from solver.memory import batch_tokens
from solver.plan import Plan
from solver.problem import Fleet, Link, ModelProfile, Node, Workload, measured_speed

log = logging.getLogger(__name__)

CONTROLLER_VERTEX = "controller"
MEMORY_HEADROOM = 0.98      # plan with 2 % less than offered: norms, allocator slack
PROBE_BYTES = 256 * 1024    # bandwidth probe between agents


# a node's step overhead, kept with its timings as [s, Profile's step_overhead_seconds, decode
# factor]: the first is what the cost model prices, the Profile RPC's figure or, once a
# deployment was calibrated (controller/calibrate.py), that figure times the calibration's
# factor if larger; the third (1 where absent) multiplies the node's profiled decode times
STEP = "step"


def profiled_overhead(timings: dict) -> float:
    """The Profile RPC's step overhead in a node's timings (profiles kept before calibration
    held it first, and 0 second)."""
    step = timings[STEP]
    return step[1] if len(step) > 1 and step[1] > 0 else step[0]


def decode_factor(timings: dict) -> float:
    """What the node's profiled decode times are priced at, times (1: not calibrated)."""
    step = timings.get(STEP, ())
    return step[2] if len(step) > 2 else 1.0


def calibrated(timings: dict, factor: float, decode: float = 1.0) -> dict:
    """The node's timings with its profiled step overhead priced `factor` times and its
    profiled decode weight times `decode` times (priced), each never less than profiled."""
    profiled = profiled_overhead(timings)
    return {**timings, STEP: (max(profiled, factor * profiled), profiled, max(1.0, decode))}


def priced(t: tuple, decode: float) -> tuple:
    """A type's profiled timings (decode s/layer, prefill s/layer-token, decode attention
    s/position, prefill attention s/position, several-token step's fixed part s/layer) with
    the decode step's weight times (a layer's decode, the fixed part) `decode` times; not
    attention (controller/calibrate.py)."""
    return tuple(x * decode if i in (0, 4) else x for i, x in enumerate(t))


def probe_layers(n_layer: int) -> tuple[int, int]:
    """The one layer agents time for a model: a middle layer (no embedding or head to carry)."""
    return (1, 2) if n_layer > 2 else (0, 1)


def profiled_types(model: ModelProfile, types: tuple[str, ...]) -> tuple[str, ...]:
    """The types agents time a layer at: the plan's, and the LM head's (the node's speed at it
    times the head on the last stage, solver/cost.py:head_s) where a layer can take it."""
    return types if model.head_type in types or model.head_type not in TYPE_ORDER else (*types, model.head_type)


def profile_agents(nodes: list[NodeInfo], model: Path, model_sha: str, n_layer: int, types: tuple[str, ...],
                   workdir: Path, security: Security, known: Callable[[str], dict | None],
                   save: Callable[[str, dict], None], report: Callable) -> dict[str, dict]:
    """Per node {type: (decode s/layer, prefill s/layer-token, decode attention s/position,
    prefill attention s/position, several-token step's fixed part s/layer), STEP: (step overhead
    s, 0)}, measuring where not known (or known only from an agent that did not time
    attention and several-token steps apart)."""
    first, last = probe_layers(n_layer)
    out, todo = {}, []
    for n in nodes:
        t = known(n.name)
        if t is not None and set(types) | {STEP} <= set(t) and all(len(t[q]) == 5 for q in types):
            out[n.name] = t
        else:
            todo.append(n)
    if not todo:
        return out
    probe = workdir / f"probe-{model_sha[:16]}-{first}.gguf"
    if not probe.exists():
        write_shard(model, probe, ["F16"] * n_layer, first, last, model_sha)
    sha = file_sha256(probe)

    def one(n: NodeInfo):
        with AgentClient(n.address, security, n.name) as c:
            c.push_shard(probe, sha)
            res = c.profile(list(types), prefill_tokens=64, sha=sha, repeats=3)
        timings = {t.gguf_type: (t.decode_seconds_per_layer, t.prefill_seconds_per_layer_token,
                                 t.decode_attention_seconds_per_position, t.prefill_attention_seconds_per_position,
                                 t.batch_fixed_seconds_per_layer)
                   for t in res.timings}
        overhead = res.step_overhead_seconds or Node.step_overhead_s
        timings[STEP] = (overhead, overhead)
        return n.name, timings

    # one agent at a time: agents sharing a machine (a one-machine fleet) would slow each other
    report("profile", f"timing a layer at {len(types)} types on {len(todo)} agents", 0, len(todo))
    for i, n in enumerate(todo):
        name, timings = one(n)
        save(name, timings)
        out[name] = timings
        report("profile", f"profiled {name}", i + 1, len(todo))
    return out


def measure_links(nodes: list[NodeInfo], known: dict[tuple[str, str], tuple[float, float]], security: Security,
                  save: Callable[[str, str, float, float], None]) -> dict[tuple[str, str], tuple[float, float]]:
    """RTT and bandwidth between every pair of agents (once per pair), and controller to each."""
    out = dict(known)
    for i, a in enumerate(nodes):
        pairs = [b for b in nodes[i + 1:] if (a.name, b.name) not in out and (b.name, a.name) not in out]
        for b in pairs:
            with AgentClient(a.address, security, a.name) as c:
                r = c.profile(peer=b.address, probe_bytes=PROBE_BYTES, link_only=True)
            out[(a.name, b.name)] = (r.rtt_seconds, r.bandwidth_bytes_per_second)
            save(a.name, b.name, r.rtt_seconds, r.bandwidth_bytes_per_second)
    for n in nodes:
        key = (CONTROLLER_VERTEX, n.name)
        if key not in out:
            with AgentClient(n.address, security, n.name) as c:
                rtt = c.round_trip_s()
            out[key] = (rtt, 1e9)
            save(CONTROLLER_VERTEX, n.name, rtt, 1e9)
    return out


def live_fleet(nodes: list[NodeInfo], model: ModelProfile, profiles: dict[str, dict],
               links: dict[tuple[str, str], tuple[float, float]]) -> Fleet:
    first, _ = probe_layers(len(model.layers))
    layer = model.layers[first]
    fleet_nodes = []
    for n in nodes:
        decode = decode_factor(profiles[n.name])
        speed = {q: measured_speed(layer, q, *priced(t, decode)) for q, t in profiles[n.name].items()
                 if q in n.gguf_types}
        overhead = profiles[n.name].get(STEP, (Node.step_overhead_s,))[0]
        fleet_nodes.append(Node(n.name, int(n.memory_bytes * MEMORY_HEADROOM), speed, step_overhead_s=overhead,
                                address=n.address))
    names = {n.name for n in nodes} | {CONTROLLER_VERTEX}
    fleet_links = tuple(Link(a, b, max(bw, 1.0), max(rtt / 2, 0.0)) for (a, b), (rtt, bw) in links.items()
                        if a in names and b in names)
    return Fleet(tuple(fleet_nodes), fleet_links, controller=CONTROLLER_VERTEX)


def keeping_types(model: ModelProfile, types: tuple[str, ...]) -> ModelProfile:
    """The model with every type but types[l] ruled out for layer l: its ΔNLL set far above any
    budget (1 nat per token), so a plan within the budget keeps each layer's type."""
    if len(types) != len(model.layers):
        return model
    layers = tuple(replace(lp, sensitivity={q: (v if q == keep else 1.0) for q, v in lp.sensitivity.items()})
                   for lp, keep in zip(model.layers, types))
    return replace(model, layers=layers)


def build_shards(model: Path, model_sha: str, plan: Plan, n_layer: int, workdir: Path,
                 report: Callable) -> list[ShardInfo]:
    """One shard per stage, named by its content so that identical stages are built once."""
    out = []
    for i, st in enumerate(plan.stages):
        types = ["F16"] * n_layer
        types[st.first:st.last] = st.types
        key = f"{model_sha[:16]}-{st.first}-{st.last}-{'.'.join(st.types)}"
        path = workdir / f"shard-{uuid.uuid5(uuid.NAMESPACE_URL, key).hex}.gguf"
        report("build", f"stage {i}: layers {st.first}-{st.last - 1} for {st.node}", i, len(plan.stages))
        if path.exists():
            out.append(ShardInfo(path, file_sha256(path), st.first, st.last, tuple(st.types), path.stat().st_size))
        else:
            out.append(write_shard(model, path, types, st.first, st.last, model_sha))
    report("build", f"{len(out)} shards ready", len(out), len(out))
    return out


def push_all(targets: list[tuple[NodeInfo, ShardInfo]], security: Security, report: Callable) -> int:
    """Push every stage's shard in parallel; returns the bytes that crossed the wire."""
    total = sum(s.bytes for _, s in targets)
    done = [0]

    def progress(n: int) -> None:
        done[0] += n
        report("push", "pushing shards", done[0], total)

    def one(item):
        node, shard = item
        with AgentClient(node.address, security, node.name, timeout_s=120) as c:
            return c.push_shard(shard.path, shard.sha256, progress)

    with ThreadPoolExecutor(max(1, len(targets))) as ex:
        sent = sum(ex.map(one, targets))
    report("push", f"{sent:,} bytes sent ({total - sent:,} already on the agents)", total, total)
    return sent


def next_address(addresses: list[str], i: int) -> str:
    """Where stage i sends its steps on: the next stage's agent; the last stage of several
    sends its continued steps round to the first (agent/server.py); one stage, nowhere."""
    return addresses[(i + 1) % len(addresses)] if len(addresses) > 1 else ""


def switch(deployment_id: str, targets: list[tuple[NodeInfo, ShardInfo]], w: Workload, security: Security,
           report: Callable, groups: int = 0) -> None:
    """Prepare every stage, then activate every stage; on a prepare failure unload what was
    prepared (the previous deployment stays active) and raise AgentError. groups: the groups
    the sessions go round the stages in (the plan's Prediction.decode_groups; 0: one per
    stage)."""
    prepared: list[NodeInfo] = []
    batch = batch_tokens(w.prompt_tokens, w.concurrency)   # as the plan's memory assumed
    try:
        for i, (node, shard) in enumerate(targets):
            nxt = next_address([n.address for n, _ in targets], i)
            with AgentClient(node.address, security, node.name) as c:
                c.prepare(deployment_id, shard.sha256, nxt, w.concurrency, w.ctx, batch, groups=groups or len(targets))
            prepared.append(node)
            report("prepare", f"{node.name} loaded layers {shard.first}-{shard.last - 1}", i + 1, len(targets))
    except AgentError:
        for node in prepared:
            try:
                with AgentClient(node.address, security, node.name, timeout_s=10) as c:
                    c.unload(deployment_id)
            except AgentError as exc:
                log.warning("rollback: %s", exc)
        raise
    for i, (node, _) in enumerate(targets):
        with AgentClient(node.address, security, node.name) as c:
            c.activate(deployment_id)
        report("activate", f"{node.name} active", i + 1, len(targets))


def unload_everywhere(deployment_id: str, nodes: list[NodeInfo], security: Security) -> list[str]:
    """Unload a deployment from every reachable node; returns the nodes that could not be reached."""
    missed = []
    for n in nodes:
        try:
            with AgentClient(n.address, security, n.name, timeout_s=10) as c:
                c.unload(deployment_id)
        except AgentError:
            missed.append(n.name)
    return missed
