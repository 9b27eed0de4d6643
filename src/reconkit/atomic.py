"""Atomic file writes: write a temporary file in the destination directory, then ``os.replace`` it.

An interrupted or failing write leaves neither a half-written destination nor a stray temporary file, and the data
reach the disk (``fsync``) before the rename, so that a power loss or a kernel crash just after it cannot leave a
complete-looking name over a short or empty file (ext4 and XFS may order the rename before the data). The result
gets the permissions a plain ``open(path, "w")`` / ``mkdir`` would give (``0o666`` / ``0o777`` less the process
umask) or, when it replaces an existing file, that file's: the temporary names come from ``tempfile``, which
creates them readable by their owner only, and a reconstruction, an exported model or a DICOM series must stay
readable by the group or the service account (Triton's container user, a PACS uploader) that reads it.

A process killed outright (SIGKILL, the OOM killer, a power loss) cannot delete its temporary file or folder. Their
names say which process made them, ``.tmp-<host>.<pid>-…`` / ``.old-<host>.<pid>-…`` (``<host>``: 8 hex digits of
the host name and PID namespace), so the next write into that folder removes them (:func:`remove_stale_temporaries`)
where that is provably safe: made on this host and PID namespace, by a process that is no longer running, and
untouched for :data:`STALE_AFTER_S`. A concurrent writer's are never removed, nor names of another form.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import itertools
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py

__all__ = ["STALE_AFTER_S", "atomic_directory", "atomic_hdf5", "atomic_path", "folder_problem",
           "remove_stale_temporaries", "temporary_prefix"]

_NAME_MAX = 255
"""The longest file name, in bytes, of Linux file systems (ext4, XFS, Btrfs, tmpfs) and macOS's APFS."""

STALE_AFTER_S = 3600.0
"""Seconds a dead process's temporary file or folder is left untouched before :func:`remove_stale_temporaries`
removes it: a guard for what the PID check cannot see (two machines of one host name sharing a folder)."""

_OWNED = re.compile(r"\.(tmp|old)-([0-9a-f]{8})\.([0-9]+)-")
"""A temporary name this module makes: ``.tmp-`` or ``.old-``, the host tag and the writer's PID."""

_OUTPUT_NAME = "output-name"
"""The file in an ``.old-`` folder that holds the full name of the output it belongs to (``os.fsencode`` bytes): the
folder's own name ends with only the last bytes of a long one (:func:`_suffix`)."""

_swept: set[str] = set()
"""The folders this process has already cleared of dead writers' temporaries (once per folder and process)."""


