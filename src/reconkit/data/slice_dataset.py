"""``SliceDataset``: one sample per k-space slice of a folder (or list) of fastMRI HDF5 files.

Behaves like ``fastmri.data.SliceDataset`` (same samples in the same order, same ``sample_rate`` /
``volume_sample_rate`` / ``num_cols`` / ``raw_sample_filter`` semantics), and adds: validation of every file while
scanning (:mod:`reconkit.data.volume`), optional skipping of bad files, and a metadata cache that is invalidated
when files are added, removed or changed (size or modification time). Several processes may share the cache file
(DDP ranks, DataLoader workers, two training runs): each write merges its entries into the file as it is on disk,
under a lock file next to it, and replaces it atomically; an unreadable cache file is ignored with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pickle
import random
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from reconkit.atomic import atomic_path
from reconkit.data.volume import (
    check_fits_in_memory,
    file_attrs,
    non_finite_problem,
    open_volume,
    read_volume_info,
    target_key,
)
from reconkit.errors import DataError, ReconkitWarning, printable

try:
    import fcntl
except ImportError:  # Windows: the cache is merged on write without the lock
    fcntl = None

__all__ = ["RawSample", "SliceDataset", "check_sample_rates", "default_cache_file", "list_volume_files"]

logger = logging.getLogger(__name__)

_CACHE_VERSION = 6  # 2: entries carry each file's slice shapes; 4: a target without the 'max' attr gets its maximum;
# 5: one-element array attrs are scalars; 6: a target's 'max' attr is checked
_VOLUME_SUFFIXES = (".h5", ".hdf5")

PathLike = str | os.PathLike


class RawSample(NamedTuple):
    """One slice: ``(fname, slice_ind, metadata)`` as fastmri's ``FastMRIRawDataSample``."""

    fname: Path
    slice_ind: int
    metadata: dict[str, Any]


def default_cache_file() -> Path:
    """``$XDG_CACHE_HOME/reconkit/dataset_cache.pkl`` (``~/.cache`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "reconkit" / "dataset_cache.pkl"


def list_volume_files(root: PathLike | Sequence[PathLike]) -> list[Path]:
    """Sorted volume files: the ``*.h5`` / ``*.hdf5`` files (any case: ``.H5`` too) directly in folder ``root``, or
    the given list."""
    if isinstance(root, (str, os.PathLike)):
        folder = Path(root)
        if not folder.is_dir():
            raise DataError(folder, "dataset root is not a folder" if folder.exists() else "dataset root not found")
        try:
            return sorted(
                p for p in folder.iterdir() if p.suffix.lower() in _VOLUME_SUFFIXES and not p.name.startswith(".")
            )
        except OSError as err:  # e.g. a folder without read permission
            raise DataError(folder, f"cannot list the folder: {err.strerror or err}") from None
    return sorted(Path(p) for p in root)


def check_sample_rates(sample_rate: float | None, volume_sample_rate: float | None, prefix: str = "") -> None:
    """Raise ``ValueError`` unless at most one of the two rates is set and it is a fraction in (0, 1] (a negative
    rate kept all but that fraction, NaN or a rate above 1 everything). ``prefix`` goes before the names in the
    message (``"val_"`` for a data module's validation rates)."""
    if sample_rate is not None and volume_sample_rate is not None:
        raise ValueError(f"either set {prefix}sample_rate (sample by slices) or {prefix}volume_sample_rate (sample by "
                         "volumes) but not both")
    for name, rate in (("sample_rate", sample_rate), ("volume_sample_rate", volume_sample_rate)):
        if rate is not None and not 0 < rate <= 1:
            raise ValueError(f"{prefix}{name} must be in (0, 1], got {rate}")


def _signature(path: Path) -> tuple[str, int, int]:
    """What invalidates a cached entry: resolved path, size, modification time (ns); (path, -1, -1) if missing."""
    try:
        stat = path.stat()
    except OSError:
        return (str(path.resolve()), -1, -1)
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def _stale_keys(cache: dict, current: Collection[tuple]) -> list[tuple]:
    """The keys of ``cache`` for older versions (other size or mtime) of the files that the ``current`` keys
    ``((path, size, mtime_ns), challenge)`` are for."""
    paths = {(signature[0], challenge) for signature, challenge in current}
    return [key for key in cache if (key[0][0], key[1]) in paths and key not in current]


_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}
"""``flock``'s errors on a file system that offers no locks, where :func:`_cache_lock` goes on without one."""


