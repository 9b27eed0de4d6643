"""Image geometry of a reconstructed volume (pixel spacing, slice thickness) from a parsed ISMRMRD header.

fastMRI headers give ``encoding/reconSpace`` a ``matrixSize`` (x, y) and a ``fieldOfView_mm`` (x, y, z); the
reconstruction's pixel spacing is FOV / matrix and the slice thickness is the z field of view. Parsing is done by
:func:`reconkit.data.parse_ismrmrd_header`.
"""

from __future__ import annotations

from dataclasses import dataclass

from reconkit.data.ismrmrd_header import HeaderInfo

__all__ = ["ImageGeometry", "geometry_from_header"]


@dataclass(frozen=True)
class ImageGeometry:
    """Spacing of a ``(slices, rows, cols)`` volume in millimetres.

    Attributes:
        row_spacing_mm: distance between neighbouring rows (rows run along the readout axis x, fastMRI's H).
        col_spacing_mm: distance between neighbouring columns (phase-encode axis y, fastMRI's W).
        slice_thickness_mm: slice thickness; slices are assumed contiguous (spacing = thickness).
    """

    row_spacing_mm: float = 1.0
    col_spacing_mm: float = 1.0
    slice_thickness_mm: float = 1.0


def geometry_from_header(info: HeaderInfo | None) -> ImageGeometry:
    """Geometry of the recon space of ``info``; 1 mm where the header is missing or a size is zero."""
    if info is None:
        return ImageGeometry()
    (fov_x, fov_y, fov_z), (mat_x, mat_y, _) = info.recon_fov_mm, info.recon_size
    return ImageGeometry(
        row_spacing_mm=fov_x / mat_x if fov_x > 0 and mat_x > 0 else 1.0,
        col_spacing_mm=fov_y / mat_y if fov_y > 0 and mat_y > 0 else 1.0,
        slice_thickness_mm=fov_z if fov_z > 0 else 1.0,
    )
