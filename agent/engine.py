"""Stage execution on an agent: loaded stages (agent/runtime.py, llama.cpp), sessions as
llama.cpp sequence ids, and one compute thread that puts the steps of concurrent sessions
into one batch (`Stage.forward`).

Nothing here knows about gRPC: steps come in as `Job`s, answers leave through each job's
`done` callback (called on the compute thread; it must not block). Loading runs on a
loader thread, computing on the compute thread; only the compute thread touches a loaded
stage (a session that ends is forgotten, and a dropped stage closed, between batches).
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent import weights as W
from agent.runtime import Settings, Stage, Step, release_freed_memory
from agent.sampling import Sampling, sample
from agent.shaping import together
from agent.store import drop_cached
from solver.memory import MAX_BATCH, StageMemory, decode_group, fmt_bytes, stage_memory

log = logging.getLogger(__name__)
RELEARN = 16       # every 16th decode of k sessions runs as one batch, whatever the figures say


class EngineError(Exception):
    """A request the engine refuses; `code` is the gRPC status name to answer with."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


def footprint(path: Path, max_sessions: int, context_length: int,
              max_batch_tokens: int = 512) -> tuple[StageMemory, W.ModelConfig, tuple[int, int]]:
    """Memory a shard needs as a stage, known from its header before anything is loaded:
    the same formula as the solver's (solver/memory.py)."""
    reader = W.open_gguf(path, layout_only=True)
    cfg = W.read_config(reader)
    first, last = W.stage_range(reader, cfg)
    # llama.cpp maps the file: a tensor it never reads is never resident. A later stage takes
    # hidden states, so an untied model's token_embd (which llama.cpp requires) stays cold.
    cold = {"token_embd.weight"} if first > 0 and not cfg.tied_embeddings else set()
    weights = sum(int(t.n_bytes) for t in reader.tensors if t.name not in cold)
    table = W.input_embedding_shape(reader, cfg)
    if table is not None:       # a first stage's embedding table, after the GGUF data
        weights += table[1] * table[2]
    n_out = cfg.n_vocab if last == cfg.n_layer else 1
    need = stage_memory(weights, n_layers=last - first, n_embd=cfg.n_embd, n_head=cfg.n_head,
                        n_head_kv=cfg.n_head_kv, n_ff=cfg.n_ff, n_vocab=n_out,
                        sessions=max_sessions, context=context_length, batch_tokens=max_batch_tokens)
    return need, cfg, (first, last)


def stage_settings(max_sessions: int, context_length: int, max_batch_tokens: int, threads: int) -> Settings:
    """How an agent makes a stage's llama.cpp context: what `footprint` counts. A decode of
    distinct sessions' steps makes a row of logits per session at most."""
    return Settings(sessions=max_sessions, context=context_length, batch_tokens=max_batch_tokens, threads=threads,
                    outputs=max_sessions)


@dataclass
class Session:
    seq: int            # llama.cpp sequence id (the stage knows the positions it holds)
    last_used: float


@dataclass
class Deployment:
    deployment_id: str
    sha256: str
    stage: Stage
    next_address: str
    max_sessions: int
    context_length: int
    memory: StageMemory
    groups: int = 1                # groups the sessions go round the stages in (decode_group)
    active: bool = False
    sessions: dict[str, Session] = field(default_factory=dict)
    free_seqs: list[int] = field(default_factory=list)
    decode_s: dict[int, float] = field(default_factory=dict)    # k -> seconds of a decode of k one-token steps (running mean)
    decodes: dict[int, int] = field(default_factory=dict)       # k -> batches of k one-token steps seen

    def __post_init__(self):
        self.free_seqs = list(range(self.max_sessions))

    @property
    def is_last(self) -> bool:
        return self.stage.has_head


@dataclass
class Result:
    """The outcome of one step on this stage."""

    session_id: str
    position: int
    hidden: np.ndarray | None = None     # non-final stage: [n_tokens, n_embd] float32
    token: int = 0                       # final stage
    logits: np.ndarray | None = None     # final stage, when asked
    compute_s: float = 0.0
    queue_s: float = 0.0
    batch_size: int = 0
    error: str = ""
    error_code: str = ""


@dataclass
class Job:
    deployment_id: str
    session_id: str
    position: int
    tokens: tuple[int, ...]
    hidden: np.ndarray | None
    sampling: Sampling
    return_logits: bool
    finish: bool
    done: Callable[[Result], None]
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens) if self.hidden is None else int(self.hidden.shape[0])


