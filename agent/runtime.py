"""A pipeline stage on llama.cpp's own engine, through its public C API (llama-cpp-python's
low-level bindings).

A stage is a shard (controller/shards.py): a llama.cpp model of the stage's layers. Sessions
are llama.cpp sequence ids in one context, each with a KV cache of its own (one stream per
sequence), so a session's attention reads its own cells only, however many sessions the
stage holds; the one-token steps of several sessions go into one `llama_decode`. A stage
that is not first takes hidden states through `llama_batch.embd`; a first stage that is not
last looks its tokens up in the shard's embedding table with ggml's own `to_float` and feeds
them the same way. A stage that is not last reads the residual stream after its last layer
(the tensor llama.cpp names `l_out-{k-1}`) in the `cb_eval` callback (agent/capture.py),
with every token of the batch marked as an output (llama.cpp keeps only output rows in the
last layer). A split is therefore exactly llama.cpp running the whole model.

Shapes: N = rows of one decode (tokens of all steps), d = n_embd, V = the stage's vocabulary.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import llama_cpp as L
import numpy as np

from agent import weights as W
from agent.capture import OutputReader
from agent.quant import dequantize

log = logging.getLogger(__name__)
llama_log = logging.getLogger("llama.cpp")


# ------------------------------------------------------------------ the C pieces the bindings lack

# ggml log levels: 1 debug, 2 info, 3 warn, 4 error, 5 continue (llama.cpp warns about much that is benign)
_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.INFO, 4: logging.ERROR}
_last_level = [logging.DEBUG]


@L.llama_log_callback
def _route_log(level: int, text: bytes, _user) -> None:
    # llama.cpp's own log goes to our logger (never straight to stdout/stderr); level 5 continues a line
    lvl = _last_level[0] if level == 5 else _LEVELS.get(level, logging.DEBUG)
    _last_level[0] = lvl
    msg = text.decode("utf-8", errors="replace").rstrip("\n")
    if msg:
        llama_log.log(lvl, "%s", msg)


M_MMAP_THRESHOLD = -3          # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD = 128 * 1024    # glibc's default, kept fixed


@functools.cache
def _glibc():
    """glibc's allocator calls, or None where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def map_large_blocks() -> None:
    """Give every block of MMAP_THRESHOLD bytes or more its own mapping, returned to the system
    when it is freed, for the rest of the process. glibc raises this threshold after the first
    large block is freed (up to 32 MiB) and serves later ones from its heaps, which keep
    freed memory. On the emulated 4 nodes, through three deploys with 8 requests each, the
    busiest agent peaked at 273, 327 and 286 MB with the threshold left to rise and 248, 208
    and 194 MB with it fixed (docs/fleet.md, Memory)."""
    if libc := _glibc():
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def release_freed_memory() -> None:
    """Hand memory freed by closed stages back to the system (glibc keeps it otherwise, and a
    device's memory limit counts it): what a node offers stays what it has."""
    if libc := _glibc():
        libc.malloc_trim(0)


