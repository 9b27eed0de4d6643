"""Shared pytest setup.

Every test starts from the same random state, so a test's random inputs do not depend on which tests ran before it
(a ``-k`` selection, a different collection order or a new test elsewhere would otherwise change them).

``sim_root``: the tiny simulated dataset the training tests fit on, made once per test module.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

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
