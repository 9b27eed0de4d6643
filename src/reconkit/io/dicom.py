"""DICOM MR Image Storage series (pydicom): one file per slice, uint16 pixels, real values by a real-world value
mapping.

The MR Image IOD has no Modality LUT (rescale): viewers apply the window to the stored values, and several
(GDCM, vtk-dicom) ignore a ``RescaleSlope`` on MR. So the window is in stored units and the magnitude is recovered
from the ``RealWorldValueMappingSequence`` (PS3.3 C.7.6.16.2.11), as quantitative MR scanners record it:
``magnitude = stored · RealWorldValueSlope``.

Each call makes a new study / series / frame of reference (fresh UIDs). Geometry: ``PixelSpacing = [row spacing,
column spacing]`` in mm, orientation and positions from a :class:`reconkit.io.geometry.PatientFrame` (the same frame
as :func:`reconkit.io.nifti_affine`): where the scan gives none, axial-style orientation ``[1, 0, 0, 0, 1, 0]``,
contiguous slices ``SliceThickness`` apart, positions centred on the volume.

Every Type 1 and Type 2 attribute of the MR Image IOD's mandatory modules is present (PS3.3 A.4): what a
reconstruction does not know is left empty where the standard allows it (Type 2: birth date, sex, accession
number, laterality, echo and repetition times where the scan's header lacks them, ...), the Type 1
``ScanningSequence`` / ``SequenceVariant`` are ``RM`` (research mode) / ``NONE``, and ``ImageType`` is
``DERIVED\\SECONDARY\\OTHER`` (MR images need a value 3; ``OTHER`` is its defined term for none of the maps).
"""

from __future__ import annotations

import datetime
import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pydicom.valuerep import DS

from reconkit.atomic import atomic_directory
from reconkit.data.ismrmrd_header import HeaderInfo
from reconkit.io.geometry import ImageGeometry, PatientFrame, fixed_frame

__all__ = ["Study", "new_study", "sequence_attributes", "write_dicom_series"]

_UINT16_MAX = 65535
_UNKNOWN_TYPE_2 = (  # Type 2 (2C) attributes of the MR Image IOD a reconstruction has no value for: present, empty
    "PatientBirthDate",
    "PatientSex",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "Laterality",  # 2C, required for a paired body part (a knee): which one, and the body part, are unknown
    "PositionReferenceIndicator",
    "ScanOptions",
    "MRAcquisitionType",
    "RepetitionTime",
    "EchoTime",
    "EchoTrainLength",
)


def _decimal(value: float) -> DS:
    """``value`` as a DICOM decimal string (DS) of at most 16 characters, as the standard allows: positions and
    spacings such as ``220 / 96`` mm (2.2916666666666665, 18 characters) are rounded to fit rather than written
    too long for strict readers."""
    return DS(float(value), auto_format=True)


def _slice_dataset(
    pixels: np.ndarray,
    index: int,
    frame: PatientFrame,
    slope: float,
    geometry: ImageGeometry,
    shared: dict[str, object],
) -> pydicom.Dataset:
    rows, cols = pixels.shape
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    for key, value in shared.items():
        setattr(ds, key, value)
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.InstanceNumber = index + 1
    origin = frame.origins[index]
    ds.ImagePositionPatient = [_decimal(value) for value in origin]
    ds.ImageOrientationPatient = [_decimal(value) for value in (*frame.row_cosines, *frame.col_cosines)]
    ds.SliceLocation = _decimal(np.dot(origin, frame.slice_dir))
    ds.SliceThickness = _decimal(geometry.slice_thickness_mm)
    ds.SpacingBetweenSlices = _decimal(frame.slice_spacing_mm(geometry))
    ds.PixelSpacing = [_decimal(geometry.row_spacing_mm), _decimal(geometry.col_spacing_mm)]
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RealWorldValueMappingSequence = [_real_world_value_mapping(slope)]
    ds.PixelData = pixels.astype("<u2").tobytes()
    return ds


def _real_world_value_mapping(slope: float) -> pydicom.Dataset:
    """The item ``magnitude = stored · slope`` over the whole uint16 range, in arbitrary units (UCUM ``1``)."""
    unit = pydicom.Dataset()
    unit.CodeValue, unit.CodingSchemeDesignator, unit.CodeMeaning = "1", "UCUM", "no units"
    item = pydicom.Dataset()
    item.add_new("RealWorldValueFirstValueMapped", "US", 0)  # US (not SS): the pixels are unsigned
    item.add_new("RealWorldValueLastValueMapped", "US", _UINT16_MAX)
    item.RealWorldValueIntercept = 0.0
    item.RealWorldValueSlope = float(slope)
    item.LUTExplanation = "reconstruction magnitude"
    item.LUTLabel = "MAGNITUDE"
    item.MeasurementUnitsCodeSequence = [unit]
    return item


