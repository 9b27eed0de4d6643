"""``reconkit reconstruct``: reconstruct fastMRI (and ISMRMRD) k-space files into HDF5 / NIfTI / DICOM / PNG.

Fully sampled input is undersampled retrospectively with the mask options (one mask per volume, seeded from the
file name as fastMRI does unless ``--seed`` is given); input that is already undersampled (a ``mask`` dataset, or
k-space columns that are all zero inside the acquired window) is used as is; where its sampling lies outside the
model's recorded training masks (an acceleration over 1.25x the highest trained, a fully sampled centre under 80 %
of the narrowest trained, random vs regular lines), a note: line names the file, what was measured and what the
model was trained with. Every file is handled on its own: a bad file prints one line naming it and the problem, the
others are still written, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reconkit.atomic import folder_problem
from reconkit.data import Volume, create_mask_for_mask_type, read_volume
from reconkit.data.ismrmrd_raw import image_groups, is_ismrmrd_raw, read_ismrmrd_raw
from reconkit.data.masks import LINE_MASK_TYPES
from reconkit.data.slice_dataset import list_volume_files
from reconkit.errors import DataError, ReconkitError, printable
from reconkit.inference import (
    DEFAULT_MASK,
    Reconstructor,
    VolumeResult,
    acquired_columns,
    default_backend,
    load_reconstructor,
    recon_crop,
    reconstruct_volume,
    training_mask_mismatch,
    volume_mask,
)
from reconkit.io import (
    acquisition_frame,
    geometry_from_header,
    new_study,
    sequence_attributes,
    write_dicom_series,
    write_fastmri_h5,
    write_nifti,
    write_png_panels,
)

__all__ = ["expand_inputs", "main", "run", "write_outputs"]

FORMATS = ("h5", "nifti", "dicom", "png")
FORMAT_ALIASES = {"hdf5": "h5", "nii": "nifti", "dcm": "dicom"}


def _format_name(name: str) -> str:
    """``--format`` value, case-insensitive, with the common aliases (hdf5, nii, dcm) mapped to :data:`FORMATS`."""
    name = name.lower()
    return FORMAT_ALIASES.get(name, name)


EXAMPLE = """examples:
  reconkit reconstruct scans/file1000.h5 --model checkpoints/varnet_small.onnx --output out
  reconkit reconstruct scans/ --model checkpoints/varnet_small.ckpt --output out --format h5 nifti dicom png \\
      --acceleration 4 --center-fraction 0.08 --batch-size 4
  reconkit reconstruct scans/ --model cg-sense --output out_cg --format h5
  reconkit evaluate --target scans --predictions out/h5

outputs (one per input volume): OUTPUT/h5/<name>.h5 (fastMRI submission layout, 'reconstruction' cropped to the
recon size), OUTPUT/nifti/<stem>.nii.gz, OUTPUT/dicom/<stem>/slice_NNN.dcm, OUTPUT/png/<stem>/slice_NNN.png
(zero-filled | reconstruction | reference | error). Exit code 1 if any file failed (the others are still written).
Each output replaces the one of an earlier run whole (a DICOM / PNG series folder is swapped in, never mixed with
an earlier run's slices); formats not asked for are left as they were, and so are a failed file's earlier outputs,
which a note: line names.
A run killed outright leaves hidden .tmp-<host>.<pid>-* files (.old-* folders); the next run into the same folder
removes them once that process is gone and they are an hour old.
"""


def output_stem(path: Path) -> str:
    """The name of a file's NIfTI / DICOM / PNG outputs: its name without the extension (``sub01.run1.h5`` →
    ``sub01.run1``), so files that differ only after a first dot keep separate outputs."""
    return path.stem


def _output_key(path: Path) -> str:
    """:func:`output_stem` as a case-insensitive, normalisation-insensitive file system (APFS, NTFS) sees it."""
    return unicodedata.normalize("NFC", output_stem(path)).casefold()


def _check_output_is_not_input(path: Path, output: Path, formats: Sequence[str]) -> None:
    """Raise :class:`DataError` when ``path``'s h5 output, ``output/h5/<name>``, is ``path`` itself (e.g. scans kept
    in ``data/h5/`` reconstructed with ``--output data``): writing it would replace the k-space file with its
    reconstruction."""
    destination = output / "h5" / path.name
    if "h5" in formats and destination.exists() and os.path.samefile(destination, path):
        raise DataError(path, f"its h5 output {destination} is the input file itself; choose another --output")


def _on_slice_grid(images: np.ndarray, positions: Sequence[int | None]) -> np.ndarray:
    """One series (a contrast, phase, ...) of ``images`` ``(images, h, w)`` as ``(len(positions), h, w)`` for
    NIfTI's regular grid: slice ``k`` is ``images[positions[k]]``, zeros where ``positions[k]`` is None (a slice
    this series lacks), so its slices sit where the file's other series put them
    (:func:`reconkit.data.ismrmrd_raw.image_groups`). DICOM writes the present slices only, at the same places."""
    series = np.zeros((len(positions), *images.shape[1:]), dtype=images.dtype)
    for k, position in enumerate(positions):
        if position is not None:
            series[k] = images[position]
    return series


_IMAGE_ATTRS = ("image_index", "image_geometry")  # read_ismrmrd_raw's per-image attributes


def _stack_images(groups: Sequence[tuple[str, Sequence[int | None] | None]], count: int) -> list[int | None]:
    """Per slice of the series' common stack (:func:`reconkit.data.ismrmrd_raw.image_groups`), an image of any
    series at that slice (None: no series has one), so every series gets the scan's slice positions; ``count``
    images in one series: the images themselves."""
    if groups[0][1] is None:
        return list(range(count))
    return [next((images[k] for _, images in groups if images[k] is not None), None) for k in range(len(groups[0][1]))]


def _contrast_of(suffix: str) -> int | None:
    """The contrast index a series suffix of :func:`reconkit.data.ismrmrd_raw.image_groups` names
    (``"_contrast1_repetition0"`` → 1), or None where the file's series do not differ in contrast."""
    found = re.search(r"_contrast(\d+)", suffix)
    return None if found is None else int(found.group(1))


