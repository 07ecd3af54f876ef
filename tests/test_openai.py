"""The OpenAI-compatible HTTP API and /metrics, with the official `openai` client against a
real local fleet (a controller with --http and three agents)."""
from __future__ import annotations

import json
import re
import threading
import time

import httpx
import numpy as np
import openai
import pytest

from agent.tokenizer import Tokenizer
from controller.chat import chat_tokens, render
from controller.requests import StopText
from controller.shards import write_shard
from fleet import Fleet, cli
from llama_ref import LlamaCpp

TOKEN = "fleet-secret"
MODEL = "edgefleet-ref-f16"
AGENTS = (("desk", "+9MiB"), ("laptop", "+8MiB"), ("mini", "+7MiB"))   # none holds the whole model
CONCURRENCY = 4
QUEUE = 46          # 4 running + 46 waiting = 50 requests admitted; the 51st gets 429


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, reference_model):
    # every message an agent sends waits 10 ms, as on a slow link: a request of 24 tokens
    # takes over a quarter of a second, so that 50 of them are in flight at once
    f = Fleet(tmp_path_factory.mktemp("http"), AGENTS, token=TOKEN,
              extra=("--http", "127.0.0.1:0", "--max-queue", str(QUEUE)), agent_extra=("--emulate-latency", "10ms"))
    try:
        r = cli("deploy", str(reference_model), "--context", "256", "--concurrency", str(CONCURRENCY),
                "--prompt-tokens", "32", "--token", TOKEN, controller=f.controller.address)
        assert r.returncode == 0, r.stderr
        f.http = "http://" + f.controller.info["http"]
        yield f
    finally:
        f.stop()


@pytest.fixture(scope="module")
def client(fleet):
    return openai.OpenAI(base_url=fleet.http + "/v1", api_key=TOKEN, max_retries=0, timeout=300)


def edgefleet_generate(fleet, prompt: str, n: int) -> str:
    r = cli("generate", prompt, "--max-tokens", str(n), "--token", TOKEN, controller=fleet.controller.address)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(prompt)
    return r.stdout[len(prompt):]


