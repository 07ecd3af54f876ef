"""Sensitivity table: each entry equals an independent measurement through a GGUF built with
that one layer quantized; the additivity summary is computed correctly; results are cached."""
from __future__ import annotations

import json
import shutil
import math
import subprocess
import sys

import pytest

from agent.pipeline import LocalPipeline
from controller import sensitivity as S
from controller.shards import write_shard


@pytest.fixture(scope="module")
def result(reference_model, heldout_text):
    return S.measure(reference_model, heldout_text, types=("F16", "Q4_K", "Q2_K"), tokens=512, validate=4)


def test_table_entry_matches_a_model_built_with_that_layer_quantized(result, reference_model, heldout_text, tmp_path):
    path = tmp_path / "one.gguf"
    types = ["F16"] * 8
    types[5] = "Q2_K"
    write_shard(reference_model, path, types)
    ids = S.heldout_windows(reference_model, heldout_text, 512)[0]

    def nll(p):   # the whole model as one llama.cpp stage: an independent path from the per-layer stages
        pipe = LocalPipeline.from_files([p])
        try:
            return float(pipe.token_nll(ids).mean())
        finally:
            pipe.close()

    measured = nll(path) - nll(reference_model)
    # the table runs one layer per stage, the check the whole model at once: the same
    # arithmetic in llama.cpp, so the two agree to float summation noise
    assert result["sensitivity"]["5"]["Q2_K"] == pytest.approx(measured, abs=1e-5)
    assert result["sensitivity"]["5"]["F16"] == 0.0
    assert result["base_perplexity"] == pytest.approx(math.exp(result["base_nll"]))
    assert set(result["sensitivity"]) == {str(i) for i in range(8)}


def test_validation_summary():
    checks = [{"predicted": p, "measured": m} for p, m in [(0.1, 0.05), (0.2, 0.1), (0.4, 0.2)]]
    v = S.summarize(checks)
    assert v["correlation"] == pytest.approx(1.0)
    assert v["calibration"] == pytest.approx(0.5)
    assert v["max_abs_error"] == pytest.approx(0.2)
    assert v["mean_error"] == pytest.approx((0.05 + 0.1 + 0.2) / 3)
    assert v["calibrated_max_abs_error_loo"] == pytest.approx(0.0, abs=1e-12)


def test_validation_configs_are_real_measurements(result):
    v = result["validation"]
    assert len(v["configs"]) == 4
    for c in v["configs"]:
        assert len(c["types"]) == 8
        assert c["predicted"] == pytest.approx(sum(result["sensitivity"][str(l)][t] for l, t in enumerate(c["types"])))


def test_cli_profile_prints_table_and_caches(tmp_path, reference_model):
    env = {"EDGEFLEET_HOME": str(tmp_path), "PATH": ""}
    model = tmp_path / "model.gguf"          # a copy: no table shipped beside it
    shutil.copy(reference_model, model)
    cmd = [sys.executable, "-m", "controller.cli", "model", "profile", str(model),
           "--tokens", "512", "--types", "F16,Q2_K", "--validate", "2"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr
    assert "Q2_K" in first.stdout and "additivity on 2 random mixed configurations" in first.stdout
    cached = list((tmp_path / "profiles").glob("*.sensitivity.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["n_layer"] == 8
    again = subprocess.run(cmd + ["--json"], capture_output=True, text=True, env=env)
    assert "using cached" in again.stderr
    assert json.loads(again.stdout)["sha256"] == cached[0].name.split(".")[0]
    # a request for a type the cache lacks measures again instead of returning a partial table
    wider = subprocess.run(cmd[:-4] + ["--types", "F16,Q8_0", "--validate", "0"], capture_output=True, text=True, env=env)
    assert wider.returncode == 0 and "using cached" not in wider.stderr and "Q8_0" in wider.stdout


def test_table_shipped_beside_the_model_is_used_when_its_hash_matches(tmp_path, reference_model, monkeypatch):
    from controller.sensitivity import cached_or_measured, load_cached
    from controller.shards import file_sha256

    monkeypatch.setenv("EDGEFLEET_HOME", str(tmp_path))     # an empty cache
    result, measured = cached_or_measured(reference_model, reference_model.with_name("heldout.txt"), tokens=1024)
    assert not measured and result["requested_tokens"] >= 1024 and result["n_layer"] == 8
    other = tmp_path / "other.gguf"                           # a table for another hash beside it is ignored
    shutil.copy(reference_model, other)
    table = json.loads(reference_model.with_suffix(".sensitivity.json").read_text())
    table["sha256"] = "0" * 64
    other.with_suffix(".sensitivity.json").write_text(json.dumps(table))
    assert load_cached(file_sha256(other), tokens=1024, model=other) is None
