"""Strict JSON for every file edgefleet writes: a value that is not a number (NaN, ±inf: a
plan without an objective, a percentile of no requests) is written as null, never as the
`NaN` that JSON parsers other than Python's refuse."""
from __future__ import annotations

import json
import math


def finite(obj):
    """obj with every NaN or infinite float replaced by None (dicts, lists and tuples walked)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj, **kw) -> str:
    """json.dumps of finite(obj), refusing anything else that is not JSON."""
    return json.dumps(finite(obj), allow_nan=False, **kw)
