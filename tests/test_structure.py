"""The shape of the package: functions that fit on a screen, and entry modules that napari
imports without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "napari_crossd"
MAX_BODY_LINES = 60


def _body_lines(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function's body, its docstring left out."""
    body = function.body
    if ast.get_docstring(function, clean=False) is not None:
        body = body[1:]
    return body[-1].end_lineno - body[0].lineno + 1 if body else 0


def _functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, node) of every function and method, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")
        else:
            yield from _functions(node, prefix)


def test_no_function_body_is_longer_than_a_screen():
    long = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = path.relative_to(PACKAGE.parent).as_posix()
        for name, function in _functions(ast.parse(path.read_text())):
            if _body_lines(function) > MAX_BODY_LINES:
                long[f"{module}:{name}"] = _body_lines(function)
    assert long == {}


@pytest.mark.parametrize("module", ["napari_crossd._reader", "napari_crossd._writer", "napari_crossd._sample_data",
                                    "napari_crossd._widgets"])
def test_napari_entry_modules_import_without_torch(module):
    """What napari imports to open a file or list the plugin's contributions leaves torch out."""
    check = f"import sys, {module}, napari_crossd; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True, timeout=120)
    assert done.stdout.strip() == "False"


def test_the_package_exposes_its_public_names_lazily():
    check = ("import sys, napari_crossd; lazy = 'torch' not in sys.modules; "
             "from napari_crossd import CrossDConv, inflate, load_model; "
             "import torch; print(lazy, issubclass(CrossDConv, torch.nn.Conv2d), callable(inflate), "
             "sorted(napari_crossd.__all__) == sorted(set(dir(napari_crossd)) & set(napari_crossd.__all__)))")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True, timeout=120)
    assert done.stdout.split() == ["True", "True", "True", "True"]