def write_outputs(volume: Volume, result: VolumeResult, output: Path, formats: Sequence[str], model_name: str) -> None:
    """Write ``result`` in each of ``formats`` under ``output/<format>/`` (each write atomic)."""
    path = volume.info.path
    stem = output_stem(path)
    attrs = {k: volume.info.attrs[k] for k in ("acquisition", "patient_id", *_IMAGE_ATTRS) if k in volume.info.attrs}
    if attrs.get("acquisition") != "ismrmrd_raw":  # only read_ismrmrd_raw's own index describes the images
        for key in _IMAGE_ATTRS:
            attrs.pop(key, None)
    geometry = geometry_from_header(volume.info.header, volume.kspace.shape[-2:])
    groups = image_groups(attrs.get("image_index"))
    frame = acquisition_frame(
        attrs.get("image_geometry"),
        _stack_images(groups, result.reconstruction.shape[0]),
        geometry,
        volume.kspace.shape[-2:],
        result.reconstruction.shape[-2:],
    )
    if "h5" in formats:
        write_fastmri_h5(output / "h5" / path.name, result.reconstruction, attrs)
    reference = result.target
    if reference is not None and reference.shape != result.reconstruction.shape:
        reference = None
    study = new_study()  # the series of one input file share a study and frame of reference
    for number, (suffix, images) in enumerate(groups, start=1):
        if "nifti" in formats:
            grid = result.reconstruction if images is None else _on_slice_grid(result.reconstruction, images)
            write_nifti(output / "nifti" / f"{stem}{suffix}.nii.gz", grid, geometry, frame)
        # DICOM and PNG: the images the series has, numbered by their slice
        present = None if images is None else [(k, i) for k, i in enumerate(images) if i is not None]
        chosen = slice(None) if present is None else [i for _, i in present]
        slice_numbers = None if present is None else [k for k, _ in present]
        if "dicom" in formats:
            write_dicom_series(
                output / "dicom" / f"{stem}{suffix}",
                result.reconstruction[chosen],
                geometry,
                patient_id=attrs.get("patient_id", "anonymous"),
                series_description=f"reconkit {model_name} {path.name}{suffix}",
                study=study,
                series_number=number,
                slice_grid=None if present is None else (slice_numbers, len(images)),
                sequence=sequence_attributes(volume.info.header, _contrast_of(suffix)),
                frame=frame,
                patient_position=volume.info.header.patient_position,
            )
        if "png" in formats:
            write_png_panels(
                output / "png" / f"{stem}{suffix}",
                result.reconstruction[chosen],
                result.zero_filled[chosen],
                None if reference is None else reference[chosen],
                name=f"{path.name}{suffix}",
                pixel_aspect=geometry.row_spacing_mm / geometry.col_spacing_mm,
                slice_numbers=slice_numbers,
            )


# --------------------------------------------------------------------------------------------------- command


