"""`edgefleet demo`: a whole fleet on this machine, from nothing to generated text.

Starts a controller and four agents with unequal memory caps (sized from the model so that
none can hold it alone) and emulated links, deploys the model with the default placement
request under an accuracy budget, prints the plan, asks a question (a chat message when the
model has a chat template, a plain prompt otherwise), prints the measured speed next to the
prediction, and stops every process it started (also on Ctrl-C or an error).
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from rich.console import Console

from controller.local import local_fleet
from controller.planning import deployed_table

NAMES = ("desk", "laptop", "mini", "pi")
# each agent's share of what the model needs as one stage at its smallest types with the
# default workload: no two agents hold it together (so a plan has at least three stages),
# and all four leave room for the copies a split needs (embedding and head, compute buffers)
SHARES = (0.5, 0.46, 0.42, 0.38)
QUESTION = "Who wrote Romeo and Juliet?"   # answered well by SmolLM2 under every budget tried (1-5 %)
PLAIN_PROMPT = "The function returns"


def agents_for(model: Path) -> list[tuple[str, str]]:
    """Four agents' --memory for stages (+N: beside the agent itself, so that the plan does not
    depend on the agents' own footprint): SHARES of what the model needs as one stage, scaled up
    only as far as a plan within the default budget needs (memory decides that, not speed, so
    the check solves the real problem with uniform speeds)."""
    from controller.deploy import MEMORY_HEADROOM
    from controller.planning import load_profile
    from solver.devices import TypeSpeed
    from solver.fast import solve
    from solver.plan import Stage, stage_memory
    from solver.problem import Fleet, Link, Node, Problem
    from solver.request import Options, PlacementRequest

    profile = load_profile(PlacementRequest(str(model)))
    speed = {q: TypeSpeed(1e9, 1e12) for q in profile.types}
    small = min(profile.types, key=lambda q: profile.layers[0].bytes[q])
    whole = Problem(profile, Fleet((Node("all", 1 << 50, speed),), ()))
    need = stage_memory(whole, Stage("all", 0, profile.n_layer, (small,) * profile.n_layer), True, True)
    for scale in (1.0, 1.25, 1.5, 1.75, 2.0):
        sizes = [int(need * share * scale) for share in SHARES]
        nodes = tuple(Node(n, int(m * MEMORY_HEADROOM), speed) for n, m in zip(NAMES, sizes))
        links = tuple(Link("switch", n, 1e9, 1e-4) for n in NAMES)
        if solve(Problem(profile, Fleet(nodes, links), options=Options(time_limit=10))).ok:
            return [(n, f"+{m // 1024}KiB") for n, m in zip(NAMES, sizes)]
    raise ValueError(f"{model.name} does not split across four local agents within the default budget; "
                     "try a larger --max-ppl-increase")


def prompt_for(model: Path, prompt: str | None) -> tuple[str, list[int]]:
    """(what to show, prompt token ids): the question as a chat message when the model has a
    chat template, else the plain prompt."""
    from agent.tokenizer import Tokenizer
    from controller.chat import chat_tokens

    tok = Tokenizer(model)
    if tok.chat_template:
        text = prompt or QUESTION
        return text + "\n", chat_tokens(tok, [{"role": "user", "content": text}])
    text = prompt or PLAIN_PROMPT
    return text, tok.encode(text)


def run_demo(model: Path, prompt: str | None, max_tokens: int, budget: float, bandwidth: str, latency: str,
             console: Console, keep: Path | None = None) -> None:
    import grpc

    from proto import edgefleet_pb2 as pb
    from proto import edgefleet_pb2_grpc as rpc
    from proto.adapter import placement_pb
    from solver.memory import fmt_bytes
    from solver.plan import plan_from_dict
    from solver.request import Options, PlacementRequest

    agents = agents_for(model)
    shown, ids = prompt_for(model, prompt)
    with tempfile.TemporaryDirectory(prefix="edgefleet-demo-") as tmp:
        work = keep or Path(tmp)
        t_start = time.perf_counter()
        console.print(f"[bold]starting a controller and {len(agents)} agents[/] with "
                      f"{', '.join(fmt_bytes(int(m[1:-3]) * 1024) for _, m in agents)} for stages "
                      f"(emulated links {bandwidth}, {latency})")
        emulate = ("--emulate-bandwidth", bandwidth, "--emulate-latency", latency)
        with local_fleet(work, agents, agent_extra=emulate) as (ctl, _):
            stub = rpc.ControllerStub(grpc.insecure_channel(ctl.address))
            for n in sorted(stub.Status(pb.Empty()).nodes, key=lambda n: NAMES.index(n.node.name)):
                console.print(f"  {n.node.name}: {fmt_bytes(n.node.agent_bytes + n.node.memory_bytes)} "
                              f"({fmt_bytes(n.node.agent_bytes)} agent + {fmt_bytes(n.node.memory_bytes)} stages)")
            console.print(f"fleet up in {time.perf_counter() - t_start:.1f} s; deploying {model.name} "
                          f"with at most {budget:g} % perplexity increase")
            plan_json = ""
            request = PlacementRequest(str(model.resolve()), options=Options(max_ppl_increase=budget))
            for ev in stub.Deploy(placement_pb(request)):
                if ev.phase in ("plan", "push", "done") and (ev.phase != "push" or ev.done == ev.total):
                    console.print(f"  {ev.phase}: {ev.message}")
                plan_json = ev.plan_json or plan_json
            plan = plan_from_dict(json.loads(plan_json))
            t = deployed_table(plan, f"plan: {len(plan.stages)} stages", unit="MiB")
            p = plan.prediction
            t.caption = (f"predicted: {p.tpot_s * 1e3:.1f} ms/token, perplexity +{p.ppl_increase_pct:.2f} % "
                         f"(solver: {plan.status}, {plan.solve_s:.2f} s)")
            console.print(t)
            console.print(shown, end="", style="bold", markup=False, highlight=False)
            t0 = time.perf_counter()
            first = None
            n = 0
            for r in stub.Generate(pb.GenerateRequest(prompt_tokens=ids, max_tokens=max_tokens)):
                first = first or time.perf_counter()
                n += 1
                console.print(r.text, end="", highlight=False, markup=False)
            end = time.perf_counter()
            rate = (n - 1) / (end - first) if n > 1 else 0.0
            console.print(f"\n[bold]{n} tokens[/]: first after {(first - t0) * 1e3:.0f} ms, then {rate:.1f} tokens/s "
                          f"({1e3 / rate if rate else 0:.1f} ms/token measured vs {p.tpot_s * 1e3:.1f} predicted)")
            console.print(f"demo finished in {time.perf_counter() - t_start:.1f} s; stopping the fleet")

