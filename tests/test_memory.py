"""The memory the agent admits a stage by (solver/memory.py, the solver's formula) covers what
the stage really takes: the process's resident memory after loading the shard and running a
full batch through it grows by at most that figure + 50 MB (llama.cpp's own structures, the
vocabulary, allocator slack)."""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import pytest

from agent.engine import footprint
from controller.shards import file_sha256, parse_types, write_shard

SLACK = 50 * 2**20

PROBE = r"""
import gc, json, sys, psutil
import numpy as np
import agent
from agent.engine import stage_settings
from agent.runtime import Stage, Step, init_llama
init_llama()
path, sessions, context, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
proc = psutil.Process()
gc.collect(); before = proc.memory_info().rss
st = Stage(path, stage_settings(sessions, context, batch, 1))     # as an agent makes it
n = min(batch, context)
step = (Step(0, 0, tokens=np.arange(n) % 100 + 1) if st.takes_tokens
        else Step(0, 0, hidden=np.ones((n, st.n_embd), np.float32)))
st.forward([step])
for s in range(1, sessions):   # every session holds cells
    st.forward([Step(s, 0, tokens=np.arange(4) + 1) if st.takes_tokens else Step(s, 0, hidden=np.ones((4, st.n_embd), np.float32))])
gc.collect(); after = proc.memory_info().rss
print(json.dumps({"delta": after - before}))
"""


def measured_delta(path, sessions, context, batch) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, str(path), str(sessions), str(context), str(batch)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["delta"]


@pytest.mark.parametrize("model,spec,first,last", [
    ("reference", "Q4_K", 0, 3), ("reference", "Q8_0", 3, 8), ("reference", "F16", 0, 8),
    ("smollm2", "Q8_0", 0, 10), ("smollm2", "Q4_0", 10, 20), ("smollm2", "Q8_0", 20, 30)])
def test_stage_memory_is_within_the_admission_formula(model, spec, first, last, tmp_path, request):
    master = request.getfixturevalue("reference_model" if model == "reference" else "smollm2")
    n_layer = 8 if model == "reference" else 30
    path = write_shard(master, tmp_path / "s.gguf", parse_types(spec, n_layer), first, last,
                       file_sha256(master)).path
    for sessions, context, batch in ((1, 512, 512), (4, 256, 64)):
        need, _, _ = footprint(path, sessions, context, batch)
        delta = measured_delta(path, sessions, context, batch)
        assert delta <= need.total + SLACK, (sessions, context, batch, delta, need)


@pytest.mark.parametrize("model,spec,first,last", [
    ("reference", "Q4_K", 0, 3), ("reference", "Q8_0", 3, 8), ("reference", "Q6_K", 0, 8),
    ("smollm2", "Q8_0", 0, 10), ("smollm2", "Q4_0", 10, 20), ("smollm2", "Q5_K", 20, 30),
    ("smollm2", "Q4_K", 0, 30), ("smollm2", "q4_k_m", 2, 12),
    ("smollm2_q4_k_m", "Q4_K_M", 0, 30), ("smollm2_q4_k_m", "0-7:Q4_K_M,8-19:Q4_0,20-29:Q5_0", 4, 24)])
def test_the_solver_and_the_agent_agree_on_a_stage_s_memory(model, spec, first, last, tmp_path, request):
    """The plan's memory figure for a stage (what the solver constrains) is the very figure the
    agent admits that stage's shard by, byte for byte, for several workloads: at a mix, and on
    a mixed master whose layers keep their bytes as stored."""
    from controller.planning import gguf_profile
    from solver.memory import batch_tokens
    from solver.plan import Stage, stage_memory
    from solver.problem import Fleet, Node, Problem, TypeSpeed, Workload

    master = request.getfixturevalue("reference_model" if model == "reference" else model)
    profile = gguf_profile(master, None)
    n = profile.n_layer
    types = parse_types(spec, n)
    path = write_shard(master, tmp_path / "s.gguf", types, first, last, file_sha256(master)).path
    node = Node("a", 1 << 40, {q: TypeSpeed(1e9, 1e9) for q in profile.types})
    for w in (Workload(256, 128, 8, 512), Workload(20, 3, 1, 30), Workload(512, 128, 4, 0)):
        problem = Problem(profile, Fleet((node,), ()), w)
        solver = stage_memory(problem, Stage("a", first, last, tuple(types[first:last])), first == 0, last == n)
        agent, _, _ = footprint(path, w.concurrency, w.ctx, batch_tokens(w.prompt_tokens, w.concurrency))
        assert solver == agent.total, (w, solver, agent)


