"""Fuzzing the trust boundaries a stranger can reach (issue 17): the agents' Forward stream,
the same on their data plane, and the HTTP API. Whatever arrives, every step gets an answer (a token or an error
code that blames the request), every HTTP request a 2xx or 4xx, no thread dies, and a
normal request gives the right answer afterwards."""
from __future__ import annotations

import json
import queue
import threading
import time
from collections import Counter

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import dataplane
from agent.pipeline import LocalPipeline
from controller.agents import AgentClient, PipelineStream
from controller.generate import generate
from controller.local import deploy_chain, start_agent
from controller.shards import file_sha256, write_shard
from fleet import Fleet, cli
from proto import adapter as A
from proto import edgefleet_pb2 as pb
from proto import edgefleet_pb2_grpc as rpc
from proto.security import Security

TYPES = ["Q8_0"] * 4 + ["Q4_0"] * 4
RANGES = [(0, 4), (4, 8)]
PROMPT = [1, 50, 60, 70, 80]
DEPLOYMENT = "fuzz"
# codes that say "this request is wrong or cannot be served now", never "the agent broke"
CLIENT_CODES = {"INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED", "OUT_OF_RANGE"}
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def chain(reference_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    master = file_sha256(reference_model)
    shards = [write_shard(reference_model, d / f"s{i}.gguf", TYPES, a, b, master) for i, (a, b) in enumerate(RANGES)]
    whole = write_shard(reference_model, d / "whole.gguf", TYPES, 0, len(TYPES), master)
    agents = []
    try:
        for i in range(len(RANGES) + 1):
            agents.append(start_agent(f"f{i}", d))
        deploy_chain(agents[:-1], shards, DEPLOYMENT, 4, 128)
        deploy_chain(agents[-1:], [whole], DEPLOYMENT, 4, 128)     # one stage, which goes on by itself
        want = [o for o in LocalPipeline.from_files([s.path for s in shards]).generate(PROMPT, 12)]
        alone = list(LocalPipeline.from_files([whole.path]).generate(PROMPT, 12))
        yield agents, list(want), alone
    finally:
        for a in agents:
            a.terminate()


floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
tensors = st.builds(pb.Tensor, shape=st.lists(st.one_of(st.integers(0, 8), st.sampled_from([64, 576, 2 ** 16, 2 ** 32 - 1])),
                                               max_size=4),
                    dtype=st.sampled_from(["float32", "float16", "bfloat16", "int8", ""]),
                    data=st.one_of(st.binary(max_size=64), st.binary(min_size=256, max_size=512)))
steps = st.builds(
    pb.StageInput,
    session_id=st.one_of(st.sampled_from(["a", "b"]), st.text(max_size=4)),
    position=st.one_of(st.integers(0, 8), st.integers(0, 2 ** 32 - 1)),
    tokens=st.lists(st.one_of(st.integers(0, 600), st.integers(0, 2 ** 32 - 1)), max_size=5),
    hidden=st.one_of(st.none(), tensors),
    sampling=st.builds(pb.Sampling, temperature=floats, top_p=floats, seed=st.integers(0, 2 ** 64 - 1),
                       return_logits=st.booleans()),
    finish=st.booleans(), cancel=st.booleans(),
    deployment_id=st.sampled_from(["", DEPLOYMENT, "nope"]),
    continue_tokens=st.one_of(st.just(0), st.integers(0, 3), st.just(2 ** 32 - 1)))


def with_stop(m: pb.StageInput, stop: int | None) -> pb.StageInput:
    if stop is not None:
        m.stop_token = stop
    return m


steps = st.builds(with_stop, steps, st.one_of(st.none(), st.integers(0, 600), st.just(2 ** 32 - 1)))


def with_more(m: pb.StageInput, more: list[pb.StageInput]) -> pb.StageInput:
    m.more.extend(more)
    return m


# a message may carry further steps (StageInput.more), each answered as if sent alone
steps = st.one_of(steps, st.builds(with_more, steps, st.lists(steps, min_size=1, max_size=2)))


def each_step(messages: list[pb.StageInput]) -> list[pb.StageInput]:
    return [one for m in messages for one in A.unbatched(m)]


def exchange(messages: list[pb.StageInput], send, stream, close, errors, timeout_s: float = 20) -> list:
    """Send the steps with send() and read the answers in stream's messages on a thread until
    every step that is not a cancel had its answer (or the time ran out), then close(): what
    came back, StageOutputs or the error (of the types errors) that ended the stream before
    our close."""
    want = Counter((m.session_id, m.position) for m in each_step(messages) if not m.cancel)
    got: list = []
    done, closing = threading.Event(), threading.Event()

    def read():
        left = Counter(want)
        try:
            for message in stream:
                for out in A.unbatched(message):     # answers computed together come in one message
                    got.append(out)
                    left[(out.session_id, out.position)] -= 1
                if all(v <= 0 for v in left.values()):
                    break
        except errors as exc:
            if not closing.is_set():                # not the end our own close made
                got.append(exc)
        done.set()
    threading.Thread(target=read, daemon=True).start()
    for m in messages:
        send(m)
    if want:
        done.wait(timeout_s)
    closing.set()
    close()
    return got


def answers(address: str, messages: list[pb.StageInput]) -> list:
    """exchange() on one Forward stream."""
    q: queue.Queue = queue.Queue()
    with grpc.insecure_channel(address) as channel:
        call = rpc.AgentStub(channel).Forward(iter(q.get, None))
        return exchange(messages, q.put, call, lambda: (q.put(None), call.cancel()), grpc.RpcError)


def answers_on_the_data_plane(address: str, messages: list[pb.StageInput]) -> list:
    """exchange() on one connection to the agent's data plane (agent/dataplane.py)."""
    conn = dataplane.connect(address, Security())
    return exchange(messages, conn.send, conn.messages(pb.StageOutput), conn.close, (dataplane.DataError, OSError))


@FUZZ
@given(stage=st.integers(0, len(RANGES)), messages=st.lists(steps, max_size=5), data_plane=st.booleans())
def test_every_forward_step_is_answered_and_blames_only_itself(chain, stage, messages, data_plane):
    agents, _, _ = chain
    got = (answers_on_the_data_plane(agents[stage].info["data_address"], messages) if data_plane
           else answers(agents[stage].address, messages))
    errors = [g for g in got if isinstance(g, Exception)]
    assert not errors, errors[0]                     # the stream itself never breaks
    answered = Counter((g.session_id, g.position) for g in got)
    unanswered = Counter((m.session_id, m.position) for m in each_step(messages) if not m.cancel) - answered
    assert not unanswered, f"steps went unanswered: {dict(unanswered)}"
    for out in got:                                  # a malformed cancel may be answered too, with an error
        assert not out.error or out.error_code in CLIENT_CODES, (out.error_code, out.error)


def test_after_the_forward_fuzz_the_chain_serves_the_right_tokens(chain):
    agents, want, alone = chain
    assert all(a.alive() for a in agents)
    for first, tokens in ((agents[0], want), (agents[-1], alone)):
        pipe = PipelineStream(first.address)
        try:
            assert [o.token for o in generate(lambda: pipe, PROMPT, 12)] == tokens
        finally:
            pipe.close()
    deadline = time.monotonic() + 10      # every fuzzed stream has ended, so its sessions are gone
    while time.monotonic() < deadline and any(AgentClient(a.address).state().sessions for a in agents):
        time.sleep(0.2)
    assert [AgentClient(a.address).state().sessions for a in agents] == [0] * len(agents)


# ------------------------------------------------------------------ HTTP

MODEL = "edgefleet-ref-f16"


@pytest.fixture(scope="module")
def http(reference_model, tmp_path_factory):
    f = Fleet(tmp_path_factory.mktemp("fuzz-http"), (("x", "+12MiB"), ("y", "+12MiB")), extra=("--http", "127.0.0.1:0"))
    try:
        r = cli("deploy", str(reference_model), "--context", "128", "--concurrency", "4", "--prompt-tokens", "32",
                controller=f.controller.address)
        assert r.returncode == 0, r.stderr
        base = "http://" + f.controller.info["http"]
        first = httpx.post(base + "/v1/completions", timeout=60,
                           json={"model": MODEL, "prompt": "The function returns", "max_tokens": 6, "temperature": 0})
        assert first.status_code == 200
        yield f, base, first.json()["choices"][0]["text"]
    finally:
        f.stop()


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | floats | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                          max_size=3), max_leaves=6)
prompts = st.one_of(st.text(max_size=40), st.lists(st.integers(-5, 70000), max_size=8), json_values)
messages = st.one_of(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", ""]),
                                                     "content": st.one_of(st.text(max_size=30), json_values)}),
                              max_size=3), json_values)
