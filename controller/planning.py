"""From what the operator has (a GGUF, a profile JSON or a catalog shape; a fleet file) to a
solver problem, and from a plan to the table they read."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from rich import box
from rich.table import Table

from agent import weights as W
from controller.sensitivity import cached_or_measured
from controller.shards import candidate_types, kept_layers, master_sha256
from solver.catalog import MODEL_SHAPES, model_profile
from solver.memory import unit_for
from solver.plan import Plan
from solver.problem import ModelProfile, Problem, load_model_profile, model_from_shape
from solver.request import PlacementRequest

Progress = Callable[[str, int, int], None]
BUNDLED_TEXT = Path(__file__).resolve().parent.parent / "models" / "reference" / "heldout.txt"
_PROFILES: dict[tuple, ModelProfile] = {}


def gguf_profile(path: Path, sensitivity: dict | None) -> ModelProfile:
    """Shapes from the GGUF's metadata, each layer's own type at its bytes as stored; sensitivity
    from a `model profile` result (None: zero for every type a layer may take, for timing
    predictions that do not involve the accuracy budget)."""
    reader = W.open_master(path)
    cfg = W.read_config(reader)
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    out = next((t for t in reader.tensors if t.name == "output.weight"), emb)   # the LM head's matrix
    if sensitivity is None:
        table = [{q: 0.0 for q in types} for types in candidate_types(path)]
        source, sha = "not measured", ""
    else:
        table = [sensitivity["sensitivity"][str(l)] for l in range(cfg.n_layer)]
        source, sha = f"measured on {sensitivity['eval_tokens']} held-out tokens", sensitivity["sha256"]
    return model_from_shape(path.name, cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_head_kv, cfg.n_ff, cfg.n_vocab,
                            cfg.tied_embeddings, table, master_type=emb.tensor_type.name,
                            head_type=out.tensor_type.name,
                            sensitivity_source=source, sha256=sha, kept=kept_layers(path))


def text_for(model: Path, text: str) -> Path:
    """The held-out text to measure a model's sensitivity on: the one given, else heldout.txt
    beside the model, else the English text that ships with the reference model."""
    if text:
        if not Path(text).is_file():
            raise ValueError(f"the held-out text {text} does not exist; give a plain-text file")
        return Path(text)
    beside = model.with_name("heldout.txt")
    return beside if beside.is_file() else BUNDLED_TEXT


def load_profile(request: PlacementRequest, progress: Progress | None = None) -> ModelProfile:
    """The request's model: a catalog shape (proxy sensitivity), a profile JSON, or a GGUF with
    its sensitivity table for the request's types (cached, shipped beside it, or measured
    now). A GGUF's profile is built once per master, token count and types."""
    arg = request.model
    if arg in MODEL_SHAPES:
        return model_profile(arg)
    p = Path(arg)
    if p.suffix == ".json":
        return load_model_profile(p)
    if not p.is_file():
        raise ValueError(f"model {arg} does not exist; give a GGUF file, a profile JSON or one of "
                         f"{', '.join(MODEL_SHAPES)}")
    types = request.options.types
    key = (master_sha256(p), request.tokens, types)
    if key not in _PROFILES:   # measured without the additivity check (`model profile` runs that)
        table, _ = cached_or_measured(p, text_for(p, request.text), types, request.tokens, validate=0,
                                      progress=progress, sha256=key[0])
        _PROFILES[key] = gguf_profile(p, table)
    return _PROFILES[key]


def plan_table(problem: Problem, plan: Plan) -> Table:
    """The plan, readable at 80 columns: times in ms, memory in the unit that fits."""
    w, o = problem.workload, problem.options
    pred = plan.prediction
    title = (f"{problem.model.name}: {len(plan.stages)} stages, {o.objective}, budget {o.max_ppl_increase:g} %, "
             f"{w.prompt_tokens}+{w.output_tokens} tokens × {w.concurrency}")
    t = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col, just in (("#", "right"), ("node", "left"), ("layers", "left"), ("types", "left"),
                      ("memory", "right"), ("prefill", "right"), ("ms/tok", "right"), ("link", "right")):
        t.add_column(col, justify=just)
    for i, (s, sp) in enumerate(zip(plan.stages, pred.stages)):
        t.add_row(str(i), s.node, f"{s.first}-{s.last - 1}", compact_types(s.types),
                  used_of(sp.memory, sp.memory_available), f"{sp.prefill_s * 1e3:.1f}",
                  f"{sp.decode_s * 1e3:.2f}", f"{sp.transfer_s * 1e3:.1f}")
    t.caption = (f"predicted: TTFT {pred.ttft_s * 1e3:.1f} ms, {pred.tpot_s * 1e3:.2f} ms/token, request "
                 f"{pred.latency_s:.3f} s, {pred.tokens_per_s:.1f} tokens/s at {w.concurrency} in flight; "
                 f"perplexity +{pred.ppl_increase_pct:.2f} % (ΔNLL {pred.dnll:.4f}, "
                 f"{problem.model.sensitivity_source}); prefill, link: ms per request\nsolver {plan.solver}: "
                 f"{plan.status}, objective {plan.objective:.6g} s, bound {plan.bound:.6g} s, gap "
                 f"{100 * plan.gap:.3f} %, {plan.solve_s:.2f} s")
    return t


def deployed_table(plan: Plan, title: str, unit: str = "GiB") -> Table:
    """The stages of a deployed plan (from its JSON, with the prediction it was saved with),
    readable at 80 columns. The caller sets the caption."""
    t = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col in ("stage", "node", "layers", "types", "memory", "ms/token"):
        t.add_column(col, justify="right" if col in ("memory", "ms/token") else "left")
    for i, (s, sp) in enumerate(zip(plan.stages, plan.prediction.stages)):
        t.add_row(str(i), s.node, f"{s.first}-{s.last - 1}", compact_types(s.types),
                  used_of(sp.memory, sp.memory_available), f"{sp.decode_s * 1e3:.2f}")
    return t


def used_of(used: float, offered: float) -> str:
    """'12.3/16.0 MiB' or '1.20/4.00 GiB': the unit that fits the larger figure."""
    unit, scale, digits = unit_for(max(used, offered))
    return f"{used / scale:.{digits}f}/{offered / scale:.{digits}f} {unit}"


def compact_types(types: tuple[str, ...]) -> str:
    """('Q4_K','Q4_K','Q2_K') -> 'Q4_K×2,Q2_K': runs in layer order, or, when there are more
    than three runs, how many layers have each type."""
    out: list[list] = []
    for q in types:
        if out and out[-1][0] == q:
            out[-1][1] += 1
        else:
            out.append([q, 1])
    if len(out) > 3:
        out = [[q, types.count(q)] for q in dict.fromkeys(types)]
    return ",".join(q if k == 1 else f"{q}×{k}" for q, k in out)
