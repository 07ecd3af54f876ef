"""Link emulation: make an agent's outgoing messages behave as if sent over a slow link.

Each message occupies the agent's uplink for bytes / bandwidth (messages queue behind each
other, as on a real network interface) and then arrives `latency` later. This is the same
store-and-forward model as solver/cost.py, so a one-machine fleet with emulated links is
what the cost model predicts for a LAN of edge devices.
"""
from __future__ import annotations

import contextlib
import queue
import threading
import time

MERGE_BYTES = 4 * 2 ** 20     # at most this much in one merged message (gRPC takes 64 MiB)


class Shaper:
    def __init__(self, bandwidth_bytes_per_s: float | None = None, latency_s: float = 0.0):
        if bandwidth_bytes_per_s is not None and bandwidth_bytes_per_s <= 0:
            raise ValueError("emulated bandwidth must be positive")
        if latency_s < 0:
            raise ValueError("emulated latency must be >= 0")
        self.bandwidth = bandwidth_bytes_per_s
        self.latency = latency_s
        self._free_at = 0.0
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return self.bandwidth is not None or self.latency > 0

    def schedule(self, nbytes: int) -> float:
        """Reserve the uplink for a message sent now; returns when it arrives (monotonic clock)."""
        now = time.monotonic()
        if not self.active:
            return now
        with self._lock:
            start = max(now, self._free_at)
            self._free_at = start + (nbytes / self.bandwidth if self.bandwidth else 0.0)
            return self._free_at + self.latency

    @staticmethod
    def wait_until(deadline: float) -> None:
        delay = deadline - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    @staticmethod
    def delivered(q):
        """Yield the messages put on q as (deliver_at, message), at their delivery time, until
        None. Those already waiting behind the first go in the same message (merge, up to
        MERGE_BYTES in all), delivered with the last of them."""
        pending: list = []       # one taken from q that did not fit (or the end): it goes next
        while (item := pending.pop() if pending else q.get()) is not None:
            deliver_at, msg = item
            size = msg.ByteSize()
            while not pending:
                try:
                    nxt = q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None or size + nxt[1].ByteSize() > MERGE_BYTES:
                    pending.append(nxt)
                else:
                    deliver_at = max(deliver_at, nxt[0])
                    size += nxt[1].ByteSize()
                    merge(msg, [nxt[1]])
            Shaper.wait_until(deliver_at)
            yield msg

    def send(self, nbytes: int) -> None:
        """Block for as long as sending nbytes would take."""
        self.wait_until(self.schedule(nbytes))


# ------------------------------------------------------------------ messages sent together
#
# A stage's results of one batch are posted to the streams they go out on (the next stage,
# the way round, the controller) inside `together()`: each stream then gets them as one
# message, so that the next stage receives them at once, computes them as one batch, and
# pays one message's cost, not one each (proto/edgefleet.proto, StageInput.more).

_held = threading.local()


def merge(first, others) -> None:
    """Append messages (StageInput or StageOutput) to first's `more`, flattened: one level."""
    for o in others:
        first.more.append(o)
        first.more[-1].ClearField("more")
        first.more.extend(o.more)


@contextlib.contextmanager
def together():
    """Messages this thread posts inside the block go to each queue as one (up to
    MERGE_BYTES each), when it ends."""
    held: dict[int, tuple[queue.Queue, list]] = {}
    _held.queues = held
    try:
        yield
    finally:
        _held.queues = None
        for q, items in held.values():
            run, size = None, 0     # (deliver_at, message) being merged into, and its bytes
            for item in items:
                if item is None:            # the end of the stream: what came before goes first
                    if run is not None:
                        q.put(run)
                        run = None
                    q.put(None)
                    continue
                n = item[1].ByteSize()
                if run is None or size + n > MERGE_BYTES:
                    if run is not None:
                        q.put(run)
                    run, size = item, n
                else:
                    merge(run[1], [item[1]])
                    run, size = (max(run[0], item[0]), run[1]), size + n
            if run is not None:
                q.put(run)


def post(q: queue.Queue, item) -> None:
    """Put (deliver_at, message) or None (the end) on a stream's queue: now, or inside
    together() when the block ends."""
    held = getattr(_held, "queues", None)
    if held is None:
        q.put(item)
    else:
        held.setdefault(id(q), (q, []))[1].append(item)
