"""The reference model's corpus: documentation bundled with CPython.

Documents are the pydoc topics (`pydoc_data.topics`) and, per stdlib module, the module,
class and function docstrings (read with `ast`, so nothing is imported or executed).
The held-out split is fixed by name: a document is held out when the SHA-256 of its name
falls in the first 1/20 of the hash space. The held-out text of the Python that trained the
reference model is committed as models/reference/heldout.txt, so evaluation does not depend
on the Python version of the machine that runs it.
"""
from __future__ import annotations

import ast
import hashlib
import sysconfig
from pathlib import Path

HELDOUT_FRACTION = 20   # 1 in 20 documents
SKIP_DIRS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}


def _module_docstrings(path: Path) -> str:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                head = "" if isinstance(node, ast.Module) else f"{node.name}:\n"
                parts.append(head + doc.strip())
    return "\n\n".join(parts)


def documents() -> list[tuple[str, str]]:
    """All (name, text) documents, sorted by name."""
    import pydoc_data.topics as topics

    docs = [(f"topic/{k}", v.strip()) for k, v in topics.topics.items() if v.strip()]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS.intersection(rel.parts):
            continue
        text = _module_docstrings(path)
        if text:
            docs.append((f"module/{rel.as_posix()}", text))
    return sorted(docs)


def is_heldout(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % HELDOUT_FRACTION == 0


def split(docs: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """(train texts, held-out texts) in name order."""
    train = [t for n, t in docs if not is_heldout(n)]
    held = [t for n, t in docs if is_heldout(n)]
    return train, held


DOC_SEPARATOR = "\n\n\n"
