"""What reading a middle stage's output costs: a decode step of a SmolLM2 Q8_0 stage that is
not last, with llama.cpp's `cb_eval` callback in Python against the stage as it runs, with
the callback in C (agent/capture.py, docs/runtime.md). One thread, one session holding 512
positions; the two stages' steps are interleaved, and each figure is the lowest of --rounds
medians of --steps steps.

    .venv/bin/python bench/readout.py [--layers 8:29] [--rounds 6] [--steps 60]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from agent.runtime import Settings, Stage, Step  # noqa: E402
from controller.shards import file_sha256, write_shard  # noqa: E402
from models import smollm2  # noqa: E402

HELD = 512


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="8:29", help="the stage's layers, FIRST:LAST (LAST < 30: not the last stage)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=60)
    a = ap.parse_args()
    first, last = (int(x) for x in a.layers.split(":"))
    if not 0 < first < last < 30:
        raise SystemExit("--layers must be FIRST:LAST with 0 < FIRST < LAST < 30 (a middle stage of SmolLM2)")
    master = smollm2.path("Q8_0")
    rng = np.random.default_rng(0)
    prompt = rng.standard_normal((HELD, 576)).astype(np.float32)
    step = rng.standard_normal((1, 576)).astype(np.float32)
    with tempfile.TemporaryDirectory() as d:
        shard = write_shard(master, Path(d) / "stage.gguf", ["Q8_0"] * 30, first, last, file_sha256(master)).path
        stages = {reader: Stage(shard, Settings(sessions=1, context=HELD + 64, threads=1,
                                                 python_reader=reader == "in Python"))
                  for reader in ("in Python", "in C")}
        try:
            if not stages["in C"]._reader.native:
                raise SystemExit("agent/capture.c could not be built here (see the warning above); install a C compiler")
            for st in stages.values():
                st.forward([Step(0, 0, hidden=prompt)])
            medians: dict[str, list[float]] = {k: [] for k in stages}
            for _ in range(a.rounds):
                for name, st in stages.items():
                    times = []
                    for _ in range(a.steps):
                        t = time.perf_counter()
                        st.forward([Step(0, HELD, hidden=step)])
                        times.append(time.perf_counter() - t)
                    medians[name].append(statistics.median(times))
        finally:
            for st in stages.values():
                st.close()
    print(f"SmolLM2 Q8_0 layers [{first}, {last}), one decode step at {HELD} positions, one thread:")
    for name, m in medians.items():
        print(f"  output read {name:9} {min(m) * 1e3:.3f} ms (medians of the rounds: "
              f"{', '.join(f'{x * 1e3:.2f}' for x in m)})")


if __name__ == "__main__":
    main()
