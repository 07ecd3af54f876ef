"""bench/delay_proxy.py, the latency of the emulated fleets (bench/emulated.py): bytes go
through whole and in order both ways, no sooner than the delay, and an end of stream is
passed on. How close it keeps to the delay is measured in the bench (`--measure`), not here."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench import delay_proxy

PROXY = Path(delay_proxy.__file__)


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


@pytest.fixture
def through():
    """The port of a proxy with a 20 ms delay in front of an echo server."""
    echo = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=delay_proxy.echo, args=(echo,), daemon=True).start()
    port = _free_port()
    p = subprocess.Popen([sys.executable, str(PROXY), "--listen", f"127.0.0.1:{port}",
                          "--to", f"127.0.0.1:{echo.getsockname()[1]}", "--delay-ms", "20"],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().startswith("listening")
        yield port
    finally:
        p.terminate()
        p.wait(timeout=10)
        echo.shutdown(socket.SHUT_RDWR)
        echo.close()


def test_bytes_arrive_whole_in_order_and_late(through):
    data = os.urandom(3 << 20)
    c = socket.create_connection(("127.0.0.1", through))
    start = time.monotonic()
    sender = threading.Thread(target=lambda: (c.sendall(data), c.shutdown(socket.SHUT_WR)))
    sender.start()
    got, first = bytearray(), None
    while chunk := c.recv(1 << 16):
        first = first or time.monotonic()
        got += chunk
    sender.join()
    c.close()
    assert bytes(got) == data                     # the echo's end of stream came back too
    assert first - start >= 0.040                 # there and back, 20 ms each way


def test_a_missing_server_closes_the_client():
    port = _free_port()
    p = subprocess.Popen([sys.executable, str(PROXY), "--listen", f"127.0.0.1:{port}",
                          "--to", f"127.0.0.1:{_free_port()}"], stdout=subprocess.PIPE, text=True)
    try:
        p.stdout.readline()
        c = socket.create_connection(("127.0.0.1", port))
        c.settimeout(10)
        assert c.recv(10) == b""
        c.close()
    finally:
        p.terminate()
        p.wait(timeout=10)
