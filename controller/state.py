"""The controller's durable state in SQLite: agents, their profiles, deployments, events.

Every change is one transaction (WAL journal, synchronous=FULL), so a controller killed at
any moment restarts from a consistent database. Plans are stored as the solver's JSON.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from proto.adapter import NodeInfo
from solver.plan import Plan, plan_from_dict
from solver.request import Options, PlacementRequest, Workload

SCHEMA = """
CREATE TABLE IF NOT EXISTS agents (
    name TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    memory_bytes INTEGER NOT NULL,
    gguf_types TEXT NOT NULL,          -- JSON list
    threads INTEGER NOT NULL,
    device TEXT NOT NULL,
    registered_at REAL NOT NULL,
    drained INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS profiles (  -- per agent and model: seconds per layer at each type
    agent TEXT NOT NULL,
    model_sha TEXT NOT NULL,
    timings TEXT NOT NULL,             -- JSON {type: [decode_s, prefill_s_per_token, decode_attention_s, prefill_attention_s], "step": [overhead_s, 0]}
    measured_at REAL NOT NULL,
    PRIMARY KEY (agent, model_sha)
);
CREATE TABLE IF NOT EXISTS links (     -- measured between agents (and from the controller)
    a TEXT NOT NULL,
    b TEXT NOT NULL,
    rtt_s REAL NOT NULL,
    bandwidth REAL NOT NULL,
    measured_at REAL NOT NULL,
    PRIMARY KEY (a, b)
);
CREATE TABLE IF NOT EXISTS deployments (
    id TEXT PRIMARY KEY,
    model_path TEXT NOT NULL,
    model_sha TEXT NOT NULL,
    request TEXT NOT NULL,             -- JSON of the placement request
    plan TEXT NOT NULL,                -- solver Plan JSON
    stages TEXT NOT NULL,              -- JSON [{node, address, sha256, first, last, types}]
    status TEXT NOT NULL,              -- preparing | active | failed | retired
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class StageRef:
    """Where one stage of a deployment runs."""
    node: str
    address: str                   # the agent's host:port
    sha256: str                    # the shard's content
    first: int                     # first layer (inclusive)
    last: int                      # last layer (exclusive)
    types: tuple[str, ...]         # GGUF type of each layer in [first, last)


@dataclass(frozen=True)
class Deployment:
    id: str
    model_path: str                # the master GGUF on the controller's machine
    model_sha: str
    request: PlacementRequest      # what was asked for (re-planned with on drain and failover)
    plan: Plan                     # the solver's plan, with its prediction
    stages: tuple[StageRef, ...]   # in pipeline order
    status: str                    # preparing | active | failed | retired
    created_at: float

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(s.node for s in self.stages)

    @property
    def types(self) -> tuple[str, ...]:
        """Every layer's type, in layer order."""
        return tuple(q for s in self.stages for q in s.types)


def _request(d: dict) -> PlacementRequest:
    if "workload" not in d:     # written before the placement request had a type (deploy options)
        d = {"model": d["model_path"], "text": d.get("text_path") or "",
             "workload": {k: d[k] for k in ("prompt_tokens", "output_tokens", "concurrency", "context")},
             "options": {"objective": d["objective"], "max_ppl_increase": d["max_ppl_increase"], "types": d["types"],
                         "pinned": d["pin"], "excluded": d["exclude"], "max_stages": d["max_stages"],
                         "time_limit": d["time_limit_s"]}}
    o = dict(d["options"])
    for k in ("types", "pinned", "excluded"):
        o[k] = tuple(o.get(k, ()))
    return PlacementRequest(model=d["model"], text=d.get("text", ""), tokens=d.get("tokens", 1024),
                            workload=Workload(**d["workload"]), options=Options(**o))


def _stages(rows: list[dict]) -> tuple[StageRef, ...]:
    return tuple(StageRef(s["node"], s["address"], s["sha256"], int(s["first"]), int(s["last"]), tuple(s["types"]))
                 for s in rows)


class State:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise ValueError(f"{self.path} is not a usable edgefleet state database ({exc}); "
                             "move it away to start with an empty state") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self, sql: str, args: tuple = ()) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(sql, args)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _rows(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ---------------------------------------------------------- agents

    def upsert_agent(self, n: NodeInfo) -> None:
        self._tx("INSERT INTO agents (name, address, memory_bytes, gguf_types, threads, device, registered_at) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET address=excluded.address, "
                 "memory_bytes=excluded.memory_bytes, gguf_types=excluded.gguf_types, threads=excluded.threads, "
                 "device=excluded.device, registered_at=excluded.registered_at",
                 (n.name, n.address, n.memory_bytes, json.dumps(list(n.gguf_types)), n.threads, n.device, time.time()))

    def agents(self) -> list[tuple[NodeInfo, bool]]:
        """Known agents and whether each is drained."""
        return [(NodeInfo(r[0], r[1], r[2], tuple(json.loads(r[3])), r[4], r[5]), bool(r[6]))
                for r in self._rows("SELECT name, address, memory_bytes, gguf_types, threads, device, drained "
                                    "FROM agents ORDER BY name")]

    def set_drained(self, name: str, drained: bool) -> None:
        self._tx("UPDATE agents SET drained=? WHERE name=?", (int(drained), name))

    # ---------------------------------------------------------- profiles and links

    def save_profile(self, agent: str, model_sha: str, timings: dict[str, tuple[float, ...]]) -> None:
        self._tx("INSERT OR REPLACE INTO profiles VALUES (?, ?, ?, ?)",
                 (agent, model_sha, json.dumps(timings), time.time()))

    def profile(self, agent: str, model_sha: str) -> dict[str, tuple[float, ...]] | None:
        rows = self._rows("SELECT timings FROM profiles WHERE agent=? AND model_sha=?", (agent, model_sha))
        return {k: tuple(v) for k, v in json.loads(rows[0][0]).items()} if rows else None

    def save_link(self, a: str, b: str, rtt_s: float, bandwidth: float) -> None:
        self._tx("INSERT OR REPLACE INTO links VALUES (?, ?, ?, ?, ?)", (a, b, rtt_s, bandwidth, time.time()))

    def links(self) -> dict[tuple[str, str], tuple[float, float]]:
        return {(r[0], r[1]): (r[2], r[3]) for r in self._rows("SELECT a, b, rtt_s, bandwidth FROM links")}

    # ---------------------------------------------------------- deployments

    def save_deployment(self, d: Deployment) -> None:
        self._tx("INSERT OR REPLACE INTO deployments VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 (d.id, d.model_path, d.model_sha, json.dumps(asdict(d.request)), d.plan.to_json(),
                  json.dumps([asdict(s) for s in d.stages]), d.status, d.created_at))

    def set_status(self, deployment_id: str, status: str) -> None:
        self._tx("UPDATE deployments SET status=? WHERE id=?", (status, deployment_id))

    def activate(self, deployment_id: str) -> None:
        """Mark one deployment active and the previously active one retired, atomically."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("UPDATE deployments SET status='retired' WHERE status='active'")
                self._db.execute("UPDATE deployments SET status='active' WHERE id=?", (deployment_id,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def active(self) -> Deployment | None:
        rows = self._rows("SELECT * FROM deployments WHERE status='active' ORDER BY created_at DESC LIMIT 1")
        if not rows:
            return None
        r = rows[0]
        return Deployment(r[0], r[1], r[2], _request(json.loads(r[3])), plan_from_dict(json.loads(r[4])),
                          _stages(json.loads(r[5])), r[6], r[7])

    # ---------------------------------------------------------- events

    def event(self, kind: str, message: str) -> None:
        self._tx("INSERT INTO events (time, kind, message) VALUES (?, ?, ?)", (time.time(), kind, message))

    def events(self, limit: int = 100) -> list[tuple[float, str, str]]:
        rows = self._rows("SELECT time, kind, message FROM events ORDER BY id DESC LIMIT ?", (limit,))
        return list(reversed(rows))
