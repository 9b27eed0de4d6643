"""Image geometry of a reconstructed volume (pixel spacing, slice thickness) read from an ISMRMRD XML header.

fastMRI headers give ``encoding/reconSpace`` a ``matrixSize`` (x, y) and a ``fieldOfView_mm`` (x, y, z); the
reconstruction's pixel spacing is FOV / matrix and the slice thickness is the z field of view.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Optional

__all__ = ["ImageGeometry", "geometry_from_header"]


@dataclass(frozen=True)
class ImageGeometry:
    """Spacing of a ``(slices, rows, cols)`` volume in millimetres.

    Attributes:
        row_spacing_mm: distance between neighbouring rows (along the image's vertical axis).
        col_spacing_mm: distance between neighbouring columns.
        slice_thickness_mm: slice thickness; slices are assumed contiguous (spacing = thickness).
    """

    row_spacing_mm: float = 1.0
    col_spacing_mm: float = 1.0
    slice_thickness_mm: float = 1.0


def _axis_value(node: ET.Element, section: str, axis: str, prefix: str, ns: dict[str, str]) -> Optional[float]:
    """Float text of ``section/axis`` under ``node`` (namespaced with ``prefix``), or None when absent / invalid."""
    found = node.find(f"{prefix}{section}/{prefix}{axis}", ns)
    if found is None or found.text is None:
        return None
    try:
        return float(found.text)
    except ValueError:
        return None


def geometry_from_header(header_xml: Optional[str | bytes]) -> ImageGeometry:
    """Geometry from the first ``encoding/reconSpace`` of an ISMRMRD header; 1 mm defaults where absent.

    Example:
        >>> xml = ('<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><encoding><reconSpace>'
        ...        '<matrixSize><x>320</x><y>320</y><z>1</z></matrixSize>'
        ...        '<fieldOfView_mm><x>160</x><y>140</y><z>3</z></fieldOfView_mm></reconSpace></encoding>'
        ...        '</ismrmrdHeader>')
        >>> geometry_from_header(xml)
        ImageGeometry(row_spacing_mm=0.5, col_spacing_mm=0.4375, slice_thickness_mm=3.0)
    """
    if not header_xml:
        return ImageGeometry()
    try:
        root = ET.fromstring(header_xml)
    except ET.ParseError:
        return ImageGeometry()
    ns = {"m": root.tag[1:].split("}")[0]} if root.tag.startswith("{") else {}
    prefix = "m:" if ns else ""
    recon = root.find(f"{prefix}encoding/{prefix}reconSpace", ns)
    if recon is None:
        return ImageGeometry()
    fov_x, fov_y, fov_z = (_axis_value(recon, "fieldOfView_mm", a, prefix, ns) for a in "xyz")
    mat_x, mat_y = (_axis_value(recon, "matrixSize", a, prefix, ns) for a in "xy")
    # rows run along the readout axis (x, the first image axis in fastMRI's (H, W) layout), columns along y
    return ImageGeometry(
        row_spacing_mm=fov_x / mat_x if fov_x and mat_x else 1.0,
        col_spacing_mm=fov_y / mat_y if fov_y and mat_y else 1.0,
        slice_thickness_mm=fov_z if fov_z else 1.0,
    )
