"""Cartesian ISMRMRD raw data (``dataset/data`` + ``dataset/xml`` HDF5, read with the ``ismrmrd`` package) as a
fastMRI-layout :class:`reconkit.data.Volume`, so ``reconkit reconstruct`` takes raw scanner exports too.

Each imaging acquisition ``(coils, samples)`` is one k-space column: readout samples run along H, the phase-encode
index ``kspace_encode_step_1`` is placed at column ``step + padding_left`` (the fastMRI convention, so the header's
centre line lands at ``W // 2``). What else the reader does with a scanner's acquisitions:

* Images: one per distinct ``(slice, contrast, phase, repetition, set)`` index, in that order of precedence
  (slices vary fastest), stacked along the volume's slice axis; the file attribute ``image_index`` (JSON) lists
  each image's index. Repeated lines of one image (``average``, ``segment``) are averaged.
* Geometry: the file attribute ``image_geometry`` (JSON) gives each image's ``position`` (slice centre, mm) and
  ``read_dir`` / ``phase_dir`` / ``slice_dir`` (ISMRMRD's LPS patient coordinates), from its imaging line nearest
  the k-space centre; the header's ``subjectInformation/patientID`` becomes the ``patient_id`` attribute.
* Readout: ``discard_pre`` / ``discard_post`` samples are dropped; ``ACQ_IS_REVERSE`` lines are flipped; an
  asymmetric echo (``center_sample`` set and not ``samples // 2``) is zero-padded so the echo lands at ``H // 2``.
* Parallel-imaging reference lines (``ACQ_IS_PARALLEL_CALIBRATION`` without ``_AND_IMAGING``) fill only columns
  no imaging line covers, and only if their ``(coils, samples)`` match the imaging lines and the header's
  ``calibrationMode`` is not ``separate`` / ``external`` (a separate reference scan, e.g. a GRE scan before a TSE
  one, known by that mode or by another readout, is calibration data of another contrast, not image data, and is
  left out).
* Noise, navigator, phase-correction and other non-imaging acquisitions are skipped, as are acquisitions of a
  second encoding space (``encoding_space_ref`` > 0). Unacquired columns stay zero, so an undersampled
  acquisition is recognised as such.
* 3D encoding (``kspace_encode_step_2`` taking more than one value) and a header trajectory other than
  ``cartesian`` (radial, spiral, EPI: readouts that need regridding) are refused with a clear error: reconkit
  reconstructs 2D Cartesian multi-slice data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from reconkit.data.ismrmrd_header import HeaderInfo, check_header_size, parse_ismrmrd_header
from reconkit.data.volume import Volume, VolumeInfo, check_fits_in_memory, checked_dataset
from reconkit.errors import DataError

__all__ = ["image_groups", "is_ismrmrd_raw", "read_ismrmrd_raw"]

_SKIP_FLAGS = (
    "ACQ_IS_NOISE_MEASUREMENT",
    "ACQ_IS_NAVIGATION_DATA",
    "ACQ_IS_PHASECORR_DATA",
    "ACQ_IS_HPFEEDBACK_DATA",
    "ACQ_IS_DUMMYSCAN_DATA",
    "ACQ_IS_RTFEEDBACK_DATA",
    "ACQ_IS_SURFACECOILCORRECTIONSCAN_DATA",
    "ACQ_IS_PHASE_STABILIZATION",
    "ACQ_IS_PHASE_STABILIZATION_REFERENCE",
)


def is_ismrmrd_raw(path: os.PathLike | str) -> bool:
    """True if ``path`` is an HDF5 file holding an ISMRMRD ``dataset`` group (never raises)."""
    if not Path(path).is_file():  # a FIFO would block the open
        return False
    try:
        with h5py.File(path, "r") as f:
            if isinstance(f.get("dataset", getlink=True), h5py.ExternalLink):  # not followed here: it may lead to a
                return True  # FIFO, which would block; read_ismrmrd_raw's checks report where it leads
            group = f.get("dataset")
            return isinstance(group, h5py.Group) and "xml" in group  # (no "data": a file without acquisitions)
    except (OSError, ValueError):
        return False


def read_ismrmrd_raw(path: os.PathLike | str) -> Volume:
    """Read a Cartesian 2D ISMRMRD raw file into ``Volume(kspace (images, coils, H, W), target=None)``.

    ``images`` is one per ``(slice, contrast, phase, repetition, set)`` index (the module docstring); ``H`` is the
    readout length after discarded samples are dropped and an asymmetric echo is centred.

    Raises:
        DataError: unreadable file or header, an acquisition whose header declares other sizes than its row
            stores, a non-Cartesian trajectory, no imaging acquisitions, 3D encoding, imaging lines that differ in
            coil / sample counts, or phase-encode indices outside the encoded matrix.
    """
    import ismrmrd

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:  # read-only: the input's modification time stays, other readers may hold it
            for key in ("dataset/xml", "dataset/data"):  # as a fastMRI file's: no external raw files, ...
                checked_dataset(f, key, path)
            group = f["dataset"]
            check_header_size(group["xml"].dtype.itemsize, path)  # a fixed-length string: before it is allocated
            header = parse_ismrmrd_header(group["xml"][0], source=path)
            if header.trajectory not in (None, "cartesian"):  # its readouts are no k-space columns
                raise DataError(
                    path, f"{header.trajectory} trajectory is not supported: reconkit reconstructs 2D Cartesian data"
                )
            # (no "data": a header and no acquisitions at all)
            rows = len(group["data"]) if "data" in group else 0
            check_fits_in_memory(path, [(f"{rows} ISMRMRD acquisitions (without their samples)",
                                         (rows, _ACQUISITION_BYTES), np.uint8)])  # fmt: skip
            acquisitions = _read_acquisitions(path, ismrmrd, group["data"]) if rows else []
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 -- h5py and the ismrmrd package raise assorted types for damaged files
        raise DataError(path, f"cannot read ISMRMRD raw data ({type(err).__name__}: {err})") from None
    skip = [getattr(ismrmrd, name) for name in _SKIP_FLAGS if hasattr(ismrmrd, name)]
    measured = [  # the first encoding space only: a second one holds e.g. a separate reference scan
        a for a in acquisitions if a.encoding_space_ref == 0 and not any(a.is_flag_set(flag) for flag in skip)
    ]
    reference_only = [_is_reference_only(a, ismrmrd) for a in measured]
    imaging = [a for a, ref in zip(measured, reference_only) if not ref]
    reference = [a for a, ref in zip(measured, reference_only) if ref and header.calibration_mode not in _SEPARATE]
    if not imaging:
        raise DataError(path, "ISMRMRD file holds no imaging acquisitions")
    partitions = {a.idx.kspace_encode_step_2 for a in imaging}
    if len(partitions) > 1 or header.encoding_size[2] > 1:
        raise DataError(
            path,
            f"3D encoding ({len(partitions)} values of kspace_encode_step_2, encoded matrix z = "
            f"{header.encoding_size[2]}) is not supported: reconkit reconstructs 2D multi-slice data",
        )
    lines = [_readout(a, ismrmrd) for a in imaging]
    shapes = {line.shape for line in lines}
    if len(shapes) != 1:
        raise DataError(path, f"imaging acquisitions differ in (coils, samples): {sorted(shapes)}")
    coils, samples = shapes.pop()
    width = header.encoding_size[1]
    images = sorted({_image_key(a) for a in imaging}, key=lambda key: key[::-1])
    row = {key: i for i, key in enumerate(images)}
    check_fits_in_memory(path, [("k-space (header's encoded matrix y)", (len(images), coils, samples, width),
                                 np.complex64)])  # fmt: skip
    kspace = np.zeros((len(images), coils, samples, width), np.complex64)
    counts = np.zeros((len(images), width), np.int64)
    central: dict[int, tuple[int, object]] = {}  # per image: (distance from the centre column, its acquisition)
    for acquisition, line in zip(imaging, lines):
        image, column = row[_image_key(acquisition)], _column(path, acquisition, header.padding_left, width)
        kspace[image, :, :, column] += line
        counts[image, column] += 1
        if abs(column - width // 2) < central.get(image, (width + 1,))[0]:
            central[image] = (abs(column - width // 2), acquisition)
    for acquisition in reference:
        line, key = _readout(acquisition, ismrmrd), _image_key(acquisition)
        if key not in row or line.shape != (coils, samples):  # e.g. a separate reference scan, numbered its own way
            continue
        column = _column(path, acquisition, header.padding_left, width)
        if counts[row[key], column] <= 0:
            kspace[row[key], :, :, column] += line  # a column the imaging lines left empty
            counts[row[key], column] -= 1  # negative: reference lines only
    kspace /= np.maximum(np.abs(counts), 1)[:, None, None, :]
    index = [dict(zip(_IMAGE_INDEX, key)) for key in images]
    return _volume(path, kspace, header, index, [_geometry(central[image][1]) for image in range(len(images))])


_ACQUISITION_BYTES = 3 * 1024
"""Memory an ``ismrmrd.Acquisition`` takes besides its samples (measured: 2.9 KB each for 200,000 rows). A file of
KB can declare millions of rows (chunks never written, read as empty acquisitions): 200,000 took 0.7 GB and 6 s."""

_IMAGE_INDEX = ("slice", "contrast", "phase", "repetition", "set")
_UINT16_MAX = 65535  # the ISMRMRD acquisition header's index fields are uint16
_SEPARATE = ("separate", "external")  # calibration modes whose reference lines come from another scan


def _read_acquisitions(path: Path, ismrmrd, data: h5py.Dataset, block: int = 4096) -> list:
    """Every acquisition of the ISMRMRD ``dataset/data`` table (rows of ``head``, ``traj``, ``data``), read
    ``block`` rows per HDF5 call: ``ismrmrd.Dataset.read_acquisition`` reads one row per call, a few ms each, which
    took minutes for a scan's tens of thousands of lines. The trajectory is not read (Cartesian data has none).

    Raises:
        DataError: a row whose header declares other sizes than it stores (:func:`_check_row_sizes`).
    """
    acquisitions = []
    for start in range(0, len(data), block):
        for number, row in enumerate(data[start : start + block], start):
            _check_row_sizes(path, number, row)
            acquisition = ismrmrd.Acquisition(row["head"])
            acquisition.data[:] = row["data"].view(np.complex64).reshape(acquisition.data.shape)
            acquisitions.append(acquisition)
    return acquisitions


def _check_row_sizes(path: Path, number: int, row: np.void) -> None:
    """Raise :class:`DataError` unless acquisition ``number``'s header declares the sizes its row stores:
    ``active_channels * number_of_samples`` complex samples and ``number_of_samples * trajectory_dimensions``
    trajectory values (as ``ismrmrd.Dataset.read_acquisition`` requires). ``ismrmrd.Acquisition`` allocates what
    the header declares, up to 65535 channels x 65535 samples (32 GiB) and a 16 GiB trajectory, for a row of a file
    of KB; checked first, a row takes no more memory than its stored values."""
    head = row["head"]
    channels, samples, dims = (int(head[name]) for name in ("active_channels", "number_of_samples",
                                                             "trajectory_dimensions"))  # fmt: skip
    if row["data"].size != 2 * channels * samples or row["traj"].size != samples * dims:
        declared = (2 * channels + dims) * samples * 4
        raise DataError(
            path,
            f"ISMRMRD acquisition {number} declares {channels} channels x {samples} samples and a {dims}-dimensional "
            f"trajectory ({declared / 2**30:.3g} GiB) but stores {row['data'].size // 2} complex samples and "
            f"{row['traj'].size} trajectory values",
        )


def image_groups(image_index: str | None) -> list[tuple[str, list[int | None] | None]]:
    """Split a volume's images into series: one per ``(contrast, phase, repetition, set)``, each on the file's slice
    grid, so that the series of one file put the same slice at the same position.

    Args:
        image_index: the ``image_index`` attribute :func:`read_ismrmrd_raw` sets (JSON), or ``None``.

    Returns:
        ``(suffix, image positions)`` per series. The suffix names the indices that vary across the file, e.g.
        ``"_contrast1"``. The positions run over the slices from the file's lowest to its highest slice index:
        the image of that slice, or ``None`` where the series has none (e.g. an interrupted scan's last
        repetition). A file with one series holding every slice (and any non-raw volume, ``image_index=None``)
        gives ``[("", None)]``, ``None`` meaning "all images".

    >>> image_groups('[{"slice": 0, "contrast": 0}, {"slice": 0, "contrast": 1}, {"slice": 1, "contrast": 1}]')
    [('_contrast0', [0, None]), ('_contrast1', [1, 2])]
    """
    if not image_index:
        return [("", None)]
    index = _checked_index(image_index)
    fields = [name for name in _IMAGE_INDEX[1:] if len({image.get(name, 0) for image in index}) > 1]
    lowest = min(image.get("slice", 0) for image in index)
    grid_size = max(image.get("slice", 0) for image in index) - lowest + 1
    groups: dict[str, list[int | None]] = {}
    for position, image in enumerate(index):
        suffix = "".join(f"_{name}{image.get(name, 0)}" for name in fields)
        groups.setdefault(suffix, [None] * grid_size)[image.get("slice", 0) - lowest] = position
    if list(groups) == [""] and groups[""] == list(range(len(index))):
        return [("", None)]
    return list(groups.items())


def _checked_index(image_index: str) -> list[dict]:
    """The decoded ``image_index``: a list of objects whose index fields are ISMRMRD's unsigned 16-bit counters.

    Raises:
        ValueError: anything else. The attribute may come from the input file itself (any HDF5 file can carry one),
            and its values name the output series: ``{"contrast": "/../../x"}`` wrote outside ``--output``.
    """
    try:
        index = json.loads(image_index)
    except (json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"image_index is not JSON ({err})") from None
    if not isinstance(index, list) or not index or not all(isinstance(image, dict) for image in index):
        raise ValueError("image_index must be a non-empty JSON list of objects")
    for image in index:
        for name in _IMAGE_INDEX:
            value = image.get(name, 0)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _UINT16_MAX:
                raise ValueError(f"image_index: {name} must be an integer from 0 to {_UINT16_MAX}, got {value!r:.40}")
    return index


def _image_key(acquisition) -> tuple[int, ...]:
    return tuple(int(getattr(acquisition.idx, name)) for name in _IMAGE_INDEX)


def _is_reference_only(acquisition, ismrmrd) -> bool:
    return acquisition.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION) and not acquisition.is_flag_set(
        ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING
    )


def _readout(acquisition, ismrmrd) -> np.ndarray:
    """One acquisition's ``(coils, samples)`` readout: discarded samples dropped, reversed lines flipped, an
    asymmetric (partial) echo zero-padded so its centre sample lands at ``samples // 2``.

    ``center_sample`` counts in stored order; 0 means "not set" (as many writers leave it), and an echo within one
    sample of the middle counts as centred, so conventions that differ by one sample give lines of one length.
    """
    data = np.asarray(acquisition.data)
    data = data[:, acquisition.discard_pre : data.shape[-1] - acquisition.discard_post]
    samples = data.shape[-1]
    center = int(acquisition.center_sample) - int(acquisition.discard_pre)
    if acquisition.is_flag_set(ismrmrd.ACQ_IS_REVERSE):
        data, center = data[:, ::-1], samples - 1 - center
    if acquisition.center_sample == 0 or abs(center - samples // 2) <= 1 or not 0 < center < samples:
        return data
    before, after = center, samples - center  # samples left of the echo / from the echo on
    half = max(before, after)
    return np.pad(data, ((0, 0), (half - before, half - after)))


def _column(path: Path, acquisition, padding_left: int, width: int) -> int:
    column = acquisition.idx.kspace_encode_step_1 + padding_left
    if not 0 <= column < width:
        raise DataError(
            path, f"phase-encode step {acquisition.idx.kspace_encode_step_1} falls outside the {width} encoded columns"
        )
    return column


def _geometry(acquisition) -> dict[str, list[float]]:
    """An acquisition's slice centre and directions (all zeros where the writer left them unset)."""
    return {name: [float(v) for v in getattr(acquisition, name)[:]] for name in _GEOMETRY}


_GEOMETRY = ("position", "read_dir", "phase_dir", "slice_dir")


def _volume(
    path: Path, kspace: np.ndarray, header: HeaderInfo, index: list[dict[str, int]], geometry: list[dict]
) -> Volume:
    info = VolumeInfo(
        path=path,
        challenge="multicoil",
        kspace_shape=tuple(kspace.shape),
        target_key=None,
        target_shape=None,
        mask_shape=None,
        header=header,
        attrs={
            "acquisition": "ismrmrd_raw",
            "image_index": json.dumps(index),
            "image_geometry": json.dumps(geometry),
            **({"patient_id": header.patient_id} if header.patient_id else {}),
        },
    )
    return Volume(kspace=kspace, target=None, mask=None, info=info)
