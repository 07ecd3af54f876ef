"""Local agent and controller processes on 127.0.0.1: the demo, the benchmarks and the
integration tests run real fleets on one machine with these.

Each process listens on port 0 and announces its address on the first stdout line; its
logs go to a file beside its data. Every process is stopped by PID when its owner is done.
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 120


class ServiceProcess:
    def __init__(self, args: list[str], log_path: Path, env: dict | None = None):
        self.args = args
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "controller.cli", *args], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env={**os.environ, **(env or {})})
        self.pid = self.proc.pid
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: lines.put(self.proc.stdout.readline()), daemon=True).start()
        try:
            first = lines.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            first = ""
        if not first:
            self.kill()
            raise RuntimeError(f"{args[0]} did not start: {self.log_tail()}")
        self.info = json.loads(first)
        self.address = self.info["address"]
        # keep draining stdout so that the process never blocks on a full pipe
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def log_tail(self, n: int = 2000) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM (graceful drain), then SIGKILL if it does not exit in time."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)


def start_agent(name: str, workdir: Path, memory: str = "+1GiB", controller: str = "", token: str = "",
                extra: tuple[str, ...] = ()) -> ServiceProcess:
    args = ["agent", "--controller", controller, "--name", name, "--listen", "127.0.0.1:0",
            "--memory", memory, "--data-dir", str(workdir / name), "--threads", "1", *extra]
    if token:
        args += ["--token", token]
    return ServiceProcess(args, workdir / f"{name}.log")


def start_controller(workdir: Path, token: str = "", extra: tuple[str, ...] = ()) -> ServiceProcess:
    args = ["controller", "--listen", "127.0.0.1:0", "--state", str(workdir / "edgefleet.db"), *extra]
    if token:
        args += ["--token", token]
    return ServiceProcess(args, workdir / "controller.log")


@contextlib.contextmanager
def local_fleet(workdir: Path, agents: Iterable[tuple[str, str]], agent_extra: tuple[str, ...] = (),
                controller_extra: tuple[str, ...] = (), timeout_s: float = 30.0):
    """A controller and agents (name, --memory: a total, or +N for stages beside the agent) on
    127.0.0.1, yielded as (controller, agents) once every agent answers heartbeats; every process
    is stopped on the way out."""
    procs = [start_controller(workdir, extra=controller_extra)]
    try:
        procs += [start_agent(name, workdir, memory=mem, controller=procs[0].address, extra=agent_extra)
                  for name, mem in agents]
        wait_alive(procs[0].address, len(procs) - 1, timeout_s, workdir)
        yield procs[0], procs[1:]
    finally:
        for p in reversed(procs):
            p.terminate()


def wait_alive(controller: str, n: int, timeout_s: float, logs: Path) -> None:
    """Wait until the controller at `controller` sees n agents alive (RuntimeError naming the
    folder of the logs if it does not within timeout_s)."""
    import grpc

    from proto import edgefleet_pb2 as pb
    from proto import edgefleet_pb2_grpc as rpc

    with grpc.insecure_channel(controller) as channel:
        stub, deadline = rpc.ControllerStub(channel), time.monotonic() + timeout_s
        while sum(x.health == "alive" for x in stub.Status(pb.Empty()).nodes) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the agents did not register within {timeout_s:g} s; see the logs in {logs}")
            time.sleep(0.2)


def deploy_chain(agents: list[ServiceProcess], shards, deployment_id: str, max_sessions: int, context: int) -> None:
    """Without a controller: push shard i to agent i, chain them in order, prepare, then activate."""
    from controller.agents import AgentClient
    from controller.deploy import next_address

    for i, (a, s) in enumerate(zip(agents, shards)):
        nxt = next_address([x.address for x in agents], i)
        with AgentClient(a.address) as c:
            c.push_shard(s.path, s.sha256)
            c.prepare(deployment_id, s.sha256, nxt, max_sessions, context, groups=len(agents))
    for a in agents:
        with AgentClient(a.address) as c:
            c.activate(deployment_id)
