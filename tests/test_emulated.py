"""The CPU side of the emulated fleets (bench/emulated.py, bench/ticker.py): the CFS limits a
node gets, and the ticker's life cycle. What the limits do to a stage's speed is measured in
the bench (`emulated.cpu_check`, printed by bench/versus.py), not here."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import emulated, ticker

TICKER = Path(ticker.__file__)


@pytest.mark.parametrize("cpu", [0.25, 0.3, 0.4, 0.6, 0.9, 1.0, 1.5, 2.0])
def test_cfs_limits_give_the_share_with_the_smallest_quota_below_one_core(cpu):
    period, quota = emulated.cfs_limits(cpu)
    assert quota / period == pytest.approx(cpu, rel=0.01)
    assert 1000 <= period <= 1_000_000 and quota >= 1000          # the kernel's bounds
    if cpu < 1:
        assert quota == emulated.MIN_QUOTA_US                      # a step of a few ms meets the limit
    else:
        assert period == emulated.PERIOD_US


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError):
                pass
    return out


def test_ticker_runs_one_real_time_process_per_cpu_and_stops_with_them():
    p = subprocess.Popen([sys.executable, str(TICKER), "--every-us", "500"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        if os.geteuid() != 0:       # no real-time priority: it says so and fails, leaving nothing behind
            assert p.wait(timeout=30) == 1
            assert "real-time priority refused" in p.stderr.read()
            return
        assert p.stdout.readline().startswith("ticking every 500 us")
        kids = _children(p.pid)
        assert len(kids) == len(os.sched_getaffinity(0))
        assert {os.sched_getscheduler(k) for k in kids} == {os.SCHED_FIFO}
        assert sorted(next(iter(os.sched_getaffinity(k))) for k in kids) == sorted(os.sched_getaffinity(0))
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 0
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{k}").exists() for k in kids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(Path(f"/proc/{k}").exists() for k in kids)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
