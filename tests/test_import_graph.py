"""No import cycles inside the library or the eval harness: each module depends only on modules below it.

The graph is read from the sources with ``ast`` (module-level and function-level imports alike, so a lazy
import that dodges a cycle still counts); imports under ``if TYPE_CHECKING:`` are left out, since they
never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"hf_prefix_cache": ROOT / "hf_prefix_cache", "hf_prefix_cache_eval": ROOT / "eval"}


def module_names(package: str, folder: Path) -> dict[str, Path]:
    names = {}
    for path in sorted(folder.rglob("*.py")):
        parts = list(path.relative_to(folder).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join([package, *parts])] = path
    return names


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_names(module: str, path: Path) -> set[tuple[str, ...]]:
    """What ``module`` imports at run time: per import, the names it may stand for, most specific first
    (``from .x import y`` is module ``x.y`` if that exists, else module ``x``)."""
    is_package = path.name == "__init__.py"
    found: set[tuple[str, ...]] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update((alias.name,) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            found.update((f"{origin}.{alias.name}", origin) for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return found


def import_graph(packages: dict[str, Path]) -> dict[str, set[str]]:
    modules: dict[str, Path] = {}
    for package, folder in packages.items():
        modules.update(module_names(package, folder))
    graph = {}
    for module, path in modules.items():
        targets = set()
        for candidates in imported_names(module, path):
            known = [name for name in candidates if name in modules]
            if known:
                targets.add(known[0])
        graph[module] = targets - {module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(found)


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_cycles(package):
    graph = import_graph({package: PACKAGES[package]})
    found = cycles(graph)
    assert not found, "import cycles (each a set of modules importing each other):\n" + "\n".join(
        " <-> ".join(component) for component in found
    )


def test_a_cycle_is_found(tmp_path):
    """Negative control: a package whose modules import each other, one of them lazily, is reported."""
    folder = tmp_path / "loop"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    (folder / "a.py").write_text("from .b import g\n\ndef f():\n    return g()\n")
    (folder / "b.py").write_text("def g():\n    from .a import f\n    return f\n")
    (folder / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import f\n"
    )
    assert cycles(import_graph({"loop": folder})) == [["loop.a", "loop.b"]]
