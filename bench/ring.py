"""The stages going on by themselves against the controller sending every step, on one
deployment of an emulated fleet, interleaved.

The fleet and the deployment are bench/versus.py's run (c) (edgefleet's latency plan, every
layer at the master's type). This process stands where the controller stands (the root
namespace) and sends requests of a 512-token prompt and 64 tokens through one pipeline
stream, as the controller does: alternately as it does (the last stage makes each next step
and sends it round to the first) and with every step sent from here (continue_tokens 0, as
before session 19). Prints each kind's median TTFT and decode tok/s, and the median of the
paired ratios (each request against the other kind's next to it).

    .venv/bin/python bench/ring.py [--fleet unequal4] [--model smollm2-q8_0] [--pairs 8]

Needs root, as bench/versus.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import versus as V  # noqa: E402
from bench.emulated import EmulatedFleet  # noqa: E402
from controller.agents import PipelineStream  # noqa: E402
from controller.generate import generate  # noqa: E402
from proto import edgefleet_pb2 as pb  # noqa: E402


class SentFromHere:
    """A pipeline stream whose every step is sent from here: the stages never go on."""

    def __init__(self, stream: PipelineStream):
        self.stream, self.deployment_id = stream, stream.deployment_id

    def send(self, step):
        return self.stream.send(dataclasses.replace(step, continue_tokens=0))

    def expect(self, session_id, position):
        return self.stream.expect(session_id, position)

    def cancel_session(self, session_id):
        self.stream.cancel_session(session_id)


def request(pipe, ids: list[int]) -> tuple[float, float]:
    """(TTFT in seconds, decode tokens/s after the first) of one request."""
    times = V.arrival_times(generate(lambda: pipe, ids, V.OUTPUT))
    return times[1] - times[0], V.decode_tps(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fleet", default="unequal4", help=f"one of {', '.join(V.FLEETS)}")
    ap.add_argument("--model", default="smollm2-q8_0", help="smollm2-q8_0, smollm2-f16 or reference")
    ap.add_argument("--pairs", type=int, default=8, help="requests of each kind, interleaved")
    a = ap.parse_args()
    nodes, link = V.fleet_nodes(a.fleet, None)
    path_fn, master_type, _ = V.models()[a.model]
    master = path_fn()
    work = Path(tempfile.mkdtemp(prefix="ring-"))
    with EmulatedFleet(nodes, link, work / "logs") as fleet:
        ef = V.Edgefleet(fleet, work)
        try:
            plan = ef.deploy(master, master_type, 5.0)
            where = {n.name: f"{fleet.address(i)}:{V.PUBLIC_PORT}" for i, n in enumerate(nodes)}
            stream = PipelineStream(where[plan["stages"][0]["node"]], deployment_id=ef.stub.Status(
                pb.Empty()).active_deployment_id, last=where[plan["stages"][-1]["node"]])
            kinds = {"going on": stream, "sent from here": SentFromHere(stream)}
            try:
                for pipe in kinds.values():             # warm-up
                    request(pipe, V.prompt_ids(master, 32))
                got: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
                for r in range(a.pairs):
                    order = list(kinds) if r % 2 == 0 else list(reversed(kinds))
                    for k in order:
                        got[k].append(request(kinds[k], V.prompt_ids(master, V.PROMPT, r)))
            finally:
                stream.close()
        finally:
            ef.stop()
    shutil.rmtree(work)
    print(f"{a.fleet}, {a.model}: {V.split_text(plan)}")
    for k, v in got.items():
        print(f"{k:15} TTFT median {statistics.median(x[0] for x in v) * 1e3:.0f} ms, decode median "
              f"{statistics.median(x[1] for x in v):.1f} tok/s ({', '.join(f'{x[1]:.1f}' for x in v)})")
    ratios = [x[1] / y[1] for x, y in zip(got["going on"], got["sent from here"])]
    print(f"decode tok/s, going on / sent from here, paired: median {statistics.median(ratios):.3f} "
          f"({', '.join(f'{x:.2f}' for x in ratios)})")


if __name__ == "__main__":
    main()
