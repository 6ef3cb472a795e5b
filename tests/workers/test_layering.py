"""The layering, checked by import statements: distill/ <- quantize/, pixelspace/ <- workers/ <- app/.
No module of a lower layer imports the HTTP API (``app``), not even inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


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
