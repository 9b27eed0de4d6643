"""PNG panels for a slice: zero-filled | reconstruction | reference | error map (matplotlib, no GUI, imported when a
panel is drawn)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from reconkit.atomic import atomic_directory, atomic_path
from reconkit.errors import printable

__all__ = ["figure_text", "write_png_panel", "write_png_panels"]

ERROR_GAIN = 5.0
"""The error map shows ``|reconstruction − reference|`` multiplied by this gain on the same grey scale."""

DPI = 100
PANEL_INCHES = (3.0, 30.0)
"""The smallest and largest panel width; in between a panel grows with its image so that every row and column gets
a PNG pixel (the largest keeps a header with an absurd pixel aspect from asking for a gigapixel PNG)."""
MARGIN = 1.15
"""Room for the headings and paddings around a panel's image, as a factor on the image's own size."""


def figure_text(text: str) -> str:
    """``text`` (a file or folder name) as matplotlib can draw it: a name that is not UTF-8 holds lone surrogates
    (PEP 383), which matplotlib refuses, so they become U+FFFD, and control characters are escaped
    (:func:`reconkit.errors.printable`). Draw it with ``parse_math=False``: ``$`` in a name (``scan$1$.h5``) would
    otherwise start mathtext, which fails on most names (``x$$.h5``) and renders the others garbled.

    Example:
        >>> figure_text("scan\\udcff1.h5") == "scan\\ufffd1.h5"
        True
        >>> figure_text("a\\x1b[2J.h5")
        'a\\\\x1b[2J.h5'
    """
    return printable(text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))


def write_png_panel(
    path: os.PathLike | str,
    reconstruction: np.ndarray,
    zero_filled: np.ndarray | None = None,
    reference: np.ndarray | None = None,
    title: str = "",
    labels: dict[str, str] | None = None,
    pixel_aspect: float = 1.0,
) -> Path:
    """Atomically write one ``(rows, cols)`` slice as a PNG panel strip.

    Panels: zero-filled (when given) | reconstruction | reference and ``ERROR_GAIN × |error|`` (when a reference
    is given), all on one grey scale from 0 to the 99.5th percentile of the reference's (else the reconstruction's)
    finite pixels.
    ``labels`` adds a line under a panel's heading, keyed by ``zero-filled`` / ``reconstruction`` / ``reference`` /
    ``error`` (e.g. ``{"reconstruction": "PSNR 34.1 dB"}``). ``pixel_aspect`` is the row spacing over the column
    spacing (height / width of one pixel, e.g. ``ImageGeometry.row_spacing_mm / col_spacing_mm``): a pixel is drawn
    that much taller than wide, so anisotropic pixels do not distort the anatomy. A panel is at least 3 inches
    wide, and wider where its image needs it (:data:`PANEL_INCHES`): the pixels are drawn nearest-neighbour, so
    every row and column gets at least one PNG pixel (a 320 × 320 fastMRI slice in a 3-inch panel would lose one
    row and column in eight, and with them thin structures and aliasing lines).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # here, not with reconkit.io: about a second
    from matplotlib.figure import Figure
    from matplotlib.layout_engine import TightLayoutEngine

    panels: list[tuple[str, np.ndarray]] = []
    if zero_filled is not None:
        panels.append(("zero-filled", zero_filled))
    panels.append(("reconstruction", reconstruction))
    if reference is not None:
        panels.append(("reference", reference))
        # in float64: the difference of unsigned images (8-bit PNGs) would wrap around below zero
        error = np.abs(np.asarray(reconstruction, np.float64) - np.asarray(reference, np.float64))
        panels.append(("error", ERROR_GAIN * error))
    scale_source = np.asarray(reference if reference is not None else reconstruction)
    finite = scale_source[np.isfinite(scale_source)]  # one NaN / inf pixel would make the scale NaN: blank panels
    vmax = (float(np.percentile(finite, 99.5)) if finite.size else 0.0) or 1.0
    height, width = np.asarray(reconstruction).shape
    # PNG pixels per image column: at least one, and at least one per row where rows are drawn thinner than columns
    per_column = max(1.0, 1.0 / pixel_aspect)
    panel = min(max(PANEL_INCHES[0], MARGIN * per_column * width / DPI), PANEL_INCHES[1])
    # no layout engine (whatever matplotlibrc says): savefig then draws the figure once, not a dry run first
    fig = Figure(figsize=(panel * len(panels), panel * pixel_aspect * height / width + 0.6), dpi=DPI, layout="none")
    FigureCanvasAgg(fig)
    for i, (name, image) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.imshow(np.asarray(image), cmap="gray", vmin=0.0, vmax=vmax, interpolation="nearest", aspect=pixel_aspect)
        heading = f"|error| × {ERROR_GAIN:g}" if name == "error" else name
        extra = (labels or {}).get(name, "")
        ax.set_title(f"{heading}\n{extra}" if extra else heading, fontsize=9, parse_math=False)
        ax.axis("off")  # and no tick positions: hidden ticks were still laid out at each layout and draw
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(figure_text(title), fontsize=10, parse_math=False)
    TightLayoutEngine().execute(fig)  # fig.tight_layout()'s layout, without the placeholder engine it leaves behind
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        fig.savefig(handle, format="png")
    return Path(path)


def write_png_panels(
    directory: os.PathLike | str,
    reconstruction: np.ndarray,
    zero_filled: np.ndarray | None = None,
    reference: np.ndarray | None = None,
    name: str = "",
    pixel_aspect: float = 1.0,
    slice_numbers: Sequence[int] | None = None,
) -> list[Path]:
    """One panel PNG per slice of ``(slices, rows, cols)`` volumes, as ``directory/slice_NNN.png`` (atomic);
    ``pixel_aspect`` as in :func:`write_png_panel`. ``slice_numbers``: the slice number of each image, for its
    file name and title (as :func:`reconkit.io.write_dicom_series`'s ``slice_grid`` places a series that lacks
    some slices of its scan); by default ``0, 1, ...``."""
    final = Path(directory)
    numbers = range(reconstruction.shape[0]) if slice_numbers is None else slice_numbers
    if len(numbers) != reconstruction.shape[0]:
        raise ValueError(f"{len(numbers)} slice numbers for {reconstruction.shape[0]} slices")
    names = [f"slice_{k:03d}.png" for k in numbers]
    with atomic_directory(final) as tmp:
        for i, (k, file_name) in enumerate(zip(numbers, names)):
            write_png_panel(
                tmp / file_name,
                reconstruction[i],
                None if zero_filled is None else zero_filled[i],
                None if reference is None else reference[i],
                title=f"{name} slice {k}".strip(),
                pixel_aspect=pixel_aspect,
            )
    return [final / n for n in names]
