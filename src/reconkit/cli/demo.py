"""``reconkit demo``: simulate a small scan of a subject the bundled model never saw, reconstruct it three ways.

The scan is simulated from the held-out source (dipy's real b = 0 brain slices, ``reconkit.data.simulate``),
undersampled 4× (equispaced, 8 % centre), and reconstructed with zero-filling, CG-SENSE and the bundled VarNet
through ONNX Runtime. A table gives PSNR / SSIM against the fully sampled reference and the seconds per slice;
PNG panels (zero-filled | VarNet | reference | error) and the fastMRI-layout HDF5 outputs are written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from reconkit.atomic import folder_problem
from reconkit.errors import ReconkitError

__all__ = ["BUNDLED_ONNX", "DemoRow", "bundled_model", "check_paths", "main", "run_demo"]

BUNDLED_ONNX = Path(__file__).resolve().parents[3] / "checkpoints" / "varnet_small.onnx"
"""The bundled model in a source checkout (``checkpoints/`` next to ``src/``). An installed package (a wheel) does
not ship it: :func:`bundled_model` then looks in the working directory's ``checkpoints/``."""

SCAN = {"source": "dipy_b0", "coils": 8, "slices": 4, "encoded_size": (192, 112), "recon_size": (96, 96), "snr_db": 32.0}
"""The demo scan: 4 slices of the held-out subject, 8 coils, 192 × 112 encoded (2× readout oversampling), the
k-space size the bundled model was trained on (the subject's own resolution is 2 mm)."""

MASK = {"mask_type": "equispaced_fraction", "acceleration": 4, "center_fraction": 0.08}

EXAMPLE = """example:
  reconkit demo --output demo_output          # what 'make demo' runs
  reconkit demo --output demo_output --model checkpoints/varnet_small.onnx --seed 3
"""


@dataclass(frozen=True)
class DemoRow:
    """One method's result on the demo scan: PSNR in dB, SSIM, seconds per slice."""

    method: str
    psnr: float
    ssim: float
    seconds_per_slice: float


def check_paths(output: Path, model: Path) -> None:
    """ReconkitError naming the path when ``model`` is missing or ``output`` can never be written (a file on its
    way, a read-only folder): what the demo refuses before any work."""
    if not model.is_file():
        raise ReconkitError(f"{model}: ONNX model not found")
    problem = folder_problem(output)
    if problem:
        raise ReconkitError(f"--output {output}: {problem}")


def run_demo(output: Path, model: Path, seed: int = 0) -> list[DemoRow]:
    """Simulate, reconstruct and write everything under ``output``; returns the table rows."""
    from reconkit.cli.reconstruct import write_outputs
    from reconkit.data import read_volume
    from reconkit.data.simulate.volume import simulate_volume, write_volume
    from reconkit.inference import load_reconstructor, reconstruct_volume, volume_mask
    from reconkit.io import write_png_panels
    from reconkit.metrics import volume_metrics

    check_paths(output, model)
    scan_path = write_volume(simulate_volume(seed, **SCAN), output / "scan" / "demo_scan.h5")
    volume = read_volume(scan_path)
    mask, _ = volume_mask(volume, MASK["mask_type"], MASK["acceleration"], MASK["center_fraction"], seed=None)
    rows, results = [], {}
    for method, name in (("zero-filled", "zero-filled"), ("CG-SENSE", "cg-sense"), ("VarNet (ONNX)", str(model))):
        reconstructor = load_reconstructor(name, backend="onnx" if name == str(model) else None, torch_fallback=False)
        result = reconstruct_volume(volume, reconstructor, mask, batch_size=2)
        results[method] = result
        write_outputs(volume, result, output / method.split(" ")[0].lower(), ["h5"], reconstructor.name)
        metrics = volume_metrics(result.target, result.reconstruction)
        rows.append(DemoRow(method, metrics["PSNR"], metrics["SSIM"], result.seconds / len(result.reconstruction)))
    varnet = results["VarNet (ONNX)"]
    write_png_panels(output / "png", varnet.reconstruction, varnet.zero_filled, varnet.target, name="demo_scan")
    return rows


def bundled_model() -> Path:
    """The bundled ONNX model: the source checkout's, else ``checkpoints/varnet_small.onnx`` under the working
    directory (a checkout installed with ``pip install .``). ReconkitError saying where to get it if neither exists."""
    for path in (BUNDLED_ONNX, Path("checkpoints") / BUNDLED_ONNX.name):
        if path.is_file():
            return path
    raise ReconkitError(
        f"bundled model checkpoints/{BUNDLED_ONNX.name} not found: it is part of reconkit's source repository (not "
        "of the installed package; data_scripts/train_bundled_model.py trains it); run 'reconkit demo' from the "
        "repository's root or pass --model PATH (an ONNX file from 'reconkit export')"
    )


def print_table(rows: Sequence[DemoRow], output: Path) -> None:
    from rich.table import Table

    from reconkit.cli.tables import table_console

    table = Table(title="reconkit demo — held-out subject, 8 coils, 4× equispaced")
    for column in ("method", "PSNR (dB)", "SSIM", "s / slice"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        table.add_row(row.method, f"{row.psnr:.2f}", f"{row.ssim:.4f}", f"{row.seconds_per_slice:.3f}")
    table_console().print(table)
    # plain prints: Rich read "[test]" in a path as markup ("runs/[test]" printed as "runs/") and wrapped the paths
    print(f"PNG panels (zero-filled | VarNet | reference | error): {output / 'png'}/")
    print(f"scan: {output / 'scan' / 'demo_scan.h5'}; reconstructions: {output}/{{zero-filled,cg-sense,varnet}}/h5/")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reconkit demo",
        description=__doc__ and __doc__.split(": ", 1)[1],  # None under python -OO
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--output", type=Path, default=Path("demo_output"), help="output directory (default demo_output)"
    )
    parser.add_argument(
        "--model", type=Path, default=None,
        help=f"ONNX model (default: the bundled checkpoints/{BUNDLED_ONNX.name} of a source checkout)",
    )
    parser.add_argument("--seed", type=int, default=0, help="simulation seed, 0 or more: which slices / coils / noise (default 0)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; exit code 2 with one line if the seed is negative, the model missing or the output folder cannot
    be written (found before any work), 1 if the model or scan fails or a write fails during the run."""
    args = build_parser().parse_args(argv)
    try:
        if args.seed < 0:  # numpy's seeds: a negative one was a ValueError traceback once the simulation began
            raise ReconkitError(f"--seed must be a non-negative integer, got {args.seed}")
        model = args.model or bundled_model()
        check_paths(args.output, model)
    except ReconkitError as err:  # exit 2, as every command refuses what cannot work before any work
        print(f"reconkit demo: {err}", file=sys.stderr)
        return 2
    try:
        rows = run_demo(args.output, model, args.seed)
    except (ReconkitError, OSError) as err:  # OSError: a write that fails during the run (a full disk)
        print(f"reconkit demo: {err}", file=sys.stderr)
        return 1
    print_table(rows, args.output)
    return 0
