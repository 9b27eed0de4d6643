"""fastMRI submission layout: one HDF5 file per volume with a float32 ``reconstruction`` dataset.

fastMRI's own evaluation (``fastmri.evaluate``) opens ``predictions/<target file name>`` and reads
``reconstruction`` of shape ``(slices, h, w)`` (320 × 320 for the challenge, i.e. cropped to the recon size).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from reconkit.atomic import atomic_hdf5

__all__ = ["write_fastmri_h5"]


def write_fastmri_h5(
    path: os.PathLike | str, reconstruction: np.ndarray, attrs: Mapping[str, object] | None = None
) -> Path:
    """Atomically write ``reconstruction`` (``(slices, h, w)`` magnitude, any units) as float32.

    Args:
        path: destination ``.h5`` file (named like the input volume so fastMRI's evaluation pairs them).
        reconstruction: ``(slices, h, w)`` real array.
        attrs: optional file attributes (e.g. ``acquisition``, ``max``) copied from the input.

    Returns:
        The written path.
    """
    volume = np.asarray(reconstruction)
    if volume.ndim != 3 or np.iscomplexobj(volume):
        raise ValueError(f"reconstruction must be a real (slices, h, w) array; got {volume.dtype} {volume.shape}")
    with atomic_hdf5(path) as f:
        f.create_dataset("reconstruction", data=volume.astype(np.float32))
        for key, value in (attrs or {}).items():
            f.attrs[key] = value
    return Path(path)
