"""The `edgefleet` command line.

Errors a user can cause surface as one sentence on stderr and exit code 2; library code
raises ValueError with that sentence, and `main()` turns it into the exit.
"""
from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

log = logging.getLogger("edgefleet")
# Tables are wide; when output is not a terminal, do not squeeze them into 80 columns.
console = Console() if sys.stdout.isatty() else Console(width=200)
err_console = Console(stderr=True, soft_wrap=True)

REFERENCE_MODEL = Path(__file__).resolve().parent.parent / "models" / "reference" / "edgefleet-ref-f16.gguf"
HELDOUT_TEXT = REFERENCE_MODEL.parent / "heldout.txt"


class UserError(click.ClickException):
    exit_code = 2

    def show(self, file=None) -> None:  # one line, no traceback
        err_console.print(f"[bold red]error:[/] {self.message}", highlight=False)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.version_option(package_name="edgefleet")
def cli(verbose: int) -> None:
    """edgefleet: run one LLM across a fleet of small, unequal machines.

    Placement and per-layer GGUF precision are chosen together by an integer program
    under memory limits and an accuracy budget.
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# ------------------------------------------------------------------ model ...

@cli.group()
def model() -> None:
    """Inspect GGUF models, build shards, measure per-layer sensitivity."""


@model.command("info")
@click.argument("model_path", metavar="MODEL.gguf", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def model_info(model_path: Path, as_json: bool) -> None:
    """Architecture, layer count and per-layer tensor types of a GGUF model or shard."""
    from agent import weights as W

    reader = W.open_gguf(model_path)
    cfg = W.read_config(reader)
    first, last = W.stage_range(reader, cfg)
    layer_types = {}
    for t in reader.tensors:
        if t.name.startswith("blk.") and t.name.endswith("ffn_down.weight"):
            layer_types[int(t.name.split(".")[1])] = t.tensor_type.name
    info = {"path": str(model_path), "config": cfg.__dict__, "layers": [first, last],
            "layer_types": [layer_types[i] for i in sorted(layer_types)],
            "tensor_bytes": int(sum(int(t.n_bytes) for t in reader.tensors))}
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    table = Table(title=f"{model_path.name}: {cfg.arch}, {cfg.n_layer} layers, d={cfg.n_embd}, "
                        f"heads {cfg.n_head}/{cfg.n_head_kv}, ffn {cfg.n_ff}, vocab {cfg.n_vocab}")
    table.add_column("layers")
    table.add_column("types")
    table.add_column("tensor bytes", justify="right")
    table.add_row(f"[{first}, {last})", ",".join(info["layer_types"]), f"{info['tensor_bytes']:,}")
    console.print(table)


@model.command("shard")
@click.argument("master", metavar="MASTER.gguf", type=click.Path(path_type=Path))
@click.option("--types", "types_spec", required=True,
              help='Per-layer GGUF types: "Q4_K" for all, one per layer "Q8_0,Q4_K,...", or ranges "0-3:Q8_0,4-7:Q4_K".')
@click.option("--layers", default=None, help="Layer range FIRST:LAST (LAST exclusive); default all layers.")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Output GGUF file.")
def model_shard(master: Path, types_spec: str, layers: str | None, out: Path) -> None:
    """Build a shard (or a whole mixed-precision model) from a master GGUF.

    Quantization uses llama.cpp's own quantizers; a whole-model file loads in llama.cpp.
    """
    from agent import weights as W
    from controller.shards import parse_types, write_shard

    cfg = W.read_config(W.open_gguf(master))
    types = parse_types(types_spec, cfg.n_layer)
    first, last = 0, cfg.n_layer
    if layers:
        try:
            a, b = layers.split(":")
            first, last = int(a), int(b)
        except ValueError:
            raise ValueError(f"bad --layers {layers!r}; write FIRST:LAST, e.g. 0:4") from None
    info = write_shard(master, out, types, first, last)
    console.print(f"wrote {info.path} layers [{info.first}, {info.last}) "
                  f"types {','.join(info.layer_types)}: {info.bytes:,} bytes, sha256 {info.sha256[:16]}…")


@model.command("profile")
@click.argument("model_path", metavar="MODEL.gguf", type=click.Path(path_type=Path))
@click.option("--text", "text_path", type=click.Path(path_type=Path), default=None,
              help="Held-out text to measure on (default: the reference model's held-out split).")
@click.option("--tokens", default=2048, show_default=True, help="Held-out tokens to evaluate (512-token windows).")
@click.option("--types", "types_csv", default=None,
              help="Comma-separated GGUF types to measure (default: every supported layer type).")
@click.option("--validate", default=20, show_default=True, help="Random mixed configurations for the additivity check.")
@click.option("--seed", default=0, show_default=True)
@click.option("--force", is_flag=True, help="Measure again even if a cached table exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole result as JSON.")
def model_profile(model_path: Path, text_path: Path | None, tokens: int, types_csv: str | None, validate: int,
                  seed: int, force: bool, as_json: bool) -> None:
    """Per-layer sensitivity: held-out NLL increase when only one layer is quantized.

    Also checks the additive model (predicted Σ vs measured ΔNLL on random mixed
    configurations) and caches the result as JSON keyed by the GGUF's SHA-256.
    """
    from agent.quant import LAYER_TYPES
    from controller import sensitivity as S

    types = LAYER_TYPES if types_csv is None else tuple(t.strip() for t in types_csv.split(",") if t.strip())
    for t in types:
        if t not in LAYER_TYPES:
            raise ValueError(f"unsupported GGUF type {t!r}; choose from {', '.join(LAYER_TYPES)}")
    with progress_bar() as progress:
        result, measured = S.cached_or_measured(model_path, text_path or HELDOUT_TEXT, types, tokens, validate, seed,
                                                progress, force=force)
    if measured:
        err_console.print(f"cached {S.cache_path(result['sha256'])}")
    else:
        err_console.print(f"using cached {S.cache_path(result['sha256'])} (--force to measure again)")
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    print_sensitivity(result)


@contextlib.contextmanager
def progress_bar():
    """A rich progress display on stderr; yields progress(what, done, total)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn(), console=err_console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total)
            bar.update(tasks[what], completed=done)

        yield progress


