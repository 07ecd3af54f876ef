"""Build the reference model: tokenizer, training, GGUF export.

    python -m models.train prepare --out .train          # corpus -> tokenizer + token ids
    python -m models.train train --data .train --out .train [--steps N] [--device cuda]
    python -m models.train export --data .train --ckpt .train/best.pt --out models/reference/edgefleet-ref-f16.gguf

`prepare` and `export` run on any machine; `train` takes ~2 minutes on one GPU and hours
on 2 CPU cores. The architecture is llama (GQA, SwiGLU, RMSNorm, RoPE on adjacent pairs as
llama.cpp's LLAMA rope type expects, so Q/K need no permutation on export).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F



def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x [..., d], weight [d]
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope_angles(positions: torch.Tensor, head_dim: int, base: float) -> torch.Tensor:
    """Rotation angles [T, D/2] for absolute positions [T]."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return positions.to(torch.float64)[:, None] * inv_freq[None, :]


def apply_rope(x: torch.Tensor, angles: torch.Tensor, neox: bool) -> torch.Tensor:
    """Rotate x [T, heads, D] by angles [T, D/2]: adjacent pairs (llama) or halves (neox)."""
    cos = torch.cos(angles).to(x.dtype)[:, None, :]
    sin = torch.sin(angles).to(x.dtype)[:, None, :]
    if neox:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


@dataclass(frozen=True)
class RefConfig:
    n_vocab: int = 4096      # SentencePiece BPE vocabulary incl. 256 byte tokens
    n_embd: int = 256        # hidden size (multiple of 256: K-quants apply to every matrix)
    n_layer: int = 8
    n_head: int = 8          # head dim 32
    n_head_kv: int = 2       # GQA: 4 query heads per kv head
    n_ff: int = 768          # SwiGLU inner size (multiple of 256)
    n_ctx: int = 1024        # training and declared context length
    rope_base: float = 10000.0
    rms_eps: float = 1e-5
    dropout: float = 0.1


# ------------------------------------------------------------------ tokenizer + data

