"""No module of src/onthejob imports another module's private names (`from onthejob.x import
_name`): what one module uses from another is public, so each can change its insides alone.
Pure Python: reads the sources with ast, imports nothing."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

# (importing module, imported module, name) allowed for a time; empty now. An entry that no
# longer occurs fails the test, so the list cannot go stale.
ALLOWED: set[tuple[str, str, str]] = set()


def _module_name(path: Path, src: Path) -> str:
    parts = path.relative_to(src).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def private_imports(src: Path = SRC) -> set[tuple[str, str, str]]:
    """Every (importing module, imported module, name) where the name is private (one
    leading underscore, not a dunder) and the imported module is another onthejob module."""
    found = set()
    for path in sorted((src / "onthejob").rglob("*.py")):
        importer = _module_name(path, src)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
                continue
            if node.module != "onthejob" and not node.module.startswith("onthejob."):
                continue
            for alias in node.names:
                name = alias.name
                if name.startswith("_") and not name.startswith("__") and node.module != importer:
                    found.add((importer, node.module, name))
    return found


def test_no_module_imports_another_modules_private_names():
    found = private_imports()
    new = sorted(found - ALLOWED)
    assert not new, "private names imported across modules (make them public): " + ", ".join(
        f"{a} imports {c} from {b}" for a, b, c in new)
    stale = sorted(ALLOWED - found)
    assert not stale, f"allowed private imports that are gone (drop them from ALLOWED): {stale}"


def test_the_check_sees_a_private_import(tmp_path):
    pkg = tmp_path / "onthejob" / "a"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "x.py").write_text("def f():\n    from onthejob.b.y import _hidden, shown, __version__\n")
    (pkg / "z.py").write_text("from onthejob.a.z import _self  # its own name: fine\n")
    assert private_imports(tmp_path) == {("onthejob.a.x", "onthejob.b.y", "_hidden")}
