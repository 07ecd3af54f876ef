"""llama.cpp's mixes (Q4_K_M and kin) as layer types and as masters: the type each matrix gets
is the one llama.cpp's quantizer chooses, a q4_k_m layer built from an F16 master is llama.cpp's
Q4_K_M layer byte for byte, a mixed master's layer keeps its bytes under the master's name, and
it may take only types that need no more bytes than it stores."""
from __future__ import annotations

import numpy as np
import pytest

from agent import weights as W
from controller.shards import candidate_types, kept_layers, parse_types, write_shard
from solver.ggml_types import MIX_FILE_TYPES, MIXES, TYPE_ORDER, matrix_type, parse_type

# SmolLM2's 30 layers that llama.cpp's Q4_K_M gives Q6_K attn_v and ffn_down (use_more_bits)
MORE_BITS = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}


def stored_matrices(reader):
    """{(layer, matrix): (type, row length)} of a GGUF's layer matrices."""
    out = {}
    for t in reader.tensors:
        parts = t.name.split(".")
        if parts[0] == "blk" and len(t.shape) == 2:
            out[int(parts[1]), parts[2]] = (t.tensor_type.name, int(t.shape[0]))
    return out


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_each_matrix_gets_the_type_llama_cpp_s_quantizer_chooses(mix, reference_model, tmp_path):
    from models.smollm2 import llama_quantize

    ftype = {name: f for f, name in MIX_FILE_TYPES.items()}[mix]
    out = tmp_path / f"ref.{mix}.gguf"
    llama_quantize(reference_model, out, ftype)
    reader = W.open_gguf(out)
    n_layer = W.read_config(reader).n_layer
    for (l, m), (stored, n) in stored_matrices(reader).items():
        assert matrix_type(mix, m, n, l, n_layer) == stored, (l, m)
    assert W.layer_types(reader) == [mix] * n_layer


def test_smollm2_q4_k_m_is_named_and_typed_as_llama_cpp_wrote_it(smollm2_q4_k_m):
    reader = W.open_master(smollm2_q4_k_m)
    for (l, m), (stored, n) in stored_matrices(reader).items():   # rows of 576: Q5_0 for Q4_K, Q8_0 for Q6_K
        assert matrix_type("Q4_K_M", m, n, l, 30) == stored, (l, m)
        if m in ("attn_v", "ffn_down"):
            assert stored == {("attn_v", True): "Q8_0", ("attn_v", False): "Q5_0", ("ffn_down", True): "Q6_K",
                              ("ffn_down", False): "Q4_K"}[m, l in MORE_BITS]
    assert W.layer_types(reader) == ["Q4_K_M"] * 30


def test_q4_k_m_layers_from_the_f16_master_are_llama_cpp_s_bytes(smollm2, smollm2_q4_k_m, tmp_path):
    """Layers 2-5 (Q6_K, Q4_K, Q4_K, Q6_K ffn_down) built at "q4_k_m" from the F16 master equal
    llama.cpp's Q4_K_M file; built from that file at its own name, its bytes are copied."""
    ref = {t.name: t for t in W.open_master(smollm2_q4_k_m).tensors}
    for master, types in ((smollm2, "q4_k_m"), (smollm2_q4_k_m, "Q4_K_M")):
        shard = write_shard(master, tmp_path / "s.gguf", parse_types(types, 30), 2, 6)
        assert shard.layer_types == ("Q4_K_M",) * 4
        got = [t for t in W.open_gguf(shard.path).tensors if t.name.startswith("blk.") and len(t.shape) == 2]
        assert len(got) == 4 * 7
        for t in got:
            layer, rest = t.name.split(".", 2)[1:]
            want = ref[f"blk.{int(layer) + 2}.{rest}"]        # a shard numbers its layers from 0
            assert t.tensor_type == want.tensor_type and np.array_equal(np.asarray(t.data), np.asarray(want.data)), t.name


def test_a_mixed_master_s_layer_takes_only_types_needing_no_more_bytes(smollm2_q4_k_m, smollm2):
    from solver.problem import model_from_shape

    kept = kept_layers(smollm2_q4_k_m)
    assert [b for _, b in kept] == [2592000 if l in MORE_BITS else 2322432 for l in range(30)]
    # by default: LAYER_TYPES and its own; Q5_0 fits only where Q4_K_M gave more bits
    assert candidate_types(smollm2_q4_k_m) == [
        ("Q5_0", "Q4_K_M", "Q4_K", "Q4_0", "Q3_K", "Q2_K") if l in MORE_BITS else ("Q4_K_M", "Q4_K", "Q4_0", "Q3_K", "Q2_K")
        for l in range(30)]
    # any type asked for: exactly those the model profile sizes at no more than the stored bytes
    sizes = model_from_shape("m", 30, 576, 9, 3, 1536, 49152, True, [{}] * 30).layers
    every = candidate_types(smollm2_q4_k_m, TYPE_ORDER)
    for l, (own, stored) in enumerate(kept):
        assert own == "Q4_K_M" and sizes[l].bytes["Q4_K_M"] - 2 * 576 * 4 == stored
        assert every[l] == tuple(q for q in TYPE_ORDER if sizes[l].bytes[q] - 2 * 576 * 4 <= stored)
        assert "Q8_0" not in every[l] and "Q5_K_M" not in every[l] and "Q4_1" in every[l]
    assert candidate_types(smollm2, TYPE_ORDER) == [TYPE_ORDER] * 30     # an F16 master's layers take any


def test_mix_names_are_case_insensitive():
    assert parse_type(" q4_k_m ") == "Q4_K_M" and parse_type("Q5_k_M") == "Q5_K_M"
    assert parse_types("0-9:q3_k_l,10-29:q4_0", 30) == ["Q3_K_L"] * 10 + ["Q4_0"] * 20
    with pytest.raises(ValueError, match="unsupported GGUF type 'q4_k_x'"):
        parse_type("q4_k_x")