def prepare(out: Path, vocab: int = RefConfig.n_vocab) -> None:
    import sentencepiece as spm

    from models.corpus import DOC_SEPARATOR, documents, split

    out.mkdir(parents=True, exist_ok=True)
    train, held = split(documents())
    (out / "train.txt").write_text(DOC_SEPARATOR.join(train), encoding="utf-8")
    (out / "heldout.txt").write_text(DOC_SEPARATOR.join(held), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(out / "train.txt"), model_prefix=str(out / "tokenizer"), vocab_size=vocab,
        model_type="bpe", byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, max_sentence_length=1 << 16,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=2, minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    for name, texts in (("train", train), ("heldout", held)):
        ids: list[int] = []
        for text in texts:  # whole documents, as llama.cpp tokenizes them (one dummy prefix)
            ids.append(sp.bos_id())
            ids.extend(sp.encode(text))
        np.save(out / f"{name}.npy", np.array(ids, dtype=np.uint16))
        print(f"{name}: {len(texts)} documents, {len(ids)} tokens")


# ------------------------------------------------------------------ model (training form)

class Block(nn.Module):
    def __init__(self, c: RefConfig):
        super().__init__()
        hd = c.n_embd // c.n_head
        self.c = c
        self.attn_norm = nn.Parameter(torch.ones(c.n_embd))
        self.attn_q = nn.Linear(c.n_embd, c.n_head * hd, bias=False)
        self.attn_k = nn.Linear(c.n_embd, c.n_head_kv * hd, bias=False)
        self.attn_v = nn.Linear(c.n_embd, c.n_head_kv * hd, bias=False)
        self.attn_output = nn.Linear(c.n_head * hd, c.n_embd, bias=False)
        self.ffn_norm = nn.Parameter(torch.ones(c.n_embd))
        self.ffn_gate = nn.Linear(c.n_embd, c.n_ff, bias=False)
        self.ffn_up = nn.Linear(c.n_embd, c.n_ff, bias=False)
        self.ffn_down = nn.Linear(c.n_ff, c.n_embd, bias=False)

    def forward(self, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        c = self.c
        B, T, _ = x.shape
        hd = c.n_embd // c.n_head
        h = rms_norm(x, self.attn_norm, c.rms_eps)
        q = apply_rope(self.attn_q(h).view(B * T, c.n_head, hd), angles, False).view(B, T, c.n_head, hd)
        k = apply_rope(self.attn_k(h).view(B * T, c.n_head_kv, hd), angles, False).view(B, T, c.n_head_kv, hd)
        v = self.attn_v(h).view(B, T, c.n_head_kv, hd)
        rep = c.n_head // c.n_head_kv
        q, k, v = q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(rep, 1), v.transpose(1, 2).repeat_interleave(rep, 1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=c.dropout if self.training else 0.0)
        x = x + F.dropout(self.attn_output(o.transpose(1, 2).reshape(B, T, -1)), c.dropout, self.training)
        h = rms_norm(x, self.ffn_norm, c.rms_eps)
        return x + F.dropout(self.ffn_down(F.silu(self.ffn_gate(h)) * self.ffn_up(h)), c.dropout, self.training)


class RefModel(nn.Module):
    def __init__(self, c: RefConfig):
        super().__init__()
        self.c = c
        self.token_embd = nn.Embedding(c.n_vocab, c.n_embd)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.output_norm = nn.Parameter(torch.ones(c.n_embd))
        self.output = nn.Linear(c.n_embd, c.n_vocab, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        for b in self.blocks:  # scaled init of residual projections
            nn.init.normal_(b.attn_output.weight, std=0.02 / math.sqrt(2 * c.n_layer))
            nn.init.normal_(b.ffn_down.weight, std=0.02 / math.sqrt(2 * c.n_layer))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        hd = self.c.n_embd // self.c.n_head
        pos = torch.arange(T, device=ids.device).repeat(B)
        angles = rope_angles(pos.cpu(), hd, self.c.rope_base).to(torch.float32).to(ids.device)
        x = self.token_embd(ids)
        for b in self.blocks:
            x = b(x, angles)
        return self.output(rms_norm(x, self.output_norm, self.c.rms_eps))


# ------------------------------------------------------------------ training

def _batches(data: np.ndarray, batch: int, seq: int, gen: np.random.Generator):
    starts = gen.integers(0, len(data) - seq - 1, size=batch)
    x = np.stack([data[s:s + seq] for s in starts]).astype(np.int64)
    y = np.stack([data[s + 1:s + seq + 1] for s in starts]).astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


@torch.no_grad()
def evaluate(model: RefModel, data: np.ndarray, seq: int, device: str) -> float:
    """Mean NLL per token over consecutive windows of the held-out stream."""
    model.eval()
    total, count = 0.0, 0
    for s in range(0, len(data) - seq - 1, seq):
        x = torch.from_numpy(data[s:s + seq].astype(np.int64))[None].to(device)
        y = torch.from_numpy(data[s + 1:s + seq + 1].astype(np.int64))[None].to(device)
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=device != "cpu"):
            logits = model(x)
        total += F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1), reduction="sum").item()
        count += y.numel()
    model.train()
    return total / count


