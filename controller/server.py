"""The Controller gRPC service (RPC handling only; behaviour is in controller/service.py)
and the controller process's lifecycle."""
from __future__ import annotations

import io
import json
import logging
import os
import queue
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
from rich.console import Console

from controller.deployments import Deployments
from controller.errors import ControlError, NoDeployment, answer
from controller.metrics import Metrics
from controller.planning import compact_types, plan_table
from controller.registry import Registry
from controller.requests import Requests
from controller.state import State
from proto import adapter as A
from proto import edgefleet_pb2 as pb
from proto import edgefleet_pb2_grpc as rpc
from proto.security import SERVER_OPTIONS, Security

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ControllerConfig:
    listen: str = "0.0.0.0:50051"         # where the Controller service listens (port 0 = any)
    state_path: Path = Path("edgefleet.db")
    workdir: Path | None = None           # shards built here (default: beside the state file)
    security: Security = Security()
    heartbeat_s: float = 1.0              # agents send State this often
    timeout_s: float = 3.0                # no heartbeat for this long: the node is lost
    http: str = ""                        # HOST:PORT of the OpenAI API and /metrics ("" = none)
    max_queue: int = 256                  # requests that may wait for a KV-cache slot (beyond: 429)
    max_body: int = 4 * 2 ** 20           # largest HTTP request body accepted (beyond: 413)


def abort(context, exc: Exception):
    """End an RPC with the error's one sentence and the status the error table gives it."""
    if isinstance(exc, ControlError):
        context.abort(getattr(grpc.StatusCode, answer(exc).grpc), str(exc))
    log.error("internal error", exc_info=exc)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc}")


class ControllerService(rpc.ControllerServicer):
    def __init__(self, deployments: Deployments, requests: Requests, registry: Registry):
        self.deployments = deployments
        self.requests = requests
        self.registry = registry

    def Register(self, request, context):
        try:
            node = A.node_info(request)
        except A.WireError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self.registry.register(node)
        return pb.RegisterReply(heartbeat_interval_seconds=self.registry.heartbeat_s)

    def Heartbeat(self, request, context):
        return pb.HeartbeatReply(known=self.registry.heartbeat(A.agent_state(request)))

    def Status(self, request, context):
        dep = self.deployments.active
        held = {s.node: s for s in dep.stages} if dep else {}
        nodes = []
        for live in self.registry.all():
            st = live.state
            stage = held.get(live.node.name)
            nodes.append(pb.NodeStatus(
                node=A.node_pb(live.node), health=self.registry.health(live),
                last_seen_seconds_ago=time.monotonic() - live.last_seen if live.last_seen else -1,
                memory_used_bytes=st.memory_used_bytes if st else 0,
                layers=f"{stage.first}-{stage.last - 1}" if stage else "",
                layer_types=compact_types(stage.types) if stage else "",
                sessions=st.sessions if st else 0, queue_depth=st.queue_depth if st else 0))
        return pb.FleetStatus(nodes=nodes, active_deployment_id=dep.id if dep else "",
                              model=dep.model_path if dep else "", plan_json=dep.plan.to_json() if dep else "")

    def Deploy(self, request, context):
        req = self._placement(request, context)
        result = yield from self._with_progress(lambda report: self.deployments.deploy(req, report), context)
        yield pb.DeployProgress(phase="done", message=f"deployment {result.id} active", deployment_id=result.id,
                                plan_json=result.plan.to_json())

    def Plan(self, request, context):
        req = self._placement(request, context)
        problem, plan, _ = yield from self._with_progress(lambda report: self.deployments.plan(req, report), context)
        text = io.StringIO()
        Console(file=text, width=200).print(plan_table(problem, plan))
        yield pb.DeployProgress(phase="done", message=text.getvalue(), plan_json=plan.to_json())

    @staticmethod
    def _placement(request, context):
        try:
            return A.placement(request)
        except A.WireError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{exc}; fix the request")

    @staticmethod
    def _with_progress(job, context):
        """Run job(report) on its own thread, yielding its progress messages; returns its result
        (aborts the call with the job's one-sentence error)."""
        events: queue.Queue = queue.Queue()

        def report(phase, message, done=0, total=0, plan_json=""):
            events.put(pb.DeployProgress(phase=phase, message=message, done=done, total=total, plan_json=plan_json))

        result: dict = {}

        def run():
            try:
                result["value"] = job(report)
            except Exception as exc:  # noqa: BLE001 - answered by abort(): a bug becomes INTERNAL
                result["error"] = exc
            events.put(None)

        threading.Thread(target=run, name="job", daemon=True).start()
        while (item := events.get()) is not None:
            yield item
        if "error" in result:
            abort(context, result["error"])
        return result["value"]

    def Undeploy(self, request, context):
        try:
            return pb.Ack(message=self.deployments.undeploy())
        except ControlError as exc:
            abort(context, exc)

    def Drain(self, request, context):
        try:
            return pb.Ack(message=self.deployments.drain(request.node))
        except ControlError as exc:
            abort(context, exc)

    def Resume(self, request, context):
        try:
            return pb.Ack(message=self.deployments.resume(request.node))
        except ControlError as exc:
            abort(context, exc)

    def Generate(self, request, context):
        dep = self.deployments.active
        if dep is None:
            abort(context, NoDeployment("no deployment is active; run `edgefleet deploy MODEL.gguf` first"))
        ids = list(request.prompt_tokens) or self.requests.tokenizer(dep.model_path).encode(request.prompt)
        try:
            first = True
            for p in self.requests.complete(dep.model_path, ids, request.max_tokens or 64, request.temperature,
                                            request.top_p or 1.0, request.seed, request.stop,
                                            ignore_eos=request.ignore_eos):
                yield pb.GenerateReply(token=p.token, text=p.text, finished=bool(p.finish_reason),
                                       finish_reason=p.finish_reason, recovered_seconds=p.recovered_s,
                                       prompt_token_count=len(ids) if first else 0)
                first = False
        except ControlError as exc:
            abort(context, exc)

    def Events(self, request, context):
        return pb.EventList(events=[pb.Event(time=t, kind=k, message=m)
                                    for t, k, m in self.deployments.state.events(request.limit or 100)])


