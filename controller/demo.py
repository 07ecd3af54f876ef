"""`edgefleet demo`: a whole fleet on this machine, from nothing to generated text.

Starts a controller and four agents with unequal memory caps and emulated links, deploys
the reference model under an accuracy budget, prints the plan, generates through the
pipeline, prints the measured speed next to the prediction, and stops every process it
started (also on Ctrl-C or an error).
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from rich.console import Console

from controller.local import ServiceProcess, start_agent, start_controller
from controller.planning import deployed_table

# (name, memory cap): no single agent can hold the reference model with the default workload's
# KV cache and compute buffers (23.5 MiB at the least, all layers Q2_K)
DEMO_AGENTS = (("desk", "20MiB"), ("laptop", "16MiB"), ("mini", "14MiB"), ("pi", "12MiB"))


def run_demo(model: Path, prompt: str, max_tokens: int, budget: float, bandwidth: str, latency: str,
             console: Console, keep: Path | None = None) -> None:
    import grpc

    from proto import edgefleet_pb2 as pb
    from proto import edgefleet_pb2_grpc as rpc
    from proto.adapter import placement_pb
    from solver.plan import plan_from_dict
    from solver.request import Options, PlacementRequest

    procs: list[ServiceProcess] = []
    with tempfile.TemporaryDirectory(prefix="edgefleet-demo-") as tmp:
        work = keep or Path(tmp)
        try:
            t_start = time.perf_counter()
            console.print("[bold]starting a controller and 4 agents[/] "
                          f"(emulated links {bandwidth}, {latency}; logs in {work})")
            ctl = start_controller(work)
            procs.append(ctl)
            for name, mem in DEMO_AGENTS:
                procs.append(start_agent(name, work, memory=mem, controller=ctl.address,
                                         extra=("--emulate-bandwidth", bandwidth, "--emulate-latency", latency)))
            stub = rpc.ControllerStub(grpc.insecure_channel(ctl.address))
            deadline = time.monotonic() + 30
            while len([n for n in stub.Status(pb.Empty()).nodes if n.health == "alive"]) < len(DEMO_AGENTS):
                if time.monotonic() > deadline:
                    raise RuntimeError("the agents did not register within 30 s; see the logs in " + str(work))
                time.sleep(0.2)
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
            console.print(f"[bold]{prompt}[/]", end="")
            t0 = time.perf_counter()
            first = None
            n = 0
            for r in stub.Generate(pb.GenerateRequest(prompt=prompt, max_tokens=max_tokens)):
                first = first or time.perf_counter()
                n += 1
                console.print(r.text, end="", highlight=False, markup=False)
            end = time.perf_counter()
            rate = (n - 1) / (end - first) if n > 1 else 0.0
            console.print(f"\n[bold]{n} tokens[/]: first after {(first - t0) * 1e3:.0f} ms, then {rate:.1f} tokens/s "
                          f"({1e3 / rate if rate else 0:.1f} ms/token measured vs {p.tpot_s * 1e3:.1f} predicted)")
            console.print(f"demo finished in {time.perf_counter() - t_start:.1f} s; stopping the fleet")
        finally:
            for proc in reversed(procs):
                proc.terminate()
