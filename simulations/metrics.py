"""Latency and throughput figures of a run, simulated or real, in one format.

`summarize` turns per-request times into TTFT, time per output token (TPOT) and end-to-end
latency statistics, throughput, SLO attainment, per-node utilization and a timeline.
`edgefleet simulate` and `edgefleet replay` both write its output, so that a simulation
and a real run compare line by line.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Outcome:
    """One request: times in seconds from the start of the run (nan where it did not get there)."""
    id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    first_s: float
    done_s: float
    status: str          # ok | rejected | failed


def stats(values) -> dict:
    a = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if a.size == 0:
        return {"n": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    return {"n": int(a.size), "mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def per_request(o: Outcome) -> tuple[float, float, float]:
    """(TTFT, TPOT, E2E) of one request; TPOT is nan for a one-token answer."""
    ttft = o.first_s - o.arrival_s
    e2e = o.done_s - o.arrival_s
    tpot = (o.done_s - o.first_s) / (o.output_tokens - 1) if o.output_tokens > 1 else math.nan
    return ttft, tpot, e2e


def summarize(outcomes: list[Outcome], slo_ttft_s: float = 0.0, slo_tpot_s: float = 0.0,
              busy_s: dict[str, float] | None = None, token_times: list[tuple[float, int]] | None = None,
              bins: int = 120) -> dict:
    ok = [o for o in outcomes if o.status == "ok"]
    rows = [per_request(o) for o in ok]
    ttft = [r[0] for r in rows]
    tpot = [r[1] for r in rows]
    e2e = [r[2] for r in rows]
    start = min((o.arrival_s for o in outcomes), default=0.0)
    end = max((o.done_s for o in ok), default=start)
    span = max(end - start, 1e-9)
    tokens = sum(o.output_tokens for o in ok)
    out = {
        "requests": len(outcomes), "completed": len(ok),
        "rejected": sum(o.status == "rejected" for o in outcomes),
        "failed": sum(o.status == "failed" for o in outcomes),
        "duration_s": span,
        "ttft_s": stats(ttft), "tpot_s": stats(tpot), "e2e_s": stats(e2e),
        "throughput": {"requests_per_s": len(ok) / span, "output_tokens_per_s": tokens / span,
                       "output_tokens": tokens},
    }
    if slo_ttft_s or slo_tpot_s:
        met = sum((not slo_ttft_s or a <= slo_ttft_s) and (not slo_tpot_s or math.isnan(b) or b <= slo_tpot_s)
                  for a, b, _ in rows)
        out["slo"] = {"ttft_s": slo_ttft_s or None, "tpot_s": slo_tpot_s or None,
                      "attainment": met / len(outcomes) if outcomes else None}
    if busy_s is not None:
        out["utilization"] = {n: b / span for n, b in sorted(busy_s.items())}
    out["timeline"] = timeline(outcomes, token_times, start, end, bins)
    return out


def timeline(outcomes: list[Outcome], token_times, start: float, end: float, bins: int) -> dict:
    """Per time bin: arrivals, completions, output tokens/s and mean TTFT of the requests
    that arrived in it."""
    edges = np.linspace(start, max(end, start + 1e-6), bins + 1)
    width = edges[1] - edges[0]
    arrivals = np.histogram([o.arrival_s for o in outcomes], edges)[0]
    done = np.histogram([o.done_s for o in outcomes if o.status == "ok"], edges)[0]
    if token_times:
        t = np.fromiter((x for x, _ in token_times), float, len(token_times))
        k = np.fromiter((n for _, n in token_times), float, len(token_times))
        tok = np.histogram(t, edges, weights=k)[0]
    else:   # a real run: spread each request's tokens evenly between its first and last
        tok = np.zeros(bins)
        for o in outcomes:
            if o.status == "ok":
                tok += np.histogram(np.linspace(o.first_s, o.done_s, o.output_tokens), edges)[0]
    ttft_sum = np.histogram([o.arrival_s for o in outcomes if o.status == "ok"], edges,
                            weights=[o.first_s - o.arrival_s for o in outcomes if o.status == "ok"])[0]
    ok_arr = np.histogram([o.arrival_s for o in outcomes if o.status == "ok"], edges)[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_ttft = np.where(ok_arr > 0, ttft_sum / np.maximum(ok_arr, 1), np.nan)
    return {"t_s": [float(x) for x in edges[:-1]], "bin_s": float(width),
            "arrivals": arrivals.tolist(), "completions": done.tolist(),
            "tokens_per_s": (tok / width).tolist(),
            "mean_ttft_s": [None if math.isnan(x) else float(x) for x in mean_ttft]}
