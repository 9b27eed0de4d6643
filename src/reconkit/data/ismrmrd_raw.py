"""Cartesian ISMRMRD raw data (``dataset/data`` + ``dataset/xml`` HDF5, read with the ``ismrmrd`` package) as a
fastMRI-layout :class:`reconkit.data.Volume`, so ``reconkit reconstruct`` takes raw scanner exports too.

Each imaging acquisition ``(coils, samples)`` is one k-space column: readout samples run along H, the phase-encode
index ``kspace_encode_step_1`` is placed at column ``step + padding_left`` (the fastMRI convention, so the header's
centre line lands at ``W // 2``), ``idx.slice`` selects the slice. Repeated lines (averages) are averaged. Noise,
navigator, phase-correction and other non-imaging acquisitions are skipped. Unacquired columns stay zero, so an
undersampled acquisition is recognised as such.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from reconkit.data.ismrmrd_header import HeaderInfo, parse_ismrmrd_header
from reconkit.data.volume import Volume, VolumeInfo
from reconkit.errors import DataError

__all__ = ["is_ismrmrd_raw", "read_ismrmrd_raw"]

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
    try:
        with h5py.File(path, "r") as f:
            group = f.get("dataset")
            return isinstance(group, h5py.Group) and "data" in group and "xml" in group
    except (OSError, ValueError):
        return False


def read_ismrmrd_raw(path: os.PathLike | str) -> Volume:
    """Read a Cartesian 2D ISMRMRD raw file into ``Volume(kspace (slices, coils, samples, W), target=None)``.

    Raises:
        DataError: unreadable file or header, no imaging acquisitions, inconsistent coil / sample counts, or
            phase-encode indices outside the encoded matrix.
    """
    import ismrmrd

    path = Path(path)
    try:
        dataset = ismrmrd.Dataset(str(path), "dataset", create_if_needed=False)
        header = parse_ismrmrd_header(dataset.read_xml_header(), source=path)
        acquisitions = [dataset.read_acquisition(i) for i in range(dataset.number_of_acquisitions())]
        dataset.close()
    except DataError:
        raise
    except Exception as err:  # the ismrmrd package raises assorted types for damaged files
        raise DataError(path, f"cannot read ISMRMRD raw data ({type(err).__name__}: {err})") from None
    flags = [getattr(ismrmrd, name) for name in _SKIP_FLAGS if hasattr(ismrmrd, name)]
    imaging = [a for a in acquisitions if not any(a.is_flag_set(flag) for flag in flags)]
    if not imaging:
        raise DataError(path, "ISMRMRD file holds no imaging acquisitions")
    shapes = {a.data.shape for a in imaging}
    if len(shapes) != 1:
        raise DataError(path, f"acquisitions differ in (coils, samples): {sorted(shapes)}")
    coils, samples = shapes.pop()
    width = header.encoding_size[1]
    num_slices = 1 + max(a.idx.slice for a in imaging)
    kspace = np.zeros((num_slices, coils, samples, width), np.complex128)
    counts = np.zeros((num_slices, width), np.int64)
    for acquisition in imaging:
        column = acquisition.idx.kspace_encode_step_1 + header.padding_left
        if not 0 <= column < width:
            raise DataError(
                path,
                f"phase-encode step {acquisition.idx.kspace_encode_step_1} falls outside the {width} encoded columns",
            )
        kspace[acquisition.idx.slice, :, :, column] += acquisition.data
        counts[acquisition.idx.slice, column] += 1
    kspace /= np.maximum(counts, 1)[:, None, None, :]
    return _volume(path, kspace.astype(np.complex64), header)


def _volume(path: Path, kspace: np.ndarray, header: HeaderInfo) -> Volume:
    info = VolumeInfo(
        path=path,
        challenge="multicoil",
        kspace_shape=tuple(kspace.shape),
        target_key=None,
        target_shape=None,
        mask_shape=None,
        header=header,
        attrs={"acquisition": "ismrmrd_raw"},
    )
    return Volume(kspace=kspace, target=None, mask=None, info=info)
