"""llama.cpp's own RPC backend, built from the source the project links against.

The llama-cpp-python sdist pinned in requirements.lock carries llama.cpp as
`vendor/llama.cpp`; this downloads it from the package registry (`pip download`), builds
`ggml-rpc-server`, `llama-bench` and `llama-batched-bench` with the RPC backend on, and caches the build
under $EDGEFLEET_HOME/llama-rpc/<version> (default ~/.edgefleet). Benches only: nothing in
the test path needs it.

    .venv/bin/python bench/llamacpp.py          # build once (about 6 min on 2 cores), print the paths
"""
from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from agent.home import home as edgefleet_home

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("ggml-rpc-server", "llama-bench", "llama-batched-bench")


def pinned_version() -> str:
    m = re.search(r"^llama-cpp-python==(\S+)$", (ROOT / "requirements.lock").read_text(), re.M)
    if not m:
        raise SystemExit("requirements.lock pins no llama-cpp-python; run `make lock`")
    return m.group(1)


def home() -> Path:
    return edgefleet_home() / "llama-rpc" / pinned_version()


def binary(name: str) -> Path:
    return home() / "build" / "bin" / name


def build(log=print) -> Path:
    """The folder of the built binaries (built now if they are not there yet)."""
    if all(binary(t).exists() for t in TARGETS):
        return binary(TARGETS[0]).parent
    version, where = pinned_version(), home()
    where.mkdir(parents=True, exist_ok=True)
    src = where / "src"
    if not (src / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        log(f"downloading the llama-cpp-python {version} sdist from the package registry")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
                        f"llama-cpp-python=={version}", "-d", str(where)], check=True)
        sdist = next(where.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(where, filter="data")
        next(p for p in where.iterdir() if p.is_dir() and p.name.startswith("llama_cpp_python-")).rename(src)
    t0 = time.monotonic()
    log(f"building {', '.join(TARGETS)} with the RPC backend (about 6 min on 2 cores)")
    cfg = ["cmake", "-S", str(src / "vendor" / "llama.cpp"), "-B", str(where / "build"), "-G", "Ninja",
           "-DCMAKE_BUILD_TYPE=Release", "-DGGML_RPC=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
           "-DLLAMA_BUILD_TOOLS=ON", "-DGGML_NATIVE=ON"]
    subprocess.run(cfg, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["ninja", "-C", str(where / "build"), *TARGETS], check=True, stdout=subprocess.DEVNULL)
    log(f"built in {time.monotonic() - t0:.0f} s")
    return binary(TARGETS[0]).parent


if __name__ == "__main__":
    out = build()
    for t in TARGETS:
        print(out / t)