def dicom_text(value: object, limit: int = 64, delimiters: str = "\\") -> str:
    """``value`` as a DICOM LO / PN text: printable ASCII without the value delimiter ``\\`` (others become ``_``),
    at most ``limit`` characters. ``delimiters``: the characters that become ``_`` besides non-ASCII ones (a PN also
    needs its component delimiters ``^`` and ``=``: an ID such as ``a=b=c=d`` would be four component groups of a
    name, which PN limits to three). A longer text keeps its first characters and ends in ``~`` plus 8 hex digits of
    its SHA-1, so two long identifiers that share a prefix stay distinct. Bytes (an HDF5 fixed-length string
    attribute reads as ``numpy.bytes_``) are decoded as UTF-8 first, not written as their ``b'...'`` repr."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    text = "".join(ch if ch.isascii() and ch.isprintable() and ch not in delimiters else "_" for ch in str(value))
    if len(text) <= limit:
        return text
    return text[: limit - 9] + "~" + hashlib.sha1(text.encode()).hexdigest()[:8]


def _code_string(value: str | None) -> str:
    """``value`` as a DICOM CS (upper-case letters, digits, space, ``_``; at most 16 characters), or ``""`` (Type 2:
    unknown) where it is none: the header's text is not rewritten into another code."""
    text = (value or "").strip()
    return text if len(text) <= 16 and all(ch in _CS_CHARACTERS for ch in text) else ""


_CS_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _")


class Study(NamedTuple):
    """What the series of one study share: its UIDs and its ``StudyDate`` / ``StudyTime`` (DICOM DA / TM text)."""

    instance_uid: str
    frame_of_reference_uid: str
    date: str
    time: str


def sequence_attributes(info: HeaderInfo | None, contrast: int | None = None) -> dict[str, float]:
    """``RepetitionTime`` / ``EchoTime`` (ms) and ``MagneticFieldStrength`` (T) for :func:`write_dicom_series`, where
    the ISMRMRD header gives them: the echo time of ``contrast`` (an index into the header's list of TEs, for a
    multi-echo scan's series), or the one TE of a header that lists one."""
    if info is None:
        return {}
    echo_times = info.echo_times_ms
    if contrast is not None and 0 <= contrast < len(echo_times):
        echo_time = echo_times[contrast]
    else:
        echo_time = echo_times[0] if len(echo_times) == 1 else None
    values = {"RepetitionTime": info.repetition_time_ms, "EchoTime": echo_time,
              "MagneticFieldStrength": info.field_strength_t}
    return {keyword: value for keyword, value in values.items() if value is not None and np.isfinite(value)}


def new_study() -> Study:
    """A fresh :class:`Study` (new UIDs, started now) for :func:`write_dicom_series`'s ``study``."""
    now = datetime.datetime.now()
    return Study(generate_uid(), generate_uid(), now.strftime("%Y%m%d"), now.strftime("%H%M%S"))


