"""A TCP proxy that delays every byte by a fixed one-way latency, in both directions.

This kernel's `tc` has no `netem`, so the emulated fleets of bench/versus.py get their
latency here: one proxy in front of each node's port, the same for llama.cpp's RPC servers
and edgefleet's agents. Data is forwarded in order and as it arrives (a chunk read at t is
written at t + delay), so a link stays pipelined: the delay adds latency, not a bandwidth
limit (that is `tc tbf` on the veth pair).

Each direction of a connection is a reader thread and a writer thread that sleeps with
`time.sleep` (nanosecond timers) until a chunk is due. An asyncio loop cannot do this: its
epoll waits are rounded up to whole milliseconds, and a 0.5 ms delay became 1.16 ms. The
proxy asks for real-time scheduling where it may (root): it stands for the network, which
does not wait for the nodes' CPUs, and on a busy machine an ordinary thread wakes late.
`measure()` gives what it really adds (`python bench/delay_proxy.py --measure 0.5`).

    python bench/delay_proxy.py --listen 10.77.0.2:50052 --to 127.0.0.1:40052 --delay-ms 2
"""
from __future__ import annotations

import argparse
import os
import queue
import socket
import statistics
import subprocess
import sys
import threading
import time

CHUNK = 1 << 16


def _nodelay(s: socket.socket) -> socket.socket:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def pump(src: socket.socket, dst: socket.socket, delay_s: float) -> None:
    """Copy src to dst, each chunk written `delay_s` after it was read; then half-close dst."""
    chunks: queue.SimpleQueue = queue.SimpleQueue()

    def send() -> None:
        try:
            while (item := chunks.get())[1]:
                wait = item[0] - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                dst.sendall(item[1])
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        while data := src.recv(CHUNK):
            chunks.put((time.monotonic() + delay_s, data))
    except OSError:
        pass
    chunks.put((0.0, b""))
    sender.join()


def connection(client: socket.socket, to: tuple[str, int], delay_s: float) -> None:
    try:
        server = _nodelay(socket.create_connection(to))
    except OSError:
        client.close()
        return
    back = threading.Thread(target=pump, args=(server, client, delay_s), daemon=True)
    back.start()
    pump(client, server, delay_s)
    back.join()
    client.close()
    server.close()


def real_time() -> None:
    """SCHED_FIFO for this process's threads where allowed; otherwise leave it as it is."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except (PermissionError, AttributeError, OSError):
        pass


def serve(listen: str, to: str, delay_s: float) -> None:
    host, port = listen.rsplit(":", 1)
    to_host, to_port = to.rsplit(":", 1)
    real_time()
    lsock = socket.create_server((host, int(port)), reuse_port=False)
    print(f"listening {listen}", flush=True)
    while True:
        client, _ = lsock.accept()
        threading.Thread(target=connection, args=(_nodelay(client), (to_host, int(to_port)), delay_s),
                         daemon=True).start()


def echo(lsock: socket.socket) -> None:
    """An echo server on lsock, a thread per connection, each closed at its client's end of
    stream; it returns when lsock is shut down."""
    while True:
        try:
            c, _ = lsock.accept()
        except OSError:
            return

        def answer(c=c) -> None:
            with _nodelay(c):
                while data := c.recv(CHUNK):
                    c.sendall(data)
        threading.Thread(target=answer, daemon=True).start()


def _round_trip_s(port: int, size: int, n: int) -> float:
    c = _nodelay(socket.create_connection(("127.0.0.1", port)))
    msg, times = b"x" * size, []
    for _ in range(n):
        t = time.perf_counter()
        c.sendall(msg)
        got = 0
        while got < size:
            got += len(c.recv(CHUNK))
        times.append(time.perf_counter() - t)
    c.close()
    return statistics.median(times)


def measure(delay_ms: float, size: int = 2304, n: int = 200) -> float:
    """Seconds this proxy adds to one crossing of a `size`-byte message with `delay_ms` set:
    the median round trip through it to an echo server on loopback, less a direct round
    trip, halved."""
    lsock = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=echo, args=(lsock,), daemon=True).start()
    echo_port = lsock.getsockname()[1]
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    p = subprocess.Popen([sys.executable, __file__, "--listen", f"127.0.0.1:{port}", "--to", f"127.0.0.1:{echo_port}",
                          "--delay-ms", str(delay_ms)], stdout=subprocess.PIPE, text=True)
    try:
        p.stdout.readline()
        through = _round_trip_s(port, size, n)
    finally:
        p.terminate()
        p.wait()
    direct = _round_trip_s(echo_port, size, n)
    lsock.shutdown(socket.SHUT_RDWR)        # wakes the echo server's accept
    lsock.close()
    return (through - direct) / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", help="HOST:PORT to accept on")
    ap.add_argument("--to", help="HOST:PORT to forward to")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay added to each direction")
    ap.add_argument("--measure", type=float, metavar="MS", help="print what the proxy adds per crossing at this delay")
    a = ap.parse_args()
    if a.measure is not None:
        print(f"delay {a.measure:g} ms: the proxy adds {measure(a.measure) * 1e3:.3f} ms per crossing")
        return
    if not (a.listen and a.to):
        ap.error("--listen and --to are required (or --measure MS)")
    try:
        serve(a.listen, a.to, a.delay_ms / 1e3)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
