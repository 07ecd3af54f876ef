"""The Agent gRPC service: RPC handling only. Shards live in agent/store.py, compute in
agent/engine.py; this module turns calls into their operations and their errors into gRPC
status codes.

Forward: every upstream stream (from the controller, or from the previous agent) gets one
`Hop`. Steps are handed to the engine; a non-final stage sends each result's hidden states
down its own stream to the next agent and relays that agent's answers back up, adding its
own stage time; the final stage answers with the sampled token. A step that names a
collector (`reply_to`, the controller's `Collect` call on the last agent) carries the stage
times down with it, and the last stage answers it on that call, straight to the controller:
a decode step then crosses stages + 1 links, not 2 × stages. Errors still go up the chain.

A step of the first stage that asks to go on (`continue_tokens`) is continued by the last
stage itself: it answers the step, and makes the next one-token step of the session from the
token it sampled, without waiting for the controller. With one stage the step goes straight
back into the engine; with several it goes round to the first stage (the last stage's
next_address) on a `Ring` stream, so a decode step crosses as many links as there are
stages, and the controller's answers leave the path that makes the tokens.

Between agents these streams go on the next agent's data plane where it has one
(agent/dataplane.py, `Downstream`): a data-plane connection is one upstream stream, handled
as a Forward call (`forward_data`). The controller's collector goes there too where the last
agent has one (`collect_data`): its answers leave as frames from the compute thread that
sampled them, where a gRPC Collect call hands each to gRPC's threads.

A message may carry several steps (or answers: `more`). Those of one message go to the engine
together, so they are computed as one batch; the results of one batch leave together, one
message per stream (agent/shaping.py, `together`), so a batch stays one batch down the
stages and round the ring, and costs one message per hop instead of one per session.
"""
from __future__ import annotations

import dataclasses
import logging
import queue
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from google.protobuf.message import DecodeError

from agent import dataplane
from agent import weights as W
from agent.engine import Engine, EngineError, Job, Result
from agent.profile import MIN_PROBE_BYTES, PROBE_BYTES, median_time, time_types
from agent.runtime import release_freed_memory
from agent.sampling import Sampling
from agent.shaping import Shaper, merged, post
from agent.store import Chunk, PushError, ShardStore, check_sha
from proto import adapter as A
from proto import edgefleet_pb2 as pb
from proto import edgefleet_pb2_grpc as rpc
from proto.security import Security

log = logging.getLogger(__name__)
DIRECT_BYTES = 64 * 1024   # a message up to this size leaves from the sender's thread (Outbox)
PRUNE_EVERY = 1024      # steps a stream takes between looks for the sessions it names that ended elsewhere


def _abort(context, code: str, message: str):
    context.abort(getattr(grpc.StatusCode, code, grpc.StatusCode.UNKNOWN), message)


def _spec(d) -> A.StageSpec:
    st = d.stage
    return A.StageSpec(st.first, st.last, tuple(st.layer_types), st.has_embedding, st.has_head)


