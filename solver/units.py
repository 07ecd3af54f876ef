"""Quantities as people write them ('8GiB', '100Mbit', '5ms', '68 GB/s', '1.2 TFLOPS'), read in
base units. Plain Python, so that the agent's command line reads --memory without loading the
solver stack (whatever the agent process loads counts against its --memory).
"""
from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_quantity(value, what: str, unit: str = "") -> float:
    """'8GiB', '6.5 GB', '100Mbit', '5ms', '68 GB/s', '1.2 TFLOPS' or a plain number (base units)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    s = str(value).strip().lower().replace(" ", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)([a-z/]*)", s)
    if not m:
        raise ValueError(f"{what}: cannot read {value!r} as a quantity (e.g. 8GiB, 100Mbit, 5ms)")
    x, u = float(m.group(1)), m.group(2)
    if u in ("s", "sec"):
        return x
    if u == "ms":
        return x / 1e3
    if u == "us":
        return x / 1e6
    for suffix, scale in (("bit/s", 1 / 8), ("bit", 1 / 8), ("bps", 1 / 8), ("flops", 1), ("flop/s", 1),
                          ("/s", 1), ("", 1)):
        if u.endswith(suffix):
            prefix = u[: len(u) - len(suffix)] if suffix else u
            if prefix in _UNITS:
                return x * _UNITS[prefix] * scale
    raise ValueError(f"{what}: unknown unit in {value!r} (use B, KiB, MiB, GiB, GB, Mbit, Gbit, ms, s, GB/s, TFLOPS)")
