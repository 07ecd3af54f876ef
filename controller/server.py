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

from controller import deploy as D
from controller.agents import AgentError
from controller.planning import compact_types, plan_table
from controller.registry import Registry
from controller.service import BadRequest, Busy, Control, NoDeployment
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


def _options(request: pb.DeployRequest) -> D.DeployOptions:
    return D.DeployOptions(
        model_path=Path(request.model_path), max_ppl_increase=request.max_ppl_increase or 5.0,
        objective=request.objective or "latency", prompt_tokens=request.prompt_tokens or 256,
        output_tokens=request.output_tokens or 128, concurrency=request.concurrency or 8,
        context=request.context or 512, types=tuple(request.types), pin=tuple(request.pin),
        exclude=tuple(request.exclude), max_stages=request.max_stages,
        time_limit_s=request.time_limit_seconds or 60.0,
        text_path=Path(request.text_path) if request.text_path else None)


class ControllerService(rpc.ControllerServicer):
    def __init__(self, control: Control, registry: Registry):
        self.control = control
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
        dep = self.control.active
        held = {s["node"]: s for s in dep.stages} if dep else {}
        nodes = []
        for live in self.registry.all():
            st = live.state
            stage = held.get(live.node.name)
            nodes.append(pb.NodeStatus(
                node=A.node_pb(live.node), health=self.registry.health(live),
                last_seen_seconds_ago=time.monotonic() - live.last_seen if live.last_seen else -1,
                memory_used_bytes=st.memory_used_bytes if st else 0,
                layers=f"{stage['first']}-{stage['last'] - 1}" if stage else "",
                layer_types=compact_types(tuple(stage["types"])) if stage else "",
                sessions=st.sessions if st else 0, queue_depth=st.queue_depth if st else 0))
        return pb.FleetStatus(nodes=nodes, active_deployment_id=dep.id if dep else "",
                              model=dep.model_path if dep else "", plan_json=json.dumps(dep.plan) if dep else "")

    def Deploy(self, request, context):
        result = yield from self._with_progress(lambda report: self.control.deploy(_options(request), report),
                                                context)
        yield pb.DeployProgress(phase="done", message=f"deployment {result.id} active", deployment_id=result.id,
                                plan_json=json.dumps(result.plan))

    def Plan(self, request, context):
        problem, plan, _ = yield from self._with_progress(
            lambda report: self.control.plan(_options(request), report), context)
        text = io.StringIO()
        Console(file=text, width=200).print(plan_table(problem, plan))
        yield pb.DeployProgress(phase="done", message=text.getvalue(), plan_json=plan.to_json())

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
            except (ValueError, AgentError) as exc:
                result["error"] = str(exc)
            except Exception as exc:  # a bug: say so, keep serving
                log.exception("job failed")
                result["error"] = f"internal error: {exc}"
            events.put(None)

        threading.Thread(target=run, name="job", daemon=True).start()
        while (item := events.get()) is not None:
            yield item
        if "error" in result:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, result["error"])
        return result["value"]

    def Undeploy(self, request, context):
        try:
            return pb.Ack(message=self.control.undeploy())
        except NoDeployment as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))

    def Drain(self, request, context):
        try:
            return pb.Ack(message=self.control.drain(request.node))
        except (ValueError, AgentError) as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))

    def Generate(self, request, context):
        dep = self.control.active
        if dep is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "no deployment is active; run `edgefleet deploy MODEL.gguf` first")
        ids = list(request.prompt_tokens) or self.control.tokenizer(dep.model_path).encode(request.prompt)
        try:
            first = True
            for p in self.control.complete(dep.model_path, ids, request.max_tokens or 64, request.temperature,
                                           request.top_p or 1.0, request.seed, request.stop,
                                           ignore_eos=request.ignore_eos):
                yield pb.GenerateReply(token=p.token, text=p.text, finished=bool(p.finish_reason),
                                       finish_reason=p.finish_reason, recovered_seconds=p.recovered_s,
                                       prompt_token_count=len(ids) if first else 0)
                first = False
        except NoDeployment as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except BadRequest as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Busy as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except ValueError as exc:   # the fleet could not recover from a failure
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except AgentError as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"the request failed in the fleet: {exc}; retry it")

    def Events(self, request, context):
        return pb.EventList(events=[pb.Event(time=t, kind=k, message=m)
                                    for t, k, m in self.control.state.events(request.limit or 100)])


def serve(cfg: ControllerConfig) -> int:
    state = State(cfg.state_path)
    registry = Registry(state, cfg.heartbeat_s, cfg.timeout_s)
    control = Control(state, registry, cfg.security, cfg.workdir or Path(cfg.state_path).with_suffix(".shards"),
                      cfg.max_queue)
    http = None
    if cfg.http:
        from controller.openai_api import HttpServer, create_app

        http = HttpServer(create_app(control, cfg.security.token, cfg.max_body), cfg.http, cfg.security.tls_cert,
                          cfg.security.tls_key)
    server = grpc.server(ThreadPoolExecutor(max_workers=64, thread_name_prefix="rpc"),
                         interceptors=cfg.security.interceptors(), options=SERVER_OPTIONS)
    rpc.add_ControllerServicer_to_server(ControllerService(control, registry), server)
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
                (f", resuming deployment {control.active.id}" if control.active else ""))
    log.info("controller listening on %s (state %s)", address, cfg.state_path)
    stop.wait()
    registry.stop()
    if http is not None:
        http.stop()
    server.stop(grace=2).wait()
    state.close()
    return 0