def _median_echo_s(stub, msg, md, repeats: int, timeout_s: float, shaper: Shaper | None = None) -> float:
    """Median wall time of `repeats` Echo round trips of msg; with a shaper, each request first
    crosses this agent's emulated uplink."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        if shaper is not None:
            shaper.send(msg.ByteSize())
        stub.Echo(msg, metadata=md, timeout=timeout_s)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Outbox:
    """The messages one thread or another sends on one stream: (deliver_at, message), a list
    of them (together()), or None (the end).

    On a data-plane connection with no emulated link (`attach(conn, direct=True)`), a message
    of up to DIRECT_BYTES leaves at once from the thread that puts it (the compute thread),
    unless the writer thread still has messages to send: no hand-off to a thread that a node
    under a CPU quota may not run for a while. Larger ones (prompts), shaped ones, and those
    put before the connection is made go through the writer thread's queue (`q`), so that the
    compute thread goes on while they are sent; messages leave in the order they were put
    either way. A gRPC call reads `q` itself (Shaper.delivered)."""

    def __init__(self):
        self.q: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._conn: dataplane.Connection | None = None
        self._direct = False
        self._writing = False           # the writer thread has messages not sent yet

    def attach(self, conn: dataplane.Connection, direct: bool, name: str) -> None:
        """Send on conn from now on: the writer thread starts (and sends what waits)."""
        with self._lock:
            self._conn, self._direct = conn, direct
        threading.Thread(target=self._write, args=(conn,), name=name, daemon=True).start()

    def put(self, entry) -> None:
        entries = entry if isinstance(entry, list) else [entry]
        with self._lock:
            if (self._direct and not self._writing and None not in entries
                    and sum(e[1].ByteSize() for e in entries) <= DIRECT_BYTES):
                try:
                    for _, msg in merged(entries):
                        self._conn.send(msg)
                except OSError:
                    pass        # the reader sees the connection break
                return
            self._writing = True
            self.q.put(entry)

    def _write(self, conn: dataplane.Connection) -> None:
        try:
            for msg in Shaper.delivered(self.q, self._sent_all):
                conn.send(msg)
            conn.send_end()
        except OSError:
            pass        # the reader sees the connection break

    def _sent_all(self) -> None:
        """The writer has sent everything it took: unless more waits, messages may leave at once."""
        with self._lock:
            if self.q.empty():
                self._writing = False


class Downstream:
    """This agent's stream to the next stage's agent (requests shaped by the emulated link): on
    the next agent's data plane where its State names one (agent/dataplane.py), else a gRPC
    Forward call. It connects on a thread of its own, so that a step never waits for that;
    its messages leave through an Outbox."""

    def __init__(self, address: str, security: Security, shaper: Shaper, on_output, on_broken,
                 every_end: bool = False):
        self.address = address
        self.every_end = every_end      # on_broken also when the stream ends without an error
        self.security = security
        self._shaper = shaper
        self._out = Outbox()
        self._lock = threading.Lock()
        self._conn: dataplane.Connection | None = None
        self._call = None
        self._cancelled = False
        self.broken = False
        self._on_output, self._on_broken = on_output, on_broken
        threading.Thread(target=self._run, name=f"down-{address}", daemon=True).start()

    def _open(self, channel):
        """The stream's answers: on the next agent's data plane if it has one, else gRPC's."""
        data = dataplane.data_address(channel, self.security)
        if data:
            conn = dataplane.connect(data, self.security)
            log.info("steps to the stage at %s go on its data plane at %s", self.address, data)
            with self._lock:
                self._conn = conn
                if self._cancelled:
                    conn.close()
            self._out.attach(conn, not self._shaper.active, f"down-write-{data}")
            return conn.messages(pb.StageOutput)
        log.info("steps to the stage at %s go by gRPC: it has no data plane", self.address)
        call = rpc.AgentStub(channel).Forward(Shaper.delivered(self._out.q), metadata=self.security.metadata())
        with self._lock:
            self._call = call
            if self._cancelled:
                call.cancel()
        return call

    def put(self, entry) -> None:
        """Send (deliver_at, message), a list of them (together()), or None (the end)."""
        self._out.put(entry)

    def _run(self) -> None:
        channel = None
        try:
            channel = self.security.channel(self.address)
            for m in self._open(channel):
                for one in A.unbatched(m):
                    self._on_output(A.step_out(one))
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                return self._fail(f"the next stage at {self.address} failed: {exc.details() or exc.code().name}")
        except (dataplane.DataError, OSError) as exc:
            if not self._cancelled:
                return self._fail(f"the next stage at {self.address} failed: {exc}")
        except A.WireError as exc:
            self.cancel()
            return self._fail(f"the next stage at {self.address} sent a malformed answer ({exc}); check that "
                              "every agent runs this version")
        except Exception as exc:        # e.g. an address the channel refuses
            return self._fail(f"cannot reach the next stage at {self.address}: {exc}")
        finally:
            if self._conn is not None:
                self._conn.close()
            if channel is not None:
                channel.close()
        self.broken = True      # an ended stream carries no more steps: the next send makes a new one
        if self.every_end:
            self._on_broken(self, f"the stream to the stage at {self.address} ended")

    def _fail(self, message: str) -> None:
        self.broken = True
        self._on_broken(self, message)

    def send(self, step: A.StepIn) -> None:
        msg = A.step_pb(step)
        post(self, (self._shaper.schedule(msg.ByteSize()), msg))

    def close(self) -> None:
        post(self, None)

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            conn, call = self._conn, self._call
        if conn is not None:
            conn.close()
        if call is not None:
            call.cancel()
        self._out.q.put(None)       # the data plane's writer ends