def metrics(fleet) -> dict[str, float]:
    text = httpx.get(fleet.http + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


# ---------------------------------------------------------------- pure parts

def test_stop_text_never_shows_any_part_of_a_stop_sequence():
    s = StopText(["END", "xy"])
    shown = []
    for ch in "abcEN":
        shown.append(s.feed(ch))
    assert "".join(t for t, _ in shown) == "abc" and not any(stop for _, stop in shown)   # "EN" is held back
    assert s.feed("Q") == ("ENQ", False)            # not a stop after all: released
    assert s.feed("ppxy tail") == ("pp", True)
    s = StopText([])
    assert s.feed("text") == ("text", False) and s.flush() == ""
    s = StopText(["STOP"])
    assert s.feed("ab ST") == ("ab ", False) and s.flush() == "ST"


def test_chat_uses_the_gguf_template_or_a_plain_transcript(reference_model):
    tok = Tokenizer(reference_model)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}]
    assert tok.chat_template is None
    assert render(None, msgs, "<s>", "</s>") == "System: Be brief.\nUser: What is a list?\nAssistant:"
    assert chat_tokens(tok, msgs) == tok.encode("System: Be brief.\nUser: What is a list?\nAssistant:")
    chatml = ("{% for m in messages %}<s>{{ m.role }}\n{{ m.content }}</s>\n{% endfor %}"
              "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    text = render(chatml, msgs, "<s>", "</s>")
    assert text.startswith("<s>system\nBe brief.</s>\n") and text.endswith("<s>assistant\n")
    tok.chat_template = chatml
    ids = chat_tokens(tok, msgs)
    assert ids[0] == tok.bos and ids.count(tok.bos) == 3 and ids.count(tok.eos) == 2   # parsed as control tokens


# ---------------------------------------------------------------- the API on a fleet

def test_models_lists_the_deployed_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_equals_edgefleet_generate(fleet, client):
    want = edgefleet_generate(fleet, "The function returns", 16)
    r = client.completions.create(model=MODEL, prompt="The function returns", max_tokens=16, temperature=0)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 16 and r.usage.prompt_tokens == len(Tokenizer(
        "models/reference/edgefleet-ref-f16.gguf").encode("The function returns"))
    chunks = list(client.completions.create(model=MODEL, prompt="The function returns", max_tokens=16,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"


def test_chat_equals_edgefleet_generate_on_the_rendered_prompt(fleet, client):
    msgs = [{"role": "user", "content": "How do I open a file?"}]
    want = edgefleet_generate(fleet, render(None, msgs, "<s>", "</s>"), 12)
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    stream = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-2].choices[0].finish_reason == "length"


def test_stop_sequence_ends_the_text_before_it(client):
    full = client.completions.create(model=MODEL, prompt="The function returns", max_tokens=24, temperature=0)
    text = full.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip(), f"pick another prompt: {text!r}"
    r = client.completions.create(model=MODEL, prompt="The function returns", max_tokens=24, temperature=0, stop=stop)
    assert r.choices[0].text == text[:text.index(stop)] and r.choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats_and_differs_from_greedy(client):
    kw = dict(model=MODEL, prompt="The function returns", max_tokens=16, temperature=1.0, top_p=0.95)
    a = client.completions.create(seed=7, **kw).choices[0].text
    assert client.completions.create(seed=7, **kw).choices[0].text == a
    assert client.completions.create(seed=8, **kw).choices[0].text != a


def test_errors_have_openai_shape_and_status(fleet, client):
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=fleet.http + "/v1", api_key="wrong", max_retries=0).models.list()
    assert e.value.status_code == 401 and "Bearer key" in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="llama-70b", prompt="hi", max_tokens=2)
    assert e.value.code == "model_not_found" and MODEL in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="word " * 300, max_tokens=8)
    assert e.value.code == "context_length_exceeded" and "256 tokens" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2, temperature=5)
    assert "temperature" in e.value.message
    r = httpx.post(fleet.http + "/v1/chat/completions", content=b'{"model": "x", "messages": [',
                   headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert r.status_code == 400 and "not a valid JSON object" in r.json()["error"]["message"]
    r = httpx.post(fleet.http + "/v1/chat/completions", json={"model": MODEL, "messages": []},
                   headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert httpx.get(fleet.http + "/metrics").status_code == 401
    r = httpx.post(fleet.http + "/v1/completions", content=b"{bad", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401                     # the key is checked before the body
    # nothing above hurt the controller
    assert fleet.controller.alive() and [m.id for m in client.models.list().data] == [MODEL]


def test_client_errors_are_400_and_nothing_else_changes(fleet):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    bad = [{"prompt": [1, 2, 10 ** 6]}, {"prompt": [1, -5]},                 # token ids outside the vocabulary
           {"prompt": "hi", "seed": -1}, {"prompt": "hi", "seed": 2 ** 70}]   # seeds the wire cannot carry
    bodies = [json.dumps({"model": MODEL, "max_tokens": 2, **extra}).encode() for extra in bad]
    # a lone surrogate, escaped as JSON allows (no client library would encode it)
    bodies.append(b'{"model": "%s", "max_tokens": 2, "prompt": "a\\ud800b"}' % MODEL.encode())
    for body in bodies:
        r = httpx.post(fleet.http + "/v1/completions", headers={**headers, "Content-Type": "application/json"},
                       content=body, timeout=60)
        assert r.status_code == 400, (body, r.status_code, r.text)
        assert r.json()["error"]["message"]
    # a body over the controller's --max-body (4 MiB by default) is refused before it is read
    r = httpx.post(fleet.http + "/v1/completions", headers={**headers, "Content-Type": "application/json"},
                   content=b'{"model": "x", "prompt": "' + b"a" * (5 * 2 ** 20) + b'"}', timeout=60)
    assert r.status_code == 413 and "--max-body" in r.json()["error"]["message"]

    def chunked(body: bytes, size: int = 2 ** 16):      # sent without a Content-Length
        yield from (body[i:i + size] for i in range(0, len(body), size))
    r = httpx.post(fleet.http + "/v1/completions", headers={**headers, "Content-Type": "application/json"},
                   content=chunked(b'{"model": "x", "prompt": "' + b"a" * (5 * 2 ** 20) + b'"}'), timeout=60)
    assert r.status_code == 413 and "--max-body" in r.json()["error"]["message"]
    small = json.dumps({"model": MODEL, "prompt": "The function returns", "max_tokens": 4, "temperature": 0})
    r = httpx.post(fleet.http + "/v1/completions", headers={**headers, "Content-Type": "application/json"},
                   content=chunked(small.encode(), 7), timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_a_huge_prompt_is_tokenized_without_stalling_other_clients(fleet):
    # 3.2 MB of text (under the 4 MiB body limit) takes seconds to tokenize (1.6 MB took 1.0 s
    # on session 31's machine); it happens on a worker thread, so /v1/models keeps answering
    # meanwhile (it stalled ~25 s for 10 MB)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    answer: list[httpx.Response] = []
    big = threading.Thread(target=lambda: answer.append(httpx.post(
        fleet.http + "/v1/completions", headers=headers, timeout=300,
        json={"model": MODEL, "prompt": "the function returns " * 150_000, "max_tokens": 1})))
    t0 = time.monotonic()
    big.start()
    waits = []
    while big.is_alive() and time.monotonic() - t0 < 120:
        t = time.monotonic()
        assert httpx.get(fleet.http + "/v1/models", headers=headers, timeout=30).status_code == 200
        waits.append(time.monotonic() - t)
        time.sleep(0.1)
    big.join()
    took = time.monotonic() - t0
    assert answer[0].status_code == 400 and "context" in answer[0].json()["error"]["message"]
    assert len(waits) >= 5, (took, waits)     # it did take a while: five answers at least meanwhile
    assert max(waits) < 1.0, waits


def test_a_client_that_leaves_mid_stream_frees_its_session(fleet, client):
    stream = client.completions.create(model=MODEL, prompt="The function returns", max_tokens=200, temperature=0,
                                       stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    left = time.monotonic()
    # the controller notices the client left at its next token, cancels the session on every
    # stage and ends the request; both are observed by polling, within a deadline far below
    # the 300 s idle timeout that would otherwise free the session. The agents report their
    # sessions every second: only reports sent after the client left count (from 2.5 s on)
    def settled() -> bool:
        return (time.monotonic() - left > 2.5 and sum(n.sessions for n in fleet.status().nodes) == 0
                and metrics(fleet)["edgefleet_requests_in_flight"] == 0)

    deadline = left + 20
    while time.monotonic() < deadline and not settled():
        time.sleep(0.2)
    assert sum(n.sessions for n in fleet.status().nodes) == 0          # not left to the idle timeout
    assert metrics(fleet)["edgefleet_requests_in_flight"] == 0


# A near-tie of the reference's top two logits. Decode steps batched with other sessions
# differed from the reference by up to 2e-3 (measured when this check was written), but
# the engine also forms other batches (a prompt with other sessions' steps, or a decode of
# several sessions run one at a time, session 13), and a CI run of session 14 saw an answer
# leave the reference at a margin of 0.059. A mixed-up session leaves the reference at its first
# tokens, where the reference is sure: over these 50 prompts the median margin is 0.85 and
# 9.8 % of positions are within 0.1 (reference F16, 24 tokens each, measured in session 14).
NEAR_TIE = 0.1


def agrees_until_near_tie(tok, text: str, want: list[int], logits, what: str) -> None:
    """`text` is the reference's greedy tokens `want`, except that from a position where the
    reference's top two logits are within NEAR_TIE it may take the runner-up and go its own
    way."""
    for k in range(len(want)):
        if want[k] == tok.eos:
            return                                   # the answer ended here
        if not text.startswith(tok.decode(want[:k + 1])):
            top2 = np.sort(logits[k])[-2:]
            assert top2[1] - top2[0] <= NEAR_TIE, f"{what} left the reference at token {k}, margin {top2[1] - top2[0]:.3f}"
            second = int(np.argsort(logits[k])[-2])
            assert text.startswith(tok.decode(want[:k] + [second])), f"{what} took neither of the top two at token {k}"
            return


def test_fifty_concurrent_streams_complete_and_metrics_count_them(fleet, reference_model, tmp_path):
    before = metrics(fleet)
    n, max_tokens = 50, 24
    results: dict[int, tuple[str, int, str | None]] = {}
    errors: list[BaseException] = []
    prompts = [f"The module {i} returns" for i in range(n)]

    def run(i: int) -> None:
        try:
            c = openai.OpenAI(base_url=fleet.http + "/v1", api_key=TOKEN, max_retries=0, timeout=600)
            chunks = list(c.completions.create(model=MODEL, prompt=prompts[i], max_tokens=max_tokens, temperature=0,
                                               stream=True, stream_options={"include_usage": True}))
            text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
            reason = [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1]
            results[i] = (text, chunks[-1].usage.completion_tokens, reason)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    # all 50 admitted (4 running, 46 queued): one more is refused with 429, and nothing else changes
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and metrics(fleet)["edgefleet_requests_in_flight"] < n:
        time.sleep(0.05)
    assert metrics(fleet)["edgefleet_requests_in_flight"] == n
    with pytest.raises(openai.RateLimitError) as e:
        openai.OpenAI(base_url=fleet.http + "/v1", api_key=TOKEN, max_retries=0).completions.create(
            model=MODEL, prompt="one too many", max_tokens=4)
    assert e.value.code == "fleet_queue_full"
    for t in threads:
        t.join(600)
    assert not errors, errors[:3]
    assert sorted(results) == list(range(n))                    # no request lost
    tokens = sum(k for _, k, _ in results.values())
    # spot-check three answers against llama.cpp's greedy run of the same prompt on a GGUF of
    # the deployed types. A session mixed up with another differs from its first tokens, where
    # the reference is sure. A step batched with other sessions runs llama.cpp's batched
    # kernels, whose sums differ in the last bits (NEAR_TIE), and the reference model's top-2
    # logits are often that close: so an answer may leave the reference only at a near-tie,
    # to its runner-up, after which anything may follow.
    plan = json.loads(fleet.status().plan_json)
    tok = Tokenizer(str(reference_model))
    ref = LlamaCpp(write_shard(reference_model, tmp_path / "whole.gguf",
                               [q for s in plan["stages"] for q in s["types"]]).path, logits_all=False)
    alone_tokens = 0
    try:
        for i in (0, 17, 49):
            want, logits = ref.greedy(tok.encode(prompts[i]), max_tokens)
            alone = httpx.post(fleet.http + "/v1/completions", timeout=300,
                               headers={"Authorization": f"Bearer {TOKEN}"},
                               json={"model": MODEL, "prompt": prompts[i], "max_tokens": max_tokens, "temperature": 0})
            alone_tokens += alone.json()["usage"]["completion_tokens"]
            for text in (results[i][0], alone.json()["choices"][0]["text"]):
                agrees_until_near_tie(tok, text, want, logits, f"request {i}")
    finally:
        ref.close()
    after = metrics(fleet)

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    finished = {r for _, _, r in results.values()}
    assert finished <= {"length", "stop"}
    served = delta('edgefleet_requests_total{api="openai",outcome="length"}') + \
        delta('edgefleet_requests_total{api="openai",outcome="stop"}')
    assert served == n + 3                                       # the 50 and the three spot checks
    assert delta('edgefleet_requests_total{api="openai",outcome="rejected"}') == 1
    assert delta("edgefleet_generated_tokens_total") == tokens + alone_tokens
    assert delta("edgefleet_time_to_first_token_seconds_count") == n + 3
    assert delta("edgefleet_time_per_output_token_seconds_count") == delta("edgefleet_generated_tokens_total") - n - 3
    stage_counts = {k.split("{")[1]: v for k, v in after.items()
                    if re.match(r'edgefleet_stage_compute_seconds_count\{node=', k)}
    assert len(stage_counts) >= 2 and all(v > 0 for v in stage_counts.values())
    # every step reports the batch it ran in: as many observations as steps, each of at least 1,
    # and the concurrent requests were computed together somewhere
    batches = {node: (after[f"edgefleet_stage_batch_size_sum{{{node}"], after[f"edgefleet_stage_batch_size_count{{{node}"])
               for node in stage_counts}
    assert all(count == stage_counts[node] and total >= count for node, (total, count) in batches.items())
    assert max(total / count for total, count in batches.values()) > 1
    assert after["edgefleet_requests_in_flight"] == 0
    assert after['edgefleet_deploys_total{reason="deploy",result="ok"}'] == 1
    assert all(after[f'edgefleet_node_up{{node="{name}"}}'] == 1 for name, _ in AGENTS)


def test_health_and_the_fleet_page(fleet, client):
    r = httpx.get(fleet.http + "/health", timeout=30)            # no key needed: a probe
    assert r.status_code == 200 and r.json()["status"] == "ok"
    page = httpx.get(fleet.http + "/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<table id=\"nodes\">" in page.text and "/api/fleet" in page.text
    assert httpx.get(fleet.http + "/api/fleet", timeout=30).status_code == 401      # the data needs the key
    before = httpx.get(fleet.http + "/api/fleet", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).json()
    done = client.completions.create(model=MODEL, prompt="hi", max_tokens=5, temperature=0)
    f = httpx.get(fleet.http + "/api/fleet", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).json()
    assert f["generated_tokens"] - before["generated_tokens"] == done.usage.completion_tokens > 0
    assert f["time"] > before["time"]
    st = fleet.status()
    assert f["deployment"]["id"] == st.active_deployment_id and f["deployment"]["model"] == MODEL + ".gguf"
    assert f["deployment"]["concurrency"] == CONCURRENCY and f["deployment"]["context"] == 256
    by_name = {n["name"]: n for n in f["nodes"]}
    assert set(by_name) == {name for name, _ in AGENTS}
    for n in st.nodes:      # the page shows what `edgefleet status` shows
        assert by_name[n.node.name]["health"] == n.health and by_name[n.node.name]["layers"] == n.layers
        assert by_name[n.node.name]["types"] == n.layer_types
        assert by_name[n.node.name]["memory_offered_bytes"] == n.node.memory_bytes
    assert json.loads(json.dumps(f, allow_nan=False)) == f


def test_no_deployment_is_503(fleet, client):
    r = cli("undeploy", "--token", TOKEN, controller=fleet.controller.address)
    assert r.returncode == 0, r.stderr
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert e.value.status_code == 503 and "edgefleet deploy" in e.value.message
    assert client.models.list().data == []
    r = httpx.get(fleet.http + "/health", timeout=30)
    assert r.status_code == 503 and r.json() == {"status": "unavailable", "reason": "no deployment is active"}
