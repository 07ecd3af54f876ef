"""The placement problem as plain, frozen data: model profile, fleet, workload, budget, options.

Everything the solver, the simulator and the controller's predictions need, and nothing
they would have to look up elsewhere. Loaders for the user-facing files (fleet YAML/TOML,
model profile JSON) validate at the boundary and raise ValueError with one actionable
sentence.
"""
from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gguf
import networkx as nx
import yaml

from solver import jsonio
from solver.devices import DEVICES, TypeSpeed, declared_speed
from solver.ggml_types import TYPE_ORDER, llama_70b, matrix_type, tensor_bytes
from solver.memory import FIXED_BYTES, kv_bytes_per_token
from solver.request import Options, PlacementRequest, Workload, check
from solver.units import parse_quantity


def type_bytes(qtype: str, n_elements: int) -> int:
    """Bytes of a tensor of n_elements at a GGUF type (block layout from the gguf package)."""
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    if n_elements % block:
        raise ValueError(f"{n_elements} elements do not split into {qtype} blocks of {block}")
    return n_elements // block * size


# ----------------------------------------------------------------------------- model

@dataclass(frozen=True)
class LayerProfile:
    bytes: dict[str, int]          # weight bytes of this transformer block at each type
    flops: float                   # FLOPs per token of its weight matmuls (2 × parameters)
    attn_flops_per_ctx: float      # extra attention FLOPs per token per context position
    kv_bytes_per_token: int        # K and V cache bytes per token (f16, GQA-aware)
    sensitivity: dict[str, float]  # ΔNLL (nats/token) when only this layer is at that type

    def takes(self, q: str) -> bool:
        """Whether this layer may be at type q (it has a size and a sensitivity for it)."""
        return q in self.bytes and q in self.sensitivity


@dataclass(frozen=True)
class ModelProfile:
    name: str
    n_embd: int                     # hidden size: activations sent between stages are n_embd f32
    n_vocab: int
    layers: tuple[LayerProfile, ...]
    embed_bytes: int                # token embedding, held by the first stage
    head_bytes: int                 # output norm + LM head, held by the last stage
    scratch_bytes_per_token: int    # llama.cpp compute buffer per token of a batch (solver/memory.py)
    scratch_bytes: int              # fixed runtime memory of a stage
    mask_bytes_per_position: int = 0     # compute buffer per token of a batch and context position
    head_scratch_bytes_per_token: int = 0   # compute buffer per token of a batch while the LM head runs (its logits rows apart)
    stage_bytes: int = 0            # tensors every shard holds besides its layers (output norm, one f32 vocabulary row)
    tied_embeddings: bool = False   # head_bytes holds the token embedding too (one copy when one stage has both ends)
    head_type: str = "F16"          # GGUF type of the LM head's matrix (token_embd's when tied): the node's speed at it times the head
    sensitivity_source: str = "measured"   # or the proxy used (docs/cost-model.md)
    sha256: str = ""

    @property
    def n_layer(self) -> int:
        return len(self.layers)

    @property
    def types(self) -> tuple[str, ...]:
        """Types some layer may take, best first. A layer may take those it has both a size and
        a sensitivity for (a layer of a quantized master only those that need no more bytes
        than it has)."""
        return tuple(q for q in TYPE_ORDER if any(lp.takes(q) for lp in self.layers))

    @property
    def act_bytes_per_token(self) -> int:
        return 4 * self.n_embd

    @property
    def head_flops(self) -> float:
        """FLOPs of the LM head per output row (the n_vocab × n_embd matmul)."""
        return 2.0 * self.n_vocab * self.n_embd

    def to_json(self) -> str:
        return jsonio.dumps(asdict(self), indent=1)


