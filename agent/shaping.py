"""Link emulation: make an agent's outgoing messages behave as if sent over a slow link.

Each message occupies the agent's uplink for bytes / bandwidth (messages queue behind each
other, as on a real network interface) and then arrives `latency` later. This is the same
store-and-forward model as solver/cost.py, so a one-machine fleet with emulated links is
what the cost model predicts for a LAN of edge devices.
"""
from __future__ import annotations

import threading
import time


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
        """Yield the messages put on q as (deliver_at, message), each at its delivery time, until None."""
        while (item := q.get()) is not None:
            deliver_at, msg = item
            Shaper.wait_until(deliver_at)
            yield msg

    def send(self, nbytes: int) -> None:
        """Block for as long as sending nbytes would take."""
        self.wait_until(self.schedule(nbytes))
