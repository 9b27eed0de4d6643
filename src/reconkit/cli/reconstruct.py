"""``reconkit reconstruct``: reconstruct fastMRI (and ISMRMRD) k-space files into HDF5 / NIfTI / DICOM / PNG.

Fully sampled input is undersampled retrospectively with the mask options (one mask per volume, seeded from the
file name as fastMRI does unless ``--seed`` is given); input that is already undersampled (a ``mask`` dataset, or
k-space columns that are all zero inside the acquired window) is used as is. Every file is handled on its own: a bad
file prints one line naming it and the problem, the others are still written, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from reconkit.data import Volume, apply_mask, center_crop, create_mask_for_mask_type, filename_seed, read_volume
from reconkit.data.ismrmrd_raw import is_ismrmrd_raw, read_ismrmrd_raw
from reconkit.data.slice_dataset import list_volume_files
from reconkit.errors import DataError, ReconkitError
from reconkit.io import (
    geometry_from_header,
    write_dicom_series,
    write_fastmri_h5,
    write_nifti,
    write_png_panels,
)
from reconkit.ops import ifft2c, rss_complex

__all__ = [
    "Reconstructor",
    "load_reconstructor",
    "VolumeResult",
    "reconstruct_volume",
    "volume_mask",
    "main",
]

FORMATS = ("h5", "nifti", "dicom", "png")
CLASSICAL = ("zero-filled", "cg-sense")
DEFAULT_MASK = {"mask_type": "equispaced_fraction", "acceleration": 4, "center_fraction": 0.08}

EXAMPLE = """examples:
  reconkit reconstruct scans/file1000.h5 --model checkpoints/varnet_small.onnx --output out
  reconkit reconstruct scans/ --model checkpoints/varnet_small.ckpt --output out --format h5 nifti dicom png \\
      --acceleration 4 --center-fraction 0.08 --batch-size 4
  reconkit reconstruct scans/ --model cg-sense --output out_cg --format h5
  reconkit evaluate --target scans --predictions out/h5

outputs (one per input volume): OUTPUT/h5/<name>.h5 (fastMRI submission layout, 'reconstruction' cropped to the
recon size), OUTPUT/nifti/<stem>.nii.gz, OUTPUT/dicom/<stem>/slice_NNN.dcm, OUTPUT/png/<stem>/slice_NNN.png
(zero-filled | reconstruction | reference | error). Exit code 1 if any file failed (the others are still written).
"""


# --------------------------------------------------------------------------------------------------- models


@dataclass
class Reconstructor:
    """A k-space model behind one call, whatever runs it.

    ``run(masked_kspace (B, C, H, W, 2) float32, mask (B, 1, 1, W, 1) float32) -> (B, H, W) float32`` (numpy),
    the RSS magnitude at the full encoded size.

    Attributes:
        name: what the summary prints (file name or baseline name).
        backend: ``"torch"`` or ``"onnx"``.
        mask_defaults: ``mask_type`` / ``acceleration`` / ``center_fraction`` the model was trained with, if known.
        spatial_sizes: k-space ``(H, W)`` an ONNX graph was specialised for; None when any size works.
    """

    name: str
    backend: str
    run: Callable[[np.ndarray, np.ndarray], np.ndarray]
    mask_defaults: dict = field(default_factory=dict)
    spatial_sizes: Optional[list[tuple[int, int]]] = None

    def check_size(self, path: Path, height: int, width: int) -> None:
        """Raise :class:`DataError` if an ONNX graph cannot take k-space of ``height × width``."""
        if self.spatial_sizes is not None and (height, width) not in self.spatial_sizes:
            sizes = ", ".join(f"{h}x{w}" for h, w in self.spatial_sizes)
            raise DataError(path, f"k-space is {height}x{width} but the ONNX model {self.name} only takes {sizes}")


def _torch_runner(model: torch.nn.Module, device: str) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    model = model.to(device).eval()

    def run(masked_kspace: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            image = model(torch.from_numpy(masked_kspace).to(device), torch.from_numpy(mask).to(device))
        return image.float().cpu().numpy()

    return run


def _mask_defaults(mask_type: Optional[str], accelerations, center_fractions) -> dict:
    """The model's training mask as CLI defaults (first acceleration / centre fraction)."""
    defaults = {}
    if mask_type:
        defaults["mask_type"] = str(mask_type)
    if accelerations:
        defaults["acceleration"] = int(float(list(np.atleast_1d(accelerations))[0]))
    if center_fractions:
        defaults["center_fraction"] = float(list(np.atleast_1d(center_fractions))[0])
    return defaults


