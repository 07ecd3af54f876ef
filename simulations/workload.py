"""Request traces: the Azure LLM inference trace format, JSONL, and synthetic arrivals; time
scaling, slicing, length scaling and load spikes. The simulator and `edgefleet replay`
read requests through this module, so both see exactly the same workload.
"""
from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path


@dataclass(frozen=True)
class Request:
    id: int
    arrival_s: float          # seconds after the start of the trace
    prompt_tokens: int
    output_tokens: int


def read_trace(path: str | Path) -> list[Request]:
    """An Azure trace CSV (TIMESTAMP,ContextTokens,GeneratedTokens) or a JSONL file with one
    {"arrival_s", "prompt_tokens", "output_tokens"} object per line, sorted by arrival."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"trace {path} does not exist; give an Azure trace CSV or a JSONL file")
    if path.suffix.lower() in (".jsonl", ".json"):
        return _read_jsonl(path)
    return _read_azure(path)


def _read_azure(path: Path) -> list[Request]:
    with open(path, newline="") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header is None or [h.strip() for h in header[:3]] != ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]:
            raise ValueError(f"{path} is not an Azure trace: the header must be TIMESTAMP,ContextTokens,GeneratedTokens")
        out, t0 = [], None
        for line, row in enumerate(rows, start=2):
            try:
                stamp = row[0].strip()
                # 7 fractional digits: datetime takes at most 6
                if "." in stamp:
                    head, frac = stamp.split(".", 1)
                    stamp = f"{head}.{frac[:6]}"
                t = datetime.fromisoformat(stamp).timestamp()
                prompt, output = int(row[1]), int(row[2])
            except (ValueError, IndexError):
                raise ValueError(f"{path}:{line}: expected TIMESTAMP,ContextTokens,GeneratedTokens, got {row}") from None
            t0 = t if t0 is None else t0
            out.append(Request(len(out), t - t0, max(1, prompt), max(1, output)))
    return _sorted(out)


def _read_jsonl(path: Path) -> list[Request]:
    out = []
    for line, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        try:
            d = json.loads(text)
            out.append(Request(len(out), float(d["arrival_s"]), max(1, int(d["prompt_tokens"])),
                               max(1, int(d["output_tokens"]))))
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}:{line}: expected a JSON object with arrival_s, prompt_tokens and "
                             "output_tokens") from None
    return _sorted(out)


def write_jsonl(requests: list[Request], path: str | Path) -> None:
    Path(path).write_text("".join(json.dumps({"arrival_s": round(r.arrival_s, 6), "prompt_tokens": r.prompt_tokens,
                                              "output_tokens": r.output_tokens}) + "\n" for r in requests))


def _sorted(reqs: list[Request]) -> list[Request]:
    reqs = sorted(reqs, key=lambda r: (r.arrival_s, r.id))
    if reqs and reqs[0].arrival_s != 0:
        t0 = reqs[0].arrival_s
        reqs = [replace(r, arrival_s=r.arrival_s - t0) for r in reqs]
    return [replace(r, id=i) for i, r in enumerate(reqs)]


def synthetic(n: int, rate: float, seed: int = 0, arrival: str = "poisson", burstiness: float = 1.0,
              prompt_mean: float = 512, output_mean: float = 128, length_cv: float = 0.5) -> list[Request]:
    """n requests at `rate` per second. Arrivals: "poisson" (exponential gaps) or "gamma" (gaps
    with coefficient of variation `burstiness`; > 1 is bursty). Lengths: lognormal with the
    given means and coefficient of variation."""
    if n < 1 or rate <= 0:
        raise ValueError("synthetic traces need at least 1 request and a positive rate")
    if arrival not in ("poisson", "gamma"):
        raise ValueError(f"arrival must be poisson or gamma, not {arrival!r}")
    rng = random.Random(seed)
    sigma = math.sqrt(math.log1p(length_cv ** 2))

    def length(mean: float) -> int:
        return max(1, round(rng.lognormvariate(math.log(mean) - sigma ** 2 / 2, sigma)))

    t, out = 0.0, []
    shape = 1.0 / burstiness ** 2
    for i in range(n):
        out.append(Request(i, t, length(prompt_mean), length(output_mean)))
        t += rng.expovariate(rate) if arrival == "poisson" else rng.gammavariate(shape, 1.0 / (rate * shape))
    return out


def select(requests: list[Request], start_s: float = 0.0, duration_s: float = 0.0, limit: int = 0,
           time_scale: float = 1.0) -> list[Request]:
    """The requests arriving in [start, start + duration) (0 = to the end), at most `limit`,
    re-timed from 0 and with gaps multiplied by time_scale (0.5 = twice the rate)."""
    if time_scale <= 0:
        raise ValueError("the time scale must be positive")
    out = [r for r in requests if r.arrival_s >= start_s and (not duration_s or r.arrival_s < start_s + duration_s)]
    if limit:
        out = out[:limit]
    if not out:
        raise ValueError("no request of the trace falls in the selected window")
    t0 = out[0].arrival_s
    return [replace(r, id=i, arrival_s=(r.arrival_s - t0) * time_scale) for i, r in enumerate(out)]


def scale_lengths(requests: list[Request], factor: float = 1.0, max_prompt: int = 0, max_output: int = 0,
                  max_total: int = 0) -> list[Request]:
    """Lengths × factor, clipped to the limits (0 = none); max_total caps prompt + output by
    shortening the prompt (for a model with a small context)."""
    out = []
    for r in requests:
        p = max(1, round(r.prompt_tokens * factor))
        o = max(1, round(r.output_tokens * factor))
        p = min(p, max_prompt) if max_prompt else p
        o = min(o, max_output) if max_output else o
        if max_total and p + o > max_total:
            o = min(o, max_total - 1)
            p = max(1, max_total - o)
        out.append(replace(r, prompt_tokens=p, output_tokens=o))
    return out


def spike(requests: list[Request], factor: float, start_s: float, end_s: float, seed: int = 0) -> list[Request]:
    """Load × factor in [start, end): each request there gets factor − 1 copies on average,
    arriving at uniformly random times in the window (factor < 1 thins the load instead)."""
    if factor <= 0:
        raise ValueError("a load factor must be positive")
    rng = random.Random(seed)
    out = []
    for r in requests:
        inside = start_s <= r.arrival_s < end_s
        if not inside:
            out.append(r)
            continue
        if factor < 1:
            if rng.random() < factor:
                out.append(r)
            continue
        out.append(r)
        extra = int(factor - 1) + (1 if rng.random() < (factor - 1) % 1 else 0)
        for _ in range(extra):
            out.append(replace(r, arrival_s=rng.uniform(start_s, end_s)))
    out.sort(key=lambda r: (r.arrival_s, r.id))
    return [replace(r, id=i) for i, r in enumerate(out)]
