"""The one generate loop: the prompt in one step, then one token a step, over a pipeline.

Used by the controller for every request (with a recovery hook) and by tests and benches
on a bare pipeline (without one). After a recovery the request is replayed on the new
stages in the steps it was first computed in (the prompt at once, then one token a step):
llama.cpp's sums depend on a batch's shape, so only the same steps rebuild the very same
KV cache, and a greedy request's output is the one an undisturbed run gives.

Each step asks the stages to go on by themselves for the rest of the request
(`continue_tokens`, stopping at `eos`): where the last stage can (agent/server.py), the next
step's answer then comes without a step sent from here (`Pipeline.expect`), and the
controller is off the path that makes the tokens. Replayed steps never go on.
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


class Answer(Protocol):
    def wait(self, timeout_s: float | None = None) -> A.StepOut: ...

    def abandon(self) -> None: ...


class Pipeline(Protocol):
    deployment_id: str

    def send(self, step: A.StepIn) -> Answer: ...

    def expect(self, session_id: str, position: int) -> Answer: ...

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
    controller's active deployment may change between steps). A token's next step is sent
    before the token is yielded, so the stages compute it while the caller handles the token.
    Closing the iterator early frees the session's KV cache on the stages."""
    sid = session_id or uuid.uuid4().hex
    produced: list[int] = []
    pos, pending = 0, tuple(prompt)
    replay: list[int] = []          # tokens already produced that new stages must see again
    recovered, failures = 0.0, 0
    sent = None                     # the step in flight: its pipeline, whether it ends the request, its answer

    def send() -> tuple[Pipeline, bool, Answer]:
        pipe = pipeline()
        more = 0 if replay else max_tokens - len(produced) - 1     # steps the stages may go on with
        last = not replay and more == 0
        return pipe, last, _send(pipe, _step(sid, pos, pending, sampling, last, pipe.deployment_id, more, eos))

    try:
        while len(produced) < max_tokens:
            pipe, last, answer = sent = sent or send()
            try:
                out = answer.wait(timeout_s)
            except AgentError as exc:
                took = None if recover is None or failures >= MAX_RECOVERIES else recover(exc, pipe.deployment_id)
                if took is None:
                    raise       # the stages of `sent`, and the current ones, may still hold the session: freed below
                sent = None
                failures += 1
                recovered += took
                pos, pending, replay = 0, tuple(prompt), list(produced)
                continue
            sent, failures = None, 0
            pos += len(pending)
            if replay:              # this step recomputed a token the caller already has
                pending = (replay.pop(0),)
                continue
            produced.append(out.token)
            if out.token != eos and len(produced) < max_tokens:
                pending = (out.token,)
                try:        # the stages went on with this token, or the next step goes from here
                    sent = (pipe, len(produced) == max_tokens - 1, pipe.expect(sid, pos)) if out.continued else send()
                except Exception as exc:    # e.g. no deployment any more: raised once this token is out
                    sent = pipe, False, _Unsent(exc)
            yield Token(out.token, recovered, out.stage_times)
            recovered = 0.0
            if out.token == eos:
                if not last:
                    pipe.cancel_session(sid)
                return
    except BaseException:           # the caller stopped early (GeneratorExit), or anything failed: free the session's KV cache now
        if sent is not None:
            sent[2].abandon()
        _cancel(pipeline, sid, sent[0] if sent is not None else None)
        raise


class _Unsent:
    """A step that could not be sent: waiting for it raises why."""

    def __init__(self, error: Exception):
        self.error = error

    def wait(self, timeout_s: float | None = None) -> A.StepOut:
        raise self.error

    def abandon(self) -> None:
        pass


def _send(pipe: Pipeline, step: A.StepIn) -> Answer:
    try:
        return pipe.send(step)
    except AgentError as exc:       # a broken stream: the loop recovers as from a failed step
        return _Unsent(exc)


def _step(sid: str, pos: int, tokens: tuple[int, ...], s: Sampling, finish: bool, deployment_id: str,
          more: int, eos: int | None) -> A.StepIn:
    """A step; `finish` frees the session after it; the last of the `more` steps the stages
    may go on with frees it too."""
    return A.StepIn(sid, pos, tokens=tokens, temperature=s.temperature, top_p=s.top_p, seed=s.seed, finish=finish,
                    deployment_id=deployment_id, continue_tokens=more, stop_token=eos)


def _cancel(pipeline: Callable[[], Pipeline], sid: str, also: Pipeline | None = None) -> None:
    """End the session on the current pipeline, and on `also` (where its step in flight went)
    if the active deployment has changed since."""
    current = None
    with contextlib.suppress(Exception):    # best effort: there may be no pipeline any more
        current = pipeline()
        current.cancel_session(sid)
    if also is not None and also is not current:
        with contextlib.suppress(Exception):
            also.cancel_session(sid)
