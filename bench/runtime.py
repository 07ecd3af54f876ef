"""Decode speed and memory of the torch runtime vs llama-cpp-python, per GGUF type.

    .venv/bin/python bench/runtime.py [--tokens 64] [--threads 2]

For each type, the whole reference model is quantized to it; both engines decode the same
greedy continuation of a short prompt (one token per step, KV cache on) and report tokens/s.
Resident memory is measured in a fresh process per engine after loading the model.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from agent.quant import LAYER_TYPES  # noqa: E402
from controller.shards import parse_types, write_shard  # noqa: E402

REFERENCE = ROOT / "models" / "reference" / "edgefleet-ref-f16.gguf"

PROBE = r"""
import gc, json, sys, time, psutil, torch
engine, path, n, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
proc = psutil.Process()
base = proc.memory_info().rss
prompt = [1, 450, 1051, 1134]
if engine == "ours":
    from agent.pipeline import LocalPipeline
    pipe = LocalPipeline.from_model(path, 1)
    gc.collect(); rss = proc.memory_info().rss
    list(pipe.generate(prompt, 4))                      # warm-up
    t = time.perf_counter(); out = list(pipe.generate(prompt, n)); dt = time.perf_counter() - t
else:
    import llama_cpp
    llm = llama_cpp.Llama(path, n_ctx=512, n_threads=threads, verbose=False)
    gc.collect(); rss = proc.memory_info().rss
    def gen(k):
        toks = []
        for t in llm.generate(prompt, temp=0.0, reset=True):   # greedy, KV cache on
            toks.append(int(t))
            if len(toks) == k:
                return toks
        return toks
    gen(4)
    t = time.perf_counter(); out = gen(n); dt = time.perf_counter() - t
print(json.dumps({"tokens_per_s": n / dt, "rss_model_mb": (rss - base) / 1e6, "rss_total_mb": rss / 1e6, "tokens": out}))
"""


def probe(engine: str, path: Path, n: int, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, engine, str(path), str(n), str(threads)],
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = ap.parse_args()
    table = Table(title=f"Reference model decode, {a.tokens} tokens, {a.threads} threads")
    for col in ("type", "file MB", "ours tok/s", "llama.cpp tok/s", "ours/llama.cpp", "ours RSS MB", "llama.cpp RSS MB", "same tokens"):
        table.add_column(col, justify="right")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for t in LAYER_TYPES:
            path = Path(tmp) / f"{t}.gguf"
            info = write_shard(REFERENCE, path, parse_types(t, 8))
            ours, ref = probe("ours", path, a.tokens, a.threads), probe("llama", path, a.tokens, a.threads)
            same = sum(x == y for x, y in zip(ours["tokens"], ref["tokens"]))
            row = {"type": t, "file_mb": info.bytes / 1e6, "ours_tps": ours["tokens_per_s"], "llama_tps": ref["tokens_per_s"],
                   "ours_rss_mb": ours["rss_model_mb"], "llama_rss_mb": ref["rss_model_mb"], "same_tokens": same}
            rows.append(row)
            table.add_row(t, f"{row['file_mb']:.1f}", f"{row['ours_tps']:.1f}", f"{row['llama_tps']:.1f}",
                          f"{row['ours_tps'] / row['llama_tps']:.3f}", f"{row['ours_rss_mb']:.1f}",
                          f"{row['llama_rss_mb']:.1f}", f"{same}/{a.tokens}")
            print(f"{t}: ours {row['ours_tps']:.1f} tok/s, llama.cpp {row['llama_tps']:.1f} tok/s", file=sys.stderr)
    Console(width=160).print(table)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