class Hop:
    """One upstream Forward stream through this agent."""

    def __init__(self, svc: "AgentService"):
        self.svc = svc
        self._out: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0
        self._upstream_done = False
        self._closed = False
        self._down: dict[str, Downstream] = {}
        self._sent: dict[tuple[str, int], tuple[A.StageTime, str]] = {}   # (session, position) -> my time, next address
        self._direct: dict[str, tuple[int, A.StageTime, str]] = {}   # session -> its latest step sent on with reply_to
        # sessions that came through this stream and are not ended -> deployment; one the stages
        # go on with ends on another stream (the way round): _prune forgets it here
        self._open: dict[str, str] = {}
        self._handled = 0
        self._stale: set[str] = set()       # sessions of _open and _direct that the engine no longer held at the last look

    # ---------------------------------------------------------- upstream side

    def responses(self, request_iterator):
        """The answers to the steps of request_iterator; whoever runs the stream calls
        cancelled() when it ends (the Forward call, or the data-plane connection)."""
        threading.Thread(target=self._read, args=(request_iterator,), name="hop-read", daemon=True).start()
        yield from Shaper.delivered(self._out)

    def _read(self, request_iterator) -> None:
        try:
            for m in request_iterator:
                try:
                    steps = A.unbatched(m)
                except A.WireError as exc:     # every step it names fails, none runs
                    steps = ()
                    for bad in (m, *m.more):
                        self._answer_now(A.StepOut(bad.session_id, bad.position, error=f"a malformed step: {exc}",
                                                   error_code="INVALID_ARGUMENT"))
                jobs = [j for one in steps if (j := self._take(one)) is not None]
                self.svc.engine.submit(*jobs)      # a message's steps go in one batch
        except (grpc.RpcError, dataplane.DataError, OSError):
            pass   # upstream went away; cancelled() cleans up
        finally:
            with self._lock:
                self._upstream_done = True
            self._maybe_close()

    def _take(self, m: pb.StageInput) -> Job | None:
        """One step as it came off the wire: checked, then handled (its job for the engine, or
        None); it fails alone."""
        try:
            step = A.step_in(m)
        except Exception as exc:  # WireError, or any message the checks did not foresee
            self._answer_now(A.StepOut(m.session_id, m.position, error=f"a malformed step: {exc}",
                                       error_code="INVALID_ARGUMENT"))
            return None
        try:
            return self._handle(step)
        except Exception as exc:  # a bug must fail this one step, never the stream's reader
            log.exception("step %s@%d failed", step.session_id, step.position)
            self._answer_now(A.StepOut(step.session_id, step.position, error=f"internal error: {exc}",
                                       error_code="INTERNAL"))
            return None

    def _handle(self, step: A.StepIn) -> Job | None:
        """A step's job for the engine, or None where it is answered (an error) or done here
        (a cancel)."""
        eng = self.svc.engine
        try:
            dep = eng.get(step.deployment_id)
        except EngineError as exc:
            self._answer_now(A.StepOut(step.session_id, step.position, error=str(exc), error_code=exc.code))
            return None
        if step.cancel:
            with self._lock:
                self._open.pop(step.session_id, None)
                self._direct.pop(step.session_id, None)
            eng.cancel(dep.deployment_id, step.session_id)
            if dep.is_last:
                self.svc.ring.end(step.session_id)
            elif dep.next_address:
                self._downstream(dep.next_address).send(step)
            return None
        try:
            sampling = Sampling(step.temperature, step.top_p, step.seed)
        except ValueError as exc:
            self._answer_now(A.StepOut(step.session_id, step.position, error=f"{exc}; fix the request",
                                       error_code="INVALID_ARGUMENT"))
            return None
        ends = _ends(step)
        with self._lock:
            self._pending += 1
            if ends:
                self._open.pop(step.session_id, None)
            else:
                self._open[step.session_id] = dep.deployment_id
            self._handled += 1
            prune = self._handled % PRUNE_EVERY == 0
        if prune:
            self._prune()
        return Job(dep.deployment_id, step.session_id, step.position, step.tokens, step.hidden,
                   sampling, step.return_logits, ends, done=lambda r, s=step, d=dep: self._computed(r, s, d))

    def _prune(self) -> None:
        """Forget sessions this stream's bookkeeping still names but no stage here holds any
        more, twice in a row (a continued session ends on another stream: module doc)."""
        with self._lock:
            names = set(self._open) | set(self._direct)
        gone = {sid for sid in names if not self.svc.engine.holds(sid)}
        with self._lock:
            for sid in gone & self._stale:
                self._open.pop(sid, None)
                self._direct.pop(sid, None)
            self._stale = gone

    def _go_on(self, step: A.StepIn, r: Result, dep) -> bool:
        """Make the session's next one-token step, where this last stage goes on by itself
        (module doc); False where the sender is to send it."""
        if step.continue_tokens <= 0 or r.token == step.stop_token:
            return False
        nxt = A.StepIn(step.session_id, step.position + step.n_tokens, tokens=(r.token,),
                       temperature=step.temperature, top_p=step.top_p, seed=step.seed,
                       finish=step.continue_tokens == 1, deployment_id=dep.deployment_id, reply_to=step.reply_to,
                       continue_tokens=step.continue_tokens - 1, stop_token=step.stop_token)
        if dep.stage.has_embedding:     # one stage: straight back into the engine
            if self._closed:            # nobody reads this stream any more: the session ends here
                self.svc.engine.cancel(dep.deployment_id, step.session_id)
                return False
            job = self._handle(nxt)     # before the answer, so that this stream stays open for it
            if job is not None:
                self.svc.engine.submit(job)
            return True
        if not dep.next_address or not (step.reply_to and self.svc.collecting(step.reply_to)):
            return False                # nowhere to go round to, or nobody to answer there
        return self.svc.ring.send(dep.next_address, nxt)

    def _computed(self, r: Result, step: A.StepIn, dep) -> None:
        mine = A.StageTime(self.svc.node.name, r.compute_s, r.queue_s, r.batch_size)
        times = step.stage_times + (mine,)
        if self._closed and not r.error:
            # the stream broke while this step waited for the engine: nobody takes its answer and
            # nobody continues its session, which the step made again after cancelled() ended it
            self.svc.engine.cancel(dep.deployment_id, r.session_id)
            self._settled()
        elif r.error:
            self._answer(A.StepOut(r.session_id, r.position, error=r.error, error_code=r.error_code,
                                   stage_times=times))
        elif dep.is_last:
            try:
                went = self._go_on(step, r, dep)
            except Exception:   # a bug must not end the compute thread this runs on: the sender goes on
                log.exception("session %s could not go on by itself", r.session_id)
                went = False
            if not went:
                self.svc.ring.end(r.session_id)
            out = A.StepOut(r.session_id, r.position, token=r.token, logits=r.logits, stage_times=times,
                            continued=went)
            if not (step.reply_to and self.svc.collect(step.reply_to, out)):
                self._answer(out)           # no such collector here (yet): up the chain
            else:
                self._settled()
        elif not dep.next_address:
            self._answer(A.StepOut(r.session_id, r.position, error="this stage has no next stage configured; "
                                   "redeploy", error_code="FAILED_PRECONDITION", stage_times=times))
        else:
            with self._lock:
                if step.reply_to:       # no answer comes back up unless an error: this step is settled here
                    self._direct[r.session_id] = (r.position, mine, dep.next_address)   # until _prune
                else:
                    self._sent[(r.session_id, r.position)] = (mine, dep.next_address)
            nxt = A.StepIn(step.session_id, step.position, hidden=r.hidden, temperature=step.temperature,
                           top_p=step.top_p, seed=step.seed, return_logits=step.return_logits,
                           finish=step.finish, deployment_id=dep.deployment_id, reply_to=step.reply_to,
                           stage_times=times if step.reply_to else (), continue_tokens=step.continue_tokens,
                           stop_token=step.stop_token)
            self._downstream(dep.next_address).send(nxt)
            if step.reply_to:
                self._settled()

    # ---------------------------------------------------------- downstream side

    def _downstream(self, address: str) -> Downstream:
        with self._lock:
            d = self._down.get(address)
            if d is None or d.broken:
                d = Downstream(address, self.svc.security, self.svc.shaper, self._relayed, self._broken)
                self._down[address] = d
            return d

    def _relayed(self, out: A.StepOut) -> None:
        with self._lock:
            mine, _ = self._sent.pop((out.session_id, out.position), (None, None))
            direct = mine is None and out.session_id in self._direct
            if direct and out.error:
                self._direct.pop(out.session_id, None)
        if direct:      # a direct step answered up the chain (an error, or no collector): its times are in it
            self._answer_now(out)
        elif mine is None:
            log.warning("dropping an answer for session %s position %d that this hop did not send",
                        out.session_id, out.position)
        else:
            self._answer(A.StepOut(out.session_id, out.position, out.token, out.logits, (mine,) + out.stage_times,
                                   out.error, out.error_code))

    def _broken(self, down: Downstream, message: str) -> None:
        """The next stage's stream failed: every step sent down it and not answered fails now
        (a direct step's answer may have reached the controller already; it ignores this one)."""
        log.warning("%s", message)
        with self._lock:
            lost = [(k, t) for k, (t, addr) in self._sent.items() if addr == down.address]
            for k, _ in lost:
                del self._sent[k]
            direct = [((sid, pos), t) for sid, (pos, t, addr) in self._direct.items() if addr == down.address]
            for (sid, _), _ in direct:
                del self._direct[sid]
        for (sid, pos), mine in lost:
            self._answer(A.StepOut(sid, pos, error=message, error_code="UNAVAILABLE", stage_times=(mine,)))
        for (sid, pos), mine in direct:
            self._answer_now(A.StepOut(sid, pos, error=message, error_code="UNAVAILABLE", stage_times=(mine,)))

    # ---------------------------------------------------------- answers and shutdown

    def _settled(self) -> None:
        """A step this hop took is done without an answer on this stream (it went on with reply_to)."""
        with self._lock:
            self._pending -= 1
        self._maybe_close()

    def _answer_now(self, out: A.StepOut) -> None:
        with self._lock:
            self._pending += 1
        self._answer(out)

    def _answer(self, out: A.StepOut) -> None:
        if out.error:
            # a failed step ends its session on every stage it passed: whoever retries replays it
            # from position 0, and an abandoned cache would hold memory until the idle timeout
            with self._lock:
                self._open.pop(out.session_id, None)
            self.svc.engine.cancel_everywhere(out.session_id)
        msg = A.out_pb(out)
        post(self._out, (self.svc.shaper.schedule(msg.ByteSize()), msg))
        with self._lock:
            self._pending -= 1
        self._maybe_close()

    def _maybe_close(self) -> None:
        with self._lock:
            if self._closed or not self._upstream_done or self._pending > 0:
                return
            self._closed = True
            downs = list(self._down.values())
        self._end_open_sessions()
        for d in downs:
            d.close()
        post(self._out, None)

    def cancelled(self) -> None:
        """The upstream stream ended. After a close of ours (every step settled) that is its normal
        end, and steps sent on with reply_to may still be on their way down: they go on."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            downs = list(self._down.values())
        self._end_open_sessions()
        for d in downs:
            d.cancel()
        post(self._out, None)

    def _end_open_sessions(self) -> None:
        """The stream that carried these sessions is gone (its sender ended or died): nobody can
        continue them, so their KV cache is freed now, not at the idle timeout. The next stage
        does the same when this hop's stream to it ends."""
        with self._lock:
            left, self._open = list(self._open.items()), {}
        for sid, dep_id in left:
            self.svc.engine.cancel(dep_id, sid)
        if left:
            log.info("upstream gone: ended %d open sessions", len(left))