def train(data: Path, out: Path, steps: int, batch: int, lr: float, device: str, seed: int = 0) -> None:
    torch.manual_seed(seed)
    c = RefConfig()
    tr, he = np.load(data / "train.npy"), np.load(data / "heldout.npy")
    model = RefModel(c).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params / 1e6:.2f} M; train tokens {len(tr)}, held-out tokens {len(he)}")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), fused=device.startswith("cuda"))
    gen = np.random.default_rng(seed)
    warmup = max(1, steps // 20)
    best, log = float("inf"), []
    t0 = time.time()
    for step in range(1, steps + 1):
        scale = step / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        for g in opt.param_groups:
            g["lr"] = lr * max(scale, 0.05)
        x, y = (t.to(device) for t in _batches(tr, batch, c.n_ctx, gen))
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=device != "cpu"):
            logits = model(x)
        loss = F.cross_entropy(logits.float().view(-1, c.n_vocab), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps:
            val = evaluate(model, he, c.n_ctx, device)
            log.append({"step": step, "train_loss": loss.item(), "heldout_nll": val, "seconds": time.time() - t0})
            print(f"step {step}: train {loss.item():.3f} held-out NLL {val:.3f} (ppl {math.exp(val):.2f}) {time.time() - t0:.0f}s", flush=True)
            if val < best:
                best = val
                # matrices as float16 (what the GGUF stores anyway), so the file stays < 16 MiB
                state = {k: v.detach().cpu().half() if v.dim() == 2 else v.detach().cpu() for k, v in model.state_dict().items()}
                torch.save({"config": asdict(c), "state": state, "step": step, "heldout_nll": val}, out / "best.pt")
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    print(f"best held-out NLL {best:.4f} (perplexity {math.exp(best):.2f})")


# ------------------------------------------------------------------ export to GGUF

def export(data: Path, ckpt: Path, out: Path) -> None:
    import gguf
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    blob = torch.load(ckpt, map_location="cpu", weights_only=False)
    c = RefConfig(**blob["config"])
    state = {k: v.float().numpy() for k, v in blob["state"].items()}
    proto = sp_pb2.ModelProto()
    proto.ParseFromString((data / "tokenizer.model").read_bytes())
    sp = spm.SentencePieceProcessor(model_file=str(data / "tokenizer.model"))

    out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("edgefleet-ref")
    w.add_description(f"edgefleet reference model: {c.n_layer} layers, trained on CPython docs; "
                      f"held-out NLL {blob['heldout_nll']:.4f} at step {blob['step']}")
    w.add_block_count(c.n_layer)
    w.add_context_length(c.n_ctx)
    w.add_embedding_length(c.n_embd)
    w.add_feed_forward_length(c.n_ff)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.n_head_kv)
    w.add_rope_dimension_count(c.n_embd // c.n_head)
    w.add_rope_freq_base(c.rope_base)
    w.add_layer_norm_rms_eps(c.rms_eps)
    w.add_vocab_size(c.n_vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    kinds = {sp_pb2.ModelProto.SentencePiece.NORMAL: gguf.TokenType.NORMAL,
             sp_pb2.ModelProto.SentencePiece.UNKNOWN: gguf.TokenType.UNKNOWN,
             sp_pb2.ModelProto.SentencePiece.CONTROL: gguf.TokenType.CONTROL,
             sp_pb2.ModelProto.SentencePiece.USER_DEFINED: gguf.TokenType.USER_DEFINED,
             sp_pb2.ModelProto.SentencePiece.BYTE: gguf.TokenType.BYTE,
             sp_pb2.ModelProto.SentencePiece.UNUSED: gguf.TokenType.UNUSED}
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([p.piece.encode("utf-8") for p in proto.pieces])
    w.add_token_scores([p.score for p in proto.pieces])
    w.add_token_types([kinds[p.type] for p in proto.pieces])
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    f16 = lambda a: a.astype(np.float16)  # noqa: E731
    f32 = lambda a: a.astype(np.float32)  # noqa: E731
    w.add_tensor("token_embd.weight", f16(state["token_embd.weight"]))
    for i in range(c.n_layer):
        p = f"blocks.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", f32(state[p + "attn_norm"]))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            w.add_tensor(f"blk.{i}.{name}.weight", f16(state[p + name + ".weight"]))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", f32(state[p + "ffn_norm"]))
    w.add_tensor("output_norm.weight", f32(state["output_norm"]))
    w.add_tensor("output.weight", f16(state["output.weight"]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", type=Path, default=Path(".train"))
    t = sub.add_parser("train")
    t.add_argument("--data", type=Path, default=Path(".train"))
    t.add_argument("--out", type=Path, default=Path(".train"))
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    e = sub.add_parser("export")
    e.add_argument("--data", type=Path, default=Path(".train"))
    e.add_argument("--ckpt", type=Path, default=Path(".train/best.pt"))
    e.add_argument("--out", type=Path, default=Path("models/reference/edgefleet-ref-f16.gguf"))
    a = ap.parse_args()
    if a.cmd == "prepare":
        prepare(a.out)
    elif a.cmd == "train":
        a.out.mkdir(parents=True, exist_ok=True)
        train(a.data, a.out, a.steps, a.batch, a.lr, a.device)
    else:
        export(a.data, a.ckpt, a.out)


if __name__ == "__main__":
    main()
