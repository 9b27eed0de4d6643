"""Every sub-command's ``--help`` states each option's default, and the stated default is the parser's."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import pytest

# sub-command -> name of its module's parser factory (``reconkit train`` is LightningCLI's, which prints defaults)
PARSERS = {
    "simulate": "build_parser",
    "export": "build_parser",
    "reconstruct": "build_parser",
    "evaluate": "build_parser",
    "serve": "build_parser",
    "demo": "build_parser",
}


def _rendered(default: object) -> str:
    """The default as its help text writes it: ``640 368`` for a list, ``30`` for 30.0, a path's file name."""
    if isinstance(default, (list, tuple)):
        return " ".join(_rendered(d) for d in default)
    if isinstance(default, float):
        return f"{default:g}"
    if isinstance(default, Path):
        return default.name
    return str(default)


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_help_states_each_default(command: str) -> None:
    parser: argparse.ArgumentParser = getattr(importlib.import_module(f"reconkit.cli.{command}"), PARSERS[command])()
    missing = []
    for action in parser._actions:
        flag = action.nargs == 0  # --no-progress, --no-torch-fallback: the help says what giving it does
        if action.default in (None, argparse.SUPPRESS) or flag or action.required or not action.option_strings:
            continue
        text = action.help or ""
        if "default" not in text or _rendered(action.default) not in text:
            missing.append(f"{action.option_strings[0]} (default {_rendered(action.default)!r}): {text!r}")
    assert not missing, f"reconkit {command} --help: options whose help does not state their default: {missing}"
