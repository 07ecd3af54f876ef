"""Sensitivity table: the held-out NLL increase when a single layer is quantized to a type.

sensitivity[l][q] = NLL(model with only layer l at type q) - NLL(master), per token, measured
on held-out text by llama.cpp's engine (agent/runtime.py), the one that serves requests. The solver predicts a mixed configuration's loss as
the sum over layers (the additive model); `validate_additivity` measures how good that is on
random mixed configurations and fits a calibration factor when the plain sum is biased.

Results are cached as JSON keyed by the GGUF's SHA-256.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from solver import jsonio
from agent import weights as W
from agent.home import home
from agent.pipeline import token_nll
from agent.runtime import Settings, Stage, Step
from agent.tokenizer import Tokenizer
from controller.shards import candidate_types, write_shard
from solver.ggml_types import TYPE_ORDER

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]   # (what, done, total)


def cache_dir() -> Path:
    """Where profiles are cached: $EDGEFLEET_HOME/profiles (default ~/.edgefleet/profiles)."""
    return home() / "profiles"


class Evaluator:
    """NLL of held-out windows with any layers at other types, on llama.cpp stages built from
    the master by controller/shards.py. The hidden state entering each layer of the master is
    kept per window, so layers below the first changed one are not recomputed. Unchanged
    layers run as master stages: one-layer stages up to the next multiple of CHUNK, then
    CHUNK-layer stages (fewer, larger decodes); a changed layer is its own one-layer stage."""

    CHUNK = 6

    def __init__(self, master: str | Path, windows: list[list[int]], workdir: Path, threads: int = 0):
        reader = W.open_gguf(master)
        self.cfg = W.read_config(reader)
        self.master_types = W.layer_types(reader)
        self.master, self.windows, self.workdir = Path(master), windows, Path(workdir)
        window = max(len(w) for w in windows)
        self.settings = Settings(sessions=1, context=window, batch_tokens=window, threads=threads or os.cpu_count() or 1)
        n = self.cfg.n_layer
        self._stages = {(l, l + 1): self._stage(l, l + 1, {}) for l in range(n)}
        self._stages.update({(a, min(a + self.CHUNK, n)): self._stage(a, min(a + self.CHUNK, n), {})
                             for a in range(0, n, self.CHUNK)})
        self._inputs: list[list[np.ndarray]] = []    # [window][layer] hidden state entering the layer (l >= 1)
        self.base_nll = self._run({}, record=True)

    def close(self) -> None:
        for s in self._stages.values():
            s.close()

    def _stage(self, first: int, last: int, types: dict[int, str]) -> Stage:
        """Layers [first, last) with the master's types but where `types` says otherwise."""
        full = [types.get(l, q) for l, q in enumerate(self.master_types)]
        path = self.workdir / f"layers{first}-{last}-{'.'.join(full[first:last])}.gguf"
        if not path.exists():
            write_shard(self.master, path, full, first, last, master_sha256="0" * 64)
        return Stage(path, self.settings)

    def _route(self, start: int, types: dict[int, str], record: bool) -> list[tuple[int, int]]:
        """The stages, as layer ranges, that carry layers [start, n): one layer at a time where
        a layer changes or every layer's input is recorded, master chunks elsewhere."""
        n, out, l = self.cfg.n_layer, [], start
        while l < n:
            if record or l in types or l % self.CHUNK or any(c in types for c in range(l, l + self.CHUNK)):
                out.append((l, l + 1))
                l += 1
            else:
                out.append((l, min(l + self.CHUNK, n)))
                l = out[-1][1]
        return out

    def nll(self, types: dict[int, str]) -> float:
        """Mean NLL per token with layer l at types[l] (others at the master's type)."""
        return self._run({l: q for l, q in types.items() if q != self.master_types[l]})

    def _run(self, types: dict[int, str], record: bool = False) -> float:
        start = min(types) if types else 0
        own = {(l, l + 1): self._stage(l, l + 1, {l: q}) for l, q in types.items()}
        route = self._route(start, types, record)
        try:
            total, count = 0.0, 0
            for wi, ids in enumerate(self.windows):
                x: np.ndarray | None = None if start == 0 else self._inputs[wi][start]
                kept: list[np.ndarray] = [np.zeros(0)]
                for a, b in route:
                    stage = own.get((a, b)) or self._stages[(a, b)]
                    last = b == self.cfg.n_layer
                    step = (Step(0, 0, tokens=np.asarray(ids), all_logits=last) if x is None
                            else Step(0, 0, hidden=x, all_logits=last))
                    x = stage.forward([step])[0]
                    if record and not last:
                        kept.append(x)
                if record:
                    self._inputs.append(kept)
                total += float(token_nll(x[:-1], ids[1:]).sum())
                count += len(ids) - 1
            return total / count
        finally:
            for st in own.values():
                st.close()


