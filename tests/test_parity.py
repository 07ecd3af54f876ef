"""Parity with llama.cpp: the torch runtime split into 3 stages vs llama-cpp-python on the
same GGUF, over the first 512 tokens of the held-out text.

Measured (`.venv/bin/python bench/parity.py`, 20 windows): NLL per token agrees within 0.05 %
for every configuration; top-1 agreement is 99.93 % at F16 and 98.8 % (min 97.9 %) for the
quantized ones. The quantized gap is the arithmetic's own noise floor, not a runtime error:
llama.cpp rounds every matmul's activations to 8 bits, and so do we; our runtime against
itself with its activations scaled by (1 + 1e-6) agrees on the top-1 at only 98.8 % (min
97.1 %) of positions for Q4_K. Where llama.cpp's top-2 margin is ≥ 0.05, agreement is 99.87 %.
The quantized threshold below is set from that measurement; the issue's 99 % target is met
for F16 only (see the closing note).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from agent.pipeline import LocalPipeline
from agent.tokenizer import Tokenizer
from controller.shards import parse_types, write_shard

CONFIGS = {
    "all_f16": ("F16", 0.99),
    "all_q4k": ("Q4_K", 0.975),
    "mixed": ("Q8_0,Q6_K,Q4_K,Q2_K,Q5_K,Q3_K,Q4_0,Q5_0", 0.975),
}


def llama_cpp_logits(path, ids: list[int]) -> torch.Tensor:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=1024, n_batch=512, logits_all=True, verbose=False, n_threads=2)
    try:
        llm.eval(ids)
        return torch.from_numpy(np.array(llm.scores[: len(ids)])).to(torch.float64)
    finally:
        llm.close()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_three_stage_runtime_agrees_with_llama_cpp(name, tmp_path, reference_model, heldout_text):
    spec, min_top1 = CONFIGS[name]
    path = tmp_path / f"{name}.gguf"
    write_shard(reference_model, path, parse_types(spec, 8))
    ids = Tokenizer(path).encode(heldout_text)[:512]
    assert len(ids) == 512

    ours = LocalPipeline.from_model(path, 3).logits(ids).to(torch.float64)
    ref = llama_cpp_logits(path, ids)
    target = torch.tensor(ids[1:])
    nll_ours = F.cross_entropy(ours[:-1], target).item()
    nll_ref = F.cross_entropy(ref[:-1], target).item()
    top1 = (ours.argmax(-1) == ref.argmax(-1)).double().mean().item()

    assert abs(nll_ours - nll_ref) / nll_ref <= 0.01, (nll_ours, nll_ref)
    assert top1 >= min_top1, top1
    # where llama.cpp's choice is clear (top-2 margin ≥ 0.05, above the rounding noise) we
    # must make the same choice: a real runtime error would show here
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) >= 0.05
    agree_clear = (ours.argmax(-1) == ref.argmax(-1))[clear].double().mean().item()
    assert clear.sum() >= 450 and agree_clear >= 0.99, (int(clear.sum()), agree_clear)
