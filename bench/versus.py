"""edgefleet side by side with llama.cpp's RPC backend, on the same emulated fleet, in one run.

Each fleet is made by bench/emulated.py (a network namespace per node, `tc tbf` bandwidth,
a delay proxy in front of every node's port, cgroup CPU and memory limits). On it:

  (a) llama.cpp RPC, its default split (every RPC server reports the same free memory, so
      the layers are split evenly), the master's types;
  (b) llama.cpp RPC with edgefleet's split (from run c) as --tensor-split, the same types;
  (c) edgefleet, its plan for one request's latency with every layer kept at the master's
      type (only the split chosen);
  (d) edgefleet, its own plan: split and per-layer types under a 5 % perplexity budget;
  (e) edgefleet, its plan for 8 requests in flight (--objective throughput: the busiest
      stage's time per request), every layer at the master's type;
  (f) llama.cpp RPC with (e)'s split.

The targets are read each on the plan edgefleet makes for the workload measured, against
llama.cpp on the same split and types: one request on (c) against (b), 8 requests on (e)
against (f) (`targets`; (c)'s own 8-request figure is printed beside).

Figures: single request, a 512-token prompt then 64 tokens: time to first token and decode
tokens/s; and 8 requests of 512 + 64 started together: generated tokens per second of wall
time. llama.cpp's single-request figures come from llama-bench (pp512 at depth 0, tg64 at
depth 512), its 8-request figure from llama-batched-bench (-npp 512 -ntg 64 -npl 8); the
host process runs in the root namespace, as edgefleet's controller does. The one-request
decode tok/s of (b) and (c), and their ratio, come from --pairs requests of each by turns
(by_turns): one system's speed drifts by ±10 % over the minutes between two stretches. Every process is
held to one thread (rpc-server -t 1, agents --threads 1).

    .venv/bin/python bench/versus.py [--fleet equal3,unequal4] [--model smollm2-q8_0] [--runs 3] [--pairs 8]
                                     [--node-memory MIB] [--only-bc]

Needs root (namespaces, tc, cgroups) and llama.cpp's RPC tools (built and cached on first
use by bench/llamacpp.py, about 6 min). The agents' own --emulate-* options are not used.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from bench import delay_proxy, llamacpp  # noqa: E402
from bench.emulated import EmulatedFleet, Link, Node, cpu_check, cpu_spent, wait_for  # noqa: E402
from controller.local import ServiceProcess, wait_alive  # noqa: E402
from proto import edgefleet_pb2 as pb  # noqa: E402
from proto import edgefleet_pb2_grpc as rpc  # noqa: E402
from solver.plan import plan_from_dict  # noqa: E402

MiB = 2 ** 20
PROMPT, OUTPUT, CONCURRENT = 512, 64, 8
SHORT = 8       # tokens of the breakdown's short request (Edgefleet.breakdown)
# pairs of requests the breakdown takes the median of: one 512 + 64 request's decode took
# 18.0 to 24.9 ms a token on the same deployment minutes apart, and two breakdowns of 3 pairs
# there gave 1.14 and 0.04 ms per crossing (their pairs ran from -0.01 to 2.50)
BREAKDOWN_REPEATS = 5
RPC = "rpc"     # the RPC servers' cgroups on every node (edgefleet's agents keep the nodes' own)
CONTROLLER_PORT, PUBLIC_PORT, INNER_PORT = 50061, 50052, 40052
PUBLIC_DATA, INNER_DATA = PUBLIC_PORT + 2, INNER_PORT + 2     # the agents' data plane (llama.cpp's servers take +1)
# what an agent is told is its node's memory limit less this (the cgroup's limit is hard):
# beside its admission formula's figure a loaded agent holds ~50 MB more at rest
# (docs/fleet.md), and under 8 concurrent 512-token prompts the messages in flight add tens
# of MB; with 64 MiB a node's cgroup OOM-killed its agent in the middle of run (d)
HEADROOM = 96 * MiB

FLEETS = {
    # three equal nodes on a slow LAN, none of which holds SmolLM2 with 8 requests' KV cache
    # (340 MiB each, in both fleets, of which an agent is told 244: the whole of SmolLM2 Q8_0
    # for 8 x 576 tokens needs 288 MiB by the admission formula)
    "equal3": ([Node(f"node{i}", 1.0, 340 * MiB) for i in range(3)], Link(100, 2.0)),
    # four unequal nodes on a fast LAN: the same memory, CPU shares 1 : 0.6 : 0.4 : 0.25
    "unequal4": ([Node("fast", 1.0, 340 * MiB), Node("mid", 0.6, 340 * MiB), Node("slow", 0.4, 340 * MiB),
                  Node("slowest", 0.25, 340 * MiB)], Link(1000, 0.5)),
}


def models() -> dict:
    from models import smollm2

    return {"smollm2-q8_0": (lambda: smollm2.path("Q8_0"), "Q8_0", "Q8_0,Q5_0,Q4_0"),
            "smollm2-f16": (lambda: smollm2.path("F16"), "F16", "F16,Q8_0,Q5_0,Q4_0"),
            "reference": (lambda: ROOT / "models" / "reference" / "edgefleet-ref-f16.gguf", "F16", "")}


@dataclass(frozen=True)
class Figures:
    ttft_s: float               # single request, 512-token prompt
    decode_tps: float           # single request, tokens/s after the first
    concurrent_tps: float       # 8 requests started together: generated tokens / wall time
    batch: tuple[tuple[str, float], ...] = ()   # edgefleet, 8 requests: per node, the batch a step ran in, on average
    busy: tuple[tuple[str, float, float], ...] = ()   # edgefleet, 8 requests: per node, CPU s and the share of
                                                     # the wall time its quota allowed that it ran
    phases: tuple[float, float] = ()   # llama.cpp, 8 requests: seconds of its prompts' pass and of its decode steps
    paired: tuple[float, ...] = ()     # (c): its one-request decode tok/s over (b)'s, pair by pair (by_turns)

    def row(self) -> list[str]:
        return [f"{self.ttft_s * 1e3:.0f} ms", f"{self.decode_tps:.1f}", f"{self.concurrent_tps:.1f}"]


# ---------------------------------------------------------------------- edgefleet

@functools.cache
def heldout_ids(master: Path) -> tuple[int, ...]:
    """The held-out text's tokens. Made once, never from threads: llama-cpp-python silences
    stdout and stderr while it loads a vocabulary, by swapping file descriptors, and loads in
    parallel threads can leave them swapped for good."""
    from agent.tokenizer import Tokenizer
    from controller.planning import text_for

    return tuple(Tokenizer(str(master)).encode(text_for(master, "").read_text(encoding="utf-8")))


def prompt_ids(master: Path, n: int, salt: int = 0) -> list[int]:
    ids = heldout_ids(master)
    start = 1 + (salt * 97) % max(1, len(ids) - n)
    return [ids[0], *ids[start:start + n - 1]]


def decode_tps(times: list[float]) -> float:
    """Decode tokens/s of a request from its arrival_times: the tokens after the first."""
    return (len(times) - 2) / (times[-1] - times[1])


def split_text(plan: dict) -> str:
    """A plan's stages as node[first:last] -> ..."""
    return " -> ".join(f"{s['node']}[{s['first']}:{s['last']}]" for s in plan["stages"])