def model_from_shape(name: str, n_layer: int, n_embd: int, n_head: int, n_head_kv: int, n_ff: int,
                     n_vocab: int, tied: bool, sensitivity: list[dict[str, float]],
                     master_type: str = "F16", sensitivity_source: str = "measured",
                     sha256: str = "", head_type: str = "",
                     kept: tuple[tuple[str, int], ...] = ()) -> ModelProfile:
    """Profile of a llama-family model from its shapes: sizes per type from the GGUF block layout
    (a mix's per layer, as llama.cpp chooses its matrices' types), FLOPs from the parameter
    count, KV bytes from the KV heads (GQA). master_type: the token embedding's type;
    head_type: an untied output matrix's (default: master_type). kept: per layer, a master's
    own name for it and the bytes of its matrices as stored, which that name then costs (a
    layer keeps its bytes)."""
    head_type = master_type if tied or not head_type else head_type
    if len(sensitivity) != n_layer:
        raise ValueError(f"the sensitivity table has {len(sensitivity)} layers; the model has {n_layer}")
    head_dim = n_embd // n_head
    kv_dim = n_head_kv * head_dim
    # (matrix, rows, elements per row): a type applies per row (ggml_types.matrix_type)
    matrices = [("attn_q", n_embd, n_embd), ("attn_k", kv_dim, n_embd), ("attn_v", kv_dim, n_embd),
                ("attn_output", n_embd, n_embd), ("ffn_gate", n_ff, n_embd), ("ffn_up", n_ff, n_embd),
                ("ffn_down", n_embd, n_ff)]
    norms = 2 * n_embd * 4                                                             # f32 norms
    params = sum(r * c for _, r, c in matrices)
    big = llama_70b(n_layer, n_head, n_head_kv)
    layers = []
    for l, sens in enumerate(sensitivity):
        sizes = {q: sum(tensor_bytes(matrix_type(q, m, c, l, n_layer, big), r, c) for m, r, c in matrices) + norms
                 for q in TYPE_ORDER}
        if kept:
            sizes[kept[l][0]] = kept[l][1] + norms
        layers.append(LayerProfile(bytes=sizes, flops=2.0 * params, attn_flops_per_ctx=4.0 * n_embd,
                                   kv_bytes_per_token=kv_bytes_per_token(1, n_head_kv, head_dim),
                                   sensitivity=dict(sens)))
    emb = type_bytes(master_type, n_vocab * n_embd)
    head = n_embd * 4 + (0 if tied else type_bytes(head_type, n_vocab * n_embd))
    if tied:
        head += emb  # the last stage needs the tied matrix too
    return ModelProfile(
        name=name, n_embd=n_embd, n_vocab=n_vocab, layers=tuple(layers), embed_bytes=emb, head_bytes=head,
        # llama.cpp's compute buffers (solver/memory.py: layer_compute_bytes, head_compute_bytes)
        scratch_bytes_per_token=4 * (4 * n_embd + 3 * n_ff), scratch_bytes=FIXED_BYTES, mask_bytes_per_position=2,
        head_scratch_bytes_per_token=4 * 2 * n_embd, stage_bytes=2 * 4 * n_embd, tied_embeddings=tied,
        head_type=head_type, sensitivity_source=sensitivity_source, sha256=sha256)


def load_model_profile(path: str | Path) -> ModelProfile:
    """A model profile JSON (as written by ModelProfile.to_json / `edgefleet model profile`)."""
    try:
        d = json.loads(Path(path).read_text())
        layers = tuple(LayerProfile(**lp) for lp in d.pop("layers"))
        return ModelProfile(layers=layers, **d)
    except FileNotFoundError:
        raise ValueError(f"model profile {path} does not exist") from None
    except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{path} is not a model profile JSON ({e}); write one with "
                         f"`edgefleet plan --model MODEL.gguf --save-profile FILE`") from None


# ----------------------------------------------------------------------------- fleet

