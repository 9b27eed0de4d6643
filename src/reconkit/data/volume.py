"""Opening and validating fastMRI HDF5 volumes.

Schema (see docs/architecture.md): ``kspace`` complex ``(slices, coils, H, W)`` (multi-coil) or ``(slices, H, W)``
(single-coil); ``ismrmrd_header`` XML; target ``reconstruction_rss`` (multi-coil) or ``reconstruction_esc``
(single-coil) real ``(slices, h, w)``, optional; ``mask`` real ``(W,)``, optional (test files); file attrs.

Every problem raises :class:`reconkit.errors.DataError` naming the file. Validation reads only shapes, dtypes,
attrs and the header, never the k-space itself.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from reconkit.data.ismrmrd_header import HeaderInfo, check_header_size, parse_ismrmrd_header
from reconkit.errors import DataError, ReconkitError

__all__ = [
    "CHALLENGES",
    "Volume",
    "VolumeInfo",
    "available_memory",
    "check_fits_in_memory",
    "checked_dataset",
    "file_attrs",
    "non_finite_problem",
    "open_volume",
    "read_volume",
    "read_volume_info",
    "target_key",
]

CHALLENGES = ("multicoil", "singlecoil")


def target_key(challenge: str) -> str:
    """Name of the target dataset for ``challenge``: ``reconstruction_rss`` (``"multicoil"``) or
    ``reconstruction_esc`` (``"singlecoil"``); ValueError for any other challenge."""
    if challenge not in CHALLENGES:
        raise ValueError(f'challenge should be either "singlecoil" or "multicoil", got {challenge!r}')
    return "reconstruction_esc" if challenge == "singlecoil" else "reconstruction_rss"


@dataclass(frozen=True)
class VolumeInfo:
    """Validated description of one fastMRI file (no array data).

    Attributes:
        path: the file.
        challenge: ``"multicoil"`` (k-space 4D) or ``"singlecoil"`` (3D).
        kspace_shape: ``(slices, coils, H, W)`` or ``(slices, H, W)``.
        target_key: name of the target dataset if the file has one, else None.
        target_shape: ``(slices, h, w)`` of the target, or None.
        mask_shape: ``(W,)`` of the stored mask (undersampled test files), or None.
        header: parsed ISMRMRD header.
        attrs: the file's HDF5 attributes (``acquisition``, ``max``, ``norm``, ``patient_id``, ...); see
            :func:`file_attrs`.
    """

    path: Path
    challenge: str
    kspace_shape: tuple[int, ...]
    target_key: str | None
    target_shape: tuple[int, ...] | None
    mask_shape: tuple[int, ...] | None
    header: HeaderInfo
    attrs: dict

    @property
    def num_slices(self) -> int:
        """Slice count: the first axis of ``kspace_shape``."""
        return self.kspace_shape[0]

    @property
    def num_coils(self) -> int | None:
        """Coil count, None for single-coil files."""
        return self.kspace_shape[1] if self.challenge == "multicoil" else None

    def metadata(self) -> dict:
        """Per-sample metadata as fastmri's ``SliceDataset`` builds it: padding, sizes, then the file attrs."""
        return {**self.header.metadata(), **self.attrs}


@dataclass(frozen=True)
class Volume:
    """A whole fastMRI file in memory.

    Attributes:
        kspace: complex ``(slices, coils, H, W)`` or ``(slices, H, W)``, in the file's dtype (complex64 in fastMRI's
            files; :class:`reconkit.data.SliceDataset` casts to complex64, :func:`read_volume` does not).
        target: real ``(slices, h, w)`` in the file's dtype (float32 in fastMRI's files), or None.
        mask: ``(W,)`` stored mask or None.
        info: :class:`VolumeInfo`.
    """

    kspace: np.ndarray
    target: np.ndarray | None
    mask: np.ndarray | None
    info: VolumeInfo