@contextlib.contextmanager
def _cache_lock(cache_file: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<cache_file>.lock`` (created if missing, left in place: removing it would
    let two processes lock two different files) while the cache is read, merged and replaced. Where the file
    system has no locks (:data:`_NO_LOCKS`: NFSv3 without ``lockd``, "No locks available"; Lustre mounted
    ``noflock``) the cache is merged without one, as on Windows: the cache only saves a rescan."""
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with open(cache_file.with_name(cache_file.name + ".lock"), "a") as lock:
        if fcntl is not None:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
            except OSError as err:
                if err.errno not in _NO_LOCKS:
                    raise
                logger.info("no lock on %s (%s); merging the dataset cache without one", lock.name, err)
        yield


def _target_max(fname: Path, key: str) -> float:
    """The maximum of a file's whole target volume (what fastMRI stores in ``attrs['max']`` and what
    ``fastmri.evaluate`` uses for PSNR / SSIM when scoring), for files that lack the attribute; warns once."""
    with open_volume(fname) as hf:
        try:
            target = hf[key]
            check_fits_in_memory(fname, [(f"one slice of '{key}'", target.shape[1:], target.dtype)])
            value = max(float(np.max(target[i])) for i in range(target.shape[0]))
        except (OSError, KeyError, ValueError) as err:
            raise DataError(fname, f"cannot read '{key}' ({err})") from None
    warnings.warn(f"{fname}: no 'max' attr; using the maximum of its '{key}' volume ({value:.6g}) for PSNR / SSIM",
                  ReconkitWarning, stacklevel=2)
    return value


def _check_max(fname: Path, value: Any) -> None:
    """Raise :class:`DataError` unless a file's ``max`` attr is a finite positive number: it is the data range of
    PSNR / SSIM and the scale of the loss, so a string failed in the training step ("'tuple' object has no attribute
    'to'", no file name) and NaN, inf or 0 made the loss, then every weight, NaN."""
    if not (isinstance(value, (int, float, np.integer, np.floating)) and np.isfinite(value) and value > 0):
        shown = value.item() if isinstance(value, np.generic) else value  # nan, not np.float64(nan)
        raise DataError(fname, f"'max' attr is {shown!r}; expected the target volume's maximum, a positive number")


class SliceDataset(torch.utils.data.Dataset):
    """fastMRI slices, read lazily (each ``__getitem__`` opens its file).

    Args:
        root: folder of ``.h5`` files, or a list of files.
        challenge: ``"multicoil"`` or ``"singlecoil"``; selects the target (``reconstruction_rss`` /
            ``reconstruction_esc``) and the required k-space layout.
        transform: called as ``transform(kspace, mask, target, attrs, fname, slice_num)``; None returns that tuple.
        use_dataset_cache: load/save per-file metadata in ``dataset_cache_file``, so re-opening does not re-read
            headers. Entries are keyed by the files' resolved paths and reused only if size and mtime are unchanged.
        sample_rate: fraction of slices to keep, in (0, 1] (shuffled with Python's ``random``, as fastmri).
        volume_sample_rate: fraction of volumes to keep, in (0, 1]; not together with ``sample_rate``.
        dataset_cache_file: the cache file (default :func:`default_cache_file`).
        num_cols: keep only slices whose ``encoding_size[1]`` is in this collection.
        raw_sample_filter: ``filter(raw_sample) -> bool`` applied to each :class:`RawSample`.
        skip_bad_files: on a file that fails validation, log a warning naming it and go on (default: raise
            :class:`DataError`).
        scan_memo: an in-memory dict of per-file scan results (keyed like the cache file) that several datasets
            share, e.g. a data module's check of all its splits and the datasets it then builds; it is read and
            filled whether or not ``use_dataset_cache`` is on, so a file's header is read once.

    Each item is ``(kspace, mask, target, attrs, fname, slice_num)``: ``kspace`` complex64 ``(C, H, W)`` or
    ``(H, W)``, ``mask`` the stored ``(W,)`` mask or None, ``target`` float32 ``(h, w)`` or None, ``attrs`` the file
    attrs (HDF5 references left out: :func:`~reconkit.data.volume.file_attrs`) plus ``padding_left``,
    ``padding_right``, ``encoding_size``, ``recon_size``, ``fname`` the file name. The dataset (with a picklable
    ``transform``) pickles, as a ``DataLoader`` whose workers start by ``spawn`` or ``forkserver`` needs.
    Reading a slice whose k-space or target holds NaN / inf raises :class:`DataError` naming the file and slice.
    """

    def __init__(
        self,
        root: PathLike | Sequence[PathLike],
        challenge: str = "multicoil",
        transform: Callable | None = None,
        use_dataset_cache: bool = True,
        sample_rate: float | None = None,
        volume_sample_rate: float | None = None,
        dataset_cache_file: PathLike | None = None,
        num_cols: Sequence[int] | None = None,
        raw_sample_filter: Callable[[RawSample], bool] | None = None,
        skip_bad_files: bool = False,
        scan_memo: dict | None = None,
    ):
        self.recons_key = target_key(challenge)
        check_sample_rates(sample_rate, volume_sample_rate)
        self.challenge = challenge
        self.transform = transform
        self.skip_bad_files = skip_bad_files
        self.dataset_cache_file = Path(dataset_cache_file) if dataset_cache_file is not None else default_cache_file()

        files = list_volume_files(root)
        entries = self._scan(files, use_dataset_cache, scan_memo)
        self.slice_shapes: dict[Path, tuple] = {fname: shapes for fname, (_, _, shapes) in entries.items()}
        self.num_slices: dict[Path, int] = {fname: count for fname, (_, count, _) in entries.items()}  # per file
        raw_samples = [
            RawSample(fname, slice_ind, metadata)
            for fname, (metadata, num_slices, _) in entries.items()
            for slice_ind in range(num_slices)
        ]
        if raw_sample_filter is not None:
            raw_samples = [s for s in raw_samples if raw_sample_filter(s)]

        if sample_rate is not None and sample_rate < 1.0:
            random.shuffle(raw_samples)
            raw_samples = raw_samples[: round(len(raw_samples) * sample_rate)]
        elif volume_sample_rate is not None and volume_sample_rate < 1.0:
            volume_names = sorted({s.fname.stem for s in raw_samples})
            random.shuffle(volume_names)
            kept = set(volume_names[: round(len(volume_names) * volume_sample_rate)])
            raw_samples = [s for s in raw_samples if s.fname.stem in kept]
        if num_cols:
            raw_samples = [s for s in raw_samples if s.metadata["encoding_size"][1] in num_cols]
        self.raw_samples: list[RawSample] = raw_samples

    # ----------------------------------------------------------------------------------------- metadata scan

    def _scan(self, files: list[Path], use_cache: bool,
              memo: dict | None = None) -> dict[Path, tuple[dict, int, tuple]]:
        """``{file: (metadata, num_slices, slice shapes)}`` for the good files, in ``files`` order (slice shapes:
        see :meth:`shape_key`); cache file and ``memo`` read and updated."""
        cache = {**(memo or {}), **(self._load_cache() if use_cache else {})}
        keys = {fname: (_signature(fname), self.challenge) for fname in files}
        entries: dict[Path, tuple[dict, int, tuple]] = {}
        bad: list[tuple[Path, str]] = []
        changed = bool(_stale_keys(cache, set(keys.values())))  # older versions of the files being scanned
        for fname in files:
            key = keys[fname]
            cached = cache.get(key)
            if cached is None:
                try:
                    info = read_volume_info(fname, self.challenge)
                    metadata = info.metadata()
                    if info.target_key is not None and "max" not in info.attrs:  # the transforms need it
                        metadata["max"] = _target_max(fname, info.target_key)
                    elif info.target_key is not None:
                        _check_max(fname, info.attrs["max"])
                    target_shape = None if info.target_shape is None else info.target_shape[1:]
                    cached = ("ok", (metadata, info.num_slices, (info.kspace_shape[1:], target_shape)))
                except DataError as err:
                    cached = ("bad", err.problem)
                cache[key] = cached
                changed = True
            status, value = cached
            if status == "ok":
                entries[fname] = value
            elif self.skip_bad_files:
                logger.warning("skipping %s: %s", printable(fname), printable(value))
            else:
                bad.append((fname, value))
        if memo is not None:
            memo.update({key: cache[key] for key in keys.values()})
        if use_cache and changed:
            self._save_cache({key: cache[key] for key in keys.values()})
        if bad:  # every bad file in one error, so one run finds them all
            more = "; ".join(f"{path}: {problem}" for path, problem in bad[1:])
            raise DataError(bad[0][0], bad[0][1] + (f" (and {len(bad) - 1} more bad file(s): {more})" if more else "")
                            + "; skip_bad_files leaves bad files out with a warning")
        return entries

    def _load_cache(self) -> dict:
        path = self.dataset_cache_file
        if not path.exists():
            return {}
        try:
            with open(path, "rb") as f:
                content = pickle.load(f)
        except Exception as err:  # noqa: BLE001 -- unpickling raises any type: TypeError for a damaged file,
            # ModuleNotFoundError for one written where other modules exist (a numpy 2 cache read under numpy 1)
            logger.warning("ignoring unreadable dataset cache %s (%s); rescanning", path, err)
            return {}
        if (not isinstance(content, dict) or content.get("version") != _CACHE_VERSION
                or not isinstance(content.get("entries"), dict)):
            logger.warning("ignoring dataset cache %s of another format; rescanning", path)
            return {}
        logger.info("using dataset cache %s", path)
        return content["entries"]

    def _save_cache(self, scanned: dict) -> None:
        """Merge the ``scanned`` entries into the cache file: under :func:`_cache_lock`, read the file as it is now
        (another process may have added entries since this one read it), add ``scanned``, drop the older versions
        of those files, write it atomically (temp file then ``os.replace``). Failure only logs a warning."""
        path = self.dataset_cache_file
        try:
            with _cache_lock(path):
                entries = {**self._load_cache(), **scanned}
                for key in _stale_keys(entries, scanned.keys()):
                    del entries[key]
                with atomic_path(path) as tmp, open(tmp, "wb") as f:
                    pickle.dump({"version": _CACHE_VERSION, "entries": entries}, f)
            logger.info("saved dataset cache to %s", path)
        except (OSError, pickle.PicklingError, TypeError) as err:  # TypeError: a value pickle refuses
            logger.warning("could not write dataset cache %s (%s)", path, err)

    # ----------------------------------------------------------------------------------------- samples

    def __len__(self) -> int:
        return len(self.raw_samples)

    def shape_key(self, i: int) -> tuple:
        """Shapes of sample ``i``'s arrays as stored, ``(kspace (coils, H, W) or (H, W), target (h, w) or None)``:
        slices with equal keys can share a batch (read from the file headers while scanning, no array data)."""
        return self.slice_shapes[self.raw_samples[i].fname]

    def __getitem__(self, i: int):
        fname, slice_ind, metadata = self.raw_samples[i]
        with open_volume(fname) as hf:
            keys = ["kspace"] + ([self.recons_key] if self.recons_key in hf else [])
            slices = [(f"one slice of '{key}'", hf[key].shape[1:], hf[key].dtype) for key in keys]
            check_fits_in_memory(fname, slices)
            try:
                # complex128 k-space / float64 targets (valid HDF5, e.g. from MATLAB or numpy defaults) are cast
                # to the dtypes the class promises: float64 tensors would reach float32 model weights
                kspace = np.asarray(hf["kspace"][slice_ind]).astype(np.complex64, copy=False)
                mask = np.asarray(hf["mask"]) if "mask" in hf else None
                target = hf[self.recons_key][slice_ind] if self.recons_key in hf else None
                if target is not None:
                    target = np.asarray(target).astype(np.float32, copy=False)
            except (OSError, KeyError, ValueError) as err:
                raise DataError(fname, f"cannot read slice {slice_ind} ({err})") from None
            attrs = file_attrs(hf)
        # the scan reads no array data, so NaN / inf are found here: passed on, one such slice turns the loss and
        # then every weight into NaN, or a whole predicted slice into NaN
        for key, data in (("kspace", kspace), (self.recons_key, target)):
            problem = None if data is None else non_finite_problem(data, key)
            if problem is not None:
                raise DataError(fname, f"slice {slice_ind}: {problem}")
        attrs.update(metadata)
        sample = (kspace, mask, target, attrs, fname.name, slice_ind)
        return sample if self.transform is None else self.transform(*sample)
