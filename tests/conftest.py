"""Shared pytest setup.

Every test starts from the same random state, so a test's random inputs do not depend on which tests ran before it
(a ``-k`` selection, a different collection order or a new test elsewhere would otherwise change them).
"""

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _fixed_random_state():
    torch.manual_seed(0)
    np.random.seed(0)
    yield
