"""The stage runtime on llama.cpp: any split of a mixed-precision model is exactly llama.cpp
running the whole model (llama-cpp-python's Llama on the same GGUF, same context settings),
on the reference model and on SmolLM2-135M; batching, replay, fallback types, bad input."""
from __future__ import annotations

import ctypes
import mmap
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from agent.pipeline import LocalPipeline, split_evenly
from agent.runtime import (EXCLUSIVE, HUGE_PAGE_SIZE, PRESENT, Settings, Stage, Step, anonymous_ranges,
                           filled_blocks, use_huge_pages)
from agent.tokenizer import Tokenizer
from agent import weights as W
from controller.shards import file_sha256, parse_types, write_shard
from solver.ggml_types import stored_type
from llama_ref import SETTINGS, THREADS, LlamaCpp


def shards_of(master, types: list[str], ranges, d) -> list:
    sha = file_sha256(master)
    return [write_shard(master, d / f"s{a}-{b}.gguf", types, a, b, sha).path for a, b in ranges]


def ours_greedy(pipe: LocalPipeline, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    tokens, logits = [], []
    row = pipe.forward(0, prompt)[-1]
    pos = len(prompt)
    for _ in range(n):
        logits.append(row)
        tokens.append(int(row.argmax()))
        row = pipe.forward(pos, [tokens[-1]])[-1]
        pos += 1
    return tokens, logits


def check_splits(master, spec: str, splits, prompt, tmp_path, n_tokens: int = 64):
    cfg = W.read_config(W.open_gguf(master))
    types = parse_types(spec, cfg.n_layer)
    whole = tmp_path / "whole.gguf"
    write_shard(master, whole, types)
    ref = LlamaCpp(whole, logits_all=False)
    try:
        want_tokens, want_logits = ref.greedy(prompt, n_tokens)
    finally:
        ref.close()
    ref = LlamaCpp(whole, logits_all=True)
    try:
        ref.llm.eval(prompt)
        want_prefill = np.array(ref.llm.scores[:len(prompt)], dtype=np.float32)
    finally:
        ref.close()
    for n in splits:
        d = tmp_path / f"split{n}"
        d.mkdir()
        pipe = LocalPipeline.from_files(shards_of(master, types, split_evenly(cfg.n_layer, n), d), SETTINGS)
        try:
            assert np.array_equal(pipe.logits(prompt), want_prefill), f"{n} stages: prefill logits differ"
            tokens, logits = ours_greedy(pipe, prompt, n_tokens)
        finally:
            pipe.close()
        assert tokens == want_tokens, f"{n} stages"
        assert all(np.array_equal(a, b) for a, b in zip(logits, want_logits)), f"{n} stages: logits differ"


@pytest.fixture(scope="module")
def ref_prompt(reference_model, heldout_text):
    return Tokenizer(reference_model).encode(heldout_text)[:96]


def test_reference_model_any_split_is_llama_cpp_exactly(reference_model, ref_prompt, tmp_path):
    check_splits(reference_model, "0-1:Q8_0,2-3:Q4_K,4:F16,5:Q6_K,6:Q4_0,7:Q3_K", (2, 3, 4), ref_prompt, tmp_path)


def test_smollm2_any_split_is_llama_cpp_exactly(smollm2, tmp_path):
    tok = Tokenizer(smollm2)
    prompt = tok.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
                        special=True)
    # K-quants on rows of 576 fall back as llama.cpp's quantize does (Q4_K -> Q5_0 on attn_q...)
    check_splits(smollm2, "0-7:Q8_0,8-15:Q4_K,16-23:Q6_K,24-29:Q4_0", (2, 3, 4), prompt, tmp_path)


