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

The same request times the stages' decode compute against the plan's cost model
(`compute_factor`). The Profile RPC times one layer's decode back to back, its weights in
the CPU's cache; in a pipeline each stage's weights are cold again at every step, since the
other stages read theirs in between. On session 30's machine (a large last-level cache) the
stages' decode compute ran 1.2-2.1 times the profiled figure and the simulator's TPOT was
short by 45 %. The cost model's decode step at the request's own span (the positions its
timed steps attend, `Calibration.span`) is a part for the weights and the LM head, and a
part for attention; the measured compute less the attention part, over the weights part,
is the factor. Every node's decode weight times (per layer, and a several-token step's fixed
part) are priced that many times from then on, never less; its decode attention and prefill
times are not. Attention reads the session's own cache, not the weights, and the probe's
per-position figure already ran above the pipeline's: on the emulated 4 nodes (session 31,
Q8_0, one request at a time) TPOT grew by 0.031 ms a position where the profiles priced
0.045 unscaled, and scaling attention too put the simulator's TPOT 20-30 % short at spans
of tens of positions and 10-17 % over at 500 (docs/cost-model.md).
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
    span: float = 0.0       # positions the timed steps attend, on average (their prompt and tokens before)

    def compute_factor(self, weights_s: float, attention_s: float) -> float:
        """The stages' measured decode compute less the cost model's attention part at `span`
        (attention_s), over its part for the weights and the LM head (weights_s), as the
        deploy priced them unscaled: never below 1 (1 where no prediction is known)."""
        return max(1.0, (self.compute_s - attention_s) / weights_s) if weights_s > 0 else 1.0

    def factor(self, profiled_s: float) -> float:
        """The rest over the stage nodes' profiled step overheads (their sum, profiled_s): what
        every node's profiled overhead is multiplied by (0 where the rest came out negative:
        noise, or no profiled figure)."""
        return max(0.0, self.rest_s) / profiled_s if profiled_s > 0 else 0.0

    def text(self, factor: float | None = None, weights_s: float = 0.0, attention_s: float = 0.0) -> str:
        priced = f", {factor:.2f} × the stages' profiled step overheads" if factor is not None else ""
        predicted = (f" ({self.compute_factor(weights_s, attention_s):.2f} × the {weights_s * 1e3:.2f} predicted "
                     f"for the weights, + {attention_s * 1e3:.2f} for attention at {self.span:.1f} positions)"
                     if weights_s > 0 else "")
        return (f"a calibration request took {self.token_s * 1e3:.2f} ms a decode token: the stages' compute "
                f"{self.compute_s * 1e3:.2f}{predicted}, links {self.links_s * 1e3:.2f} (predicted) and the rest "
                f"{self.rest_s * 1e3:.2f}{priced} ({self.tokens} tokens, {self.stages} stages)")


def measure(arrivals: Sequence[float], computes: Sequence[float], links_s: float, stages: int,
            warmup: int = WARMUP_TOKENS, prompt_tokens: int = 0) -> Calibration | None:
    """The calibration from one request's token arrival times (the first is the prompt's
    token, after a prompt of `prompt_tokens`) and each token's stage compute seconds, its
    first `warmup` decode tokens left out; None without a decode token to time. The step
    that brings token k (k ≥ 1) attends prompt_tokens + k positions."""
    if len(arrivals) != len(computes):
        raise ValueError("one compute figure per token")
    gaps = [(b - a, c) for a, b, c in zip(arrivals, arrivals[1:], computes[1:])][warmup:]
    if not gaps:
        return None
    span = prompt_tokens + statistics.mean(range(warmup + 1, len(arrivals)))
    return Calibration(len(gaps), statistics.median(g for g, _ in gaps), statistics.median(c for _, c in gaps),
                       links_s, statistics.median(g - c - links_s for g, c in gaps), stages, span)


def run(first: str, last: str, deployment_id: str, links_s: float, stages: int, context: int,
        security: Security = Security()) -> Calibration | None:
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
    return measure(arrivals, computes, links_s, stages, prompt_tokens=prompt_tokens)
