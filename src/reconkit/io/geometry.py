"""Image geometry of a reconstructed volume (pixel spacing, slice thickness) from a parsed ISMRMRD header, and
where its slices lie in the patient (:class:`PatientFrame`).

fastMRI headers give ``encoding/reconSpace`` a ``matrixSize`` (x, y) and a ``fieldOfView_mm`` (x, y, z); the
reconstruction's pixel spacing is FOV / matrix (the encoded FOV over the k-space size along an axis where the
k-space is smaller than the recon matrix) and the slice thickness is the z field of view. Parsing is done by
:func:`reconkit.data.parse_ismrmrd_header`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from reconkit.data.ismrmrd_header import HeaderInfo

__all__ = ["ImageGeometry", "PatientFrame", "acquisition_frame", "fixed_frame", "geometry_from_header"]

_Vector = tuple[float, float, float]


@dataclass(frozen=True)
class ImageGeometry:
    """Spacing of a ``(slices, rows, cols)`` volume in millimetres.

    Attributes:
        row_spacing_mm: distance between neighbouring rows (rows run along the readout axis x, fastMRI's H).
        col_spacing_mm: distance between neighbouring columns (phase-encode axis y, fastMRI's W).
        slice_thickness_mm: slice thickness; also the slice spacing of :func:`fixed_frame` (contiguous slices).
    """

    row_spacing_mm: float = 1.0
    col_spacing_mm: float = 1.0
    slice_thickness_mm: float = 1.0


def geometry_from_header(info: HeaderInfo | None, kspace_size: tuple[int, int] | None = None) -> ImageGeometry:
    """Geometry of the recon space of ``info``; 1 mm where the header is missing or a size is zero.

    ``kspace_size``: ``(H, W)`` of the k-space the images come from. Along an axis where it is smaller than the
    recon matrix (a scanner that interpolated to a larger matrix, e.g. a phase resolution below 100 %), the images
    cannot be cropped to the recon matrix and keep the k-space's own grid: the spacing is then the encoded field of
    view over that size (one k-space step is 1 / encoded FOV), not the recon field of view over the recon matrix.
    """
    if info is None:
        return ImageGeometry()
    (fov_x, fov_y, fov_z), (mat_x, mat_y, _) = info.recon_fov_mm, info.recon_size
    if kspace_size is not None:
        if kspace_size[0] < mat_x:
            fov_x, mat_x = info.encoding_fov_mm[0], kspace_size[0]
        if kspace_size[1] < mat_y:
            fov_y, mat_y = info.encoding_fov_mm[1], kspace_size[1]
    return ImageGeometry(
        row_spacing_mm=fov_x / mat_x if fov_x > 0 and mat_x > 0 else 1.0,
        col_spacing_mm=fov_y / mat_y if fov_y > 0 and mat_y > 0 else 1.0,
        slice_thickness_mm=fov_z if fov_z > 0 else 1.0,
    )


@dataclass(frozen=True)
class PatientFrame:
    """Where the slices of a ``(slices, rows, cols)`` volume lie in the patient, in DICOM's LPS coordinates (mm).

    Attributes:
        row_cosines: direction of increasing column index (``ImageOrientationPatient``'s first three values).
        col_cosines: direction of increasing row index (its last three).
        slice_dir: direction along which ``SliceLocation`` and the slice spacing are measured.
        origins: per slice of the stack, the centre of its top-left pixel (``ImagePositionPatient``).
    """

    row_cosines: _Vector
    col_cosines: _Vector
    slice_dir: _Vector
    origins: tuple[_Vector, ...]

    def slice_spacing_mm(self, geometry: ImageGeometry) -> float:
        """Distance between neighbouring slices along ``slice_dir``: first to last over the gaps between them (the
        slice thickness for a single slice)."""
        if len(self.origins) < 2:
            return geometry.slice_thickness_mm
        extent = np.dot(np.subtract(self.origins[-1], self.origins[0]), self.slice_dir)
        return float(abs(extent) / (len(self.origins) - 1))

    def lps_affine(self, geometry: ImageGeometry) -> np.ndarray:
        """4×4 voxel ``(col, row, slice)`` → LPS mm affine: the slice axis runs from the first slice's origin to the
        last one's in equal steps (``slice_dir`` × slice thickness for a single slice)."""
        affine = np.eye(4)
        affine[:3, 0] = np.multiply(self.row_cosines, geometry.col_spacing_mm)
        affine[:3, 1] = np.multiply(self.col_cosines, geometry.row_spacing_mm)
        if len(self.origins) < 2:
            affine[:3, 2] = np.multiply(self.slice_dir, geometry.slice_thickness_mm)
        else:
            affine[:3, 2] = np.subtract(self.origins[-1], self.origins[0]) / (len(self.origins) - 1)
        affine[:3, 3] = self.origins[0]
        return affine


def fixed_frame(geometry: ImageGeometry, rows: int, cols: int, slices: int) -> PatientFrame:
    """reconkit's frame for volumes whose position is unknown (fastMRI files): axial-style orientation
    ``[1, 0, 0, 0, 1, 0]``, contiguous slices ``slice_thickness_mm`` apart, centred on the volume."""
    return PatientFrame(
        row_cosines=(1.0, 0.0, 0.0),
        col_cosines=(0.0, 1.0, 0.0),
        slice_dir=(0.0, 0.0, 1.0),
        origins=tuple(
            (
                -(cols - 1) / 2.0 * geometry.col_spacing_mm,
                -(rows - 1) / 2.0 * geometry.row_spacing_mm,
                (k - (slices - 1) / 2.0) * geometry.slice_thickness_mm,
            )
            for k in range(slices)
        ),
    )


def acquisition_frame(
    image_geometry: str | None,
    images: Sequence[int | None],
    geometry: ImageGeometry,
    kspace_size: tuple[int, int],
    image_size: tuple[int, int],
) -> PatientFrame | None:
    """The frame the ISMRMRD acquisitions give a stack of images, or None where they give none.

    Args:
        image_geometry: the ``image_geometry`` attribute of :func:`reconkit.data.ismrmrd_raw.read_ismrmrd_raw`
            (JSON): per image, ``position`` (the slice centre) and ``read_dir`` / ``phase_dir`` / ``slice_dir`` in
            LPS.
        images: per slice of the stack, the image whose geometry it has (None: a slice no image has, placed on the
            line through the others).
        geometry: the pixel spacing.
        kspace_size: ``(H, W)`` of the k-space; ``image_size``: ``(rows, cols)`` of the images, its centre crop.

    Image rows run along the readout (``read_dir``), columns along the phase encoding (``phase_dir``), so the DICOM
    orientation is ``[phase_dir, read_dir]``: Gadgetron's ``write_ismrmd_image_into_dicom`` (DicomFinishGadget,
    gadgets/dicom/dicom_ismrmrd_utility.cpp) writes ``[read_dir, phase_dir]`` for its images, whose first (fastest)
    axis is the readout. The slice centre ``position`` is the pixel the centred FFT puts the k-space centre's zero frequency at, index ``H // 2`` of
    ``H`` (``W // 2`` of ``W``) before the centre crop, and the top-left pixel lies that many pixels back along
    each direction: for even sizes Gadgetron's ``position - FOV / 2`` along ``read_dir`` and ``phase_dir``.

    Returns None (the caller's :func:`fixed_frame`) where the attribute is missing or malformed, where an image's
    directions are not orthonormal (acquisitions that carry no geometry have zeros), where the images differ in
    orientation (no stack), or where the slices all lie at one point along ``slice_dir``.
    """
    try:
        entries = json.loads(image_geometry) if image_geometry else None
        if not isinstance(entries, list):
            return None
        known = {k: _checked_entry(entries[i]) for k, i in enumerate(images) if i is not None}
    except (ValueError, TypeError, KeyError, IndexError, RecursionError):
        return None
    if not known or None in known.values():
        return None
    first = next(iter(known.values()))
    if any(not np.allclose(entry[1:], first[1:], atol=1e-3) for entry in known.values()):
        return None
    read, phase, slice_dir = first[1:]
    centre = [size // 2 - (size - crop) // 2 for size, crop in zip(kspace_size, image_size)]
    shift = centre[0] * geometry.row_spacing_mm * read + centre[1] * geometry.col_spacing_mm * phase
    slots = sorted(known)
    centres = np.array([known[k][0] for k in slots])
    origins = np.stack([np.interp(range(len(images)), slots, centres[:, d]) for d in range(3)], axis=1) - shift
    if len(origins) > 1 and abs(np.dot(origins[-1] - origins[0], slice_dir)) < 1e-3:
        return None
    return PatientFrame(
        row_cosines=tuple(phase.tolist()),
        col_cosines=tuple(read.tolist()),
        slice_dir=tuple(slice_dir.tolist()),
        origins=tuple(tuple(origin.tolist()) for origin in origins),
    )


def _checked_entry(entry: dict) -> tuple[np.ndarray, ...] | None:
    """``(position, read_dir, phase_dir, slice_dir)`` of one ``image_geometry`` entry; None where the directions
    are not orthonormal or a value is not finite."""
    vectors = [np.asarray(entry[name], dtype=np.float64) for name in ("position", "read_dir", "phase_dir", "slice_dir")]
    if any(v.shape != (3,) or not np.isfinite(v).all() for v in vectors):
        return None
    directions = np.stack(vectors[1:])
    return tuple(vectors) if np.allclose(directions @ directions.T, np.eye(3), atol=1e-3) else None
