"""`edgefleet replay`: send a trace's requests to a running controller at their (scaled)
arrival times and measure what users would see, in the simulator's format
(simulations/metrics.py), so that a simulation and a real run compare line by line."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc

from proto import edgefleet_pb2 as pb
from proto import edgefleet_pb2_grpc as rpc
from proto.security import Security
from simulations.metrics import Outcome
from simulations.workload import Request


def prompt_ids(r: Request, vocab: int = 1000) -> list[int]:
    """A deterministic prompt of r.prompt_tokens ids (BOS first): replay needs lengths, not text."""
    return [1] + [3 + (r.id * 7919 + i * 104729) % (vocab - 3) for i in range(r.prompt_tokens - 1)]


def replay(address: str, security: Security, requests: list[Request], progress: Callable = lambda: None,
           timeout_s: float = 3600) -> list[Outcome]:
    """Every request runs on its own thread from its arrival time; greedy, EOS ignored, so each
    produces exactly output_tokens tokens."""
    channel = security.channel(address)
    stub = rpc.ControllerStub(channel)
    md = security.metadata()
    results: list[Outcome | None] = [None] * len(requests)
    t0 = time.monotonic() + 0.2

    def one(i: int, r: Request) -> None:
        first = done = float("nan")
        status = "ok"
        n = 0
        try:
            req = pb.GenerateRequest(prompt_tokens=prompt_ids(r), max_tokens=r.output_tokens, ignore_eos=True)
            for _ in stub.Generate(req, metadata=md, timeout=timeout_s):
                n += 1
                now = time.monotonic() - t0
                if n == 1:
                    first = now
                done = now
            if n != r.output_tokens:
                status = "failed"
        except grpc.RpcError as exc:
            status = "rejected" if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                                                  grpc.StatusCode.RESOURCE_EXHAUSTED) else "failed"
        results[i] = Outcome(r.id, r.arrival_s, r.prompt_tokens, r.output_tokens, first, done, status)
        progress()

    threads = []
    for i, r in enumerate(requests):
        delay = t0 + r.arrival_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        th = threading.Thread(target=one, args=(i, r), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    channel.close()
    return [o for o in results if o is not None]