def _ends(step: A.StepIn) -> bool:
    """Whether the session ends with this step (a continued session ends with its last step)."""
    return step.finish and not step.continue_tokens


class Ring:
    """The last stage's streams round to the first stage, one per address, shared by every
    session it continues (module doc). What comes back on them is an error of a continued
    step (or an answer nobody collected): it goes to the session's collector here."""

    def __init__(self, svc: "AgentService"):
        self.svc = svc
        self._lock = threading.Lock()
        self._down: dict[str, Downstream] = {}
        self._sessions: dict[str, tuple[str, int, Downstream]] = {}   # session -> collector, position, stream of its step out

    def send(self, address: str, step: A.StepIn) -> bool:
        """Send a continued step round; False if the stream to the first stage cannot be made."""
        with self._lock:
            d = self._down.get(address)
            if d is None or d.broken:
                try:
                    d = Downstream(address, self.svc.security, self.svc.shaper, self._answered, self._broken,
                                   every_end=True)
                except Exception as exc:    # e.g. an address the channel refuses
                    log.warning("cannot go round to the first stage at %s: %s", address, exc)
                    return False
                self._down[address] = d
            self._sessions[step.session_id] = (step.reply_to, step.position, d)
        d.send(step)
        return True

    def end(self, session_id: str) -> None:
        """The session goes round no more (its last step, a stop token, a cancel)."""
        with self._lock:
            self._sessions.pop(session_id, None)

    def _answered(self, out: A.StepOut) -> None:
        """An answer of the session's step on its way round (an error, or one nobody collected
        at the last stage); one for an earlier step is stale, and dropped."""
        with self._lock:
            entry = self._sessions.get(out.session_id)
            if entry is None or entry[1] != out.position:
                entry = None
            else:
                del self._sessions[out.session_id]
        if entry is None:
            log.debug("dropping a stale answer for session %s position %d", out.session_id, out.position)
            return
        if out.error:   # as a hop's failed step: the session ends here too, the controller replays it
            self.svc.engine.cancel_everywhere(out.session_id)
        if not self.svc.collect(entry[0], dataclasses.replace(out, continued=False)):
            log.debug("dropping an answer for session %s position %d: nobody collects it", out.session_id,
                      out.position)

    def _broken(self, down: Downstream, message: str) -> None:
        log.warning("%s", message)
        with self._lock:
            lost = [(sid, e) for sid, e in self._sessions.items() if e[2] is down]
            for sid, _ in lost:
                del self._sessions[sid]
        for sid, (collector, pos, _) in lost:
            self.svc.collect(collector, A.StepOut(sid, pos, error=message, error_code="UNAVAILABLE"))


