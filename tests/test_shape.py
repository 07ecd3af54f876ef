"""The dependency rule (docs/fleet.md, ARCHITECTURE): dependencies point one way, the solver
is plain data in and plan out, and an agent runs without the solver stack."""
from __future__ import annotations

import subprocess
import sys

from tools.shape import cycles, survey

# what each package may import of the others (function-local imports included): a module,
# or "pkg.*" for any module of a package ("solver" alone is the package's __init__)
ALLOWED = {
    "solver": set(),
    "proto": {"solver", "solver.request"},                      # the placement request's plain dataclasses
    "agent": {"proto.*", "solver", "solver.memory", "solver.ggml_types", "solver.request"},
    "simulations": {"solver.*"},
    "models": {"agent.*"},
    "controller": {"agent.*", "proto.*", "solver.*", "simulations.*", "models.*"},
}


def allowed(a: str, b: str) -> bool:
    pa, pb = a.split(".")[0], b.split(".")[0]
    return pa == pb or b in ALLOWED[pa] or f"{pb}.*" in ALLOWED[pa]


def test_dependencies_point_one_way_and_never_in_a_circle():
    graph, _, _ = survey()
    assert cycles(graph) == []
    assert [f"{a} -> {b}" for a, b in graph.edges if not allowed(a, b)] == []


SOLVER_STACK = ("pulp", "highspy", "networkx", "torch", "solver.problem", "solver.fast")


def loaded(imports: str, modules: tuple[str, ...]) -> list[str]:
    """Which of `modules` a fresh interpreter holds after `import <imports>`."""
    code = f"import sys, {imports}\nprint(' '.join(m for m in {modules!r} if m in sys.modules))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()


def test_an_agent_runs_without_the_solver_stack():
    assert loaded("agent.daemon, agent.server, agent.engine, agent.runtime", (*SOLVER_STACK, "controller")) == []


def test_the_agent_command_loads_no_solver_stack_either():
    # what `edgefleet agent` loads before it measures itself counts against its --memory
    assert loaded("controller.cli, solver.units, agent.daemon", SOLVER_STACK) == []
