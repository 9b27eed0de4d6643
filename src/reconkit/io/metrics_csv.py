"""Per-volume metrics as CSV: the table ``reconkit evaluate --csv`` and ``reconkit train test`` write."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from reconkit.atomic import atomic_path

__all__ = ["write_metrics_csv", "write_metrics_rows"]


def write_metrics_rows(handle: TextIO, rows: Sequence[Sequence], bands: int | None = None) -> None:
    """Write ``rows`` of ``(volume, slices, nmse, psnr_db, ssim, *nmse_per_band)`` to the open text ``handle`` under
    the header ``volume, slices, nmse, psnr_db, ssim[, nmse_band0, ...]`` (numbers to 8 significant digits); every
    row has ``bands`` band values (None: as many as the first row, none without rows), so that a table without
    rows still has the band columns a reader asked for."""
    if bands is None:
        bands = len(rows[0]) - 5 if rows else 0
    writer = csv.writer(handle)
    writer.writerow(["volume", "slices", "nmse", "psnr_db", "ssim"] + [f"nmse_band{b}" for b in range(bands)])
    for name, slices, *values in rows:
        writer.writerow([name, slices, *(f"{v:.8g}" for v in values)])


def write_metrics_csv(path: os.PathLike | str, rows: Sequence[Sequence], bands: int | None = None) -> Path:
    """Atomically write ``rows`` (and ``bands``: see :func:`write_metrics_rows`) to the file ``path``. UTF-8
    whatever the locale, so any file name can be a volume name; a name that is not UTF-8 (PEP 383 surrogates) is
    written as its own bytes."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        write_metrics_rows(handle, rows, bands)
    return Path(path)
