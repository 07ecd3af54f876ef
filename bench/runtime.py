"""The stage runtime (llama.cpp through agent/runtime.py) side by side with llama-cpp-python's
own `Llama` on the same GGUF, threads and context settings (flash attention on for both).

    .venv/bin/python bench/runtime.py [--models reference,smollm2] [--threads 2] [--no-profile]

Per model and type (the whole master quantized to it with llama.cpp's quantizers, with
llama.cpp's fallback where rows do not split into 256-blocks): greedy decode tokens/s over 64
tokens and 512-token prefill tokens/s, each engine in its own fresh process, and the
process's resident memory after loading. Then: tokens/s of 1 vs 8 concurrent sessions on one
stage; the resident memory of an idle agent process; the time of a full sensitivity profile
of SmolLM2 (every layer type, 2,048 held-out tokens). Each figure is the best of --repeats
runs (other processes share the cores).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from agent import weights as W  # noqa: E402
from controller.shards import file_sha256, parse_types, write_shard  # noqa: E402

REFERENCE = ROOT / "models" / "reference" / "edgefleet-ref-f16.gguf"
TYPES = ("F16", "Q8_0", "Q4_K", "Q4_0")

PROBE = r"""
import json, sys, time
import numpy as np, psutil
engine, path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
proc = psutil.Process()
prompt = [1] + [100 + i for i in range(15)]
long = [1] + [(37 * i) % 3000 + 10 for i in range(511)]
if engine == "ours":
    import agent  # the agent's thread spin policy
    from agent.runtime import Settings, Stage, Step
    st = Stage(path, Settings(sessions=1, context=640, batch_tokens=512, threads=threads))
    rss = proc.memory_info().rss
    def decode(n):
        row = st.forward([Step(0, 0, tokens=np.array(prompt))])[0][-1]
        out, pos = [], len(prompt)
        t = time.perf_counter()
        for _ in range(n):
            out.append(int(row.argmax()))
            row = st.forward([Step(0, pos, tokens=np.array(out[-1:]))])[0][-1]
            pos += 1
        return out, n / (time.perf_counter() - t)
    def prefill():
        t = time.perf_counter(); st.forward([Step(0, 0, tokens=np.array(long))]); return len(long) / (time.perf_counter() - t)
else:
    import agent, llama_cpp
    from agent.runtime import whole_model
    llm = whole_model(path, n_ctx=640, n_batch=512, n_ubatch=512, n_threads=threads, n_threads_batch=threads,
                      flash_attn=True, verbose=False)
    rss = proc.memory_info().rss
    def last_logits():
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, (llm.n_vocab(),))
    def decode(n):
        llm.reset(); llm.eval(prompt)
        out = []
        t = time.perf_counter()
        for _ in range(n):
            out.append(int(np.argmax(last_logits())))
            llm.eval(out[-1:])
        return out, n / (time.perf_counter() - t)
    def prefill():
        llm.reset(); t = time.perf_counter(); llm.eval(long); return len(long) / (time.perf_counter() - t)
decode(4); prefill()
best_d, best_p, toks = 0.0, 0.0, None
for _ in range(int(sys.argv[4])):
    toks, d = decode(64); best_d = max(best_d, d); best_p = max(best_p, prefill())
print(json.dumps({"decode": best_d, "prefill": best_p, "rss_mb": rss / 2**20, "tokens": toks}))
"""

CONCURRENT = r"""
import json, sys, time
import numpy as np
import agent
from agent.runtime import Settings, Stage, Step
path, threads, n_sessions, per_step = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
st = Stage(path, Settings(sessions=8, context=512, batch_tokens=512, threads=threads))
prompts = [[1] + [100 + 7 * s + i for i in range(15)] for s in range(n_sessions)]
rows = st.forward([Step(s, 0, tokens=np.array(p)) for s, p in enumerate(prompts)])
pos = [len(p) for p in prompts]
nxt = [int(r[-1].argmax()) for r in rows]
best = 0.0
for _ in range(3):
    t = time.perf_counter()
    for _ in range(16):
        # n_sessions sessions, each adding per_step tokens (per_step > 1: one session's batch,
        # the engine's own batched throughput without several sequences)
        rows = st.forward([Step(s, pos[s], tokens=np.array([nxt[s]] * per_step)) for s in range(n_sessions)])
        nxt = [int(r[-1].argmax()) for r in rows]
        pos = [p + per_step for p in pos]
    best = max(best, 16 * n_sessions * per_step / (time.perf_counter() - t))
print(json.dumps({"tokens_per_s": best}))
"""

IDLE = r"""
import json, psutil, grpc
import agent
from agent.engine import Engine
from agent.server import AgentService
from agent.store import ShardStore
import llama_cpp
from agent.runtime import init_llama
init_llama()
e = Engine(1 << 30, threads=1)
print(json.dumps({"rss_mb": psutil.Process().memory_info().rss / 2**20,
                  "torch": "torch" in __import__("sys").modules, "solver_stack": "pulp" in __import__("sys").modules}))
