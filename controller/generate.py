"""The one generate loop: the prompt in one step, then one token a step, over a pipeline.

Used by the controller for every request (with a recovery hook) and by tests and benches
on a bare pipeline (without one). After a recovery the request is replayed on the new
stages in the steps it was first computed in (the prompt at once, then one token a step):
llama.cpp's sums depend on a batch's shape, so only the same steps rebuild the very same
KV cache, and a greedy request's output is the one an undisturbed run gives.
"""
from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from agent.sampling import Sampling
from controller.agents import AgentError
from proto import adapter as A

MAX_RECOVERIES = 3          # failures in a row a request survives


class Pipeline(Protocol):
    deployment_id: str

    def step(self, step: A.StepIn, timeout_s: float | None = None) -> A.StepOut: ...

    def cancel_session(self, session_id: str) -> None: ...


@dataclass(frozen=True)
class Token:
    token: int
    recovered_s: float = 0.0            # > 0: a recovery happened before this token
    stage_times: tuple = ()             # the step's per-stage compute times (A.StageTime)


# recover(error, deployment id of the failed step) -> the seconds the failover took, to replay
# on the new pipeline; None re-raises the error
Recover = Callable[[AgentError, str], "float | None"]


def generate(pipeline: Callable[[], Pipeline], prompt: list[int] | tuple[int, ...], max_tokens: int,
             sampling: Sampling = Sampling(), eos: int | None = None, recover: Recover | None = None,
             session_id: str | None = None, timeout_s: float | None = None) -> Iterator[Token]:
    """Tokens of one request. `pipeline()` gives the pipeline to send the next step to (the
    controller's active deployment may change between steps). Closing the iterator early
    frees the session's KV cache on the stages."""
    sid = session_id or uuid.uuid4().hex
    produced: list[int] = []
    pos, pending = 0, tuple(prompt)
    replay: list[int] = []          # tokens already produced that new stages must see again
    recovered, failures = 0.0, 0
    try:
        while len(produced) < max_tokens:
            pipe = pipeline()
            last = not replay and len(produced) == max_tokens - 1
            try:
                out = pipe.step(_step(sid, pos, pending, sampling, last, pipe.deployment_id), timeout_s)
            except AgentError as exc:
                took = None if recover is None or failures >= MAX_RECOVERIES else recover(exc, pipe.deployment_id)
                if took is None:
                    _cancel(pipeline, sid)      # the stages may still hold the session
                    raise
                failures += 1
                recovered += took
                pos, pending, replay = 0, tuple(prompt), list(produced)
                continue
            failures = 0
            if replay:              # this step recomputed a token the caller already has
                pos, pending = pos + len(pending), (replay.pop(0),)
                continue
            produced.append(out.token)
            yield Token(out.token, recovered, out.stage_times)
            recovered = 0.0
            if out.token == eos:
                if not last:
                    pipe.cancel_session(sid)
                return
            pos, pending = pos + len(pending), (out.token,)
    except GeneratorExit:           # the caller stopped early: free the session's KV cache now
        _cancel(pipeline, sid)
        raise


def _step(sid: str, pos: int, tokens: tuple[int, ...], s: Sampling, last: bool, deployment_id: str) -> A.StepIn:
    return A.StepIn(sid, pos, tokens=tokens, temperature=s.temperature, top_p=s.top_p, seed=s.seed, finish=last,
                    deployment_id=deployment_id)


def _cancel(pipeline: Callable[[], Pipeline], sid: str) -> None:
    with contextlib.suppress(Exception):    # best effort: there may be no pipeline any more
        pipeline().cancel_session(sid)
