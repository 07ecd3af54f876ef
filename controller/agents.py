"""Talking to agents: shard pushes, two-phase loads, profiles, and the pipeline stream.

Every failure surfaces as `AgentError` with one sentence that names the agent and says what
to do, and the gRPC status name in `code`.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc

from agent import dataplane
from controller.shards import file_sha256
from proto import adapter as A
from proto import edgefleet_pb2 as pb
from proto import edgefleet_pb2_grpc as rpc
from proto.security import Security

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
EARLY_KEPT = 4096       # sessions whose continued answers a PipelineStream keeps before anyone waits for them


class AgentError(RuntimeError):
    def __init__(self, message: str, code: str = "UNKNOWN"):
        super().__init__(message)
        self.code = code


def rpc_error(where: str, exc: grpc.RpcError) -> AgentError:
    code = exc.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        msg = f"{where} is unreachable ({exc.details()}); check that it runs and the address is right"
    elif code == grpc.StatusCode.UNAUTHENTICATED:
        msg = f"{where} refused the fleet token; pass the same --token the fleet was started with"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        msg = f"{where} did not answer in time; it may be overloaded or the link is down"
    else:
        msg = f"{where}: {exc.details() or code.name}"
    return AgentError(msg, code.name)


class AgentClient:
    def __init__(self, address: str, security: Security = Security(), name: str = "", timeout_s: float = 30.0):
        self.address = address
        self.where = f"agent {name} at {address}" if name else f"agent at {address}"
        self.security = security
        self.timeout_s = timeout_s
        self._channel = security.channel(address)
        self._stub = rpc.AgentStub(self._channel)
        self._md = security.metadata()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, method: str, request, timeout: float | None = None):
        try:
            return getattr(self._stub, method)(request, metadata=self._md, timeout=timeout or self.timeout_s)
        except grpc.RpcError as exc:
            raise rpc_error(self.where, exc) from None

    def state(self) -> A.AgentState:
        return A.agent_state(self._call("State", pb.Empty()))

    def round_trip_s(self, repeats: int = 5) -> float:
        """Median round trip of a one-byte echo: the agent's reply crosses its (emulated) link
        as a token's does."""
        times = []
        for _ in range(repeats + 1):        # the first connects
            t0 = time.perf_counter()
            self._call("Echo", pb.ShardChunk(data=b"x"))
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])

    def has_shard(self, sha: str) -> bool:
        return self._call("HasShard", pb.ShardRef(sha256=sha)).present

    def push_shard(self, path: str | Path, sha: str | None = None,
                   progress: Callable[[int], None] | None = None, chunk_bytes: int = CHUNK_BYTES) -> int:
        """Send a shard unless the agent holds it; returns the bytes sent (0 when it was there)."""
        path = Path(path)
        sha = sha or file_sha256(path)
        total = path.stat().st_size
        if self.has_shard(sha):
            if progress:
                progress(total)
            return 0

        def chunks():
            yield pb.ShardChunk(sha256=sha, total_bytes=total)
            with open(path, "rb") as f:
                while block := f.read(chunk_bytes):
                    yield pb.ShardChunk(data=block)
                    if progress:
                        progress(len(block))

        try:
            reply = self._stub.PushShard(chunks(), metadata=self._md, timeout=max(self.timeout_s, total / 1e6))
        except grpc.RpcError as exc:
            raise rpc_error(f"{self.where} (pushing shard {sha[:12]})", exc) from None
        return int(reply.bytes_received)

    def prepare(self, deployment_id: str, sha: str, next_address: str, max_sessions: int,
                context_length: int, max_batch_tokens: int = 512, groups: int = 1, timeout_s: float = 300.0) -> str:
        return self._call("Prepare", pb.LoadRequest(
            sha256=sha, deployment_id=deployment_id, next_address=next_address, max_sessions=max_sessions,
            context_length=context_length, max_batch_tokens=max_batch_tokens, groups=groups), timeout_s).message

    def activate(self, deployment_id: str) -> str:
        return self._call("Activate", pb.DeploymentRef(deployment_id=deployment_id)).message

    def unload(self, deployment_id: str) -> str:
        return self._call("Unload", pb.DeploymentRef(deployment_id=deployment_id)).message

    def profile(self, types: list[str] | None = None, prefill_tokens: int = 64, peer: str = "",
                probe_bytes: int = 1 << 20, sha: str = "", repeats: int = 5, link_only: bool = False,
                timeout_s: float = 600.0) -> A.ProfileResult:
        return A.profile_result(self._call("Profile", pb.ProfileRequest(
            gguf_types=types or [], prefill_tokens=prefill_tokens, peer_address=peer, probe_bytes=probe_bytes,
            sha256=sha, repeats=repeats, link_only=link_only), timeout_s))


class StepFailed(AgentError):
    """A step the pipeline answered with an error (the stream itself is still usable)."""


