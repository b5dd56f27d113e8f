"""effft's modules import each other in one direction: no file-level import cycle.

The graph has one node per file of the package and an edge for every import of another of its
files, wherever it stands (at the top or inside a function), except imports under
`if TYPE_CHECKING:`, which never run. Importing `a.b` does not count as importing package `a`'s
`__init__`: packages are kept free of imports of their own children for that reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "effft"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool, modules: set[str]) -> set[str]:
    """The modules of `modules` that the imports in `tree` load, by absolute name (TYPE_CHECKING
    blocks left out). `from p import x` loads p.x where that is a module, else p itself."""
    found: set[str] = set()
    base = module.split(".") if is_package else module.split(".")[:-1]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - node.level + 1]
                target = ".".join(anchor + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """{module: the package's modules it imports} for every .py file under the package `root`."""
    files = {_module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        named = _imports(ast.parse(path.read_text(encoding="utf-8")), name, path.name == "__init__.py", set(files))
        graph[name] = {n for n in named if n in files and n != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module, or with a self-loop (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
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
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_effft_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert len(graph) > 40 and graph["effft.runs.fit"]  # the graph was read, with its edges
    assert cycles(graph) == []


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "from .b import thing\n",
        "sub/__init__.py": "",
        "sub/c.py": "def f():\n    from ..a import x\n",
        "b.py": "from pkg.sub import c\nthing = 1\n",
    })
    assert cycles(import_graph(root)) == [["pkg.a", "pkg.b", "pkg.sub.c"]]


def test_type_checking_imports_are_left_out(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\nfrom . import c\n",
        "b.py": "from .a import A\n",
        "c.py": "",
    })
    graph = import_graph(root)
    assert graph["pkg.a"] == {"pkg.c"} and graph["pkg.b"] == {"pkg.a"}
    assert cycles(graph) == []