@contextlib.contextmanager
def open_volume(path: os.PathLike | str) -> Iterator[h5py.File]:
    """Open a fastMRI file read-only, turning every way it can fail to open into a :class:`DataError`.

    Reports: file not found, a directory or other non-regular file (a FIFO), empty file, a file it cannot read (no
    read permission), not an HDF5 file, a file another process holds open for writing (HDF5's file lock), truncated
    or corrupt HDF5 file. The h5py errors that corrupt metadata raises inside the ``with`` block (``RuntimeError``,
    ``ValueError``, ``TypeError``, ``OSError``, ``KeyError``, e.g. "bad local heap signature" at the first lookup of
    a file that opened) become a :class:`DataError` too.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "file not found")
    if path.is_dir():
        raise DataError(path, "is a directory, not an HDF5 file")
    if not path.is_file():  # opening a FIFO would wait for a writer for ever
        raise DataError(path, "is not a regular file (a FIFO, socket or device), not an HDF5 file")
    if path.stat().st_size == 0:
        raise DataError(path, "empty file (0 bytes)")
    try:
        signature = h5py.is_hdf5(path)
    except OSError as err:  # e.g. no read permission
        reason = os.strerror(err.errno) if err.errno else _first_line(err)
        raise DataError(path, f"cannot read the file: {reason}") from None
    if not signature:
        raise DataError(path, "not an HDF5 file (no HDF5 signature)")
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        if "unable to lock file" in str(err):  # HDF5's own lock: a sound file that a writer holds right now
            raise DataError(path, f"locked: another process has it open for writing ({_first_line(err)})") from None
        raise DataError(path, f"truncated or corrupt HDF5 file ({_first_line(err)})") from None
    with handle:
        try:
            yield handle
        except ReconkitError:
            raise
        except (RuntimeError, ValueError, TypeError, OSError, KeyError) as err:
            raise DataError(path, f"truncated or corrupt HDF5 file ({_first_line(err)})") from None


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def checked_dataset(hf: h5py.File, key: str, path: Path) -> h5py.Dataset | None:
    """Dataset ``key`` of the open file ``hf`` (found at ``path``), None when absent.

    Raises:
        DataError: naming ``path``: ``key`` is a group, a link to a missing file or object or to a FIFO, socket or
            device (which HDF5 would wait on), a dataset stored in
            external raw files (``h5py``'s ``external=``: any file, ``/etc/passwd`` too, read as its data), a
            virtual dataset with a missing source, has a datatype numpy lacks, or needs an HDF5 filter plugin this
            installation lacks.
    """
    device = _external_link_to_device(hf, key, path)
    if device is not None:  # HDF5 would open it: a FIFO waits for a writer for ever, a terminal for a keystroke
        raise DataError(path, f"'{key}' is a link to {device}, which is not a regular file (a FIFO, socket or device)")
    if key not in hf:
        return None
    try:
        node = hf[key]
    except KeyError:  # a soft or external link ('in' sees the link) whose file or object is missing
        link = hf.get(key, getlink=True)
        target = f"{link.filename}:{link.path}" if isinstance(link, h5py.ExternalLink) else getattr(link, "path", "?")
        problem = f"'{key}' is a link to {target}, which cannot be opened (missing file or object)"
        raise DataError(path, problem) from None
    if not isinstance(node, h5py.Dataset):
        raise DataError(path, f"'{key}' is a {type(node).__name__}, expected a dataset")
    try:
        node.dtype  # noqa: B018 - h5py builds it here, and fails for a type numpy lacks
    except TypeError as err:  # e.g. HDF5 2.0's float16 complex
        raise DataError(path, f"'{key}' has an HDF5 datatype numpy cannot hold ({_first_line(err)})") from None
    if node.external:  # HDF5 reads the bytes of whatever files these name, relative to the working directory
        files = ", ".join(sorted({os.fsdecode(name) for name, _, _ in node.external}))
        raise DataError(path, f"'{key}' keeps its data in external raw file(s) {files}, outside the HDF5 file; "
                              "reconkit reads only data stored in the file itself")
    source = _missing_virtual_source(node, path)
    if source is not None:  # HDF5 would read the fill value (zeros) in its place, without an error
        raise DataError(path, f"'{key}' is a virtual dataset whose source {source} cannot be found")
    missing = _missing_filter(node)
    if missing is not None:
        raise DataError(path, f"'{key}' is compressed with HDF5 filter {missing}, which this HDF5 library cannot "
                              "load: install the filter's plugin (e.g. the hdf5plugin package) and point "
                              "HDF5_PLUGIN_PATH at its folder")  # fmt: skip
    return node


def _external_link_to_device(hf: h5py.File, key: str, path: Path) -> str | None:
    """``"<file>:<object>"`` of the first external link on the way to ``key`` (``"dataset/xml"``: the links
    ``dataset`` and ``dataset/xml``) whose file exists and is not a regular file, else None. A relative file name
    counts next to ``path``, in the working directory or under ``HDF5_EXT_PREFIX``, where HDF5 looks for it."""
    parts = key.split("/")
    for depth in range(1, len(parts) + 1):
        link = hf.get("/".join(parts[:depth]), getlink=True)
        if not isinstance(link, h5py.ExternalLink):
            continue
        relative = (path.parent, ".", os.environ.get("HDF5_EXT_PREFIX"))
        folders = ("/",) if os.path.isabs(link.filename) else relative
        for file in (Path(folder, link.filename) for folder in folders if folder):
            if file.exists() and not file.is_file():
                return f"{link.filename}:{link.path}"
    return None


def _missing_virtual_source(node: h5py.Dataset, path: Path) -> str | None:
    """``"<file>:<dataset>"`` of the first source of virtual dataset ``node`` (in the file at ``path``) that is
    missing, else None. A relative source file name counts as found next to ``path``, in the working directory or
    under ``HDF5_VDS_PREFIX``, where HDF5 looks for it."""
    if not node.is_virtual:
        return None
    for source in node.virtual_sources():
        if source.file_name == ".":  # a source in the same file
            found = isinstance(node.file.get(source.dset_name), h5py.Dataset)
        else:
            relative = (path.parent, ".", os.environ.get("HDF5_VDS_PREFIX"))
            folders = ("/",) if os.path.isabs(source.file_name) else relative
            found = any(_has_dataset(Path(folder, source.file_name), source.dset_name) for folder in folders if folder)
        if not found:
            return f"{source.file_name}:{source.dset_name}"
    return None


def _has_dataset(file: Path, key: str) -> bool:
    """Whether ``file`` is an HDF5 file that holds a dataset ``key``."""
    if not file.is_file():
        return False
    try:
        with h5py.File(file, "r") as hf:
            return isinstance(hf.get(key), h5py.Dataset)
    except OSError:
        return False


def _missing_filter(node: h5py.Dataset) -> str | None:
    """``"<id> (<name>)"`` of a filter that ``node``'s chunks went through and this HDF5 library cannot load (a
    compression plugin such as Blosc, Zstandard or Bitshuffle that another site's writer had), else None; without
    this check reading the data fails with HDF5's "can't open directory (<plugin dir>)". An optional filter (h5py
    marks every plugin filter so) counts only when the first chunk went through it: a writer that lacked it stores
    the chunks unfiltered."""
    if node.chunks is None:  # contiguous or compact storage has no filters
        return None
    dcpl = node.id.get_create_plist()
    for index in range(dcpl.get_nfilters()):
        code, flags, _, name = dcpl.get_filter(index)
        if h5py.h5z.filter_avail(code):
            continue
        if flags & h5py.h5z.FLAG_OPTIONAL and (
            node.id.get_num_chunks() == 0 or node.id.get_chunk_info(0).filter_mask & (1 << index)
        ):
            continue
        return f"{code} ({name.decode('ascii', 'replace') or 'unnamed'})"
    return None


def available_memory() -> int | None:
    """Bytes of memory the system says a process can still take without swapping: Linux's ``MemAvailable``, or the
    room a cgroup v2 limit (a container's) leaves beside its processes' own memory (``anon``; page cache counts as
    free, as the kernel reclaims it) where that is less; the physical memory where there is no ``/proc/meminfo``
    (macOS); None where neither is known (Windows)."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, OSError, ValueError):
            return None
    found = [int(line.split()[1]) * 1024 for line in meminfo.splitlines() if line.startswith("MemAvailable:")]
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            usage = dict(line.split() for line in Path("/sys/fs/cgroup/memory.stat").read_text().splitlines())
            found.append(int(limit) - int(usage["anon"]))
    except (OSError, ValueError, KeyError):
        pass
    return min(found) if found else None


def check_fits_in_memory(path: Path, arrays: Sequence[tuple[str, Sequence[int], np.dtype]]) -> None:
    """Raise :class:`DataError` naming ``path`` when building ``arrays`` (``(name, shape, dtype)`` each) needs more
    memory than :func:`available_memory`. A file of a few KB can declare terabytes (HDF5 datasets of compressed
    zeros, or of chunks never written, which HDF5 reads as zeros; an ISMRMRD header's encoded matrix): numpy
    allocated what it declared and HDF5 filled it, or the allocation failed with a MemoryError."""
    needed = sum(math.prod(shape) * np.dtype(dtype).itemsize for _, shape, dtype in arrays)
    available = available_memory()
    if available is not None and needed > available:
        listed = " + ".join(f"{name} {tuple(shape)} {np.dtype(dtype)}" for name, shape, dtype in arrays)
        raise DataError(path, f"reading {listed} takes {needed / 2**30:.3g} GiB, more than the "
                              f"{available / 2**30:.3g} GiB of memory available")  # fmt: skip


def _read_header(hf: h5py.File, path: Path) -> HeaderInfo:
    node = checked_dataset(hf, "ismrmrd_header", path)
    if node is None:
        raise DataError(path, "missing dataset 'ismrmrd_header'")
    check_header_size(node.dtype.itemsize * node.size, path)  # fixed-length strings: before they are allocated
    try:
        xml = node[()]
    except (OSError, TypeError) as err:
        raise DataError(path, f"cannot read 'ismrmrd_header' ({_first_line(err)})") from None
    if isinstance(xml, np.ndarray) and xml.size == 1:
        xml = xml.reshape(()).item()
    return parse_ismrmrd_header(xml, source=path)


_PROSTATE_LAYOUT = (  # https://github.com/cai2r/fastMRI_prostate: t2_reconstruction, dwi_reconstruction
    "; 5 axes are the fastMRI prostate layout (averages, slices, coils, readout, phase), which reconkit does not "
    "read: its averages are each undersampled and its reference images are GRAPPA reconstructions "
    "(see docs/data.md)"
)


def _validate(hf: h5py.File, path: Path, challenge: str | None) -> VolumeInfo:
    kspace = checked_dataset(hf, "kspace", path)
    if kspace is None:
        raise DataError(path, "missing dataset 'kspace'")
    if not np.issubdtype(kspace.dtype, np.complexfloating):
        raise DataError(path, f"'kspace' has dtype {kspace.dtype}, expected complex64")
    if kspace.ndim not in (3, 4):
        problem = f"'kspace' has shape {kspace.shape}, expected (slices, coils, H, W) or (slices, H, W)"
        raise DataError(path, problem + (_PROSTATE_LAYOUT if kspace.ndim == 5 else ""))
    found = "multicoil" if kspace.ndim == 4 else "singlecoil"
    if challenge is not None and challenge != found:
        raise DataError(path, f"'kspace' has shape {kspace.shape}: a {found} file, but challenge is {challenge!r}")
    if 0 in kspace.shape:
        raise DataError(path, f"'kspace' is empty: shape {kspace.shape}")
    header = _read_header(hf, path)
    (height, width), (encoded_x, encoded_y) = kspace.shape[-2:], header.encoding_size[:2]
    if (height, width) == (encoded_y, encoded_x) != (encoded_x, encoded_y):  # its padding would cut the readout
        raise DataError(path, f"'kspace' is {height} x {width} (H x W), the header's encoded matrix {encoded_x} x "
                              f"{encoded_y} (readout x phase-encode) the other way round: its last two axes are "
                              "swapped; store it as (..., readout H, phase-encode W), as fastMRI's files")  # fmt: skip

    key = target_key(found)
    target = checked_dataset(hf, key, path)
    if target is not None:
        if not np.issubdtype(target.dtype, np.floating):
            raise DataError(path, f"'{key}' has dtype {target.dtype}, expected float32")
        if target.ndim != 3 or target.shape[0] != kspace.shape[0]:
            raise DataError(
                path, f"'{key}' has shape {target.shape}, expected ({kspace.shape[0]}, h, w) to match 'kspace'"
            )
    mask = checked_dataset(hf, "mask", path)
    if mask is not None and mask.shape != (kspace.shape[-1],):
        raise DataError(path, f"'mask' has shape {mask.shape}, expected ({kspace.shape[-1]},) to match 'kspace'")
    return VolumeInfo(
        path=path,
        challenge=found,
        kspace_shape=tuple(kspace.shape),
        target_key=None if target is None else key,
        target_shape=None if target is None else tuple(target.shape),
        mask_shape=None if mask is None else tuple(mask.shape),
        header=header,
        attrs=file_attrs(hf),
    )


def file_attrs(hf: h5py.File) -> dict:
    """The file's HDF5 attributes, each one-element array (MATLAB and some converters store scalars so: ``max`` as
    ``array([0.0004])``) as its scalar, which is how fastMRI's files hold them; other values as stored, except HDF5
    object and region references (alone or in an array), which are left out: they mean something only while their
    file is open, and pickle refuses them, so a dataset holding one could not be sent to a ``DataLoader`` worker
    started by ``spawn`` or ``forkserver`` (macOS, Windows, Python 3.14's Linux default) nor cached."""
    attrs = {key: value.reshape(())[()] if isinstance(value, np.ndarray) and value.size == 1 else value
             for key, value in hf.attrs.items()}  # fmt: skip
    return {key: value for key, value in attrs.items() if not _holds_reference(value)}


def _holds_reference(value: object) -> bool:
    """Whether an attribute value is an HDF5 object / region reference or an object array holding one."""
    if isinstance(value, (h5py.Reference, h5py.RegionReference)):
        return True
    return isinstance(value, np.ndarray) and value.dtype == object and any(map(_holds_reference, value.flat))


def read_volume_info(path: os.PathLike | str, challenge: str | None = None) -> VolumeInfo:
    """Open and validate a fastMRI file without reading its arrays.

    Args:
        path: the ``.h5`` file.
        challenge: ``"multicoil"`` / ``"singlecoil"`` to require that layout, or None to accept either.

    Raises:
        DataError: the file is missing, empty, not HDF5, truncated or corrupt, or does not follow the schema
            (missing ``kspace``, wrong dtype or number of dimensions, missing or garbled ``ismrmrd_header``,
            ``kspace`` whose last two axes are the header's encoded matrix the other way round (readout x
            phase-encode swapped),
            target or mask whose shape does not match ``kspace``, a dataset that is a link to a missing file or
            object, one stored in external raw files, a virtual dataset with a missing source, or one that needs an
            HDF5 filter plugin this installation lacks).
    """
    if challenge is not None:
        target_key(challenge)  # validates the name
    with open_volume(path) as hf:
        return _validate(hf, Path(path), challenge)


def read_volume(path: os.PathLike | str, challenge: str | None = None) -> Volume:
    """Read a whole fastMRI file (k-space, target, mask) after validating it; see :func:`read_volume_info`.

    Raises:
        DataError: as :func:`read_volume_info`, or the arrays need more memory than is available
            (:func:`check_fits_in_memory`), or the data cannot be read, or ``kspace`` holds NaN / inf values.
    """
    path = Path(path)
    with open_volume(path) as hf:
        info = _validate(hf, path, challenge)
        keys = ["kspace"] + ([info.target_key] if info.target_key else []) + (["mask"] if info.mask_shape else [])
        check_fits_in_memory(path, [(f"'{key}'", hf[key].shape, hf[key].dtype) for key in keys])
        try:
            kspace = hf["kspace"][()]
            target = None if info.target_key is None else hf[info.target_key][()]
            mask = None if info.mask_shape is None else hf["mask"][()]
        except OSError as err:
            raise DataError(path, f"cannot read data, file truncated or corrupt ({_first_line(err)})") from None
    problem = non_finite_problem(kspace, "kspace")
    if problem is not None:
        raise DataError(path, problem)
    return Volume(kspace=kspace, target=target, mask=mask, info=info)


def non_finite_problem(data: np.ndarray, key: str) -> str | None:
    """``"'<key>' holds N NaN / inf values (first at index (...))"`` when ``data`` (any shape, real or complex)
    holds any, else None: the problem a :class:`DataError` reports for such an array."""
    with np.errstate(over="ignore", invalid="ignore"):  # inf − inf, or a sum past float32's range
        total = data.sum()
    if np.isfinite(total):  # one pass, no mask: NaN / inf always make the sum NaN / inf
        return None
    finite = np.isfinite(data)
    if finite.all():  # the sum overflowed
        return None
    first = np.unravel_index(int(np.argmin(finite)), data.shape)
    return f"'{key}' holds {data.size - int(finite.sum())} NaN / inf values (first at index {tuple(map(int, first))})"