def _buffers_mib(records) -> float:
    """The compute and output buffers llama.cpp's log says a context allocated, in MiB."""
    sizes = [float(m.group(1)) for r in records
             if (m := re.search(r"(?:compute|output) buffer size =\s*([\d.]+) MiB", r.getMessage()))]
    assert len(sizes) == 2, sizes
    return sum(sizes)


@pytest.mark.parametrize("first,last", [(20, 30), (10, 20)])
def test_the_formula_covers_llama_cpp_s_own_buffers_and_no_more(smollm2, first, last, tmp_path, caplog):
    """The compute figure of the formula covers the compute and output buffers llama.cpp
    allocates for an agent's stage (as its log reports them), by at most 2 MiB + 10 %: a
    stage with the head is not charged for rows of logits it never makes (an agent's stage
    makes one per session at most and tells llama.cpp so; unbounded, SmolLM2's head stage
    reserved ~100 MB for 512 of them)."""
    from agent.engine import stage_settings
    from agent.runtime import Stage

    path = write_shard(smollm2, tmp_path / "s.gguf", parse_types("Q8_0", 30), first, last, file_sha256(smollm2)).path
    caplog.set_level(logging.DEBUG, logger="llama.cpp")
    for sessions, context, batch in ((8, 576, 512), (64, 128, 512), (4, 256, 64), (1, 2048, 512)):
        caplog.clear()
        Stage(path, stage_settings(sessions, context, batch, 1)).close()
        llama = _buffers_mib(caplog.records)
        formula = footprint(path, sessions, context, batch)[0].compute / 2**20
        assert llama <= formula <= llama * 1.1 + 2, (sessions, context, batch, llama, formula)


def _anon_mib(pid: int) -> float:
    """The process's anonymous resident memory (what a cgroup's limit counts, beside the page cache)."""
    status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    return int(status["RssAnon"].split()[0]) / 1024


def test_an_agent_that_loads_a_stage_again_holds_no_more_than_the_first_time(smollm2, tmp_path):
    """A real agent loads SmolLM2's last 15 layers at Q8_0, unloads them and loads them again,
    twice: each load holds no more than the first, within 8 MiB. Before session 24 (gguf's
    reader's views of the vocabulary at every prepare, glibc's rising threshold for mapping
    a block: docs/fleet.md, Memory) the loads held 262, 268 and 276 MiB."""
    from controller.agents import AgentClient
    from controller.local import ServiceProcess

    shard = write_shard(smollm2, tmp_path / "s.gguf", parse_types("Q8_0", 30), 15, 30, file_sha256(smollm2))
    agent = ServiceProcess(["agent", "--controller", "", "--name", "n0", "--listen", "127.0.0.1:0", "--memory",
                            str(400 * 2**20), "--threads", "1", "--data-dir", str(tmp_path / "data"),
                            "--data-listen", "off"], tmp_path / "agent.log")
    try:
        with AgentClient(agent.address) as c:
            c.push_shard(shard.path, shard.sha256)
            loaded = []
            for name in ("d1", "d2", "d3"):
                c.prepare(name, shard.sha256, "", 8, 576, 512)
                c.activate(name)
                loaded.append(_anon_mib(agent.pid))
                c.unload(name)
        assert loaded[0] > 150, loaded        # the stage is there: 167 MiB by the formula
        assert max(loaded) - loaded[0] <= 8, loaded
    finally:
        agent.terminate()


def test_an_agent_reads_a_last_stage_s_layout_without_holding_its_vocabulary(smollm2, tmp_path):
    """The shard of SmolLM2's last stage carries its 49,152-token vocabulary. gguf's reader
    holds ~150 MiB of numpy views of it while open; the reader an agent opens shards with
    (agent/weights.py, layout_only) reads the same configuration and tensors and holds under
    8 MiB, and knows the vocabulary's length."""
    from agent import weights as W

    path = write_shard(smollm2, tmp_path / "s.gguf", parse_types("Q8_0", 30), 20, 30, file_sha256(smollm2)).path
    before = _anon_mib(os.getpid())
    layout = W.open_gguf(path, layout_only=True)
    held = _anon_mib(os.getpid()) - before
    full = W.open_gguf(path)
    assert held < 8, held
    assert W.read_config(layout) == W.read_config(full) and W.read_config(layout).n_vocab == 49152
    assert W.array_length(layout, "tokenizer.ggml.tokens") == W.array_length(full, "tokenizer.ggml.tokens") == 49152
    assert [(t.name, t.tensor_type, t.data_offset, t.n_bytes) for t in layout.tensors] == \
        [(t.name, t.tensor_type, t.data_offset, t.n_bytes) for t in full.tensors]
    assert layout.data_offset == full.data_offset
