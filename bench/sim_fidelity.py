"""Simulator fidelity: the same slice of the Azure conversation trace replayed on a real
local fleet (`edgefleet replay`: a controller and 4 agents with emulated 100 Mbit / 2 ms
links, the reference model) and simulated with the profiles that fleet measured.

    .venv/bin/python bench/sim_fidelity.py [--requests 100] [--time-scale 6] [--length-scale 0.125]

The trace's times are multiplied by --time-scale and its lengths by --length-scale (the
reference model's context is 256 tokens). Prints TTFT, TPOT and E2E (mean, p50, p90) of the
real run and of the simulation, and each error. Targets (issue 6): mean TPOT and mean E2E
within 15 %, p90 within 25 %.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from controller import deploy as D  # noqa: E402
from controller.local import local_fleet  # noqa: E402
from controller.replay import replay  # noqa: E402
from controller.state import State  # noqa: E402
from proto import edgefleet_pb2_grpc as rpc  # noqa: E402
from proto.security import Security  # noqa: E402
from simulations.engine import simulate  # noqa: E402
from simulations.metrics import summarize  # noqa: E402
from simulations.study import TraceSpec, outcomes  # noqa: E402
from solver.problem import problem_for  # noqa: E402
from solver.request import PlacementRequest, Workload  # noqa: E402
from proto.adapter import placement_pb  # noqa: E402
from controller.planning import load_profile  # noqa: E402

MODEL = ROOT / "models" / "reference" / "edgefleet-ref-f16.gguf"
TRACE = ROOT.parent / "shared" / "data" / "AzureLLMInferenceTrace_conv.csv"
AGENTS = (("desk", "+16MiB"), ("laptop", "+12MiB"), ("mini", "+10MiB"), ("pi", "+8MiB"))   # for stages, beside each agent


def simulated(state_path: Path, requests) -> tuple[dict, list]:
    """The simulator on the fleet the controller measured and the plan it deployed."""
    st = State(state_path)
    try:
        dep = st.active()
        model = load_profile(dep.request)
        nodes = [n for n, _ in st.agents()]
        profiles = {n.name: st.profile(n.name, model.sha256) for n in nodes}
        fleet = D.live_fleet(nodes, model, profiles, st.links())
        problem = problem_for(dep.request, model, fleet)
        plan = dep.plan
    finally:
        st.close()
    result = simulate(problem, plan, requests)
    return summarize(outcomes(result), busy_s=result.busy_s, token_times=result.token_times), \
        [s.node for s in plan.stages]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--start", type=float, default=0.0, help="trace seconds to skip")
    ap.add_argument("--time-scale", type=float, default=6.0)
    ap.add_argument("--length-scale", type=float, default=0.125)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--bandwidth", default="100Mbit")
    ap.add_argument("--latency", default="2ms")
    args = ap.parse_args()
    trace = TraceSpec(str(TRACE), args.time_scale, args.start, 0.0, args.requests, args.length_scale, max_total=256)
    requests = trace.load()
    mean_p = sum(r.prompt_tokens for r in requests) / len(requests)
    mean_o = sum(r.output_tokens for r in requests) / len(requests)
    print(f"{len(requests)} requests over {requests[-1].arrival_s:.0f} s, mean prompt {mean_p:.0f} and output "
          f"{mean_o:.0f} tokens")
    emulate = ("--emulate-bandwidth", args.bandwidth, "--emulate-latency", args.latency)
    with tempfile.TemporaryDirectory(prefix="edgefleet-fidelity-") as tmp, \
            local_fleet(Path(tmp), AGENTS, agent_extra=emulate) as (ctl, _):
        stub = rpc.ControllerStub(grpc.insecure_channel(ctl.address))
        request = PlacementRequest(str(MODEL), Workload(round(mean_p), round(mean_o), args.concurrency, 256))
        for _ in stub.Deploy(placement_pb(request)):
            pass
        t0 = time.perf_counter()
        real = summarize(replay(ctl.address, Security(), requests))
        print(f"replayed on the real fleet in {time.perf_counter() - t0:.0f} s")
        sim, stages = simulated(Path(tmp) / "edgefleet.db", requests)
    print(f"plan: {' -> '.join(stages)}; completed real {real['completed']}, simulated {sim['completed']}")
    print(f"{'metric':<10}{'real':>10}{'simulated':>12}{'error':>9}  target")
    worst = {}
    for key, name in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "E2E")):
        for stat in ("mean", "p50", "p90"):
            r, s = real[key][stat], sim[key][stat]
            err = (s - r) / r
            target = {"mean": 0.15, "p90": 0.25}.get(stat) if key != "ttft_s" else None
            mark = "" if target is None else (f"<= {target:.0%} " + ("met" if abs(err) <= target else "NOT met"))
            print(f"{name + ' ' + stat:<10}{r * 1e3:>8.0f}ms{s * 1e3:>10.0f}ms{err:>+9.1%}  {mark}")
            worst[f"{key}.{stat}"] = err
    print(json.dumps({"real": {k: real[k] for k in ("ttft_s", "tpot_s", "e2e_s", "throughput")},
                      "simulated": {k: sim[k] for k in ("ttft_s", "tpot_s", "e2e_s", "throughput")}}))


if __name__ == "__main__":
    main()