def heldout_windows(model: str | Path, text: str, tokens: int, window: int = 512) -> list[list[int]]:
    ids = Tokenizer(model).encode(text)
    if len(ids) < window + 1:
        raise ValueError(f"the held-out text has only {len(ids)} tokens; give at least {window + 1}")
    n = max(1, min(tokens // window, len(ids) // window))
    return [ids[i * window:(i + 1) * window] for i in range(n)]


def types_to_measure(model: str | Path, asked: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Per layer, the types a sensitivity table covers: of those asked for (default: LAYER_TYPES
    and the layer's own), those the layer may take (controller/shards.candidate_types). A type
    no layer may take, or a layer left with none, is an error."""
    may = candidate_types(model, asked)
    some = {q for types in may for q in types}
    too_fine = [q for q in asked if q not in some]
    if too_fine:
        every = sorted({q for types in candidate_types(model, TYPE_ORDER) for q in types}, key=TYPE_ORDER.index)
        raise ValueError(f"{Path(model).name}'s layers cannot take {too_fine[0]} (a quantized layer never gains "
                         f"precision); choose from {', '.join(every)}")
    none = next((l for l, types in enumerate(may) if not types), None)
    if none is not None:
        own = W.layer_types(W.open_master(model))[none]
        raise ValueError(f"layer {none} of {Path(model).name} can take none of {', '.join(asked)} (it has fewer "
                         f"bytes as stored); add its own type {own} or a smaller one")
    return may


def union(per_layer: list[tuple[str, ...]]) -> tuple[str, ...]:
    """The types of any layer, best first."""
    return tuple(q for q in TYPE_ORDER if any(q in types for types in per_layer))


def measure(model: str | Path, text: str, types: tuple[str, ...] = (), tokens: int = 2048,
            validate: int = 20, seed: int = 0, progress: Progress | None = None, sha256: str | None = None) -> dict:
    """Sensitivity table + additivity validation for a model (a dict, ready for JSON).
    sha256: the GGUF's hash when the caller already has it (hashing a large model is slow)."""
    from controller.shards import file_sha256

    import tempfile

    t0 = time.perf_counter()
    per_layer = types_to_measure(model, tuple(types))
    windows = heldout_windows(model, text, tokens)
    with tempfile.TemporaryDirectory(prefix="edgefleet-sensitivity-") as work:
        ev = Evaluator(model, windows, Path(work))
        try:
            n = ev.cfg.n_layer
            todo = [(l, q) for l in range(n) for q in per_layer[l] if q != ev.master_types[l]]
            table = {str(l): {ev.master_types[l]: 0.0} for l in range(n)}
            for i, (l, q) in enumerate(todo):
                table[str(l)][q] = ev.nll({l: q}) - ev.base_nll
                if progress:
                    progress("sensitivity", i + 1, len(todo))

            rng = random.Random(seed)
            checks = []
            for i in range(validate):
                config = {l: rng.choice(per_layer[l]) for l in range(n)}
                predicted = sum(table[str(l)][q] for l, q in config.items())
                measured = ev.nll(config) - ev.base_nll
                checks.append({"types": [config[l] for l in range(n)], "predicted": predicted, "measured": measured})
                if progress:
                    progress("validation", i + 1, validate)
        finally:
            ev.close()
    return {
        "model": str(model),
        "sha256": sha256 or file_sha256(model),
        "n_layer": n,
        "types": list(union(per_layer)),
        "requested_tokens": tokens,
        "eval_tokens": sum(len(w) - 1 for w in windows),
        "base_nll": ev.base_nll,
        "base_perplexity": math.exp(ev.base_nll),
        "sensitivity": table,
        "validation": summarize(checks),
        "seconds": time.perf_counter() - t0,
    }


def summarize(checks: list[dict]) -> dict:
    """Correlation, errors and bias of predicted vs measured ΔNLL; a calibration factor
    (measured ≈ k · predicted, least squares through 0) with leave-one-out errors."""
    if not checks:
        return {"configs": []}
    p = np.array([c["predicted"] for c in checks])
    m = np.array([c["measured"] for c in checks])
    corr = float(np.corrcoef(p, m)[0, 1]) if len(p) > 1 and p.std() > 0 and m.std() > 0 else float("nan")
    k = float(p @ m / (p @ p)) if p @ p > 0 else 1.0
    loo = []
    for i in range(len(p)):
        mask = np.arange(len(p)) != i
        ki = float(p[mask] @ m[mask] / (p[mask] @ p[mask])) if p[mask] @ p[mask] > 0 else 1.0
        loo.append(ki * p[i] - m[i])
    return {
        "configs": checks,
        "correlation": corr,
        "max_abs_error": float(np.max(np.abs(p - m))),
        "mean_error": float(np.mean(p - m)),            # > 0: the plain sum over-predicts
        "mean_relative_error": float(np.mean(np.abs(p - m) / np.maximum(np.abs(m), 1e-9))),
        "calibration": k,                               # use k * Σ as the prediction
        "calibrated_max_abs_error_loo": float(np.max(np.abs(loo))),
        "calibrated_mean_error_loo": float(np.mean(loo)),
    }


def cache_path(sha256: str) -> Path:
    return cache_dir() / f"{sha256}.sensitivity.json"


def beside_model(model: str | Path) -> Path:
    """A table shipped next to the model: MODEL.sensitivity.json (used when its SHA-256 matches)."""
    return Path(model).with_suffix(".sensitivity.json")


def load_cached(sha256: str, types: tuple[str, ...] = (), tokens: int = 0,
                model: str | Path | None = None) -> dict | None:
    """The cached result for this GGUF (or the one shipped beside it), if it measured at
    least these types and tokens."""
    for p in [cache_path(sha256)] + ([beside_model(model)] if model is not None else []):
        if not p.exists():
            continue
        result = json.loads(p.read_text())
        if result.get("sha256") != sha256:
            continue
        if set(types) <= set(result.get("types", ())) and result.get("requested_tokens", 0) >= tokens:
            return result
    return None


def save(result: dict) -> Path:
    p = cache_path(result["sha256"])
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(jsonio.dumps(result, indent=1))
    tmp.replace(p)
    return p


def cached_or_measured(model: str | Path, text_file: Path, types: tuple[str, ...] = (), tokens: int = 2048,
                       validate: int = 20, seed: int = 0, progress: Progress | None = None,
                       sha256: str | None = None, force: bool = False) -> tuple[dict, bool]:
    """(result, measured now): the cached table if it covers these types and tokens (and not
    `force`), else a fresh measurement on the held-out text in text_file, saved to the cache."""
    from controller.shards import file_sha256

    sha = sha256 or file_sha256(model)
    types = union(types_to_measure(model, tuple(types)))
    result = None if force else load_cached(sha, types, tokens, model)
    if result is not None:
        return result, False
    result = measure(model, Path(text_file).read_text(encoding="utf-8"), types, tokens, validate, seed, progress, sha)
    save(result)
    return result, True
