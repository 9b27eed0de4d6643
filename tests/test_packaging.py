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
