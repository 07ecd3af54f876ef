"""The one cost model (docs/cost-model.md): stage compute, activation transfer, memory.

Used by the solver (ILP coefficients), the plan evaluator, the simulator and the
controller's predictions, so that every number edgefleet predicts comes from here.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import networkx as nx

from solver import memory as M

from solver.devices import TypeSpeed
from solver.problem import Fleet, LayerProfile, ModelProfile, Node, Workload

# llama.cpp's flash attention on a CPU takes a sequence's rows of one llama_decode through its
# tiled kernel from this many rows (GGML_FA_TILE_Q in ggml-cpu/common.h); fewer rows (a
# decode step, a short prompt) go through the one-row kernel, position by position, at the
# decode's rate per attended position: a 50-token slice at ~300 positions took ~350 ms more
# on the emulated 4 nodes than the tiled rate priced (docs/cost-model.md)
FA_TILE_ROWS = 64
REPLY_BYTES = 16      # a sampled token (+ framing), from the last stage straight to the controller
TOKEN_BYTES = 4       # a token id entering the first stage (from the controller, or round from the last)


def roofline_s(read_s: float, flops: float, flop_s: float) -> float:
    """The roofline: the larger of reading the weights (read_s seconds) and doing `flops`
    FLOPs at flop_s FLOP/s."""
    compute = flops / flop_s
    return read_s if read_s > compute else compute


def compute_s(read_s: float, flops: float, attn_flops: float, flop_s: float, attn_flop_s: float,
              fixed_s: float = 0.0, tokens: int = 1) -> float:
    """Weights and matrix products as a roofline (read_s, flops at flop_s), then attention's
    FLOPs at its own measured rate; where that is not measured (0), attention joins the
    roofline's FLOPs at flop_s. A step of several tokens (tokens > 1; one token is a
    matrix-vector product) with a measured fixed part (fixed_s, agent/profile.py:fit_step)
    costs fixed_s + flops / flop_s, never less than the roofline.
    Also the simulator's batch time (simulations/engine.py)."""
    if attn_flop_s > 0:
        attention = attn_flops / attn_flop_s
    else:
        flops, attention = flops + attn_flops, 0.0
    matrix = roofline_s(read_s, flops, flop_s)
    if tokens > 1 and fixed_s > 0:
        matrix = max(matrix, fixed_s + flops / flop_s)
    return matrix + attention


def fixed_s(nbytes: float, s: TypeSpeed) -> float:
    """The fixed part of a step of several tokens over nbytes of weights at speed s (0 where
    it was not measured); compute_s applies it."""
    return nbytes / s.batch_bytes_per_s if s.batch_bytes_per_s > 0 else 0.0


def attention_rate(s: TypeSpeed, rows: int) -> float:
    """Attention's FLOP/s for a sequence that brings `rows` rows to one llama_decode: the
    prompt's (tiled kernel) from FA_TILE_ROWS rows, else the decode's (one-row kernel)."""
    return s.attention_flops if rows >= FA_TILE_ROWS else s.decode_attention_flops


def layer_step_s(node: Node, layer: LayerProfile, q: str, tokens: int, ctx: float, decode: bool = False) -> float:
    """Seconds for one layer at type q to process `tokens` tokens (a decode batch, one token
    per sequence, or a prompt) whose attention spans `ctx` positions on average: the weights
    and matrix products (a roofline, or a several-token step's fixed part plus its FLOPs),
    plus attention (compute_s) at the node's measured or declared per-type speeds (a prompt
    of fewer than FA_TILE_ROWS tokens at the decode's attention rate). A decode batch costs
    at most one step per sequence: the agent runs it so where that is faster
    (agent/engine.py:_parts; it decides for the whole stage, this per layer)."""
    s = node.speed[q]
    together = compute_s(layer.bytes[q] / s.decode_bytes_per_s, tokens * layer.flops,
                         tokens * layer.attn_flops_per_ctx * ctx, s.prefill_flops,
                         attention_rate(s, 1 if decode else tokens), fixed_s(layer.bytes[q], s), tokens)
    if decode and tokens > 1:
        return min(together, tokens * layer_step_s(node, layer, q, 1, ctx, decode=True))
    return together


def prefill_s(node: Node, layer: LayerProfile, q: str, w: Workload) -> float:
    """One layer over the whole prompt (attention spans half the prompt on average)."""
    return layer_step_s(node, layer, q, w.prompt_tokens, w.prompt_tokens / 2)