def serve(cfg: ControllerConfig) -> int:
    state = State(cfg.state_path)
    registry = Registry(state, cfg.heartbeat_s, cfg.timeout_s)
    metrics = Metrics(lambda: [(x.node.name, registry.health(x), x.state) for x in registry.all()])
    deployments = Deployments(state, registry, cfg.security,
                              cfg.workdir or Path(cfg.state_path).with_suffix(".shards"), metrics)
    requests = Requests(deployments, cfg.security, metrics, cfg.max_queue)
    http = None
    if cfg.http:
        from controller.openai_api import HttpServer, create_app

        http = HttpServer(create_app(requests, cfg.security.token, cfg.max_body), cfg.http, cfg.security.tls_cert,
                          cfg.security.tls_key)
    server = grpc.server(ThreadPoolExecutor(max_workers=64, thread_name_prefix="rpc"),
                         interceptors=cfg.security.interceptors(), options=SERVER_OPTIONS)
    rpc.add_ControllerServicer_to_server(ControllerService(deployments, requests, registry), server)
    port = cfg.security.bind(server, cfg.listen)
    server.start()
    if http is not None:
        http.start()
    registry.start_monitor()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    host = cfg.listen.rsplit(":", 1)[0]
    address = f"{host}:{port}"
    print(json.dumps({"event": "listening", "name": "controller", "address": address, "port": port,
                      "pid": os.getpid(), "state": str(cfg.state_path),
                      "http": http.address if http else ""}), flush=True)
    state.event("controller-start", f"listening on {address}" +
                (f", resuming deployment {deployments.active.id}" if deployments.active else ""))
    log.info("controller listening on %s (state %s)", address, cfg.state_path)
    stop.wait()
    registry.stop()
    if http is not None:
        http.stop()
    server.stop(grace=2).wait()
    state.close()
    return 0
