"""The Python examples in README.md and docs/*.md run as written from a fresh interpreter: each block binds every
name it uses, and every ``from reconkit... import name`` exists. (Running them whole needs models, files and a
server; these checks catch the drift that makes a copied block fail at once.)"""

from __future__ import annotations

import ast
import builtins
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = [(path.relative_to(ROOT), block)
          for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
          for block in re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.DOTALL)]


def _unbound_names(tree: ast.Module) -> set[str]:
    """Names the block reads that nothing in it binds (imports, assignments, loop and ``with`` targets)."""
    bound, used = set(dir(builtins)), set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, ast.Name):
            (used if isinstance(node.ctx, ast.Load) else bound).add(node.id)
    return used - bound


@pytest.mark.parametrize(("path", "block"), BLOCKS, ids=[f"{path}#{i}" for i, (path, _) in enumerate(BLOCKS)])
def test_python_example_binds_its_names_and_imports_what_exists(path, block):
    tree = ast.parse(block, str(path))
    assert not _unbound_names(tree), f"{path}: the example uses names it never defines: {_unbound_names(tree)}"
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module.startswith("reconkit"):
            module = importlib.import_module(node.module)
            missing = [alias.name for alias in node.names if not hasattr(module, alias.name)]
            assert not missing, f"{path}: {node.module} has no {missing}"
