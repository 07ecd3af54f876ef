"""The memory model: what a stage costs on its node when llama.cpp runs it (one formula, used
by the solver's constraints, the controller's messages and the agent's admission).

A stage holds
- its weights (the shard's tensors; llama.cpp maps the file and reads every page it uses),
- the KV cache: F16 K and V for each of its layers, a cache per session (agent/runtime.py) of
  its context rounded up to a multiple of 256 (llama.cpp pads each so): n_ctx = sessions x
  that,
- llama.cpp's compute buffer, sized when the context is made for the largest batch: with
  flash attention, T tokens (T = min(batch, n_ctx)) of activations, 4 x (4 d + 3 n_ff) bytes
  each, and the F16 attention masks, one per session's cache (2 x T x a session's padded
  context in all); a stage with the LM head may peak instead at the head: two rows of d
  per token, 4 bytes each, while the mask is still live, and a row of logits for each
  output. llama.cpp sizes that for every token of a batch unless told the most outputs a
  batch has (`n_outputs_max`); an agent's stage makes one per session at most (the last
  token of each session's step), and says so (agent/runtime.py `Settings.outputs`), so
  min(T, sessions) rows: without it the logits alone were ~100 MB of SmolLM2's head stage,
- the logits rows llama.cpp keeps for the sessions (last stage: n_vocab floats per session,
  its output buffer, beside the compute buffer).
The compute-buffer terms were read off llama.cpp's own log ("CPU compute buffer size") for
SmolLM2-135M and the reference model across sessions 1-8, context 256-2048 and batches
64-512 (again in session 15, for the cache per session, and in session 18, for the head's
outputs). tests/test_memory.py checks the formula against llama.cpp's logged buffers (at or
above them, by at most 2 MiB + 10 %) and the resident memory of real agents against it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

BATCH_TOKENS = 512          # most tokens in one llama_decode (a prompt is fed in slices of this)
MAX_BATCH = 64              # steps computed together in one llama_decode at most (agent and simulator)
CTX_PAD = 256               # llama.cpp rounds each session's context up to a multiple of this
FIXED_BYTES = 1 << 20       # small buffers of a context (graph metadata, inputs)


def unit_for(n: float) -> tuple[str, int, int]:
    """(name, bytes, decimals) of the unit that fits n bytes: GiB from 1 GiB, MiB below."""
    return ("GiB", 2 ** 30, 2) if n >= 2 ** 30 else ("MiB", 2 ** 20, 1)


def fmt_bytes(n: float) -> str:
    """Bytes in the unit that fits, e.g. '63.0 MiB' or '1.20 GiB'."""
    unit, scale, digits = unit_for(n)
    return f"{n / scale:.{digits}f} {unit}"


def decode_group(sessions: int, groups: int) -> int:
    """Most one-token steps a stage computes together, for a deployment whose `sessions` go
    round its stages in `groups` groups (decode_groups): ceil(sessions / groups). Groups that
    meet at a busy stage would merge into one, which keeps one stage busy at a time, so no
    stage takes more than a group's share (agent and simulator; docs/runtime.md). With one
    group there is nothing to keep apart: MAX_BATCH."""
    if groups <= 1:
        return MAX_BATCH
    return min(MAX_BATCH, group_batch(sessions, groups))


def group_batch(sessions: int, groups: int) -> int:
    """Sessions in one of `groups` groups (the largest): ceil(sessions / groups)."""
    return max(1, -(-sessions // max(1, groups)))


def decode_groups(group_steps: Sequence[Sequence[float]], links_s: float = 0.0) -> int:
    """How many groups a deployment's sessions go round its stages in. group_steps[s][g - 1]
    is stage s's decode step for one group of group_batch(sessions, g) sessions (the cost
    model's prediction, in chain order), for g = 1 .. stages; links_s is a step's time on
    the links all the way round. A round in which every session gets one token takes the
    longer of the slowest stage's g steps (it computes every group) and one group's way round
    the stages and links (the others wait for it meanwhile): max(g × max_s t_s, Σ_s t_s +
    links_s). The fewest groups with the shortest round.

    A stage's step costs less per session in a larger batch, so more groups pay only where
    the stages would otherwise wait on each other. On the emulated 4 nodes, F16 split
    slowest 1 → mid 13 → fast 13 → slow 3 layers, 8 requests of 512 + 64 tokens: the rule
    before (⌈Σ t_s / max t_s⌉ at a batch of all sessions) sent them round in 3 groups, and
    the 0.6-CPU mid node, the busiest, decoded 2.3 sessions a step on average: (c)/(b) 1.38
    in bench/versus.py. One group: 1.33, two: 1.53 (docs/runtime.md). This rule gives two
    there, and keeps two on the 2-stage Q8_0 plans of those nodes (mid 10 → fast 20, mid 15
    → fast 15), where one group made the real fleet's decode steps 26 % slower."""
    rounds = group_rounds(group_steps, links_s)
    best, best_round = len(group_steps) or 1, math.inf
    for g, round_s in enumerate(rounds, start=1):
        if round_s < best_round * (1 - 1e-9):
            best, best_round = g, round_s
    return best


def group_rounds(group_steps: Sequence[Sequence[float]], links_s: float = 0.0) -> list[float]:
    """Seconds of a round (every session one token) in g = 1 .. stages groups (decode_groups);
    inf where no stage's step is predicted."""
    rounds = []
    for g in range(1, len(group_steps) + 1):
        steps = [s[g - 1] for s in group_steps]
        rounds.append(max(g * max(steps), sum(steps) + links_s) if max(steps) > 0 else math.inf)
    return rounds


def batch_tokens(prompt_tokens: int, concurrency: int) -> int:
    """Tokens one llama_decode of a deployment takes at most: a whole prompt, or one decode
    step of every session, up to BATCH_TOKENS (a longer prompt goes in slices)."""
    return max(1, min(BATCH_TOKENS, max(prompt_tokens, concurrency)))


def session_context(context: int) -> int:
    """Positions one session's cache holds: its context, padded as llama.cpp pads it."""
    return -(-max(1, context) // CTX_PAD) * CTX_PAD


def padded_context(sessions: int, context: int) -> int:
    """Positions all sessions' caches hold (llama.cpp's n_ctx)."""
    return max(1, sessions) * session_context(context)


def kv_bytes_per_token(n_layers: int, n_head_kv: int, head_dim: int) -> int:
    """F16 K and V of one position in n_layers layers (GQA: only the KV heads are stored)."""
    return n_layers * 2 * n_head_kv * head_dim * 2


def compute_bytes(per_token: int, per_token_position: int, sessions: int, context: int,
                  batch_tokens: int = BATCH_TOKENS) -> int:
    """A compute buffer sized for T = min(batch, n_ctx) tokens: per_token bytes each, and
    per_token_position bytes for each of them and each position of one session's cache (the
    masks: each session's tokens see its own cache)."""
    t = min(batch_tokens, padded_context(sessions, context))
    return t * (per_token + per_token_position * session_context(context)) + FIXED_BYTES


def layer_compute_bytes(n_embd: int, n_ff: int, sessions: int, context: int,
                        batch_tokens: int = BATCH_TOKENS) -> int:
    """llama.cpp's compute buffer for a stage without the LM head."""
    return compute_bytes(4 * (4 * n_embd + 3 * n_ff), 2, sessions, context, batch_tokens)


def head_outputs(sessions: int, batch_tokens: int = BATCH_TOKENS) -> int:
    """Rows of logits one llama_decode of a head stage makes at most: one per session."""
    return max(1, min(sessions, batch_tokens))


def logits_bytes(n_vocab: int, rows: int) -> int:
    """Rows of logits, float32: made in a head stage's compute buffer (one per output of a
    decode) or kept in llama.cpp's output buffer (one per session)."""
    return 4 * n_vocab * rows


def head_compute_bytes(n_embd: int, n_vocab: int, sessions: int, context: int,
                       batch_tokens: int = BATCH_TOKENS) -> int:
    """llama.cpp's compute buffer while the LM head runs: a row of logits per output."""
    return compute_bytes(4 * 2 * n_embd, 4, sessions, context, batch_tokens) + \
        logits_bytes(n_vocab, head_outputs(sessions, batch_tokens))


@dataclass(frozen=True)
class StageMemory:
    """Bytes a stage needs on its node."""

    weights: int     # the shard's tensors (and a first stage's embedding table)
    kv_cache: int    # F16 K and V, sessions x context positions (padded)
    compute: int     # llama.cpp's compute buffer and kept logits

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute


def stage_memory(weights: int, n_layers: int, n_embd: int, n_head: int, n_head_kv: int, n_ff: int,
                 n_vocab: int, sessions: int, context: int, batch_tokens: int = BATCH_TOKENS) -> StageMemory:
    """Memory of a stage of n_layers layers; n_vocab is 1 for a stage without the LM head."""
    kv = kv_bytes_per_token(n_layers, n_head_kv, n_embd // n_head) * padded_context(sessions, context)
    compute = layer_compute_bytes(n_embd, n_ff, sessions, context, batch_tokens)
    if n_vocab > 1:     # the peak at the head, and the logits rows kept (llama.cpp's output buffer)
        compute = max(compute, head_compute_bytes(n_embd, n_vocab, sessions, context, batch_tokens)) \
            + logits_bytes(n_vocab, sessions)
    return StageMemory(weights, kv, compute)