class Answer:
    """The answer to one step sent on a PipelineStream."""

    def __init__(self, stream: "PipelineStream", key: tuple[str, int], box: queue.Queue):
        self._stream, self._key, self._box = stream, key, box

    def wait(self, timeout_s: float | None = None) -> A.StepOut:
        """The step's answer; StepFailed if the pipeline reports an error, AgentError past the deadline."""
        try:
            out = self._box.get(timeout=timeout_s)
        except queue.Empty:
            self._stream._forget(self._key)
            raise AgentError(f"no answer from the pipeline within {timeout_s:.1f} s, its deadline",
                             "DEADLINE_EXCEEDED") from None
        if out.error:
            raise StepFailed(out.error, out.error_code)
        return out

    def abandon(self) -> None:
        """Nobody waits for this answer any more (its session is being cancelled)."""
        self._stream._forget(self._key)


class PipelineStream:
    """One Forward stream into the first stage, shared by many sessions (thread-safe).

    Given the last stage's address (`last`, a different agent), it also opens a collector
    there and every step names it (`reply_to`): answers come straight from the last stage
    instead of back up the chain, and errors still come up the chain. The collector is on the
    last agent's data plane where its State names one (one frame per answer, sent by the
    thread that sampled it; agent/dataplane.py), else a gRPC `Collect` call. The answer that
    arrives first for a step is the one its waiter gets. The answer to a step the stages made
    themselves (a continued one) may come before anyone waits for it (`expect`): while the
    stages go on with a session, such an answer is kept until then (for the EARLY_KEPT
    sessions that had one last), and dropped when the session is cancelled, its next step is
    sent from here, or its waiter gives up."""

    def __init__(self, address: str, security: Security = Security(), deployment_id: str = "", last: str = ""):
        self.address = address
        self.deployment_id = deployment_id
        self._channel = security.channel(address)
        self._q: queue.Queue = queue.Queue()
        self._waiters: dict[tuple[str, int], queue.Queue] = {}
        self._early: collections.OrderedDict[str, dict[int, A.StepOut]] = collections.OrderedDict()
        self._going: set[str] = set()      # sessions sent with continue_tokens whose stages may still go on
        self._lock = threading.Lock()
        self.broken: AgentError | None = None
        # set before the reader starts: a Forward call that ends at once ends the collector (_end_collector)
        self._closed = False
        self.collector, self._collect, self._collect_conn, self._last_channel = "", None, None, None
        self._call = rpc.AgentStub(self._channel).Forward(iter(self._q.get, None), metadata=security.metadata())
        self._reader = threading.Thread(target=self._read, args=(self._call, f"first stage at {address}", True),
                                        name="pipeline-read", daemon=True)
        self._reader.start()
        if last and last != address:
            self.collector = uuid.uuid4().hex
            self._last_channel = security.channel(last)
            threading.Thread(target=self._collect_answers, args=(security, f"last stage at {last}"),
                             name="pipeline-collect", daemon=True).start()

    def _collect_answers(self, security: Security, who: str) -> None:
        """Open the collector, then read its answers. On a thread of its own, as gRPC opens its
        calls: the stream is there at once, and a last agent slow to answer holds up nobody.
        Until the collector is open there, the last stage answers up the chain."""
        conn = self._collect_on_data_plane(security)
        with self._lock:
            closed = self._closed
            if not closed and conn is not None:
                self._collect_conn = conn
            elif not closed:
                self._collect = rpc.AgentStub(self._last_channel).Collect(
                    pb.CollectRequest(collector_id=self.collector), metadata=security.metadata())
        if closed:      # close() or the Forward call's end came first: it found nothing of this to end
            if conn is not None:
                conn.close()
            self._last_channel.close()
            return
        self._read(conn.messages(pb.StageOutput) if conn is not None else self._collect, who)

    def _collect_on_data_plane(self, security: Security) -> dataplane.Connection | None:
        """The collector's connection on the last agent's data plane, or None where it has none
        or it cannot be reached there now (then the gRPC call serves, and reports what is wrong)."""
        try:
            where = dataplane.data_address(self._last_channel, security)
        except (grpc.RpcError, ValueError):     # ValueError: the stream ended and closed the channel first
            return None
        if not where:
            return None
        try:
            conn = dataplane.connect(where, security, dataplane.COLLECT)
        except dataplane.DataError as exc:
            log.warning("%s; the answers come by gRPC", exc)
            return None
        try:
            conn.send(pb.CollectRequest(collector_id=self.collector))
            reply = conn.receive()
        except (dataplane.DataError, OSError) as exc:
            conn.close()
            log.warning("the collector on the data plane at %s failed (%s); the answers come by gRPC", where, exc)
            return None
        if reply != b"ok":
            conn.close()
            log.warning("the agent at %s refused a collector on its data plane (%s); the answers come by gRPC",
                        where, (reply or b"no reason given").decode(errors="replace"))
            return None
        return conn

    def _read(self, answers, who: str, forward: bool = False) -> None:
        """Read answers until their stream ends; the Forward stream's end (forward) also ends
        the collector: no more steps go this way, so none will be answered there."""
        try:
            for m in answers:
                for one in A.unbatched(m):
                    self._answered(A.step_out(one))
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                with self._lock:
                    self.broken = self.broken or rpc_error(who, exc)
        except (dataplane.DataError, OSError) as exc:
            with self._lock:
                self.broken = self.broken or AgentError(f"the stream from the {who} broke ({exc})", "UNAVAILABLE")
        except A.WireError as exc:
            with self._lock:
                self.broken = self.broken or AgentError(f"the {who} sent a malformed answer ({exc}); "
                                                        "check that every agent runs this version", "INTERNAL")
        finally:    # an ended stream carries no more steps: later ones fail at once, and a new stream is made
            with self._lock:
                self.broken = self.broken or AgentError(f"the pipeline stream to the {who} closed", "UNAVAILABLE")
            self._fail_waiters(self.broken)
            if forward:
                self._end_collector()

    def _answered(self, out: A.StepOut) -> None:
        """An answer off the wire: to its waiter, or kept for one (class doc)."""
        key = (out.session_id, out.position)
        with self._lock:
            w = self._waiters.pop(key, None)
            going = out.session_id in self._going
            if not out.continued:   # the stages go on no further with it
                self._going.discard(out.session_id)
            if w is None and going:
                self._early.setdefault(out.session_id, {}).setdefault(out.position, out)
                self._early.move_to_end(out.session_id)
                while len(self._early) > EARLY_KEPT:
                    self._early.popitem(last=False)
        if w is not None:
            w.put(out)

    def _fail_waiters(self, err: AgentError) -> None:
        """Answer every step still waiting on this stream with `err`."""
        with self._lock:
            waiters, self._waiters = list(self._waiters.items()), {}
        for (sid, pos), w in waiters:
            w.put(A.StepOut(sid, pos, error=str(err), error_code=err.code))

    def send(self, step: A.StepIn) -> "Answer":
        """Send one step without waiting; its answer comes through the returned handle."""
        w: queue.Queue = queue.Queue(maxsize=1)
        key = (step.session_id, step.position)
        with self._lock:
            if self.broken is not None:
                raise self.broken
            self._early.pop(step.session_id, None)  # a step sent from here: the session's stages went on no further
            if step.continue_tokens:
                self._going.add(step.session_id)
            else:
                self._going.discard(step.session_id)
            self._waiters[key] = w
        self._q.put(A.step_pb(dataclasses.replace(step, reply_to=self.collector) if self.collector else step))
        return Answer(self, key, w)

    def expect(self, session_id: str, position: int) -> "Answer":
        """The answer to a step the stages make themselves (StepOut.continued), not sent from here."""
        w: queue.Queue = queue.Queue(maxsize=1)
        key = (session_id, position)
        with self._lock:
            early = self._early_pop(key)
            if early is not None:
                w.put(early)
            elif self.broken is not None:
                raise self.broken
            else:
                self._waiters[key] = w
        return Answer(self, key, w)

    def step(self, step: A.StepIn, timeout_s: float | None = None) -> A.StepOut:
        """Send one step and wait for its answer; StepFailed if the pipeline reports an error."""
        return self.send(step).wait(timeout_s)

    def _early_pop(self, key: tuple[str, int]) -> A.StepOut | None:
        """The kept answer for a step, if any (caller holds the lock)."""
        kept = self._early.get(key[0])
        if kept is None:
            return None
        out = kept.pop(key[1], None)
        if not kept:
            del self._early[key[0]]
        return out

    def _forget(self, key: tuple[str, int]) -> None:
        with self._lock:
            self._waiters.pop(key, None)
            self._early.pop(key[0], None)
            self._going.discard(key[0])

    def cancel_session(self, session_id: str) -> None:
        with self._lock:
            self._early.pop(session_id, None)
            self._going.discard(session_id)
        self._q.put(A.step_pb(A.StepIn(session_id, 0, cancel=True, deployment_id=self.deployment_id)))

    def close(self, why: str = "") -> None:
        """End the stream now: a step still waiting fails at once (with `why`, UNAVAILABLE),
        without waiting on a stage that may be frozen."""
        with self._lock:
            self.broken = self.broken or AgentError(why or f"the pipeline stream to {self.address} was closed",
                                                    "UNAVAILABLE")
        self._fail_waiters(self.broken)
        self._q.put(None)
        self._call.cancel()
        self._end_collector()
        self._reader.join(timeout=10)
        self._channel.close()

    def _end_collector(self) -> None:
        """End the collector, open or still opening (it then ends as soon as it opens)."""
        with self._lock:
            self._closed = True
            collect, conn = self._collect, self._collect_conn
        if collect is not None:
            collect.cancel()
        if conn is not None:
            conn.close()
        if self._last_channel is not None:
            self._last_channel.close()