def test_k_quant_fallback_matches_llama_cpp_rule(smollm2, tmp_path):
    assert [stored_type("Q4_K", 576), stored_type("Q5_K", 576), stored_type("Q6_K", 576),
            stored_type("Q3_K", 576), stored_type("Q4_K", 1536), stored_type("Q8_0", 100)] == \
        ["Q5_0", "Q5_1", "Q8_0", "Q4_0", "Q4_K", "F16"]
    path = write_shard(smollm2, tmp_path / "q4k.gguf", ["Q4_K"] * 30, 3, 4).path
    got = {t.name: t.tensor_type.name for t in W.open_gguf(path).tensors}
    assert got["blk.0.attn_q.weight"] == "Q5_0" and got["blk.0.ffn_up.weight"] == "Q5_0"
    assert got["blk.0.ffn_down.weight"] == "Q4_K"            # rows of n_ff = 1536 split into 256-blocks


def test_batched_sessions_match_solo_and_replay_is_exact(reference_model, ref_prompt, tmp_path):
    path = shards_of(reference_model, ["Q8_0"] * 8, [(2, 6)], tmp_path)[0]
    stage = Stage(path, Settings(sessions=4, context=128, batch_tokens=128, threads=THREADS))
    try:
        rng = np.random.default_rng(0)
        prompts = [rng.standard_normal((n, stage.n_embd)).astype(np.float32) for n in (10, 17, 5)]
        nxt = [rng.standard_normal((1, stage.n_embd)).astype(np.float32) for _ in prompts]
        firsts = stage.forward([Step(i, 0, hidden=p) for i, p in enumerate(prompts)])   # one decode, 3 sessions
        batched = stage.forward([Step(i, len(p), hidden=x) for i, (p, x) in enumerate(zip(prompts, nxt))])
        for i, (p, x) in enumerate(zip(prompts, nxt)):
            solo_first = stage.forward([Step(i, 0, hidden=p)])[0]        # a replay from 0 of session i
            solo = stage.forward([Step(i, len(p), hidden=x)])[0]
            assert firsts[i].shape == (len(p), stage.n_embd) and batched[i].shape == (1, stage.n_embd)
            # batched kernels sum in another order than one-row kernels: last-bit differences,
            # relative to the size of the residual stream
            scale = float(np.abs(solo).max())
            assert float(np.abs(batched[i] - solo).max()) <= 1e-3 * scale
            assert float(np.abs(firsts[i] - solo_first).max()) <= 1e-3 * scale
        again = stage.forward([Step(1, len(prompts[1]), hidden=nxt[1])])[0]   # replay of one position
        assert np.array_equal(again, stage.forward([Step(1, len(prompts[1]), hidden=nxt[1])])[0])
    finally:
        stage.close()


def test_each_step_gets_its_own_rows_in_any_order_of_sessions(reference_model, tmp_path):
    """Each session has its own KV cache, and llama.cpp computes a batch of several sessions in
    micro-batches of consecutive sequence ids: whatever the order and lengths of the steps,
    every step gets back the rows of its own session (against each session run alone)."""
    path = shards_of(reference_model, ["Q8_0"] * 8, [(2, 6)], tmp_path)[0]
    seqs, lengths = (0, 3, 2, 1), (1, 1, 4, 1)
    stage = Stage(path, Settings(sessions=4, context=64, batch_tokens=64, threads=THREADS))
    try:
        rng = np.random.default_rng(1)
        prompts = {q: rng.standard_normal((6 + q, stage.n_embd)).astype(np.float32) for q in seqs}
        steps = [rng.standard_normal((n, stage.n_embd)).astype(np.float32) for n in lengths]
        solo = []
        for q, x in zip(seqs, steps):
            stage.forward([Step(q, 0, hidden=prompts[q])])
            solo.append(stage.forward([Step(q, len(prompts[q]), hidden=x)])[0])
        got = stage.forward([Step(q, len(prompts[q]), hidden=x) for q, x in zip(seqs, steps)])
        # sessions 0, 1, 3 one token each (0-1 one micro-batch, 3 another), session 2 on its own
        for q, a, b in zip(seqs, got, solo):
            assert a.shape == b.shape
            assert float(np.abs(a - b).max()) <= 1e-3 * float(np.abs(b).max()), f"session {q}"
        with pytest.raises(ValueError, match="one step per session"):
            stage.forward([Step(0, 0, hidden=prompts[0]), Step(0, 0, hidden=prompts[0])])
    finally:
        stage.close()


