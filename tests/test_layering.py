"""Dependency direction, checked with ast: compress (torch only at import) <- train <- export.

Also: no module may shadow a third-party package, and accelerate is imported only by train/engine.py.
"""

from __future__ import annotations

import ast
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
SHADOW = {
    "datasets",
    "onnx",
    "onnxruntime",
    "torch",
    "timm",
    "accelerate",
    "deepspeed",
    "yaml",
    "numpy",
    "torchvision",
    "safetensors",
    "openvino",
    "tensorboard",
    "transformers",
    "export",
    "train",
    "compress",
}


def modules(pkg: str):
    return sorted((ROOT / pkg).rglob("*.py"))


def imports(tree: ast.AST, top_level_only: bool):
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` / `if __package__ ...` blocks at module level
            continue
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


@pytest.mark.parametrize("pkg", PACKAGES)
def test_packages_import_only_downstream(pkg):
    for path in modules(pkg):
        for name in imports(ast.parse(path.read_text()), top_level_only=False):
            if name in PACKAGES and name != pkg:
                assert name in ALLOWED[pkg], f"{path.relative_to(ROOT)} imports {name}: {pkg} may import {ALLOWED[pkg]}"


@pytest.mark.parametrize("pkg", PACKAGES)
def test_heavy_dependencies_are_imported_lazily(pkg):
    stdlib = __import__("sys").stdlib_module_names
    for path in modules(pkg):
        for name in imports(ast.parse(path.read_text()), top_level_only=True):
            if name in stdlib or name in PACKAGES:
                continue
            assert name in TOP_LEVEL_OK[pkg], f"{path.relative_to(ROOT)} imports {name} at module level"


def test_only_the_engine_imports_accelerate():
    for pkg in PACKAGES:
        for path in modules(pkg):
            if "accelerate" in set(imports(ast.parse(path.read_text()), top_level_only=False)):
                assert path == ROOT / "train" / "engine.py", f"{path.relative_to(ROOT)} imports accelerate"


def test_no_module_shadows_a_package():
    for pkg in PACKAGES:
        for path in modules(pkg):
            if path.parent != ROOT / pkg or path.stem == pkg:
                # entry scripts named like their package (export/export.py, train/train.py) drop their
                # own folder from sys.path before importing; checked in test_entries_guard_sys_path.
                continue
            assert path.stem not in SHADOW, f"{path.relative_to(ROOT)} shadows the {path.stem} package"


@pytest.mark.parametrize("entry", ["train/train.py", "train/distill.py", "export/export.py", "export/benchmark.py"])
def test_entries_are_thin_and_guard_sys_path(entry):
    text = (ROOT / entry).read_text()
    assert len(text.splitlines()) <= 200
    assert "def main(argv" in text and 'if __name__ == "__main__":' in text
    assert "sys.path[:] = " in text.split("def main")[0]
