"""Every sub-command's ``--help`` states each option's default (the parser's), and ``reconkit train``'s sub-commands
show the examples."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import pytest

# sub-commands with an argparse parser from ``reconkit.cli.<name>.build_parser`` (``reconkit train`` is LightningCLI's,
# which prints every default itself)
COMMANDS = ("simulate", "export", "reconstruct", "evaluate", "serve", "demo")


def _rendered(default: object) -> str:
    """The default as its help text writes it: ``640 368`` for a list, ``30`` for 30.0, a path's file name."""
    if isinstance(default, (list, tuple)):
        return " ".join(_rendered(d) for d in default)
    if isinstance(default, float):
        return f"{default:g}"
    if isinstance(default, Path):
        return default.name
    return str(default)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_states_each_default(command: str) -> None:
    parser: argparse.ArgumentParser = importlib.import_module(f"reconkit.cli.{command}").build_parser()
    missing = []
    for action in parser._actions:
        flag = action.nargs == 0  # --no-progress, --no-torch-fallback: the help says what giving it does
        if action.default in (None, argparse.SUPPRESS) or flag or action.required or not action.option_strings:
            continue
        text = action.help or ""
        if "default" not in text or _rendered(action.default) not in text:
            missing.append(f"{action.option_strings[0]} (default {_rendered(action.default)!r}): {text!r}")
    assert not missing, f"reconkit {command} --help: options whose help does not state their default: {missing}"


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict"])
def test_train_subcommand_help_has_examples(subcommand: str, capsys: pytest.CaptureFixture[str]) -> None:
    from reconkit.cli.train import main

    assert main([subcommand, "--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "reconkit train fit --config configs/varnet_sim_small.yaml" in out, out[:2000]


def test_entry_point_runs_without_sigpipe(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Windows' ``signal`` module has no SIGPIPE: the ``reconkit`` entry point (``main()``, arguments from
    ``sys.argv``) failed there with an AttributeError before any command ran."""
    import signal
    import sys

    from reconkit.cli.main import main

    monkeypatch.delattr(signal, "SIGPIPE")
    monkeypatch.setattr(sys, "argv", ["reconkit", "--version"])
    assert main() == 0
    assert capsys.readouterr().out.startswith("reconkit ")


@pytest.mark.parametrize("command", COMMANDS)
def test_parser_builds_without_docstrings(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``python -OO`` (or ``PYTHONOPTIMIZE=2``) strips docstrings, so a module's ``__doc__`` is None: four commands
    built their description from it and failed with an AttributeError before parsing any argument."""
    module = importlib.import_module(f"reconkit.cli.{command}")
    monkeypatch.setattr(module, "__doc__", None)
    assert isinstance(module.build_parser(), argparse.ArgumentParser)


def test_help_command_shows_the_named_commands_help(capsys: pytest.CaptureFixture[str]) -> None:
    """``reconkit help evaluate`` printed the top-level usage and ignored the command it named."""
    from reconkit.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["help", "evaluate"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("usage: reconkit evaluate ")
    assert main(["help", "nope"]) == 2 and "unknown command 'nope'" in capsys.readouterr().err


def test_main_called_from_python_leaves_the_warning_format_as_it_was(monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """``reconkit.cli.main.main([...])`` installed the CLI's ``warnings.formatwarning`` for the rest of the process (a
    notebook's later warnings printed as ``warning: ...`` lines); called with ``argv`` it now puts the caller's back
    (namefix audit). The ``reconkit`` command (``main()``) keeps the CLI's format to its end."""
    import sys
    import warnings

    from reconkit.cli.main import main
    from reconkit.errors import format_warning

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    caller_format = warnings.formatwarning
    assert main(["--version"]) == 0
    assert warnings.formatwarning is caller_format
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    assert warnings.formatwarning is caller_format
    monkeypatch.setattr(sys, "argv", ["reconkit", "--version"])
    assert main() == 0
    assert warnings.formatwarning is format_warning
    capsys.readouterr()