def _onnx_reconstructor(path: Path, device: str, threads: Optional[int]) -> Reconstructor:
    import onnxruntime as ort

    from reconkit.export import load_onnx_metadata

    metadata = load_onnx_metadata(path)
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ReconkitError(f"{path}: --device cuda, but this onnxruntime has no CUDAExecutionProvider")
        providers.insert(0, "CUDAExecutionProvider")
    try:
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as err:  # onnxruntime raises its own exception types for unreadable models
        raise ReconkitError(f"{path}: cannot load ONNX model ({str(err).splitlines()[0]})") from None
    declared = metadata.get("reconkit.spatial_sizes", "dynamic")
    sizes = None if declared == "dynamic" else [(int(h), int(w)) for h, w in declared]

    def run(masked_kspace: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return session.run(["image"], {"masked_kspace": masked_kspace, "mask": mask})[0]

    return Reconstructor(
        name=path.name,
        backend="onnx",
        run=run,
        mask_defaults=_mask_defaults(
            metadata.get("reconkit.mask_family"),
            metadata.get("reconkit.acceleration"),
            metadata.get("reconkit.center_fraction"),
        ),
        spatial_sizes=sizes,
    )


def load_reconstructor(
    model: str, backend: Optional[str] = None, device: str = "cpu", threads: Optional[int] = None
) -> Reconstructor:
    """Build the model named by ``model``.

    Args:
        model: ``zero-filled`` / ``cg-sense`` (classical baselines), a ``.onnx`` file (ONNX Runtime) or a reconkit
            checkpoint (``reconkit.models.load_model``).
        backend: ``"torch"`` / ``"onnx"``; None infers it from the file extension.
        device: ``"cpu"`` or ``"cuda"``.
        threads: ONNX Runtime intra-op threads (None: its default); torch models use ``torch.set_num_threads``.

    Raises:
        ReconkitError: unknown name, missing or unreadable model file, unavailable device or backend mismatch.
    """
    from reconkit.models import load_model
    from reconkit.models.classical import CGSense, ZeroFilled

    if device == "cuda" and not torch.cuda.is_available():
        raise ReconkitError("--device cuda, but no CUDA device is available")
    if model in CLASSICAL:
        if backend == "onnx":
            raise ReconkitError(f"{model}: classical baselines run with the torch backend only")
        baseline = ZeroFilled() if model == "zero-filled" else CGSense()
        return Reconstructor(name=model, backend="torch", run=_torch_runner(baseline, device))
    path = Path(model)
    if not path.is_file():
        raise ReconkitError(f"{path}: model file not found (or use 'zero-filled' / 'cg-sense')")
    chosen = backend or ("onnx" if path.suffix == ".onnx" else "torch")
    if chosen == "onnx":
        if path.suffix != ".onnx":
            raise ReconkitError(f"{path}: --backend onnx needs an .onnx file; export it with 'reconkit export'")
        return _onnx_reconstructor(path, device, threads)
    if path.suffix == ".onnx":
        raise ReconkitError(f"{path}: an ONNX file runs with --backend onnx, not torch")
    net, info = load_model(path)
    mask_info = (info or {}).get("mask", {}) if isinstance(info, dict) else {}
    return Reconstructor(
        name=path.name,
        backend="torch",
        run=_torch_runner(net, device),
        mask_defaults=_mask_defaults(
            mask_info.get("mask_type"), mask_info.get("accelerations"), mask_info.get("center_fractions")
        ),
    )


# --------------------------------------------------------------------------------------------------- volumes


@dataclass
class VolumeResult:
    """One reconstructed volume, all images ``(slices, h, w)`` float32 cropped to the header's recon size.

    Attributes:
        reconstruction: the model's output.
        zero_filled: RSS of the inverse FFT of the masked k-space (the input the model saw).
        target: the file's reference image, cropped alike, or None.
        acceleration: acquired columns / sampled columns.
        seconds: wall time of the model calls.
    """

    reconstruction: np.ndarray
    zero_filled: np.ndarray
    target: Optional[np.ndarray]
    acceleration: float
    seconds: float


def _coil_kspace(volume: Volume) -> np.ndarray:
    """k-space as ``(slices, coils, H, W)`` complex (single-coil files get one coil)."""
    return volume.kspace[:, None] if volume.kspace.ndim == 3 else volume.kspace


def volume_mask(
    volume: Volume, mask_type: str, acceleration: int, center_fraction: float, seed: Optional[int]
) -> tuple[np.ndarray, bool]:
    """The ``(1, 1, 1, W, 1)`` float32 column mask for ``volume`` and whether it was made here (retrospective).

    A stored ``mask`` dataset wins; otherwise, if some column inside the acquired window
    ``[padding_left, padding_right)`` holds no data, the file is already undersampled and the non-empty columns
    are the mask; otherwise a mask is drawn from ``mask_type`` with the file-name seed (or ``seed``), zeroed
    outside the acquired window as fastMRI does.
    """
    kspace = _coil_kspace(volume)
    width = kspace.shape[-1]
    left, right = volume.info.header.padding_left, volume.info.header.padding_right
    left, right = max(0, min(left, width)), max(0, min(right, width))
    if right <= left:
        left, right = 0, width
    if volume.mask is not None:
        columns = np.asarray(volume.mask, dtype=np.float32) != 0
        retrospective = False
    else:
        columns = np.abs(kspace).reshape(-1, width).max(axis=0) > 0
        retrospective = bool(columns[left:right].all())
    if not retrospective:
        if not columns.any():
            raise DataError(volume.info.path, "k-space holds no data (every column is zero)")
        return columns.astype(np.float32).reshape(1, 1, 1, width, 1), False
    mask_func = create_mask_for_mask_type(mask_type, [center_fraction], [acceleration])
    probe = torch.zeros(1, 1, 1, width, 2)  # mask functions only look at the shape
    _, mask, _ = apply_mask(
        probe, mask_func, seed=filename_seed(volume.info.path.name) if seed is None else seed, padding=(left, right)
    )
    if mask.shape[-3] != 1:
        raise ReconkitError(f"mask type {mask_type!r} gives a 2D mask; reconstruct takes Cartesian line masks")
    return mask.reshape(1, 1, 1, width, 1).numpy().astype(np.float32), True


def _batches(num_slices: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, num_slices, batch_size):
        yield slice(start, min(start + batch_size, num_slices))


def reconstruct_volume(
    volume: Volume,
    reconstructor: Reconstructor,
    mask: np.ndarray,
    batch_size: int = 4,
    on_slices: Optional[Callable[[int], None]] = None,
) -> VolumeResult:
    """Run ``reconstructor`` over all slices of ``volume`` with column ``mask`` ``(1, 1, 1, W, 1)``.

    ``on_slices(n)`` is called after every batch of ``n`` slices (progress bars).
    """
    kspace = _coil_kspace(volume)
    num_slices, _, height, width = kspace.shape
    reconstructor.check_size(volume.info.path, height, width)
    recon_x, recon_y = volume.info.header.recon_size[:2]
    crop = (min(recon_x, height), min(recon_y, width))
    outputs, zero_filled, seconds = [], [], 0.0
    for batch in _batches(num_slices, max(1, batch_size)):
        stacked = np.stack((kspace[batch].real, kspace[batch].imag), axis=-1).astype(np.float32)
        masked = (stacked * mask + 0.0).astype(np.float32)
        batch_mask = np.repeat(mask, masked.shape[0], axis=0)
        start = time.perf_counter()
        image = reconstructor.run(masked, batch_mask)
        seconds += time.perf_counter() - start
        if image.shape != (masked.shape[0], height, width) or not np.isfinite(image).all():
            raise DataError(
                volume.info.path,
                f"model {reconstructor.name} returned {image.shape} "
                f"{'with NaN/inf ' if not np.isfinite(image).all() else ''}for slices {batch.start}-"
                f"{batch.stop - 1}",
            )
        outputs.append(center_crop(image, crop))
        zero_filled.append(center_crop(rss_complex(ifft2c(torch.from_numpy(masked)), dim=1).numpy(), crop))
        if on_slices is not None:
            on_slices(masked.shape[0])
    target = volume.target
    if target is not None:
        target = center_crop(target, (min(crop[0], target.shape[-2]), min(crop[1], target.shape[-1])))
    acquired = max(1, volume.info.header.padding_right - volume.info.header.padding_left)
    return VolumeResult(
        reconstruction=np.concatenate(outputs).astype(np.float32),
        zero_filled=np.concatenate(zero_filled).astype(np.float32),
        target=None if target is None else np.asarray(target, dtype=np.float32),
        acceleration=min(width, acquired) / max(1.0, float(mask.sum())),
        seconds=seconds,
    )


def write_outputs(volume: Volume, result: VolumeResult, output: Path, formats: Sequence[str], model_name: str) -> None:
    """Write ``result`` in each of ``formats`` under ``output/<format>/`` (each write atomic)."""
    path = volume.info.path
    stem = path.name.split(".")[0]
    attrs = {k: volume.info.attrs[k] for k in ("acquisition", "patient_id") if k in volume.info.attrs}
    geometry = geometry_from_header(volume.info.header)
    if "h5" in formats:
        write_fastmri_h5(output / "h5" / path.name, result.reconstruction, attrs)
    if "nifti" in formats:
        write_nifti(output / "nifti" / f"{stem}.nii.gz", result.reconstruction, geometry)
    if "dicom" in formats:
        write_dicom_series(
            output / "dicom" / stem,
            result.reconstruction,
            geometry,
            patient_id=str(attrs.get("patient_id", "anonymous")),
            series_description=f"reconkit {model_name} {path.name}",
        )
    if "png" in formats:
        reference = result.target
        if reference is not None and reference.shape != result.reconstruction.shape:
            reference = None
        write_png_panels(output / "png" / stem, result.reconstruction, result.zero_filled, reference, name=path.name)


# --------------------------------------------------------------------------------------------------- command


@dataclass
class FileReport:
    """One row of the summary table."""

    path: Path
    slices: int = 0
    seconds: float = 0.0
    status: str = "ok"

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def expand_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[FileReport]]:
    """Files named directly plus the ``*.h5`` / ``*.hdf5`` files of named directories; bad names become reports.

    Outputs are named after the input file, so a second input with the same name (from another directory) is
    reported instead of overwriting the first one's outputs.
    """
    files: dict[str, Path] = {}
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
            if file.name in files and files[file.name].resolve() != file.resolve():
                clash = f"{file}: same file name as {files[file.name]}; its outputs would overwrite that one's"
                failures.append(FileReport(file, status=clash))
            else:
                files.setdefault(file.name, file)
    return list(files.values()), failures


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reconkit reconstruct",
        description=__doc__.split("\n\n", 1)[0].split(": ", 1)[1] + "\n\n" + __doc__.split("\n\n", 1)[1],
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="fastMRI / ISMRMRD .h5 files or directories of them")
    parser.add_argument(
        "--model",
        required=True,
        help="reconkit checkpoint (.ckpt/.pt), exported .onnx file, or 'zero-filled' / 'cg-sense' (baselines)",
    )
    parser.add_argument("--output", type=Path, required=True, help="output directory (created if missing)")
    parser.add_argument(
        "--format", nargs="+", choices=FORMATS, default=["h5"], help="one or more output formats (default: h5)"
    )
    parser.add_argument(
        "--backend", choices=("torch", "onnx"), default=None, help="default: onnx for .onnx files, else torch"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model runs (default cpu)")
    parser.add_argument("--batch-size", type=int, default=4, help="slices per model call (default 4)")
    mask = parser.add_argument_group(
        "retrospective undersampling (fully sampled input only; default: the model's training mask, else "
        "equispaced_fraction, 4x, 0.08)"
    )
    mask.add_argument(
        "--mask-type", default=None, help="random, equispaced, equispaced_fraction, magic, magic_fraction"
    )
    mask.add_argument("--acceleration", type=int, default=None, help="undersampling factor, e.g. 4 or 8")
    mask.add_argument("--center-fraction", type=float, default=None, help="fully sampled centre fraction, e.g. 0.08")
    mask.add_argument("--seed", type=int, default=None, help="mask seed (default: from the file name, as fastMRI)")
    return parser


def _mask_options(args: argparse.Namespace, reconstructor: Reconstructor) -> dict:
    options = {**DEFAULT_MASK, **reconstructor.mask_defaults}
    for key in DEFAULT_MASK:
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    return options


def _print_summary(reports: Sequence[FileReport], model_name: str, backend: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"reconkit reconstruct — {model_name} ({backend})")
    for column in ("file", "slices", "seconds", "status"):
        table.add_column(column, justify="right" if column in ("slices", "seconds") else "left")
    for report in reports:
        status = report.status if report.ok else f"[red]error[/red]: {report.status}"
        table.add_row(report.path.name or str(report.path), str(report.slices), f"{report.seconds:.2f}", status)
    Console(stderr=False).print(table)


def run(args: argparse.Namespace) -> list[FileReport]:
    """Reconstruct every input; returns one report per file (errors are reports, never raised)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    reconstructor = load_reconstructor(args.model, args.backend, args.device)
    mask_options = _mask_options(args, reconstructor)
    files, reports = expand_inputs(args.inputs)
    err_console = Console(stderr=True)
    for report in reports:
        print(f"error: {report.status}", file=sys.stderr)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as progress:
        files_task = progress.add_task("files", total=len(files))
        for path in files:
            report = FileReport(path)
            slices_task = progress.add_task(f"  {path.name}", total=None)
            try:
                volume = read_ismrmrd_raw(path) if is_ismrmrd_raw(path) else read_volume(path)
                progress.update(slices_task, total=volume.kspace.shape[0])
                mask, _ = volume_mask(
                    volume,
                    mask_options["mask_type"],
                    mask_options["acceleration"],
                    mask_options["center_fraction"],
                    args.seed,
                )
                result = reconstruct_volume(
                    volume,
                    reconstructor,
                    mask,
                    args.batch_size,
                    on_slices=lambda n, task=slices_task: progress.advance(task, n),
                )
                write_outputs(volume, result, args.output, args.format, reconstructor.name)
                report.slices, report.seconds = result.reconstruction.shape[0], result.seconds
            except ReconkitError as err:
                report.status = str(err)
            except (OSError, ValueError, RuntimeError) as err:
                report.status = f"{path}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            if not report.ok:
                print(f"error: {report.status}", file=sys.stderr)
            reports.append(report)
            progress.remove_task(slices_task)
            progress.advance(files_task)
    return reports


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``reconkit reconstruct``; exit code 0 if every file was written, 1 if any failed, 2 on a bad model."""
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        print("reconkit reconstruct: --batch-size must be at least 1", file=sys.stderr)
        return 2
    try:
        reports = run(args)
    except ReconkitError as err:
        print(f"reconkit reconstruct: {err}", file=sys.stderr)
        return 2
    _print_summary(reports, args.model, args.backend or ("onnx" if str(args.model).endswith(".onnx") else "torch"))
    written = sum(r.ok for r in reports)
    print(f"{written} of {len(reports)} file(s) written under {args.output}/ ({', '.join(args.format)})")
    return 0 if reports and all(r.ok for r in reports) else 1
