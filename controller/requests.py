"""The controller's requests: admission (KV-cache slots and a bounded queue), the one
generate loop over the active deployment with failover as its recovery hook, and text:
incremental detokenization and stop sequences.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from agent.sampling import Sampling
from agent.tokenizer import Tokenizer
from controller.agents import AgentError, PipelineStream
from controller.deployments import Deployments
from controller.errors import BadRequest, Busy, FleetFailed, NoDeployment, Refused
from controller.generate import Token, generate
from controller.metrics import Metrics
from controller.state import Deployment
from proto.security import Security

log = logging.getLogger(__name__)

RETRYABLE = {"UNAVAILABLE", "NOT_FOUND", "FAILED_PRECONDITION", "CANCELLED", "DEADLINE_EXCEEDED", "INTERNAL"}
DEADLINE_FLOOR_S = 5.0     # a step's deadline is never shorter: heartbeats find a dead node within 3 s
DEADLINE_SLACK = 10.0      # × the predicted step time with every KV-cache slot's session ahead of it


def step_deadline_s(dep: Deployment, prompt_tokens: int) -> float:
    """How long one step of a request may take before the request is failed (after a check
    for dead stages), from the plan's predicted step times: the prompt's step scales with
    its length, every other step is one token."""
    p, w = dep.plan.prediction, dep.request.workload
    prefill = p.ttft_s * max(1.0, prompt_tokens / max(w.prompt_tokens, 1))
    return DEADLINE_FLOOR_S + DEADLINE_SLACK * w.concurrency * max(prefill, p.tpot_s)


class StopText:
    """Cuts generated text at the first stop sequence. Text that could be the start of a stop
    sequence is held back until it is known not to be one, so no part of a stop is shown."""

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text that may be shown now, whether a stop sequence was reached)."""
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[:min(hits)], True
        keep = max((k for s in self.stops for k in range(1, len(s)) if buf.endswith(s[:k])), default=0)
        self.held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


@dataclass(frozen=True)
class Piece:
    """One generated token and the text it adds (possibly empty: see StopText)."""
    token: int
    text: str
    finish_reason: str = ""     # "", "eos", "stop" (a stop sequence) or "length"
    recovered_s: float = 0.0    # > 0: a failover happened before this token