def test_logits_without_a_copy_are_the_same_rows_and_only_the_last_decode_is_a_view(reference_model, tmp_path):
    """forward(keep=False), the agent's engine's call: the last decode's logits are read-only
    views of llama.cpp's buffer, every earlier decode's rows copies, and all are the rows that
    keep=True gives for the very same batch."""
    path = shards_of(reference_model, ["Q8_0"] * 8, [(4, 8)], tmp_path)[0]
    stage = Stage(path, Settings(sessions=3, context=64, batch_tokens=64, threads=THREADS))
    try:
        rng = np.random.default_rng(2)
        prompts = [rng.standard_normal((5, stage.n_embd)).astype(np.float32) for _ in range(3)]
        for q, p in enumerate(prompts):
            stage.forward([Step(q, 0, hidden=p)])
        xs = [rng.standard_normal((n, stage.n_embd)).astype(np.float32) for n in (2, 1, 1)]
        # sessions 1 and 2 (one token each) are one decode, session 0's two tokens the last one
        batch = [Step(q, 5, hidden=x) for q, x in enumerate(xs)]
        kept = stage.forward(batch)
        viewed = stage.forward(batch, keep=False)       # the same positions again: a replay of the same batch
        for q in range(3):
            assert viewed[q].shape == kept[q].shape == (1, stage.n_vocab)
            assert np.array_equal(viewed[q], kept[q]), f"session {q}"
        assert not viewed[0].flags.owndata and not viewed[0].flags.writeable    # the last decode's row
        assert viewed[1].flags.owndata and viewed[2].flags.owndata            # the first decode's: copies
        before = [v.copy() for v in viewed]
        stage.forward([Step(1, 6, hidden=xs[1])])       # another decode: only the last one's view changes
        assert np.array_equal(viewed[1], before[1]) and np.array_equal(viewed[2], before[2])
        assert not np.array_equal(viewed[0], before[0])
        assert all(np.array_equal(k, b) for k, b in zip(kept, before))
    finally:
        stage.close()


def test_the_native_and_the_python_output_readers_give_the_same_rows(reference_model, tmp_path):
    """A middle stage reads its output through agent/capture.c (built here: CI has a C
    compiler) and, where that cannot be built, through the same callback in Python: both give
    the very same rows, for prompts of two lengths and for decodes of two sessions at once."""
    path = shards_of(reference_model, ["Q8_0"] * 8, [(2, 6)], tmp_path)[0]
    rng = np.random.default_rng(2)
    prompts = [rng.standard_normal((n, 256)).astype(np.float32) for n in (9, 7)]
    steps = [[rng.standard_normal((1, 256)).astype(np.float32) for _ in prompts] for _ in range(3)]

    def run(python: bool) -> list[np.ndarray]:
        stage = Stage(path, Settings(sessions=2, context=64, batch_tokens=64, threads=THREADS,
                                     python_reader=python))
        try:
            assert stage._reader.native is not python
            out = [stage.forward([Step(q, 0, hidden=p)])[0] for q, p in enumerate(prompts)]
            for i, xs in enumerate(steps):
                out += stage.forward([Step(q, len(p) + i, hidden=x) for q, (p, x) in enumerate(zip(prompts, xs))])
            return out
        finally:
            stage.close()

    native, python = run(False), run(True)
    assert [a.shape for a in native] == [(9, 256), (7, 256)] + [(1, 256)] * 6
    assert all(np.array_equal(a, b) for a, b in zip(native, python))
    assert not np.array_equal(native[2], native[3])      # two sessions' rows, not one row twice