def write_dicom_series(
    directory: os.PathLike | str,
    volume: np.ndarray,
    geometry: ImageGeometry,
    patient_id: str | bytes = "anonymous",
    series_description: str = "reconkit reconstruction",
    study: Study | None = None,
    series_number: int = 1,
    slice_grid: tuple[Sequence[int], int] | None = None,
    sequence: Mapping[str, float] | None = None,
    frame: PatientFrame | None = None,
    patient_position: str | None = None,
) -> list[Path]:
    """Atomically write a ``(slices, rows, cols)`` magnitude volume as ``directory/slice_NNN.dcm``.

    Pixel values are ``round(volume / slope)`` as uint16 with ``slope = max / 65535`` (negative values, which an
    image-domain model may output, are written as 0; NIfTI and HDF5 keep them), recorded as the
    ``RealWorldValueSlope`` of the ``RealWorldValueMappingSequence``: ``pixel_array * slope`` recovers the
    magnitude to within half a slope. The window (in stored units) spans the 0.5–99.5th
    percentile. The directory appears complete or not at all. ``patient_id`` (``PatientID`` and ``PatientName``)
    and ``series_description`` are made valid DICOM texts by :func:`dicom_text` (fastMRI's 64-character IDs fit
    as they are).

    ``study`` (from :func:`new_study`) puts several series of one scan (e.g. its contrasts) in one study and frame
    of reference, with one study date and time, numbered by ``series_number``; by default each call starts a new
    study. ``ContentDate`` / ``ContentTime`` are when the series was written.

    ``slice_grid`` ``(indices, size)``: slice ``i`` of ``volume`` is slice ``indices[i]`` of a stack of ``size``
    (its position, ``InstanceNumber`` and file name follow), for a series that lacks some slices of its scan (e.g.
    an interrupted repetition) and must still sit where the scan's other series put them; by default the volume
    is the whole stack.

    ``sequence``: what the scan's header gives of ``RepetitionTime`` / ``EchoTime`` (ms) and
    ``MagneticFieldStrength`` (T), by DICOM keyword (:func:`sequence_attributes`); left empty (or out) otherwise.

    ``frame``: where the ``size`` slices of the stack lie in the patient (``ImageOrientationPatient``,
    ``ImagePositionPatient``, ``SliceLocation``, ``SpacingBetweenSlices``;
    :func:`reconkit.io.geometry.acquisition_frame`); by default :func:`reconkit.io.geometry.fixed_frame`.
    ``patient_position``: the header's ``patientPosition`` (e.g. ``HFS``), written where it is a valid DICOM code
    string; ``PatientPosition`` is left empty otherwise.

    Returns:
        The written file paths, in slice order.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3 or volume.shape[0] == 0 or np.iscomplexobj(volume):  # a cast would keep the real part
        raise ValueError(f"volume must be a real (slices, rows, cols) array with at least one slice; got "
                         f"{volume.dtype} {volume.shape}")
    volume = volume.astype(np.float64, copy=False)
    if not np.isfinite(volume).all():
        raise ValueError("volume holds NaN or infinite values")
    volume = np.clip(volume, 0.0, None)
    peak = float(volume.max())
    slope = peak / _UINT16_MAX if peak > 0 else 1.0
    indices, size = slice_grid if slice_grid is not None else (range(volume.shape[0]), volume.shape[0])
    if len(indices) != volume.shape[0] or not all(0 <= k < size for k in indices):
        raise ValueError(f"slice_grid {slice_grid} does not place the volume's {volume.shape[0]} slices")
    frame = frame if frame is not None else fixed_frame(geometry, volume.shape[1], volume.shape[2], size)
    if len(frame.origins) != size:
        raise ValueError(f"frame places {len(frame.origins)} slices, the stack has {size}")
    low, high = np.percentile(volume, [0.5, 99.5]) / slope  # the window, in stored units
    now = datetime.datetime.now()
    study = study if study is not None else new_study()
    series_uid = generate_uid()
    shared: dict[str, object] = {
        "Modality": "MR",
        "PatientID": dicom_text(patient_id),
        "PatientName": dicom_text(patient_id, delimiters="\\^="),
        "StudyInstanceUID": study.instance_uid,
        "SeriesInstanceUID": series_uid,
        "FrameOfReferenceUID": study.frame_of_reference_uid,
        "StudyDate": study.date,
        "StudyTime": study.time,
        "ContentDate": now.strftime("%Y%m%d"),
        "ContentTime": now.strftime("%H%M%S"),
        "SeriesNumber": int(series_number),
        "SeriesDescription": dicom_text(series_description),
        "ImageType": ["DERIVED", "SECONDARY", "OTHER"],  # MR images need value 3 (PS3.3 C.8.3.1.1.1)
        "Manufacturer": "reconkit",
        "ScanningSequence": "RM",
        "SequenceVariant": "NONE",
        "WindowCenter": f"{(low + high) / 2.0:.6g}",
        "WindowWidth": f"{max(high - low, 1.0):.6g}",
        **dict.fromkeys(_UNKNOWN_TYPE_2, ""),
        "PatientPosition": _code_string(patient_position),
        **{keyword: _decimal(value) for keyword, value in (sequence or {}).items()},
    }
    pixels = np.rint(volume / slope).clip(0, _UINT16_MAX).astype(np.uint16)
    final = Path(directory)
    names = [f"slice_{k:03d}.dcm" for k in indices]
    with atomic_directory(final) as tmp:
        for i, (k, name) in enumerate(zip(indices, names)):
            ds = _slice_dataset(pixels[i], k, frame, slope, geometry, shared)
            ds.save_as(tmp / name, enforce_file_format=True)
    return [final / name for name in names]
