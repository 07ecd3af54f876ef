"""Where edgefleet keeps what it downloads or builds, outside the repository: models, sensitivity
profiles, the native output reader, the benches' llama.cpp tools."""
from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """$EDGEFLEET_HOME, default (unset or empty) ~/.edgefleet; a ~ in it means the user's home."""
    return Path(os.environ.get("EDGEFLEET_HOME") or "~/.edgefleet").expanduser()