def test_without_a_c_compiler_the_reader_says_so_and_falls_back(tmp_path, monkeypatch, caplog):
    from agent import capture

    assert "failed" in capture.build(tmp_path / "x.so", cc="false") and not (tmp_path / "x.so").exists()
    assert "did not run" in capture.build(tmp_path / "x.so", cc="no-such-compiler-here")
    assert capture.build(tmp_path / "x.so") == "" and (tmp_path / "x.so").exists()
    monkeypatch.setenv("EDGEFLEET_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CC", "no-such-compiler-here")
    capture.library.cache_clear()
    try:
        reader = capture.OutputReader(b"l_out-3", 4, 256)
        assert not reader.native and "install a C compiler" in caplog.text
    finally:
        capture.library.cache_clear()


def test_a_long_prompt_runs_in_slices_of_the_batch(reference_model, ref_prompt, tmp_path):
    path = shards_of(reference_model, ["F16"] * 8, [(0, 8)], tmp_path)[0]
    small = Stage(path, Settings(sessions=1, context=128, batch_tokens=32, threads=THREADS))
    try:
        out = small.forward([Step(0, 0, tokens=np.array(ref_prompt), all_logits=True)])[0]
    finally:
        small.close()
    assert out.shape == (len(ref_prompt), 4096) and np.isfinite(out).all()
    big = Stage(path, Settings(sessions=1, context=128, batch_tokens=128, threads=THREADS))
    try:
        whole = big.forward([Step(0, 0, tokens=np.array(ref_prompt), all_logits=True)])[0]
    finally:
        big.close()
    assert [int(r.argmax()) for r in out] == [int(r.argmax()) for r in whole]


def test_a_head_stage_sized_for_few_outputs_makes_more_in_several_decodes(reference_model, ref_prompt, tmp_path):
    """llama.cpp aborts on a batch with more rows of logits than its context was sized for
    (Settings.outputs, at least one per session): the stage cuts such a batch (every row of a
    prompt), and every row comes back, with the argmax of a stage sized for the whole batch
    (llama.cpp's sums depend on a batch's shape, as for a prompt in slices of the batch). A
    decode of one step per session stays one decode, the very same as unsized."""
    path = shards_of(reference_model, ["Q8_0"] * 8, [(0, 8)], tmp_path)[0]
    prompts = [ref_prompt[i:i + 8] for i in range(0, 32, 8)]       # 4 sessions

    def run(outputs: int) -> tuple[np.ndarray, list[np.ndarray]]:
        st = Stage(path, Settings(sessions=4, context=128, batch_tokens=128, threads=THREADS, outputs=outputs))
        try:
            every = st.forward([Step(0, 0, tokens=np.array(ref_prompt), all_logits=True)])[0]
            st.forget(0)
            last = st.forward([Step(s, 0, tokens=np.array(p)) for s, p in enumerate(prompts)])
            return every, last
        finally:
            st.close()

    few = Stage(path, Settings(sessions=4, context=128, batch_tokens=128, threads=THREADS, outputs=4))
    try:    # the decodes' row ranges: at most 4 outputs, at most 128 rows; nothing for no rows
        assert few._slices([1] * 10) == [(0, 4), (4, 8), (8, 10)]
        assert few._slices([0, 0, 1, 0, 0, 1, 0, 1, 0, 1, 0, 1]) == [(0, 11), (11, 12)]
        assert few._slices([0] * 200 + [1]) == [(0, 101), (101, 201)]      # rows alone cut it: even slices
        assert few._slices([0] * 256) == [(0, 128), (128, 256)]
        assert few._slices([0] * 300) == [(0, 100), (100, 200), (200, 300)]   # not 128, 128 and 44
        assert few._slices([]) == []
    finally:
        few.close()
    few_every, few_last = run(4)
    all_every, all_last = run(0)
    assert few_every.shape == all_every.shape == (len(ref_prompt), 4096)
    assert [int(r.argmax()) for r in few_every] == [int(r.argmax()) for r in all_every]
    assert len(few_last) == len(all_last) == len(prompts)
    assert all(np.array_equal(a, b) for a, b in zip(few_last, all_last))


