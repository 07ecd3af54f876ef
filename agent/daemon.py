"""The agent's lifecycle: start the gRPC service, register with the controller, send
heartbeats, and drain on SIGTERM (finish running sessions, take no new ones, then stop).

The first line on stdout is one JSON object, {"event": "listening", "address": ...}, so that
whoever started the agent (an operator's service manager, the demo, a test) learns the port
when it listened on port 0. Logs go to stderr, one JSON object per line.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from agent import dataplane
from agent.engine import Engine
from agent.home import home
from agent.server import AgentService
from agent.shaping import Shaper
from agent.store import ShardStore
from proto import adapter as A
from proto import edgefleet_pb2_grpc as rpc
from proto.security import SERVER_OPTIONS, Security
from solver.ggml_types import TYPE_ORDER
from solver.memory import fmt_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentConfig:
    name: str                          # unique node name in the fleet
    controller: str                    # host:port of the controller ("" = run unmanaged)
    listen: str = "0.0.0.0:50061"      # where the Agent service listens (port 0 = any free port)
    advertise: str = ""                # address announced to the controller (default: from listen)
    data_listen: str = ""              # the data plane's HOST:PORT (default: --listen's host, any free port; "off": none)
    data_advertise: str = ""           # the data plane's address announced to peers (default: --advertise's host)
    memory_bytes: int = 4 * 2 ** 30    # what the device gives edgefleet: the agent itself + its stages
    memory_beside: bool = False        # True (--memory +N): memory_bytes is for stages alone, beside the agent
    threads: int = 0                   # llama.cpp compute threads (0 = all cores)
    data_dir: Path = field(default_factory=lambda: home() / "agent")
    security: Security = Security()
    emulate_bandwidth: float | None = None   # bytes/s of the emulated uplink (None = off)
    emulate_latency: float = 0.0             # seconds added to every message sent
    session_timeout_s: float = 300.0   # free a session's KV cache after this long idle
    drain_timeout_s: float = 60.0      # on SIGTERM, wait at most this long for sessions to finish
    drain_idle_s: float = 5.0          # while draining, a session without a step for this long is abandoned


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
                 "msg": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _advertised(listen: str, port: int) -> str:
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    return f"{host}:{port}"


def data_listen(cfg: AgentConfig) -> str:
    """Where the data plane listens: --data-listen, by default the gRPC listener's host at any
    free port; "" for off."""
    if cfg.data_listen.strip().lower() == "off":
        return ""
    return cfg.data_listen or f"{cfg.listen.rsplit(':', 1)[0]}:0"


def _local(listen: str, port: int) -> str:
    """The address this agent reaches itself at."""
    host = listen.rsplit(":", 1)[0].strip("[]")
    return f"127.0.0.1:{port}" if host in ("0.0.0.0", "::", "") else f"{listen.rsplit(':', 1)[0]}:{port}"


class ControllerLink(threading.Thread):
    """Registers with the controller and sends heartbeats; re-registers whenever the
    controller says it does not know this node (e.g. after the controller lost its state)."""

    def __init__(self, address: str, security: Security, node: A.NodeInfo, state_fn):
        super().__init__(name="controller-link", daemon=True)
        self.address, self.security, self.node, self.state_fn = address, security, node, state_fn
        self.stop_event = threading.Event()
        self.registered = False

    def run(self) -> None:
        interval, failing = 2.0, False
        md = self.security.metadata()
        with self.security.channel(self.address) as ch:
            stub = rpc.ControllerStub(ch)
            while not self.stop_event.is_set():
                try:
                    if not self.registered:
                        reply = stub.Register(A.node_pb(self.node), metadata=md, timeout=10)
                        interval = reply.heartbeat_interval_seconds or interval
                        self.registered = True
                        log.info("registered with the controller at %s (heartbeat every %.1f s)",
                                 self.address, interval)
                    else:
                        reply = stub.Heartbeat(A.state_pb(self.state_fn()), metadata=md, timeout=10)
                        if not reply.known:
                            log.info("the controller does not know this node; registering again")
                            self.registered = False
                            continue
                    failing = False
                except grpc.RpcError as exc:
                    self.registered = False
                    if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                        log.error("the controller at %s rejected the fleet token; start the agent with the "
                                  "controller's --token", self.address)
                    elif not failing:
                        log.warning("controller at %s is unreachable (%s); retrying every %.1f s",
                                    self.address, exc.code().name, interval)
                    failing = True
                self.stop_event.wait(interval)


def stage_budget(cfg: AgentConfig, own: int) -> int:
    """Bytes the agent's stages may use: --memory less what the agent itself holds (own), or,
    with --memory +N, N beside it. A total that leaves nothing for stages is a ValueError."""
    if cfg.memory_beside:
        return cfg.memory_bytes
    if cfg.memory_bytes <= own:
        raise ValueError(f"--memory {fmt_bytes(cfg.memory_bytes)} is less than the agent itself needs "
                         f"({fmt_bytes(own)}); give more than that in all, or use --memory "
                         f"+{cfg.memory_bytes / 2 ** 20:g}MiB for that much beside the agent")
    return cfg.memory_bytes - own


def serve(cfg: AgentConfig) -> int:
    """Run the agent until SIGTERM/SIGINT; returns the process exit code."""
    import psutil

    from agent.runtime import init_llama, map_large_blocks

    map_large_blocks()

    data_dir = Path(cfg.data_dir).expanduser()
    store = ShardStore(data_dir)
    shaper = Shaper(cfg.emulate_bandwidth, cfg.emulate_latency)
    server = grpc.server(ThreadPoolExecutor(max_workers=64, thread_name_prefix="rpc"),
                         interceptors=cfg.security.interceptors(), options=SERVER_OPTIONS)
    port = cfg.security.bind(server, cfg.listen)
    address = cfg.advertise or _advertised(cfg.listen, port)
    init_llama()
    own = psutil.Process().memory_info().rss      # the agent itself (service, llama.cpp), before any stage
    try:
        stages = stage_budget(cfg, own)
    except ValueError:
        server.stop(None)
        raise
    log.info("the agent itself holds %s; stages may use %s beside it (%s in all, --memory %s%s)", fmt_bytes(own),
             fmt_bytes(stages), fmt_bytes(own + stages), "+" if cfg.memory_beside else "",
             fmt_bytes(cfg.memory_bytes))
    engine = Engine(stages, cfg.session_timeout_s, cfg.threads or None)
    stop, died = threading.Event(), threading.Event()
    engine.on_death = lambda: (died.set(), stop.set())     # no heartbeat from a wedged agent: the controller fails over
    data, data_address, data_local = None, "", ""
    if listen_data := data_listen(cfg):
        try:
            data = dataplane.Server(listen_data, cfg.security)
        except ValueError:
            server.stop(None)
            raise
        data_address = cfg.data_advertise or _advertised(address, data.port)   # the host peers reach us at
        data_local = _local(listen_data, data.port)
    node = A.NodeInfo(cfg.name, address, stages, TYPE_ORDER, engine.threads, "cpu", own, data_address)
    service = AgentService(node, store, engine, cfg.security, shaper, _local(cfg.listen, port), data_local)
    if data is not None:
        data.start({dataplane.FORWARD: service.forward_data, dataplane.COLLECT: service.collect_data,
                    dataplane.ECHO: dataplane.echo})
    rpc.add_AgentServicer_to_server(service, server)
    server.start()

    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(json.dumps({"event": "listening", "name": cfg.name, "address": address, "port": port,
                      "data_address": data_address, "pid": os.getpid(), "data_dir": str(data_dir)}), flush=True)
    log.info("agent %s listening on %s%s (%s for stages + the agent itself %s, %d shards on disk%s)", cfg.name,
             address, f", data plane on {data_address}" if data else "", fmt_bytes(stages), fmt_bytes(own), len(store.list()),
             f", emulated link {cfg.emulate_bandwidth or 0:.0f} B/s + {cfg.emulate_latency * 1e3:.1f} ms"
             if shaper.active else "")
    link = None
    if cfg.controller:
        link = ControllerLink(cfg.controller, cfg.security, node, service.state)
        link.start()
    stop.wait()
    if died.is_set():
        if link is not None:
            link.stop_event.set()
        server.stop(grace=0)
        if data is not None:
            data.stop()
        log.error("agent %s stopped: its compute thread died (see the log above); restart it", cfg.name)
        return 1

    log.info("draining: finishing %d sessions, taking no new ones", engine.session_count())
    engine.draining = True
    deadline = time.monotonic() + cfg.drain_timeout_s
    while (engine.busy_sessions(cfg.drain_idle_s) or engine.queue_depth()) and time.monotonic() < deadline:
        time.sleep(0.1)
    if engine.session_count():
        log.warning("drain timeout: dropping %d sessions", engine.session_count())
    if link is not None:
        link.stop_event.set()
    server.stop(grace=2).wait()
    if data is not None:
        data.stop()
    engine.stop()
    log.info("agent %s stopped", cfg.name)
    return 0


def setup_logging(verbose: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if verbose == 0 else logging.DEBUG)