def arrival_times(tokens) -> list[float]:
    """perf_counter when the iteration starts, then when each token of `tokens` arrives."""
    times = [time.perf_counter()]
    for _ in tokens:
        times.append(time.perf_counter())
    return times


class Edgefleet:
    """A controller in the root namespace and one agent per node, behind the node's proxy."""

    def __init__(self, fleet: EmulatedFleet, work: Path, data_plane: bool = True):
        """data_plane: the agents send steps to each other on their data plane, behind the same
        proxy (else by gRPC, as before session 22)."""
        self.fleet, self.work = fleet, work
        self.controller = ServiceProcess(["controller", "--listen", f"0.0.0.0:{CONTROLLER_PORT}", "--state",
                                          str(work / "edgefleet.db"), "--http", "127.0.0.1:0"],
                                         work / "controller.log")
        self.http = "http://" + self.controller.info["http"]
        self.address = f"127.0.0.1:{CONTROLLER_PORT}"
        self.agents = []
        try:   # the controller is not one of the fleet's processes: stop it here if an agent fails
            for i, node in enumerate(fleet.nodes):
                self.agents.append(fleet.run(i, [sys.executable, "-m", "controller.cli", "agent", "--name", node.name,
                                                 "--listen", f"127.0.0.1:{INNER_PORT}",
                                                 "--advertise", f"{fleet.address(i)}:{PUBLIC_PORT}",
                                                 "--controller", f"{fleet.gateway(i)}:{CONTROLLER_PORT}",
                                                 "--memory", str(node.memory - HEADROOM), "--threads", "1",
                                                 "--data-dir", str(work / node.name),
                                                 *(("--data-listen", f"127.0.0.1:{INNER_DATA}", "--data-advertise",
                                                    f"{fleet.address(i)}:{PUBLIC_DATA}") if data_plane else
                                                   ("--data-listen", "off"))], f"agent-{node.name}"))
                fleet.proxy(i, PUBLIC_PORT, INNER_PORT)
                if data_plane:
                    fleet.proxy(i, PUBLIC_DATA, INNER_DATA)
            wait_alive(self.address, len(fleet.nodes), 60, work)
        except BaseException:
            self.stop()
            raise
        self.stub = rpc.ControllerStub(grpc.insecure_channel(self.address))

    def deploy(self, master: Path, types: str, budget: float, objective: str = "latency") -> dict:
        """Deploy from scratch (a switch would need room for both plans on these nodes)."""
        if self.stub.Status(pb.Empty()).active_deployment_id:
            subprocess.run([sys.executable, "-m", "controller.cli", "undeploy", "--controller", self.address],
                           check=True, capture_output=True, cwd=ROOT)
        args = [sys.executable, "-m", "controller.cli", "deploy", str(master), "--controller", self.address,
                "--prompt-tokens", str(PROMPT), "--output-tokens", str(OUTPUT), "--concurrency", str(CONCURRENT),
                "--context", str(PROMPT + OUTPUT), "--max-ppl-increase", str(budget), "--objective", objective]
        if types:
            args += ["--types", types]
        r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
        if r.returncode != 0:
            raise RuntimeError(f"deploy failed: {r.stderr.strip()}")
        return json.loads(self.stub.Status(pb.Empty()).plan_json)

    def generate(self, ids: list[int], n: int) -> list[float]:
        """Arrival times (perf_counter) of the request's start and of each token."""
        return arrival_times(self.stub.Generate(pb.GenerateRequest(prompt_tokens=ids, max_tokens=n, ignore_eos=True),
                                                timeout=600))

    def measure(self, master: Path, runs: int) -> Figures:
        self.generate(prompt_ids(master, 32), 4)                       # warm-up
        singles = [self.generate(prompt_ids(master, PROMPT, r), OUTPUT) for r in range(runs)]
        ttft = statistics.median(t[1] - t[0] for t in singles)
        decode = statistics.median(decode_tps(t) for t in singles)
        done: list[list[float]] = [[] for _ in range(CONCURRENT)]
        prompts = [prompt_ids(master, PROMPT, 100 + i) for i in range(CONCURRENT)]
        threads = [threading.Thread(target=lambda i=i: done[i].extend(self.generate(prompts[i], OUTPUT)))
                   for i in range(CONCURRENT)]
        before, cpu_before = self.metrics(), cpu_spent(self.fleet)
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = max(d[-1] for d in done) - t0
        after, cpu_after = self.metrics(), cpu_spent(self.fleet)
        busy = tuple((n.name, b[0] - a[0], (b[0] - a[0]) / (n.cpu * wall))
                     for n, a, b in zip(self.fleet.nodes, cpu_before, cpu_after))

        def grew(name: str, node: str) -> float:
            return after.get((name, node), 0.0) - before.get((name, node), 0.0)

        nodes = sorted({node for name, node in after if name == "edgefleet_stage_batch_size_count"})
        batch = tuple((n, grew("edgefleet_stage_batch_size_sum", n) / grew("edgefleet_stage_batch_size_count", n))
                      for n in nodes if grew("edgefleet_stage_batch_size_count", n))
        return Figures(ttft, decode, sum(len(d) - 1 for d in done) / wall, batch, busy)

    def metrics(self) -> dict[tuple[str, str], float]:
        """The controller's per-node metrics now: (sample name, node) -> value."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        got: dict[tuple[str, str], float] = {}
        for family in text_string_to_metric_families(httpx.get(self.http + "/metrics", timeout=30).text):
            for sample in family.samples:
                if "node" in sample.labels and "le" not in sample.labels:
                    got[(sample.name, sample.labels["node"])] = sample.value
        return got

    def stage_totals(self) -> tuple[float, float, int]:
        """Seconds of stage compute so far and seconds steps waited on the nodes before their
        compute (the hand-off to the engine, and any step ahead), each summed over every node,
        and the stage steps taken (the controller's metrics)."""
        sums: dict[str, float] = {}
        for (name, _), value in self.metrics().items():
            sums[name] = sums.get(name, 0.0) + value
        return (sums.get("edgefleet_stage_compute_seconds_sum", 0.0), sums.get("edgefleet_stage_queue_seconds_sum", 0.0),
                int(sums.get("edgefleet_stage_compute_seconds_count", 0)))

    def breakdown(self, master: Path, stages: int, link: Link, n_embd: int, proxy_s: float,
                  repeats: int = BREAKDOWN_REPEATS) -> tuple[str, list[tuple[float, float]]]:
        """Where a decode step's time goes, on a request like the single ones (512 + 64 tokens):
        the stages' compute and their queues (the controller's metrics), the emulated links
        (proxy_s per crossing, the proxy as measured, and the transmission time), and the
        rest: gRPC, serialization, thread hand-offs. Also each node's CPU seconds per token,
        and seconds per token its quota held it off the CPU. The sums are the difference of
        that request and the same one stopped after SHORT tokens (the prompt and its warm-up
        cancel out): the stages go on without the controller, so nothing can be read between
        two of one request's tokens. Measured `repeats` times; the repeat whose rest is the
        median is reported (one pair's rest moved by ±1 ms per crossing from run to run)."""
        ids = prompt_ids(master, PROMPT, 7)
        tokens = OUTPUT - SHORT
        # down the chain, then the last stage's step round to the first (a token id); one
        # stage goes on inside its node (agent/server.py); the answers to the controller are
        # not on the way
        crossings = stages if stages > 1 else 0
        links = (stages - 1) * (proxy_s + n_embd * 4 * 8 / (link.mbit * 1e6)) + (proxy_s if stages > 1 else 0.0)

        def totals():
            return self.stage_totals(), cpu_spent(self.fleet)

        def once() -> tuple[float, float, float, list[tuple[float, float]]]:
            """(s per token, its stage compute, its queue waits, each node's CPU and throttled s per token)"""
            before = totals()
            self.generate(ids, SHORT)
            middle = totals()
            times = self.generate(ids, OUTPUT)
            after = totals()
            (c0, q0, _), cpu0 = before
            (c1, q1, _), cpu1 = middle
            (c2, q2, _), cpu2 = after
            cpu = [(((z[0] - y[0]) - (y[0] - x[0])) / tokens, ((z[1] - y[1]) - (y[1] - x[1])) / tokens)
                   for x, y, z in zip(cpu0, cpu1, cpu2)]
            return 1 / decode_tps(times), ((c2 - c1) - (c1 - c0)) / tokens, ((q2 - q1) - (q1 - q0)) / tokens, cpu

        got = sorted((once() for _ in range(repeats)), key=lambda r: r[0] - r[1])
        per_token, compute, queue, cpu = got[len(got) // 2]
        rest = per_token - compute - links
        spread = "" if repeats < 2 else (
            f"; the median of {repeats} such pairs, whose rest{' per crossing' if crossings else ''} ran from "
            f"{(got[0][0] - got[0][1] - links) * 1e3 / max(1, crossings):.2f} to "
            f"{(got[-1][0] - got[-1][1] - links) * 1e3 / max(1, crossings):.2f} ms")
        each = f"{rest * 1e3 / crossings:.2f} ms per crossing; the target is <= 1.5" if crossings else "no crossing"
        return (f"{per_token * 1e3:.2f} ms/token = stage compute {compute * 1e3:.2f} + emulated links "
                f"{links * 1e3:.2f} ({crossings} crossings, the proxy as measured) + the rest {rest * 1e3:.2f} "
                f"({each}; of it, waits in the stages' queues {queue * 1e3:.2f}, and gRPC, serialization and "
                f"hand-offs {(rest - queue) * 1e3:.2f}{spread})"), cpu

    def stop(self) -> None:
        for a in self.agents:
            self.fleet.stop(a)
        self.controller.terminate()


# ---------------------------------------------------------------------- llama.cpp RPC

class LlamaRpc:
    """One ggml-rpc-server per node (-t 1), behind the node's proxy; the host tools run here."""

    def __init__(self, fleet: EmulatedFleet, system: str = "", inner_port: int = INNER_PORT):
        """system: the fleet's cgroups the servers run in (EmulatedFleet's systems); inner_port:
        where they listen inside their namespaces, behind the proxies."""
        self.fleet, self.bin, self.system = fleet, llamacpp.build(), system
        self.servers = []
        try:
            for i in range(len(fleet.nodes)):
                log = fleet.logs / f"rpc-server-{i}.log"
                since = log.stat().st_size if log.exists() else 0
                # line-buffered, so that the log says when it listens (its stdout is a file)
                self.servers.append(fleet.run(i, ["stdbuf", "-oL", "-eL", str(self.bin / "ggml-rpc-server"), "-H",
                                                  "127.0.0.1", "-p", str(inner_port), "-t", "1"],
                                              f"rpc-server-{i}", system=system))
                wait_for(self.servers[-1], log, "transport", since=since)
                fleet.proxy(i, PUBLIC_PORT + 1, inner_port)
        except BaseException:
            self.stop()
            raise

    def rpc_list(self, order: list[int]) -> str:
        return ",".join(f"{self.fleet.address(i)}:{PUBLIC_PORT + 1}" for i in order)

    def llama_bench(self, model: Path, order: list[int], split: list[int] | None, runs: int,
                    *test: str) -> dict:
        """llama-bench's JSON result of one test (e.g. "-p", "512", "-n", "0") on these servers."""
        cmd = [str(self.bin / "llama-bench"), "-m", str(model), "--rpc", self.rpc_list(order), "-ngl", "99",
               "-t", "1", "-fa", "1", "-r", str(runs), "-o", "json", *test]
        if split:
            cmd += ["-ts", "/".join(str(x) for x in split)]
        return json.loads(self._run(cmd))[0]

    def bench(self, model: Path, order: list[int], split: list[int] | None, runs: int,
              decode_tps: float | None = None) -> tuple[Figures, list[float]]:
        """The figures, and each node's CPU seconds in the 8-request run's timed work: the
        difference from a run of one 1-token request, which loads and warms up alike.
        decode_tps: one request's decode speed measured already (by_turns), else llama-bench's tg64."""
        pp = self.llama_bench(model, order, split, runs, "-p", str(PROMPT), "-n", "0")
        if decode_tps is None:
            decode_tps = self.llama_bench(model, order, split, runs, "-p", "0", "-n", str(OUTPUT), "-d",
                                          str(PROMPT))["avg_ts"]

        def batched(prompt: int, output: int, requests: int) -> tuple[dict, list[float]]:
            cmd = [str(self.bin / "llama-batched-bench"), "-m", str(model), "--rpc", self.rpc_list(order),
                   "-ngl", "99", "-t", "1", "-fa", "on", "-c", str(CONCURRENT * (PROMPT + OUTPUT)), "-b", "2048",
                   "-ub", "512", "-npp", str(prompt), "-ntg", str(output), "-npl", str(requests),
                   "--output-format", "jsonl"]
            if split:
                cmd += ["-ts", ",".join(str(x) for x in split)]
            before = cpu_spent(self.fleet, self.system)
            out = self._run(cmd)
            spent = [b[0] - a[0] for a, b in zip(before, cpu_spent(self.fleet, self.system))]
            return json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1]), spent

        row, spent = batched(PROMPT, OUTPUT, CONCURRENT)
        _, idle = batched(1, 1, 1)
        return (Figures(PROMPT / pp["avg_ts"], decode_tps, CONCURRENT * OUTPUT / row["t"],
                        phases=(row["t_pp"], row["t_tg"])),
                [max(0.0, a - b) for a, b in zip(spent, idle)])

    def cpu_per_token(self, model: Path, order: list[int], split: list[int]) -> list[tuple[float, float]]:
        """Each node's CPU seconds per decode token, and seconds per token its quota held it off
        the CPU, at 512 positions: the difference of a 96-token and a 32-token llama-bench run
        (warm-up and prefill alike)."""
        spent = []
        for n in (32, 96):
            before = cpu_spent(self.fleet, self.system)
            self.llama_bench(model, order, split, 1, "-p", "0", "-d", str(PROMPT), "-n", str(n))
            spent.append([(b[0] - a[0], b[1] - a[1]) for a, b in zip(before, cpu_spent(self.fleet, self.system))])
        return [((b[0] - a[0]) / 64, (b[1] - a[1]) / 64) for a, b in zip(*spent)]

    @staticmethod
    def _run(cmd: list[str]) -> str:
        """A llama.cpp tool's stdout (RuntimeError with the end of its stderr if it fails)."""
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            said = (r.stderr.strip() or r.stdout.strip())[-800:] or "nothing on stdout or stderr"
            raise RuntimeError(f"{Path(cmd[0]).name} failed with exit status {r.returncode}: {said} "
                               f"(the command: {' '.join(cmd)})")
        return r.stdout

    def stop(self) -> None:
        for s in self.servers:
            self.fleet.stop(s)