# ------------------------------------------------------------------ plan

@cli.command()
@click.option("--model", "model_arg", required=True, metavar="MODEL",
              help="MODEL.gguf (sensitivity measured and cached), a profile JSON, or a catalog shape "
                   "(llama-3.1-8b, qwen2.5-7b, llama-3-70b, …).")
@click.option("--fleet", "fleet_path", required=True, type=click.Path(path_type=Path), help="Fleet file (YAML/TOML).")
@click.option("--max-ppl-increase", default=5.0, show_default=True, help="Accuracy budget, % perplexity increase.")
@click.option("--objective", type=click.Choice(["latency", "throughput"]), default="latency", show_default=True)
@click.option("--prompt-tokens", default=512, show_default=True)
@click.option("--output-tokens", default=128, show_default=True)
@click.option("--concurrency", default=1, show_default=True, help="Sequences in flight (KV cache, batch).")
@click.option("--context", default=0, help="KV-cache tokens per sequence (default prompt + output).")
@click.option("--types", "types_csv", default="", help="Allowed layer types, comma-separated (default all).")
@click.option("--pin", multiple=True, help="Node that must hold a stage (repeatable).")
@click.option("--exclude", multiple=True, help="Node that must not be used (repeatable).")
@click.option("--max-stages", default=0, help="At most this many stages (0: no limit).")
@click.option("--solver", type=click.Choice(["highs", "cbc"]), default="highs", show_default=True)
@click.option("--time-limit", default=60.0, show_default=True, help="Seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Also write the plan JSON here.")
@click.option("--save-profile", type=click.Path(path_type=Path), default=None, help="Write the model profile JSON here.")
@click.option("--tokens", default=2048, show_default=True, help="Held-out tokens if sensitivity must be measured.")
def plan(model_arg, fleet_path, max_ppl_increase, objective, prompt_tokens, output_tokens, concurrency, context,
         types_csv, pin, exclude, max_stages, solver, time_limit, as_json, out, save_profile, tokens) -> None:
    """Choose placement and per-layer types for a model on a fleet file (offline)."""
    from controller.planning import load_profile, plan_table
    from solver import solve
    from solver.problem import Options, Problem, Workload, load_fleet

    fleet = load_fleet(fleet_path)
    with progress_bar() as progress:
        model = load_profile(model_arg, HELDOUT_TEXT, tokens, progress)
    if save_profile:
        save_profile.write_text(model.to_json())
    types = tuple(t.strip() for t in types_csv.split(",") if t.strip())
    problem = Problem(model, fleet, Workload(prompt_tokens, output_tokens, concurrency, context),
                      Options(objective=objective, max_ppl_increase=max_ppl_increase, types=types, pinned=pin,
                              excluded=exclude, max_stages=max_stages, solver=solver, time_limit=time_limit))
    result = solve(problem)
    if out:
        out.write_text(result.to_json())
    if not result.ok:
        raise UserError(result.message)
    if as_json:
        click.echo(result.to_json())
        return
    console.print(plan_table(problem, result))