def decode_span(w: Workload) -> float:
    """The positions a decode step attends, on average over the generation: the prompt and
    half the output."""
    return w.prompt_tokens + w.output_tokens / 2


def decode_s(node: Node, layer: LayerProfile, q: str, w: Workload, batch: int = 1) -> float:
    """One layer, one decode step of `batch` sequences at the mean context of the generation."""
    return layer_step_s(node, layer, q, batch, decode_span(w), decode=True)


def layer_latency_s(node: Node, layer: LayerProfile, q: str, w: Workload) -> float:
    """A layer's share of one request's end-to-end latency: prefill + (output − 1) decode steps."""
    return prefill_s(node, layer, q, w) + (w.output_tokens - 1) * decode_s(node, layer, q, w)


def head_s(node: Node, model: ModelProfile, rows: int, decode: bool = False) -> float:
    """Seconds for the last stage's output norm + LM head over `rows` output rows: a roofline
    of its weights (head_bytes) and 2 × n_vocab × n_embd FLOPs per row, at the node's speed
    for the head's type (else for its best type). llama.cpp runs the head only on the rows a
    step outputs, and the agents ask for one per request step (the last prompt token of a
    prefill, the one new token of a decode step). A decode batch's rows cost at most one
    step each, as layer_step_s's."""
    s = node.speed.get(model.head_type) or node.speed[node.types[0]]
    together = compute_s(model.head_bytes / s.decode_bytes_per_s, rows * model.head_flops, 0.0, s.prefill_flops, 0.0,
                         fixed_s(model.head_bytes, s), rows)
    return min(together, rows * head_s(node, model, 1)) if decode and rows > 1 else together


def decode_share(w: Workload) -> float:
    """The throughput objective's unit is one request with `concurrency` in flight: its
    prompt once, and its share of the (output − 1) decode steps it shares with the others."""
    return (w.output_tokens - 1) / w.concurrency


def layer_busy_s(node: Node, layer: LayerProfile, q: str, w: Workload) -> float:
    """A layer's busy time per request with `concurrency` in flight (throughput objective): its
    prompt, then its share of decode steps of the whole batch. A workload of long prompts is
    mostly prompt work, which a plan balanced on decode steps alone leaves on the fast node."""
    return prefill_s(node, layer, q, w) + decode_share(w) * decode_s(node, layer, q, w, w.concurrency)


def head_busy_s(node: Node, model: ModelProfile, w: Workload) -> float:
    """The LM head's busy time per request: one row after the prompt, its share of the batch's rows."""
    return head_s(node, model, 1) + decode_share(w) * head_s(node, model, w.concurrency, decode=True)


def stage_overhead_busy_s(node: Node, w: Workload) -> float:
    """A stage's step overheads per request: its prompt's step and its share of the decode steps."""
    return node.step_overhead_s * (1 + decode_share(w))


def head_latency_s(node: Node, model: ModelProfile, w: Workload) -> float:
    """The head's share of one request's latency: one row for the first token, one per further token."""
    return w.output_tokens * head_s(node, model, 1)


def stage_overhead_latency_s(node: Node, w: Workload) -> float:
    return node.step_overhead_s * w.output_tokens


def kv_bytes(layer: LayerProfile, w: Workload) -> int:
    """KV cache of one layer for all concurrent sequences at full context, padded as llama.cpp
    pads it (solver/memory.py)."""
    return layer.kv_bytes_per_token * M.padded_context(w.concurrency, w.ctx)


def _compute_bytes(model: ModelProfile, w: Workload, per_token: int, per_token_position: int) -> int:
    return model.scratch_bytes - M.FIXED_BYTES + M.compute_bytes(
        per_token, per_token_position, w.concurrency, w.ctx, M.batch_tokens(w.prompt_tokens, w.concurrency))


def runtime_bytes(model: ModelProfile, w: Workload) -> int:
    """What every stage holds beyond its layers: llama.cpp's compute buffer, and the tensors
    every shard carries (solver/memory.py)."""
    return model.stage_bytes + _compute_bytes(model, w, model.scratch_bytes_per_token, model.mask_bytes_per_position)


