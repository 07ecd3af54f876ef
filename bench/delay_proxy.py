"""A TCP proxy that delays every byte by a fixed one-way latency, in both directions.

This kernel's `tc` has no `netem`, so the emulated fleets of bench/versus.py get their
latency here: one proxy in front of each node's port, the same for llama.cpp's RPC servers
and edgefleet's agents. Data is forwarded in order and as it arrives (a chunk read at t is
written at t + delay), so a link stays pipelined: the delay adds latency, not a bandwidth
limit (that is `tc tbf` on the veth pair). Its own cost is measured by `bench/versus.py`
(a proxy with no delay against a direct connection).

    python bench/delay_proxy.py --listen 10.77.0.2:50052 --to 127.0.0.1:40052 --delay-ms 2
"""
from __future__ import annotations

import argparse
import asyncio
import socket
import time


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    """Copy reader to writer, each chunk written `delay_s` after it was read."""
    queue: asyncio.Queue = asyncio.Queue()

    async def send() -> None:
        while True:
            due, data = await queue.get()
            if data is None:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        writer.close()

    sender = asyncio.create_task(send())
    try:
        while data := await reader.read(1 << 16):
            queue.put_nowait((time.monotonic() + delay_s, data))
    except ConnectionError:
        pass
    queue.put_nowait((0.0, None))
    try:
        await sender
    except ConnectionError:
        pass


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def serve(listen: str, to: str, delay_s: float) -> None:
    host, port = listen.rsplit(":", 1)
    to_host, to_port = to.rsplit(":", 1)

    async def handle(c_reader, c_writer):
        try:
            s_reader, s_writer = await asyncio.open_connection(to_host, int(to_port))
        except OSError:
            c_writer.close()
            return
        _nodelay(c_writer)
        _nodelay(s_writer)
        await asyncio.gather(pump(c_reader, s_writer, delay_s), pump(s_reader, c_writer, delay_s))

    server = await asyncio.start_server(handle, host, int(port))
    print(f"listening {listen}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", required=True, help="HOST:PORT to accept on")
    ap.add_argument("--to", required=True, help="HOST:PORT to forward to")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay added to each direction")
    a = ap.parse_args()
    try:
        asyncio.run(serve(a.listen, a.to, a.delay_ms / 1e3))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
