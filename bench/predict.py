"""Predicted vs measured TTFT and time per output token on a live SmolLM2 fleet.

The demo's fleet (a controller and four agents sized so that no two hold the model, emulated
links), SmolLM2-135M-Instruct (Q4_1 as shipped) deployed with the default placement request
for the requests' prompt and output lengths;
then requests one at a time (a chat question, 64 tokens, end-of-sequence ignored) and the
deployment's own prediction (what `edgefleet deploy` prints) next to the medians measured at
the client, the controller's gRPC stream.

    .venv/bin/python bench/predict.py [--requests 5] [--bandwidth 100Mbit] [--latency 2ms]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controller.chat import chat_tokens  # noqa: E402
from controller.demo import QUESTION, agents_for  # noqa: E402
from controller.local import local_fleet  # noqa: E402
from agent.tokenizer import Tokenizer  # noqa: E402
from models import smollm2  # noqa: E402
from proto import edgefleet_pb2 as pb  # noqa: E402
from proto import edgefleet_pb2_grpc as rpc  # noqa: E402
from proto.adapter import placement_pb  # noqa: E402
from solver.plan import plan_from_dict  # noqa: E402
from solver.request import PlacementRequest, Workload  # noqa: E402


def one_request(stub, ids: list[int], tokens: int) -> tuple[float, float]:
    """(TTFT, mean time per further token) of one request, seen at the client."""
    t0 = time.perf_counter()
    times = [time.perf_counter() for _ in stub.Generate(pb.GenerateRequest(prompt_tokens=ids, max_tokens=tokens,
                                                                           ignore_eos=True))]
    return times[0] - t0, (times[-1] - times[0]) / (len(times) - 1)


def probe_vs_stage(model: Path, work: Path) -> None:
    """The Profile RPC's per-layer times (agent/profile.py: copies of one layer, attention
    apart) as speeds (solver/problem.py:measured_speed) priced by the cost model
    (solver/cost.py:layer_step_s) against a real 20-layer stage of the same type, both on
    one thread in this process: a decode step at about 64 and at 448 cached positions,
    steps of 2 and 8 sessions' tokens at 74 positions, and a 512-token prefill."""
    import numpy as np

    from agent.profile import time_types
    from agent.runtime import Settings, Stage, Step, init_llama
    from controller.planning import gguf_profile
    from controller.shards import file_sha256, parse_types, write_shard
    from solver.cost import layer_step_s
    from solver.problem import Node, measured_speed

    init_llama()
    sha = file_sha256(model)
    probe = write_shard(model, work / "probe.gguf", ["F16"] * 30, 1, 2, sha).path
    timed = {t.gguf_type: t for t in time_types(probe, ["Q4_1", "Q4_0"], 64, 5, 1)}
    layer = gguf_profile(model, None).layers[9]
    x = np.random.default_rng(0).standard_normal((512, 576)).astype(np.float32)

    def report(what: str, predicted: float, real: float) -> None:
        print(f"  {what}: profile {predicted * 1e3:.3f} ms, a 20-layer stage {real * 1e3:.3f} ms "
              f"({100 * (predicted - real) / real:+.1f} %)")

    def per_layer(steps) -> float:
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            steps()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) / 20

    for q, t in timed.items():
        node = Node("probe", 1 << 30, {q: measured_speed(layer, q, t.decode_seconds_per_layer,
                                                         t.prefill_seconds_per_layer_token,
                                                         t.decode_attention_seconds_per_position,
                                                         t.prefill_attention_seconds_per_position,
                                                         t.batch_fixed_seconds_per_layer)})

        def priced(tokens: int, positions: float, decode: bool) -> float:
            return layer_step_s(node, layer, q, tokens, positions, decode)

        stage = Stage(write_shard(model, work / f"{q}.gguf", parse_types(q, 30), 9, 29, sha).path,
                      Settings(sessions=8, context=1024, batch_tokens=512, threads=1))
        prefill = []
        for _ in range(3):
            t0 = time.perf_counter()
            stage.forward([Step(0, 0, hidden=x)])
            prefill.append(time.perf_counter() - t0)
        for depth in (448, 64):       # the deeper first: a step replays from its position on
            real = per_layer(lambda: stage.forward([Step(0, depth + 10, hidden=x[:1])]))
            report(f"{q} decode per layer at {depth + 10} positions", priced(1, depth + 10, True), real)
        for s in range(1, 8):
            stage.forward([Step(s, 0, hidden=x[:74])])
        single = per_layer(lambda: stage.forward([Step(0, 74, hidden=x[:1])]))
        for b in (2, 8):
            together = per_layer(lambda: stage.forward([Step(s, 74, hidden=x[:1]) for s in range(b)]))
            # the engine runs the cheaper of one step of b sessions and b single steps
            report(f"{q} {b} sessions' decode step per layer at 74 positions (one step {together * 1e3:.3f} ms, "
                   f"{b} single steps {b * single * 1e3:.3f} ms)", priced(b, 74, True), min(together, b * single))
        report(f"{q} 512-token prefill per layer", priced(512, 511 / 2, False), statistics.median(prefill) / 20)
        print(f"  {q} attention per position: decode {t.decode_attention_seconds_per_position * 1e9:.0f} ns, "
              f"prompt token {t.prefill_attention_seconds_per_position * 1e9:.0f} ns per layer; "
              f"a step of 2+ tokens: {t.batch_fixed_seconds_per_layer * 1e3:.3f} ms + {t.prefill_seconds_per_layer_token * 1e3:.3f} ms "
              f"per token per layer")
        stage.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--bandwidth", default="100Mbit")
    ap.add_argument("--latency", default="2ms")
    args = ap.parse_args()
    model = smollm2.path("Q4_1")
    with tempfile.TemporaryDirectory() as tmp:
        probe_vs_stage(model, Path(tmp))
    ids = chat_tokens(Tokenizer(model), [{"role": "user", "content": QUESTION}])
    emulate = ("--emulate-bandwidth", args.bandwidth, "--emulate-latency", args.latency)
    with tempfile.TemporaryDirectory(prefix="edgefleet-predict-") as tmp, \
            local_fleet(Path(tmp), agents_for(model), agent_extra=emulate) as (ctl, _):
        stub = rpc.ControllerStub(grpc.insecure_channel(ctl.address))
        # the default request, with the prompt and output lengths these requests have
        request = PlacementRequest(str(model), Workload(prompt_tokens=len(ids), output_tokens=args.tokens))
        for _ in stub.Deploy(placement_pb(request)):
            pass
        plan = plan_from_dict(json.loads(stub.Status(pb.Empty()).plan_json))
        one_request(stub, ids, 4)       # warm: first-use costs (page faults, connections)
        runs = [one_request(stub, ids, args.tokens) for _ in range(args.requests)]
    ttft = statistics.median(r[0] for r in runs)
    tpot = statistics.median(r[1] for r in runs)
    p = plan.prediction
    print(f"SmolLM2-135M-Instruct Q4_1 on {' -> '.join(s.node for s in plan.stages)} "
          f"({len(ids)}-token prompt, {args.tokens} tokens, links {args.bandwidth} / {args.latency})")
    for name, want, got in (("TTFT", p.ttft_s, ttft), ("ms/token", p.tpot_s, tpot)):
        print(f"  {name:9} predicted {want * 1e3:7.1f} ms  measured {got * 1e3:7.1f} ms  "
              f"error {100 * (want - got) / got:+.1f} %")


if __name__ == "__main__":
    main()
