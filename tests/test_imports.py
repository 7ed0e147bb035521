"""The modules of scripts/ import each other without a cycle.

A cycle hidden behind a function-level import still breaks when that function runs at import time
somewhere else, and it makes the next refactoring guess which side may import which. The graph is
built from the source (ast, nothing is imported), from every ``import scripts...`` and
``from scripts... import ...`` at any depth of a module, so the test names no module and keeps
working as packages are split or moved.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "scripts"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _ancestors(name: str) -> list[str]:
    """The packages that run before ``name`` is imported (``a.b.c`` -> ``a``, ``a.b``)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _resolve(name: str, modules: set[str]) -> str | None:
    """The module of ``name`` (a module, or a name defined in one: its longest known prefix)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imported_names(module: str, path: Path) -> list[str]:
    """Every dotted name ``module`` imports, anywhere in its body (top level or inside functions)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: against this module's package
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, base] if base else package)
            # `from scripts.prepare import geometry` imports the module scripts.prepare.geometry
            names += [f"{base}.{alias.name}" for alias in node.names]
    return names


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the scripts modules it imports, with the packages each of those runs first."""
    paths = {_module_name(p, root): p for p in sorted((root / PACKAGE).rglob("*.py"))}
    graph = {}
    for module, path in paths.items():
        own = set(_ancestors(module)) | {module}
        targets = set()
        for name in _imported_names(module, path):
            target = _resolve(name, set(paths)) if name.split(".")[0] == PACKAGE else None
            if target is None:
                continue
            # importing scripts.a.b runs scripts/a/__init__ first; the packages this module is in are
            # already running when it is imported, so they are no edge (but naming one explicitly is)
            targets |= {target, *(p for p in _ancestors(target) if p not in own)}
        graph[module] = targets - {module, PACKAGE}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = stack[stack.index(v) :]
            del stack[stack.index(v) :]
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_graph_finds_cycle_through_function_import_and_package(tmp_path):
    """The instrument: a cycle through a function-level import and a package __init__ is found,
    and goes away when the back edge does."""
    pkg = tmp_path / PACKAGE / "sub"
    pkg.mkdir(parents=True)
    (pkg.parent / "__init__.py").write_text("")
    (pkg.parent / "a.py").write_text("def f():\n    from scripts.sub.helper import g\n")
    (pkg / "__init__.py").write_text("from .helper import g\nfrom scripts import a\n")
    (pkg / "helper.py").write_text("from scripts.sub import other\n\ndef g():\n    pass\n")
    (pkg / "other.py").write_text("")
    graph = import_graph(tmp_path)
    assert graph["scripts.sub.helper"] == {"scripts.sub.other"}  # its own package is no edge
    assert cycles(graph) == [["scripts.a", "scripts.sub"]]
    (pkg / "__init__.py").write_text("from .helper import g\n")
    assert cycles(import_graph(tmp_path)) == []


def test_no_import_cycle_in_scripts():
    graph = import_graph()
    assert len(graph) > 20, "the scripts/ package was not found"
    found = cycles(graph)
    lines = [f"{c}: " + "; ".join(f"{a} -> {b}" for a in c for b in sorted(graph[a]) if b in c) for c in found]
    assert not found, "import cycle(s) in scripts/:\n" + "\n".join(lines)