class Engine:
    def __init__(self, memory_bytes: int, session_timeout_s: float = 300.0, threads: int | None = None):
        self.threads = threads or os.cpu_count() or 1
        self.memory_bytes = memory_bytes
        self.session_timeout_s = session_timeout_s
        self.draining = False
        self.steps_computed = 0
        self._deployments: dict[str, Deployment] = {}
        self._lock = threading.RLock()
        self._jobs: queue.Queue = queue.Queue()
        self._deferred: list[Job] = []   # steps held for the next batch: a session's later step, or one over the token budget
        self._forget: list[tuple[Deployment, int]] = []   # (deployment, seq) of ended sessions, cleared between batches
        self._retired: list[Stage] = []              # dropped stages, closed between batches
        self._stop = threading.Event()
        self.on_death: Callable[[], None] = lambda: None    # the compute thread died: out of service
        self._thread = threading.Thread(target=self._compute, name="compute", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------- deployments

    def memory_used(self) -> int:
        with self._lock:
            return sum(d.memory.total for d in self._deployments.values())

    def deployments(self) -> list[Deployment]:
        with self._lock:
            return list(self._deployments.values())

    def active(self) -> Deployment | None:
        with self._lock:
            return next((d for d in self._deployments.values() if d.active), None)

    def get(self, deployment_id: str) -> Deployment:
        with self._lock:
            d = self.active() if not deployment_id else self._deployments.get(deployment_id)
        if d is None:
            what = "no deployment is active" if not deployment_id else f"deployment {deployment_id} is not loaded"
            raise EngineError(f"{what} on this agent; deploy a model first", "NOT_FOUND")
        return d

    def prepare(self, deployment_id: str, sha256: str, path: Path, next_address: str,
                max_sessions: int, context_length: int, max_batch_tokens: int = 512, groups: int = 1) -> Deployment:
        """Load a shard beside what is loaded; refuse before loading if it would not fit."""
        if not deployment_id:
            raise EngineError("prepare needs a deployment_id", "INVALID_ARGUMENT")
        if max_sessions < 1 or context_length < 1:
            raise EngineError("max_sessions and context_length must be at least 1", "INVALID_ARGUMENT")
        try:
            need, cfg, (first, last) = footprint(path, max_sessions, context_length, max_batch_tokens)
        except ValueError as exc:
            raise EngineError(f"shard {sha256[:12]} cannot be read: {exc}", "DATA_LOSS") from None
        with self._lock:
            old = self._deployments.get(deployment_id)
            if old is not None and old.sha256 == sha256 and old.next_address == next_address:
                old.groups = groups
                return old
            used = sum(d.memory.total for k, d in self._deployments.items() if k != deployment_id)
            if used + need.total > self.memory_bytes:
                raise EngineError(
                    f"shard {sha256[:12]} (layers {first}-{last - 1}) needs {fmt_bytes(need.total)} "
                    f"({fmt_bytes(need.weights)} weights + {fmt_bytes(need.kv_cache)} KV cache for {max_sessions} x "
                    f"{context_length} tokens + {fmt_bytes(need.compute)} llama.cpp compute buffers) but this agent "
                    f"offers {fmt_bytes(self.memory_bytes)} with {fmt_bytes(used)} in use; plan with less context or "
                    "concurrency, or give the agent more --memory", "RESOURCE_EXHAUSTED")
        t0 = time.perf_counter()
        try:
            stage = Stage(path, stage_settings(max_sessions, context_length, max_batch_tokens, self.threads))
        except ValueError as exc:
            raise EngineError(f"shard {sha256[:12]} cannot be loaded: {exc}", "DATA_LOSS") from None
        dep = Deployment(deployment_id, sha256, stage, next_address, max_sessions, context_length, need, groups)
        with self._lock:
            prev = self._deployments.get(deployment_id)
            dep.active = prev.active if prev is not None else False
            self._deployments[deployment_id] = dep
            if prev is not None:
                self._retired.append(prev.stage)
        self._jobs.put(False)   # wake the compute thread to close what was retired
        log.info("prepared deployment %s: layers [%d, %d) from shard %s in %.2f s (%s reserved)",
                 deployment_id, first, last, sha256[:12], time.perf_counter() - t0, fmt_bytes(need.total))
        return dep

    def activate(self, deployment_id: str) -> None:
        """Make a prepared deployment the one that serves; the previously active one is dropped."""
        with self._lock:
            if deployment_id not in self._deployments:
                raise EngineError(f"deployment {deployment_id} is not prepared on this agent; call Prepare first",
                                  "FAILED_PRECONDITION")
            for k, d in list(self._deployments.items()):
                if k != deployment_id and d.active:
                    del self._deployments[k]
                    self._retired.append(d.stage)
                    log.info("dropped deployment %s (%d sessions)", k, len(d.sessions))
            self._deployments[deployment_id].active = True
        log.info("activated deployment %s", deployment_id)

    def unload(self, deployment_id: str) -> bool:
        with self._lock:
            d = self._deployments.pop(deployment_id, None)
            if d is not None:
                self._retired.append(d.stage)
        self._jobs.put(False)
        if d is not None:
            log.info("unloaded deployment %s (%d sessions dropped)", deployment_id, len(d.sessions))
        return d is not None

    # -------------------------------------------------------------- sessions

    def session_count(self) -> int:
        with self._lock:
            return sum(len(d.sessions) for d in self._deployments.values())

    def holds(self, session_id: str) -> bool:
        """Whether any deployment here holds the session's KV cache."""
        with self._lock:
            return any(session_id in d.sessions for d in self._deployments.values())

    def busy_sessions(self, within_s: float) -> int:
        """Sessions that computed a step in the last within_s seconds (the others look abandoned)."""
        cutoff = time.monotonic() - within_s
        with self._lock:
            return sum(1 for d in self._deployments.values() for s in d.sessions.values() if s.last_used >= cutoff)

    def queue_depth(self) -> int:
        return sum(len(x) if isinstance(x, list) else 1 for x in list(self._jobs.queue)) + len(self._deferred)

    def cancel(self, deployment_id: str, session_id: str) -> bool:
        with self._lock:
            d = self._deployments.get(deployment_id) if deployment_id else self.active()
            return d is not None and self._end(d, session_id)

    def cancel_everywhere(self, session_id: str) -> None:
        """End the session on every deployment here (a failed step: whoever retries replays it)."""
        with self._lock:
            for d in self._deployments.values():
                self._end(d, session_id)

    def _end(self, d: Deployment, session_id: str) -> bool:
        """End a session (caller holds the lock). Its sequence id is reused only after the
        compute thread has removed its cells (_tidy), never before."""
        s = d.sessions.pop(session_id, None)
        if s is None:
            return False
        self._forget.append((d, s.seq))
        return True

    def submit(self, *jobs: Job) -> None:
        """Queue steps for the compute thread; several given at once go in one batch (as far
        as the stage's batch size allows)."""
        if jobs:
            self._jobs.put(jobs[0] if len(jobs) == 1 else list(jobs))

    def call(self, fn: Callable[[], object]) -> Future:
        """Run fn on the compute thread (e.g. profiling), between batches."""
        fut: Future = Future()
        self._jobs.put((fn, fut))
        return fut

    def stop(self) -> None:
        self._stop.set()
        self._jobs.put(None)
        self._thread.join(timeout=10)
        with self._lock:
            for d in self._deployments.values():
                self._retired.append(d.stage)
            self._deployments.clear()
        self._tidy()

    # -------------------------------------------------------------- the compute thread

    def _tidy(self) -> None:
        """Remove ended sessions' cells, then free their sequence ids; close retired stages
        (compute thread only, between batches)."""
        with self._lock:
            forget, self._forget = self._forget, []
            retired, self._retired = self._retired, []
        for d, seq in forget:
            if d.stage not in retired:
                d.stage.forget(seq)
        with self._lock:
            for d, seq in forget:
                d.free_seqs.append(seq)
        for stage in retired:
            stage.close()
            drop_cached(stage.path)
        if retired:
            release_freed_memory()

    def _compute(self) -> None:
        """The compute thread. Every step's failure is answered inside the loop; if the loop
        itself fails, the agent cannot compute any more and must leave service, not wedge."""
        try:
            self._compute_loop()
        except BaseException:
            log.critical("the compute thread died; this agent leaves service", exc_info=True)
            self.on_death()

    def _compute_loop(self) -> None:
        last_reap = time.monotonic()
        while not self._stop.is_set():
            self._tidy()
            try:
                item = self._deferred.pop(0) if self._deferred else self._jobs.get(timeout=1.0)
            except queue.Empty:
                item = False
            if time.monotonic() - last_reap > 1.0:
                self._reap_idle()
                last_reap = time.monotonic()
            if item is None or item is False:
                continue
            if isinstance(item, tuple):
                self._run_call(*item)
                continue
            if isinstance(item, list):      # steps submitted together: this batch takes them first
                item, self._deferred = item[0], item[1:]
            batch, (budget, most) = [item], self._limits(item)
            tokens = item.n_tokens
            while True:
                while self._deferred and len(batch) < most and tokens + self._deferred[0].n_tokens <= budget:
                    tokens += self._deferred[0].n_tokens
                    batch.append(self._deferred.pop(0))
                if self._deferred or len(batch) >= most or tokens >= budget:
                    break
                try:
                    nxt = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None or isinstance(nxt, tuple):
                    self._jobs.put(nxt)   # keep calls and the stop marker for the next round
                    break
                self._deferred.extend(nxt if isinstance(nxt, list) else [nxt])   # taken above if they fit
            self._tidy()   # sessions that ended while this thread waited free their ids first
            by_dep: dict[str, list[Job]] = {}
            for j in batch:
                by_dep.setdefault(j.deployment_id, []).append(j)
            for dep_id, jobs in by_dep.items():
                for part in self._parts(dep_id, jobs):
                    self._run_batch(dep_id, part)

    def _parts(self, dep_id: str, jobs: list[Job]) -> list[list[Job]]:
        """A batch of k one-token steps (a decode step of k sessions) runs as one llama_decode,
        or as k, one after the other, where this stage measured that faster: llama.cpp's step
        of two or three tokens takes its matrix-matrix path, which can cost more than as many
        one-token steps (Q8_0 and F16 here; docs/runtime.md). Until both figures are known, and
        every RELEARN-th time after, the batch runs as one, so that its figure follows the node."""
        k = len(jobs)
        if k < 2 or any(j.n_tokens != 1 for j in jobs):
            return [jobs]
        with self._lock:
            d = self._deployments.get(dep_id)
            if d is None:
                return [jobs]
            d.decodes[k] = seen = d.decodes.get(k, 0) + 1
            one, many = d.decode_s.get(1), d.decode_s.get(k)
        if one is None or many is None or seen % RELEARN == 0 or many <= k * one:
            return [jobs]
        return [[j] for j in jobs]

    def _limits(self, job: Job) -> tuple[int, int]:
        """(tokens, steps) one batch that starts with this job takes at most.

        Tokens: the stage's llama_decode size. A batch that held more would run as several
        decodes anyway, and every step in it would leave the stage only when the last one is
        done: a stage would hold a whole burst of prompts back, where it can pass the first on
        to the next stage while it computes the second.

        Steps: MAX_BATCH, and for a one-token step decode_group(sessions, groups). Without that
        limit, the sessions' steps bunch into one group that goes round the stages together
        while every other stage waits (docs/runtime.md)."""
        with self._lock:
            d = self._deployments.get(job.deployment_id)
            if d is None:
                return 1, MAX_BATCH
            sessions = len(d.sessions) + (job.session_id not in d.sessions)     # a new one counts too
            most = decode_group(sessions, d.groups) if job.n_tokens == 1 else MAX_BATCH
        return d.stage.settings.batch_tokens, most

    @staticmethod
    def _run_call(fn, fut: Future) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn())
        except BaseException as exc:  # handed to the caller
            fut.set_exception(exc)

    def _admit(self, d: Deployment, j: Job) -> Session:
        """The session's slot for this step, or an EngineError saying why not."""
        s = d.sessions.get(j.session_id)
        n = j.n_tokens
        length = d.stage.held(s.seq) if s is not None else 0
        if s is None:
            if j.position != 0:
                raise EngineError(f"session {j.session_id} is unknown on this stage (its KV cache was freed or "
                                  "lost); replay it from position 0", "NOT_FOUND")
            if self.draining:
                raise EngineError("this agent is shutting down and takes no new sessions", "UNAVAILABLE")
            if not d.free_seqs:
                raise EngineError(f"all {d.max_sessions} KV-cache slots are in use; retry when a session ends",
                                  "RESOURCE_EXHAUSTED")
        if j.position > length:
            raise EngineError(f"session {j.session_id} step at position {j.position} but the stage holds "
                              f"{length} positions; replay the missing tokens", "FAILED_PRECONDITION")
        if j.position + n > d.context_length:
            raise EngineError(f"session {j.session_id} would reach {j.position + n} tokens, beyond the "
                              f"deployment's context of {d.context_length}", "OUT_OF_RANGE")
        problem = self._input_problem(d.stage, j)
        if problem:
            raise EngineError(problem, "INVALID_ARGUMENT")
        if s is None:
            s = d.sessions[j.session_id] = Session(d.free_seqs.pop(), time.monotonic())
        return s

    @staticmethod
    def _input_problem(stage: Stage, j: Job) -> str:
        """Why a step cannot enter this stage, or ""."""
        if stage.takes_tokens:
            if j.hidden is not None or not j.tokens:
                return "the first stage takes token ids, not hidden states"
            bad = [t for t in j.tokens if not 0 <= t < stage.input_vocab]
            if bad:
                return f"token id {bad[0]} is outside the vocabulary of {stage.input_vocab}"
            return ""
        if j.hidden is None or j.hidden.ndim != 2 or j.hidden.shape[1] != stage.n_embd or not len(j.hidden):
            return f"this stage takes hidden states [tokens, {stage.n_embd}]"
        if not np.isfinite(j.hidden).all():
            return "the hidden states contain NaN or infinity"
        return ""

    def _run_batch(self, dep_id: str, jobs: list[Job]) -> None:
        start = time.perf_counter()
        with self._lock:
            try:
                d = self.get(dep_id)
            except EngineError as exc:
                for j in jobs:
                    self._fail(j, exc, start)
                return
            admitted: list[tuple[Job, Session]] = []
            for j in jobs:
                if any(j.session_id == a.session_id for a, _ in admitted):
                    # a second step of the same session waits for the first one's result
                    self._deferred.append(j)
                    continue
                try:
                    admitted.append((j, self._admit(d, j)))
                except EngineError as exc:
                    self._fail(j, exc, start)
        if not admitted:
            return
        steps = [Step(s.seq, j.position,
                      tokens=np.asarray(j.tokens, dtype=np.int32) if j.hidden is None else None,
                      hidden=np.asarray(j.hidden, dtype=np.float32) if j.hidden is not None else None)
                 for j, s in admitted]
        try:
            outs = d.stage.forward(steps, keep=False)     # logits read here, then copied only if returned
        except Exception as exc:  # a bug or an out-of-memory: answer every step, keep serving
            log.exception("forward pass failed on deployment %s", dep_id)
            with self._lock:
                for j, _ in admitted:
                    self._end(d, j.session_id)
            for j, _ in admitted:
                self._fail(j, EngineError(f"stage computation failed: {exc}", "INTERNAL"), start)
            return
        compute = time.perf_counter() - start
        now = time.monotonic()
        self.steps_computed += len(admitted)
        if all(j.n_tokens == 1 for j, _ in admitted):
            k = len(admitted)
            seen = d.decode_s.get(k)
            d.decode_s[k] = compute if seen is None else seen + 0.2 * (compute - seen)
        results = []
        for (j, s), out in zip(admitted, outs):
            s.last_used = now
            r = Result(j.session_id, j.position, compute_s=compute, queue_s=start - j.enqueued,
                       batch_size=len(admitted))
            if d.is_last:
                logits = out[-1]
                try:
                    r.token = sample(logits, j.sampling, j.position + j.n_tokens)
                except ValueError as exc:   # e.g. logits that are not finite: this session fails, no other
                    with self._lock:
                        self._end(d, j.session_id)
                    r = Result(j.session_id, j.position, queue_s=start - j.enqueued,
                               error=f"cannot sample from this step's logits: {exc}", error_code="INTERNAL")
                if j.return_logits and not r.error:
                    r.logits = np.array(logits)
            else:
                r.hidden = out
            if j.finish:
                with self._lock:
                    self._end(d, j.session_id)
            results.append((j, r))
        with together():    # the batch's messages leave together, one per stream (agent/shaping.py)
            for j, r in results:
                j.done(r)

    @staticmethod
    def _fail(j: Job, exc: EngineError, start: float) -> None:
        j.done(Result(j.session_id, j.position, queue_s=start - j.enqueued, error=str(exc), error_code=exc.code))

    def _reap_idle(self) -> None:
        cutoff = time.monotonic() - self.session_timeout_s
        with self._lock:
            for d in self._deployments.values():
                for sid in [k for k, s in d.sessions.items() if s.last_used < cutoff]:
                    self._end(d, sid)
                    log.info("freed the KV cache of idle session %s", sid)
