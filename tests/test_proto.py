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
