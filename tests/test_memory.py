"""A loaded stage holds its weights in their GGUF encoding: resident memory grows by the
tensor bytes plus a fixed overhead (GGUF metadata and vocabulary parsing).

Measured on the reference model at Q4_K: RSS delta = 1.00 x tensor bytes + 3.9-4.0 MB for
stages of 1 to 8 layers. The test allows 1.15 x tensor bytes + 6 MiB.
"""
from __future__ import annotations

import json
import subprocess
import sys

from controller.shards import parse_types, write_shard

OVERHEAD = 6 * 2**20

PROBE = r"""
import gc, json, sys, psutil, torch
from agent.weights import load_stage
torch.set_num_threads(1)
proc = psutil.Process()
gc.collect(); before = proc.memory_info().rss
w = load_stage(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
gc.collect(); after = proc.memory_info().rss
print(json.dumps({"delta": after - before, "tensor_bytes": w.tensor_bytes()}))
"""


def _measure(path, first, last) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(path), str(first), str(last)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_q4k_stage_memory_is_its_tensor_bytes_plus_fixed_overhead(tmp_path, reference_model):
    path = tmp_path / "q4k.gguf"
    write_shard(reference_model, path, parse_types("Q4_K", 8))
    small, big = _measure(path, 3, 4), _measure(path, 0, 8)
    for m in (small, big):
        assert m["delta"] <= 1.15 * m["tensor_bytes"] + OVERHEAD, m
    # growth from 1 layer to the whole model is proportional to the bytes added
    assert big["delta"] - small["delta"] <= 1.15 * (big["tensor_bytes"] - small["tensor_bytes"]) + 2**20
