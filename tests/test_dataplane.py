"""The data plane between agents (agent/dataplane.py), with real agent processes: steps go on
it between agents that have one, by gRPC to an agent that has none, and it refuses what its
checks refuse without harm to the agent."""
from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time

import pytest

from agent import dataplane
from agent.pipeline import LocalPipeline
from controller.agents import AgentClient, AgentError, PipelineStream
from controller.generate import generate
from controller.local import deploy_chain, start_agent
from controller.shards import file_sha256, write_shard
from proto import adapter as A
from proto import edgefleet_pb2 as pb
from proto.security import MAX_MESSAGE_BYTES, Security

TYPES = ["Q8_0"] * 8
RANGES = [(0, 3), (3, 6), (6, 8)]
PROMPT = [1, 50, 60, 70, 80]


@pytest.fixture(scope="module")
def shards(reference_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    master = file_sha256(reference_model)
    return [write_shard(reference_model, d / f"stage{i}.gguf", TYPES, a, b, master) for i, (a, b) in enumerate(RANGES)]


def test_steps_go_on_the_data_plane_and_by_grpc_to_an_agent_without_one(tmp_path, shards):
    """a0 and a2 have a data plane, a1 has none (--data-listen off): a0 reaches a1 by gRPC, a1
    reaches a2 and a2 goes round to a0 on the data plane; the tokens are one process's, sent
    step by step from here and going round alike."""
    agents = [start_agent("a0", tmp_path), start_agent("a1", tmp_path, extra=("--data-listen", "off")),
              start_agent("a2", tmp_path)]
    try:
        assert agents[0].info["data_address"] and agents[2].info["data_address"]
        assert agents[1].info["data_address"] == ""
        with AgentClient(agents[1].address) as c:
            assert c.state().node.data_address == ""
        with AgentClient(agents[2].address) as c:
            assert c.state().node.data_address == agents[2].info["data_address"]
        deploy_chain(agents, shards, "d1", 4, 256)
        want = list(LocalPipeline.from_files([s.path for s in shards]).generate(PROMPT, 16))
        for last in ("", agents[2].address):        # answers up the chain; then going round
            pipe = PipelineStream(agents[0].address, last=last)
            try:
                outs = list(generate(lambda: pipe, PROMPT, 16))
            finally:
                pipe.close()
            assert [o.token for o in outs] == want
            assert all([t.node for t in o.stage_times] == ["a0", "a1", "a2"] for o in outs)
        logs = [a.log_tail(20000) for a in agents]
        assert f"steps to the stage at {agents[1].address} go by gRPC" in logs[0]
        assert f"steps to the stage at {agents[2].address} go on its data plane" in logs[1]
        assert f"steps to the stage at {agents[0].address} go on its data plane" in logs[2]   # the way round
        assert "a collector opened on the data plane" in logs[2]      # the answers to this process, too
    finally:
        for a in agents:
            a.terminate()


def _raw(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def _frame(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


def _closed(sock: socket.socket) -> bool:
    """Whether the peer closes the connection (after whatever it answers)."""
    try:
        while sock.recv(65536):
            pass
        return True
    except (ConnectionResetError, socket.timeout):
        return False


def test_the_data_plane_refuses_a_wrong_token_a_stranger_and_bad_frames_and_goes_on_serving(tmp_path):
    agent = start_agent("locked", tmp_path, token="s3cret")
    data = agent.info["data_address"]
    try:
        for token in ("", "wrong"):
            with pytest.raises(dataplane.DataError) as e:
                dataplane.connect(data, Security(token))
            assert "token" in str(e.value)
        with _raw(data) as s:                                   # not our protocol at all
            s.sendall(b"GET / HTTP/1.1\r\n\r\n")
            assert _closed(s)
        with _raw(data) as s:                                   # another version: told why, then closed
            s.sendall(_frame(b"edgefleet-data/2 forward s3cret"))
            reply = s.recv(4096)
            assert b"speaks edgefleet-data/1" in reply and _closed(s)
        conn = dataplane.connect(data, Security("s3cret"))      # past the checks, then a frame too large
        conn.sock.sendall(struct.pack("!I", MAX_MESSAGE_BYTES + 1))
        with pytest.raises(dataplane.DataError):
            list(conn.messages(pb.StageOutput))
        conn.close()
        conn = dataplane.connect(data, Security("s3cret"))      # a frame that is no StageInput
        conn.send_bytes(b"\xff\xff\xff\xff")
        with pytest.raises(dataplane.DataError):
            list(conn.messages(pb.StageOutput))
        conn.close()
        conn = dataplane.connect(data, Security("s3cret"))      # a step for no deployment: answered, stream goes on
        conn.send(A.step_pb(A.StepIn("s", 0, tokens=(1,), deployment_id="nope")))
        conn.send(A.step_pb(A.StepIn("t", 0, tokens=(1,), deployment_id="nope")))
        conn.send_end()
        outs = [A.step_out(x) for m in conn.messages(pb.StageOutput) for x in A.unbatched(m)]
        conn.close()
        assert sorted(o.session_id for o in outs) == ["s", "t"]
        assert all(o.error and o.error_code for o in outs)
        for cid, why in (("", "an id of 1 to 128"), ("c" * 129, "an id of 1 to 128"), ("c1", "already open")):
            first = None
            if why == "already open":                       # the same id twice: the second is refused
                first = dataplane.connect(data, Security("s3cret"), dataplane.COLLECT)
                first.send(pb.CollectRequest(collector_id=cid))
                assert first.receive() == b"ok"
            conn = dataplane.connect(data, Security("s3cret"), dataplane.COLLECT)
            conn.send(pb.CollectRequest(collector_id=cid))
            assert why in conn.receive().decode()
            conn.close()
            if first is not None:
                first.close()
        echo = dataplane.connect(data, Security("s3cret"), dataplane.ECHO)
        echo.send_bytes(b"x" * 2304)
        assert echo.receive() == b"x" * 2304
        echo.send_end()
        assert echo.receive() is None
        echo.close()
        with AgentClient(agent.address, Security("s3cret")) as c:
            assert c.state().node.name == "locked"
    finally:
        agent.terminate()


def test_prompts_through_the_writer_and_steps_sent_at_once_keep_each_session_right(tmp_path, shards):
    """A prompt's hidden states (80 x 256 floats, over DIRECT_BYTES) leave through the writer
    thread, decode steps from the compute thread; with four sessions at once, long prompts and
    short, each gets one process's tokens."""
    agents = [start_agent(f"w{i}", tmp_path) for i in range(3)]
    prompts = [[1] + list(range(100, 179)), [1, 7, 300, 41], [1] + list(range(500, 579)), [1, 2000]]
    reference = LocalPipeline.from_files([s.path for s in shards])
    want = [list(reference.generate(p, 12)) for p in prompts]
    try:
        deploy_chain(agents, shards, "d1", 4, 256)
        pipe = PipelineStream(agents[0].address, last=agents[2].address)
        got: dict[int, list[int]] = {}
        errors: list[BaseException] = []

        def run(i: int) -> None:
            try:
                got[i] = [o.token for o in generate(lambda: pipe, prompts[i], 12)]
            except BaseException as exc:    # reported below, not lost in the thread
                errors.append(exc)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        pipe.close()
        assert not errors, errors[0]
        assert [got.get(i) for i in range(len(prompts))] == want
    finally:
        for a in agents:
            a.terminate()


def test_a_pipeline_stream_is_made_at_once_while_its_last_agent_does_not_answer(tmp_path):
    """The collector opens on a thread of its own: with the last agent frozen (SIGSTOP), a
    stream is still made at once (the lookup of its data plane would wait 10 s), and closing
    it ends the collector's thread without waiting for the frozen agent either."""
    agents = [start_agent("f0", tmp_path), start_agent("f1", tmp_path)]
    try:
        os.kill(agents[1].pid, signal.SIGSTOP)
        t = time.monotonic()
        pipe = PipelineStream(agents[0].address, last=agents[1].address)
        made = time.monotonic() - t
        pipe.close()
        closed = time.monotonic() - t
        assert made < 5.0 and closed < 5.0, (made, closed)
        assert _ends_soon("pipeline-collect")
    finally:
        os.kill(agents[1].pid, signal.SIGCONT)
        for a in agents:
            a.terminate()


def test_a_stream_whose_first_agent_dies_ends_its_collector_on_the_last_agent(tmp_path):
    """The stream breaks on its Forward side (the first agent is killed), and nobody calls
    close(): the collector on the last agent's data plane ends too, and so does its thread
    here; a step sent on the broken stream fails at once."""
    agents = [start_agent("k0", tmp_path), start_agent("k1", tmp_path)]
    try:
        pipe = PipelineStream(agents[0].address, last=agents[1].address)
        assert _logged(agents[1], "a collector opened on the data plane")
        agents[0].kill()
        assert _logged(agents[1], "a collector closed on the data plane")
        assert _ends_soon("pipeline-collect") and _ends_soon("pipeline-read")
        with pytest.raises(AgentError):
            pipe.send(A.StepIn("s", 0, tokens=(1, 2)))
        pipe.close()
    finally:
        for a in agents:
            a.terminate()


def _logged(agent, text: str, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if text in agent.log_tail(20000):
            return True
        time.sleep(0.05)
    return False


def _ends_soon(name: str, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not any(t.name == name and t.is_alive() for t in threading.enumerate()):
            return True
        time.sleep(0.05)
    return False