def measured_speed(layer: "LayerProfile", q: str, decode_s: float, prefill_s_per_token: float,
                   decode_attention_s: float = 0.0, prefill_attention_s: float = 0.0,
                   batch_fixed_s: float = 0.0) -> TypeSpeed:
    """A node's speed at type q from an agent's timing of one real layer (Profile RPC): the
    weight bytes it streamed per second in a decode step, the FLOPs it did per second in a
    prefill, attention's FLOPs per second (its seconds per cached position), and the weight
    bytes per second of a several-token step's fixed part (0: not measured)."""
    if decode_s <= 0 or prefill_s_per_token <= 0:
        raise ValueError(f"measured times for {q} must be positive")
    if decode_attention_s < 0 or prefill_attention_s < 0 or batch_fixed_s < 0:
        raise ValueError(f"measured attention and batch times for {q} must not be negative")
    per_position = layer.attn_flops_per_ctx
    return TypeSpeed(layer.bytes[q] / decode_s, layer.flops / prefill_s_per_token,
                     per_position / prefill_attention_s if prefill_attention_s else 0.0,
                     per_position / decode_attention_s if decode_attention_s else 0.0,
                     layer.bytes[q] / batch_fixed_s if batch_fixed_s else 0.0)


@dataclass(frozen=True)
class Node:
    name: str
    memory: int                          # bytes the node may use for the model
    speed: dict[str, TypeSpeed]          # per supported type; a type not listed is not supported
    step_overhead_s: float = 0.0005      # fixed time of one stage step (framework, RPC hop)
    address: str = ""

    @property
    def types(self) -> tuple[str, ...]:
        return tuple(q for q in TYPE_ORDER if q in self.speed)


@dataclass(frozen=True)
class Link:
    a: str
    b: str
    bandwidth: float    # bytes/s
    latency: float      # seconds, one way


@dataclass(frozen=True)
class Fleet:
    nodes: tuple[Node, ...]
    links: tuple[Link, ...]
    controller: str = ""   # graph vertex where requests enter and tokens leave ("" = not modelled)

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise ValueError(f"the fleet has no node {name!r}; it has {', '.join(n.name for n in self.nodes)}")

    def graph(self) -> nx.Graph:
        g = nx.Graph()
        g.add_nodes_from(n.name for n in self.nodes)
        for l in self.links:
            g.add_edge(l.a, l.b, bandwidth=l.bandwidth, latency=l.latency)
        return g


def node_from_dict(d: dict, where: str) -> Node:
    """One node entry of a fleet file: either `device: <catalog name>` or declared figures
    (memory_bandwidth, flops, efficiency per type) or measured `profile` seconds."""
    if not isinstance(d, dict) or "name" not in d:
        raise ValueError(f"{where}: each node needs at least a name and a memory size")
    name = str(d["name"])
    base = {}
    if "device" in d:
        if d["device"] not in DEVICES:
            raise ValueError(f"{where}: unknown device {d['device']!r}; known: {', '.join(DEVICES)}")
        base = dict(DEVICES[d["device"]])
    spec = {**base, **d}
    if "memory" not in spec:
        raise ValueError(f"{where}: node {name!r} has no memory (e.g. memory: 6GiB)")
    memory = int(parse_quantity(spec["memory"], f"{where}: memory of {name}"))
    types = spec.get("types", TYPE_ORDER)
    bad = [q for q in types if q not in TYPE_ORDER]
    if bad:
        raise ValueError(f"{where}: node {name!r} lists unknown types {bad}; known: {', '.join(TYPE_ORDER)}")
    if "speed" in spec:  # measured or explicit per-type figures
        speed = {q: TypeSpeed(parse_quantity(s["decode_bytes_per_s"], f"{where}: {name} {q}"),
                              parse_quantity(s["prefill_flops"], f"{where}: {name} {q}"),
                              parse_quantity(s.get("attention_flops", 0), f"{where}: {name} {q}"),
                              parse_quantity(s.get("decode_attention_flops", 0), f"{where}: {name} {q}"),
                              parse_quantity(s.get("batch_bytes_per_s", 0), f"{where}: {name} {q}"))
                 for q, s in spec["speed"].items() if q in types}
    else:
        for k in ("memory_bandwidth", "flops"):
            if k not in spec:
                raise ValueError(f"{where}: node {name!r} needs memory_bandwidth and flops, a catalog `device`, "
                                 f"or measured `speed`")
        speed = declared_speed(parse_quantity(spec["memory_bandwidth"], f"{where}: memory_bandwidth of {name}"),
                               parse_quantity(spec["flops"], f"{where}: flops of {name}"),
                               spec.get("efficiency", {}), types)
    if memory <= 0 or not speed or any(s.decode_bytes_per_s <= 0 or s.prefill_flops <= 0 or s.attention_flops < 0
                                       or s.decode_attention_flops < 0 or s.batch_bytes_per_s < 0
                                       for s in speed.values()):
        raise ValueError(f"{where}: node {name!r} needs a positive memory and speeds for at least one type")
    overhead = parse_quantity(spec.get("step_overhead", 0.0005), f"{where}: step_overhead of {name}")
    return Node(name=name, memory=memory, speed=speed, step_overhead_s=overhead, address=str(spec.get("address", "")))


