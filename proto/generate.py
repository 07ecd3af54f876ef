"""Regenerate edgefleet_pb2.py / edgefleet_pb2_grpc.py from edgefleet.proto.

Run from anywhere: `python -m proto.generate [OUT_DIR]`. Output goes beside the .proto
unless OUT_DIR is given (the test writes to a temporary dir and compares).
"""
from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_DIR = Path(__file__).resolve().parent
ROOT = PROTO_DIR.parent


def generate(out_root: Path = ROOT) -> list[Path]:
    """Write proto/edgefleet_pb2*.py under out_root; return the files written."""
    (out_root / "proto").mkdir(parents=True, exist_ok=True)
    rc = protoc.main([
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        str(PROTO_DIR / "edgefleet.proto"),
    ])
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    return [out_root / "proto" / "edgefleet_pb2.py", out_root / "proto" / "edgefleet_pb2_grpc.py"]


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT):
        print(path)
