"""An emulated fleet on one Linux machine: one network namespace per node, joined to the
root namespace by a veth pair, with bandwidth from `tc tbf` on both ends, latency from
bench/delay_proxy.py in front of the node's port, and the node's CPU share and memory from
cgroup (v1) limits, enforced between the kernel's ticks by bench/ticker.py. Made and removed
by the bench; needs root.

The controller, or llama.cpp's RPC host, runs in the root namespace and reaches node i at
10.77.i.2; node i reaches the root namespace (the controller) at 10.77.i.1, and other nodes
through it (IP forwarding on). Every process started here is ended here, by PID.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CGROUP = Path("/sys/fs/cgroup")
PERIOD_US = 10_000      # the CFS period of a node with a whole CPU or more
MIN_QUOTA_US = 1_000    # the kernel refuses a smaller quota
TICK_US = 500           # bench/ticker.py's wake-up interval


@dataclass(frozen=True)
class Node:
    name: str
    cpu: float          # CPU cores it may use (cgroup CFS quota), e.g. 1.0 or 0.4
    memory: int         # bytes: its cgroup's limit, and what it offers


@dataclass(frozen=True)
class Link:
    mbit: float         # bandwidth each way (tc tbf on both ends of the veth pair)
    delay_ms: float     # one-way latency added by the proxy, each direction

    def __str__(self) -> str:
        return f"{self.mbit:g} Mbit/s, {self.delay_ms:g} ms"


def cfs_limits(cpu: float) -> tuple[int, int]:
    """(period, quota) in microseconds for a node of `cpu` cores. Below one core the quota is
    the kernel's smallest, 1 ms, and the period 1 ms / cpu (4 ms at 0.25), so a step of a few
    milliseconds already meets the limit; with a 10 ms period a 0.4-CPU node would run a 4 ms
    step at full speed. At a core or more the period is 10 ms."""
    if cpu < 1:
        return round(MIN_QUOTA_US / cpu), MIN_QUOTA_US
    return PERIOD_US, round(cpu * PERIOD_US)


def sh(*args: str, ns: str = "") -> None:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")


class EmulatedFleet:
    def __init__(self, nodes: list[Node], link: Link, logs: Path, tag: str = "ef", systems: tuple[str, ...] = ("",)):
        """systems: a name for each system that runs on the nodes at once, each in CPU and
        memory cgroups of its own with the node's limits ("" for one system alone): two
        systems measured by turns each get the whole node while they run, and neither's
        memory counts against the other's."""
        self.nodes, self.link, self.logs, self.tag, self.systems = nodes, link, Path(logs), tag, systems
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen] = []
        self._forward = "0"

    # names
    def ns(self, i: int) -> str:
        return f"{self.tag}{i}"

    def address(self, i: int) -> str:
        """The node's address, as others reach it."""
        return f"10.77.{i}.2"

    def cgroup(self, i: int, system: str = "") -> str:
        """Node i's cgroup (CPU and memory) for a system."""
        return self.ns(i) + system

    def gateway(self, i: int) -> str:
        """The root namespace's address, as node i reaches it."""
        return f"10.77.{i}.1"

    # ------------------------------------------------------------------ set-up

    def __enter__(self) -> EmulatedFleet:
        self._forward = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
        try:
            for i, node in enumerate(self.nodes):
                self._net(i)
                self._cgroups(i, node)
            self._ticker()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _ticker(self) -> None:
        log = self.logs / "ticker.log"
        p = subprocess.Popen([sys.executable, str(HERE / "ticker.py"), "--every-us", str(TICK_US)],
                             stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        self.procs.append(p)
        # it says "ticking" once every CPU's process runs at real-time priority, and exits if one
        # is refused it (the quotas would not hold)
        wait_for(p, log, "ticking")

    def _net(self, i: int) -> None:
        ns, host, peer = self.ns(i), f"{self.tag}h{i}", f"{self.tag}n{i}"
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", host, "type", "veth", "peer", "name", peer)
        sh("ip", "link", "set", peer, "netns", ns)
        sh("ip", "addr", "add", f"{self.gateway(i)}/30", "dev", host)
        sh("ip", "link", "set", host, "up")
        sh("ip", "addr", "add", f"{self.address(i)}/30", "dev", peer, ns=ns)
        sh("ip", "link", "set", "lo", "up", ns=ns)
        sh("ip", "link", "set", peer, "up", ns=ns)
        sh("ip", "route", "add", "default", "via", self.gateway(i), ns=ns)
        rate = f"{self.link.mbit:g}mbit"
        burst = f"{max(32, int(self.link.mbit * 1e6 / 8 / 250 / 1024) + 1)}kb"     # at least one tick's worth
        for dev, where in ((host, ""), (peer, ns)):
            sh("tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", burst, "latency", "200ms",
               ns=where)

    def _cgroups(self, i: int, node: Node) -> None:
        period, quota = cfs_limits(node.cpu)
        for system in self.systems:
            cpu = CGROUP / "cpu" / self.cgroup(i, system)
            cpu.mkdir(exist_ok=True)
            (cpu / "cpu.cfs_quota_us").write_text("-1")
            (cpu / "cpu.cfs_period_us").write_text(str(period))
            (cpu / "cpu.cfs_quota_us").write_text(str(quota))
            mem = CGROUP / "memory" / self.cgroup(i, system)
            mem.mkdir(exist_ok=True)
            (mem / "memory.limit_in_bytes").write_text(str(node.memory))

    # ------------------------------------------------------------------ processes

    def run(self, i: int, argv: list[str], name: str, limited: bool = True, system: str = "") -> subprocess.Popen:
        """Start argv in node i's namespace (and, when `limited`, the system's CPU and memory
        cgroups of the node)."""
        ns, cg = self.ns(i), self.cgroup(i, system)
        join = (f"echo $$ > {CGROUP}/cpu/{cg}/cgroup.procs && echo $$ > {CGROUP}/memory/{cg}/cgroup.procs && "
                if limited else "")
        log = open(self.logs / f"{name}.log", "ab")
        p = subprocess.Popen(["sh", "-c", join + f'exec ip netns exec {ns} "$@"', "sh", *argv],
                             stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.procs.append(p)
        return p

    def proxy(self, i: int, port: int, inner: int) -> subprocess.Popen:
        """The delay proxy in front of node i's port (outside its cgroups: it is the network)."""
        p = self.run(i, [sys.executable, str(HERE / "delay_proxy.py"), "--listen", f"{self.address(i)}:{port}",
                         "--to", f"127.0.0.1:{inner}", "--delay-ms", str(self.link.delay_ms)],
                     f"proxy{i}-{port}", limited=False)
        wait_for(p, self.logs / f"proxy{i}-{port}.log", "listening")
        return p

    def stop(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)

    def __exit__(self, *exc) -> None:
        for p in reversed(self.procs):
            self.stop(p)
        self.procs = []
        for i in range(len(self.nodes)):
            subprocess.run(["ip", "netns", "del", self.ns(i)], capture_output=True)
            subprocess.run(["ip", "link", "del", f"{self.tag}h{i}"], capture_output=True)
            for kind, system in ((k, x) for k in ("cpu", "memory") for x in self.systems):
                d = CGROUP / kind / self.cgroup(i, system)
                for _ in range(50):
                    try:
                        d.rmdir() if d.exists() else None
                        break
                    except OSError:
                        time.sleep(0.1)
        Path("/proc/sys/net/ipv4/ip_forward").write_text(self._forward)


# one node's CPU as a stage sees it: a lone ~2 ms step after 20 ms idle (a decode step on a
# pipeline's other stages' time), and work that never pauses (a prompt, or a stage busy with
# many sessions); the ratio of each to the same on an unlimited process
_BURN = """
import statistics, time
def burn(n):
    x = 0
    for i in range(n):
        x += i
burn(200000)
lone = []
for _ in range(25):
    t = time.perf_counter(); burn(80000); lone.append(time.perf_counter() - t); time.sleep(0.02)
t = time.perf_counter(); burn(4000000); sustained = (time.perf_counter() - t) / 50
print(statistics.median(lone), sustained)
"""


def cpu_check(fleet: "EmulatedFleet") -> list[tuple[str, float, float]]:
    """(node, lone-step slowdown, sustained slowdown) for each node of a running fleet, against
    the same work in an unlimited process: what its CFS quota really does to a stage. A step
    shorter than a period's quota runs at full speed after idle time, so below one core the
    quota is the kernel's smallest (cfs_limits), and bench/ticker.py makes the kernel
    enforce it between its 4 ms ticks (docs/versus.md)."""
    def times(i: int, limited: bool) -> tuple[float, float]:
        name = f"cpu-check-{i}-{int(limited)}"
        p = fleet.run(i, [sys.executable, "-c", _BURN], name, limited=limited)
        p.wait(120)
        fleet.procs.remove(p)
        lone, sustained = map(float, (fleet.logs / f"{name}.log").read_text().split()[-2:])
        return lone, sustained

    base = times(0, False)
    out = []
    for i, node in enumerate(fleet.nodes):
        lone, sustained = times(i, True)
        out.append((node.name, lone / base[0], sustained / base[1]))
    return out


def ran_s(tid: int | str) -> float:
    """Seconds a thread has run so far (the kernel's schedstat); 0 for one that has ended."""
    try:
        return int(Path(f"/proc/{tid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, IndexError, ValueError):    # a thread that ended meanwhile
        return 0.0


def cpu_spent(fleet: "EmulatedFleet", system: str = "") -> list[tuple[float, float]]:
    """Per node, so far: seconds its processes' threads have run (`ran_s` of every task in
    the system's CPU cgroup of the node; a process that ended takes its share with it) and
    seconds its cgroup was throttled, held off the CPU by its quota (cgroup v1's
    throttled_time: not part of the time run, and summed over the CPUs, so it can exceed it)."""
    out = []
    for i in range(len(fleet.nodes)):
        cg = CGROUP / "cpu" / fleet.cgroup(i, system)
        ran = sum(ran_s(tid) for tid in (cg / "tasks").read_text().split())
        stat = dict(line.split() for line in (cg / "cpu.stat").read_text().splitlines())
        out.append((ran, int(stat.get("throttled_time", 0)) / 1e9))
    return out


def wait_for(p: subprocess.Popen, log: Path, text: str, timeout: float = 30, since: int = 0) -> None:
    """Until process p's log says `text` after its first `since` bytes (what an earlier process
    wrote there); RuntimeError with the log's end if p exits first or the time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        said = log.read_bytes()[since:].decode(errors="replace") if log.exists() else ""
        if text in said:
            return
        if p.poll() is not None or time.monotonic() > deadline:
            why = "exited" if p.poll() is not None else f"did not say {text!r} within {timeout:.0f} s"
            raise RuntimeError(f"{log.stem} {why}: {said.strip()[-300:]}")
        time.sleep(0.05)