def test_a_stage_holds_more_sessions_than_its_batch_has_rows(reference_model, tmp_path):
    """llama.cpp requires a context to be sized for a row of output per session; a stage made
    for 8 sessions and 4-token batches loads (it aborted the process before) and takes a
    step of every session."""
    first, last = shards_of(reference_model, ["Q8_0"] * 8, [(0, 4), (4, 8)], tmp_path)
    settings = Settings(sessions=8, context=64, batch_tokens=4, threads=THREADS)
    a, b = Stage(first, settings), Stage(last, settings)
    try:
        hidden = a.forward([Step(s, 0, tokens=np.array([s + 1, s + 2])) for s in range(8)])
        logits = b.forward([Step(s, 0, hidden=h) for s, h in enumerate(hidden)])
    finally:
        a.close()
        b.close()
    assert [h.shape for h in hidden] == [(2, a.n_embd)] * 8
    assert [x.shape for x in logits] == [(1, 4096)] * 8 and all(np.isfinite(x).all() for x in logits)


def test_split_evenly():
    assert split_evenly(8, 3) == [(0, 3), (3, 5), (5, 8)]
    with pytest.raises(ValueError):
        split_evenly(8, 9)


def test_bad_files_give_one_clear_sentence(tmp_path, reference_model):
    with pytest.raises(ValueError, match="does not exist"):
        Stage(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match="not a GGUF file"):
        Stage(junk)
    truncated = tmp_path / "trunc.gguf"
    truncated.write_bytes(reference_model.read_bytes()[:100_000])
    with pytest.raises(ValueError, match="not a readable GGUF"):
        Stage(truncated)
    shard = shards_of(reference_model, ["F16"] * 8, [(0, 3)], tmp_path)[0]
    with pytest.raises(ValueError, match="is a shard"):
        write_shard(shard, tmp_path / "x.gguf", ["F16"] * 8)


# ------------------------------------------------------------------ huge pages

def test_anonymous_ranges_keep_whole_huge_pages_of_private_anonymous_mappings():
    mib2 = 2 << 20
    maps = "\n".join([
        f"{mib2 * 3 + 4096:x}-{mib2 * 8 + 8192:x} rw-p 00000000 00:00 0 ",          # trimmed to [4, 8) MiB-blocks
        f"{mib2 * 10:x}-{mib2 * 12:x} rw-p 00000000 00:00 0                          [heap]",
        f"{mib2 * 20:x}-{mib2 * 24:x} r--p 00000000 00:00 0 ",                       # not writable
        f"{mib2 * 30:x}-{mib2 * 34:x} rw-s 00000000 00:01 77                         /dev/zero (deleted)",
        f"{mib2 * 40:x}-{mib2 * 44:x} rw-p 00001000 fe:00 123                        /lib/x.so",
        f"{mib2 * 50 + 4096:x}-{mib2 * 51 + 4096:x} rw-p 00000000 00:00 0 ",          # no whole block inside
    ])
    assert anonymous_ranges(maps, mib2) == [(mib2 * 4, mib2 * 8), (mib2 * 10, mib2 * 12)]


def test_filled_blocks_take_only_blocks_whose_every_page_is_present_and_owned():
    page, huge = 4096, 4 * 4096
    own, absent, zero = PRESENT | EXCLUSIVE, 0, PRESENT     # the shared zero page: present, not exclusive
    entries = np.array([own, own, own, own,  own, own, own, own,  own, absent, own, own,
                        own, own, zero, own,  own, own, own, own], dtype=np.uint64)
    base = 1 << 30
    assert filled_blocks(base, entries, huge, page) == [base, base + huge, base + 4 * huge]


