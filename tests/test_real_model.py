"""SmolLM2-135M-Instruct as users have it, on a live fleet: the Q4_1 file its package ships
and the Q8_0 file llama.cpp's quantizer makes are masters through plan -> deploy -> generate.
The fleet's greedy tokens equal llama-cpp-python's on one GGUF of the deployed types, and a
chat completion over HTTP equals llama-cpp-python's create_chat_completion."""
from __future__ import annotations

import json

import openai
import pytest

from controller.shards import write_shard
from fleet import Fleet, cli
from llama_ref import BATCH, CTX, THREADS, LlamaCpp

# memory per agent: none holds the Q4_1 model alone with this workload (122 MB as one stage)
AGENTS = {"Q4_1": (("big", "100MiB"), ("mid", "90MiB"), ("small", "80MiB")),
          "Q8_0": (("big", "140MiB"), ("mid", "120MiB"), ("small", "100MiB"))}
# one request of up to 512 tokens (the reference's context), sensitivity of the master's own
# type and Q4_0 over one 512-token window (a real table, measured in about a minute), and a
# 2 % budget: a 135M model's answers are fragile, 5 % already turns some into noise
WORKLOAD = ("--concurrency", "1", "--context", str(CTX), "--prompt-tokens", "64", "--tokens", "512",
            "--max-ppl-increase", "2")
PROMPT = "The capital of France is"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module", params=["Q4_1", "Q8_0"])
def deployed(request, tmp_path_factory):
    from models import smollm2

    kind = request.param
    master = smollm2.path(kind)
    f = Fleet(tmp_path_factory.mktemp(f"smollm2-{kind}"), AGENTS[kind], extra=("--http", "127.0.0.1:0"))
    try:
        types = ("--types", f"{kind},Q4_0")
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
    assert types <= {kind, "Q4_0"}                         # a Q4_1 layer never becomes Q8_0
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
    import llama_cpp

    kind, master, plan, f = deployed
    client = openai.OpenAI(base_url="http://" + f.controller.info["http"] + "/v1", api_key="x", max_retries=0,
                           timeout=300)
    ours = client.chat.completions.create(model=master.stem, messages=QUESTION, max_tokens=32, temperature=0)
    llm = llama_cpp.Llama(str(whole_gguf(master, plan, tmp_path)), n_ctx=CTX, n_batch=BATCH, n_ubatch=BATCH,
                          n_threads=THREADS, n_threads_batch=THREADS, flash_attn=True, verbose=False)
    try:
        theirs = llm.create_chat_completion(QUESTION, max_tokens=32, temperature=0)
    finally:
        llm.close()
    assert ours.choices[0].message.content == theirs["choices"][0]["message"]["content"]
