"""Which agents exist and which are alive: registrations, heartbeats, the lost-node monitor.

Known agents persist in the state database; liveness is in memory (a restarted controller
waits for the next heartbeat before it calls a node alive).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from controller.state import State
from solver.memory import fmt_bytes
from proto.adapter import AgentState, NodeInfo

log = logging.getLogger(__name__)


@dataclass
class Live:
    node: NodeInfo
    drained: bool
    last_seen: float = 0.0            # monotonic; 0 = not heard from since the controller started
    state: AgentState | None = None
    lost: bool = False


class Registry:
    def __init__(self, state: State, heartbeat_s: float = 1.0, timeout_s: float = 3.0):
        self.state = state
        self.heartbeat_s = heartbeat_s
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._agents: dict[str, Live] = {n.name: Live(n, drained) for n, drained in state.agents()}
        self._stop = threading.Event()
        self.on_lost: Callable[[str], None] = lambda name: None
        self.on_back: Callable[[AgentState], None] = lambda state: None    # a lost node answers again

    def register(self, node: NodeInfo) -> None:
        with self._lock:
            prev = self._agents.get(node.name)
            drained = prev.drained if prev else False
            self._agents[node.name] = Live(node, drained, time.monotonic())
        self.state.upsert_agent(node)
        self.state.event("agent-registered", f"{node.name} at {node.address}: {fmt_bytes(node.memory_bytes)} for stages "
                                             f"+ the agent itself {fmt_bytes(node.agent_bytes)} = "
                                             f"{fmt_bytes(node.memory_bytes + node.agent_bytes)}")
        log.info("agent %s registered from %s", node.name, node.address)

    def heartbeat(self, st: AgentState) -> bool:
        """Record a heartbeat; False when the node is unknown (it must register)."""
        with self._lock:
            live = self._agents.get(st.node.name)
            if live is None or live.node.address != st.node.address:
                return False
            live.last_seen = time.monotonic()
            live.state = st
            came_back = live.lost
            live.lost = False
        if came_back:
            self.state.event("node-back", f"{st.node.name} answers heartbeats again")
            self.on_back(st)
        return True

    def get(self, name: str) -> Live | None:
        with self._lock:
            return self._agents.get(name)

    def all(self) -> list[Live]:
        with self._lock:
            return sorted(self._agents.values(), key=lambda x: x.node.name)

    def health(self, live: Live) -> str:
        if live.drained:
            return "drained"
        if live.state is not None and live.state.draining:
            return "draining"
        return "alive" if self.is_alive(live) else "lost"

    def is_alive(self, live: Live) -> bool:
        return live.last_seen > 0 and time.monotonic() - live.last_seen <= self.timeout_s and not live.lost

    def usable(self) -> list[NodeInfo]:
        """Alive, not drained: the nodes a plan may use."""
        return [x.node for x in self.all() if self.health(x) == "alive"]

    def set_drained(self, name: str, drained: bool = True) -> None:
        with self._lock:
            if name not in self._agents:
                raise ValueError(f"no node named {name!r}; see `edgefleet status`")
            self._agents[name].drained = drained
        self.state.set_drained(name, drained)

    def mark_lost(self, name: str, why: str) -> bool:
        """Declare a node lost (heartbeat timeout or a failed call); True if it was not already."""
        with self._lock:
            live = self._agents.get(name)
            if live is None or live.lost:
                return False
            live.lost = True
        self.state.event("node-lost", f"{name}: {why}")
        log.warning("node %s lost: %s", name, why)
        return True

    def start_monitor(self) -> None:
        threading.Thread(target=self._monitor, name="liveness", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _monitor(self) -> None:
        while not self._stop.wait(self.heartbeat_s / 2):
            now = time.monotonic()
            for live in self.all():
                if live.last_seen and not live.lost and now - live.last_seen > self.timeout_s:
                    if self.mark_lost(live.node.name, f"no heartbeat for {now - live.last_seen:.1f} s"):
                        self.on_lost(live.node.name)