def _owned(addr: int, size: int) -> int:
    """Pages of [addr, addr + size) in memory and this mapping's own (/proc/self/pagemap)."""
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // mmap.PAGESIZE * 8)
        entries = np.frombuffer(f.read(size // mmap.PAGESIZE * 8), dtype="<u8")
    return int(((entries & np.uint64(PRESENT | EXCLUSIVE)) == np.uint64(PRESENT | EXCLUSIVE)).sum())


def _huge_kb(lo: int, hi: int) -> int:
    """AnonHugePages (kB) of the mappings that overlap [lo, hi) (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and len(head) >= 5:
            a, b = (int(x, 16) for x in head[0].split("-"))
            inside = a < hi and lo < b
        elif inside and head[0] == "AnonHugePages:":
            total += int(head[1])
    return total


def test_huge_pages_back_filled_memory_and_add_none():
    huge = int(HUGE_PAGE_SIZE.read_text())       # this project's machines: 2 MiB (x86-64, Linux 6.18)
    size = 8 * huge
    anonymous = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    filled = mmap.mmap(-1, size, flags=anonymous)
    filled.write(b"\x01" * size)                 # every page written
    sparse = mmap.mmap(-1, size, flags=anonymous)
    for i in range(0, size, huge):                # as a thread's stack: a page written in each block
        sparse[i] = 1
    read_only = mmap.mmap(-1, size, flags=anonymous)
    assert read_only[:size] == bytes(size)        # every page read, none written: the shared zero page
    a = ctypes.addressof(ctypes.c_char.from_buffer(filled))
    b = ctypes.addressof(ctypes.c_char.from_buffer(sparse))
    c = ctypes.addressof(ctypes.c_char.from_buffer(read_only))
    before = _owned(b, size), _owned(c, size)
    assert before == (8, 0)
    assert use_huge_pages() >= size - huge        # at least the filled mapping's aligned blocks
    assert _huge_kb(a, a + size) * 1024 >= size - huge
    assert (_owned(b, size), _owned(c, size)) == before      # nothing added where pages were missing or shared
    assert filled[:size] == b"\x01" * size        # the same contents, in fewer, larger pages


def test_a_loaded_stage_holds_its_weights_in_huge_pages(reference_model):
    # in a fresh process: in this one, earlier stages' freed memory, already in huge pages, is reused
    code = textwrap.dedent(f"""
        from pathlib import Path
        from agent.runtime import Settings, Stage

        def huge_kb():
            rollup = Path("/proc/self/smaps_rollup").read_text().splitlines()
            return int(next(line.split()[1] for line in rollup if line.startswith("AnonHugePages:")))

        before = huge_kb()
        stage = Stage({str(reference_model)!r}, Settings(sessions=2, context=64, batch_tokens=32, threads=1))
        print(before, huge_kb())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    before, after = map(int, out.stdout.split()[-2:])
    assert (after - before) * 1024 >= reference_model.stat().st_size // 2    # the reference model's 16 MB: most of it


def test_stages_and_the_reference_hold_weights_in_plain_cpu_buffers(reference_model, tmp_path, caplog):
    """No weight goes to llama.cpp's extra buffer types (AMX, repacked layouts): on an AMX CPU
    their kernels crashed a Q8_0 stage, and llama.cpp's RPC servers hold plain buffers too
    (agent/runtime.py, model_params). Q4_0 and Q8_0 are types that both AMX and x86's
    repacking take where the CPU has them."""
    import logging

    from agent.runtime import whole_model

    whole = write_shard(reference_model, tmp_path / "mixed.gguf", parse_types("0-3:Q4_0,4-7:Q8_0", 8)).path
    caplog.set_level(logging.DEBUG, logger="llama.cpp")
    st = Stage(whole, SETTINGS)
    try:
        row = st.forward([Step(0, 0, tokens=np.arange(1, 9, dtype=np.int32))])[0][-1]
    finally:
        st.close()
    llm = whole_model(whole, n_ctx=64, n_batch=64, n_ubatch=64, n_threads=1, verbose=False)
    llm.close()
    buffers = re.findall(r"(\S+) model buffer size", caplog.text)
    assert len(buffers) >= 2 and set(buffers) <= {"CPU", "CPU_Mapped"}, buffers
    assert np.isfinite(row).all()
