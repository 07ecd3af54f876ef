"""Parity with llama.cpp over many held-out windows, and the noise floor that limits it.

    python bench/parity.py                 # 20 windows of 512 tokens, 3 configurations
    python bench/parity.py --windows 5     # quicker

For the reference model at all F16, all Q4_K and a mixed per-layer configuration, the torch
runtime (3 stages) and llama-cpp-python run the same GGUF on the same windows. Printed per
configuration: top-1 agreement (mean, min), NLL per token relative difference, and where the
disagreements are: the share of them at positions whose llama.cpp top-2 margin is small, and
the agreement at positions with a clear margin.

The noise floor: our runtime against itself with every normalised activation scaled by
(1 + 1e-6), about 8 float32 ulps, i.e. the size of a different summation order. Quantized
matmuls round their activations to 8 bits first (as llama.cpp does), so such a perturbation
flips some roundings and moves the logits; where two tokens are that close, the top-1 can flip.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import agent.model as runtime_model  # noqa: E402
from agent.pipeline import LocalPipeline  # noqa: E402
from controller.sensitivity import heldout_windows  # noqa: E402
from controller.shards import parse_types, write_shard  # noqa: E402

MODEL = ROOT / "models" / "reference" / "edgefleet-ref-f16.gguf"
TEXT = ROOT / "models" / "reference" / "heldout.txt"
CONFIGS = {"all_f16": "F16", "all_q4k": "Q4_K", "mixed": "Q8_0,Q6_K,Q4_K,Q2_K,Q5_K,Q3_K,Q4_0,Q5_0"}
MARGIN = 0.05   # logits; a top-2 margin below this counts as a near tie


def perturbed_logits(pipe: LocalPipeline, ids: list[int], rel: float) -> torch.Tensor:
    plain = runtime_model.rms_norm
    runtime_model.rms_norm = lambda x, w, eps: plain(x, w, eps) * (1.0 + rel)
    try:
        return pipe.logits(ids)
    finally:
        runtime_model.rms_norm = plain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--perturb", type=float, default=1e-6)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import llama_cpp

    windows = heldout_windows(MODEL, TEXT.read_text(encoding="utf-8"), a.windows * 512)
    print(f"{len(windows)} windows of 512 held-out tokens; reference model {MODEL.name}", flush=True)
    with tempfile.TemporaryDirectory() as d:
        for name, spec in CONFIGS.items():
            path = Path(d) / f"{name}.gguf"
            n_layer = 8
            write_shard(MODEL, path, parse_types(spec, n_layer))
            pipe = LocalPipeline.from_model(path, 3)
            llm = llama_cpp.Llama(str(path), n_ctx=1024, n_batch=512, logits_all=True, verbose=False, n_threads=a.threads)
            top1, nll_rel, floor, near, clear_agree, clear_n, drift = [], [], [], 0, 0, 0, []
            disagree = 0
            for ids in windows:
                ours = pipe.logits(ids).to(torch.float64)
                llm.reset()
                llm.eval(ids)
                ref = torch.from_numpy(np.array(llm.scores[: len(ids)])).to(torch.float64)
                target = torch.tensor(ids[1:])
                a_nll = F.cross_entropy(ours[:-1], target).item()
                b_nll = F.cross_entropy(ref[:-1], target).item()
                same = ours.argmax(-1) == ref.argmax(-1)
                top1.append(same.double().mean().item())
                nll_rel.append(abs(a_nll - b_nll) / b_nll)
                top2 = ref.topk(2, dim=-1).values
                margin = top2[:, 0] - top2[:, 1]
                disagree += int((~same).sum())
                near += int((~same & (margin < MARGIN)).sum())
                clear = margin >= MARGIN
                clear_agree += int((same & clear).sum())
                clear_n += int(clear.sum())
                mine = perturbed_logits(pipe, ids, a.perturb).to(torch.float64)
                floor.append((mine.argmax(-1) == ours.argmax(-1)).double().mean().item())
                drift.append((mine - ours).abs().mean().item())
            llm.close()
            print(f"{name:8s} top-1 agreement with llama.cpp: mean {100 * statistics.mean(top1):6.2f} %  "
                  f"min {100 * min(top1):6.2f} % | NLL rel. diff max {100 * max(nll_rel):.3f} %", flush=True)
            print(f"         disagreements: {disagree}, of which {near} at a llama.cpp top-2 margin < {MARGIN}; "
                  f"agreement where the margin is ≥ {MARGIN}: {100 * clear_agree / max(clear_n, 1):.2f} % "
                  f"of {clear_n} positions", flush=True)
            print(f"         noise floor: our runtime vs itself with activations × (1 + {a.perturb:g}): top-1 "
                  f"mean {100 * statistics.mean(floor):6.2f} %  min {100 * min(floor):6.2f} %, "
                  f"mean |Δlogit| {statistics.mean(drift):.4f}", flush=True)


if __name__ == "__main__":
    main()
