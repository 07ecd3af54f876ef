"""The generated gRPC code is current with proto/edgefleet.proto and importable."""
from __future__ import annotations

from pathlib import Path

from proto.generate import generate

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_current(tmp_path):
    for fresh in generate(tmp_path):
        committed = ROOT / "proto" / fresh.name
        assert committed.read_text() == fresh.read_text(), (
            f"{committed} is out of date with edgefleet.proto; run `make proto` and commit the result")


def test_generated_code_imports():
    from proto import edgefleet_pb2, edgefleet_pb2_grpc

    chunk = edgefleet_pb2.ShardChunk(sha256="ab", total_bytes=3, data=b"xyz")
    assert edgefleet_pb2.ShardChunk.FromString(chunk.SerializeToString()).data == b"xyz"
    assert hasattr(edgefleet_pb2_grpc, "AgentStub")


def test_a_placement_request_crosses_the_wire_whole():
    from proto import adapter as A
    from solver.request import Options, PlacementRequest, Workload

    r = PlacementRequest("/m/model.gguf", Workload(100, 20, 3, 0),
                         Options(objective="throughput", max_ppl_increase=0.0, types=("Q8_0", "Q4_K"),
                                 pinned=("a",), excluded=("b", "c"), max_stages=2, solver="cbc", time_limit=7.5),
                         text="/t/heldout.txt", tokens=4096)
    assert A.placement(A.placement_pb(r)) == r     # a zero budget stays zero, the solver travels


def test_a_placement_request_that_cannot_be_solved_is_refused_at_the_wire():
    import pytest

    from proto import adapter as A
    from solver.request import Options, PlacementRequest, Workload

    for bad, words in ((PlacementRequest("m", options=Options(solver="glpk")), "solver must be"),
                       (PlacementRequest("m", Workload(concurrency=0)), "concurrency"),
                       (PlacementRequest("m", options=Options(max_ppl_increase=float("nan"))), "budget"),
                       (PlacementRequest("m", options=Options(time_limit=0)), "time limit")):
        with pytest.raises(A.WireError, match=words):
            A.placement(A.placement_pb(bad))
