"""docs/architecture.md's import direction holds: a package never imports from one to its right.

Order (docs/architecture.md, README's repository layout): ``errors, atomic, ops, metrics`` <- ``data, models`` <-
``io, training, export, inference`` <- ``serve, cli``, and within a group left to right too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import reconkit

ORDER = ("errors", "atomic", "ops", "metrics", "data", "models", "io", "training", "export", "inference", "serve",
         "cli")
PACKAGE = Path(reconkit.__file__).parent


def _imported_modules(path: Path) -> list[tuple[str, int]]:
    """``(absolute module name, line)`` of every import in ``path`` (function-level ones included)."""
    parts = ["reconkit", *path.relative_to(PACKAGE).with_suffix("").parts]
    package = parts[:-1]  # the package a relative import starts from (an __init__'s own package too)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names = [module] if node.module else [f"{module}.{alias.name}" for alias in node.names]
            found += [(name, node.lineno) for name in names]
    return found


def test_imports_flow_one_way() -> None:
    rank = {name: i for i, name in enumerate(ORDER)}
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        owner = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if owner not in rank:  # reconkit/__init__.py, __main__.py: the entry points above every package
            continue
        for module, line in _imported_modules(path):
            target = module.split(".")
            if target[0] == "reconkit" and len(target) > 1 and rank.get(target[1], -1) > rank[owner]:
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} imports {module}")
    assert not wrong, f"imports against docs/architecture.md's direction: {wrong}"


def test_every_package_is_placed() -> None:
    packages = {p.name.removesuffix(".py") for p in PACKAGE.iterdir()
                if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and not p.name.startswith("_"))}
    assert packages == set(ORDER), f"packages missing from the import order: {packages ^ set(ORDER)}"


def test_importing_every_module_keeps_lightnings_int_or_float_limits_int_first() -> None:
    """Importing ``rich.console`` at the top of a module (pytest collects every module under src/) before Lightning
    left ``typing``'s cache holding ``Union[float, int]``: Lightning's ``limit_train_batches: Optional[Union[int,
    float]]`` came out float-first and jsonargparse read ``--trainer.limit_train_batches 1`` as 1.0, the whole epoch
    (two training tests failed only in the full ``make test``). Importing reconkit must leave that order alone."""
    import subprocess
    import sys

    code = (
        "import importlib, pkgutil, reconkit\n"
        "for m in pkgutil.walk_packages(reconkit.__path__, 'reconkit.'):\n"
        "    if not m.name.endswith('__main__'):\n"
        "        importlib.import_module(m.name)\n"
        "import inspect\n"
        "from lightning.pytorch import Trainer\n"
        "print(inspect.signature(Trainer).parameters['limit_train_batches'].annotation.__args__[0].__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.split()[-1] == "int", result.stdout + result.stderr


def _exception_classes_defined() -> set[str]:
    """``module.Class`` of every exception class defined under src/reconkit (a base named ``...Error``,
    ``...Exception``, ``...Warning``, ``SystemExit`` or one of these classes), found without importing anything."""
    classes: dict[str, tuple[str, list[str]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(["reconkit", *path.relative_to(PACKAGE).with_suffix("").parts])
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                bases = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases]
                classes[node.name] = (module, bases)
    found: set[str] = set()
    while True:
        more = {name for name, (_, bases) in classes.items()
                if any(b.endswith(("Error", "Exception", "Warning")) or b == "SystemExit" or b in found for b in bases)}
        if more <= found:
            return {f"{classes[name][0]}.{name}" for name in found}
        found |= more


def _exception_examples() -> list:
    """One instance of every exception class reconkit defines, with its attributes set."""
    from reconkit.cli.main import _Terminated
    from reconkit.errors import ConfigError, DataError, ReconkitError, ReconkitWarning
    from reconkit.export.onnx_format import ExportError
    from reconkit.models.registry import CheckpointError, ModelConfigError
    from reconkit.serve.pbtxt import PbtxtError
    from reconkit.serve.protocol import RequestError

    return [ReconkitError("bad input"), DataError("/data/file1.h5", "missing dataset 'kspace'"),
            DataError("a whole message"), ConfigError("lr must be > 0"), ReconkitWarning("slower path"),
            PbtxtError("unexpected character"), RequestError(400, "bad shape", {"Retry-After": "1"}),
            ExportError("x.ckpt: cannot export"), ModelConfigError("unknown model_type"),
            CheckpointError("/c/model.ckpt", "missing 'state_dict'"), _Terminated(143)]


def test_every_exception_class_has_a_pickle_example() -> None:
    shown = {f"{type(error).__module__}.{type(error).__qualname__}" for error in _exception_examples()}
    assert shown == _exception_classes_defined()


@pytest.mark.parametrize("error", _exception_examples(), ids=lambda error: type(error).__name__)
def test_exceptions_survive_a_pickle_round_trip(error: BaseException) -> None:
    """A process pool or DataLoader worker sends its exception back pickled: RequestError(400, "m") and
    CheckpointError(path, problem) raised TypeError when unpickled (Exception rebuilds from ``args``, the message)."""
    import pickle

    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error) and copy.args == error.args
    assert vars(copy) == vars(error)
