"""The package layout: no import cycles between m2det's subpackages.

The graph is read from the source with `ast` (module-level and function-level imports alike, since a
deferred import is still a dependency), so the test needs nothing importable and runs in milliseconds.
Run this file as a script to print the graph's cycles.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "m2det"

# Module cycles allowed to remain, as sorted tuples of module names: none.
KNOWN_MODULE_CYCLES: set[tuple[str, ...]] = set()


def _package(module: str) -> str:
    """`m2det.io.image` -> `io`; a top-level module such as `m2det.config` is its own node."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _module_name(path: Path, src: Path) -> str:
    rel = path.relative_to(src.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node but those under `if TYPE_CHECKING:`: annotations-only imports are no runtime cycle."""
    nodes: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        nodes.append(node)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                todo.extend(child.orelse)
            else:
                todo.append(child)
    return nodes


def _imports(path: Path, src: Path) -> set[str]:
    """Every m2det module a file imports at run time, relative imports resolved, at any nesting level."""
    module = _module_name(path, src)
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # `from m2det.io import image` may import a submodule; module_graph keeps only real modules
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("m2det.")}


def module_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module name -> the m2det modules (packages count as their `__init__`) it imports."""
    graph = {_module_name(p, src): _imports(p, src) for p in sorted(src.rglob("*.py"))}
    return {module: {t for t in targets if t in graph} for module, targets in graph.items()}


def package_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Subpackage (or top-level module) -> the other ones it imports."""
    graph: dict[str, set[str]] = {}
    for module, targets in module_graph(src).items():
        if module == "m2det":
            continue  # the package root re-exports the public API; it is every package's parent
        source = _package(module)
        graph.setdefault(source, set()).update(
            _package(t) for t in targets if t != "m2det" and _package(t) != source
        )
    return graph


def cycles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """The strongly connected components with more than one node, each as a sorted tuple (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[tuple[str, ...]] = set()

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.add(tuple(sorted(component)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def pair_cycles(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """Every pair of nodes that import each other directly: the cycles a reader notices first."""
    return {(a, b) for a in graph for b in graph[a] if a < b and a in graph.get(b, ())}


def test_the_graph_sees_deferred_and_relative_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "m2det"
    (pkg / "a").mkdir(parents=True)
    (pkg / "b").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("from .x import f\n")
    (pkg / "a" / "x.py").write_text("def f():\n    from m2det.b.y import g\n")
    (pkg / "b" / "__init__.py").write_text("")
    (pkg / "b" / "y.py").write_text("from ..a import x\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from m2det.a import x\n"
    )
    graph = package_graph(pkg)
    assert graph == {"a": {"b"}, "b": {"a"}, "c": set()}
    assert cycles(graph) == {("a", "b")}


def test_no_import_cycles_between_subpackages() -> None:
    graph = package_graph()
    assert {"models", "io", "data", "engine"} <= set(graph)  # the walk found the real tree
    assert cycles(graph) == set()


def test_no_import_cycles_between_modules() -> None:
    found = cycles(module_graph())
    assert found <= KNOWN_MODULE_CYCLES, sorted(found - KNOWN_MODULE_CYCLES)


if __name__ == "__main__":
    graph = package_graph()
    for a, b in sorted(pair_cycles(graph)):
        print(f"package cycle: {a} <-> {b}")
    modules = module_graph()
    for a, b in sorted(pair_cycles(modules)):
        if _package(a) == _package(b):  # between packages they are counted above
            print(f"module cycle inside {_package(a)}: {a} <-> {b}")
    print(f"{len(pair_cycles(graph))} package pair cycle(s), {len(cycles(graph))} package cycle component(s)")
