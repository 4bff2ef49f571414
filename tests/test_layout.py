"""The package's shape (issue "one house"): import layers, no cycles, small modules, thin root."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "popcorn"

LAYERS = [
    ("popcorn", "popcorn.errors", "popcorn.io", "popcorn.losses"),
    ("popcorn.models",),
    ("popcorn.datasets",),
    ("popcorn.samplers",),
    ("popcorn.transforms",),
    ("popcorn.datamodules",),
    ("popcorn.evaluation",),
    ("popcorn.inference",),
    ("popcorn.tasks",),
    ("popcorn.prep",),
    ("popcorn.cli", "popcorn.fit", "popcorn.__main__"),
]
"""Lowest first: a module may import its own layer and those below, never one above."""

MAX_LINES = 500
ROOT_MODULES = {"__init__.py", "__main__.py", "fit.py", "io.py", "errors.py", "losses.py"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the popcorn modules it imports (anywhere in the file, lazy imports included)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level:
                pytest.fail(f"{path}: relative import; write the absolute module name")
            targets = [node.module] if isinstance(node, ast.ImportFrom) else (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for target in targets:
                if target and target.split(".")[0] == "popcorn":
                    if isinstance(node, ast.ImportFrom):  # `from popcorn.x import y`: y may be a module
                        for alias in node.names:
                            if f"{target}.{alias.name}" in modules:
                                deps.add(f"{target}.{alias.name}")
                    deps.add(target)
        graph[name] = {d for d in deps if d != name}
    return graph


def layer_of(module: str) -> int:
    best, rank = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank >= 0, f"{module} is in no layer"
    return rank


def test_no_import_from_a_higher_layer() -> None:
    bad = [f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
           for m, deps in import_graph().items() for d in sorted(deps)
           if d != "popcorn" and layer_of(d) > layer_of(m)]
    assert not bad, "\n".join(bad)


def test_no_import_cycle() -> None:
    graph = import_graph()
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if dep == "popcorn":  # the package root only holds the version
                continue
            if state.get(dep) == 1:
                cycles.append(" -> ".join([*path[path.index(dep):], dep]))
            elif dep in graph and dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_modules_are_small_and_the_root_is_thin() -> None:
    long = [f"{p.relative_to(PACKAGE.parent)}: {n} lines" for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"modules over {MAX_LINES} lines:\n" + "\n".join(long)
    root = {p.name for p in PACKAGE.glob("*.py")}
    assert root <= ROOT_MODULES, f"top-level modules beyond {sorted(ROOT_MODULES)}: {sorted(root - ROOT_MODULES)}"


def test_the_graph_sees_real_imports() -> None:
    """The checks above would pass on an empty graph: make sure it holds known edges."""
    graph = import_graph()
    assert "popcorn.datasets.grid" in graph["popcorn.datasets.sentinel"]
    assert "popcorn.models" in graph["popcorn.tasks.weak_supervision"]
    assert layer_of("popcorn.cli.predict") > layer_of("popcorn.inference.maps") > layer_of("popcorn.datasets.grid")
