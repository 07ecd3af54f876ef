"""A decode step of k sessions on one stage: one llama_decode of k tokens against k one-token
decodes one after the other, and what the agent's engine chooses between them.

llama.cpp's one-token step is a matrix-vector product; a step of two or more tokens takes its
matrix-matrix path, which for some types costs more than as many one-token steps. The engine
(agent/engine.py:_parts) times both on its own stage and runs the faster. Here: the whole
SmolLM2 at each type as one stage (30 layers and the LM head), 8 sessions holding 64
positions each, one thread; each figure the median of --repeats decodes.

    .venv/bin/python bench/batching.py [--types Q8_0,F16,Q4_1] [--repeats 15]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.runtime import Settings, Stage, Step  # noqa: E402
from models import smollm2  # noqa: E402

SESSIONS, HELD = 8, 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="Q8_0,F16,Q4_1", help="SmolLM2 files: Q8_0, F16, Q4_1, Q4_K_M")
    ap.add_argument("--repeats", type=int, default=15)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    for kind in a.types.split(","):
        stage = Stage(smollm2.path(kind), Settings(sessions=SESSIONS, context=HELD + 40 * a.repeats, threads=1))
        pos = [HELD] * SESSIONS
        for s in range(SESSIONS):
            stage.forward([Step(s, 0, tokens=rng.integers(100, 40000, HELD).astype(np.int32))])

        def step(seqs) -> None:
            stage.forward([Step(s, pos[s], tokens=np.array([5], np.int32)) for s in seqs])
            for s in seqs:
                pos[s] += 1

        def timed(fn) -> float:
            times = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return statistics.median(times)

        print(f"SmolLM2 {kind}, one stage of 30 layers and the head, one thread")
        for k in (1, 2, 3, 4, 8):
            one = timed(lambda: step(range(k)))
            apart = timed(lambda: [step([s]) for s in range(k)])
            choice = "one step" if one <= apart else f"{k} single steps"
            print(f"  {k} sessions: one step {one * 1e3:6.1f} ms, {k} single steps {apart * 1e3:6.1f} ms"
                  + (f" -> {choice} ({max(one, apart) / min(one, apart):.2f}x)" if k > 1 else ""))
        stage.close()


if __name__ == "__main__":
    main()