MADV_COLLAPSE = 25      # linux/mman.h, Linux 6.1 and later
HUGE_PAGE_SIZE = Path("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
PRESENT, EXCLUSIVE = 1 << 63, 1 << 56     # /proc/PID/pagemap: the page is in memory; mapped here only
                                          # (not the shared zero page, KSM or a fork's shared page)
PAGEMAP_CHUNK = 1 << 17                   # pagemap entries read at once (512 MiB of addresses)


def anonymous_ranges(maps: str, huge: int) -> list[tuple[int, int]]:
    """[start, end) of the private, writable, anonymous mappings (the heap's too) of a
    /proc/PID/maps text that hold at least one whole huge page (`huge` bytes), trimmed to
    whole huge pages."""
    out = []
    for line in maps.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 5 or parts[1][:2] != "rw" or parts[1][3] != "p" or parts[4] != "0":
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        lo, hi = -(-lo // huge) * huge, hi // huge * huge
        if hi > lo:
            out.append((lo, hi))
    return out


def filled_blocks(lo: int, entries: np.ndarray, huge: int, page: int = mmap.PAGESIZE) -> list[int]:
    """Start addresses of the huge-page blocks, from the aligned address lo, whose every page
    is in memory and this mapping's own (entries: /proc/PID/pagemap's, one per page, for
    whole blocks of `huge` bytes)."""
    owned = (entries & np.uint64(PRESENT | EXCLUSIVE)) == np.uint64(PRESENT | EXCLUSIVE)
    full = owned.reshape(-1, huge // page).all(axis=1)
    return [lo + int(i) * huge for i in np.flatnonzero(full)]


def use_huge_pages() -> int:
    """Back this process's filled anonymous memory with transparent huge pages: each huge-page
    block (2 MiB on x86-64) of a private anonymous mapping whose pages are all in memory and
    its own is collapsed into one huge page (MADV_COLLAPSE), one block at a time, its pages
    read again just before. A block with a page missing or shared (a thread's stack, an
    arena's reserve, the zero page) stays as it is, and nothing is asked of later pages, so
    the process holds no more memory than before. Returns the bytes in blocks collapsed now
    or before; 0 where the system has no huge pages (nothing changes then).

    A stage's weights, KV cache and compute buffers are such blocks: llama.cpp fills them
    when it makes them. A decode step streams all its weights, with 4 KiB pages a TLB miss
    every 4 KiB (23,000 for 13 layers of SmolLM2 F16); in huge pages the step took 5-21 %
    less CPU (docs/runtime.md, Huge pages)."""
    libc, page = _glibc(), mmap.PAGESIZE
    if libc is None or not hasattr(libc, "madvise"):
        return 0
    try:
        huge = int(HUGE_PAGE_SIZE.read_text())
        if huge % page:
            return 0
        ranges = anonymous_ranges(Path("/proc/self/maps").read_text(), huge)
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    except (OSError, ValueError):
        return 0
    per_block = huge // page

    def entries(a: int, pages: int) -> np.ndarray:
        data = os.pread(fd, pages * 8, a // page * 8)
        return np.frombuffer(data, dtype="<u8") if len(data) == pages * 8 else np.zeros(pages, "<u8")

    done = 0
    try:
        for lo, hi in ranges:
            for a in range(lo, hi, PAGEMAP_CHUNK * page):
                n = min(PAGEMAP_CHUNK, (hi - a) // page)
                for b in filled_blocks(a, entries(a, n), huge, page):
                    # read again: another thread may have unmapped it and mapped something else since
                    if filled_blocks(b, entries(b, per_block), huge, page) and \
                            libc.madvise(ctypes.c_void_p(b), ctypes.c_size_t(huge), MADV_COLLAPSE) == 0:
                        done += huge
    finally:
        os.close(fd)
    return done


@functools.cache
def init_llama() -> None:
    """Route llama.cpp's log to the logger and initialise its backend (once per process)."""
    L.llama_log_set(_route_log, ctypes.c_void_p(0))
    L.llama_backend_init()


def model_params():
    """llama.cpp's model parameters for a stage: on the CPU, every weight in the CPU backend's
    plain buffers, none in its extra buffer types (`use_extra_bufts`), which hand a weight to
    other kernels where the CPU has them: AMX, or repacked layouts.

    Why: on an AMX machine (a Xeon with amx_int8, this project's dev machine since session 30)
    llama.cpp's AMX kernels crashed the process on Q8_0 and Q4_1 weights (a segmentation
    fault in the first decode; its llama-bench on Q8_0: an illegal instruction), and
    decoded F16 at 33 tok/s against 41 in plain buffers (SmolLM2, one thread). Plain buffers
    are also what llama.cpp's RPC servers hold their weights in, so a stage runs the kernels
    they run (bench/versus.py)."""
    mp = L.llama_model_default_params()
    mp.n_gpu_layers = 0
    mp.use_extra_bufts = False
    return mp


_llama_lock = threading.Lock()


def whole_model(path: str | Path, **kwargs):
    """llama-cpp-python's `Llama` on a whole GGUF, its weights in plain buffers as a stage's
    (`model_params`): the reference that tests and benches compare stages with. `Llama` takes
    llama.cpp's default model parameters and has no argument for the buffers, so its default
    is replaced while it loads."""
    import llama_cpp
    import llama_cpp.llama_cpp as low

    init_llama()
    with _llama_lock:
        default = low.llama_model_default_params
        low.llama_model_default_params = model_params   # which calls the package's own default, not this name
        try:
            return llama_cpp.Llama(str(path), **kwargs)
        finally:
            low.llama_model_default_params = default


# ------------------------------------------------------------------ settings and steps

@dataclass(frozen=True)
class Settings:
    """How a stage's llama.cpp context is made."""

    sessions: int = 1          # sequences that may hold KV cache at once (n_seq_max)
    context: int = 512         # positions per session (the KV cache holds sessions x context)
    batch_tokens: int = 512    # most tokens in one llama_decode (n_batch = n_ubatch)
    threads: int = 2           # compute threads (their spin policy: OMP_WAIT_POLICY, see agent/daemon.py)
    flash_attn: bool = True    # llama.cpp's flash attention: faster prefill and smaller compute buffers here (docs/runtime.md)
    python_reader: bool = False    # read a middle stage's output in Python even where agent/capture.c builds
    outputs: int = 0           # a stage with the head: most rows of logits one llama_decode makes (0: batch_tokens; at least `sessions`)


@dataclass(frozen=True)
class Step:
    """One session's new tokens for one stage."""

    seq: int                           # llama.cpp sequence id of the session
    position: int                      # absolute position of the first new token
    tokens: np.ndarray | None = None   # [T] int (first stage)
    hidden: np.ndarray | None = None   # [T, d] float32 (later stages)
    all_logits: bool = False           # last stage: logits of every token, not only the last

    @property
    def n_tokens(self) -> int:
        return len(self.tokens) if self.tokens is not None else int(self.hidden.shape[0])


class LlamaError(RuntimeError):
    """llama.cpp refused a decode (no KV slot, bad input); the message says which."""


# ------------------------------------------------------------------ the stage

class Stage:
    """Layers [first, last) of a model, loaded from a shard (or a whole model) with llama.cpp.

    Not thread-safe: one thread (the agent's compute thread) calls forward/forget."""

    def __init__(self, path: str | Path, settings: Settings = Settings()):
        init_llama()
        self.path = Path(path)
        self.settings = settings
        reader = W.open_gguf(path, layout_only=True)
        self.cfg = W.read_config(reader)
        self.first, self.last = W.stage_range(reader, self.cfg)
        self.layer_types = W.layer_types(reader)
        self.has_embedding = self.first == 0
        self.has_head = self.last == self.cfg.n_layer
        embedding = W.input_embedding(path, reader, self.cfg) if self.has_embedding and not self.has_head else None
        self._embedding = embedding            # (raw rows [V_in, row bytes], type) for a first stage
        self.input_vocab = embedding[0].shape[0] if embedding else (self.cfg.n_vocab if self.has_embedding else 0)
        self._feeds_tokens = self.has_embedding and self.has_head    # a whole model reads token ids itself
        del reader

        mp = model_params()
        # llama.cpp reads the shard into memory with direct I/O (no page cache) rather than
        # mapping it: a map's pages are page cache, which a device's memory limit reclaims
        # under pressure, and where llama.cpp repacked weights the map held them twice
        # (docs/fleet.md, Memory). A last stage of an untied model keeps the map, so that its
        # token_embd (required, never read) stays on disk.
        cold_embedding = self.has_head and not self.has_embedding and not self.cfg.tied_embeddings
        mp.load_mode = L.LLAMA_LOAD_MODE_MMAP if cold_embedding else L.LLAMA_LOAD_MODE_DIRECT_IO
        self._model = L.llama_model_load_from_file(str(path).encode(), mp)
        if not self._model:
            raise ValueError(f"llama.cpp cannot load {self.path.name}; rebuild the shard from its master")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self._model))
        self.n_embd = self.cfg.n_embd

        cp = L.llama_context_default_params()
        cp.n_ctx = settings.sessions * settings.context
        cp.n_batch = cp.n_ubatch = settings.batch_tokens
        cp.n_seq_max = settings.sessions
        cp.n_threads = cp.n_threads_batch = settings.threads
        cp.kv_unified = False         # a KV cache per session (see forward for the order of rows)
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED if settings.flash_attn else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.no_perf = True
        # llama.cpp sizes a head stage's compute buffer for this many rows of logits (n_vocab
        # floats each; by default for every row of a batch), keeps one per session, and refuses
        # (aborts) a context or batch beyond it; a stage without the head outputs every row
        cap = settings.batch_tokens
        self._outputs = max(settings.sessions, min(settings.outputs or cap, cap) if self.has_head else cap)
        cp.n_outputs_max = self._outputs
        self._reader = None
        if not self.has_head:       # the residual stream after the last layer, every row of every decode
            self._reader = OutputReader(f"l_out-{self.last - self.first - 1}".encode(), settings.batch_tokens,
                                        self.n_embd, python=settings.python_reader)
            cp.cb_eval = self._reader.callback
            cp.cb_eval_user_data = self._reader.user_data
        self._ctx = L.llama_init_from_model(self._model, cp)
        if not self._ctx:
            L.llama_model_free(self._model)
            raise ValueError(f"llama.cpp cannot make a context of {cp.n_ctx} positions for {self.path.name}")
        self._mem = L.llama_get_memory(self._ctx)
        cap = settings.batch_tokens
        self._batch = L.llama_batch_init(cap, 0 if self._feeds_tokens else self.n_embd, 1)
        b = self._batch
        self._b_tok = np.ctypeslib.as_array(b.token, (cap,)) if self._feeds_tokens else None
        self._b_embd = None if self._feeds_tokens else np.ctypeslib.as_array(b.embd, (cap, self.n_embd))
        self._b_pos = np.ctypeslib.as_array(b.pos, (cap,))
        self._b_nseq = np.ctypeslib.as_array(b.n_seq_id, (cap,))
        self._b_out = np.ctypeslib.as_array(b.logits, (cap,))
        self._b_seq = [b.seq_id[i] for i in range(cap)]
        self._seq_set = [-1] * cap                     # what each batch row's seq_id[0] holds now
        self._held: dict[int, int] = {}                # seq -> positions it holds
        self._logits_row = ctypes.c_float * self.n_vocab
        huge = use_huge_pages()     # the weights, KV cache and compute buffers llama.cpp just filled
        log.info("loaded layers [%d, %d) of %s: %d sessions x %d positions, batch %d, %d threads; "
                 "the process has %d MiB in huge pages", self.first, self.last, self.path.name,
                 settings.sessions, settings.context, settings.batch_tokens, settings.threads, huge >> 20)

    @property
    def takes_tokens(self) -> bool:
        """A first stage takes token ids; the others take hidden states."""
        return self.has_embedding

    # ---------------------------------------------------------- sessions

    def held(self, seq: int) -> int:
        """Positions this stage holds for a session."""
        return self._held.get(seq, 0)

    def forget(self, seq: int, position: int = 0) -> None:
        """Drop a session's KV cells from `position` on (0: the whole session)."""
        if self._ctx and self._held.get(seq, 0) > position:
            L.llama_memory_seq_rm(self._mem, seq, position, -1)
        self._held[seq] = min(self._held.get(seq, 0), position)

    # ---------------------------------------------------------- compute

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        """Rows of the input embedding table for token ids [T] -> [T, d] float32."""
        table, qtype = self._embedding
        rows = table[np.asarray(tokens, dtype=np.int64)]
        return dequantize(rows, qtype, rows.shape[0] * self.n_embd).reshape(-1, self.n_embd)

    def forward(self, steps: list[Step], keep: bool = True) -> list[np.ndarray]:
        """Run the steps (of distinct sessions) through this stage. Returns per step the hidden
        states [T, d] (a stage that is not last) or logits: [T, V] if step.all_logits else
        [1, V] (the last stage). Each step first forgets the session's cells from its position
        (a replay).

        keep=False: the last decode's logits may be read-only views of llama.cpp's own buffer,
        valid until this stage's next forward, instead of copies (a row of SmolLM2's is 192 KiB,
        whose copy cost a quarter of the last stage's step overhead; docs/runtime.md)."""
        if len({s.seq for s in steps}) != len(steps):
            raise ValueError("a forward pass takes one step per session")
        for s in steps:
            self.forget(s.seq, s.position)
            self._held[s.seq] = s.position + s.n_tokens
        outs: list[np.ndarray | None] = [None] * len(steps)
        groups = self._groups(steps)
        for g_i, group in enumerate(groups):
            rows_seq, rows_pos, wanted, inputs = [], [], [], []
            for i in group:
                s = steps[i]
                n = s.n_tokens
                rows_seq += [s.seq] * n
                rows_pos += range(s.position, s.position + n)
                every = not self.has_head or s.all_logits
                wanted += [1] * n if every else [0] * (n - 1) + [1]
                inputs.append(s.tokens if s.tokens is not None
                              else np.asarray(s.hidden, np.float32).reshape(-1, self.n_embd))
            inputs = np.concatenate(inputs) if len(inputs) > 1 else np.asarray(inputs[0])
            if self.has_embedding and not self._feeds_tokens:
                inputs = self.embed(inputs)
            out_rows: list[np.ndarray] = []
            slices = self._slices(wanted)
            for s_i, (a, b) in enumerate(slices):
                view = not keep and g_i == len(groups) - 1 and s_i == len(slices) - 1   # the last decode
                out_rows.extend(self._decode(inputs[a:b], rows_pos[a:b], rows_seq[a:b], wanted[a:b], view))
            # split the output rows back into steps: a head's come one row each, a reader's in blocks
            flat = None if self.has_head else out_rows[0] if len(out_rows) == 1 else np.concatenate(out_rows)
            k = 0
            for i in group:
                n = steps[i].n_tokens if (not self.has_head or steps[i].all_logits) else 1
                if flat is not None:
                    outs[i] = flat[k:k + n]
                else:
                    outs[i] = out_rows[k] if n == 1 else np.concatenate(out_rows[k:k + n])
                k += n
        return outs

    def _groups(self, steps: list[Step]) -> list[list[int]]:
        """The steps' indices in the llama_decode calls that run them. With a KV cache per
        session, llama.cpp cuts a batch into micro-batches of consecutive sequence ids, each
        taking as many tokens from every one of its sequences, and the rows that `cb_eval` sees
        come in micro-batch order. A decode of steps of one length, by sequence id, and within
        the batch size, gives its rows in exactly that order; a longer step goes alone (in
        slices of the batch)."""
        cap = self.settings.batch_tokens
        order = sorted(range(len(steps)), key=lambda i: (steps[i].n_tokens, steps[i].seq))
        groups: list[list[int]] = []
        for i in order:
            n = steps[i].n_tokens
            g = groups[-1] if groups else None
            if g is not None and steps[g[0]].n_tokens == n and (len(g) + 1) * n <= cap:
                g.append(i)
            else:
                groups.append([i])
        return groups

    def _slices(self, wanted: list[int]) -> list[tuple[int, int]]:
        """Row ranges [a, b) of the llama_decode calls for one group's rows (wanted: 1 where a
        row is an output): at most batch_tokens rows each, and at most the outputs llama.cpp
        was sized for (it aborts the process on a batch with more). Where rows alone cut the
        group (a prompt longer than the batch), the slices are as even as they can be:
        llama.cpp's attention takes a slice of fewer than 64 rows (GGML_FA_TILE_Q) through its
        one-row kernel, position by position. A 328-token prompt in slices of 139, 139 and 50
        took 1.6 s to its first token on the emulated 4 nodes, against 1.0 s for 272 tokens in
        139 and 133 (solver/cost.py:FA_TILE_ROWS)."""
        cap = self.settings.batch_tokens
        if not wanted:
            return []
        ranges, a, n, by_outputs = [], 0, 0, False
        for i, w in enumerate(wanted):
            if i - a == cap or n + w > self._outputs:
                by_outputs |= i - a < cap
                ranges.append((a, i))
                a, n = i, 0
            n += w
        ranges.append((a, len(wanted)))
        if len(ranges) < 2 or by_outputs:
            return ranges
        size, extra = divmod(len(wanted), len(ranges))
        bounds = [0]
        for k in range(len(ranges)):
            bounds.append(bounds[-1] + size + (k < extra))
        even = list(zip(bounds, bounds[1:]))
        return even if all(sum(wanted[a:b]) <= self._outputs for a, b in even) else ranges

    def _decode(self, inputs: np.ndarray, pos: list[int], seq: list[int], wanted: list[int],
                view: bool = False) -> list[np.ndarray]:
        n = len(pos)
        if self._feeds_tokens:
            self._b_tok[:n] = inputs
        else:
            self._b_embd[:n] = inputs
        self._b_pos[:n] = pos
        self._b_nseq[:n] = 1
        self._b_out[:n] = wanted
        for i in range(n):
            if self._seq_set[i] != seq[i]:      # ctypes writes only where the sequence changed
                self._b_seq[i][0] = self._seq_set[i] = seq[i]
        self._batch.n_tokens = n
        self._run(seq)
        if self._reader is not None:
            return [self._reader.rows(n)]
        out = []
        for i, w in enumerate(wanted):
            if w:
                ptr = L.llama_get_logits_ith(self._ctx, i)
                row = np.frombuffer(self._logits_row.from_address(ctypes.cast(ptr, ctypes.c_void_p).value),
                                    dtype=np.float32).reshape(1, -1)
                if view:
                    row.flags.writeable = False
                out.append(row if view else row.copy())
        return out

    def _run(self, seq: list[int]) -> None:
        """llama_decode of the batch as filled in; LlamaError (and nothing held) if it fails."""
        if self._reader is not None:
            self._reader.reset()
        rc = L.llama_decode(self._ctx, self._batch)
        if rc != 0:
            for s in set(seq):        # what this decode may have left half-written is not held
                self._held[s] = 0
                L.llama_memory_seq_rm(self._mem, s, -1, -1)
            raise LlamaError(f"llama_decode failed with status {rc}"
                             + (" (no free KV-cache cells)" if rc == 1 else ""))

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            L.llama_batch_free(self._batch)
            L.llama_free(self._ctx)
            self._ctx = None
            L.llama_model_free(self._model)

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass
