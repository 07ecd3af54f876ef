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
    def delivered(q, sent_all=None):
        """Yield the messages put on q as (deliver_at, message), at their delivery time, until
        None. Those already waiting behind the first go in the same message (merged), delivered
        with the last of them. sent_all(), if given, is called whenever every message taken
        from q so far has been yielded and taken on (before waiting for the next)."""
        while True:
            for item in merged(waiting(q)):
                if item is None:
                    return
                Shaper.wait_until(item[0])
                yield item[1]
            if sent_all is not None:
                sent_all()

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


def merge(first, other) -> None:
    """Append a message (StageInput or StageOutput) to first's `more`, flattened: one level."""
    first.more.append(other)
    first.more[-1].ClearField("more")
    first.more.extend(other.more)


def waiting(q: queue.Queue) -> list:
    """q's next entry (waiting for it) and every entry behind it, flattened: a list on q
    (together()) is its items, in order."""
    entries: list = []
    got = q.get()
    while True:
        entries.extend(got if isinstance(got, list) else [got])
        try:
            got = q.get_nowait()
        except queue.Empty:
            return entries


def merged(entries: list) -> list:
    """(deliver_at, message) entries as few messages as MERGE_BYTES allows, in order, each
    delivered with the latest of those it holds; a None (the end) ends the list."""
    out: list = []
    size = 0
    for e in entries:
        if e is None:
            out.append(None)
            break
        n = e[1].ByteSize()
        if out and size + n <= MERGE_BYTES:
            at, msg = out[-1]
            merge(msg, e[1])
            out[-1], size = (max(at, e[0]), msg), size + n
        else:
            out.append(e)
            size = n
    return out


@contextlib.contextmanager
def together():
    """Messages this thread posts inside the block go to each queue at once, when it ends: its
    stream (Shaper.delivered) then sends them as one message, up to MERGE_BYTES."""
    held: dict[int, tuple[queue.Queue, list]] = {}
    _held.queues = held
    try:
        yield
    finally:
        _held.queues = None
        for q, items in held.values():
            q.put(items if len(items) > 1 else items[0])


def post(q: queue.Queue, item) -> None:
    """Put (deliver_at, message) or None (the end) on a stream's queue (or a Downstream): now,
    or inside together() when the block ends."""
    held = getattr(_held, "queues", None)
    if held is None:
        q.put(item)
    else:
        held.setdefault(id(q), (q, []))[1].append(item)