@dataclass
class FileReport:
    """One row of the summary table (``fell_back``: an ONNX model ran this file's size in PyTorch; ``sampling``: the
    mask reconstructed with, e.g. ``4.0x, 26 centre``, from :attr:`reconkit.inference.VolumeResult.sampling`)."""

    path: Path
    slices: int = 0
    seconds: float = 0.0
    sampling: str = ""
    status: str = "ok"
    fell_back: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def expand_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[FileReport]]:
    """Files named directly plus the ``*.h5`` / ``*.hdf5`` files of named directories; bad names become reports.

    Outputs are named after the input file, so a second input with the same name (from another directory, or the
    same stem with the other extension: ``a.h5`` and ``a.hdf5`` would share ``a.nii.gz``) is reported instead of
    overwriting the first one's outputs. Names are compared as macOS's and Windows' file systems do, ignoring case
    and Unicode normalisation (``Scan.h5`` and ``scan.h5`` write one file there), on every platform alike.
    """
    files: dict[str, Path] = {}  # by output_key(file)
    failures = []
    for item in inputs:
        path = Path(item)
        try:
            found = list_volume_files(path) if path.is_dir() else [path]
        except ReconkitError as err:
            failures.append(FileReport(path, status=str(err)))
            continue
        if path.is_dir() and not found:
            failures.append(FileReport(path, status=f"{path}: directory holds no .h5 / .hdf5 files"))
        for file in found:
            key = _output_key(file)
            if key in files and files[key].resolve() != file.resolve():
                clash = (f"{file}: same output name ({output_stem(file)}) as {files[key]}; its outputs would "
                         "overwrite that one's")
                failures.append(FileReport(file, status=clash))
            else:
                files.setdefault(key, file)
    return list(files.values()), failures


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reconkit reconstruct",
        description=__doc__  # None under python -OO
        and __doc__.split("\n\n", 1)[0].split(": ", 1)[1] + "\n\n" + __doc__.split("\n\n", 1)[1],
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="fastMRI / ISMRMRD .h5 files or directories of them")
    parser.add_argument(
        "--model",
        required=True,
        help="reconkit checkpoint (.ckpt/.pt), exported .onnx file, or the untuned classical baselines 'zero-filled' "
        "(RSS of the zero-filled coil images) / 'cg-sense' (maps from the centre lines, 10 CG iterations, no "
        "regularisation; where those maps are poor, e.g. sharp-edged objects, it can score below zero-filling)",
    )
    parser.add_argument("--output", type=Path, required=True, help="output directory (created if missing)")
    parser.add_argument(
        "--format",
        nargs="+",
        type=_format_name,
        choices=FORMATS,
        default=["h5"],
        help="one or more output formats: h5 (alias hdf5), nifti (nii), dicom (dcm), png (default: h5)",
    )
    parser.add_argument(
        "--backend", choices=("torch", "onnx"), default=None, help="default: onnx for .onnx files, else torch"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model runs (default cpu)")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="CPU threads for the model: torch's and ONNX Runtime's intra-op threads (default: the libraries' own, "
        "i.e. all cores; set it on a shared machine)",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=4, help="slices per model call (default 4); memory grows with it (lower it for many coils or large matrices)")
    parser.add_argument(
        "--no-torch-fallback",
        dest="torch_fallback",
        action="store_false",
        help="an ONNX model fails on k-space sizes its graph was not exported for, instead of running the file's "
        "own weights in PyTorch for them (the default, noted in the summary)",
    )
    mask = parser.add_argument_group(
        "retrospective undersampling (fully sampled input only; default: the model's training mask, else "
        "equispaced_fraction, 4x, 0.08)"
    )
    mask.add_argument(
        "--mask-type", default=None, help=", ".join(LINE_MASK_TYPES)
    )
    mask.add_argument("--acceleration", type=int, default=None, help="undersampling factor, e.g. 4 or 8")
    mask.add_argument("--center-fraction", type=float, default=None, help="fully sampled centre fraction, e.g. 0.08")
    mask.add_argument(
        "--seed", type=int, default=None, help="mask seed, 0 to 2**32 - 1 (default: from the file name, as fastMRI)"
    )
    return parser


def _mask_options(args: argparse.Namespace, reconstructor: Reconstructor) -> dict:
    """The mask options in force (command line over the model's training mask over the defaults), checked once."""
    options = {**DEFAULT_MASK, **reconstructor.mask_defaults}
    for key in DEFAULT_MASK:
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    try:
        create_mask_for_mask_type(options["mask_type"], [options["center_fraction"]], [options["acceleration"]])
    except ValueError as err:
        raise ReconkitError(f"mask options: {err}") from None
    if options["mask_type"] not in LINE_MASK_TYPES:  # e.g. a model trained with 2D variable-density masks
        raise ReconkitError(f"mask options: mask type {options['mask_type']!r} gives a 2D mask; reconstruct takes "
                            f"Cartesian line masks: give --mask-type {', '.join(LINE_MASK_TYPES)}")  # fmt: skip
    if args.seed is not None and not 0 <= args.seed < 2**32:  # numpy's RandomState seeds; else every file failed
        raise ReconkitError(f"mask options: --seed must lie in [0, 2**32 - 1], got {args.seed}")
    return options


def _print_summary(reports: Sequence[FileReport], model_name: str, backend: str) -> None:
    from rich.table import Table
    from rich.text import Text

    from reconkit.cli.tables import table_console

    table = Table(title=Text(printable(f"reconkit reconstruct — {model_name} ({backend})")))
    for column in ("file", "slices", "sampling", "seconds", "status"):
        numbers = column in ("slices", "sampling", "seconds")
        table.add_column(column, justify="right" if numbers else "left", overflow="ellipsis" if numbers else "fold")
    for report in reports:  # names and messages as plain Text: Rich read "scan[t2].h5" as markup ("scan.h5"), with
        # control characters escaped (reconkit.errors.printable)
        status = Text(report.status) if report.ok else Text.assemble(("error", "red"), f": {printable(report.status)}")
        if report.ok and report.fell_back:
            status.append(" (ran in PyTorch)")
        name = Text(printable(report.path.name or report.path))
        table.add_row(name, str(report.slices), report.sampling, f"{report.seconds:.2f}", status)
    table_console().print(table)


def _say(kind: str, message: object) -> None:
    """One ``<kind>: <message>`` line (``note`` / ``error``) on stderr, its control characters escaped
    (:func:`reconkit.errors.printable`): a file name or a header field cannot drive the terminal."""
    print(printable(f"{kind}: {message}"), file=sys.stderr)


def run(args: argparse.Namespace) -> list[FileReport]:
    """Reconstruct every input; returns one report per file (errors are reports, never raised)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    reconstructor = load_reconstructor(args.model, args.backend, args.device, args.threads,
                                       torch_fallback=args.torch_fallback)
    mask_options = _mask_options(args, reconstructor)
    asked_for_mask = " ".join(f"--{key.replace('_', '-')} {getattr(args, key)}" for key in (*DEFAULT_MASK, "seed")
                              if getattr(args, key) is not None)  # fmt: skip
    files, reports = expand_inputs(args.inputs)
    err_console = Console(stderr=True)
    for report in reports:
        _say("error", report.status)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    # off a terminal (a log file) the bars show nothing, and Rich ended them with an empty line on stderr
    with Progress(*columns, console=err_console, transient=True, disable=not err_console.is_terminal) as progress:
        files_task = progress.add_task("files", total=len(files))
        for path in files:
            report = FileReport(path)
            earlier = _output_inodes(path, args.output, args.format)
            # the description is markup
            slices_task = progress.add_task(f"  {escape(printable(path.name))}", total=None)
            try:
                _check_output_is_not_input(path, args.output, args.format)
                volume = read_ismrmrd_raw(path) if is_ismrmrd_raw(path) else read_volume(path)
                progress.update(slices_task, total=volume.kspace.shape[0])
                for header_note in (acquired_columns(volume)[2], recon_crop(volume)[1]):
                    if header_note:
                        _say("note", f"{path}: {header_note}")
                mask, retrospective = volume_mask(
                    volume,
                    mask_options["mask_type"],
                    mask_options["acceleration"],
                    mask_options["center_fraction"],
                    args.seed,
                )
                if not retrospective and (asked_for_mask or volume.mask is None):
                    # without a stored mask, empty columns inside the header's acquired window are the only sign:
                    # say so even when no mask option was given (a header wider than its data looks the same)
                    how = "its 'mask' dataset" if volume.mask is not None else "k-space columns left empty"
                    what = f"{asked_for_mask} not applied" if asked_for_mask else "no retrospective mask applied"
                    _say("note", f"{path}: already undersampled ({how}); {what}, the file's own sampling is used")
                result = reconstruct_volume(
                    volume,
                    reconstructor,
                    mask,
                    args.batch_size,
                    on_slices=lambda n, task=slices_task: progress.advance(task, n),
                )
                write_outputs(volume, result, args.output, args.format, reconstructor.name)
                report.slices, report.seconds = result.reconstruction.shape[0], result.seconds
                if result.sampling is not None:
                    report.sampling = f"{result.sampling.acceleration:.1f}x, {result.sampling.center_lines} centre"
                report.fell_back = result.note is not None
                if result.note:
                    _say("note", f"{path}: {result.note}")
                if result.empty_slices:
                    empty = ", ".join(map(str, result.empty_slices))
                    _say("note", f"{path}: slice(s) {empty} hold no k-space data; written as zeros")
                mismatch = None if retrospective else training_mask_mismatch(
                    reconstructor.training_mask, result.sampling, volume.kspace.shape[-1])
                if mismatch:
                    _say("note", f"{path}: {mismatch}")
            except ReconkitError as err:
                report.status = str(err)
            except Exception as err:  # noqa: BLE001 - any failure of one file is that file's error; the batch goes on
                report.status = f"{path}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM (reconkit.cli.main): say what is complete
                _say("note", _interrupted(files, path, reports, args.output))
                raise
            if not report.ok:
                _say("error", report.status)
                left = [output for output, inode in earlier.items() if _inode(output) == inode]
                if left:  # `reconkit evaluate` would score an earlier h5 output as this run's
                    _say("note", f"{path}: not replaced, from an earlier run: {', '.join(map(str, left))}")
            reports.append(report)
            progress.remove_task(slices_task)
            progress.advance(files_task)
    return reports


def _output_inodes(path: Path, output: Path, formats: Sequence[str]) -> dict[Path, tuple[int, int]]:
    """The outputs of ``formats`` under ``output`` that exist for ``path`` (the single-series names: ``h5/<name>``,
    ``nifti/<stem>.nii.gz``, ``dicom/<stem>/``, ``png/<stem>/``), with their device and inode numbers: an atomic
    write gives a new inode, so an output still of the same numbers after ``path`` failed is an earlier run's, left
    as it was. The input itself (an ``--output`` around it) is none."""
    stem = output_stem(path)
    names = {"h5": f"h5/{path.name}", "nifti": f"nifti/{stem}.nii.gz", "dicom": f"dicom/{stem}", "png": f"png/{stem}"}
    inodes = {output / names[name]: _inode(output / names[name]) for name in dict.fromkeys(formats)}
    input_inode = _inode(path)
    return {found: inode for found, inode in inodes.items() if inode is not None and inode != input_inode}


def _inode(path: Path) -> tuple[int, int] | None:
    """``path``'s device and inode numbers, None where it does not exist or cannot be read."""
    try:
        found = path.stat()
        return found.st_dev, found.st_ino
    except OSError:
        return None


def _interrupted(files: Sequence[Path], current: Path, reports: Sequence[FileReport], output: Path) -> str:
    """What a run interrupted while reconstructing ``current`` (one of ``files``, in order) had finished."""
    written = [report.path for report in reports if report.ok]
    last = f" (the last: {written[-1]})" if written else ""
    after = len(files) - 1 - files.index(current)
    return (
        f"interrupted; {len(written)} of {len(files)} file(s) written under {output}/{last}; {current} was being "
        f"reconstructed (its outputs may be missing or from an earlier run in some formats) and {after} file(s) "
        "after it were not started"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``reconkit reconstruct``; exit code 0 if every file was written, 1 if any failed, 2 on a bad model or
    option."""
    args = build_parser().parse_args(argv)
    if args.batch_size < 1 or (args.threads is not None and args.threads < 1):
        print("reconkit reconstruct: --batch-size and --threads must be at least 1", file=sys.stderr)
        return 2
    # checked before any file is reconstructed, rather than failing each one at its write: --output and the folder
    # of each format in it (an `out/h5` that is a file, or read-only)
    problem = next(filter(None, (folder_problem(args.output / name) for name in dict.fromkeys(args.format))), None)
    if problem is not None:
        print(f"reconkit reconstruct: --output {args.output}: {problem}", file=sys.stderr)
        return 2
    try:
        reports = run(args)
    except ReconkitError as err:
        print(f"reconkit reconstruct: {printable(err)}", file=sys.stderr)
        return 2
    _print_summary(reports, args.model, args.backend or default_backend(args.model))
    written = sum(r.ok for r in reports)
    print(f"{written} of {len(reports)} file(s) written under {args.output}/ ({', '.join(args.format)})")
    return 0 if reports and all(r.ok for r in reports) else 1
