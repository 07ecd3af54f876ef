"""A stage's decode step with its memory in 4 KiB pages and in huge pages (agent/runtime.py,
use_huge_pages), on SmolLM2's real layers.

Each stage is a shard of SmolLM2 (F16 and Q8_0): 13 middle layers (1-14), and the last 3
layers with the LM head (27-30). Each is loaded in a process of its own, once with
use_huge_pages turned off (4 KiB pages, as before) and once as the agent loads it, in turns,
`--rounds` times. A step is one token of one session after a 512-token prompt, one thread;
its CPU time is the median of 60 steps back to back and of 60 steps each after 20 ms idle,
as a pipeline stage waits between the steps of one request. Resident memory after the steps
shows what huge pages cost in memory.

    .venv/bin/python bench/huge_pages.py [--rounds 4]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STAGES = ((1, 14), (27, 30))
STEPS, IDLE_S, PROMPT = 60, 0.02, 512


def measure(path: str, huge: bool) -> dict:
    """In this process: the stage's step CPU (back to back, after idle) and resident memory."""
    import numpy as np

    from agent import runtime
    from agent.runtime import Settings, Stage, Step

    if not huge:
        runtime.use_huge_pages = lambda: 0
    stage = Stage(path, Settings(sessions=8, context=PROMPT + 64, threads=1, outputs=8))
    rng = np.random.default_rng(0)
    stage.forward([Step(0, 0, hidden=rng.standard_normal((PROMPT, stage.n_embd)).astype(np.float32))])
    x = rng.standard_normal((1, stage.n_embd)).astype(np.float32)
    out = {}
    for name, idle in (("back_to_back", 0.0), ("after_idle", IDLE_S)):
        times = []
        for _ in range(STEPS):
            if idle:
                time.sleep(idle)
            t0 = time.thread_time()
            stage.forward([Step(0, PROMPT, hidden=x)])
            times.append(time.thread_time() - t0)
        out[name] = statistics.median(times)
    rollup = Path("/proc/self/smaps_rollup").read_text().splitlines()
    out["rss"] = next(int(line.split()[1]) * 1024 for line in rollup if line.startswith("Rss:"))
    out["huge"] = next(int(line.split()[1]) * 1024 for line in rollup if line.startswith("AnonHugePages:"))
    stage.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4, help="turns of both page sizes per stage")
    ap.add_argument("--measure", nargs=2, metavar=("SHARD", "HUGE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.measure:
        print(json.dumps(measure(a.measure[0], a.measure[1] == "1")))
        return
    from agent import weights as W
    from controller.shards import write_shard
    from models import smollm2

    print(f"CPU ms of one decode step, one thread, the median of {STEPS} (back to back; after "
          f"{IDLE_S * 1e3:.0f} ms idle), 4 KiB pages against huge pages; {a.rounds} rounds in turns")
    print(f"{'stage':22} {'4 KiB':>15} {'huge':>15} {'change':>15}  resident MB (in huge pages)")
    with tempfile.TemporaryDirectory(prefix="huge-pages-") as d:
        for qtype in ("F16", "Q8_0"):
            master = smollm2.path(qtype)
            n_layer = W.read_config(W.open_master(master)).n_layer
            for first, last in STAGES:
                shard = Path(d) / f"{qtype}-{first}-{last}.gguf"
                write_shard(master, shard, [qtype] * n_layer, first, last)
                got: dict[bool, list[dict]] = {False: [], True: []}
                for _ in range(a.rounds):
                    for huge in (False, True):
                        r = subprocess.run([sys.executable, __file__, "--measure", str(shard), "1" if huge else "0"],
                                           capture_output=True, text=True, check=True, cwd=ROOT)
                        got[huge].append(json.loads(r.stdout.strip().splitlines()[-1]))
                med = {h: {k: statistics.median(x[k] for x in got[h]) for k in got[h][0]} for h in got}
                small, big = med[False], med[True]
                change = [100 * (big[k] / small[k] - 1) for k in ("back_to_back", "after_idle")]
                print(f"{qtype} layers {first}-{last:<10} {small['back_to_back'] * 1e3:6.2f}; "
                      f"{small['after_idle'] * 1e3:6.2f} {big['back_to_back'] * 1e3:6.2f}; "
                      f"{big['after_idle'] * 1e3:6.2f} {change[0]:+6.1f}%; {change[1]:+6.1f}%  "
                      f"{small['rss'] / 1e6:.0f} -> {big['rss'] / 1e6:.0f} ({big['huge'] / 1e6:.0f})")


if __name__ == "__main__":
    main()