@contextlib.contextmanager
def atomic_path(path: os.PathLike | str) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``, on error deleted.

    The temporary file is ``.tmp-<host>.<pid>-<random>-<name>`` (the end of a long name) in the same directory
    (so ``os.replace`` is atomic); a dead writer's ones there are removed first (:func:`remove_stale_temporaries`).

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "x.txt"
        >>> with atomic_path(out) as tmp:
        ...     _ = tmp.write_text("done")
        >>> out.read_text()
        'done'
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(final.parent)
    # hidden, and ending in the destination's own name so writers that pick a format by suffix still work
    fd, tmp_name = tempfile.mkstemp(prefix=temporary_prefix(), suffix=_suffix(final), dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _fsync(tmp)
        os.chmod(tmp, _final_mode(final, 0o666))
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(final.parent)


class _KeptErrorFile:
    """An unbuffered file for h5py's ``fileobj`` driver that keeps the first ``OSError`` instead of raising it.

    HDF5 goes on calling the driver after a call failed (the truncate, flush and metadata writes of its close), and
    h5py's driver then calls Python with the first exception still set: on Python 3.13 that came out as a
    ``SystemError`` (``'seekable' ... returned a result with an exception set``) instead of the ``OSError``, and
    without a buffer as an ``AttributeError`` already on 3.11. So once a call fails, writes, truncates and flushes
    do nothing and reads return nothing (HDF5 fails with an error of its own), and :attr:`error` is raised after
    the file is closed. Unbuffered, so that closing it cannot fail again (HDF5 seeks before each write anyway).
    """

    def __init__(self, handle: io.FileIO) -> None:
        self._handle = handle
        self.error: OSError | None = None

    def _kept(self, call: Callable[..., object], *args: object, failed: object = None) -> object:
        if self.error is None:
            try:
                return call(*args)
            except OSError as err:
                self.error = err
        return failed

    def _write_all(self, data: bytes | bytearray) -> int:
        view = memoryview(data)
        while view:  # a raw write may write only part of it
            view = view[self._handle.write(view):]
        return len(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> object:
        return self._kept(self._handle.seek, offset, whence, failed=0)

    def tell(self) -> object:
        return self._kept(self._handle.tell, failed=0)

    def read(self, size: int) -> object:
        return self._kept(self._handle.read, size, failed=b"")

    def write(self, data: bytes | bytearray) -> object:
        return self._kept(self._write_all, data, failed=len(data))

    def truncate(self, size: int) -> object:
        return self._kept(self._handle.truncate, size, failed=size)

    def flush(self) -> None:
        self._kept(self._handle.flush)


@contextlib.contextmanager
def atomic_hdf5(path: os.PathLike | str) -> Iterator[h5py.File]:
    """:func:`atomic_path` for an HDF5 file: yields it as an ``h5py.File`` open for writing.

    HDF5 writes through a Python file object (:class:`_KeptErrorFile`), so a failed write (a full disk) is a plain
    ``OSError`` ("No space left on device"), which names ``path`` (a write through a file object names no file).
    With HDF5's own file driver it left the file half closed and, with HDF5 2.0, the interpreter crashed when it
    exited (a segmentation fault closing that file's datasets).
    """
    try:
        with atomic_path(path) as tmp, open(tmp, "w+b", buffering=0) as handle:
            target = _KeptErrorFile(handle)
            try:
                with h5py.File(target, "w") as file:
                    yield file
            except Exception:
                if target.error is None:
                    raise
            if target.error is not None:
                raise target.error
    except OSError as err:
        if err.filename is not None:
            raise
        raise OSError(err.errno, err.strerror or str(err), os.fspath(path)) from err


@contextlib.contextmanager
def atomic_directory(path: os.PathLike | str) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``path``; on success it replaces ``path``, on error is deleted.

    Used for outputs made of many files (one DICOM per slice). An existing ``path`` is moved aside first and
    removed only after the new directory is in place. Two writers of one ``path`` at once (two runs into one
    output folder) both succeed and the last rename wins, as with :func:`atomic_path`. The temporary folders are
    ``.tmp-<host>.<pid>-…`` and ``.old-<host>.<pid>-…`` beside ``path`` (:func:`remove_stale_temporaries`).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(), suffix=_suffix(final), dir=final.parent))
    old = None
    try:
        yield tmp
        for folder, _, names in os.walk(tmp):
            for name in names:
                _fsync(Path(folder, name))
            _fsync_directory(Path(folder))
        os.chmod(tmp, _final_mode(final, 0o777))
        old = Path(tempfile.mkdtemp(prefix=temporary_prefix("old"), suffix=_suffix(final), dir=final.parent))
        (old / _OUTPUT_NAME).write_bytes(os.fsencode(final.name))
        _fsync(old / _OUTPUT_NAME)  # on the disk before anything is moved in beside it
        _move_in(tmp, final, old)
        _fsync_directory(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _move_in(tmp: Path, final: Path, old: Path) -> None:
    """Rename directory ``tmp`` to ``final``, first moving a ``final`` that is there into folder ``old``.

    Another writer of ``final`` can move it away, or put its own in place, between these two renames: the first
    is then a no-op and the second refused (the destination is a non-empty directory), so the rename is retried
    after moving the newcomer aside. If the rename fails otherwise, the directory moved aside is put back.
    """
    for attempt in itertools.count():
        aside = old / str(attempt)
        try:
            with contextlib.suppress(FileNotFoundError):  # nothing there, or another writer has just moved it aside
                os.replace(final, aside)
            os.replace(tmp, final)
            return
        except BaseException as err:
            if isinstance(err, OSError) and err.errno in (errno.ENOTEMPTY, errno.EEXIST):
                continue  # another writer's directory arrived between the two renames
            with contextlib.suppress(OSError):  # fails harmlessly where nothing was moved aside
                os.replace(aside, final)
            raise


def _fsync(path: Path) -> None:
    """Flush the data of the file ``path`` to the disk (an error, e.g. ``EIO``, fails the write). Windows flushes
    only through a handle open for writing (``FlushFileBuffers``; a read-only one fails with ``EBADF``), POSIX
    through any (a directory opens only read-only)."""
    fd = os.open(path, os.O_RDWR if sys.platform == "win32" else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(path: Path) -> None:
    """Flush ``path``'s entries (a rename into it) to the disk, where the file system can: some refuse to open or
    ``fsync`` a directory (``EINVAL`` on some network file systems, ``EACCES`` in a folder this user cannot list),
    and the file's own data are already on the disk then."""
    with contextlib.suppress(OSError):
        _fsync(path)


def folder_problem(folder: os.PathLike | str) -> str | None:
    """Why nothing can ever be written in ``folder`` (made with its parents where missing), for the commands to say
    before hours of work rather than at the first write: the nearest of it and its parents that exists is a file,
    or a folder this user cannot write in, or a symbolic link to nothing (``out -> /mnt/nas/results`` with the share
    unmounted: ``mkdir`` fails there with "File exists"); None when it can be (a full disk shows only when writing)."""
    existing = next((path for path in (Path(folder), *Path(folder).parents) if path.exists() or path.is_symlink()),
                    None)  # fmt: skip
    if existing is None:
        return None
    if not existing.exists():
        return f"{existing} is a symbolic link to {os.readlink(existing)}, which does not exist"
    if not existing.is_dir():
        return f"{existing} exists and is not a directory"
    return None if os.access(existing, os.W_OK | os.X_OK) else f"{existing} is not writable"


def remove_stale_temporaries(folder: os.PathLike | str, now: float | None = None) -> list[Path]:
    """Remove the temporary files and folders that killed writers left in ``folder``; returns what was removed.

    An entry is removed only when its name is one this module makes (``.tmp-<host>.<pid>-…``, ``.old-<host>.<pid>-…``)
    with this host's tag (host name, machine ID and PID namespace), its PID is not a running process, and it was last modified
    :data:`STALE_AFTER_S` or more before ``now`` (default: the clock). A live writer's entries (this process's, a
    concurrent run's, a PID reused since), another host's and names of another form (earlier versions' temporaries,
    a user's own files) are left alone, and so is an ``.old-`` folder whose output is missing (its writer was
    killed between moving the earlier output aside and moving the new one in: that folder holds the earlier output,
    ``<name>/0``), or whose output cannot be told (an earlier version's, made for a name long enough to be cut).
    Nothing is removed on Windows, where no PID check is available.
    """
    if sys.platform == "win32":
        return []
    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for entry in entries:
        owner = _OWNED.match(entry.name)
        if owner is None or owner.group(2) != _host_tag() or _running(int(owner.group(3))):
            continue
        if owner.group(1) == "old":
            output = _output_of_old(entry, entry.name[owner.end() + 9 :])
            if output is None or not os.path.lexists(os.path.join(folder, output)):
                continue  # killed between its two renames: the earlier output it moved aside is the only one left
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime < STALE_AFTER_S:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:  # gone meanwhile (another run's sweep), or not ours to remove
            continue
        removed.append(Path(entry.path))
    return removed


def _output_of_old(entry: os.DirEntry, suffix: str) -> str | None:
    """The name of the output that the ``.old-`` folder ``entry`` (whose name ends with ``suffix``) belongs to: the
    one recorded in it (:data:`_OUTPUT_NAME`), else ``suffix`` where :func:`_suffix` cannot have cut it (a cut one is
    at least ``_NAME_MAX - 34`` bytes: a character has at most 4); None where it cannot be told."""
    try:
        with open(os.path.join(entry.path, _OUTPUT_NAME), "rb") as record:
            recorded = record.read()
    except OSError:  # an earlier version's folder, or one whose writer was killed before recording the name
        recorded = b""
    if recorded:
        return os.fsdecode(recorded)
    return suffix if len(os.fsencode(suffix)) < _NAME_MAX - 34 else None


def _sweep_once(folder: Path) -> None:
    """:func:`remove_stale_temporaries` of ``folder``, the first time this process writes there."""
    key = os.path.abspath(folder)
    if key not in _swept:
        _swept.add(key)
        remove_stale_temporaries(folder)


def _running(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one of another user counts: it may be a writer)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; a number no PID can be
        return True
    return True


@functools.cache
def _host_tag() -> str:
    """8 hex digits naming this host (its name and, where there is one, its machine ID) and PID namespace, so that a
    PID in a temporary name is checked only where it means the same process: not on another machine sharing the
    folder (two machines of one host name have different machine IDs; their root PID namespaces are the same
    number), nor in another container of one host name."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # macOS, or no /proc
        namespace = 0
    machine = ""
    for source in ("/etc/machine-id", "/var/lib/dbus/machine-id"):  # systemd / D-Bus; absent in many containers
        try:
            machine = Path(source).read_text(encoding="ascii", errors="replace").strip()
            break
        except OSError:
            continue
    return hashlib.sha256(f"{socket.gethostname()}/{machine}/{namespace}".encode()).hexdigest()[:8]


def temporary_prefix(kind: str = "tmp") -> str:
    """A temporary name's start, ``.<kind>-<host>.<pid>-`` (``tempfile`` appends 8 random characters): give it to
    ``tempfile`` for a temporary file or folder beside an output that :func:`remove_stale_temporaries` is to
    remove if this process is killed before it can (``kind`` ``tmp`` or ``old``)."""
    return f".{kind}-{_host_tag()}.{os.getpid()}-"


def _suffix(final: Path) -> str:
    """The temporary names' ending, ``-<final's name>``, cut at its start so that :func:`temporary_prefix` (at most 22
    characters: a Linux PID has at most 7 digits) + 8 random characters + it fit the 255 bytes of a file name (a name
    close to that limit failed with "File name too long"); the end, with the extension writers pick a format by
    (``.nii.gz``), is kept. It is cut between characters: a cut inside a multi-byte UTF-8 one left a lone byte
    (a surrogate in the name), a name that APFS (valid UTF-8 only) refuses."""
    name = final.name
    while len(os.fsencode(name)) > _NAME_MAX - 31:
        name = name[1:]
    return "-" + name


def _final_mode(final: Path, created: int) -> int:
    """The permission bits for ``final``: those of the file it replaces, else ``created`` less the umask."""
    try:
        return stat.S_IMODE(final.stat().st_mode)
    except FileNotFoundError:
        return created & ~_umask()


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (``os.umask`` can only set it, which
    would race with files other threads create meanwhile)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
