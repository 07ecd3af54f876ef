"""The edgefleet CLI: help lists the commands; user errors are one sentence and exit 2."""
from __future__ import annotations

import json
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


def test_demo_runs_a_local_fleet_and_cleans_up(reference_model, tmp_path):
    import psutil

    out = run("demo", "--model", str(reference_model), "--max-tokens", "8", "--keep", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "plan:" in out.stdout and "tokens/s" in out.stdout and "ms/token measured" in out.stdout
    assert (tmp_path / "edgefleet.db").exists() and (tmp_path / "desk.log").exists()
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert left == [], "the demo left processes behind"


FLEET = "examples/fleet-edge.yaml"


@pytest.mark.parametrize("fleet_text, model, extra, message", [
    ("nodes: [", "llama-3.1-8b", [], "is not valid YAML"),
    ("nodes: []", "llama-3.1-8b", [], "expected a mapping with a non-empty `nodes` list"),
    ("nodes:\n  - {name: a}", "llama-3.1-8b", [], "node 'a' has no memory"),
    ("nodes:\n  - {name: a, memory: 8 parsecs, device: rpi5-8gb}", "llama-3.1-8b", [], "unknown unit"),
    ("nodes:\n  - {name: a, device: toaster}", "llama-3.1-8b", [], "unknown device 'toaster'"),
    ("nodes:\n  - {name: a, device: rpi5-8gb}\n  - {name: b, device: rpi5-8gb}", "llama-3.1-8b", [],
     "nodes ['b'] cannot be reached from a"),
    (None, "{tmp}/nope.json", [], "model profile {tmp}/nope.json does not exist"),
    (None, "{tmp}/bad.json", [], "is not a model profile JSON"),
    (None, "no-such-model", [], "model no-such-model does not exist"),
    (None, "llama-3-70b", ["--max-ppl-increase", "1"], "no assignment meets a 1 % perplexity budget"),
    (None, "llama-3.1-8b", ["--concurrency", "64", "--context", "8192"], "the fleet offers 40.00 GiB"),
])
def test_plan_errors(fleet_text, model, extra, message, tmp_path):
    fleet = FLEET
    if fleet_text is not None:
        fleet = tmp_path / "fleet.yaml"
        fleet.write_text(fleet_text)
    (tmp_path / "bad.json").write_text('{"name": 1}')
    out = run("plan", "--model", model.format(tmp=tmp_path), "--fleet", str(fleet), *extra)
    assert out.returncode == 2, out.stderr
    assert message.format(tmp=tmp_path) in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_plan_table_and_json(tmp_path):
    out = run("plan", "--model", "llama-3-70b", "--fleet", FLEET, "--max-ppl-increase", "10")
    assert out.returncode == 0, out.stderr
    assert "optimal" in out.stdout and "GiB" in out.stdout and "TTFT" in out.stdout
    js = run("plan", "--model", "llama-3-70b", "--fleet", FLEET, "--max-ppl-increase", "10", "--json",
             "--out", str(tmp_path / "plan.json"), "--save-profile", str(tmp_path / "profile.json"))
    plan = json.loads(js.stdout)
    assert plan["status"] == "optimal" and plan["gap"] <= 0.001
    assert plan["stages"][0]["first"] == 0 and plan["stages"][-1]["last"] == 80
    assert json.loads((tmp_path / "plan.json").read_text())["stages"] == plan["stages"]
    # the saved profile plans the same
    again = run("plan", "--model", str(tmp_path / "profile.json"), "--fleet", FLEET, "--max-ppl-increase", "10", "--json")
    assert json.loads(again.stdout)["objective"] == pytest.approx(plan["objective"])


def test_plan_from_gguf_uses_measured_sensitivity(reference_model, tmp_path):
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("network: {bandwidth: 1Gbit, latency: 1ms}\nnodes:\n"
                     "  - {name: a, memory: 30MiB, memory_bandwidth: 10GB/s, flops: 50GFLOPS}\n"
                     "  - {name: b, memory: 25MiB, memory_bandwidth: 5GB/s, flops: 20GFLOPS}\n")
    out = run("plan", "--model", str(reference_model), "--fleet", str(fleet), "--prompt-tokens", "64",
              "--output-tokens", "32", "--json", "--tokens", "1024")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["status"] == "optimal"
    assert plan["prediction"]["ppl_increase_pct"] <= 5.0


def test_info_shows_the_type_each_matrix_really_gets(smollm2, tmp_path):
    out = run("model", "shard", str(smollm2), "--types", "Q4_K", "--layers", "0:2", "-o", str(tmp_path / "s.gguf"))
    assert out.returncode == 0, out.stderr
    info = run("model", "info", str(tmp_path / "s.gguf"), "--json")
    data = json.loads(info.stdout)
    assert data["layer_types"] == ["Q4_K", "Q4_K"]
    # rows of 576 do not split into 256-blocks: llama.cpp's quantize gives those matrices Q5_0
    assert data["tensor_types"][0]["attn_q"] == "Q5_0" and data["tensor_types"][0]["ffn_down"] == "Q4_K"
    table = run("model", "info", str(tmp_path / "s.gguf"))
    assert "Q4_K×1, Q5_0×6" in table.stdout


def test_every_json_output_is_one_document(reference_model, tmp_path):
    """--json prints exactly one JSON document on stdout and nothing else, for every command
    that has it (HiGHS, llama.cpp and gguf write nothing there behind the CLI's back)."""
    for args in (["model", "info", str(reference_model), "--json"],
                 ["plan", "--model", "llama-3-70b", "--fleet", FLEET, "--max-ppl-increase", "10", "--json"],
                 ["plan", "--model", str(reference_model), "--fleet", FLEET, "--json", "--tokens", "1024"]):
        out = run(*args)
        assert out.returncode == 0, out.stderr
        json.loads(out.stdout)          # one document: trailing text would make this fail


def test_progress_without_a_terminal_is_lines_with_the_time_left(capsys, monkeypatch):
    from controller import cli as C

    clock = iter([0.0, 30.0, 31.0, 60.0])
    monkeypatch.setattr("time.monotonic", lambda: next(clock))
    progress = C.progress_lines(every_s=10)
    progress("sensitivity", 0, 90)      # starts: shown
    progress("sensitivity", 30, 90)     # 30 s later: shown, 30 done in 30 s -> 60 left
    progress("sensitivity", 31, 90)     # 1 s later: not shown
    progress("sensitivity", 90, 90)     # the end: shown
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["sensitivity: 0/90", "sensitivity: 30/90, about 60 s left", "sensitivity: 90/90"]


def test_an_infeasible_plan_is_written_as_strict_json(tmp_path):
    out = tmp_path / "plan.json"
    r = run("plan", "--model", "llama-3-70b", "--fleet", FLEET, "--max-ppl-increase", "1", "--out", str(out))
    assert r.returncode == 2
    d = json.loads(out.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in the plan JSON"))
    assert d["status"] == "infeasible" and d["objective"] is None and d["stages"] == []


def test_tables_are_readable_at_80_columns(reference_model):
    """A plan, a deployed plan and a sensitivity table in an 80-column terminal: nothing cut
    short (no "…"), no line wider than the terminal."""
    import json as _json

    from rich.console import Console

    from controller.cli import sensitivity_table
    from controller.planning import deployed_table, plan_table
    from controller.sensitivity import beside_model
    from solver.catalog import model_profile
    from solver.fast import solve
    from solver.plan import Stage, evaluate
    from solver.problem import Problem, load_fleet
    from solver.request import Options

    problem = Problem(model_profile("llama-3-70b"), load_fleet(FLEET), options=Options(max_ppl_increase=10))
    plan = solve(problem)
    mixed = ("Q4_K", "Q4_0", "Q4_0", "Q2_K", "Q3_K", "Q4_K", "Q4_0", "Q2_K") * 10
    stages = (Stage("orin", 0, 40, mixed[:40]), Stage("desk", 40, 80, mixed[40:]))
    mixed_plan = plan.__class__(stages, "feasible", 0.0, 0.0, 0.0, 0.0, "test", "", evaluate(problem, stages))
    table = _json.loads(beside_model(reference_model).read_text())
    for t in (plan_table(problem, plan), deployed_table(mixed_plan, "deployment x: 2 stages", unit="MiB"),
              sensitivity_table(table)):
        c = Console(width=80, record=True)
        c.print(t)
        text = c.export_text()
        assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80, text


def test_the_status_table_wraps_a_long_type_mix_within_80_columns():
    """A node whose stage mixes several types (a plan may give one node three or four) shows
    them all, on more lines, in an 80-column terminal: nothing cut, nothing wider."""
    from rich.console import Console

    from controller.cli import status_table
    from proto import edgefleet_pb2 as pb

    mixes = ("", "Q2_K×2,Q4_0×2,Q6_K", "Q8_0×3,Q4_K_M×2,Q3_K_S×4,Q6_K", "Q4_0×2,Q2_K")
    st = pb.FleetStatus(active_deployment_id="01cc86cb2e36", model="/m/edgefleet-ref-f16.gguf")
    for i, types in enumerate(mixes):
        n = st.nodes.add()
        n.node.name, n.node.address, n.health = f"node{i}", "127.0.0.1:43881", "alive"
        n.node.memory_bytes, n.node.agent_bytes, n.memory_used_bytes = 9 << 20, 70 << 20, 7 << 20
        n.layers, n.layer_types = ("3-7" if types else ""), types
    term = Console(width=80, record=True)
    term.print(status_table(st))
    shown = term.export_text()
    assert "…" not in shown and max(map(len, shown.splitlines())) <= 80, shown
    flat = " ".join(shown.split())
    for t in ("Q2_K×2,", "Q4_0×2,", "Q8_0×3,", "Q4_K_M×2,", "Q3_K_S×4,", "Q6_K"):
        assert t in flat, t
