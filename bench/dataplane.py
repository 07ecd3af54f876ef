"""What the data plane saves against gRPC streams between agents: the same chain, both ways.

Three local agents (127.0.0.1, one thread each, no limits) hold SmolLM2 in three stages of
10 layers at the master's type, chained without a controller (the same shards each time);
requests go round as the controller sends them (the first step offers the rest; the last
stage goes on by itself). Agents started with `--data-listen off` send each other their steps
on gRPC Forward streams, the others on their data planes. Rounds alternate the two. For each
it prints the decode speed of one request at a time (the median over the rounds' requests)
and the CPU each agent spends per decode token: in all, in its busiest thread (the compute
thread), and in all its other threads (the transport: reading, writing, hand-offs), from
requests of PROMPT + 64 less as many of PROMPT + 8 tokens.

    .venv/bin/python bench/dataplane.py [--model smollm2-q8_0] [--rounds 3] [--requests 4]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent import weights as W  # noqa: E402
from bench import versus as V  # noqa: E402
from bench.agent_cpu import spent  # noqa: E402
from controller.agents import PipelineStream  # noqa: E402
from controller.generate import generate  # noqa: E402
from controller.local import deploy_chain, start_agent  # noqa: E402
from controller.shards import file_sha256, write_shard  # noqa: E402

PROMPT, LONG, SHORT = 128, 64, 8
STAGES = 3


def one_round(work: Path, shards, data_plane: bool, prompt: list[int], requests: int) -> tuple[list[float], dict]:
    """(decode tok/s of each long request, {agent: (all, compute thread, other threads) CPU s per token})."""
    extra = () if data_plane else ("--data-listen", "off")
    agents = [start_agent(f"s{i}", work, extra=extra) for i in range(STAGES)]
    try:
        deploy_chain(agents, shards, "bench", 2, PROMPT + LONG + 8)
        pipe = PipelineStream(agents[0].address, last=agents[-1].address)
        try:
            def run(n: int) -> float:
                t = []
                for _ in generate(lambda: pipe, prompt, n):
                    t.append(time.perf_counter())
                return (len(t) - 1) / (t[-1] - t[0])

            run(8)      # warm-up
            pids = {a.info["name"]: a.pid for a in agents}
            speeds: list[float] = []
            long = spent(pids, lambda: speeds.extend(run(LONG) for _ in range(requests)))
            short = spent(pids, lambda: [run(SHORT) for _ in range(requests)])
        finally:
            pipe.close()
    finally:
        for a in agents:
            a.terminate()
    tokens = requests * (LONG - SHORT)
    cpu = {}
    for name in long:
        per = {t: (s - short[name].get(t, 0.0)) / tokens for t, s in long[name].items()}
        busiest = max(per.values())
        cpu[name] = (sum(per.values()), busiest, sum(per.values()) - busiest)
    return speeds, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-q8_0", help="smollm2-q8_0 or smollm2-f16")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of each transport, alternated")
    ap.add_argument("--requests", type=int, default=4, help=f"requests of each length ({LONG} and {SHORT}) per round")
    a = ap.parse_args()
    path_fn, master_type, _ = V.models()[a.model]
    master = path_fn()
    n_layer = W.read_config(W.open_master(master)).n_layer
    work = Path(tempfile.mkdtemp(prefix="dataplane-"))
    try:
        bounds = [round(i * n_layer / STAGES) for i in range(STAGES + 1)]
        sha = file_sha256(master)
        shards = [write_shard(master, work / f"stage{i}.gguf", [master_type] * n_layer, bounds[i], bounds[i + 1], sha)
                  for i in range(STAGES)]
        prompt = V.prompt_ids(master, PROMPT)
        results: dict[bool, tuple[list, list]] = {True: ([], []), False: ([], [])}
        for r in range(a.rounds):
            for data_plane in ((True, False) if r % 2 == 0 else (False, True)):
                speeds, cpu = one_round(work / f"r{r}-{int(data_plane)}", shards, data_plane, prompt, a.requests)
                results[data_plane][0].extend(speeds)
                results[data_plane][1].append(cpu)
                print(f"round {r + 1} {'data plane' if data_plane else 'gRPC      '}: "
                      f"{statistics.median(speeds):.1f} tok/s; CPU ms per token, other threads: "
                      + ", ".join(f"{n} {v[2] * 1e3:.2f}" for n, v in cpu.items()), flush=True)
    finally:
        shutil.rmtree(work)
    print(f"\n{a.model}, {STAGES} local agents of {n_layer // STAGES} layers, one thread each; "
          f"{a.rounds} rounds x {a.requests} requests of {PROMPT} + {LONG} tokens per transport (medians)")
    print(f"{'transport':12} {'tok/s':>6}  CPU ms per decode token: agent (compute thread + other threads)")
    for data_plane in (False, True):
        speeds, cpus = results[data_plane]
        names = list(cpus[0])
        per = {n: [statistics.median(c[n][k] for c in cpus) * 1e3 for k in range(3)] for n in names}
        print(f"{'data plane' if data_plane else 'gRPC':12} {statistics.median(speeds):6.1f}  "
              + ", ".join(f"{n} {v[0]:.2f} ({v[1]:.2f} + {v[2]:.2f})" for n, v in per.items())
              + f"; other threads in all {sum(v[2] for v in per.values()):.2f}")


if __name__ == "__main__":
    main()
