"""The package's shape, checked with ast: one namespace, one dependency direction, lazy heavy imports.

compress (torch only at import) <- train <- export, entry scripts above all three; accelerate only inside
train/engine/; no module that a script
run by path (``accelerate launch train/distill.py``) could mistake for the standard library or an installed package.
"""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("compress", "train", "export")
ALLOWED = {"compress": set(), "train": {"compress"}, "export": {"compress", "train"}}
# Third-party modules each package may import at module level (heavy/optional ones must be imported lazily).
TOP_LEVEL_OK = {
    "compress": {"torch"},
    "train": {"torch", "numpy", "yaml"},
    "export": {"torch", "numpy"},
}
ENTRIES = [
    "train/train.py",
    "train/distill.py",
    "train/cache_teacher.py",
    "export/export.py",
    "export/benchmark.py",
    "compress/compress.py",
]


def modules(pkg: str):
    return sorted((ROOT / pkg).rglob("*.py"))


def imports(tree: ast.AST, top_level_only: bool):
    """Top-level module names imported; ``slimforge.<pkg>`` counts as ``<pkg>``."""
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks at module level
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            yield parts[1] if parts[0] == "slimforge" and len(parts) > 1 else parts[0]


@pytest.mark.parametrize("pkg", PACKAGES)
def test_packages_import_only_downstream(pkg):
    """Library modules only; an entry script sits above every package (compress/compress.py measures with
    export's runtimes)."""
    for path in modules(pkg):
        if str(path.relative_to(ROOT)) in ENTRIES:
            continue
        for name in imports(ast.parse(path.read_text()), top_level_only=False):
            if name in PACKAGES and name != pkg:
                assert name in ALLOWED[pkg], f"{path.relative_to(ROOT)} imports {name}: {pkg} may import {ALLOWED[pkg]}"


@pytest.mark.parametrize("pkg", PACKAGES)
def test_imports_are_absolute_and_namespaced(pkg):
    for path in modules(pkg):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path.relative_to(ROOT)}: relative import"
                assert (node.module or "").split(".")[0] not in PACKAGES, (
                    f"{path.relative_to(ROOT)} imports {node.module}: use slimforge.{node.module}"
                )


@pytest.mark.parametrize("pkg", PACKAGES)
def test_heavy_dependencies_are_imported_lazily(pkg):
    stdlib = sys.stdlib_module_names
    for path in modules(pkg):
        for name in imports(ast.parse(path.read_text()), top_level_only=True):
            if name in stdlib or name in PACKAGES:
                continue
            assert name in TOP_LEVEL_OK[pkg], f"{path.relative_to(ROOT)} imports {name} at module level"


def test_only_the_engine_imports_accelerate():
    for pkg in PACKAGES:
        for path in modules(pkg):
            if "accelerate" in set(imports(ast.parse(path.read_text()), top_level_only=False)):
                assert path.parent == ROOT / "train" / "engine", f"{path.relative_to(ROOT)} imports accelerate"


def test_no_module_can_be_mistaken_for_another_package():
    """A script run by path puts its folder first on sys.path: no file or package there may carry the name of a
    standard-library module or of an installed distribution's top-level module."""
    taken = set(sys.stdlib_module_names) | set(importlib.metadata.packages_distributions())
    for pkg in PACKAGES:
        for path in (ROOT / pkg).iterdir():
            name = path.stem if path.suffix == ".py" else path.name if (path / "__init__.py").is_file() else None
            assert name is None or name not in taken, f"{path.relative_to(ROOT)} is named like an installed module"


def test_library_modules_stay_small():
    for pkg in PACKAGES:
        for path in modules(pkg):
            lines = len(path.read_text().splitlines())
            assert lines <= 420, f"{path.relative_to(ROOT)} has {lines} lines: split it by idea"


def test_schema_and_engine_do_not_import_each_other():
    for node in ast.walk(ast.parse((ROOT / "train" / "schema.py").read_text())):
        if isinstance(node, ast.ImportFrom):
            assert not (node.module or "").startswith("slimforge.train.engine")


@pytest.mark.parametrize("entry", ENTRIES)
def test_entries_are_thin(entry):
    text = (ROOT / entry).read_text()
    assert len(text.splitlines()) <= 200
    assert "def main(argv" in text and 'if __name__ == "__main__":' in text
    assert "sys.path" not in text, "entries import the installed slimforge package; they never edit sys.path"


def test_the_namespace_is_installed_and_the_folders_are_not():
    """From outside the checkout: slimforge.* imports, the bare folder names do not."""
    code = (
        "import importlib.util, slimforge.train, slimforge.export, slimforge.compress\n"
        "print([n for n in ('train', 'export', 'compress') if importlib.util.find_spec(n) is not None])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