def by_turns(ef: Edgefleet, llama: LlamaRpc, master: Path, order: list[int], split: list[int],
             pairs: int) -> tuple[list[float], list[float]]:
    """One request of (b) and one of (c) by turns, `pairs` times, the order swapped every pair:
    each system's decode tok/s, pair by pair. (b) is llama-bench's tg64 at depth 512 on the
    RPC servers with (c)'s split, (c) one request of 512 + 64 tokens through the controller to
    edgefleet's agents, which hold (c)'s deployment. Both systems' processes live on every node
    at once, each in cgroups of its own with the node's limits (EmulatedFleet's systems), and
    the one whose turn it is not waits idle, so each has the node to itself while it runs; a
    drift of the machine's speed over minutes reaches both alike."""
    def b() -> float:
        return llama.llama_bench(master, order, split, 1, "-p", "0", "-n", str(OUTPUT), "-d", str(PROMPT))["avg_ts"]

    def c(r: int) -> float:
        return decode_tps(ef.generate(prompt_ids(master, PROMPT, r), OUTPUT))

    b(), c(0)       # warm-up
    got: dict[str, list[float]] = {"(b)": [], "(c)": []}
    for r in range(pairs):
        turn = [("(b)", b), ("(c)", lambda: c(r))]
        for run, measure in (turn if r % 2 == 0 else reversed(turn)):
            got[run].append(measure())
        say(f"pair {r + 1} of {pairs}: (b) {got['(b)'][-1]:.1f} tok/s, (c) {got['(c)'][-1]:.1f}")
    return got["(b)"], got["(c)"]


