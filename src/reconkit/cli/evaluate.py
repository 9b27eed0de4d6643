"""``reconkit evaluate``: score reconstructions against targets with fastMRI's per-volume NMSE / PSNR / SSIM.

Each target file ``TARGET/<name>.h5`` (or ``.hdf5``) is paired with the file of the same name in ``PREDICTIONS``
(fastMRI's submission layout: a ``reconstruction`` dataset). As in ``fastmri.evaluate``, both volumes are centre-cropped to a square of the target's
width (a target wider than tall is scored whole), then NMSE, PSNR (data range = the target volume's maximum) and SSIM (mean over slices, same data range) are
computed per volume and averaged over volumes. ``--acquisition`` / ``--acceleration`` keep only the targets whose
``acquisition`` / ``acceleration`` attrs match, as fastmri's evaluation script does. ``--bands N`` adds each volume's
NMSE in N rings of the image spectrum (:func:`reconkit.metrics.spectral.band_nmse`, band 0 = DC): where in
frequency the error sits, e.g. blurred edges (high bands) against intensity errors (low bands). ``--csv`` writes the
numbers, ``--plot`` a PNG figure of them (:func:`reconkit.io.metrics_plot.write_metrics_plot`).
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from reconkit.atomic import folder_problem
from reconkit.data import center_crop, list_volume_files, open_volume, target_key
from reconkit.data.volume import check_fits_in_memory, checked_dataset, file_attrs
from reconkit.errors import DataError, ReconkitError, printable
from reconkit.io.metrics_csv import write_metrics_csv, write_metrics_rows
from reconkit.io.metrics_plot import write_metrics_plot
from reconkit.metrics import volume_metrics
from reconkit.metrics.spectral import band_nmse

__all__ = ["VolumeScore", "evaluate_directories", "main", "score_volume", "target_matches"]

EXAMPLE = """example:
  reconkit reconstruct data/val --model checkpoints/varnet_small.onnx --output out --format h5
  reconkit evaluate --target data/val --predictions out/h5 --csv out/metrics.csv
  reconkit evaluate --target data/val --predictions out/h5 --bands 8      # + NMSE per k-space band
  reconkit evaluate --target data/val --predictions out/h5 --csv - > metrics.csv   # the CSV alone on stdout
  reconkit evaluate --target data/val --predictions out/h5 --bands 8 --plot out/metrics.png   # + a figure
