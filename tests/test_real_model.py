"""SmolLM2-135M-Instruct as users have it, on a live fleet: the Q4_1 file its package ships,
and the Q8_0 and mixed Q4_K_M files llama.cpp's quantizer makes, are masters through plan ->
deploy -> generate. The fleet's greedy tokens equal llama-cpp-python's on one GGUF of the
deployed types, and a chat completion over HTTP equals llama-cpp-python's
create_chat_completion."""
from __future__ import annotations

import json
import re

import openai
import pytest

from agent.runtime import whole_model
from controller.shards import write_shard
from fleet import Fleet, cli
from llama_ref import BATCH, CTX, THREADS, LlamaCpp

# memory per agent: none holds the Q4_1 model alone with this workload (122 MB as one stage)
AGENTS = {"Q4_1": (("big", "+100MiB"), ("mid", "+90MiB"), ("small", "+80MiB")),
          "Q8_0": (("big", "+140MiB"), ("mid", "+120MiB"), ("small", "+100MiB")),
          "Q4_K_M": (("big", "+100MiB"), ("mid", "+90MiB"), ("small", "+80MiB"))}
# the types a plan may use, named as users type them: the master's own (q4_k_m: llama.cpp's mix,
# which the master's layers keep as they are) and a smaller one (on the K-quant master the
# mix Q3_K_M: Q4_0 there turns the answer into noise even within the budget)
TYPES = {"Q4_1": "q4_1,q4_0", "Q8_0": "q8_0,q4_0", "Q4_K_M": "q4_k_m,q3_k_m"}
# one request of up to 512 tokens (the reference's context), sensitivity of those types over
# one 512-token window (a real table, measured in about a minute), and a 2 % budget: a 135M
# model's answers are fragile, 5 % already turns some into noise
WORKLOAD = ("--concurrency", "1", "--context", str(CTX), "--prompt-tokens", "64", "--tokens", "512",
            "--max-ppl-increase", "2")
PROMPT = "The capital of France is"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module", params=["Q4_1", "Q8_0", "Q4_K_M"])
def deployed(request, tmp_path_factory):
    from models import smollm2

    kind = request.param
    master = smollm2.path(kind)
    f = Fleet(tmp_path_factory.mktemp(f"smollm2-{kind}"), AGENTS[kind], extra=("--http", "127.0.0.1:0"))
    try:
        types = ("--types", TYPES[kind])
        r = cli("plan", "--model", str(master), "--json", *types, *WORKLOAD, controller=f.controller.address)
        assert r.returncode == 0, r.stderr
        planned = json.loads(r.stdout)
        r = cli("deploy", str(master), *types, *WORKLOAD, controller=f.controller.address)
        assert r.returncode == 0, r.stderr
        plan = json.loads(f.status().plan_json)
        assert plan["stages"] == planned["stages"]
        yield kind, master, plan, f
    finally:
        f.stop()


def whole_gguf(master, plan, tmp_path):
    """The model with the deployed plan's types, as one GGUF for llama-cpp-python."""
    types = [q for s in plan["stages"] for q in s["types"]]
    return write_shard(master, tmp_path / "whole.gguf", types).path


def test_a_quantized_master_plans_within_its_own_precision(deployed):
    kind, _, plan, _ = deployed
    types = {q for s in plan["stages"] for q in s["types"]}
    assert types <= set(TYPES[kind].upper().split(","))   # a Q4_1 layer never becomes Q8_0
    assert kind != "Q4_K_M" or kind in types               # mixed layers kept as they are (2 %: not all Q3_K_M)
    assert plan["prediction"]["ppl_increase_pct"] <= 2.0 + 1e-9


def test_the_fleet_generates_what_llama_cpp_does_on_the_same_types(deployed, tmp_path):
    kind, master, plan, f = deployed
    r = cli("generate", PROMPT, "--max-tokens", "24", "--tokens", controller=f.controller.address)
    assert r.returncode == 0, r.stderr
    got = [int(x) for x in r.stdout.split()]
    from agent.tokenizer import Tokenizer

    tok = Tokenizer(master)
    ref = LlamaCpp(whole_gguf(master, plan, tmp_path), logits_all=False)
    try:
        want, _ = ref.greedy(tok.encode(PROMPT), 24)
    finally:
        ref.close()
    stop = want.index(tok.eos) + 1 if tok.eos in want else len(want)
    assert got == want[:stop]
    assert "Paris" in tok.decode(got)                      # a real answer, not noise


def test_a_chat_completion_is_llama_cpp_python_s(deployed, tmp_path):
    kind, master, plan, f = deployed
    client = openai.OpenAI(base_url="http://" + f.controller.info["http"] + "/v1", api_key="x", max_retries=0,
                           timeout=300)
    ours = client.chat.completions.create(model=master.stem, messages=QUESTION, max_tokens=32, temperature=0)
    llm = whole_model(whole_gguf(master, plan, tmp_path), n_ctx=CTX, n_batch=BATCH, n_ubatch=BATCH,
                      n_threads=THREADS, n_threads_batch=THREADS, flash_attn=True, verbose=False)
    try:
        theirs = llm.create_chat_completion(QUESTION, max_tokens=32, temperature=0)
    finally:
        llm.close()
    assert ours.choices[0].message.content == theirs["choices"][0]["message"]["content"]


def test_the_demo_answers_as_llama_cpp_python_does_on_the_same_types(tmp_path):
    """`make demo`: SmolLM2 across at least three agents, a readable answer, and the answer is
    llama-cpp-python's on one GGUF of the plan's per-layer types."""
    import subprocess
    import sys

    from controller.demo import QUESTION as DEMO_QUESTION
    from controller.state import State
    from models import smollm2

    keep = tmp_path / "demo"
    out = subprocess.run([sys.executable, "-m", "controller.cli", "demo", "--keep", str(keep)], capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()        # the question, the answer, then "N tokens: first after ..."
    start = lines.index(DEMO_QUESTION) + 1
    end = next(i for i in range(start, len(lines)) if re.match(r"\d+ tokens: first after", lines[i]))
    answer = "\n".join(lines[start:end])
    state = State(keep / "edgefleet.db")
    try:
        dep = state.active()
    finally:
        state.close()
    assert len(dep.stages) >= 3
    master = smollm2.path("Q4_1")
    whole = write_shard(master, tmp_path / "whole.gguf", list(dep.types)).path
    llm = whole_model(whole, n_ctx=CTX, n_batch=BATCH, n_ubatch=BATCH, n_threads=THREADS,
                      n_threads_batch=THREADS, flash_attn=True, verbose=False)
    try:
        theirs = llm.create_chat_completion([{"role": "user", "content": DEMO_QUESTION}], max_tokens=48,
                                            temperature=0)["choices"][0]["message"]["content"]
    finally:
        llm.close()
    assert answer == theirs
    # readable, and about the question: the plan follows timings measured on the spot, so its
    # types (and the wording) vary from run to run; every plan tried names the play or its author
    assert "Shakespeare" in answer or "Romeo" in answer
