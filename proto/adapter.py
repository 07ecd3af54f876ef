"""The one place that converts gRPC messages to and from plain dataclasses.

Domain code (agent, controller) passes these dataclasses around, never pb2 objects.
Tensors travel as numpy arrays; values read from the wire are checked here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from proto import edgefleet_pb2 as pb
from solver.request import Options, PlacementRequest, Workload, check

BEARER = "authorization"


class WireError(ValueError):
    """A message that does not make sense (bad shape, unknown dtype, ...)."""


# ------------------------------------------------------------------ tensors

_WIRE = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}     # on the wire: little-endian


def tensor_pb(a: np.ndarray) -> pb.Tensor:
    # a step's tensor crosses here once per stage and token: dtype lookups by value, not by
    # numpy's `dtype.name` (Python code), and no copy where the array is already as sent
    name = "float16" if a.dtype.type is np.float16 else "float32"
    return pb.Tensor(shape=a.shape, dtype=name, data=np.ascontiguousarray(a, _WIRE[name]).tobytes())


def tensor_array(t: pb.Tensor) -> np.ndarray:
    wire = _WIRE.get(t.dtype)
    if wire is None:
        raise WireError(f"tensor dtype {t.dtype!r} is not supported on the wire; send float32 or float16")
    if not t.shape:
        raise WireError("a tensor without a shape; send its shape with its data")
    a = np.frombuffer(t.data, dtype=wire)
    n = math.prod(t.shape)          # Python integers: a forged shape cannot overflow
    if a.size != n:
        raise WireError(f"tensor of shape {list(t.shape)} carries {a.size} values")
    return a.reshape(tuple(t.shape)).astype(wire.newbyteorder("="))


# ------------------------------------------------------------------ nodes and stages

@dataclass(frozen=True)
class NodeInfo:
    name: str
    address: str                  # host:port of the agent's service
    memory_bytes: int             # memory offered for shards and KV cache
    gguf_types: tuple[str, ...]   # GGUF types the node can execute
    threads: int
    device: str = "cpu"
    agent_bytes: int = 0          # the agent process's own resident memory at start
    data_address: str = ""        # host:port of its data plane for steps from other agents ("" = none)


def node_pb(n: NodeInfo) -> pb.NodeInfo:
    return pb.NodeInfo(name=n.name, address=n.address, memory_bytes=n.memory_bytes,
                       gguf_types=list(n.gguf_types), threads=n.threads, device=n.device,
                       agent_bytes=n.agent_bytes, data_address=n.data_address)


def node_info(m: pb.NodeInfo) -> NodeInfo:
    if not m.name:
        raise WireError("node info without a name")
    return NodeInfo(m.name, m.address, int(m.memory_bytes), tuple(m.gguf_types), int(m.threads), m.device or "cpu",
                    int(m.agent_bytes), m.data_address)


@dataclass(frozen=True)
class StageSpec:
    first_layer: int
    last_layer: int               # exclusive
    layer_types: tuple[str, ...]
    has_embedding: bool
    has_head: bool


def stage_pb(s: StageSpec) -> pb.StageSpec:
    return pb.StageSpec(first_layer=s.first_layer, last_layer=s.last_layer, layer_types=list(s.layer_types),
                        has_embedding=s.has_embedding, has_head=s.has_head)


def stage_spec(m: pb.StageSpec) -> StageSpec:
    return StageSpec(int(m.first_layer), int(m.last_layer), tuple(m.layer_types), m.has_embedding, m.has_head)


@dataclass(frozen=True)
class LoadedStage:
    deployment_id: str
    sha256: str
    stage: StageSpec
    next_address: str
    active: bool
    memory_bytes: int


@dataclass(frozen=True)
class AgentState:
    node: NodeInfo
    memory_used_bytes: int
    sessions: int
    queue_depth: int
    active_deployment_id: str
    stages: tuple[LoadedStage, ...]
    shards: tuple[str, ...]
    bytes_received: int
    steps_computed: int
    draining: bool


def state_pb(s: AgentState) -> pb.AgentState:
    return pb.AgentState(
        node=node_pb(s.node), memory_used_bytes=s.memory_used_bytes, sessions=s.sessions,
        queue_depth=s.queue_depth, active_deployment_id=s.active_deployment_id,
        stages=[pb.LoadedStage(deployment_id=x.deployment_id, sha256=x.sha256, stage=stage_pb(x.stage),
                               next_address=x.next_address, active=x.active, memory_bytes=x.memory_bytes)
                for x in s.stages],
        shards=list(s.shards), bytes_received=s.bytes_received, steps_computed=s.steps_computed,
        draining=s.draining)


def agent_state(m: pb.AgentState) -> AgentState:
    return AgentState(
        node=node_info(m.node), memory_used_bytes=int(m.memory_used_bytes), sessions=int(m.sessions),
        queue_depth=int(m.queue_depth), active_deployment_id=m.active_deployment_id,
        stages=tuple(LoadedStage(x.deployment_id, x.sha256, stage_spec(x.stage), x.next_address, x.active,
                                 int(x.memory_bytes)) for x in m.stages),
        shards=tuple(m.shards), bytes_received=int(m.bytes_received), steps_computed=int(m.steps_computed),
        draining=m.draining)


# ------------------------------------------------------------------ pipeline steps

@dataclass(frozen=True)
class StepIn:
    """One step of one session, as it enters a stage."""

    session_id: str
    position: int                        # index of the step's first token in the session
    tokens: tuple[int, ...] = ()         # stage 1
    hidden: np.ndarray | None = None     # later stages: [n_tokens, n_embd]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    return_logits: bool = False
    finish: bool = False
    deployment_id: str = ""
    cancel: bool = False
    reply_to: str = ""                   # the last stage answers this collector (Agent.Collect)
    stage_times: tuple["StageTime", ...] = ()   # with reply_to: the stages already passed
    continue_tokens: int = 0             # one-token steps the last stage goes on with by itself
    stop_token: int | None = None        # ... stopping after this token

    @property
    def n_tokens(self) -> int:
        return len(self.tokens) if self.hidden is None else int(self.hidden.shape[0])


def step_pb(s: StepIn) -> pb.StageInput:
    m = pb.StageInput(session_id=s.session_id, position=s.position, tokens=list(s.tokens),
                      sampling=pb.Sampling(temperature=s.temperature, top_p=s.top_p, seed=s.seed,
                                           return_logits=s.return_logits),
                      finish=s.finish, deployment_id=s.deployment_id, cancel=s.cancel, reply_to=s.reply_to,
                      stage_times=_times_pb(s.stage_times), continue_tokens=s.continue_tokens)
    if s.stop_token is not None:
        m.stop_token = s.stop_token
    if s.hidden is not None:
        m.hidden.CopyFrom(tensor_pb(s.hidden))
    return m


def step_in(m: pb.StageInput) -> StepIn:
    if not m.session_id:
        raise WireError("a step without a session_id")
    hidden = tensor_array(m.hidden) if m.HasField("hidden") else None
    if hidden is not None and hidden.ndim != 2:
        raise WireError(f"hidden states must be [tokens, n_embd], got shape {list(hidden.shape)}")
    if not m.cancel and hidden is None and not m.tokens:
        raise WireError(f"step of session {m.session_id} carries neither tokens nor hidden states")
    sp = m.sampling if m.HasField("sampling") else pb.Sampling(top_p=1.0)
    if m.continue_tokens and sp.return_logits:
        raise WireError(f"step of session {m.session_id} asks the stages to go on and to return logits: the "
                        "logits of steps nobody sent would pile up; ask for one or the other")
    return StepIn(m.session_id, int(m.position), tuple(m.tokens), hidden, float(sp.temperature),
                  float(sp.top_p) if sp.top_p > 0 else 1.0, int(sp.seed), sp.return_logits,
                  m.finish, m.deployment_id, m.cancel, m.reply_to, _times(m.stage_times),
                  int(m.continue_tokens), int(m.stop_token) if m.HasField("stop_token") else None)


def unbatched(m):
    """A StageInput or StageOutput and the ones sent in it (`more`), in order, each to be
    handled as if it came alone (their own `more` is never read). WireError if one of them
    carries more in turn: a sender merges one level only."""
    if not m.more:
        return (m,)
    if any(x.more for x in m.more):
        raise WireError("a step sent inside another carries further steps itself; send one level only")
    return (m, *m.more)


@dataclass(frozen=True)
class StageTime:
    node: str
    compute_seconds: float
    queue_seconds: float
    batch_size: int


@dataclass(frozen=True)
class StepOut:
    """The answer to one step, from the last stage."""

    session_id: str
    position: int
    token: int = 0
    logits: np.ndarray | None = None
    stage_times: tuple[StageTime, ...] = field(default_factory=tuple)
    error: str = ""
    error_code: str = ""
    continued: bool = False     # the last stage went on with this token: the next answer follows unasked


def out_pb(o: StepOut) -> pb.StageOutput:
    m = pb.StageOutput(session_id=o.session_id, position=o.position, token=o.token, error=o.error,
                       error_code=o.error_code, stage_times=_times_pb(o.stage_times), continued=o.continued)
    if o.logits is not None:
        m.logits.CopyFrom(tensor_pb(o.logits))
    return m


def step_out(m: pb.StageOutput) -> StepOut:
    return StepOut(m.session_id, int(m.position), int(m.token),
                   tensor_array(m.logits) if m.HasField("logits") else None, _times(m.stage_times),
                   m.error, m.error_code, m.continued)


def _times_pb(times) -> list[pb.StageTime]:
    return [pb.StageTime(node=t.node, compute_seconds=t.compute_seconds, queue_seconds=t.queue_seconds,
                         batch_size=t.batch_size) for t in times]


def _times(ms) -> tuple[StageTime, ...]:
    return tuple(StageTime(t.node, t.compute_seconds, t.queue_seconds, int(t.batch_size)) for t in ms)


# ------------------------------------------------------------------ profiles

@dataclass(frozen=True)
class TypeTiming:
    gguf_type: str
    decode_seconds_per_layer: float          # one token through one layer, attention excluded
    prefill_seconds_per_layer_token: float   # a prompt token through one layer, attention excluded
    decode_attention_seconds_per_position: float = 0.0    # per layer and cached position (0: not measured)
    prefill_attention_seconds_per_position: float = 0.0   # per layer, prompt token and attended position
    # a step of b >= 2 tokens through one layer costs this + b x prefill_seconds_per_layer_token
    # (0: not measured; the roofline prices it)
    batch_fixed_seconds_per_layer: float = 0.0


@dataclass(frozen=True)
class ProfileResult:
    timings: tuple[TypeTiming, ...]
    rtt_seconds: float
    bandwidth_bytes_per_second: float
    n_embd: int
    n_ff: int
    step_overhead_seconds: float = 0.0


def profile_pb(p: ProfileResult) -> pb.ProfileReply:
    return pb.ProfileReply(
        timings=[pb.TypeTiming(gguf_type=t.gguf_type, decode_seconds_per_layer=t.decode_seconds_per_layer,
                               prefill_seconds_per_layer_token=t.prefill_seconds_per_layer_token,
                               decode_attention_seconds_per_position=t.decode_attention_seconds_per_position,
                               prefill_attention_seconds_per_position=t.prefill_attention_seconds_per_position,
                               batch_fixed_seconds_per_layer=t.batch_fixed_seconds_per_layer)
                 for t in p.timings],
        rtt_seconds=p.rtt_seconds, bandwidth_bytes_per_second=p.bandwidth_bytes_per_second,
        n_embd=p.n_embd, n_ff=p.n_ff, step_overhead_seconds=p.step_overhead_seconds)


def profile_result(m: pb.ProfileReply) -> ProfileResult:
    return ProfileResult(tuple(TypeTiming(t.gguf_type, t.decode_seconds_per_layer, t.prefill_seconds_per_layer_token,
                                          t.decode_attention_seconds_per_position,
                                          t.prefill_attention_seconds_per_position,
                                          t.batch_fixed_seconds_per_layer)
                               for t in m.timings),
                         m.rtt_seconds, m.bandwidth_bytes_per_second, int(m.n_embd), int(m.n_ff),
                         m.step_overhead_seconds)


# ------------------------------------------------------------------ placement requests

def placement_pb(r: PlacementRequest) -> pb.DeployRequest:
    w, o = r.workload, r.options
    return pb.DeployRequest(
        model_path=r.model, max_ppl_increase=o.max_ppl_increase, objective=o.objective,
        prompt_tokens=w.prompt_tokens, output_tokens=w.output_tokens, concurrency=w.concurrency, context=w.context,
        types=list(o.types), pin=list(o.pinned), exclude=list(o.excluded), max_stages=o.max_stages,
        time_limit_seconds=o.time_limit, text_path=r.text, solver=o.solver, sensitivity_tokens=r.tokens)


def placement(m: pb.DeployRequest) -> PlacementRequest:
    """The request as sent (every field is sent: a zero is a zero), checked."""
    r = PlacementRequest(
        model=m.model_path, text=m.text_path, tokens=m.sensitivity_tokens,
        workload=Workload(m.prompt_tokens, m.output_tokens, m.concurrency, m.context),
        options=Options(objective=m.objective, max_ppl_increase=m.max_ppl_increase, types=tuple(m.types),
                        pinned=tuple(m.pin), excluded=tuple(m.exclude), max_stages=m.max_stages,
                        solver=m.solver, time_limit=m.time_limit_seconds))
    try:
        check(r)
    except ValueError as exc:
        raise WireError(str(exc)) from None
    return r