class AgentService(rpc.AgentServicer):
    def __init__(self, node: A.NodeInfo, store: ShardStore, engine: Engine, security: Security, shaper: Shaper,
                 local_address: str = "", local_data_address: str = ""):
        self.node = node
        self.local_address = local_address      # this agent as it reaches itself (the step-overhead probe)
        self.local_data_address = local_data_address    # and its data plane ("" = none)
        self.store = store
        self.engine = engine
        self.security = security
        self.shaper = shaper
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="loader")
        self._collectors: dict[str, queue.Queue | Outbox] = {}     # collector id -> where its answers go
        self._collectors_lock = threading.Lock()
        self.ring = Ring(self)

    # ---------------------------------------------------------- shards

    def HasShard(self, request, context):
        try:
            sha = check_sha(request.sha256)
        except PushError as exc:
            _abort(context, exc.code, str(exc))
        return pb.ShardStatus(sha256=sha, present=self.store.has(sha))

    def PushShard(self, request_iterator, context):
        chunks = (Chunk(c.sha256, c.total_bytes, c.data) for c in request_iterator)
        try:
            r = self.store.receive(chunks, max_bytes=self.engine.memory_bytes)
        except PushError as exc:
            log.warning("push refused: %s", exc)
            _abort(context, exc.code, str(exc))
        except grpc.RpcError:
            _abort(context, "CANCELLED", "the push was interrupted; push the shard again")
        return pb.ShardStatus(sha256=r.sha256, present=True, bytes_received=r.bytes_received)

    # ---------------------------------------------------------- deployments

    def Prepare(self, request, context):
        try:
            sha = check_sha(request.sha256)
        except PushError as exc:
            _abort(context, exc.code, str(exc))
        if not self.store.has(sha):
            _abort(context, "NOT_FOUND", f"shard {sha[:12]} is not on this agent; push it first")
        if not self.store.intact(sha):
            _abort(context, "NOT_FOUND", f"shard {sha[:12]} on this agent was corrupt (its bytes no longer hash to "
                                         "its SHA-256) and was deleted; push it again")
        fut = self._loader.submit(self.engine.prepare, request.deployment_id, sha, self.store.path(sha),
                                  request.next_address, request.max_sessions or 1, request.context_length or 2048,
                                  request.max_batch_tokens or 512, request.groups or 1)
        try:
            d = fut.result()
        except EngineError as exc:
            log.warning("prepare refused: %s", exc)
            _abort(context, exc.code, str(exc))
        return pb.Ack(message=f"prepared layers [{d.stage.first}, {d.stage.last}) for deployment "
                              f"{d.deployment_id}")

    def Activate(self, request, context):
        try:
            self.engine.activate(request.deployment_id)
        except EngineError as exc:
            _abort(context, exc.code, str(exc))
        return pb.Ack(message=f"deployment {request.deployment_id} is active")

    def Unload(self, request, context):
        found = self.engine.unload(request.deployment_id)
        return pb.Ack(message=f"deployment {request.deployment_id} " + ("unloaded" if found else "was not loaded"))

    # ---------------------------------------------------------- pipeline

    def Forward(self, request_iterator, context):
        hop = Hop(self)
        context.add_callback(hop.cancelled)
        yield from hop.responses(request_iterator)

    def forward_data(self, conn: dataplane.Connection) -> None:
        """Forward on the data plane (agent/dataplane.py): one connection is one stream."""
        hop = Hop(self)
        broke = []

        def requests():
            try:
                yield from conn.messages(pb.StageInput)
            except (dataplane.DataError, OSError) as exc:
                log.info("a data-plane stream from upstream broke: %s", exc)
                broke.append(exc)
                hop.cancelled()

        try:
            for msg in hop.responses(requests()):
                conn.send(msg)
            if not broke:       # a stream that broke ends without the end of messages: its sender sees that
                conn.send_end()
        except OSError:
            pass
        finally:
            hop.cancelled()

    def Collect(self, request, context):
        q: queue.Queue = queue.Queue()
        refusal = self._open_collector(request.collector_id, q)
        if refusal:
            _abort(context, *refusal)
        context.add_callback(lambda: self._close_collector(request.collector_id, q))
        yield from Shaper.delivered(q)

    def collect_data(self, conn: dataplane.Connection) -> None:
        """Collect on the data plane (agent/dataplane.py, kind `collect`): the client's first
        frame is a CollectRequest, answered by one frame, `ok` or a sentence saying why not;
        then the answers go out as StageOutput frames, from the thread that makes them, until
        the client ends the connection."""
        try:
            req = pb.CollectRequest()
            req.ParseFromString(conn.receive() or b"")
        except (dataplane.DataError, DecodeError, OSError) as exc:
            log.info("a data-plane collector broke before it opened: %s", exc)
            return
        out = Outbox()
        refusal = self._open_collector(req.collector_id, out)
        try:
            conn.send_bytes(refusal[1].encode() if refusal else b"ok")
            if refusal:
                return
            out.attach(conn, not self.shaper.active, f"collect-write-{req.collector_id[:8]}")
            log.info("a collector opened on the data plane (%s)", req.collector_id)
            while conn.receive() is not None:       # the client sends nothing more; its end closes
                pass
        except (dataplane.DataError, OSError):
            pass
        finally:
            if not refusal:
                self._close_collector(req.collector_id, out)
                log.info("a collector closed on the data plane (%s)", req.collector_id)

    def _open_collector(self, cid: str, target) -> tuple[str, str] | None:
        """Open the controller's collector `cid` here, sending to target (a queue or an Outbox):
        None, or (status code, a sentence) where it cannot be opened."""
        if not cid or len(cid) > 128:
            return "INVALID_ARGUMENT", "a collector needs an id of 1 to 128 characters"
        with self._collectors_lock:
            if cid in self._collectors:
                return "ALREADY_EXISTS", f"collector {cid} is already open on this agent; choose another id"
            self._collectors[cid] = target
        return None

    def _close_collector(self, cid: str, target) -> None:
        with self._collectors_lock:
            if self._collectors.get(cid) is target:
                del self._collectors[cid]
        target.put(None)

    def collecting(self, collector_id: str) -> bool:
        """Whether the controller's collector is open here."""
        with self._collectors_lock:
            return collector_id in self._collectors

    def collect(self, collector_id: str, out: A.StepOut) -> bool:
        """Send a last stage's answer to the controller's collector; False if it is not open here."""
        with self._collectors_lock:
            q = self._collectors.get(collector_id)
        if q is None:
            return False
        msg = A.out_pb(out)
        post(q, (self.shaper.schedule(msg.ByteSize()), msg))
        return True

    # ---------------------------------------------------------- measurements

    def Echo(self, request, context):
        reply = pb.ShardChunk(total_bytes=len(request.data))
        self.shaper.send(reply.ByteSize())
        return reply

    def Profile(self, request, context):
        timings: tuple = ()
        n_embd = n_ff = 0
        if not request.link_only:
            try:
                shard = self._profile_shard(request.sha256)
                cfg = W.read_config(W.open_gguf(shard, layout_only=True))
            except EngineError as exc:
                _abort(context, exc.code, str(exc))
            except ValueError as exc:
                _abort(context, "DATA_LOSS", str(exc))
            try:
                # the probe is memory this node offered: at most a third of what is free now
                free = self.engine.memory_bytes - self.engine.memory_used()
                probe = max(MIN_PROBE_BYTES, min(PROBE_BYTES, free // 6))
                timings = tuple(self.engine.call(lambda: time_types(
                    shard, list(request.gguf_types), request.prefill_tokens or 64, request.repeats or 5,
                    self.engine.threads, probe)).result())
                release_freed_memory()
            except ValueError as exc:
                _abort(context, "INVALID_ARGUMENT", str(exc))
            n_embd, n_ff = cfg.n_embd, cfg.n_ff
        overhead = self._step_overhead(n_embd) if n_embd else 0.0
        rtt = bandwidth = 0.0
        if request.peer_address:
            try:
                rtt, bandwidth = self._measure_link(request.peer_address, request.probe_bytes or (1 << 20))
            except grpc.RpcError as exc:
                _abort(context, "UNAVAILABLE",
                       f"peer {request.peer_address} is unreachable: {exc.details() or exc.code().name}")
        return A.profile_pb(A.ProfileResult(timings, rtt, bandwidth, n_embd, n_ff, overhead))

    def _step_overhead(self, n_embd: int, repeats: int = 5) -> float:
        """What a stage costs a step besides its compute: a round trip of one token's hidden
        state to this agent itself on the transport its peers use, the data plane where it has
        one, else gRPC (a message received, answered and read back, its serialization and
        thread hand-offs), at this node's CPU speed and share: timed in blocks of back-to-back
        round trips, as the layers are (profile.median_time), so that a node under a CPU quota
        reads its sustained speed. 0 when the agent cannot reach itself (the solver then uses
        its default)."""
        if self.local_data_address:
            payload = bytes(4 * n_embd)
            try:
                conn = dataplane.connect(self.local_data_address, self.security, dataplane.ECHO)
                try:
                    return max(median_time(lambda: (conn.send_bytes(payload), conn.receive()), repeats), 1e-6)
                finally:
                    conn.close()
            except (dataplane.DataError, OSError) as exc:
                log.warning("could not time a step's overhead on this agent's data plane: %s", exc)
                return 0.0
        if not self.local_address:
            return 0.0
        probe = pb.ShardChunk(data=bytes(4 * n_embd))
        try:
            with self.security.channel(self.local_address) as ch:
                stub, md = rpc.AgentStub(ch), self.security.metadata()
                rtt = median_time(lambda: stub.Echo(probe, metadata=md, timeout=10), repeats)
        except grpc.RpcError as exc:
            log.warning("could not time a step's overhead against this agent itself: %s", exc.code().name)
            return 0.0
        shaped = self.shaper.latency + (pb.ShardChunk(total_bytes=probe.ByteSize()).ByteSize() / self.shaper.bandwidth
                                        if self.shaper.bandwidth else 0.0)    # Echo's reply crosses the emulated link
        return max(rtt - shaped, 1e-6)

    def _profile_shard(self, sha: str):
        """The shard whose first layer is timed: the one named, else the active stage's."""
        if sha:
            if not self.store.has(sha):
                raise EngineError(f"shard {sha[:12]} is not on this agent; push it first", "NOT_FOUND")
            return self.store.path(sha)
        d = self.engine.active()
        if d is None:
            raise EngineError("nothing to profile: no deployment is active; name a pushed shard's sha256",
                              "FAILED_PRECONDITION")
        return d.stage.path

    def _measure_link(self, address: str, probe_bytes: int) -> tuple[float, float]:
        """Median round trip of small echoes, and bandwidth from one large echo."""
        md = self.security.metadata()
        with self.security.channel(address) as ch:
            stub = rpc.AgentStub(ch)
            stub.Echo(pb.ShardChunk(), metadata=md, timeout=30)   # connect
            rtt = _median_echo_s(stub, pb.ShardChunk(data=b"x"), md, 5, timeout_s=30, shaper=self.shaper)
            big = pb.ShardChunk(data=bytes(probe_bytes))
            t0 = time.perf_counter()
            self.shaper.send(big.ByteSize())
            stub.Echo(big, metadata=md, timeout=120)
            elapsed = time.perf_counter() - t0
        return rtt, probe_bytes / max(elapsed - rtt, 1e-9)

    def State(self, request, context):
        return A.state_pb(self.state())

    def state(self) -> A.AgentState:
        deps = self.engine.deployments()
        active = next((d.deployment_id for d in deps if d.active), "")
        return A.AgentState(
            node=self.node, memory_used_bytes=self.engine.memory_used(), sessions=self.engine.session_count(),
            queue_depth=self.engine.queue_depth(), active_deployment_id=active,
            stages=tuple(A.LoadedStage(d.deployment_id, d.sha256, _spec(d), d.next_address, d.active,
                                       d.memory.total) for d in deps),
            shards=tuple(self.store.list()), bytes_received=self.store.bytes_received,
            steps_computed=self.engine.steps_computed, draining=self.engine.draining)
