"""The code's shape in three figures: functions over 40 lines, import cycles between project
modules (function-local imports included), and function-local imports of project modules.

    python tools/shape.py            # per package, then the totals
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("agent", "controller", "solver", "simulations", "proto", "models")
LONG = 40


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).glob("*.py")):
            if not f.name.endswith("_pb2.py") and not f.name.endswith("_pb2_grpc.py"):
                out[f"{pkg}.{f.stem}" if f.stem != "__init__" else pkg] = f
    return out


def project_imports(node: ast.AST, name: str, known: set[str]) -> list[str]:
    """Project modules that one import statement names."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    else:
        return []
    return [n for n in names if n in known and n != name]


def survey() -> tuple[nx.DiGraph, dict[str, list[str]], dict[str, list[str]]]:
    """(import graph of project modules, long functions per package, function-local imports per package)."""
    mods = modules()
    known = set(mods)
    graph = nx.DiGraph()
    long_fns: dict[str, list[str]] = {}
    local: dict[str, list[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        graph.add_node(name)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > LONG:
                    long_fns.setdefault(name.split(".")[0], []).append(f"{name}.{node.name} ({n})")
                for sub in ast.walk(node):
                    for target in project_imports(sub, name, known):
                        local.setdefault(name.split(".")[0], []).append(f"{name} -> {target}")
            for target in project_imports(node, name, known):
                graph.add_edge(name, target)
    return graph, long_fns, local


def cycles(graph: nx.DiGraph) -> list[set[str]]:
    return [c for c in nx.strongly_connected_components(graph) if len(c) > 1]


def main() -> int:
    graph, long_fns, local = survey()
    found = cycles(graph)
    for pkg in PACKAGES:
        print(f"{pkg:12} functions over {LONG} lines: {len(long_fns.get(pkg, []))}; "
              f"function-local project imports: {len(local.get(pkg, []))}")
        for f in long_fns.get(pkg, []):
            print(f"    long  {f}")
        for f in local.get(pkg, []):
            print(f"    local {f}")
    print(f"import cycles: {len(found)}")
    for c in found:
        print("    " + ", ".join(sorted(c)))
    print(f"total: {sum(map(len, long_fns.values()))} functions over {LONG} lines, {len(found)} import cycles, "
          f"{sum(map(len, local.values()))} function-local project imports")
    return 0


if __name__ == "__main__":
    sys.exit(main())