def head_bytes(model: ModelProfile, w: Workload) -> int:
    """What the last stage holds beyond a middle one: the head's weights instead of the
    one-row vocabulary, and llama.cpp's larger compute buffer while the head runs (a row of
    logits per output, and the logits rows it keeps)."""
    weights = model.head_bytes - model.stage_bytes
    if not model.head_scratch_bytes_per_token:
        return weights
    rows = M.head_outputs(w.concurrency, M.batch_tokens(w.prompt_tokens, w.concurrency))
    head = _compute_bytes(model, w, model.head_scratch_bytes_per_token, 2 * model.mask_bytes_per_position) \
        + M.logits_bytes(model.n_vocab, rows)
    kept = M.logits_bytes(model.n_vocab, w.concurrency)
    return weights + max(0, head - (runtime_bytes(model, w) - model.stage_bytes)) + kept


def layer_bytes(model: ModelProfile, l: int, q: str, w: Workload) -> int:
    """Memory a layer costs on its node: weights at type q + its KV cache."""
    lp = model.layers[l]
    return lp.bytes[q] + kv_bytes(lp, w)


@dataclass(frozen=True)
class Network:
    """Transfer times between graph vertices over the cheapest route. Each hop of a route
    stores and forwards: a message of b bytes costs Σ_hops (latency + b / bandwidth)."""
    fleet: Fleet

    @cached_property
    def graph(self) -> nx.Graph:
        return self.fleet.graph()

    def _times(self, nbytes: int) -> dict:
        cache = self.__dict__.setdefault("_cache", {})
        if nbytes not in cache:
            for a, b, d in self.graph.edges(data=True):
                d["_w"] = d["latency"] + nbytes / d["bandwidth"]
            cache[nbytes] = dict(nx.all_pairs_dijkstra_path_length(self.graph, weight="_w"))
        return cache[nbytes]

    def transfer_s(self, a: str, b: str, nbytes: int) -> float:
        if a == b:
            return 0.0
        return self._times(nbytes)[a][b]


def hop_first_s(net: Network, model: ModelProfile, w: Workload, a: str, b: str) -> float:
    """A hop's share of the first token: the prompt's activations forward. (The sampled token
    goes from the last stage straight to the controller, reply_s, not back up the chain, and
    round to the first stage, ring_s.)"""
    return net.transfer_s(a, b, model.act_bytes_per_token * w.prompt_tokens)


def hop_next_s(net: Network, model: ModelProfile, w: Workload, a: str, b: str) -> float:
    """A hop's share of each further token: one token's activations forward."""
    return net.transfer_s(a, b, model.act_bytes_per_token)


def hop_latency_s(net: Network, model: ModelProfile, w: Workload, a: str, b: str) -> float:
    """A hop's share of one request's latency: the first token, then (output − 1) further ones."""
    return hop_first_s(net, model, w, a, b) + (w.output_tokens - 1) * hop_next_s(net, model, w, a, b)


def hop_step_s(net: Network, model: ModelProfile, w: Workload, a: str, b: str) -> float:
    """One decode step of the whole batch over a hop."""
    return net.transfer_s(a, b, model.act_bytes_per_token * w.concurrency)


def hop_busy_s(net: Network, model: ModelProfile, w: Workload, a: str, b: str) -> float:
    """A hop's busy time per request (throughput objective): the prompt's activations, then
    its share of the batch's decode steps."""
    return hop_first_s(net, model, w, a, b) + decode_share(w) * hop_step_s(net, model, w, a, b)


def controller_first_s(net: Network, w: Workload, first: str) -> float:
    """Requests enter at the controller vertex: the prompt's token ids to the first stage; 0
    when the fleet does not place the controller."""
    c = net.fleet.controller
    return net.transfer_s(c, first, TOKEN_BYTES * w.prompt_tokens) if c else 0.0


def ring_s(net: Network, last: str, first: str, k: int = 1) -> float:
    """Each further step of k sessions: the last stage goes on by itself and sends the sampled
    token ids round to the first stage (agent/server.py); 0 with one stage."""
    return net.transfer_s(last, first, TOKEN_BYTES * k)


def ring_latency_s(net: Network, w: Workload, last: str, first: str) -> float:
    """The way round's share of one request's latency: once per further token."""
    return (w.output_tokens - 1) * ring_s(net, last, first)


def reply_s(net: Network, last: str, k: int = 1) -> float:
    """k sampled tokens from the last stage straight to the controller (the agents' Collect
    call); 0 when the fleet does not place the controller. A request's latency holds one: the
    stages go on while the others travel."""
    c = net.fleet.controller
    return net.transfer_s(last, c, REPLY_BYTES * k) if c else 0.0
