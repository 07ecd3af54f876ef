"""Pipeline benchmark: the reference model split over local agent processes.

Prints
1. one request at a time: time per output token vs the sum of the stages' compute times
   (the pipeline's overhead ratio: gRPC, serialization, thread hand-offs);
2. tokens/s with 1, 2, 4 and 8 concurrent requests (decode steps batched inside stages);
3. with emulated links (default 100 Mbit/s, 5 ms per message): measured TTFT and time per
   output token vs the cost model's prediction from the agents' own Profile timings.

    .venv/bin/python bench/pipeline.py [--agents 4] [--types Q8_0] [--json]

All agents share this machine's cores, so concurrency figures are bounded by them (the
machine's core count is printed).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from agent.pipeline import split_evenly  # noqa: E402
from controller.agents import AgentClient, PipelineStream  # noqa: E402
from controller.generate import generate  # noqa: E402
from controller.local import deploy_chain, start_agent  # noqa: E402
from controller.planning import gguf_profile  # noqa: E402
from controller.shards import file_sha256, parse_types, write_shard  # noqa: E402
from solver.plan import Stage, evaluate  # noqa: E402
from solver.problem import Fleet, Link, Node, Problem, Workload, measured_speed  # noqa: E402
from solver.units import parse_quantity  # noqa: E402

MODEL = ROOT / "models" / "reference" / "edgefleet-ref-f16.gguf"
console = Console(width=120)


def prompts(n: int, length: int) -> list[list[int]]:
    return [[1] + [(37 * i + 11 * k) % 3000 + 100 for k in range(length - 1)] for i in range(n)]


def stream(agents) -> PipelineStream:
    """A pipeline stream as the controller opens one: into the first agent, answered by the last."""
    return PipelineStream(agents[0].address, last=agents[-1].address)


def one_request(agents, prompt: list[int], tokens: int) -> dict:
    """Wall time per step and the stages' compute time per step of one greedy request."""
    pipe = stream(agents)
    try:
        walls, computes = [], []
        t = time.perf_counter()
        for out in generate(lambda: pipe, prompt, tokens):
            now = time.perf_counter()
            walls.append(now - t)
            computes.append(sum(s.compute_seconds for s in out.stage_times))
            t = now
    finally:
        pipe.close()
    return {"ttft": walls[0], "tpot": statistics.mean(walls[1:]), "decode_compute": statistics.mean(computes[1:]),
            "prefill_compute": computes[0]}


def concurrent(agents, n: int, prompt_len: int, tokens: int) -> float:
    pipe = stream(agents)
    counts = [0] * n

    def run(i, p):
        for _ in generate(lambda: pipe, p, tokens):
            counts[i] += 1

    threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(prompts(n, prompt_len))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    pipe.close()
    return sum(counts) / dt


def median_runs(agents, prompt: list[int], tokens: int, repeats: int) -> dict:
    runs = [one_request(agents, prompt, tokens) for _ in range(repeats)]
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def predict(agents, shards, timings, prompt: int, tokens: int, bandwidth: float, latency: float) -> dict:
    """The cost model's TTFT and TPOT for this exact deployment, from measured node speeds."""
    model = gguf_profile(MODEL, None)
    nodes, stages = [], []
    for a, s, t in zip(agents, shards, timings):
        q = s.layer_types[0]
        speed = {q: measured_speed(model.layers[s.first], q, t.decode_seconds_per_layer,
                                   t.prefill_seconds_per_layer_token, t.decode_attention_seconds_per_position,
                                   t.prefill_attention_seconds_per_position, t.batch_fixed_seconds_per_layer)}
        name = a.info["name"]
        nodes.append(Node(name, 2 ** 30, speed))
        stages.append(Stage(name, s.first, s.last, s.layer_types))
    names = [n.name for n in nodes]
    links = [Link(x, y, bandwidth, latency) for x, y in zip(names, names[1:])]
    # the benchmark process sends to the first agent unshaped; the last agent's answers come
    # straight back to it, shaped by that agent's emulated link
    links += [Link("bench", names[0], bandwidth, 0.0), Link("bench", names[-1], bandwidth, latency)]
    problem = Problem(model, Fleet(tuple(nodes), tuple(links), controller="bench"),
                      Workload(prompt_tokens=prompt, output_tokens=tokens, concurrency=1, context=0))
    p = evaluate(problem, stages)
    return {"ttft": p.ttft_s, "tpot": p.tpot_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--types", default="Q8_0", help="one type for all layers, or one per layer")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrency", default="1,2,4,8")
    ap.add_argument("--bandwidth", default="100Mbit")
    ap.add_argument("--latency", default="5ms")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from agent import weights as W

    n_layer = W.read_config(W.open_gguf(MODEL)).n_layer
    types = parse_types(args.types, n_layer)
    bw, lat = parse_quantity(args.bandwidth, "--bandwidth"), parse_quantity(args.latency, "--latency")
    levels = [int(x) for x in args.concurrency.split(",")]
    context = args.prompt + args.tokens + 8
    prompt = prompts(1, args.prompt)[0]
    result: dict = {"agents": args.agents, "types": args.types, "cores": os.cpu_count(),
                    "prompt": args.prompt, "tokens": args.tokens}
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        tmp = Path(tmp)
        master = file_sha256(MODEL)
        shards = [write_shard(MODEL, tmp / f"stage{i}.gguf", types, a, b, master)
                  for i, (a, b) in enumerate(split_evenly(n_layer, args.agents))]

        console.print(f"[bold]{args.agents} local agents[/], layers {[f'{s.first}-{s.last - 1}' for s in shards]}, "
                      f"{args.types}, {os.cpu_count()} cores")
        agents = [start_agent(f"a{i}", tmp) for i in range(args.agents)]
        try:
            deploy_chain(agents, shards, "bench", 16, context)
            timings = []
            for a, s in zip(agents, shards):
                with AgentClient(a.address) as c:
                    timings.append(c.profile([s.layer_types[0]], prefill_tokens=args.prompt, repeats=7).timings[0])
            single = median_runs(agents, prompt, args.tokens, args.repeats)
            result["single"] = single
            result["overhead_ratio"] = single["tpot"] / single["decode_compute"]
            result["tokens_per_s"] = {c: concurrent(agents, c, args.prompt, args.tokens) for c in levels}
        finally:
            for a in agents:
                a.terminate()

        shaped = ("--emulate-bandwidth", args.bandwidth, "--emulate-latency", args.latency)
        agents = [start_agent(f"e{i}", tmp, extra=shaped) for i in range(args.agents)]
        try:
            deploy_chain(agents, shards, "bench", 16, context)
            measured = median_runs(agents, prompt, args.tokens, args.repeats)
        finally:
            for a in agents:
                a.terminate()
        predicted = predict(agents, shards, timings, args.prompt, args.tokens, bw, lat)
        result["emulated"] = {"bandwidth": args.bandwidth, "latency": args.latency, "measured": measured,
                              "predicted": predicted}

    if args.json:
        print(json.dumps(result, indent=2))
        return
    t = Table(title="one request at a time (no emulation)")
    for col in ("TTFT ms", "time/token ms", "Σ stage compute/token ms", "overhead ratio"):
        t.add_column(col, justify="right")
    t.add_row(f"{single['ttft'] * 1e3:.1f}", f"{single['tpot'] * 1e3:.2f}", f"{single['decode_compute'] * 1e3:.2f}",
              f"{result['overhead_ratio']:.2f}")
    console.print(t)
    t = Table(title=f"concurrent requests ({args.tokens} tokens each)")
    t.add_column("in flight", justify="right")
    t.add_column("tokens/s", justify="right")
    for c, v in result["tokens_per_s"].items():
        t.add_row(str(c), f"{v:.1f}")
    console.print(t)
    t = Table(title=f"emulated links {args.bandwidth}, {args.latency}: measured vs cost model")
    for col in ("", "measured ms", "predicted ms", "error"):
        t.add_column(col, justify="right")
    for k, label in (("ttft", "TTFT"), ("tpot", "time/token")):
        m, p = measured[k], predicted[k]
        t.add_row(label, f"{m * 1e3:.2f}", f"{p * 1e3:.2f}", f"{100 * (p - m) / m:+.1f} %")
    console.print(t)


if __name__ == "__main__":
    main()
