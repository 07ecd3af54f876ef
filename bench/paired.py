"""One request on edgefleet and on llama.cpp's RPC backend by turns, on the same split of one
emulated fleet: bench/versus.py's (c) against (b), paired.

bench/versus.py measures each system in its own stretch of minutes, and on this machine one
system's single-request speed moves by ±10 % and more from one stretch to the next; where the
two are close, its ratio says little. Here both run at once on every node, each in cgroups of
its own with the node's CPU and memory limits (bench/emulated.py's systems), and take turns:
edgefleet's agents hold (c)'s deployment (its latency plan, every layer at the master's type),
the RPC servers get (c)'s split as --tensor-split, and one request of each (a 512-token prompt
then 64 tokens; llama-bench's tg64 at depth 512 for llama.cpp) follows the other, the order
swapped every pair. Prints each system's median decode tok/s and the median of the paired
ratios, with each pair's.

    .venv/bin/python bench/paired.py [--fleet unequal4] [--model smollm2-q8_0] [--pairs 10]

Needs root, as bench/versus.py.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import versus as V  # noqa: E402
from bench.emulated import EmulatedFleet  # noqa: E402

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fleet", default="unequal4", help=f"one of {', '.join(V.FLEETS)}")
    ap.add_argument("--model", default="smollm2-q8_0", help="smollm2-q8_0, smollm2-f16 or reference")
    ap.add_argument("--pairs", type=int, default=10, help="requests of each system, by turns")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/paired.py makes network namespaces and cgroups: run it as root")
    if a.pairs < 1:
        sys.exit("--pairs must be at least 1")
    nodes, link = V.fleet_nodes(a.fleet, None)
    path_fn, master_type, _ = V.models()[a.model]
    master = path_fn()
    V.llamacpp.build()
    work = Path(tempfile.mkdtemp(prefix="paired-"))
    with EmulatedFleet(nodes, link, work / "logs", systems=("", V.RPC)) as fleet:
        ef = V.Edgefleet(fleet, work)
        try:
            plan = ef.deploy(master, master_type, 5.0)
            order, split = V.tensor_split(plan, nodes)
            llama = V.LlamaRpc(fleet, system=V.RPC, inner_port=V.INNER_PORT + 1)
            try:
                got = dict(zip(("(b)", "(c)"), V.by_turns(ef, llama, master, order, split, a.pairs)))
            finally:
                llama.stop()
        finally:
            ef.stop()
    shutil.rmtree(work)
    print(f"{a.fleet}, {a.model}: {V.split_text(plan)}; llama.cpp's --tensor-split {'/'.join(map(str, split))}")
    for run, what in (("(b)", "llama.cpp RPC"), ("(c)", "edgefleet")):
        print(f"{run} {what:14} decode median {statistics.median(got[run]):.1f} tok/s "
              f"({', '.join(f'{x:.1f}' for x in got[run])})")
    print(f"(c)/(b) one request: {V.paired_text(V.paired_ratios(got['(b)'], got['(c)']))}")


if __name__ == "__main__":
    main()
