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
            percentile_lines(ax, v)
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
    event_labels(a1, events)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PERCENTILES = ((0.5, "p50"), (0.9, "p90"), (0.99, "p99"))


def percentile_lines(ax, values: np.ndarray) -> list:
    """Dotted lines at p50, p90 and p99, each labelled with its name and value at its own
    height (so that close percentiles do not write over each other)."""
    labels = []
    lo, hi = ax.get_xlim()
    for (q, name), y in zip(PERCENTILES, (0.15, 0.3, 0.45)):
        x = float(np.quantile(values, q))
        ax.axvline(x, color="grey", lw=0.6, ls=":")
        right = hi > lo and (x - lo) / (hi - lo) > 0.6        # near the right edge: write to the left
        value = f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"
        labels.append(ax.text(x, y, f" {name} {value} s ", fontsize=7, color="dimgrey",
                              ha="right" if right else "left", va="center"))
    return labels


def event_labels(ax, events: list[tuple[float, str]]) -> list:
    """The events' numbers above their lines, and their texts in a box in that order: labels
    that never overlap, however close the events are in time."""
    if not events:
        return []
    lo, hi = ax.get_xlim()
    levels: list[list[float]] = []      # per height, the x (axes fraction) of the numbers there
    marks = []
    for i, (at, _) in enumerate(events):
        x = (at - lo) / (hi - lo) if hi > lo else 0.5
        level = next((k for k, xs in enumerate(levels) if all(abs(x - other) > 0.03 for other in xs)), len(levels))
        if level == len(levels):
            levels.append([])
        levels[level].append(x)
        marks.append(ax.text(at, 0.9 - 0.1 * level, str(i + 1), transform=ax.get_xaxis_transform(), ha="center",
                             va="center", fontsize=8, fontweight="bold",
                             bbox={"boxstyle": "circle,pad=0.15", "facecolor": "white", "linewidth": 0.5}))
    box = "\n".join(f"{i + 1}: {text}" for i, (_, text) in enumerate(events))
    marks.append(ax.text(0.01, 0.03, box, transform=ax.transAxes, va="bottom", ha="left", fontsize=7,
                         bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85, "linewidth": 0.5}))
    return marks
