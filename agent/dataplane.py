"""The data plane between agents: a stage's steps down to the next stage's agent, and the last
stage's steps round to the first, on a plain TCP connection (TLS where the fleet uses it) with
one protobuf message per length-prefixed frame, instead of a gRPC stream.

Why: Python gRPC costs ~0.13 ms of CPU per message sent or received on a stream, in thread
hand-offs between its polling threads, its request-iterator thread and the handler's; a
stage handles two or three messages per token, and on a node with a fraction of a core each
ms of CPU costs several of wall time (docs/versus.md). Here a message costs one `sendall` by
the thread that sends it and one read by the thread that waits for it.

The controller's collector on a last stage (its answers, one per token) comes here too
(`collect`). The control plane (shards, deployments, the controller's Forward call, Profile,
State) stays on gRPC. An agent listens for the data plane on a second port and tells its
peers where (`NodeInfo.data_address`, in its State); an agent whose State names none is
reached by a gRPC Forward call, as before.

A connection: the client sends a hello frame, `edgefleet-data/1 KIND TOKEN`; the server
answers one frame, `ok`, or a sentence saying what is wrong and closes. KIND is `forward`
(StageInput frames from the client, StageOutput frames back: the Forward call's two streams),
`collect` (the controller's Collect call on a last stage: one CollectRequest frame, answered
by `ok` or a sentence, then StageOutput frames) or `echo` (every frame comes back as it is:
the step-overhead probe). An empty frame ends a
side's messages; a connection that closes before it broke. With mutual TLS both ends present
a certificate of the fleet CA, as on gRPC; the token is checked as gRPC's interceptor does.
"""
from __future__ import annotations

import hmac
import logging
import socket
import ssl
import struct
import threading

from google.protobuf.message import DecodeError

from proto import edgefleet_pb2 as pb
from proto import edgefleet_pb2_grpc as rpc
from proto.security import MAX_MESSAGE_BYTES, Security

log = logging.getLogger(__name__)

VERSION = "edgefleet-data/1"
FORWARD, COLLECT, ECHO = "forward", "collect", "echo"
HEADER = struct.Struct("!I")
HANDSHAKE_S = 10.0          # a peer that does not finish its hello in this long is dropped
READ_CHUNK = 1 << 16
LOOKUP_S = 10.0             # an agent's State, asked where its data plane listens


class DataError(Exception):
    """The connection failed or its peer broke the protocol; the message is one sentence."""


class _Plain:
    def __init__(self, sock: socket.socket):
        self.sock = sock

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> bytes:
        return self.sock.recv(READ_CHUNK)


class _Tls:
    """TLS through memory buffers: one thread may send while another reads (an SSL socket's
    object must not be used by two threads at once); the socket I/O happens outside the lock."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, server_side: bool, hostname: str | None):
        self.sock = sock
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._in, self._out, server_side=server_side, server_hostname=hostname)
        self._lock = threading.Lock()
        while True:
            try:
                self._obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._feed()
        self._flush()

    def _flush(self) -> None:
        data = self._out.read()
        if data:
            self.sock.sendall(data)

    def _feed(self) -> None:
        data = self.sock.recv(READ_CHUNK)
        if not data:
            raise DataError("the peer closed the connection during the TLS handshake")
        self._in.write(data)

    def sendall(self, data: bytes) -> None:
        with self._lock:
            self._obj.write(data)
            self._flush()

    def recv(self) -> bytes:
        while True:
            with self._lock:
                try:
                    data = self._obj.read(READ_CHUNK)
                    self._flush()
                    return data
                except ssl.SSLWantReadError:
                    self._flush()
                except ssl.SSLZeroReturnError:
                    return b""
            raw = self.sock.recv(READ_CHUNK)
            if not raw:
                return b""
            with self._lock:
                self._in.write(raw)


class Connection:
    """One data-plane connection: frames out (one thread at a time) and frames in (one reader)."""

    def __init__(self, sock: socket.socket, io):
        self.sock = sock
        self._io = io
        self._buf = bytearray()
        self._closed = False

    def send(self, message) -> None:
        """Send a protobuf message as one frame."""
        self.send_bytes(message.SerializeToString())

    def send_bytes(self, payload: bytes) -> None:
        self._io.sendall(HEADER.pack(len(payload)) + payload)

    def send_end(self) -> None:
        self._io.sendall(HEADER.pack(0))

    def _read_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self._io.recv()
            if not chunk:
                raise DataError("the connection closed in the middle of the stream")
            self._buf += chunk
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def receive(self) -> bytes | None:
        """The next frame's payload; None at the peer's end of messages."""
        (n,) = HEADER.unpack(self._read_exact(HEADER.size))
        if n == 0:
            return None
        if n > MAX_MESSAGE_BYTES:
            raise DataError(f"a frame of {n} bytes is over the {MAX_MESSAGE_BYTES} bytes a message may have")
        return self._read_exact(n)

    def messages(self, cls):
        """Messages of type cls until the peer's end; DataError where the connection breaks or a
        frame is not such a message."""
        while (data := self.receive()) is not None:
            m = cls()
            try:
                m.ParseFromString(data)
            except DecodeError as exc:
                raise DataError(f"a frame is not a {cls.__name__} message ({exc})") from None
            yield m

    def close(self) -> None:
        """Close at once (a reader blocked on it wakes up with an error)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DataError(f"{address!r} is not a host:port address")
    return host.strip("[]"), int(port)


