"""How much memory edgefleet's agents hold on an emulated fleet, against what their stages are
planned at, through the deploys of bench/versus.py.

The fleet is bench/versus.py's (a network namespace and a cgroup per node, the node's memory
limit, its agent told that less 96 MiB). Its edgefleet runs (c), (d) and (e) are deployed
one after the other, each from scratch, and each serves 8 requests of 512 + 64 tokens. A
thread reads every node's cgroup every 50 ms. For each run it prints, per node: the stage's
memory as the plan has it, the anonymous memory the node held once deployed, its peak
while the 8 requests ran, and what it held after them (MB, 10^6 bytes).

    .venv/bin/python bench/agent_memory.py [--fleet unequal4] [--model smollm2-q8_0]

Needs root, as bench/versus.py.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import versus as V  # noqa: E402
from bench.emulated import CGROUP, EmulatedFleet  # noqa: E402

MB = 1e6
EVERY_S = 0.05


def anon_bytes(fleet: EmulatedFleet, i: int) -> int:
    """Anonymous memory in node i's cgroup (v1 memory.stat's rss): what its limit counts beside
    the page cache."""
    for line in open(CGROUP / "memory" / fleet.cgroup(i) / "memory.stat"):
        key, value = line.split()
        if key == "rss":
            return int(value)
    raise RuntimeError(f"no rss in node {i}'s memory.stat")


def anon_all(fleet: EmulatedFleet) -> list[int]:
    """anon_bytes of every node, in order."""
    return [anon_bytes(fleet, i) for i in range(len(fleet.nodes))]


class Peaks:
    """The highest anonymous memory of every node since the last reset, read every EVERY_S."""

    def __init__(self, fleet: EmulatedFleet):
        self.fleet, self.peak = fleet, [0] * len(fleet.nodes)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(EVERY_S):
            now = anon_all(self.fleet)
            with self._lock:
                self.peak = [max(p, n) for p, n in zip(self.peak, now)]

    def reset(self) -> None:
        with self._lock:
            self.peak = anon_all(self.fleet)

    def read(self) -> list[int]:
        with self._lock:
            return list(self.peak)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fleet", default="unequal4", choices=sorted(V.FLEETS))
    ap.add_argument("--model", default="smollm2-q8_0", help="smollm2-q8_0, smollm2-f16 or reference")
    a = ap.parse_args()
    path_fn, master_type, free_types = V.models()[a.model]
    master = path_fn()
    nodes, link = V.fleet_nodes(a.fleet, None)
    work = Path(tempfile.mkdtemp(prefix="agent-memory-"))
    print(f"{a.fleet}: {len(nodes)} nodes of {nodes[0].memory // V.MiB} MiB, agents told "
          f"{(nodes[0].memory - V.HEADROOM) // V.MiB} MiB; {a.model}; MB of anonymous memory per node")
    with EmulatedFleet(nodes, link, work / "logs") as fleet:
        ef = V.Edgefleet(fleet, work)
        peaks = Peaks(fleet)
        try:
            idle = anon_all(fleet)
            print("agents idle: " + ", ".join(f"{n.name} {b / MB:.0f}" for n, b in zip(nodes, idle)))
            for run, types, objective, _ in V.edgefleet_runs(master_type, free_types, False):
                V.say(f"{a.fleet}: deploying {run}")
                plan = ef.deploy(master, types, 5.0, objective)
                planned = {s["node"]: s["memory"] for s in plan["prediction"]["stages"]}
                deployed = anon_all(fleet)
                peaks.reset()
                figs = ef.measure(master, 1)
                peak, after = peaks.read(), anon_all(fleet)
                print(f"{run} {V.split_text(plan)}; 8 requests at {figs.concurrent_tps:.1f} tok/s")
                for i, n in enumerate(nodes):
                    stage = f"stage planned at {planned[n.name] / MB:.0f}" if n.name in planned else "no stage"
                    print(f"  {n.name:8} {stage:22} deployed {deployed[i] / MB:4.0f}, peak with 8 requests "
                          f"{peak[i] / MB:4.0f}, after them {after[i] / MB:4.0f}")
        finally:
            peaks.stop()
            ef.stop()
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
