"""The layering, checked by import statements: distill/ <- quantize/, pixelspace/ <- workers/ <- app/.
No module of a lower layer imports the HTTP API (``app``), not even inside a function; and no two first-party
files import each other, directly or through others (no file-level import cycle).

The import graph is read with ``ast`` from every ``.py`` file of the packages, and it counts every import
statement wherever it stands: at the top, inside a function, under ``if TYPE_CHECKING``. A cycle hidden in a
function's import is still two files that cannot be understood (or moved to another layer) one without the
other. An edge goes to the most specific first-party module an import names (``from a.b import c`` is an edge
to ``a/b/c.py`` when that file exists, else to ``a/b``). The package ``__init__`` files Python runs on the way
(``a/__init__.py`` for ``import a.b``) are not edges: an ``__init__`` that re-exports its submodules (as
``distill.methods`` does) would otherwise put each of them in a cycle with it. What an ``__init__`` imports
itself is counted like any file's imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("distill", "quantize", "pixelspace", "workers", "app")


def imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


@pytest.mark.parametrize("package", ["distill", "quantize", "pixelspace", "workers"])
def test_lower_layers_never_import_app(package: str) -> None:
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"no modules under {package}/"
    offenders = {str(f.relative_to(REPO)): sorted(m for m in imported_modules(f) if m == "app" or m.startswith("app."))
                 for f in files}
    assert not {f: m for f, m in offenders.items() if m}


def test_the_check_sees_an_app_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from app.settings import ApiSettings\n    import app.main as m\n")
    assert imported_modules(module) == {"app.settings", "app.main"}


# ----------------------------------------------------------------------------------------- import cycles
def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the packages (migrations included)."""
    files: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    return files


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """First-party module -> the first-party modules its import statements name (anywhere in the file)."""
    files = module_files(root, packages)

    def known(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            else:
                continue
            edges |= {target for name in names if (target := known(name)) is not None}
        graph[module] = edges - {module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def test_no_import_cycle_between_first_party_files() -> None:
    graph = import_graph(REPO)
    assert len(graph) > 50 and graph["distill.evaluate"], "the walk found the modules and their imports"
    found = cycles(graph)
    assert not found, "import cycles (each a set of modules that import each other): " + "; ".join(
        " <-> ".join(component) for component in found)


def test_the_cycle_check_sees_a_cycle_through_a_function_import(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("from . import c\n")  # relative: pkg.sub.c
    (package / "sub" / "c.py").write_text("def f():\n    from ..a import thing\n")  # inside a function: still an edge
    (package / "d.py").write_text("import pkg.a\n")  # imports into the cycle, not part of it
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.sub.c"} and graph["pkg.sub.c"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.sub.c"]]
    (package / "sub" / "c.py").write_text("import numpy\n")
    assert cycles(import_graph(tmp_path, ("pkg",))) == []