e.stop()
"""


def run(code: str, *args) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"probe failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def profile_floor_s(master, cfg, windows, variants_per_layer: int, threads: int) -> float:
    """Seconds the layers and heads a profile must run would take at llama.cpp's own speed:
    each variant of layer l runs layers l..n-1 and the head over every window; timed as the
    whole model (one stage, logits of every token) over the same windows, scaled by FLOPs."""
    import numpy as np

    from agent.runtime import Settings, Stage, Step

    st = Stage(master, Settings(sessions=1, context=512, batch_tokens=512, threads=threads))
    try:
        st.forward([Step(0, 0, tokens=np.asarray(windows[0]), all_logits=True)])   # warm-up
        t = time.perf_counter()
        for w in windows:
            st.forward([Step(0, 0, tokens=np.asarray(w), all_logits=True)])
        whole = time.perf_counter() - t
    finally:
        st.close()
    layer = 2 * (2 * cfg.n_embd * cfg.n_embd + 2 * cfg.n_embd * cfg.n_head_kv * cfg.head_dim
                 + 3 * cfg.n_embd * cfg.n_ff)
    head = 2 * cfg.n_vocab * cfg.n_embd
    full = cfg.n_layer * layer + head
    work = sum(variants_per_layer * ((cfg.n_layer - l) * layer + head) for l in range(cfg.n_layer))
    return whole * work / full


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="reference,smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-profile", action="store_true", help="Skip the timed SmolLM2 sensitivity profile.")
    args = ap.parse_args()
    console = Console(width=100)
    masters = {"reference": REFERENCE}
    if "smollm2" in args.models:
        from models import smollm2

        masters["smollm2"] = smollm2.path("F16")
    table = Table(title=f"single stage vs llama-cpp-python, same GGUF, {args.threads} threads, flash attention on")
    for col in ("model", "type", "decode ours", "decode llama", "ratio", "prefill ours", "prefill llama",
                "ratio", "same 64", "RSS ours / llama MiB"):
        table.add_column(col, justify="right")
    results = []
    with tempfile.TemporaryDirectory() as d:
        for name, master in masters.items():
            if name not in args.models:
                continue
            sha = file_sha256(master)
            n_layer = W.read_config(W.open_gguf(master)).n_layer
            for q in TYPES:
                path = Path(d) / f"{name}-{q}.gguf"
                write_shard(master, path, parse_types(q, n_layer), master_sha256=sha)
                ours = run(PROBE, "ours", path, args.threads, args.repeats)
                ref = run(PROBE, "llama", path, args.threads, args.repeats)
                same = sum(a == b for a, b in zip(ours["tokens"], ref["tokens"]))
                r = {"model": name, "type": q, "ours": ours, "llama": ref, "same": same,
                     "decode_ratio": ours["decode"] / ref["decode"], "prefill_ratio": ours["prefill"] / ref["prefill"]}
                results.append(r)
                table.add_row(name, q, f"{ours['decode']:.1f}", f"{ref['decode']:.1f}", f"{r['decode_ratio']:.2f}",
                              f"{ours['prefill']:.0f}", f"{ref['prefill']:.0f}", f"{r['prefill_ratio']:.2f}",
                              f"{same}/64", f"{ours['rss_mb']:.0f} / {ref['rss_mb']:.0f}")
                if q == "Q4_0":
                    one = run(CONCURRENT, path, args.threads, 1, 1)["tokens_per_s"]
                    eight = run(CONCURRENT, path, args.threads, 8, 1)["tokens_per_s"]
                    batch8 = run(CONCURRENT, path, args.threads, 1, 8)["tokens_per_s"]
                    results.append({"model": name, "concurrent": {"1": one, "8": eight, "batch8": batch8}})
    console.print(table)
    for r in results:
        if "concurrent" in r:
            c = r["concurrent"]
            console.print(f"{r['model']} Q4_0, one stage: 1 session {c['1']:.1f} tok/s, 8 sessions {c['8']:.1f} tok/s "
                          f"({c['8'] / c['1']:.2f}x); the engine's own 8-token batch (one session, 8 tokens a "
                          f"step) {c['batch8']:.1f} tok/s ({c['batch8'] / c['1']:.2f}x)")
    idle = run(IDLE)
    console.print(f"idle agent process (engine + service modules + llama.cpp loaded, no stage): "
                  f"{idle['rss_mb']:.0f} MiB RSS; torch imported: {idle['torch']}; solver stack imported: "
                  f"{idle['solver_stack']}")
    if not args.no_profile and "smollm2" in masters:
        from controller import sensitivity as S
        from solver.ggml_types import LAYER_TYPES

        text = (ROOT / "models" / "reference" / "heldout.txt").read_text(encoding="utf-8")
        master = masters["smollm2"]
        cfg = W.read_config(W.open_gguf(master))
        floor = profile_floor_s(master, cfg, S.heldout_windows(master, text, 2048), len(LAYER_TYPES) - 1, args.threads)
        t = time.perf_counter()
        res = S.measure(master, text, types=LAYER_TYPES, tokens=2048, validate=0)
        console.print(f"SmolLM2 full sensitivity profile: {len(LAYER_TYPES)} types x {cfg.n_layer} layers, "
                      f"{res['eval_tokens']} tokens: {time.perf_counter() - t:.0f} s; the computation it "
                      f"needs takes {floor:.0f} s at llama.cpp's own speed for the whole model")


if __name__ == "__main__":
    main()
