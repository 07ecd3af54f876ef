"""A real local fleet for the integration tests: a controller and agents on 127.0.0.1."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import grpc

from controller.local import start_agent, start_controller
from proto import edgefleet_pb2 as pb
from proto import edgefleet_pb2_grpc as rpc

ROOT = Path(__file__).resolve().parent.parent
# --memory +N: N for stages beside the agent itself, so that stage budgets are exact on any machine
AGENTS = (("desk", "+9MiB"), ("laptop", "+8MiB"), ("mini", "+7MiB"), ("pi", "+6MiB"))
PROMPT = [1, 50, 60, 70, 80, 90]


class Fleet:
    token = ""

    def __init__(self, work: Path, agents=AGENTS, token: str = "", extra: tuple[str, ...] = (),
                 agent_extra: tuple[str, ...] = ()):
        self.work = work
        self.token = token
        self.controller = start_controller(work, token=token, extra=extra)
        self.port = self.controller.info["port"]
        self.agents = {name: start_agent(name, work, memory=mem, controller=self.controller.address,
                                          token=token, extra=agent_extra)
                       for name, mem in agents}
        self.wait_alive(len(agents))

    def stub(self):
        return rpc.ControllerStub(grpc.insecure_channel(self.controller.address))

    def metadata(self):
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def status(self):
        return self.stub().Status(pb.Empty(), timeout=10, metadata=self.metadata())

    def wait_alive(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if sum(x.health == "alive" for x in self.status().nodes) >= n:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"fewer than {n} agents alive: {self.controller.log_tail()}")

    def restart_controller(self) -> None:
        self.controller = start_controller(self.work, token=self.token, extra=("--listen", f"127.0.0.1:{self.port}"))

    def generate(self, n: int, **kw) -> list[pb.GenerateReply]:
        return list(self.stub().Generate(pb.GenerateRequest(prompt_tokens=PROMPT, max_tokens=n, **kw), timeout=300,
                                         metadata=self.metadata()))

    def stop(self) -> None:
        for a in self.agents.values():
            a.terminate()
        self.controller.terminate()


def cli(*args, controller: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "controller.cli", *args]
    if controller:
        cmd += ["--controller", controller]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
