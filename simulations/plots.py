"""matplotlib figures of a run: latency CDFs and a timeline with the what-if events marked."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from simulations.metrics import Outcome, per_request  # noqa: E402


def latency_cdfs(outcomes: list[Outcome], path: Path, title: str) -> None:
    rows = [per_request(o) for o in outcomes if o.status == "ok"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, i, name in zip(axes, range(3), ("time to first token", "time per output token", "end-to-end latency")):
        v = np.sort([r[i] for r in rows if not np.isnan(r[i])])
        if v.size:
            ax.plot(v, np.arange(1, v.size + 1) / v.size)
            for q in (0.5, 0.9, 0.99):
                ax.axvline(np.quantile(v, q), color="grey", lw=0.6, ls=":")
        ax.set_xlabel(f"{name} (s)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of requests")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def timeline(summary: dict, events: list[tuple[float, str]], path: Path, title: str) -> None:
    tl = summary["timeline"]
    t = np.asarray(tl["t_s"]) + tl["bin_s"] / 2
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(12, 5.5), sharex=True)
    a1.plot(t, tl["tokens_per_s"], label="output tokens/s")
    a1.plot(t, np.asarray(tl["arrivals"]) / tl["bin_s"], label="arrivals/s", alpha=0.7)
    a1.set_ylabel("rate")
    a1.legend(loc="upper right")
    ttft = np.array([np.nan if x is None else x for x in tl["mean_ttft_s"]], dtype=float)
    a2.plot(t, ttft, color="C3")
    a2.set_ylabel("mean TTFT of arrivals (s)")
    a2.set_xlabel("time (s)")
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
        for at, text in events:
            ax.axvline(at, color="k", lw=0.8, ls="--")
    for at, text in events:
        a1.annotate(text.split(":")[0], (at, a1.get_ylim()[1]), rotation=90, va="top", ha="right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