def fleet_from_dict(d: dict, where: str = "fleet") -> Fleet:
    if not isinstance(d, dict) or not isinstance(d.get("nodes"), list) or not d["nodes"]:
        raise ValueError(f"{where}: expected a mapping with a non-empty `nodes` list")
    nodes = tuple(node_from_dict(n, f"{where}: nodes[{i}]") for i, n in enumerate(d["nodes"]))
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: node names must be unique; {names} repeats one")
    links = []
    default = d.get("network")  # every pair of nodes on one switch, unless links say otherwise
    if default is not None:
        bw = parse_quantity(default.get("bandwidth", "1Gbit"), f"{where}: network bandwidth")
        lat = parse_quantity(default.get("latency", "0.5ms"), f"{where}: network latency")
        links += [Link("switch", n, bw, lat / 2) for n in names]
    for i, l in enumerate(d.get("links", []) or []):
        try:
            a, b = l["between"] if "between" in l else (l["a"], l["b"])
            links.append(Link(str(a), str(b), parse_quantity(l["bandwidth"], f"{where}: links[{i}] bandwidth"),
                              parse_quantity(l.get("latency", 0), f"{where}: links[{i}] latency")))
        except (KeyError, TypeError):
            raise ValueError(f"{where}: links[{i}] needs `between: [A, B]` and `bandwidth`") from None
        if links[-1].bandwidth <= 0 or links[-1].latency < 0:
            raise ValueError(f"{where}: links[{i}] needs a positive bandwidth and a latency ≥ 0")
    fleet = Fleet(nodes=nodes, links=tuple(links), controller=str(d.get("controller", "")))
    g = fleet.graph()
    if fleet.controller and fleet.controller not in g:
        raise ValueError(f"{where}: controller {fleet.controller!r} is not a node or link end")
    cut = [n for n in names if not nx.has_path(g, names[0], n)]
    if cut:
        raise ValueError(f"{where}: nodes {cut} cannot be reached from {names[0]}; add links or a `network:` section")
    return fleet


def load_fleet(path: str | Path) -> Fleet:
    """Fleet file, YAML or TOML (by suffix)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"fleet file {p} does not exist")
    try:
        d = tomllib.loads(p.read_text()) if p.suffix == ".toml" else yaml.safe_load(p.read_text())
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"{p} is not valid {'TOML' if p.suffix == '.toml' else 'YAML'}: "
                         f"{str(e).splitlines()[0]}") from None
    return fleet_from_dict(d, str(p))


# ----------------------------------------------------------------------------- the problem

@dataclass(frozen=True)
class Problem:
    model: ModelProfile
    fleet: Fleet
    workload: Workload = field(default_factory=Workload)
    options: Options = field(default_factory=Options)

    def validate(self) -> None:
        o = self.options
        check(PlacementRequest(self.model.name, self.workload, o))
        names = {n.name for n in self.fleet.nodes}
        for n in (*o.pinned, *o.excluded):
            if n not in names:
                raise ValueError(f"the fleet has no node {n!r}; it has {', '.join(sorted(names))}")
        bad = [q for q in o.types if q not in self.model.types]
        if bad:
            raise ValueError(f"types {bad} are not available for this model (it has {', '.join(self.model.types)})")


def problem_for(request: PlacementRequest, model: ModelProfile, fleet: Fleet) -> Problem:
    """The solver's problem for a request, a model profile and a fleet (validated)."""
    problem = Problem(model, fleet, request.workload, request.options)
    problem.validate()
    return problem