def _tls_context(security: Security, server_side: bool) -> ssl.SSLContext:
    purpose = ssl.Purpose.CLIENT_AUTH if server_side else ssl.Purpose.SERVER_AUTH
    ctx = ssl.create_default_context(purpose, cafile=str(security.tls_ca))
    ctx.load_cert_chain(str(security.tls_cert), str(security.tls_key))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def data_address(channel, security: Security) -> str:
    """Where the agent on this gRPC channel listens for its data plane ("" = it has none), from its State."""
    return rpc.AgentStub(channel).State(pb.Empty(), metadata=security.metadata(), timeout=LOOKUP_S).node.data_address


def connect(address: str, security: Security, kind: str = FORWARD, timeout_s: float = HANDSHAKE_S) -> Connection:
    """A data-plane connection to the agent listening at address, past its checks; DataError
    with a sentence where it cannot be made."""
    host, port = _split(address)
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as exc:
        raise DataError(f"cannot connect to the data plane at {address}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        io = _Tls(sock, _tls_context(security, False), False, host) if security.tls else _Plain(sock)
        conn = Connection(sock, io)
        conn.send_bytes(f"{VERSION} {kind} {security.token}".encode())
        reply = conn.receive()
        if reply != b"ok":
            raise DataError(f"the agent at {address} refused the data-plane connection: "
                            f"{(reply or b'no reason given').decode(errors='replace')}")
        sock.settimeout(None)
        return conn
    except (OSError, ssl.SSLError, DataError) as exc:
        sock.close()
        if isinstance(exc, DataError):
            raise
        raise DataError(f"the data-plane connection to {address} failed: {exc}") from None


class Server:
    """Accepts data-plane connections; each runs `handlers[kind](conn)` on a thread of its own
    once its hello passed."""

    def __init__(self, listen: str, security: Security):
        try:
            host, port = _split(listen)
        except DataError as exc:
            raise ValueError(f"--data-listen: {exc}") from None
        self.security = security
        self.handlers: dict = {}
        self._conns: set[Connection] = set()
        self._lock = threading.Lock()
        self._tls = _tls_context(security, True) if security.tls else None
        try:
            self._sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                              backlog=64)
        except OSError as exc:
            raise ValueError(f"cannot listen for the data plane on {listen} ({exc.strerror or exc}); "
                             "is the port in use or the host wrong?") from None
        self.port = self._sock.getsockname()[1]
        self._stopped = False

    def start(self, handlers: dict) -> None:
        """Accept connections; handlers: kind -> function(conn), run on the connection's thread."""
        self.handlers = dict(handlers)
        threading.Thread(target=self._accept, name="data-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                sock, peer = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock, peer), name=f"data-{peer[1]}", daemon=True).start()

    def _serve(self, sock: socket.socket, peer) -> None:
        conn = None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(HANDSHAKE_S)
            io = _Tls(sock, self._tls, True, None) if self._tls else _Plain(sock)
            conn = Connection(sock, io)
            hello = conn.receive() or b""
            refusal, kind = self._check(hello)
            if refusal:
                conn.send_bytes(refusal.encode())
                log.warning("refused a data-plane connection from %s: %s", peer[0], refusal)
                conn.close()
                return
            conn.send_bytes(b"ok")
            sock.settimeout(None)
        except (OSError, ssl.SSLError, DataError, ValueError) as exc:
            log.warning("a data-plane connection from %s failed before it started: %s", peer[0], exc)
            if conn is not None:
                conn.close()
            else:
                sock.close()
            return
        with self._lock:
            if self._stopped:
                conn.close()
                return
            self._conns.add(conn)
        try:
            self.handlers[kind](conn)
        except Exception:   # a bug must end this connection only
            log.exception("data-plane connection from %s failed", peer[0])
        finally:
            conn.close()
            with self._lock:
                self._conns.discard(conn)

    def _check(self, hello: bytes) -> tuple[str, str]:
        """(a refusal sentence or "", the kind asked for)."""
        parts = hello.decode(errors="replace").split(" ", 2)
        if len(parts) != 3 or parts[0] != VERSION:
            return f"this agent speaks {VERSION}; run the same edgefleet version on every agent", ""
        _, kind, token = parts
        if kind not in self.handlers:
            return f"unknown data-plane kind {kind!r}", ""
        if self.security.token and not hmac.compare_digest(token.encode(), self.security.token.encode()):
            return "missing or wrong fleet token; give every agent the same --token", ""
        return "", kind

    def stop(self) -> None:
        """Stop listening and close every connection (their streams end as broken)."""
        with self._lock:
            self._stopped = True
            conns, self._conns = list(self._conns), set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        for c in conns:
            c.close()


def echo(conn: Connection) -> None:
    """The `echo` kind: every frame back as it came, until the client's end."""
    while (data := conn.receive()) is not None:
        conn.send_bytes(data)
    conn.send_end()
