"""Simulator speed: the whole Azure conversation trace (19,366 requests, ~58 min) on a
4-stage plan of Llama-3.1-8B over four edge devices, at the trace's real arrival times.

    .venv/bin/python bench/simulator.py [--repeats 3]

Prints the plan, the wall time of each run, events processed per second and the
simulated-to-wall-time ratio. Target (issue 6): <= 20 s on the 2-core CI machine.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simulations.study import StudySpec, TraceSpec, prepare  # noqa: E402
from solver.request import PlacementRequest, Workload  # noqa: E402
from simulations.engine import simulate  # noqa: E402
from simulations.metrics import summarize  # noqa: E402
from simulations.study import outcomes  # noqa: E402
from solver.catalog import model_profile  # noqa: E402
from solver.problem import fleet_from_dict  # noqa: E402

TRACE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "AzureLLMInferenceTrace_conv.csv"
FLEET = {"controller": "switch", "network": {"bandwidth": "1Gbit", "latency": "0.5ms"},
         "nodes": [{"name": "mini", "device": "mac-mini-m2-16gb", "memory": "4GiB"},
                   {"name": "laptop", "device": "laptop-16gb", "memory": "4GiB"},
                   {"name": "orin", "device": "jetson-orin-nano-8gb", "memory": "4GiB"},
                   {"name": "pi", "device": "rpi5-8gb", "memory": "4GiB"}]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    spec = StudySpec(model_profile("llama-3.1-8b"), fleet_from_dict(FLEET), TraceSpec(str(TRACE)),
                     PlacementRequest("llama-3.1-8b", Workload(concurrency=16, context=4096)))
    t0 = time.perf_counter()
    problem, plan, requests, events = prepare(spec)
    print(f"trace: {len(requests)} requests over {requests[-1].arrival_s / 60:.1f} min; read and planned in "
          f"{time.perf_counter() - t0:.2f} s")
    print(f"plan: {len(plan.stages)} stages: " + ", ".join(f"{s.node} layers {s.first}-{s.last - 1}" for s in plan.stages))
    walls = []
    for i in range(args.repeats):
        result = simulate(problem, plan, requests, events)
        walls.append(result.wall_s)
        cycles = len(result.token_times)
        print(f"run {i + 1}: {result.wall_s:.2f} s wall for {result.end_s:.0f} s simulated "
              f"({result.end_s / result.wall_s:.0f}x), {cycles} pipeline cycles")
    s = summarize(outcomes(result), busy_s=result.busy_s, token_times=result.token_times)
    print(f"completed {s['completed']}, rejected {s['rejected']} (prompt + output over the 4096-token context), "
          f"{s['throughput']['output_tokens_per_s']:.1f} output tokens/s, mean TTFT {s['ttft_s']['mean']:.0f} s "
          f"(the trace asks ~1170 tokens/s of a fleet that gives {s['throughput']['output_tokens_per_s']:.0f})")
    med = statistics.median(walls)
    print(f"median wall time {med:.2f} s over {len(walls)} runs (target <= 20 s): "
          f"{'met' if med <= 20 else 'NOT met'}; {result.end_s / med:.0f}x real time")


if __name__ == "__main__":
    main()
