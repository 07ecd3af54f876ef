"""Prometheus metrics of one controller (prometheus-client, served at GET /metrics).

Requests, tokens, TTFT and time-per-output-token histograms, per-node stage compute and
queue time (reported by the agents on every step), per-node queue depth and sessions (from
heartbeats), failovers and deploys.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily

from proto.adapter import AgentState, StageTime

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
disable_created_metrics()     # no *_created series: dashboards do not use them

STAGE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)     # MAX_BATCH is 64


class NodeCollector:
    """Per-node gauges read from the registry at scrape time."""

    def __init__(self, nodes: Callable[[], Iterable[tuple[str, str, AgentState | None]]]):
        self.nodes = nodes

    def collect(self):
        up = GaugeMetricFamily("edgefleet_node_up", "1 if the node answers heartbeats", labels=["node"])
        depth = GaugeMetricFamily("edgefleet_node_queue_depth", "Steps waiting on the node's compute thread",
                                  labels=["node"])
        sessions = GaugeMetricFamily("edgefleet_node_sessions", "Sessions holding KV cache on the node",
                                     labels=["node"])
        memory = GaugeMetricFamily("edgefleet_node_memory_used_bytes", "Memory the node's stages hold",
                                   labels=["node"])
        for name, health, st in self.nodes():
            up.add_metric([name], 1.0 if health == "alive" else 0.0)
            if st is not None:
                depth.add_metric([name], st.queue_depth)
                sessions.add_metric([name], st.sessions)
                memory.add_metric([name], st.memory_used_bytes)
        return [up, depth, sessions, memory]


class Metrics:
    def __init__(self, nodes: Callable[[], Iterable[tuple[str, str, AgentState | None]]] = lambda: ()):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("edgefleet_requests", "Generation requests answered, by API and outcome "
                                "(stop, length, error, rejected)", ["api", "outcome"], registry=r)
        self.prompt_tokens = Counter("edgefleet_prompt_tokens", "Prompt tokens of served requests", registry=r)
        self.generated_tokens = Counter("edgefleet_generated_tokens", "Tokens generated", registry=r)
        self.in_flight = Gauge("edgefleet_requests_in_flight", "Requests admitted and not finished", registry=r)
        self.ttft = Histogram("edgefleet_time_to_first_token_seconds", "Request arrival to its first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("edgefleet_time_per_output_token_seconds", "Time between consecutive output tokens",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.stage_compute = Histogram("edgefleet_stage_compute_seconds", "Compute time of one step on a node",
                                       ["node"], buckets=STAGE_BUCKETS, registry=r)
        self.stage_queue = Histogram("edgefleet_stage_queue_seconds", "Time a step waited on a node",
                                     ["node"], buckets=STAGE_BUCKETS, registry=r)
        self.stage_batch = Histogram("edgefleet_stage_batch_size", "Steps computed together in the batch a step "
                                     "ran in on a node", ["node"], buckets=BATCH_BUCKETS, registry=r)
        self.failovers = Counter("edgefleet_failovers", "Failovers, by result (ok, failed)", ["result"], registry=r)
        self.deploys = Counter("edgefleet_deploys", "Deployments switched, by reason (deploy, drain, failover) "
                               "and result (ok, failed)", ["reason", "result"], registry=r)
        r.register(NodeCollector(nodes))

    def observe_stages(self, times: Iterable[StageTime]) -> None:
        for t in times:
            self.stage_compute.labels(t.node).observe(t.compute_seconds)
            self.stage_queue.labels(t.node).observe(t.queue_seconds)
            self.stage_batch.labels(t.node).observe(t.batch_size)

    def render(self) -> bytes:
        return generate_latest(self.registry)
