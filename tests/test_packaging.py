"""What ``pip install reconkit`` (a wheel built from pyproject.toml) brings into a fresh environment."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _lower_bound(requirement: str) -> tuple[int, ...]:
    """``"lightning>=2.4,<3"`` -> ``(2, 4)``."""
    return tuple(int(part) for part in re.search(r">=\s*([\d.]+)", requirement).group(1).split("."))


def test_lightning_floor_imports_without_pkg_resources():
    """Lightning 2.2 and 2.3 call ``pkg_resources.declare_namespace`` on import, and setuptools 82 removed
    pkg_resources: in a fresh environment (pip brings the newest setuptools) ``reconkit train`` with either ended in
    ``ModuleNotFoundError: No module named 'pkg_resources'``. 2.4 is the first release that imports without it."""
    tomllib = pytest.importorskip("tomllib")
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    (lightning,) = [d for d in dependencies if re.match(r"lightning\b", d)]
    assert _lower_bound(lightning) >= (2, 4), lightning


def test_dependencies_name_what_the_code_imports():
    """The server imports starlette, which only came through the declared (and never imported) fastapi; the version
    is reconkit.__version__ itself (it was written twice, and the ONNX metadata records the package's)."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    names = {re.match(r"[\w.-]+", d).group(0).lower() for d in project["dependencies"]}
    assert "starlette" in names and "fastapi" not in names
    assert "version" in project["dynamic"] and "version" not in project
    setuptools = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]
    assert setuptools["dynamic"]["version"] == {"attr": "reconkit.__version__"}
