"""NIfTI-1 volumes (nibabel) with an affine built from the reconstruction's pixel spacing, slice thickness and, where
known, the slices' position in the patient."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from reconkit.atomic import atomic_path
from reconkit.io.geometry import ImageGeometry, PatientFrame, fixed_frame

__all__ = ["nifti_affine", "write_nifti"]


_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # DICOM's patient axes (L, P, S) as NIfTI's (R, A, S)


def nifti_affine(geometry: ImageGeometry, shape: tuple[int, int, int], frame: PatientFrame | None = None) -> np.ndarray:
    """4×4 voxel → RAS mm affine for a NIfTI array of ``shape = (cols, rows, slices)``.

    Voxel axis 0 runs along image columns, axis 1 along rows, axis 2 across slices. ``frame`` is the one of
    :func:`reconkit.io.write_dicom_series` (default: :func:`reconkit.io.geometry.fixed_frame`, orientation
    ``[1, 0, 0, 0, 1, 0]`` in DICOM's LPS: columns run to the patient's left, rows to posterior, centred on the
    volume) written in NIfTI's RAS: both files put every pixel at the same point in space, where ``dcm2niix``'s
    conversion of the DICOM series also puts it (for the default frame ``dcm2niix`` stores the rows in the opposite
    order: axis codes L A S, these L P S).
    """
    if frame is None:
        frame = fixed_frame(geometry, rows=shape[1], cols=shape[0], slices=shape[2])
    if len(frame.origins) != shape[2]:
        raise ValueError(f"frame places {len(frame.origins)} slices, the volume has {shape[2]}")
    return _LPS_TO_RAS @ frame.lps_affine(geometry)


def write_nifti(
    path: os.PathLike | str, volume: np.ndarray, geometry: ImageGeometry, frame: PatientFrame | None = None
) -> Path:
    """Atomically write a ``(slices, rows, cols)`` magnitude volume as float32 NIfTI-1, placed by ``frame``
    (:func:`nifti_affine`).

    The stored array is ``(cols, rows, slices)`` (NIfTI's x, y, z); ``header.get_zooms()`` gives
    ``(col_spacing_mm, row_spacing_mm, slice spacing)``: the slice thickness in the fixed frame, the distance between
    slice positions in an acquisition's. ``path`` should end in ``.nii`` or ``.nii.gz``.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3 or np.iscomplexobj(volume):  # a cast would keep the real part of complex images
        raise ValueError(f"volume must be a real (slices, rows, cols) array; got {volume.dtype} {volume.shape}")
    volume = volume.astype(np.float32, copy=False)
    data = np.ascontiguousarray(volume.transpose(2, 1, 0))
    image = nib.Nifti1Image(data, nifti_affine(geometry, data.shape, frame))
    image.header.set_xyzt_units("mm")
    image.header.set_qform(image.affine, code=1)
    image.header.set_sform(image.affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(image, tmp)
    return Path(path)
