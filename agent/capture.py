"""Reading one node of every llama.cpp decode: the residual stream after a stage's last layer.

llama.cpp hands intermediate tensors only to a context's `cb_eval` callback, which its
scheduler asks about every node of a graph (~30 per layer) and calls again with the data of
each node it wanted. `OutputReader` is that callback: agent/capture.c, built once with the
system's C compiler and cached under $EDGEFLEET_HOME/native (default ~/.edgefleet), or, where
it cannot be built, the same logic in Python, which costs ~4 % of a decode step
(bench/readout.py) and takes the GIL at every node. Both append the node's rows to one
buffer; a stage reads them after each decode.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shlex
import subprocess
from pathlib import Path

import llama_cpp as L
import numpy as np

from agent.home import home
from agent.quant import libggml

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("capture.c")


@functools.cache
def ggml() -> ctypes.CDLL:
    """libggml-base (agent/quant.py) with what reading a tensor takes: its name, its size and
    its contents, which the bindings lack."""
    lib = libggml()
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    return lib


class Capture(ctypes.Structure):
    """agent/capture.c's `struct capture`."""

    _fields_ = [("get_name", ctypes.c_void_p), ("nbytes", ctypes.c_void_p), ("tensor_get", ctypes.c_void_p),
                ("target", ctypes.c_char_p), ("out", ctypes.c_void_p), ("capacity", ctypes.c_size_t),
                ("filled", ctypes.c_size_t), ("overflow", ctypes.c_int)]


def build(out: Path, cc: str = "") -> str:
    """Compile agent/capture.c into the shared library `out` (written whole, then renamed:
    agents that start together may build it at once); "" on success, else why not."""
    cc = cc or os.environ.get("CC") or "cc"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        r = subprocess.run([*shlex.split(cc), "-O2", "-shared", "-fPIC", "-o", str(tmp), str(SOURCE)],
                           capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{cc} did not run: {exc}"
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        return f"{cc} failed: {(r.stderr or r.stdout).strip()[-300:]}"
    os.replace(tmp, out)
    return ""


@functools.cache
def library() -> ctypes.CDLL | None:
    """agent/capture.c as a loaded library, built on first use and kept by its source's
    hash; None, with a warning, where it cannot be built."""
    so = home() / "native" / f"capture-{hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]}.so"
    problem = "" if so.exists() else build(so)
    if not problem:
        try:
            return ctypes.CDLL(str(so))
        except OSError as exc:
            problem = f"{so} does not load: {exc}"
    log.warning("stages read their output through a Python callback, ~4 %% slower per decode step, because "
                "agent/capture.c could not be built (%s); install a C compiler (cc, or set CC) and restart", problem)
    return None


class OutputReader:
    """The `cb_eval` callback (and its user data) that copies every row of the node named
    `target` into a buffer of `rows` x `n_embd` float32; `native` unless `python` is asked
    for or agent/capture.c cannot be built. Not thread-safe: one context, one thread."""

    def __init__(self, target: bytes, rows: int, n_embd: int, python: bool = False):
        self.n_embd = n_embd
        self.buffer = np.empty((rows, n_embd), dtype=np.float32)
        g = ggml()
        fn = lambda f: ctypes.cast(f, ctypes.c_void_p)   # noqa: E731
        self.state = Capture(fn(g.ggml_get_name), fn(g.ggml_nbytes), fn(g.ggml_backend_tensor_get), target,
                             self.buffer.ctypes.data, self.buffer.nbytes, 0, 0)
        lib = None if python else library()
        self.native = lib is not None
        self.callback = (ctypes.cast(lib.edgefleet_capture, L.ggml_backend_sched_eval_callback) if lib is not None
                         else L.ggml_backend_sched_eval_callback(self._ask))
        self.user_data = ctypes.addressof(self.state)

    def reset(self) -> None:
        """Before a decode: what it captures starts at the buffer's first row."""
        self.state.filled = 0
        self.state.overflow = 0

    def rows(self, n: int) -> np.ndarray:
        """A copy of the n rows the last decode captured; RuntimeError if it captured others."""
        got = self.state.filled // (4 * self.n_embd)
        if self.state.overflow or got != n:
            raise RuntimeError(f"the stage read {got} rows of its output for {n} tokens"
                               + (" (more than its buffer holds)" if self.state.overflow else ""))
        return self.buffer[:n].copy()

    def _ask(self, tensor, ask: bool, _user) -> bool:
        """agent/capture.c's edgefleet_capture, in Python."""
        g, c = ggml(), self.state
        if g.ggml_get_name(tensor) != c.target:
            return not ask
        if ask:
            return True
        n = g.ggml_nbytes(tensor)
        if c.filled + n > c.capacity:
            c.overflow = 1
            return True
        g.ggml_backend_tensor_get(tensor, c.out + c.filled, 0, n)
        c.filled += n
        return True
