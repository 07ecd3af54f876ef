"""Where an agent's CPU goes in a decode step, on an emulated fleet.

The fleet and the deployment are bench/versus.py's run (c) (edgefleet's latency plan, every
layer at the master's type). Requests of a 512-token prompt go through the controller, with
64 and with 8 output tokens, alternately; the difference of the two kinds is decode alone.
For every agent of the plan it prints the CPU seconds per decode token of its process, of its
busiest thread (the compute thread: llama.cpp's kernels and the step's Python around them),
and of all its other threads together (gRPC's reading, writing and polling threads, the
stream readers and the hand-offs between them). Then, for reference, the same layers' forward
pass in this process, one step after another, with nothing else running: the kernels alone.

    .venv/bin/python bench/agent_cpu.py [--fleet unequal4] [--model smollm2-q8_0] [--rounds 2]

Needs root, as bench/versus.py.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent import weights as W  # noqa: E402
from agent.runtime import Settings, Stage, Step  # noqa: E402
from bench import versus as V  # noqa: E402
from bench.emulated import EmulatedFleet, ran_s  # noqa: E402
from controller.shards import write_shard  # noqa: E402

REQUESTS = 4        # requests of each kind per round
SHORT = 8           # output tokens of the short kind


def thread_cpu(pid: int) -> dict[int, float]:
    """Seconds each live thread of a process has run (one that ended meanwhile is left out)."""
    return {int(tid): s for tid in os.listdir(f"/proc/{pid}/task") if (s := ran_s(tid))}


def spent(pids: dict[str, int], run) -> dict[str, dict[int, float]]:
    """Per node, per thread: CPU seconds spent while run() runs."""
    before = {n: thread_cpu(p) for n, p in pids.items()}
    run()
    after = {n: thread_cpu(p) for n, p in pids.items()}
    return {n: {t: s - before[n].get(t, 0.0) for t, s in after[n].items()} for n in pids}


def forward_alone(path: Path, n_tokens: int, sessions: int, context: int) -> float:
    """CPU seconds per one-token step of a stage's forward pass in this process (one thread),
    after a prompt of V.PROMPT tokens: the kernels with nothing else around them."""
    stage = Stage(path, Settings(sessions=sessions, context=context, threads=1, outputs=sessions))
    try:
        rng = np.random.default_rng(0)

        def step(pos: int, n: int) -> Step:
            if stage.takes_tokens:
                return Step(0, pos, tokens=rng.integers(100, 1000, n).astype(np.int32))
            return Step(0, pos, hidden=rng.standard_normal((n, stage.n_embd)).astype(np.float32))

        stage.forward([step(0, V.PROMPT)])
        t0 = time.thread_time()
        for i in range(n_tokens):
            stage.forward([step(V.PROMPT + i, 1)])
        return (time.thread_time() - t0) / n_tokens
    finally:
        stage.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fleet", default="unequal4", help=f"one of {', '.join(V.FLEETS)}")
    ap.add_argument("--model", default="smollm2-q8_0", help="smollm2-q8_0, smollm2-f16 or reference")
    ap.add_argument("--rounds", type=int, default=2, help=f"rounds of {REQUESTS} long and {REQUESTS} short requests")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/agent_cpu.py makes network namespaces and cgroups: run it as root")
    nodes, link = V.fleet_nodes(a.fleet, None)
    path_fn, master_type, _ = V.models()[a.model]
    master = path_fn()
    work = Path(tempfile.mkdtemp(prefix="agent-cpu-"))
    totals: dict[tuple[str, int], dict[int, float]] = {}
    with EmulatedFleet(nodes, link, work / "logs") as fleet:
        ef = V.Edgefleet(fleet, work)
        try:
            plan = ef.deploy(master, master_type, 5.0)
            names = [n.name for n in nodes]
            pids = {s["node"]: ef.agents[names.index(s["node"])].pid for s in plan["stages"]}
            ef.generate(V.prompt_ids(master, 32), 16)      # warm-up
            for r in range(a.rounds):
                for out in (V.OUTPUT, SHORT):
                    got = spent(pids, lambda: [ef.generate(V.prompt_ids(master, V.PROMPT, i), out)
                                               for i in range(REQUESTS)])
                    for node, threads in got.items():
                        acc = totals.setdefault((node, out), {})
                        for t, s in threads.items():
                            acc[t] = acc.get(t, 0.0) + s
        finally:
            ef.stop()
    tokens = a.rounds * REQUESTS * (V.OUTPUT - SHORT)
    stages = plan["stages"]
    print(f"{a.fleet}, {a.model}: {V.split_text(plan)}")
    print(f"CPU ms per decode token ({tokens} tokens: {a.rounds} x {REQUESTS} requests of {V.PROMPT} + {V.OUTPUT} "
          f"less as many of {V.PROMPT} + {SHORT})")
    print(f"{'node':8} {'agent':>7} {'compute thread':>15} {'other threads':>14} {'forward alone':>14}")
    layer_types = [master_type] * W.read_config(W.open_master(master)).n_layer
    for s in stages:
        layer_types[s["first"]:s["last"]] = s["types"]
    for s in stages:
        long, short = totals[(s["node"], V.OUTPUT)], totals[(s["node"], SHORT)]
        per = {t: (long.get(t, 0.0) - short.get(t, 0.0)) / tokens for t in long}
        compute = max(per.values())
        shard = work / f"{s['node']}.gguf"
        write_shard(master, shard, layer_types, s["first"], s["last"])
        alone = forward_alone(shard, V.OUTPUT, V.CONCURRENT, V.PROMPT + V.OUTPUT)
        print(f"{s['node']:8} {sum(per.values()) * 1e3:7.2f} {compute * 1e3:15.2f} "
              f"{(sum(per.values()) - compute) * 1e3:14.2f} {alone * 1e3:14.2f}")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
