"""What-if events written as short sentences, for `edgefleet simulate --what-if`:

    fail NODE at 600s                 the node dies (re-plan, push changed shards, replay)
    recover NODE at 900s              it can be used again (by the next re-plan)
    link A-B 10Mbit at 300s           a link's bandwidth changes (also: latency 50ms)
    spike x3 from 600s to 900s        the load is 3 times the trace's in that window
    join NAME as DEVICE at 600s       a catalog device joins (re-plan onto it; optional
                                      `via VERTEX`, `bandwidth 1Gbit`, `latency 1ms`)
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from simulations.engine import WhatIf
from solver.problem import Fleet, Link
from solver.units import parse_quantity

USAGE = ('expected e.g. "fail desk at 600s", "recover desk at 900s", "link desk-switch 10Mbit at 300s", '
         '"spike x3 from 600s to 900s" or "join pi2 as rpi5-8gb at 600s"')


@dataclass(frozen=True)
class Spike:
    factor: float
    start_s: float
    end_s: float


def _time(text: str, what: str) -> float:
    return parse_quantity(text, what, "s")


def parse(text: str, fleet: Fleet) -> WhatIf | Spike:
    words = text.split()
    try:
        kind = words[0].lower()
        if kind in ("fail", "recover") and len(words) == 4 and words[2] == "at":
            fleet.node(words[1])        # the node must exist
            return WhatIf(_time(words[3], "the time"), kind, node=words[1])
        if kind == "spike":
            m = re.fullmatch(r"spike x([\d.]+) from (\S+) to (\S+)", " ".join(words))
            if m:
                start, end = _time(m.group(2), "the start"), _time(m.group(3), "the end")
                if end <= start:
                    raise ValueError("a spike must end after it starts")
                return Spike(float(m.group(1)), start, end)
        if kind == "link" and "at" in words:
            a, _, b = words[1].partition("-")
            at = words.index("at")
            args = words[2:at]
            bandwidth, latency = 0.0, -1.0
            while args:
                if args[0] == "latency" and len(args) > 1:
                    latency = _time(args[1], "the latency")
                    args = args[2:]
                else:
                    bandwidth = parse_quantity(args[0], "the bandwidth", "bit/s")
                    args = args[1:]
            if not b or (not bandwidth and latency < 0):
                raise ValueError(f"{text!r}: give the link as A-B and a new bandwidth or latency")
            if not any({l.a, l.b} == {a, b} for l in fleet.links):
                raise ValueError(f"{text!r}: the fleet has no link between {a} and {b}")
            return WhatIf(_time(words[at + 1], "the time"), "link", node=a, other=b, bandwidth=bandwidth,
                          latency=latency)
        if kind == "join" and len(words) >= 6 and words[2] == "as" and words[4] == "at":
            from solver.catalog import DEVICES, device_node

            if words[3] not in DEVICES:
                raise ValueError(f"unknown device {words[3]!r} in {text!r}; the catalog has {', '.join(DEVICES)}")
            opts = dict(zip(words[6::2], words[7::2]))
            node = device_node(words[1], words[3])
            if "memory" in opts:
                node = type(node)(node.name, int(parse_quantity(opts["memory"], "the memory", "B")), node.speed,
                                  node.step_overhead_s)
            via = opts.get("via") or fleet.controller or fleet.nodes[0].name
            link = Link(words[1], via, parse_quantity(opts.get("bandwidth", "1Gbit"), "the bandwidth", "bit/s"),
                        _time(opts.get("latency", "1ms"), "the latency"))
            return WhatIf(_time(words[5], "the time"), "join", joined=node, link=link)
    except (IndexError, KeyError) as exc:
        raise ValueError(f"cannot read the what-if {text!r} ({exc}); {USAGE}") from None
    raise ValueError(f"cannot read the what-if {text!r}; {USAGE}")
