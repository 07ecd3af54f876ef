"""The torch runtime: splits, KV cache, batched decode, rope variants, bad input."""
from __future__ import annotations

import pytest
import torch

from agent.model import Stage, Step, apply_rope, rope_angles
from agent.pipeline import LocalPipeline, split_evenly
from agent.sampling import Sampling
from agent.tokenizer import Tokenizer
from agent.weights import load_stage
from controller.shards import parse_types, write_shard


@pytest.fixture(scope="module")
def mixed_model(tmp_path_factory, reference_model):
    path = tmp_path_factory.mktemp("m") / "mixed.gguf"
    write_shard(reference_model, path, parse_types("0-1:Q8_0,2-3:Q4_K,4-5:Q6_K,6-7:Q3_K", 8))
    return path


@pytest.fixture(scope="module")
def ids(reference_model, heldout_text):
    return Tokenizer(reference_model).encode(heldout_text)[:96]


def test_any_split_gives_the_same_logits(mixed_model, ids):
    whole = LocalPipeline.from_model(mixed_model, 1).logits(ids)
    for n in (2, 3, 8):
        split = LocalPipeline.from_model(mixed_model, n).logits(ids)
        assert torch.allclose(whole, split, atol=1e-5), n


@pytest.mark.parametrize("which", ["reference", "mixed"])
def test_incremental_decode_matches_prefill(which, reference_model, mixed_model, ids):
    # The same quantities, one token at a time instead of in one pass. Matmul kernels differ
    # by shape, and 8-bit activation rounding (as llama.cpp does it) amplifies those last-bit
    # differences on quantized layers, so the tolerance there is wider (measured max ~0.1).
    pipe = LocalPipeline.from_model(reference_model if which == "reference" else mixed_model, 3)
    full = pipe.logits(ids)
    caches = pipe.new_session()
    pipe.forward(caches, 0, torch.tensor(ids[:64]))
    for p in range(64, 72):
        step = pipe.forward(caches, p, torch.tensor([ids[p]]))[-1]
        assert (step - full[p]).abs().max() < (1e-2 if which == "reference" else 0.25), p
        assert int(step.argmax()) == int(full[p].argmax())


def test_batched_decode_of_several_sessions_equals_one_at_a_time(reference_model, ids):
    stage = Stage(load_stage(reference_model))
    prompts = [ids[:10], ids[20:37], ids[40:45]]
    caches = [stage.new_cache() for _ in prompts]
    for c, p in zip(caches, prompts):
        stage.forward([Step(c, 0, tokens=torch.tensor(p))])
    batched = stage.forward([Step(c, len(p), tokens=torch.tensor([7])) for c, p in zip(caches, prompts)])
    for c, p, b in zip(caches, prompts, batched):
        solo_cache = stage.new_cache()
        stage.forward([Step(solo_cache, 0, tokens=torch.tensor(p))])
        solo = stage.forward([Step(solo_cache, len(p), tokens=torch.tensor([7]))])[0]
        assert b.shape == (1, stage.cfg.n_vocab)
        assert (b - solo).abs().max() < 1e-2 and int(b.argmax()) == int(solo.argmax())
        assert c.length == len(p) + 1


def test_replaying_from_an_earlier_position_rebuilds_the_cache(reference_model, ids):
    pipe = LocalPipeline.from_model(reference_model, 2)
    caches = pipe.new_session()
    a = pipe.forward(caches, 0, torch.tensor(ids[:20]))
    pipe.forward(caches, 20, torch.tensor(ids[20:30]))
    b = pipe.forward(caches, 0, torch.tensor(ids[:20]))   # replay: positions >= 0 are forgotten
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="holds only 20"):
        pipe.forward(caches, 25, torch.tensor([1]))


def test_greedy_generation_is_deterministic_and_sampling_is_seeded(reference_model, ids):
    pipe = LocalPipeline.from_model(reference_model, 2)
    g1 = list(pipe.generate(ids[:8], 12))
    assert g1 == list(pipe.generate(ids[:8], 12)) and len(g1) == 12
    s = Sampling(temperature=0.9, top_p=0.9, seed=5)
    assert list(pipe.generate(ids[:8], 12, s)) == list(pipe.generate(ids[:8], 12, s))
    assert list(pipe.generate(ids[:8], 12, s)) != list(pipe.generate(ids[:8], 12, Sampling(0.9, 0.9, 6)))


def test_rope_variants_rotate_the_expected_pairs():
    x = torch.zeros(1, 1, 4)
    x[0, 0, 0] = 1.0
    ang = rope_angles(torch.tensor([1]), 4, 10000.0)        # [[1, 0.01]]
    norm = apply_rope(x, ang, neox=False)[0, 0]             # pairs (0,1), (2,3)
    neox = apply_rope(x, ang, neox=True)[0, 0]              # pairs (0,2), (1,3)
    c, s = torch.cos(torch.tensor(1.0)), torch.sin(torch.tensor(1.0))
    assert torch.allclose(norm, torch.tensor([c, s, 0, 0]))
    assert torch.allclose(neox, torch.tensor([c, 0, s, 0]))
    # llama-3 frequency factors divide the frequencies; linear scaling divides positions
    ff = rope_angles(torch.tensor([8]), 4, 10000.0, freq_factors=torch.tensor([1.0, 4.0]))
    assert torch.allclose(ff, torch.tensor([[8.0, 0.02]], dtype=torch.float64))
    assert torch.allclose(rope_angles(torch.tensor([8]), 4, 10000.0, linear_scale=2.0),
                          torch.tensor([[4.0, 0.04]], dtype=torch.float64))


def test_split_evenly():
    assert split_evenly(8, 3) == [(0, 3), (3, 5), (5, 8)]
    with pytest.raises(ValueError):
        split_evenly(8, 9)


def test_bad_inputs_give_one_clear_sentence(tmp_path, reference_model):
    with pytest.raises(ValueError, match="does not exist"):
        load_stage(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_stage(junk)
    truncated = tmp_path / "trunc.gguf"
    truncated.write_bytes(reference_model.read_bytes()[:100_000])
    with pytest.raises(ValueError, match="not a readable GGUF"):
        load_stage(truncated)
    with pytest.raises(ValueError, match=r"layer range \[6, 12\) is out of bounds"):
        load_stage(reference_model, 6, 12)
    first = Stage(load_stage(reference_model, 0, 1))
    with pytest.raises(ValueError, match="token id out of range"):
        first.forward([Step(first.new_cache(), 0, tokens=torch.tensor([99999]))])
