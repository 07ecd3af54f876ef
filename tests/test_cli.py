"""The edgefleet CLI: help lists the commands; user errors are one sentence and exit 2."""
from __future__ import annotations

import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "controller.cli"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), capture_output=True, text=True)


def test_help_lists_commands():
    out = run("--help")
    assert out.returncode == 0
    for cmd in ("model", "demo"):
        assert cmd in out.stdout
    sub = run("model", "--help")
    for cmd in ("info", "shard", "profile"):
        assert cmd in sub.stdout


@pytest.mark.parametrize("args, message", [
    (["model", "info", "/nonexistent/model.gguf"], "does not exist"),
    (["model", "info", __file__], "not a GGUF file"),
    (["model", "shard", "{ref}", "--types", "Q9_K", "-o", "{tmp}/x.gguf"], "unsupported GGUF type 'Q9_K'"),
    (["model", "shard", "{ref}", "--types", "Q4_K", "--layers", "3:12", "-o", "{tmp}/x.gguf"], "out of bounds"),
    (["model", "shard", "{ref}", "--types", "Q4_K,Q8_0", "-o", "{tmp}/x.gguf"], "2 types given for a model of 8 layers"),
    (["model", "shard", "{ref}", "--types", "0-3:Q8_0", "-o", "{tmp}/x.gguf"], "no type given for layers [4, 5, 6, 7]"),
    (["model", "profile", "{ref}", "--types", "Q1_X"], "unsupported GGUF type 'Q1_X'"),
])
def test_user_errors_are_one_line_and_exit_2(args, message, reference_model, tmp_path):
    out = run(*[a.format(ref=reference_model, tmp=tmp_path) for a in args])
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_unsupported_architecture(tmp_path):
    from gguf import GGUFWriter
    import numpy as np

    path = tmp_path / "gpt2.gguf"
    w = GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    out = run("model", "info", str(path))
    assert out.returncode == 2 and "unsupported architecture 'gpt2'" in out.stderr


def test_shard_and_info_roundtrip(reference_model, tmp_path):
    out = run("model", "shard", str(reference_model), "--types", "0-3:Q8_0,4-7:Q4_K", "--layers", "2:6",
              "-o", str(tmp_path / "s.gguf"))
    assert out.returncode == 0, out.stderr
    info = run("model", "info", str(tmp_path / "s.gguf"), "--json")
    import json
    data = json.loads(info.stdout)
    assert data["layers"] == [2, 6] and data["layer_types"] == ["Q8_0", "Q8_0", "Q4_K", "Q4_K"]


def test_demo_generates(reference_model):
    out = run("demo", "--max-tokens", "8", "--stages", "3")
    assert out.returncode == 0, out.stderr
    assert "tokens/s" in out.stdout and "[0, 3)" in out.stdout