"""


@dataclass(frozen=True)
class VolumeScore:
    """fastMRI's metrics for one volume: NMSE (unitless), PSNR (dB), SSIM (unitless); ``band_nmse``: the NMSE per
    k-space band, DC first (empty unless asked for)."""

    name: str
    slices: int
    nmse: float
    psnr: float
    ssim: float
    band_nmse: tuple[float, ...] = ()


def _read_array(path: Path, key: str) -> np.ndarray:
    with open_volume(path) as hf:
        node = checked_dataset(hf, key, path)
        if node is None:
            other = {"reconstruction_rss": ("reconstruction_esc", "singlecoil"),
                     "reconstruction_esc": ("reconstruction_rss", "multicoil")}.get(key)
            hint = f" (it has '{other[0]}': --challenge {other[1]}?)" if other and other[0] in hf else ""
            raise DataError(path, f"missing dataset '{key}'{hint}")
        check_fits_in_memory(path, [(f"'{key}'", node.shape, node.dtype)])
        try:
            data = node[()]
        except OSError as err:
            raise DataError(path, f"cannot read '{key}', file truncated or corrupt ({err})") from None
    if data.ndim != 3 or np.iscomplexobj(data) or not np.issubdtype(data.dtype, np.number):
        raise DataError(path, f"'{key}' has dtype {data.dtype} shape {data.shape}, expected real (slices, h, w)")
    if not np.isfinite(data).all():
        raise DataError(path, f"'{key}' holds NaN or infinite values")
    return data


MAX_BANDS = 256
"""``--bands`` limit: a 320 × 320 crop has 160 one-pixel rings from DC to the edge of its spectrum, so many more would be empty
(NaN) columns, and a typo such as ``--bands 80000000`` would allocate gigabytes per volume."""


def score_volume(target_path: Path, prediction_path: Path, challenge: str = "multicoil", bands: int = 0) -> VolumeScore:
    """Score one prediction file against one target file (``bands > 0``: also the NMSE in that many k-space bands).

    Raises:
        DataError: a file is missing, unreadable, lacks its dataset, the shapes cannot be compared, or the cropped
            target's maximum (the data range of PSNR and SSIM) is not positive.
    """
    if not prediction_path.exists():
        raise DataError(prediction_path, f"no prediction for target {target_path.name}")
    target = _read_array(target_path, target_key(challenge)).astype(np.float64)
    prediction = _read_array(prediction_path, "reconstruction").astype(np.float64)
    # fastmri's evaluation crops to a square of the target's width; a target wider than tall (h < w) cannot be
    # cropped that way (fastmri raises), so it is scored whole: (min(h, w), w) equals fastmri's crop for h >= w
    crop = (min(target.shape[-2], target.shape[-1]), target.shape[-1])
    if prediction.shape[0] != target.shape[0]:
        raise DataError(
            prediction_path, f"{prediction.shape[0]} slices, target {target_path.name} has {target.shape[0]}"
        )
    try:
        target, prediction = center_crop(target, crop), center_crop(prediction, crop)
    except ValueError as err:
        raise DataError(
            prediction_path, f"shape {prediction.shape} does not fit target {target_path.name}: {err}"
        ) from None
    peak = float(target.max())
    if peak <= 0:  # fastmri gives NMSE inf / NaN and PSNR -inf / NaN here, which turn the mean over volumes NaN
        problem = f"'{target_key(challenge)}' is at most {peak:g} in the scored {crop} crop (a blank target?)"
        raise DataError(target_path, f"{problem}: PSNR and SSIM need a positive maximum as their data range")
    values = volume_metrics(target, prediction)
    per_band = tuple(band_nmse(torch.from_numpy(prediction), torch.from_numpy(target), bands).tolist()) if bands else ()
    return VolumeScore(target_path.name, target.shape[0], values["NMSE"], values["PSNR"], values["SSIM"], per_band)


def target_matches(target_path: Path, acquisition: str | None, acceleration: int | None) -> bool:
    """True when the target file's ``acquisition`` / ``acceleration`` attrs equal the requested ones (a filter
    left as None always matches; a file without the attr does not match a set filter).

    Raises:
        DataError: the target file cannot be opened.
    """
    if acquisition is None and acceleration is None:
        return True
    with open_volume(target_path) as hf:
        attrs = file_attrs(hf)
    stored = attrs.get("acquisition", "")
    if isinstance(stored, bytes):  # fixed-length HDF5 strings come back as bytes
        stored = stored.decode("utf-8", "replace")
    if acquisition is not None and str(stored) != acquisition:
        return False
    if acceleration is not None:
        try:
            return int(attrs["acceleration"]) == acceleration
        except (KeyError, TypeError, ValueError):
            return False
    return True


def evaluate_directories(
    target_dir: Path,
    predictions_dir: Path,
    challenge: str = "multicoil",
    acquisition: str | None = None,
    acceleration: int | None = None,
    bands: int = 0,
) -> tuple[list[VolumeScore], list[str]]:
    """Score every ``*.h5`` / ``*.hdf5`` in ``target_dir`` that passes the attr filters (see :func:`target_matches`);
    returns ``(scores, error lines)`` (one line per failed volume)."""
    listed = []
    for folder, role in ((target_dir, "target"), (predictions_dir, "predictions")):
        if not folder.is_dir():
            found = "is not a directory (a folder of .h5 / .hdf5 files)" if folder.exists() else "not found"
            raise ReconkitError(f"{folder}: {role} directory {found}")
        listed.append(list_volume_files(folder))  # a folder that cannot be listed fails here, before scoring
    scores, errors = [], []
    for target_path in listed[0]:
        try:
            if target_matches(target_path, acquisition, acceleration):
                scores.append(score_volume(target_path, predictions_dir / target_path.name, challenge, bands))
        except ReconkitError as err:
            errors.append(str(err))
        except Exception as err:  # noqa: BLE001 - any failure of one volume is that volume's error; the others go on
            errors.append(f"{target_path}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    return scores, errors


def mean_score(scores: Sequence[VolumeScore]) -> VolumeScore | None:
    """Mean over volumes (fastMRI's reported numbers), or None for no volumes. A band NMSE is the mean over the
    volumes that have the band (a small matrix has no frequency in a narrow ring: NaN there, see
    :func:`reconkit.metrics.spectral.band_nmse`), NaN only when no volume has it."""
    if not scores:
        return None
    return VolumeScore(
        name="mean",
        slices=sum(s.slices for s in scores),
        nmse=float(np.mean([s.nmse for s in scores])),
        psnr=float(np.mean([s.psnr for s in scores])),
        ssim=float(np.mean([s.ssim for s in scores])),
        band_nmse=_mean_over_defined([s.band_nmse for s in scores]) if scores[0].band_nmse else (),
    )


def _mean_over_defined(rows: Sequence[Sequence[float]]) -> tuple[float, ...]:
    """Column means of ``rows`` (volumes × bands) leaving NaN entries out; NaN where a column has no number."""
    values = np.asarray(rows, dtype=np.float64)
    defined = ~np.isnan(values)
    count = defined.sum(axis=0)
    means = np.where(defined, values, 0.0).sum(axis=0) / np.maximum(count, 1)
    return tuple(np.where(count > 0, means, np.nan).tolist())


STDOUT = "-"
"""``--csv -``: the CSV goes to stdout (and the table is left out, so that stdout is the CSV alone)."""


def _row(score: VolumeScore) -> tuple:
    """``(name, slices, nmse, psnr, ssim, *band_nmse)``: a row of :func:`reconkit.io.write_metrics_csv` and
    :func:`reconkit.io.metrics_plot.write_metrics_plot`."""
    return (score.name, score.slices, score.nmse, score.psnr, score.ssim, *score.band_nmse)


def _csv_rows(scores: Sequence[VolumeScore]) -> list[tuple]:
    """One row per volume plus a ``mean`` row: name, slices, nmse, psnr_db, ssim (and nmse_band0 … when the scores
    have band values)."""
    rows = list(scores) + ([mean_score(scores)] if scores else [])
    return [_row(s) for s in rows]


def write_csv(path: Path, scores: Sequence[VolumeScore], bands: int = 0) -> None:
    """Atomically write the CSV of ``scores`` (see :func:`_csv_rows`) to ``path``, with ``bands`` band columns (those
    of ``--bands``: in the header even when no volume was scored)."""
    write_metrics_csv(path, _csv_rows(scores), bands)


def print_csv(scores: Sequence[VolumeScore], bands: int = 0) -> None:
    """The bytes :func:`write_csv` would write (UTF-8 whatever the locale, CRLF rows), on stdout; on a stdout
    without bytes underneath (a notebook's), the same text."""
    if not hasattr(sys.stdout, "buffer"):
        write_metrics_rows(sys.stdout, _csv_rows(scores), bands)
        return
    sys.stdout.flush()
    stream = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", errors="surrogateescape", newline="")
    write_metrics_rows(stream, _csv_rows(scores), bands)
    stream.flush()
    stream.detach()  # leaves sys.stdout's buffer open


def write_plot(path: Path, scores: Sequence[VolumeScore], target_dir: Path, predictions_dir: Path, failed: int = 0) -> None:
    """Atomically write the PNG figure of ``scores`` (PSNR and SSIM per volume, and the NMSE per band when the scores
    have band values), titled with the folders, the counts (``failed``: volumes that could not be scored) and the
    means."""
    mean = mean_score(scores)
    counts = f"{len(scores)} volume(s), {sum(s.slices for s in scores)} slices scored"
    counts += f"; {failed} failed, not drawn" if failed else ""
    if mean is not None:
        psnr = f"{mean.psnr:.2f} dB" if math.isfinite(mean.psnr) else str(mean.psnr)
        counts += f"; mean PSNR {psnr}, SSIM {mean.ssim:.4f}, NMSE {mean.nmse:#.4g}"
    title = f"predictions {predictions_dir}\nagainst target {target_dir}\n{counts}"
    write_metrics_plot(path, [_row(s) for s in scores], None if mean is None else _row(mean), title)


def print_table(scores: Sequence[VolumeScore]) -> None:
    """Rich table of per-volume scores and the mean."""
    from rich.table import Table
    from rich.text import Text

    from reconkit.cli.tables import table_console

    console = table_console()
    table = Table(title="fastMRI metrics per volume")
    for column in ("volume", "slices", "NMSE", "PSNR (dB)", "SSIM"):
        table.add_column(column, justify="left" if column == "volume" else "right",
                         overflow="fold" if column == "volume" else "ellipsis")  # fmt: skip
    mean = mean_score(scores)
    rows = list(scores) + ([mean] if mean else [])
    for s in rows:
        psnr_text = f"{s.psnr:.2f}" if math.isfinite(s.psnr) else str(s.psnr)
        # a Text, not a str: Rich would read "[t2]" or "[bold]" in a file name as markup and drop it
        table.add_row(Text(printable(s.name)), str(s.slices), f"{s.nmse:#.4g}", psnr_text, f"{s.ssim:.4f}", end_section=s is scores[-1])
    console.print(table)
    bands = len(scores[0].band_nmse) if scores else 0
    if bands:
        table = Table(title=f"NMSE per k-space band: b0 = DC … b{bands - 1} = edge of the spectrum")
        for column in ("volume", *(f"b{b}" for b in range(bands))):
            table.add_column(column, justify="left" if column == "volume" else "right",
                             overflow="fold" if column == "volume" else "ellipsis")  # fmt: skip
        for s in rows:
            table.add_row(Text(printable(s.name)), *(f"{v:#.3g}" for v in s.band_nmse), end_section=s is scores[-1])
        console.print(table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reconkit evaluate",
        description=__doc__ and __doc__.split("\n\n")[0].split(": ", 1)[1]  # None under python -OO
        + " Targets are fastMRI files (reconstruction_rss / _esc); predictions are fastMRI submission files.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--target", type=Path, required=True, help="directory of target .h5 / .hdf5 files (ground truth)")
    parser.add_argument(
        "--predictions", type=Path, required=True, help="directory of prediction files named like the targets"
    )
    parser.add_argument(
        "--challenge",
        choices=("multicoil", "singlecoil"),
        default="multicoil",
        help="multicoil scores against reconstruction_rss, singlecoil against reconstruction_esc (default multicoil)",
    )
    parser.add_argument(
        "--acquisition",
        default=None,
        metavar="NAME",
        help="only targets whose 'acquisition' attr is NAME (e.g. CORPD_FBK, CORPDFS_FBK, AXT1, AXT1PRE, AXT1POST, "
        "AXT2, AXFLAIR), as fastmri's evaluation script",
    )
    parser.add_argument(
        "--acceleration", type=int, default=None, help="only targets whose 'acceleration' attr equals this"
    )
    parser.add_argument(
        "--bands", type=int, default=0, metavar="N",
        help="also report each volume's NMSE in N concentric k-space bands of the cropped image's spectrum, from DC "
        "(b0) to the edge and corners (b<N-1>): low bands = contrast / intensity, high bands = edges and fine "
        f"detail (default 0: off; at most {MAX_BANDS})",
    )
    parser.add_argument(
        "--csv", default=None, metavar="FILE",
        help=f"also write per-volume and mean rows to this CSV file, replaced by every run that gets to scoring (with "
        f"no rows where nothing was scored: never an earlier run's rows); '{STDOUT}': write the CSV to stdout instead "
        f"of the table (errors and notes stay on stderr; ./{STDOUT} is a file named {STDOUT})",
    )
    parser.add_argument(
        "--plot", type=Path, default=None, metavar="FILE.png",
        help="also draw the scores in this PNG: PSNR and SSIM per volume (the lowest named), and with --bands the "
        "NMSE per band (log scale), a line per volume and the mean",
    )
    return parser


def _output_problem(option: str, path: Path | None, kind: str, suffix: str | None = None) -> str | None:
    """Why ``option``'s ``kind`` file ``path`` can never be written (a folder, a suffix other than ``suffix``, a
    parent that is a file or not writable: :func:`reconkit.atomic.folder_problem`), said before any volume is
    scored."""
    if path is None:
        return None
    if path.is_dir():
        return f"{option} {path}: is a directory; give the {kind} file to write"
    if suffix is not None and path.suffix.lower() != suffix:
        return f"{option} {path}: writes a {kind} file; give a name ending in {suffix}"
    problem = folder_problem(path.parent)
    return f"{option} {path}: {problem}" if problem else None


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``reconkit evaluate``; exit code 1 when any volume could not be scored or the CSV or the figure not
    written, 2 on bad arguments."""
    args = build_parser().parse_args(argv)
    csv_stdout = args.csv == STDOUT
    csv_path = None if args.csv is None or csv_stdout else Path(args.csv)
    try:
        if not 0 <= args.bands <= MAX_BANDS:
            raise ReconkitError(f"--bands must be from 0 (off) to {MAX_BANDS}, got {args.bands}")
        problem = _output_problem("--csv", csv_path, "CSV") or _output_problem("--plot", args.plot, "PNG", ".png")
        if problem:  # before any volume is scored
            raise ReconkitError(problem)
        if csv_path is not None and args.plot is not None and csv_path.resolve() == args.plot.resolve():
            raise ReconkitError(f"--csv and --plot name one file, {args.csv}: the figure would replace the table")
        scores, errors = evaluate_directories(
            args.target, args.predictions, args.challenge, args.acquisition, args.acceleration, args.bands
        )
    except ReconkitError as err:
        print(f"reconkit evaluate: {printable(err)}", file=sys.stderr)
        return 2
    for line in errors:
        print(f"error: {printable(line)}", file=sys.stderr)
    if errors:
        print(f"scored {len(scores)} of {len(scores) + len(errors)} volume(s); {len(errors)} failed", file=sys.stderr)
    orphans = sorted({p.name for p in list_volume_files(args.predictions)} - {p.name for p in list_volume_files(args.target)})
    if orphans:
        shown = ", ".join(orphans[:5]) + (", ..." if len(orphans) > 5 else "")
        print(printable(f"note: {len(orphans)} prediction file(s) without a target, not scored: {shown}"), file=sys.stderr)
    if not scores and not errors:
        filters = args.acquisition is not None or args.acceleration is not None
        print(f"reconkit evaluate: {args.target}: no .h5 / .hdf5 target files" + (" match the filters" if filters else ""),
              file=sys.stderr)  # fmt: skip
    if csv_stdout:
        print_csv(scores, args.bands)
    elif scores:
        print_table(scores)
    written = True
    for option, path, write in (("--csv", csv_path, lambda: write_csv(csv_path, scores, args.bands)),
                                ("--plot", args.plot, lambda: write_plot(args.plot, scores, args.target,
                                                                         args.predictions, len(errors)))):  # fmt: skip
        if path is None:  # the CSV: whatever was scored, so that an earlier run's rows are never read as this run's
            continue
        try:
            write()
        except OSError as err:  # what the check before scoring cannot see: a full disk, a folder made meanwhile
            print(f"reconkit evaluate: {option} {path}: cannot write it: {err.strerror or err}", file=sys.stderr)
            written = False
            continue
        print(f"wrote {printable(path)}", file=sys.stderr if csv_stdout else sys.stdout)  # stdout: the CSV alone
    return 1 if errors or not scores or not written else 0
