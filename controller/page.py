"""The fleet at a glance over HTTP: `GET /health` for probes, `GET /api/fleet` (the JSON the
page reads) and `GET /`, a plain HTML page that shows nodes, stages, types, memory and
live tokens/s, refreshed every two seconds."""
from __future__ import annotations

import time
from pathlib import Path

from controller.deployments import Deployments
from controller.metrics import Metrics
from controller.planning import compact_types


def health(deployments: Deployments) -> tuple[int, dict]:
    """(HTTP status, body): 200 when a deployment is active and every stage's node is alive."""
    dep = deployments.active
    if dep is None:
        return 503, {"status": "unavailable", "reason": "no deployment is active"}
    reg = deployments.registry
    down = [s.node for s in dep.stages if (live := reg.get(s.node)) is None or reg.health(live) != "alive"]
    if down:
        return 503, {"status": "unavailable", "deployment": dep.id,
                     "reason": f"stages on {', '.join(down)} do not answer; failover is under way or impossible"}
    return 200, {"status": "ok", "deployment": dep.id}


def fleet(deployments: Deployments, metrics: Metrics) -> dict:
    """Nodes, the active deployment's stages and prediction, and the tokens generated so far
    (the page turns two readings into tokens/s)."""
    dep = deployments.active
    held = {s.node: s for s in dep.stages} if dep else {}
    nodes = []
    for live in deployments.registry.all():
        st, stage = live.state, held.get(live.node.name)
        nodes.append({"name": live.node.name, "address": live.node.address,
                      "health": deployments.registry.health(live),
                      "memory_offered_bytes": live.node.memory_bytes,
                      "memory_used_bytes": st.memory_used_bytes if st else 0,
                      "agent_bytes": live.node.agent_bytes,
                      "layers": f"{stage.first}-{stage.last - 1}" if stage else "",
                      "types": compact_types(stage.types) if stage else "",
                      "sessions": st.sessions if st else 0, "queue_depth": st.queue_depth if st else 0})
    out = {"time": time.time(), "generated_tokens": int(metrics.generated_tokens._value.get()),
           "in_flight": int(metrics.in_flight._value.get()), "nodes": nodes, "deployment": None}
    if dep is not None:
        p = dep.plan.prediction
        out["deployment"] = {
            "id": dep.id, "model": Path(dep.model_path).name, "stages": [s.node for s in dep.stages],
            "predicted_ms_per_token": p.tpot_s * 1e3, "predicted_ttft_ms": p.ttft_s * 1e3,
            "predicted_ppl_increase_pct": p.ppl_increase_pct, "concurrency": dep.request.workload.concurrency,
            "context": dep.request.workload.ctx}
    return out


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>edgefleet</title>
<style>
 body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
 table { border-collapse: collapse; margin-top: 1em; }
 th, td { border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: left; }
 td.num { text-align: right; font-variant-numeric: tabular-nums; }
 .alive { color: #070; } .lost, .draining { color: #b00; } .drained { color: #777; }
 #key { display: none; margin-top: 1em; }
</style>
</head>
<body>
<h1>edgefleet</h1>
<p id="summary">loading…</p>
<p id="rate"></p>
<form id="key">API key (the controller's --token): <input id="keyinput" type="password"> <button>show</button></form>
<table id="nodes">
 <thead><tr><th>node</th><th>health</th><th>layers</th><th>types</th><th>memory used / offered</th>
 <th>sessions</th><th>queue</th></tr></thead>
 <tbody></tbody>
</table>
<script>
let last = null;
function mib(b) { return (b / 1048576).toFixed(1) + " MiB"; }
function cell(row, text, cls) { const td = row.insertCell(); td.textContent = text; if (cls) td.className = cls; }
function show(f) {
  const d = f.deployment;
  document.getElementById("summary").textContent = d
    ? `deployment ${d.id}: ${d.model} on ${d.stages.join(" → ")}; predicted ${d.predicted_ms_per_token.toFixed(1)} ms/token,`
      + ` TTFT ${d.predicted_ttft_ms.toFixed(0)} ms, perplexity +${d.predicted_ppl_increase_pct.toFixed(2)} %;`
      + ` ${d.concurrency} slots of ${d.context} tokens`
    : "no deployment is active";
  if (last) {
    const rate = (f.generated_tokens - last.generated_tokens) / Math.max(f.time - last.time, 1e-3);
    document.getElementById("rate").textContent = `${rate.toFixed(1)} tokens/s now, ${f.in_flight} in flight`;
  }
  last = f;
  const body = document.querySelector("#nodes tbody");
  body.replaceChildren();
  for (const n of f.nodes) {
    const row = body.insertRow();
    cell(row, n.name); cell(row, n.health, n.health); cell(row, n.layers); cell(row, n.types);
    cell(row, `${mib(n.memory_used_bytes)} / ${mib(n.memory_offered_bytes)}`, "num");
    cell(row, n.sessions, "num"); cell(row, n.queue_depth, "num");
  }
}
async function poll() {
  const key = sessionStorage.getItem("edgefleet-key");
  const r = await fetch("/api/fleet", {headers: key ? {Authorization: "Bearer " + key} : {}});
  if (r.status === 401) { document.getElementById("key").style.display = "block"; return; }
  show(await r.json());
}
document.getElementById("key").onsubmit = (e) => {
  e.preventDefault();
  sessionStorage.setItem("edgefleet-key", document.getElementById("keyinput").value);
  document.getElementById("key").style.display = "none";
  poll();
};
poll(); setInterval(poll, 2000);
</script>
</body>
</html>
"""
