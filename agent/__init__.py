"""The edge daemon: gRPC service, shard store, stage execution on llama.cpp's engine.

llama.cpp's CPU threads (OpenMP in the build llama-cpp-python makes) busy-wait ~300,000
rounds after each operation by default, which starves other processes sharing the cores
(several agents on one machine, tests, the demo). Unless the user chose otherwise, they
spin 50,000 rounds: as fast on a quiet machine (bench/runtime.py), idle soon after. This
must be set before llama_cpp is imported, hence here.
"""
import os

os.environ.setdefault("GOMP_SPINCOUNT", "50000")