def print_sensitivity(result: dict) -> None:
    table = Table(title=f"ΔNLL per token when only one layer is quantized "
                        f"(base NLL {result['base_nll']:.4f}, perplexity {result['base_perplexity']:.2f}, "
                        f"{result['eval_tokens']} held-out tokens)")
    types = list(next(iter(result["sensitivity"].values())).keys())
    table.add_column("layer", justify="right")
    for t in types:
        table.add_column(t, justify="right")
    for layer, row in result["sensitivity"].items():
        table.add_row(layer, *(f"{row[t]:+.4f}" if t in row else "" for t in types))
    console.print(table)
    v = result["validation"]
    if v.get("configs"):
        console.print(
            f"additivity on {len(v['configs'])} random mixed configurations: correlation {v['correlation']:.3f}, "
            f"max |predicted - measured| {v['max_abs_error']:.4f} nats, mean error {v['mean_error']:+.4f}; "
            f"calibrated (measured ≈ {v['calibration']:.3f} × Σ, leave-one-out) max error "
            f"{v['calibrated_max_abs_error_loo']:.4f}, mean {v['calibrated_mean_error_loo']:+.4f}")


@cli.command()
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=REFERENCE_MODEL, show_default=True,
              help="Master GGUF to split.")
@click.option("--types", "types_spec", default="0-2:Q8_0,3-5:Q4_K,6-7:Q6_K", show_default=True,
              help="Per-layer GGUF types (same syntax as `model shard`).")
@click.option("--stages", default=3, show_default=True, help="Number of pipeline stages.")
@click.option("--prompt", default="The list type", show_default=True)
@click.option("--max-tokens", default=48, show_default=True)
def demo(model_path: Path, types_spec: str, stages: int, prompt: str, max_tokens: int) -> None:
    """Split a model into mixed-precision shards and generate through the stages.

    Runs the stages in this process (the multi-agent fleet demo needs the controller).
    """
    import tempfile
    import time

    from agent import weights as W
    from agent.pipeline import LocalPipeline, split_evenly
    from agent.tokenizer import Tokenizer
    from controller.shards import file_sha256, parse_types, write_shard

    cfg = W.read_config(W.open_gguf(model_path))
    types = parse_types(types_spec, cfg.n_layer)
    master_sha = file_sha256(model_path)
    table = Table(title=f"{model_path.name} in {stages} stages")
    for col in ("stage", "layers", "types", "shard bytes"):
        table.add_column(col)
    with tempfile.TemporaryDirectory(prefix="edgefleet-demo-") as tmp:
        shards = []
        for i, (a, b) in enumerate(split_evenly(cfg.n_layer, stages)):
            info = write_shard(model_path, Path(tmp) / f"stage{i}.gguf", types, a, b, master_sha)
            shards.append(info.path)
            table.add_row(str(i), f"[{a}, {b})", ",".join(info.layer_types), f"{info.bytes:,}")
        console.print(table)
        pipe = LocalPipeline.from_files(shards)
        tok = Tokenizer(model_path)
        ids = tok.encode(prompt)
        console.print(f"[bold]{prompt}[/]", end="")
        t0 = time.perf_counter()
        out: list[int] = []
        text = tok.stream()
        for t in pipe.generate(ids, max_tokens, eos=tok.eos):
            out.append(t)
            console.print(text.decode(tok.piece(t)), end="", highlight=False, markup=False)
        dt = time.perf_counter() - t0
        console.print(f"\n{len(out)} tokens in {dt:.2f} s: {len(out) / dt:.1f} tokens/s (prompt {len(ids)} tokens)")


