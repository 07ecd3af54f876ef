"""Wake every CPU every few hundred microseconds, at real-time priority, so the kernel
enforces the emulated nodes' CPU quotas between its own ticks.

This kernel ticks at 250 Hz. A CFS quota is checked at a tick or at a scheduling event on
that CPU, so a stage that computes without a syscall can run up to 4 ms past its quota, and
a decode step of a few milliseconds after idle time runs at full speed on every node: the
"slow" nodes are slow only under sustained load (docs/versus.md, the CPU check). A
real-time thread that wakes on a CPU preempts the task there, and the kernel then charges
that task's cgroup and throttles it if its quota is spent. One process per CPU, pinned,
each sleeping on absolute deadlines.

    python bench/ticker.py --every-us 500          # until SIGTERM
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time


def tick(cpu: int, every_s: float, ready: int) -> None:
    """Pin to `cpu`, take real-time priority, say so on the `ready` pipe, then wake forever."""
    os.sched_setaffinity(0, {cpu})
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(50))
    except OSError as e:
        sys.exit(f"ticker: real-time priority refused ({e}); run as root")
    os.write(ready, b"1")
    os.close(ready)
    t = time.monotonic()
    while True:
        t = max(t + every_s, time.monotonic())      # a late wake-up is not made up with a burst
        time.sleep(max(0.0, t - time.monotonic()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--every-us", type=float, default=500.0, help="wake-up interval per CPU")
    args = ap.parse_args()
    children = []
    ready_r, ready_w = os.pipe()
    for cpu in sorted(os.sched_getaffinity(0)):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.close(ready_r)
            tick(cpu, args.every_us / 1e6, ready_w)
        children.append(pid)
    os.close(ready_w)

    def stop(*_, code: int = 0):
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for pid in children:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        sys.exit(code)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # every child writes one byte once it runs at real-time priority, and closes its end
    ready = b""
    while chunk := os.read(ready_r, 64):
        ready += chunk
    os.close(ready_r)
    if len(ready) < len(children):
        stop(code=1)
    print(f"ticking every {args.every_us:g} us on CPUs {sorted(os.sched_getaffinity(0))}", flush=True)
    # a child that exits (real-time priority refused) ends the ticker
    os.wait()
    stop(code=1)


if __name__ == "__main__":
    main()