common = {"model": st.one_of(st.just(MODEL), json_values),
          "max_tokens": st.one_of(st.integers(-2, 6), st.integers(2 ** 31, 2 ** 70), json_values),
          "temperature": st.one_of(floats, json_values), "top_p": st.one_of(floats, json_values),
          "seed": st.one_of(st.integers(-2 ** 65, 2 ** 65), json_values), "stop": st.one_of(st.text(max_size=4), json_values),
          "stream": st.booleans(), "n": st.one_of(st.integers(-1, 3), json_values)}
completion = st.fixed_dictionaries({"prompt": prompts}, optional=common)
chat = st.fixed_dictionaries({"messages": messages}, optional=common)


@FUZZ
@given(kind=st.sampled_from(["completions", "chat"]), completion_body=completion, chat_body=chat,
       raw=st.one_of(st.none(), st.binary(max_size=40)))
def test_every_http_body_gets_a_2xx_or_a_4xx(http, kind, completion_body, chat_body, raw):
    _, base, _ = http
    path = "/v1/completions" if kind == "completions" else "/v1/chat/completions"
    body = raw if raw is not None else json.dumps(completion_body if kind == "completions" else chat_body).encode()
    with httpx.stream("POST", base + path, content=body, headers={"Content-Type": "application/json"},
                      timeout=60) as r:
        text = r.read().decode("utf-8", "replace")
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, text[:300])
    if r.status_code >= 400:
        assert json.loads(text)["error"]["message"]


def test_after_the_http_fuzz_a_normal_request_is_answered_as_before(http):
    f, base, first = http
    r = httpx.post(base + "/v1/completions", timeout=60,
                   json={"model": MODEL, "prompt": "The function returns", "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == first
    assert all(a.alive() for a in f.agents.values()) and f.controller.alive()