# ------------------------------------------------------------------ agent

def security_options(f):
    """--token and the three --tls-* options, shared by every command that talks gRPC."""
    f = click.option("--tls-ca", type=click.Path(path_type=Path), default=None,
                     help="CA certificate that signed the fleet's certificates (mutual TLS).")(f)
    f = click.option("--tls-key", type=click.Path(path_type=Path), default=None, help="This side's TLS key.")(f)
    f = click.option("--tls-cert", type=click.Path(path_type=Path), default=None,
                     help="This side's TLS certificate.")(f)
    f = click.option("--token", envvar="EDGEFLEET_TOKEN", default="",
                     help="Fleet token (also $EDGEFLEET_TOKEN); calls without it are refused.")(f)
    return f


def make_security(token: str, tls_cert: Path | None, tls_key: Path | None, tls_ca: Path | None):
    from proto.security import Security

    return Security(token, tls_cert, tls_key, tls_ca)


@cli.command()
@click.option("--controller", required=True, metavar="HOST:PORT",
              help="Controller to register with (\"\" to run unmanaged).")
@click.option("--name", required=True, help="Unique node name in the fleet.")
@click.option("--listen", default="0.0.0.0:50061", show_default=True, metavar="HOST:PORT",
              help="Where the agent serves (port 0: any free port).")
@click.option("--advertise", default="", metavar="HOST:PORT", help="Address announced to the controller.")
@click.option("--memory", default="4GiB", show_default=True, help="Memory the agent may use for shards + KV cache.")
@click.option("--threads", default=0, help="Compute threads (default: all cores).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Where shards are kept (default ~/.edgefleet/agent-NAME).")
@click.option("--emulate-bandwidth", default=None, metavar="RATE",
              help="Shape what this agent sends to RATE, e.g. 100Mbit (one-machine fleets).")
@click.option("--emulate-latency", default=None, metavar="TIME", help="Delay every message sent, e.g. 5ms.")
@click.option("--session-timeout", default="300s", show_default=True, help="Free an idle session's KV cache after this.")
@security_options
def agent(controller, name, listen, advertise, memory, threads, data_dir, emulate_bandwidth, emulate_latency,
          session_timeout, token, tls_cert, tls_key, tls_ca) -> None:
    """Run the edge daemon: store shards, run pipeline stages, report to the controller."""
    from agent.daemon import AgentConfig, serve, setup_logging
    from solver.problem import parse_quantity

    cfg = AgentConfig(
        name=name, controller=controller, listen=listen, advertise=advertise,
        memory_bytes=int(parse_quantity(memory, "--memory")), threads=threads,
        data_dir=data_dir or Path(f"~/.edgefleet/agent-{name}"),
        security=make_security(token, tls_cert, tls_key, tls_ca),
        emulate_bandwidth=parse_quantity(emulate_bandwidth, "--emulate-bandwidth") if emulate_bandwidth else None,
        emulate_latency=parse_quantity(emulate_latency, "--emulate-latency") if emulate_latency else 0.0,
        session_timeout_s=parse_quantity(session_timeout, "--session-timeout"))
    if cfg.memory_bytes <= 0:
        raise UserError("--memory must be positive, e.g. 4GiB")
    setup_logging(logging.getLogger().getEffectiveLevel() < logging.WARNING)
    sys.exit(serve(cfg))


def main() -> None:
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except click.ClickException as exc:
        if not isinstance(exc, UserError):
            exc = UserError(exc.format_message())
        exc.show()
        sys.exit(exc.exit_code)
    except (ValueError, FileNotFoundError, PermissionError) as exc:
        UserError(str(exc)).show()
        sys.exit(2)
    except SystemExit:
        raise


if __name__ == "__main__":
    main()
