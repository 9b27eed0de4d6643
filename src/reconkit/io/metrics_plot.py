"""Per-volume metrics as one PNG figure: what ``reconkit evaluate --plot`` draws (matplotlib's Agg canvas, no GUI).

Panels: PSNR and SSIM per volume (a box over the volumes' points, the lowest volumes numbered and named under the
panel) and, when the rows carry band values, the NMSE per k-space band (log scale), one line per volume and the
mean, in the style of the training diagnostics' ``diagnostics.png``
(:func:`reconkit.training.diagnostics.plot_diagnostics`). matplotlib is imported when a figure is drawn, not with
this module.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from reconkit.atomic import atomic_path
from reconkit.io.png import figure_text

__all__ = ["write_metrics_plot"]

DPI = 90
PANEL_INCHES = (5.0, 5.5)
"""Width and height of one panel: the PNG is ``PANEL_INCHES[0] × DPI`` pixels wide per panel (2, or 3 with bands)
and ``PANEL_INCHES[1] × DPI`` tall, whatever the number of volumes."""
NAMED = 3
"""Volumes named under a PSNR / SSIM panel: the lowest ones (all of them when there are no more)."""
NAMED_LINES = 8
"""Up to this many volumes, each gets its own colour and legend entry in the band panel; with more, all are thin
grey lines and the :data:`HIGHLIGHTED` volumes of highest NMSE are drawn in colour and named."""
HIGHLIGHTED = 5
NAME_CHARS = 40
"""Longer names are shortened in the middle (the end, e.g. ``..._6002462.h5``, tells fastMRI's volumes apart)."""
TITLE_PIXELS_PER_CHAR = 7.5
"""Room a character of the 10-point title takes at :data:`DPI` (DejaVu Sans averages less)."""
NOT_FINITE = ((np.isposinf, "inf (no error: prediction equals target)"), (np.isneginf, "-inf"),
              (np.isnan, "NaN (undefined)"))
"""The values a panel does not draw, and how its note names them."""


def write_metrics_plot(
    path: os.PathLike | str, rows: Sequence[Sequence], mean: Sequence | None = None, title: str = ""
) -> Path:
    """Atomically write the figure of ``rows`` of ``(volume, slices, nmse, psnr_db, ssim, *nmse_per_band)`` (the
    rows of :func:`reconkit.io.write_metrics_csv`) as a PNG; ``mean``: the mean row, same layout, which the panel
    titles and the band panel's mean line show (without it, the band mean line is left out); ``title``: the
    figure's heading, a line too long for the figure cut in its middle.

    Non-finite values (PSNR ``inf`` where a prediction equals its target, NaN) are not drawn; a note under the panel
    counts and names them. Band values that the log scale cannot show (0, NaN for a band without frequencies) are
    counted under the band panel. The PNG is ``PANEL_INCHES × DPI`` pixels per panel for any number of volumes.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [figure_text(str(row[0])) for row in rows]
    values = np.asarray([row[2:] for row in rows], dtype=np.float64) if rows else np.empty((0, 3))
    num_bands = values.shape[1] - 3
    panels = 3 if num_bands > 0 else 2
    fig = Figure(figsize=(PANEL_INCHES[0] * panels, PANEL_INCHES[1]), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    for ax, column, metric, unit, digits in ((axes[0], 1, "PSNR", "dB", 2), (axes[1], 2, "SSIM", "", 4)):
        _strip(ax, names, values[:, column], metric, unit, digits, None if mean is None else float(mean[column + 2]))
    if num_bands > 0:
        mean_bands = None if mean is None else np.asarray(mean[5:], dtype=np.float64)
        _bands(axes[2], names, values[:, 0], values[:, 3:], mean_bands)
    if title:
        # a line longer than the figure is wide (a deep folder) is cut in its middle, keeping the folder's own name
        fitted = [_short(line, int(PANEL_INCHES[0] * panels * DPI / TITLE_PIXELS_PER_CHAR)) for line in title.split("\n")]
        fig.suptitle(figure_text("\n".join(fitted)), fontsize=10, parse_math=False)
    fig.tight_layout()
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        fig.savefig(handle, format="png")
    return Path(path)


def _short(name: str, chars: int = NAME_CHARS) -> str:
    """``name`` cut to ``chars`` characters in its middle."""
    if len(name) <= chars:
        return name
    head = (chars - 1) // 2
    return name[:head] + "…" + name[len(name) - (chars - 1 - head) :]


def _number(value: float, unit: str, digits: int) -> str:
    return (f"{value:.{digits}f} {unit}".rstrip() if np.isfinite(value) else f"{value}")


def _strip(ax, names: list[str], values: np.ndarray, metric: str, unit: str, digits: int, mean: float | None) -> None:
    """A box over the volumes' points (spread sideways, in a fixed pattern), the :data:`NAMED` lowest ringed and
    numbered, their names and a note on the values not drawn under the panel."""
    finite = np.isfinite(values)
    count = len(values)
    # golden-ratio offsets: points spread evenly across the box, the same in every run
    offsets = 0.18 * (((np.arange(count) * 0.6180339887) % 1.0) * 2 - 1) if count > 1 else np.zeros(count)
    if finite.any():
        ax.boxplot(values[finite], positions=[0], widths=0.5, showfliers=False, medianprops={"color": "black"})
        ax.scatter(offsets[finite], values[finite], s=14, color="tab:blue", alpha=0.8 if count <= 50 else 0.4,
                   zorder=3)  # fmt: skip
    else:
        ax.text(0.5, 0.5, f"no finite {metric} to draw", transform=ax.transAxes, ha="center", va="center")
    lowest = [int(i) for i in np.argsort(values, kind="stable") if finite[i]][:NAMED]
    lines = ["volumes:" if finite.sum() <= NAMED else f"lowest {metric}:"] if lowest else []
    for rank, i in enumerate(lowest, 1):
        ax.scatter(offsets[i], values[i], s=60, facecolors="none", edgecolors="tab:red", zorder=4)
        ax.annotate(str(rank), (offsets[i], values[i]), xytext=(6, -3), textcoords="offset points", fontsize=8,
                    color="tab:red")  # fmt: skip
        lines.append(f"{rank}  {_short(names[i])}: {_number(values[i], unit, digits)}")
    for test, label in NOT_FINITE:
        hit = test(values)
        if hit.any():
            shown = [_short(names[i], 24) for i in np.flatnonzero(hit)[:3]]
            more = ", …" if hit.sum() > 3 else ""
            lines.append(f"{metric} {label}: {hit.sum()} volume(s), not drawn:\n    {', '.join(shown)}{more}")
    ax.set_xlabel("\n".join(lines), loc="left", fontsize=8, parse_math=False)
    ax.set_xticks([])
    ax.set_xlim(-0.6, 0.6)
    ax.set_ylabel(f"{metric} ({unit})" if unit else metric)
    mean_text = "" if mean is None else f", mean {_number(mean, unit, digits)}"
    ax.set_title(f"{metric} of {count} volume(s){mean_text}", fontsize=10)


def _bands(ax, names: list[str], nmse: np.ndarray, bands: np.ndarray, mean: np.ndarray | None) -> None:
    """NMSE per band on a log scale: a line per volume (coloured and named up to :data:`NAMED_LINES` volumes, else
    grey with the :data:`HIGHLIGHTED` highest-NMSE volumes coloured) and the mean in black."""
    from matplotlib import colormaps

    drawable = np.where(np.isfinite(bands) & (bands > 0), bands, np.nan)
    x = np.arange(bands.shape[1])
    count = len(names)
    if count <= NAMED_LINES:
        named, others = list(range(count)), []
    else:
        order = np.argsort(-np.nan_to_num(nmse, nan=-np.inf), kind="stable")
        named, others = [int(i) for i in order[:HIGHLIGHTED]], [int(i) for i in order[HIGHLIGHTED:]]
    for k, i in enumerate(others):
        ax.plot(x, drawable[i], color="0.6", linewidth=0.6, alpha=0.5,
                label=f"{len(others)} other volumes" if k == 0 else "_nolegend_")  # fmt: skip
    colors = colormaps["viridis"](np.linspace(0, 0.9, max(len(named), 1)))
    for color, i in zip(colors, named):
        ax.plot(x, drawable[i], color=color, marker=".", linewidth=1.0, label=_short(names[i], 32))
    if mean is not None:
        ax.plot(x, np.where(np.isfinite(mean) & (mean > 0), mean, np.nan), color="black", marker="o", linewidth=2.0,
                label=f"mean of {count}")  # fmt: skip
    hidden = int(np.isnan(drawable).sum())
    note = f"\nnot drawn (log scale): {hidden} value(s) 0 (no error)\nor NaN (no frequency in the band)" if hidden else ""
    ax.set_xlabel(f"k-space band (0 = DC, {bands.shape[1] - 1} = edge of the spectrum){note}", fontsize=9)
    ax.set_ylabel("NMSE in band")
    ax.set_title("error per k-space band" + (f": the {len(named)} of highest NMSE named" if others else ""),
                 fontsize=10)  # fmt: skip
    if bands.shape[1] <= 16:
        ax.set_xticks(x)
    if np.isfinite(drawable).any() or (mean is not None and (np.isfinite(mean) & (mean > 0)).any()):
        ax.set_yscale("log")
        for text in ax.legend(fontsize=7, loc="upper left").get_texts():
            text.set_parse_math(False)  # '$' in a volume name
    else:
        ax.text(0.5, 0.5, "no band NMSE above 0 to draw", transform=ax.transAxes, ha="center", va="center")
