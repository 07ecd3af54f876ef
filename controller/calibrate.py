"""A deployment's step overhead, measured on its own stages before it serves.

The cost model prices a stage's decode step as its layers' compute (the Profile RPC's probe)
plus the node's step overhead. The Profile RPC's overhead is one hidden state's round trip
on the agent's own data plane, back to back: 0.03-0.1 ms. A decode step of a deployment also
takes the step's Python, the hand-off from the stream's reader to the compute thread, and a
stage that idled while the token went round the others: bench/versus.py's breakdown measured
0.35-1.5 ms a crossing beyond the stages' compute and the links, and the simulator read
every TPOT 10-20 % short (docs/simulator.md).

So once the stages are loaded, one request goes through them before the deployment serves
(`run`): a short prompt, then one token at a time. Each decode token's time at the
controller, less its stages' compute (the stage times its answer carries) and the plan's
predicted link time, is what that step cost besides (`measure`); the rest is its median
over the tokens. That work is the agents' own, done at each node's speed, as the Profile
RPC's round trip is: so the rest over the sum of the stage nodes' profiled overheads is a
factor (`factor`), and every node of the fleet is priced that many times its profiled
overhead from then on, never less than it (Deployments keeps it with each node's profile).
Pricing only the deployment's nodes would make the others look cheaper than they are to
the next plan. Later plans, failovers and simulations price it.

The same request times the stages' decode compute against the plan's prediction of it
(`compute_factor`). The Profile RPC times one layer's decode back to back, its weights in
the CPU's cache; in a pipeline each stage's weights are cold again at every step, since the
other stages read theirs in between. On session 30's machine (a large last-level cache) the
stages' decode compute ran 1.2-1.9 times the profiled figure and the simulator's TPOT was
short by 45 %. Every node's decode times (per layer, attention, a several-token step's fixed
part) are priced that many times from then on, never less; its prefill times are not
(a prefill reads each weight once for hundreds of tokens).
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

from agent.sampling import Sampling
from controller.agents import PipelineStream
from controller.generate import generate
from proto.security import Security

PROMPT_TOKENS = 16      # the calibration request's prompt
DECODE_TOKENS = 24      # its decode tokens that are timed
WARMUP_TOKENS = 4       # decode tokens before those: the stages' first steps, the collector still opening
TIMEOUT_S = 60.0        # a step that takes longer fails the calibration (not the deploy)


@dataclass(frozen=True)
class Calibration:
    tokens: int             # decode tokens timed
    token_s: float          # the median decode token's time at the controller
    compute_s: float        # the median of a decode token's stage compute, summed over the stages
    links_s: float          # the plan's predicted link time of a decode step (the hops and the ring)
    rest_s: float           # the median of (token − compute − links): the steps' overhead, all stages
    stages: int
    predicted_compute_s: float = 0.0    # the plan's decode compute of the stages, one step (0: not known)

    @property
    def compute_factor(self) -> float:
        """The stages' measured decode compute over the plan's prediction of it, never below 1
        (1 where no prediction is known)."""
        return max(1.0, self.compute_s / self.predicted_compute_s) if self.predicted_compute_s > 0 else 1.0

    def factor(self, profiled_s: float) -> float:
        """The rest over the stage nodes' profiled step overheads (their sum, profiled_s): what
        every node's profiled overhead is multiplied by (0 where the rest came out negative:
        noise, or no profiled figure)."""
        return max(0.0, self.rest_s) / profiled_s if profiled_s > 0 else 0.0

    def text(self, factor: float | None = None) -> str:
        priced = f", {factor:.2f} × the stages' profiled step overheads" if factor is not None else ""
        predicted = (f" ({self.compute_s / self.predicted_compute_s:.2f} × the {self.predicted_compute_s * 1e3:.2f} "
                     "predicted)" if self.predicted_compute_s > 0 else "")
        return (f"a calibration request took {self.token_s * 1e3:.2f} ms a decode token: the stages' compute "
                f"{self.compute_s * 1e3:.2f}{predicted}, links {self.links_s * 1e3:.2f} (predicted) and the rest "
                f"{self.rest_s * 1e3:.2f}{priced} ({self.tokens} tokens, {self.stages} stages)")


def measure(arrivals: Sequence[float], computes: Sequence[float], links_s: float, stages: int,
            warmup: int = WARMUP_TOKENS, predicted_compute_s: float = 0.0) -> Calibration | None:
    """The calibration from one request's token arrival times (the first is the prompt's
    token) and each token's stage compute seconds, its first `warmup` decode tokens left out;
    None without a decode token to time. predicted_compute_s: the plan's decode compute of
    the stages, one step."""
    if len(arrivals) != len(computes):
        raise ValueError("one compute figure per token")
    gaps = [(b - a, c) for a, b, c in zip(arrivals, arrivals[1:], computes[1:])][warmup:]
    if not gaps:
        return None
    return Calibration(len(gaps), statistics.median(g for g, _ in gaps), statistics.median(c for _, c in gaps),
                       links_s, statistics.median(g - c - links_s for g, c in gaps), stages, predicted_compute_s)


def run(first: str, last: str, deployment_id: str, links_s: float, stages: int, context: int,
        security: Security = Security(), predicted_compute_s: float = 0.0) -> Calibration | None:
    """One request through a deployment's stages (first and last stage's addresses), timed;
    None where its context holds too few tokens. AgentError where a step fails."""
    prompt_tokens = min(PROMPT_TOKENS, context // 4)
    n = min(WARMUP_TOKENS + DECODE_TOKENS, context - prompt_tokens) + 1     # the prompt's token and the decode tokens
    if prompt_tokens < 1 or n < WARMUP_TOKENS + 3:
        return None
    stream = PipelineStream(first, security, deployment_id, last=last)
    arrivals, computes = [], []
    try:
        for token in generate(lambda: stream, list(range(1, prompt_tokens + 1)), n, Sampling(), eos=None,
                              timeout_s=TIMEOUT_S):
            arrivals.append(time.perf_counter())
            computes.append(sum(t.compute_seconds for t in token.stage_times))
    finally:
        stream.close()
    return measure(arrivals, computes, links_s, stages, predicted_compute_s=predicted_compute_s)
