"""The package has no import cycle: imports at module level and inside functions alike (not ``TYPE_CHECKING`` ones)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "orch_outbox"


def _module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(current: str, is_package: bool, level: int, module: str | None) -> str:
    base = current.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, *(module.split(".") if module else [])])


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, modules: set[str], root: Path = PACKAGE) -> set[str]:
    """The package's modules that ``path`` imports, anywhere in it but under ``if TYPE_CHECKING:``."""
    name = _module_name(path, root)
    top = root.name
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == top)
        elif isinstance(node, ast.ImportFrom):
            target = (node.module or "") if node.level == 0 else _resolve(name, is_package, node.level, node.module)
            if target.split(".")[0] == top:
                found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in modules and m != name}


def _graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    paths = [p for p in root.rglob("*.py") if "migrations" not in p.parts]
    modules = {_module_name(p, root) for p in paths}
    return {_module_name(p, root): _imports(p, modules, root) for p in paths}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), plus self-loops."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


def _package_parent_edges(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A submodule's import of its own package's ``__init__`` is no cycle when the package only re-exports it."""
    return {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}


def test_the_package_has_no_import_cycle() -> None:
    """Proves every module of orch_outbox can be imported on its own, in any order: no cycle through
    module-level or function-level imports (a function-level import hiding a cycle counts)."""
    graph = _package_parent_edges(_graph())
    assert graph.get("orch_outbox.outbox"), "the scan found no imports at all"
    assert _cycles(graph) == []


def test_the_scan_sees_function_level_imports(tmp_path: Path) -> None:
    """Proves the scan itself: a cycle made only by an import inside a function is reported, and an import
    under ``if TYPE_CHECKING:`` is not an edge."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import x\n")
    assert _cycles(_graph(pkg)) == []
    (pkg / "b.py").write_text("def f():\n    from .a import x\n")
    assert _cycles(_graph(pkg)) == [["pkg.a", "pkg.b"]]
