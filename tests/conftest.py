"""Shared pytest setup.

Every test starts from the same random state, so a test's random inputs do not depend on which tests ran before it
(a ``-k`` selection, a different collection order or a new test elsewhere would otherwise change them).

``sim_root``: the tiny simulated dataset the training tests fit on, made once per test module.
``tiny_varnet_config``: a ``reconkit train`` YAML config of a tiny VarNet on ``sim_root`` (one epoch, CPU).
``unreadable``: ``unreadable(path)`` makes opening ``path`` fail as a file without read permission does.
``narrow_terminal``: Rich sees a 40-column terminal; gives the text of a printed table's first column.
"""

import builtins
import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from reconkit.data.simulate import simulate_dataset


@pytest.fixture(autouse=True)
def _fixed_random_state():
    torch.manual_seed(0)
    np.random.seed(0)
    yield


@pytest.fixture(scope="module")
def sim_root(tmp_path_factory) -> Path:
    """6 volumes (3 train / 2 val / 1 test), 3 or 4 coils, 3 slices, 48x32 k-space, 24x20 recon size."""
    root = tmp_path_factory.mktemp("sim")
    simulate_dataset(root, num_volumes=6, coils=(3, 4), slices=3, encoded_size=(48, 32), recon_size=(24, 20),
                     split=(0.5, 0.34, 0.16), seed=0, progress=False)
    return root


TINY_VARNET = {"num_cascades": 2, "chans": 4, "pools": 2, "sens_chans": 2, "sens_pools": 1}


@pytest.fixture
def tiny_varnet_config(sim_root, tmp_path) -> Path:
    """``tmp_path/tiny.yaml``: one epoch of a tiny VarNet on ``sim_root`` (2x equispaced masks, 25 % centre),
    writing under ``tmp_path/run``."""
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_epochs": 1, "default_root_dir": str(tmp_path / "run"),
                    "enable_progress_bar": False},
        "model": {"class_path": "reconkit.training.VarNetModule", "init_args": {**TINY_VARNET, "lr": 1e-3}},
        "data": {"data_path": str(sim_root), "mask_type": "equispaced_fraction", "center_fractions": [0.25],
                 "accelerations": [2], "num_workers": 0},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def count_onnx_sessions(monkeypatch):
    """``start()``: from then on, every model ``onnxruntime.InferenceSession`` is given (a path or bytes) is
    appended, in order, to the list ``start`` returns."""
    import onnxruntime as ort

    def start() -> list:
        opened = []
        real_session = ort.InferenceSession

        def counted_session(model, *args, **kwargs):
            opened.append(model)
            return real_session(model, *args, **kwargs)

        monkeypatch.setattr(ort, "InferenceSession", counted_session)
        return opened

    return start


@pytest.fixture
def unreadable(monkeypatch):
    """``unreadable(path)``: from then on, opening ``path`` raises the PermissionError a chmod 000 file gives a
    user other than root (who runs the tests in containers and could read the file anyway)."""
    real_open = builtins.open
    locked = set()

    def guarded(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.fspath(file) in locked:
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    monkeypatch.setattr(io, "open", guarded)  # Path.open

    def lock(path: Path) -> None:
        locked.add(str(path))

    return lock


@pytest.fixture
def unlistable(monkeypatch):
    """``unlistable(folder)``: from then on, listing ``folder`` raises the PermissionError a folder without read
    permission gives a user other than root (who runs the tests in containers and could list it anyway)."""
    real_iterdir = Path.iterdir
    locked = set()

    def iterdir(self):
        if self in locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    return locked.add


@pytest.fixture
def narrow_terminal(monkeypatch):
    """Rich sees a 40-column terminal; yields ``first_column(out)``: the text of the first column of the tables
    printed in ``out`` (styles removed), its wrapped lines joined."""
    from rich.console import Console

    monkeypatch.setattr(Console, "is_terminal", property(lambda self: True))
    monkeypatch.setenv("COLUMNS", "40")
    monkeypatch.delenv("TERM", raising=False)  # a "dumb" terminal is 80 columns to Rich

    def first_column(out: str) -> str:
        lines = re.sub(r"\x1b\[[0-9;]*m", "", out).splitlines()
        return "".join(line.split("\u2502")[1].strip() for line in lines if line.startswith("\u2502"))

    return first_column
