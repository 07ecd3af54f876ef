"""HiGHS prints a banner on stdout whenever a solver object is made, before any option can
turn its output off. `no_stdout()` points file descriptor 1 at /dev/null meanwhile, so that
a command's stdout (e.g. `edgefleet plan --json`) carries only what the command prints.
Overlapping uses from several threads share one redirection."""
from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager

_lock = threading.Lock()
_depth = 0
_saved_fd: int | None = None


@contextmanager
def no_stdout():
    global _depth, _saved_fd
    with _lock:
        if _depth == 0:
            sys.stdout.flush()
            _saved_fd = os.dup(1)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.close(devnull)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _saved_fd is not None:
                os.dup2(_saved_fd, 1)
                os.close(_saved_fd)
                _saved_fd = None
