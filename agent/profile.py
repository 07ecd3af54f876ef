"""Measure how fast this machine runs a real layer at each GGUF type, on llama.cpp.

The layer is the first of a shard this agent holds: its matrices are dequantized and
re-quantized to each type with llama.cpp's own code (with llama.cpp's fallback where rows do
not split into the type's blocks), written as a stage of copies of that layer (enough that
the weights do not fit in the CPU's caches, as a real stage's do not), and run by the same
engine that serves requests: prefill (many tokens at once) and decode (one token against a cache of
that many positions). The median of the repeats is reported; the solver's measured node
speeds are built from it.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFWriter

from agent import weights as W
from agent.quant import requantize
from agent.runtime import Settings, Stage, Step
from proto.adapter import TypeTiming
from solver.ggml_types import LAYER_TYPES, TYPE_ORDER


PROBE_BYTES = 64 * 2 ** 20     # the probe's weights outgrow the caches (this machine's L3: 32 MiB)
MIN_PROBE_BYTES = 8 * 2 ** 20  # on a node with less free, timings may come out fast (cache-resident)
MAX_COPIES = 32


def write_probe_layer(shard: str | Path, qtype: str, out: Path, probe_bytes: int = PROBE_BYTES) -> int:
    """A middle stage (no vocabulary, no head) of copies of the first layer of `shard` at
    qtype: as many as make probe_bytes of weights (2 to MAX_COPIES), each with its own bytes,
    so that a step streams its weights from memory as a real stage's does instead of finding
    one small layer in the cache. Returns the number of copies."""
    reader = W.open_gguf(shard, layout_only=True)
    cfg = W.read_config(reader)
    first, _ = W.stage_range(reader, cfg)       # a mix chooses its matrices' types by the layer's place
    layer = []
    for t in reader.tensors:
        if t.name.startswith("blk.0."):
            name = t.name[len("blk.0."):]
            layer.append((name, *requantize(t, qtype, first, cfg)) if len(t.shape) == 2 else
                         (name, np.asarray(t.data), t.tensor_type))
    size = sum(int(data.nbytes) for _, data, _ in layer)
    copies = max(2, min(MAX_COPIES, -(-probe_bytes // max(size, 1))))
    writer = GGUFWriter(str(out), cfg.arch)
    W.copy_metadata(reader, writer, drop=lambda k: k.startswith(("tokenizer.", "edgefleet.", f"{cfg.arch}.vocab_size")),
                    values={f"{cfg.arch}.block_count": copies})
    W.add_one_token_vocabulary(writer, cfg.arch, cfg.n_embd)
    writer.add_uint32(W.KEY_MODEL_LAYERS, copies + 2)   # a middle stage: layers 1 .. copies of copies + 2
    writer.add_uint32(W.KEY_FIRST, 1)
    writer.add_uint32(W.KEY_LAST, 1 + copies)
    writer.add_array(W.KEY_TYPES, [qtype] * copies)
    for i in range(copies):
        for name, data, qt in layer:
            writer.add_tensor(f"blk.{i}.{name}", np.array(data, copy=True), raw_dtype=qt)
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    W.write_out(writer)
    return copies


BLOCK_S = 0.04      # a timed block: back-to-back calls for at least this long (see median_time)


def median_time(fn, repeats: int) -> float:
    """Seconds per call of fn: the median over `repeats` blocks, each fn called back to back
    for at least BLOCK_S, of the block's mean. A node held to part of a core by a CPU quota
    runs a short call at full speed until its quota for the period is spent, then stalls:
    the median of single calls of a few ms on a 0.6-CPU node read as fast as a whole core,
    and plans gave it more than it could do. A block spans several quota periods (the
    emulated fleets' 10 ms), so it reads the sustained speed; under the kernel's default
    100 ms period a node reads faster than it is."""
    fn()  # warm-up
    blocks = []
    for _ in range(repeats):
        calls, t0 = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= BLOCK_S:
                break
        blocks.append(elapsed / calls)
    return statistics.median(blocks)


DEPTH = 448          # the second depth the probe times at: attention's cost per cached position
DECODE_REPEATS = 5   # blocks of decode steps (each block many steps): a steadier slope at little cost


@dataclass(frozen=True)
class ProbeMedians:
    """One type's probe medians, on a stage of `copies` layers: a prefill of n tokens from
    position 0 and from DEPTH, a decode step at position n - 1 and at DEPTH - 1, and a step
    of two tokens from position 0 (0: not timed)."""
    gguf_type: str
    copies: int
    prefill_lo: float
    prefill_hi: float
    decode_lo: float
    decode_hi: float
    pair: float = 0.0


def time_types(shard: str | Path, types: list[str] | None = None, prefill_tokens: int = 64,
               repeats: int = 5, threads: int = 1, probe_bytes: int = PROBE_BYTES) -> list[TypeTiming]:
    """Per-layer decode and prefill times of each type, with attention's cost per cached
    position apart: llama.cpp's attention on a CPU does far fewer FLOP/s than its matrix
    products (here a decode step at 512 positions takes 1.4 times one at none), so the cost
    model prices it on its own (solver/cost.py). Each type is timed at two depths: a prefill
    of `prefill_tokens` (at most DEPTH / 2) from position 0 and again from DEPTH, a decode
    step at position prefill_tokens - 1 and again at DEPTH - 1 (split_attention), and a step
    of two tokens: llama.cpp's step of several tokens costs far more than one token's (see
    split_attention), so a step of b ≥ 2 tokens is priced as a fixed part plus b per-token
    parts, fitted through the two-token step and the prefill. The probe
    holds about 2 × probe_bytes while it is written and loaded: an agent gives no more than
    its memory has free."""
    types = list(types or LAYER_TYPES)
    bad = [t for t in types if t not in TYPE_ORDER]
    if bad:
        raise ValueError(f"cannot profile GGUF type {bad[0]}; choose from {', '.join(TYPE_ORDER)}")
    n = max(1, min(prefill_tokens, DEPTH // 2))
    cfg = W.read_config(W.open_gguf(shard, layout_only=True))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, cfg.n_embd)).astype(np.float32)
    fill = rng.standard_normal((DEPTH - n, cfg.n_embd)).astype(np.float32)
    decode_repeats = max(repeats, DECODE_REPEATS)
    medians = []
    with tempfile.TemporaryDirectory(prefix="edgefleet-profile-") as d:
        for q in types:
            path = Path(d) / f"{q}.gguf"
            copies = write_probe_layer(shard, q, path, probe_bytes)
            stage = Stage(path, Settings(sessions=1, context=DEPTH + n, batch_tokens=max(n, DEPTH - n),
                                         threads=threads))
            try:
                pair = median_time(lambda: stage.forward([Step(0, 0, hidden=x[:2])]), decode_repeats) if n > 2 else 0.0
                prefill_lo = median_time(lambda: stage.forward([Step(0, 0, hidden=x)]), repeats)
                decode_lo = median_time(lambda: stage.forward([Step(0, n - 1, hidden=x[-1:])]), decode_repeats)
                stage.forward([Step(0, n, hidden=fill)])                  # the cache now holds DEPTH positions
                decode_hi = median_time(lambda: stage.forward([Step(0, DEPTH - 1, hidden=fill[-1:])]),
                                         decode_repeats)
                prefill_hi = median_time(lambda: stage.forward([Step(0, DEPTH, hidden=x)]), repeats)
            finally:
                stage.close()
                path.unlink()
            medians.append(ProbeMedians(q, copies, prefill_lo, prefill_hi, decode_lo, decode_hi, pair))
    return split_attention(n, DEPTH, medians)


def split_attention(n: int, depth: int, medians: list[ProbeMedians]) -> list[TypeTiming]:
    """Per-layer times of each type from the probe's medians. Attention's part grows with the
    positions a token attends; what does not is the depth-0 time. Attention does not depend
    on the weights' type (the cache is f16 at every type), and one type's difference of a few
    percent is noisy, so its seconds per position are the median over the types timed. A
    slope lost in noise (not positive) leaves attention unmeasured (0): the cost model then
    prices it at the prefill's FLOP rate, as for declared speeds.

    A step of b ≥ 2 tokens costs c0 + b·c1 (the line through the two-token step and the
    n-token prefill, both at depth 0 less their attention): llama.cpp's one-token step is a
    matrix-vector product, a step of more tokens takes another, slower path. Measured on
    SmolLM2 at Q8_0 on one thread, per layer: 1 token 0.48 ms, 2 tokens 1.17 ms, 8 tokens
    1.90, 64 tokens 6.40; the line gives 1.68 at 8, and a roofline from the one-token step
    and the prefill's rate 0.80. The prefill figure reported is c1 (each further token)
    and the fixed part c0 is reported apart; a fit that comes out without a fixed part (a
    two-token step at or under two prefill tokens) reports 0 and the prefill's mean."""
    dec_attn = statistics.median(max(0.0, (m.decode_hi - m.decode_lo) / (depth - n) / m.copies) for m in medians)
    pre_attn = statistics.median(max(0.0, (m.prefill_hi - m.prefill_lo) / (n * depth) / m.copies) for m in medians)
    out = []
    for m in medians:
        decode = m.decode_lo / m.copies
        prefill = m.prefill_lo / m.copies / n
        # what is left at depth 0: a token of the prefill attends (n - 1) / 2 positions on
        # average, the decode step n - 1; never less than half the time measured
        prefill = max(prefill / 2, prefill - (n - 1) / 2 * pre_attn)
        fixed, per_token = fit_step(n, prefill, m.pair / m.copies - pre_attn if m.pair else 0.0)
        out.append(TypeTiming(m.gguf_type, max(decode / 2, decode - (n - 1) * dec_attn),
                              per_token, dec_attn, pre_attn, fixed))
    return out


def fit_step(n: int, prefill_per_token: float, pair: float) -> tuple[float, float]:
    """(fixed part, per-token part) of a step of several tokens through one layer, from the
    n-token prefill's time per token and the two-token step's time (0: not timed). Without
    a positive fixed part, or where the line would fall (a two-token step slower than the
    whole prefill), it is (0, the prefill's mean): the roofline prices the step."""
    if pair <= 0 or n <= 2:
        return 0.0, prefill_per_token
    per_token = (n * prefill_per_token - pair) / (n - 2)
    fixed = pair - 2 * per_token
    if per_token <= 0 or fixed <= 0:
        return 0.0, prefill_per_token
    return fixed, per_token
