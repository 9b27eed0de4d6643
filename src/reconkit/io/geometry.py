"""Image geometry of a reconstructed volume (pixel spacing, slice thickness) from a parsed ISMRMRD header.

fastMRI headers give ``encoding/reconSpace`` a ``matrixSize`` (x, y) and a ``fieldOfView_mm`` (x, y, z); the
reconstruction's pixel spacing is FOV / matrix (the encoded FOV over the k-space size along an axis where the
k-space is smaller than the recon matrix) and the slice thickness is the z field of view. Parsing is done by
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
