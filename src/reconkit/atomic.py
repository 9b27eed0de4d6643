"""Atomic file writes: write a temporary file in the destination directory, then ``os.replace`` it.

An interrupted or failing write leaves neither a half-written destination nor a stray temporary file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_directory", "atomic_path"]


@contextlib.contextmanager
def atomic_path(path: os.PathLike | str) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``, on error deleted.

    The temporary file is ``.tmp-<random>-<name>`` in the same directory (so ``os.replace`` is atomic).

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
    # hidden, and ending in the destination's own name so writers that pick a format by suffix still work
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=f"-{final.name}", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(path: os.PathLike | str) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``path``; on success it replaces ``path``, on error is deleted.

    Used for outputs made of many files (one DICOM per slice). An existing ``path`` is moved aside first and
    removed only after the new directory is in place.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", suffix=f"-{final.name}", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=".old-", suffix=f"-{final.name}", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
