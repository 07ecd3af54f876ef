"""Shared fixtures: paths of the reference model and its held-out text."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "models" / "reference" / "edgefleet-ref-f16.gguf"
HELDOUT = ROOT / "models" / "reference" / "heldout.txt"


@pytest.fixture(scope="session")
def reference_model() -> Path:
    assert REFERENCE.exists(), "the committed reference model is missing"
    return REFERENCE


@pytest.fixture(scope="session")
def heldout_text() -> str:
    return HELDOUT.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct's F16 master, built from the PyPI package (cached outside the repo)."""
    from models import smollm2

    return smollm2.path("F16")


@pytest.fixture(scope="session")
def smollm2_q4_k_m() -> Path:
    """SmolLM2-135M-Instruct as hubs publish it: the mixed Q4_K_M file llama.cpp's quantizer makes
    from the F16 master (cached outside the repo)."""
    from models import smollm2

    return smollm2.path("Q4_K_M")
