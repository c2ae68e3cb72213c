"""The package's shape, kept true: arrows point down only (operators/cli → pipeline → stages → core).

Read from the source (every import statement, also those inside functions), so the rules hold
for the graph readers and tools see, not only for what happens to be imported at run time.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "fiftyone_nola"
MAX_MODULE_LINES = 500
# Old dotted paths FiftyOne stores in datasets; each only re-exports its new home.
SHIMS = {"fiftyone_nola.brain_backend"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _parse(path: Path) -> ast.Module:
    return _TREES[path] if path in _TREES else ast.parse(path.read_text())


def _imports(path: Path, module: str, top_level_only: bool = False) -> set[str]:
    """Absolute names ``path`` imports (``from a import b`` yields ``a`` and ``a.b``)."""
    tree = _parse(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    nodes = tree.body if top_level_only else ast.walk(tree)
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


# Parsed once, at collection: CPython 3.11.7's ast.parse can raise "SystemError: AST constructor
# recursion depth mismatch" late in a long session (seen once in the full suite).
_TREES = {p: ast.parse(p.read_text()) for p in PACKAGE.rglob("*.py")}


def _layer(name: str) -> str:
    for layer in ("core", "stages"):
        if name == f"fiftyone_nola.{layer}" or name.startswith(f"fiftyone_nola.{layer}."):
            return layer
    return "top"


def test_core_never_imports_fiftyone_or_a_higher_layer():
    bad = []
    for name, path in _modules().items():
        if _layer(name) != "core":
            continue
        for imp in _imports(path, name):
            root = imp.split(".")[0]
            if root == "fiftyone" or (root == "fiftyone_nola" and _layer(imp) != "core" and imp != "fiftyone_nola"):
                bad.append(f"{name} imports {imp}")
    assert not bad, "core/ must stay free of FiftyOne and of stages/pipeline:\n" + "\n".join(bad)


def test_stages_never_import_the_layer_above():
    bad = [
        f"{name} imports {imp}"
        for name, path in _modules().items()
        if _layer(name) == "stages"
        for imp in _imports(path, name)
        if imp.startswith("fiftyone_nola.") and _layer(imp) == "top" and imp not in SHIMS
    ]
    assert not bad, "stages/ may import core/ only:\n" + "\n".join(bad)


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = defaultdict(set)
    for name, path in mods.items():
        for imp in _imports(path, name):
            # `from pkg import mod` names a module; `from mod import func` names the module itself
            target = imp if imp in mods else imp.rpartition(".")[0] if imp.rpartition(".")[0] in mods else None
            if target and target != name and not name.startswith(target + "."):
                graph[name].add(target)
    return graph


def _cycle(graph: dict[str, set[str]]):
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycle():
    # A package's __init__ re-exporting its modules is not a cycle between modules.
    graph = {
        n: {m for m in deps if not n.startswith(m + ".") and not (m + ".").startswith(n + ".")}
        for n, deps in _graph().items()
    }
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None


def test_layering_check_sees_imports_inside_functions(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    import fiftyone as fo\n    from ..stages import fo_io\n")
    assert {"fiftyone", "fiftyone_nola.stages.fo_io"} <= _imports(src, "fiftyone_nola.core.m")


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_is_oversized(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_MODULE_LINES, f"{path.relative_to(REPO)} has {n} lines; split it by job"
