"""The agent's shard store: GGUF shards on disk, named by their SHA-256.

A push is written to `incoming/<sha>.partial`, hashed as it arrives, and renamed into
`shards/<sha>.gguf` only when the byte count and the hash both match. A rename is atomic,
so a file under `shards/` is always complete and verified; anything left in `incoming/`
by a crash is deleted when the store opens. Shards stay across restarts, and a shard
already present is never received again.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_SHA = re.compile(r"^[0-9a-f]{64}$")


class PushError(ValueError):
    """A push that cannot be accepted; `code` is the gRPC status name to answer with."""

    def __init__(self, message: str, code: str = "DATA_LOSS"):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Chunk:
    sha256: str        # first chunk: hex SHA-256 of the whole file
    total_bytes: int   # first chunk: size of the whole file
    data: bytes


@dataclass(frozen=True)
class Received:
    sha256: str
    bytes_received: int   # bytes that crossed the wire for this push (0 when already held)
    path: Path


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def drop_cached(path: str | Path) -> None:
    """Drop a file's pages from the page cache, except those a process maps (a loaded stage's
    weights stay). A device's memory limit (a cgroup) counts the page cache that pushed,
    hashed and retired shards fill; left there, it pushes a running stage's weights out."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except (OSError, AttributeError):      # not Linux: nothing to do
        pass
    finally:
        os.close(fd)


def check_sha(sha: str) -> str:
    sha = sha.strip().lower()
    if not _SHA.match(sha):
        raise PushError(f"{sha!r} is not a hex SHA-256; send the shard file's SHA-256 in the first chunk",
                        "INVALID_ARGUMENT")
    return sha


class ShardStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.shards_dir = self.root / "shards"
        self.incoming_dir = self.root / "incoming"
        self.shards_dir.mkdir(parents=True, exist_ok=True)
        self.incoming_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._receiving: set[str] = set()
        self._verified: dict[str, tuple[int, int]] = {}   # sha -> (size, mtime_ns) when it last hashed right
        self.bytes_received = 0          # all pushes since the store opened
        for leftover in self.incoming_dir.iterdir():
            log.warning("removing incomplete shard %s left by an interrupted push", leftover.name)
            leftover.unlink()

    def path(self, sha: str) -> Path:
        return self.shards_dir / f"{check_sha(sha)}.gguf"

    def has(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def list(self) -> list[str]:
        return sorted(p.stem for p in self.shards_dir.glob("*.gguf") if _SHA.match(p.stem))

    def intact(self, sha: str) -> bool:
        """Whether the stored shard still hashes to its name; a shard that does not (a disk
        error, an edit) is deleted, so that it is pushed again rather than loaded. A shard is
        hashed again only when its size or modification time changed since it last hashed
        right (a multi-GB shard takes seconds to hash), and always once per agent start."""
        p = self.path(sha)
        st = p.stat()
        seen = (st.st_size, st.st_mtime_ns)
        if self._verified.get(sha) == seen:
            return True
        ok = file_sha256(p) == sha
        drop_cached(p)
        if ok:
            self._verified[sha] = seen
            return True
        log.error("stored shard %s no longer matches its SHA-256; deleted", sha[:12])
        self.remove(sha)
        return False

    def remove(self, sha: str) -> bool:
        p = self.path(sha)
        self._verified.pop(sha, None)
        if p.is_file():
            p.unlink()
            return True
        return False

    def receive(self, chunks: Iterable[Chunk], max_bytes: int | None = None) -> Received:
        """Consume a push. The first chunk names the file; an already held shard stops the
        push after that chunk (the sender sees bytes_received=0 and sends nothing more)."""
        it = iter(chunks)
        first = next(it, None)
        if first is None:
            raise PushError("empty push: the first chunk must carry the shard's sha256 and total_bytes",
                            "INVALID_ARGUMENT")
        sha = check_sha(first.sha256)
        total = int(first.total_bytes)
        if self.has(sha):
            return Received(sha, 0, self.path(sha))
        if max_bytes is not None and total > max_bytes:
            raise PushError(f"shard {sha[:12]} is {total:,} bytes but the agent's data dir may hold "
                            f"{max_bytes:,}; free space or give the agent more", "RESOURCE_EXHAUSTED")
        with self._lock:
            if sha in self._receiving:
                raise PushError(f"shard {sha[:12]} is already being pushed by another caller; retry after it "
                                "finishes", "ABORTED")
            self._receiving.add(sha)
        tmp = self.incoming_dir / f"{sha}.partial"
        h = hashlib.sha256()
        got = 0
        try:
            with open(tmp, "wb") as f:
                for chunk in _with_first(first, it):
                    got += len(chunk.data)
                    if got > total:
                        raise PushError(f"shard {sha[:12]} sent more than the announced {total:,} bytes; "
                                        "push it again")
                    h.update(chunk.data)
                    f.write(chunk.data)
                    with self._lock:
                        self.bytes_received += len(chunk.data)
                f.flush()
                os.fsync(f.fileno())
            drop_cached(tmp)     # written and synced: the stage maps what it needs when it loads
            if got != total:
                raise PushError(f"shard {sha[:12]} is truncated: {got:,} of {total:,} bytes arrived; push it again")
            if h.hexdigest() != sha:
                raise PushError(f"shard {sha[:12]} is corrupt: its bytes hash to {h.hexdigest()[:12]}; "
                                "push it again")
            os.replace(tmp, self.path(sha))
            _fsync_dir(self.shards_dir)
        finally:
            tmp.unlink(missing_ok=True)
            with self._lock:
                self._receiving.discard(sha)
        log.info("stored shard %s (%d bytes)", sha[:12], got)
        return Received(sha, got, self.path(sha))


def _with_first(first: Chunk, rest):
    yield first
    yield from rest


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