class Requests:
    def __init__(self, deployments: Deployments, security: Security, metrics: Metrics, max_queue: int = 256):
        self.deployments = deployments
        self.security = security
        self.metrics = metrics
        self.max_queue = max_queue          # requests that may wait for a KV-cache slot
        self._streams: dict[str, PipelineStream] = {}
        self._lock = threading.Lock()
        self._tokenizers: dict[str, Tokenizer] = {}
        self._slots: tuple[str, threading.BoundedSemaphore] = ("", threading.BoundedSemaphore(1))
        self._admitted = 0
        deployments.on_retired = self.close_stream

    def tokenizer(self, model_path: str) -> Tokenizer:
        with self._lock:
            if model_path not in self._tokenizers:
                self._tokenizers[model_path] = Tokenizer(model_path)
            return self._tokenizers[model_path]

    # ---------------------------------------------------------- pipelines

    def _pipeline(self) -> PipelineStream:
        """The stream into the active deployment's first stage, answered by its last (one per deployment, shared)."""
        dep = self.deployments.active
        if dep is None:
            raise NoDeployment("the deployment was removed while the request ran")
        with self._lock:
            s = self._streams.get(dep.id)
            if s is None or s.broken is not None:
                s = PipelineStream(dep.stages[0].address, self.security, dep.id, last=dep.stages[-1].address)
                self._streams[dep.id] = s
            return s

    def close_stream(self, dep_id: str) -> None:
        with self._lock:
            s = self._streams.pop(dep_id, None)
        if s is not None:   # steps waiting on it fail now, and recover onto the new deployment
            threading.Thread(target=s.close, args=(f"deployment {dep_id} stopped serving",), daemon=True).start()

    def _recover(self, exc: AgentError, dep_id: str) -> float | None:
        """The generate loop's recovery hook: fail over (the seconds it took, as the event log
        states them), then replay; None when the failure is not one a failover mends."""
        if exc.code not in RETRYABLE:
            return None
        log.warning("deployment %s: %s; recovering", dep_id, exc)
        t0 = time.monotonic()
        if not self.deployments.recover(dep_id, str(exc)):
            # every stage answers: a stream that broke is replayed on a new one; a step past its
            # deadline fails its request rather than hang it
            return None if exc.code == "DEADLINE_EXCEEDED" else 0.0
        return self.deployments.recoveries.get(dep_id, time.monotonic() - t0)

    # ---------------------------------------------------------- admission

    def _check(self, prompt: list[int], max_tokens: int, sampling: tuple) -> tuple[Deployment, Sampling]:
        """The deployment that will serve the request and its sampling, or BadRequest/NoDeployment."""
        dep = self.deployments.active
        if dep is None:
            raise NoDeployment("no deployment is active; run `edgefleet deploy MODEL.gguf` first")
        if not prompt:
            raise BadRequest("the prompt is empty; send at least one token")
        if max_tokens < 1:
            raise BadRequest(f"max_tokens must be at least 1, not {max_tokens}")
        try:
            s = Sampling(*sampling)
        except ValueError as exc:
            raise BadRequest(f"{exc}; fix the request") from None
        n_vocab = self.tokenizer(dep.model_path).n_vocab
        bad = [t for t in prompt if not 0 <= t < n_vocab]
        if bad:
            raise BadRequest(f"token id {bad[0]} is outside the model's vocabulary; send ids from 0 to {n_vocab - 1}")
        ctx = dep.request.workload.ctx
        if len(prompt) + max_tokens > ctx:
            raise BadRequest(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceed the deployment's "
                             f"context of {ctx} tokens; shorten the prompt or lower max_tokens", "context_length_exceeded")
        return dep, s

    def _slots_for(self, dep) -> threading.BoundedSemaphore:
        """The active deployment's KV-cache slots (a new deployment brings its own)."""
        with self._lock:
            if self._slots[0] != dep.id:
                self._slots = (dep.id, threading.BoundedSemaphore(dep.request.workload.concurrency))
            return self._slots[1]

    def generate(self, prompt: list[int], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, eos: int | None = None) -> Iterator[Token]:
        """Tokens of one request; survives the loss of stages by failover and replay."""
        dep, sampling = self._check(prompt, max_tokens, (temperature, top_p, seed))
        limit = dep.request.workload.concurrency + self.max_queue
        with self._lock:
            if self._admitted >= limit:
                raise Busy(f"the fleet is at capacity ({limit} requests running or queued); retry later")
            self._admitted += 1
        self.metrics.in_flight.inc()
        try:
            with self._slots_for(dep), contextlib.closing(generate(
                    self._pipeline, prompt, max_tokens, sampling, eos, self._recover,
                    timeout_s=step_deadline_s(dep, len(prompt)))) as steps:
                for t in steps:
                    self.metrics.observe_stages(t.stage_times)
                    yield t
        except AgentError as exc:
            raise FleetFailed(f"the request failed in the fleet: {exc}; retry it") from None
        except Refused as exc:      # a failover that found no plan
            raise FleetFailed(f"the request failed in the fleet: {exc}; retry it") from None
        finally:
            with self._lock:
                self._admitted -= 1
            self.metrics.in_flight.dec()

    # ---------------------------------------------------------- text

    def complete(self, model_path: str, prompt: list[int], max_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, stop: Iterable[str] = (), api: str = "grpc",
                 ignore_eos: bool = False) -> Iterator[Piece]:
        """Text generation: token pieces decoded incrementally, ended by EOS, a stop sequence
        (never shown) or max_tokens; counted in the metrics under `api`."""
        tok = self.tokenizer(model_path)
        decoder, stops = tok.stream(), StopText(stop)
        m = self.metrics
        last = time.monotonic()
        n, outcome = 0, "error"
        try:
            eos = None if ignore_eos else tok.eos
            for t in self.generate(prompt, max_tokens, temperature, top_p, seed, eos):
                now = time.monotonic()
                (m.ttft if n == 0 else m.tpot).observe(now - last)
                last = now
                n += 1
                m.generated_tokens.inc()
                text, stopped = stops.feed(decoder.decode(tok.piece(t.token)) if t.token != eos else "")
                reason = "eos" if t.token == eos else "stop" if stopped else "length" if n == max_tokens else ""
                if reason in ("eos", "length"):
                    text += stops.flush()
                yield Piece(t.token, text, reason, t.recovered_s)
                if reason:
                    outcome = "length" if reason == "length" else "stop"
                    return      # closing self.generate() frees the session on the agents
        except (BadRequest, Busy, NoDeployment):
            outcome = "rejected"
            raise
        except GeneratorExit:
            outcome = "cancelled"
            raise
        finally:
            if n:
                m.prompt_tokens.inc(len(prompt))
            m.requests.labels(api, outcome).inc()
