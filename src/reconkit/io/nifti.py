"""NIfTI-1 volumes (nibabel) with an affine built from the reconstruction's pixel spacing and slice thickness."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from reconkit.atomic import atomic_path
from reconkit.io.geometry import ImageGeometry

__all__ = ["nifti_affine", "write_nifti"]


def nifti_affine(geometry: ImageGeometry, shape: tuple[int, int, int]) -> np.ndarray:
    """4×4 voxel → RAS mm affine for a NIfTI array of ``shape = (cols, rows, slices)``, centred on the volume.

    Voxel axis 0 runs along image columns, axis 1 along rows, axis 2 across slices. The frame is the one of
    :func:`reconkit.io.write_dicom_series` (orientation ``[1, 0, 0, 0, 1, 0]`` in DICOM's LPS: columns run to the
    patient's left, rows to posterior) written in NIfTI's RAS: both files put every pixel at the same point in space,
    where ``dcm2niix``'s conversion of the DICOM series also puts it (``dcm2niix`` stores the rows in the opposite
    order: axis codes L A S, these L P S).
    """
    spacing = np.array([geometry.col_spacing_mm, geometry.row_spacing_mm, geometry.slice_thickness_mm])
    lps_to_ras = np.array([-1.0, -1.0, 1.0])
    affine = np.diag(np.append(lps_to_ras * spacing, 1.0))
    affine[:3, 3] = -lps_to_ras * spacing * (np.asarray(shape) - 1) / 2.0
    return affine


def write_nifti(path: os.PathLike | str, volume: np.ndarray, geometry: ImageGeometry) -> Path:
    """Atomically write a ``(slices, rows, cols)`` magnitude volume as float32 NIfTI-1.

    The stored array is ``(cols, rows, slices)`` (NIfTI's x, y, z); ``header.get_zooms()`` gives
    ``(col_spacing_mm, row_spacing_mm, slice_thickness_mm)``. ``path`` should end in ``.nii`` or ``.nii.gz``.
    """
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError(f"volume must be (slices, rows, cols); got shape {volume.shape}")
    data = np.ascontiguousarray(volume.transpose(2, 1, 0))
    image = nib.Nifti1Image(data, nifti_affine(geometry, data.shape))
    image.header.set_xyzt_units("mm")
    image.header.set_qform(image.affine, code=1)
    image.header.set_sform(image.affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(image, tmp)
    return Path(path)
