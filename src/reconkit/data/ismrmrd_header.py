"""ISMRMRD XML header parsing: the sizes and limits fastMRI files carry in their ``ismrmrd_header`` dataset.

Values are looked up exactly as ``fastmri.data.SliceDataset._retrieve_metadata`` does (first element found by a
nested descendant search in the ISMRMRD namespace), so ``encoding_size``, ``recon_size``, ``padding_left`` and
``padding_right`` equal fastmri's for the same file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from xml.etree import ElementTree

from reconkit.errors import DataError

__all__ = ["ISMRMRD_NAMESPACE", "MAX_HEADER_BYTES", "HeaderInfo", "check_header_size", "parse_ismrmrd_header"]

ISMRMRD_NAMESPACE = "http://www.ismrm.org/ISMRMRD"

MAX_HEADER_BYTES = 4 * 2**20
"""Largest ISMRMRD XML header read (fastMRI's are 10-20 KB). A few KB of compressed HDF5 can hold a header of
gigabytes, and ElementTree takes about 50 times a header's size to build it (``<x/>`` repeated: a 25 KB file, 20 MB of
XML, took 0.9 GB and 8 s)."""


def check_header_size(size: int, source: os.PathLike | str | None) -> None:
    """Raise :class:`DataError` naming ``source`` when a header of ``size`` bytes (characters) exceeds
    :data:`MAX_HEADER_BYTES`."""
    if size > MAX_HEADER_BYTES:
        raise DataError(None if source is None else str(source),
                        f"ismrmrd_header is {size} bytes, more than the {MAX_HEADER_BYTES} (4 MiB) a header may be")


@dataclass(frozen=True)
class HeaderInfo:
    """What reconkit uses from an ISMRMRD header.

    Attributes:
        encoding_size: encoded matrix ``(x, y, z)``: x = readout (with oversampling), y = phase-encode lines.
        recon_size: reconstructed matrix ``(x, y, z)``.
        encoding_fov_mm: encoded field of view ``(x, y, z)`` in mm.
        recon_fov_mm: reconstructed field of view ``(x, y, z)`` in mm.
        kspace_encoding_step_1_center: centre line index of phase-encode step 1.
        kspace_encoding_step_1_maximum: maximum line index of phase-encode step 1 (as in the XML, not +1).
        kspace_encoding_step_1_minimum: minimum line index of phase-encode step 1 (0 if not given; more where a
            partial-Fourier scan numbers its lines in the full k-space: its first line sits at column
            ``padding_left + minimum``).
        padding_left: first acquired column: ``encoding_size[1] // 2 − center``.
        padding_right: one past the last acquired column: ``padding_left + maximum + 1``.
        slice_thickness_mm: reconstructed field of view along z in mm (the slice thickness of 2D acquisitions).
        repetition_time_ms: first ``sequenceParameters/TR`` in ms, if given.
        echo_time_ms: first ``sequenceParameters/TE`` in ms, if given.
        echo_times_ms: every ``sequenceParameters/TE`` in ms, in order (a multi-echo scan lists one per contrast).
        field_strength_t: ``acquisitionSystemInformation/systemFieldStrength_T`` in tesla, if given.
        trajectory: ``encoding/trajectory`` (``"cartesian"``, ``"radial"``, ``"epi"``, ...), if given.
        calibration_mode: ``encoding/parallelImaging/calibrationMode`` (``"embedded"``, ``"separate"``, ...), if
            given.
        patient_position: ``measurementInformation/patientPosition`` (``"HFS"``, ``"FFS"``, ...), if given.
        patient_id: ``subjectInformation/patientID``, if given.
    """

    encoding_size: tuple[int, int, int]
    recon_size: tuple[int, int, int]
    encoding_fov_mm: tuple[float, float, float]
    recon_fov_mm: tuple[float, float, float]
    kspace_encoding_step_1_center: int
    kspace_encoding_step_1_maximum: int
    kspace_encoding_step_1_minimum: int
    padding_left: int
    padding_right: int
    slice_thickness_mm: float
    repetition_time_ms: float | None = None
    echo_time_ms: float | None = None
    echo_times_ms: tuple[float, ...] = ()
    field_strength_t: float | None = None
    trajectory: str | None = None
    calibration_mode: str | None = None
    patient_position: str | None = None
    patient_id: str | None = None

    def metadata(self) -> dict:
        """The entries fastmri's ``SliceDataset`` puts in each sample's metadata."""
        return {
            "padding_left": self.padding_left,
            "padding_right": self.padding_right,
            "encoding_size": self.encoding_size,
            "recon_size": self.recon_size,
        }


class _Reader:
    """Descendant lookups in one parsed header; errors name ``source`` and the missing path."""

    def __init__(self, root: ElementTree.Element, source: str | None):
        self.root = root
        self.source = source
        self.namespace = ISMRMRD_NAMESPACE if root.tag.startswith("{") else None

    def find(self, path: Sequence[str]) -> ElementTree.Element | None:
        found = self.find_all(path)
        return found[0] if found else None

    def find_all(self, path: Sequence[str]) -> list[ElementTree.Element]:
        if self.namespace:
            query = "." + "".join(f"//ism:{name}" for name in path)
            return self.root.findall(query, {"ism": self.namespace})
        return self.root.findall("." + "".join(f"//{name}" for name in path))

    def numbers(self, path: Sequence[str], kind: type) -> tuple:
        """Every element at ``path`` as a number (none: an empty tuple)."""
        texts = [element.text.strip() for element in self.find_all(path) if element.text is not None]
        try:
            return tuple(kind(text) for text in texts)
        except ValueError:
            raise DataError(self.source, f"ismrmrd_header: {'/'.join(path)} is {texts!r}, not numbers") from None

    def text(self, path: Sequence[str]) -> str | None:
        element = self.find(path)
        return None if element is None or element.text is None else element.text.strip()

    def number(self, path: Sequence[str], kind: type, required: bool = True):
        text = self.text(path)
        if text is None:
            if required:
                raise DataError(self.source, f"ismrmrd_header lacks {'/'.join(path)}")
            return None
        try:
            return kind(text)
        except ValueError:
            raise DataError(self.source, f"ismrmrd_header: {'/'.join(path)} is {text!r}, not a number") from None

    def triple(self, path: Sequence[str], kind: type) -> tuple:
        return tuple(self.number([*path, axis], kind) for axis in ("x", "y", "z"))


def parse_ismrmrd_header(xml: str | bytes, source: os.PathLike | str | None = None) -> HeaderInfo:
    """Parse an ISMRMRD XML header.

    Args:
        xml: the XML document (``hf["ismrmrd_header"][()]`` of a fastMRI file), str or bytes.
        source: file the header came from, used in error messages.

    Returns:
        :class:`HeaderInfo`.

    Raises:
        DataError: the XML is longer than :data:`MAX_HEADER_BYTES`, malformed, or lacks the encoded / recon matrix sizes, the fields of view or the
            ``kspace_encoding_step_1`` centre or maximum (a header without that element, which the ISMRMRD schema
            allows, gets ``center = y // 2`` and ``maximum = y − 1`` of the encoded matrix: all lines acquired),
            or its recon matrix x or y is not positive.

    Example:
        >>> xml = ('<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><encoding>'
        ...        '<encodedSpace><matrixSize><x>640</x><y>368</y><z>1</z></matrixSize>'
        ...        '<fieldOfView_mm><x>280</x><y>280</y><z>4.5</z></fieldOfView_mm></encodedSpace>'
        ...        '<reconSpace><matrixSize><x>320</x><y>320</y><z>1</z></matrixSize>'
        ...        '<fieldOfView_mm><x>140</x><y>140</y><z>3</z></fieldOfView_mm></reconSpace>'
        ...        '<encodingLimits><kspace_encoding_step_1><minimum>0</minimum><maximum>366</maximum>'
        ...        '<center>183</center></kspace_encoding_step_1></encodingLimits></encoding></ismrmrdHeader>')
        >>> info = parse_ismrmrd_header(xml)
        >>> info.encoding_size, info.recon_size, info.padding_left, info.padding_right
        ((640, 368, 1), (320, 320, 1), 1, 368)
    """
    source_str = None if source is None else str(source)
    if isinstance(xml, bytes):
        if not xml.strip():
            raise DataError(source_str, "ismrmrd_header is empty")
    elif not isinstance(xml, str):
        raise DataError(source_str, f"ismrmrd_header must be an XML string, got {type(xml).__name__}")
    elif not xml.strip():
        raise DataError(source_str, "ismrmrd_header is empty")
    check_header_size(len(xml), source_str)
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError as err:
        raise DataError(source_str, f"ismrmrd_header is not valid XML ({err})") from None

    read = _Reader(root, source_str)
    encoded, recon = ["encoding", "encodedSpace"], ["encoding", "reconSpace"]
    limits = ["encoding", "encodingLimits", "kspace_encoding_step_1"]
    encoding_size = read.triple([*encoded, "matrixSize"], int)
    if read.find(limits) is None:  # optional in the ISMRMRD schema: every line of the encoded matrix, centred
        center, maximum, minimum = encoding_size[1] // 2, encoding_size[1] - 1, 0
    else:
        center = read.number([*limits, "center"], int)
        maximum = read.number([*limits, "maximum"], int)
        minimum = read.number([*limits, "minimum"], int, required=False) or 0
    padding_left = encoding_size[1] // 2 - center
    recon_fov = read.triple([*recon, "fieldOfView_mm"], float)
    recon_size = read.triple([*recon, "matrixSize"], int)
    if min(recon_size[:2]) < 1:  # the images are cropped to it: a crop of no pixels fails later, far from the cause
        raise DataError(source_str, f"ismrmrd_header: reconSpace matrixSize is {recon_size[0]} x {recon_size[1]}; "
                                    "the recon size must be positive")
    return HeaderInfo(
        encoding_size=encoding_size,
        recon_size=recon_size,
        encoding_fov_mm=read.triple([*encoded, "fieldOfView_mm"], float),
        recon_fov_mm=recon_fov,
        kspace_encoding_step_1_center=center,
        kspace_encoding_step_1_maximum=maximum,
        kspace_encoding_step_1_minimum=minimum,
        padding_left=padding_left,
        padding_right=padding_left + maximum + 1,
        slice_thickness_mm=recon_fov[2],
        repetition_time_ms=read.number(["sequenceParameters", "TR"], float, required=False),
        echo_time_ms=read.number(["sequenceParameters", "TE"], float, required=False),
        echo_times_ms=read.numbers(["sequenceParameters", "TE"], float),
        field_strength_t=read.number(["acquisitionSystemInformation", "systemFieldStrength_T"], float, required=False),
        trajectory=read.text(["encoding", "trajectory"]),
        calibration_mode=read.text(["encoding", "parallelImaging", "calibrationMode"]),
        patient_position=read.text(["measurementInformation", "patientPosition"]),
        patient_id=read.text(["subjectInformation", "patientID"]),
    )