def paired_ratios(b: list[float], c: list[float]) -> tuple[float, ...]:
    """(c)/(b) pair by pair."""
    return tuple(y / x for x, y in zip(b, c))


def paired_text(ratios: tuple[float, ...]) -> str:
    """The median of the paired ratios, how many were at least 1, and each."""
    return (f"{statistics.median(ratios):.2f}, the median of {len(ratios)} pairs, {sum(r >= 1 for r in ratios)} "
            f"of them >= 1 ({', '.join(f'{r:.2f}' for r in ratios)})")


def tensor_split(plan: dict, nodes: list[Node]) -> tuple[list[int], list[int]]:
    """(node order, layers per node) of an edgefleet plan, for llama.cpp's --rpc and -ts. The
    output layer counts as one more on the last stage (llama.cpp splits n_layer + 1 layers)."""
    index = {n.name: i for i, n in enumerate(nodes)}
    order = [index[s["node"]] for s in plan["stages"]]
    split = [s["last"] - s["first"] for s in plan["stages"]]
    split[-1] += 1
    return order, split


# ---------------------------------------------------------------------- run

def n_embd(master: Path) -> int:
    from agent.weights import open_master, read_config

    return read_config(open_master(master)).n_embd


def say(what: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {what}", file=sys.stderr, flush=True)


def fleet_nodes(name: str, memory_mib: int | None) -> tuple[list[Node], Link]:
    """A fleet's nodes and link; memory_mib, if given, replaces every node's memory."""
    nodes, link = FLEETS[name]
    if memory_mib is not None:
        nodes = [Node(n.name, n.cpu, memory_mib * MiB) for n in nodes]
    return nodes, link


def edgefleet_runs(master_type: str, free_types: str, only_bc: bool) -> list[tuple[str, str, str, str]]:
    """(run, types, objective, what) of each edgefleet deployment measured: (c) always, (d)
    and (e) unless only_bc."""
    runs = [("(c)", master_type, "latency", f"every layer at {master_type}")]
    if not only_bc:
        runs += [("(d)", free_types, "latency", f"its own plan over {free_types or 'every type'}"),
                 ("(e)", master_type, "throughput", f"its plan for throughput, every layer at {master_type}")]
    return runs


def run_fleet(name: str, nodes: list[Node], link: Link, model_name: str, runs: int,
              work: Path, proxy_s: float, only_bc: bool = False,
              data_plane: bool = True, pairs: int = 8) -> list[tuple[str, Figures, str]]:
    """The fleet's rows: (label, figures, what it ran), and the breakdown, ceiling and CPU rows;
    with only_bc, (b) and (c) alone (and their rows). (b)'s and (c)'s one-request tok/s are
    the medians of `pairs` requests of each by turns (by_turns), on (c)'s deployment."""
    path_fn, master_type, free_types = models()[model_name]
    master = path_fn()
    plans, figs, per_token = {}, {}, {}
    splits: dict[str, tuple[list[int], list[int] | None]] = {} if only_bc else {"(a)": (list(range(len(nodes))), None)}
    with EmulatedFleet(nodes, link, work / "logs", systems=("", RPC)) as fleet:
        cpu = cpu_check(fleet)
        # llama.cpp's RPC servers, in cgroups of their own on every node, live through the
        # fleet's runs: they hold nothing between llama.cpp's runs and wait idle during edgefleet's
        llama = LlamaRpc(fleet, system=RPC, inner_port=INNER_PORT + 1)
        try:
            ef = Edgefleet(fleet, work, data_plane)
            try:
                for run, types, objective, what in edgefleet_runs(master_type, free_types, only_bc):
                    say(f"{name}: edgefleet, {what}")
                    plans[run] = ef.deploy(master, types, 5.0, objective)
                    figs[run] = ef.measure(master, runs)
                    if run in ("(c)", "(d)"):
                        per_token[run] = ef.breakdown(master, len(plans[run]["stages"]), link, n_embd(master),
                                                      proxy_s)
                    if run == "(c)":
                        splits["(b)"] = tensor_split(plans["(c)"], nodes)
                        say(f"{name}: (b) and (c) by turns, one request each, {pairs} pairs")
                        turns = by_turns(ef, llama, master, *splits["(b)"], pairs)
                        figs[run] = replace(figs[run], decode_tps=statistics.median(turns[1]),
                                            paired=paired_ratios(*turns))
            finally:
                ef.stop()
            # llama.cpp's runs: (a) its default split over every node, (b) (c)'s split, (f) (e)'s
            if "(e)" in plans:
                splits["(f)"] = tensor_split(plans["(e)"], nodes)
            say(f"{name}: llama.cpp RPC, splits " + ", ".join(f"{k} {v[1] or 'default'}" for k, v in splits.items()))
            busy = {}
            for run, (order, split) in splits.items():
                by_turn = statistics.median(turns[0]) if run == "(b)" else None
                figs[run], busy[run] = llama.bench(master, order, split, runs, by_turn)
            b_cpu = llama.cpu_per_token(master, *splits["(b)"])
        finally:
            llama.stop()

    def describe(p: dict, f: Figures | None = None) -> str:
        text = split_text(p)
        if f is not None:       # the cost model's prediction against what was measured
            pr, prediction = p["prediction"], plan_from_dict(p).prediction
            text += (f"; predicted TTFT {pr['ttft_s'] * 1e3:.0f} ms, {1 / pr['tpot_s']:.1f} tok/s "
                     f"(measured {f.ttft_s * 1e3:.0f} ms, {f.decode_tps:.1f}); decode steps in "
                     f"{prediction.decode_groups()} groups (a round of every session in "
                     + ", ".join(f"{g}: {r * 1e3:.0f} ms" for g, r in enumerate(prediction.group_rounds(), start=1))
                     + ")")
        return text

    def ceiling(run: str, ours: str) -> str:
        """What a pipeline could gain on llama.cpp's 8-request run of this split if each node
        did llama.cpp's work, all at once: its wall time against its busiest node's share of
        it (that node's CPU seconds in llama.cpp's run at the node's quota). A ceiling where
        edgefleet's stages cost no less CPU than llama.cpp's (the CPU row says per token)."""
        order, _ = splits[run]
        wall = CONCURRENT * OUTPUT / figs[run].concurrent_tps
        i = max(order, key=lambda k: busy[run][k] / nodes[k].cpu)
        least = busy[run][i] / nodes[i].cpu
        # the nodes share this machine: all of them together run no faster than its cores
        total, cores = sum(busy[run][k] for k in order), os.cpu_count() or 1
        prompts, decode = figs[run].phases
        return (f"{ours}/{run} with 8 requests, each node doing llama.cpp's work all at once: {wall / least:.2f} "
                f"(llama.cpp's {run} took {wall:.1f} s, of which its busiest node, {nodes[i].name}, ran "
                f"{busy[run][i]:.2f} s of CPU at {nodes[i].cpu:g} CPU = {least:.1f} s), and on this machine's "
                f"{cores} cores {wall / (total / cores):.2f} (its nodes ran {total:.2f} s of CPU in all); measured "
                f"{figs[ours].concurrent_tps / figs[run].concurrent_tps:.2f}. llama.cpp's run: {prompts:.1f} s for "
                f"the prompts, whose micro-batches its RPC backend already overlaps across the servers, and "
                f"{decode:.1f} s for the decode steps, one stage at a time; with decode steps that took no "
                f"time at all and prompts no faster than llama.cpp's, {ours}/{run} would be {wall / prompts:.2f}")

    c_cpu = per_token["(c)"][1]
    rows = []
    labels = {"(a)": ("(a) llama.cpp RPC, default split", "even split"),
              "(b)": ("(b) llama.cpp RPC, edgefleet's split", describe(plans["(c)"])),
              "(c)": ("(c) edgefleet, same split and types", describe(plans["(c)"], figs["(c)"])),
              "(d)": ("(d) edgefleet, own plan (5 %)", describe(plans.get("(d)", {}), figs.get("(d)"))
                      + f"; {plans.get('(d)', {}).get('prediction', {}).get('ppl_increase_pct', 0):+.2f} % ppl"
                      if "(d)" in plans else ""),
              "(e)": ("(e) edgefleet, throughput plan", describe(plans.get("(e)", {}), figs.get("(e)"))
                      if "(e)" in plans else ""),
              "(f)": ("(f) llama.cpp RPC, (e)'s split", describe(plans.get("(e)", {})) if "(e)" in plans else "")}
    for run in sorted(figs):
        rows.append((labels[run][0], figs[run], labels[run][1]))
    rows.append(("(c)/(b) by turns", figs["(c)"], "one request each, decode tok/s: " + paired_text(figs["(c)"].paired)))
    for run, (text, _) in per_token.items():
        rows.append((f"{run} per token", figs[run], text))
    for ours, theirs in (("(c)", "(b)"), ("(e)", "(f)")):
        if theirs in figs:
            rows.append((f"{ours} ceiling", figs[ours], ceiling(theirs, ours)))
        if figs.get(ours) and figs[ours].batch:
            rows.append((f"{ours} batches", figs[ours], "with 8 requests, the batch a step ran in, on average: "
                         + ", ".join(f"{n} {b:.2f}" for n, b in figs[ours].batch)))
        if figs.get(ours) and figs[ours].busy:
            rows.append((f"{ours} busy", figs[ours], "with 8 requests, each node's CPU seconds, and in brackets the "
                         "share of the run's wall time at its quota that it ran: " + ", ".join(
                             f"{n} {cpu:.2f} ({share:.0%})" for n, cpu, share in figs[ours].busy)))
    order = splits["(b)"][0]
    rows.append(("(c) and (b), CPU", figs["(c)"], "ms per decode token on each node of the split (in brackets, ms "
                 "per token its cgroup was held off the CPU by its quota): " + ", ".join(
                     f"{nodes[i].name} {c_cpu[i][0] * 1e3:.2f} ({c_cpu[i][1] * 1e3:.2f}) and "
                     f"{b_cpu[i][0] * 1e3:.2f} ({b_cpu[i][1] * 1e3:.2f})" for i in order)))
    rows.append(("CPU", None, "each node's speed, as a slowdown against an unlimited process: " + ", ".join(
        f"{n} {lone:.2f}x for a lone 2 ms step, {sust:.2f}x sustained" for n, lone, sust in cpu)))
    return rows


def is_system(label: str) -> bool:
    """A row of one system's figures, "(x) ...", not a breakdown or CPU row."""
    return label[3:4] == " " and not any(w in label for w in ("per token", "CPU", "ceiling", "batches", "busy"))


def decode_ratio(n: Figures, d: Figures) -> float:
    """One request's decode tok/s of n against d: the median of the pairs' ratios where n's
    requests ran by turns with d's (by_turns), else the ratio of the two speeds."""
    return statistics.median(n.paired) if n.paired else n.decode_tps / d.decode_tps


def targets(fig: dict[str, Figures]) -> list[str]:
    """The issue's targets, each figure on the plan edgefleet makes for the workload it
    measures, against llama.cpp on the same split and types: one request on (c), planned for
    one request's latency; 8 requests on (e), planned for 8 in flight (--objective
    throughput). (c)'s own 8-request figure is given beside (e)'s: a plan for one request
    does not say where 8 will queue (docs/versus.md, The six runs)."""
    def verdict(what: str, value: float, bound: float) -> str:
        return f"{what} >= {bound}: {value:.2f} {'met' if value >= bound else 'not met'}"

    out = []
    a, b, c, d, e, f = (fig.get(k) for k in ("(a)", "(b)", "(c)", "(d)", "(e)", "(f)"))
    if c is not None and b is not None:
        out.append(verdict("one request, tok/s, (c)/(b)", decode_ratio(c, b), 1.0))
    if e is not None and f is not None:
        out.append(verdict("8 requests, tok/s, (e)/(f)", e.concurrent_tps / f.concurrent_tps, 1.5)
                   + (f" (on the one-request plan, (c)/(b): {c.concurrent_tps / b.concurrent_tps:.2f})"
                      if c is not None and b is not None else ""))
    if d is not None and a is not None:
        out.append(verdict("one request, tok/s, (d)/(a)", decode_ratio(d, a), 1.5))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fleet", default="equal3,unequal4", help=f"comma-separated, of {', '.join(FLEETS)}")
    ap.add_argument("--model", default="smollm2-q8_0", help="smollm2-q8_0, smollm2-f16 or reference")
    ap.add_argument("--runs", type=int, default=3, help="single requests (and llama-bench repetitions) per figure")
    ap.add_argument("--pairs", type=int, default=8,
                    help="one request of (b) and of (c) by turns, this many times: their tok/s and ratio")
    ap.add_argument("--only-bc", action="store_true",
                    help="run (b) and (c) alone: the one-request ratio at the same split, with more --runs in the time")
    ap.add_argument("--node-memory", type=int, metavar="MIB",
                    help="every node's memory in MiB, for both systems (default: 340; SmolLM2 F16 with 8 requests' "
                         "KV cache needs 400 on the 3-node fleet)")
    ap.add_argument("--data-plane", choices=("on", "off"), default="on",
                    help="off: edgefleet's agents send steps to each other by gRPC, as before session 22 (A/B runs)")
    a = ap.parse_args()
    if a.runs < 1 or a.pairs < 1:
        sys.exit("--runs and --pairs must be at least 1")
    llamacpp.build()
    for name in a.fleet.split(","):
        nodes, link = fleet_nodes(name, a.node_memory)
        tmp = Path(tempfile.mkdtemp(prefix=f"versus-{name}-"))
        proxy_s, bare_s = delay_proxy.measure(link.delay_ms), delay_proxy.measure(0)
        try:
            rows = run_fleet(name, nodes, link, a.model, a.runs, tmp, proxy_s, a.only_bc, a.data_plane == "on",
                             a.pairs)
        except (RuntimeError, subprocess.CalledProcessError) as exc:
            raise SystemExit(f"{name}: {exc} (logs kept in {tmp})") from None
        shutil.rmtree(tmp)
        say(f"{name}: done")
        print(f"\n{name}: {len(nodes)} nodes (CPU {', '.join(f'{n.cpu:g}' for n in nodes)}; "
              f"{nodes[0].memory // MiB} MiB each), {link}, {a.model}, edgefleet's data plane {a.data_plane}")
        print(f"the delay proxy adds {proxy_s * 1e3:.3f} ms per crossing with "
              f"{link.delay_ms:g} ms set (one 576-float step, loopback; {bare_s * 1e3:.3f} ms with none)")
        print(f"{'system':40} {'TTFT':>8} {'tok/s':>7} {'8 req tok/s':>12}")
        systems = [r for r in rows if is_system(r[0])]
        for label, f, _ in systems:
            print(f"{label:40} {f.row()[0]:>8} {f.row()[1]:>7} {f.row()[2]:>12}")
        fig = {label[:3]: f for label, f, _ in systems}
        for num, den in (("(c)", "(b)"), ("(d)", "(a)"), ("(e)", "(f)"), ("(e)", "(a)")):
            if num not in fig or den not in fig:
                continue
            n, d = fig[num], fig[den]
            tps = f"{decode_ratio(n, d):.2f}" + (" (by turns)" if n.paired else "")
            print(f"{num}/{den}: TTFT {d.ttft_s / n.ttft_s:.2f}x faster, tok/s {tps}, "
                  f"8 requests {n.concurrent_tps / d.concurrent_tps:.2f}")
        print("the targets, each on the plan edgefleet makes for the workload measured:")
        for line in targets(fig):
            print(f"  {line}")
        for label, _, plan in rows:
            print(f"  {label[:3] if is_system(label) else label} {plan}")


if __name__ == "__main__":
    main()
