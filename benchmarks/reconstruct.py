"""Reconstruction quality and speed on held-out scans: zero-filled, CG-SENSE, BART ``pics``, VarNet (torch / ORT).

    .venv/bin/python benchmarks/reconstruct.py [--volumes 1] [--repeats 3] [--threads 1] [--size 192 112]

Scans: the simulator's held-out source (``dipy_b0``, real T2-weighted brain slices of a subject the bundled model
never saw), 8 coils, 192 × 112 k-space by default (``--size H W`` for another encoded size, e.g. ``640 368`` as
fastMRI knee k-space; the recon size is ``H/2 × H/2``), 4× equispaced with an 8 % centre, one mask per volume
seeded by the file name. Metrics are fastMRI's per-volume NMSE / PSNR / SSIM against the fully sampled RSS
image, averaged over volumes. Seconds per slice: every method runs with the same thread count (torch, ONNX
Runtime and BART's OpenMP); median over ``--repeats`` passes over all slices (BART too), the methods' passes
interleaved (every repeat runs each method once, as ``benchmarks/_timing.py``), so machine load hits all alike.

BART (``bart`` on PATH, e.g. Debian's package) runs ``ecalib -m1 -c 0`` (ESPIRiT maps, not cropped: the default
0.8 eigenvalue crop cut into the object on these scans and cost BART ~5 dB) then
``pics -S -R W:3:0:λ`` (L1-wavelet) per slice; λ is tuned on a separate tuning scan (best PSNR), and its time
includes the map estimation, as the other methods include theirs. Results are printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _timing import interleaved_medians, machine  # benchmarks/_timing.py (the script's folder is on sys.path)

from reconkit.data import Volume, center_crop, read_volume
from reconkit.data.simulate import simulate_volume, write_volume
from reconkit.inference import load_reconstructor, reconstruct_volume, volume_mask
from reconkit.metrics import volume_metrics

ROOT = Path(__file__).resolve().parents[1]
SCAN = {"source": "dipy_b0", "coils": 8, "slices": 10, "encoded_size": (192, 112), "recon_size": (96, 96), "snr_db": 32.0}
MASK = ("equispaced_fraction", 4, 0.08)
BART_LAMBDAS = (0.001, 0.002, 0.005, 0.01, 0.02)


def write_cfl(stem: Path, array: np.ndarray) -> None:
    """BART's ``.hdr`` / ``.cfl`` pair (column-major complex64)."""
    stem.with_suffix(".hdr").write_text("# Dimensions\n" + " ".join(map(str, array.shape)) + "\n")
    np.asarray(array, np.complex64).ravel(order="F").tofile(stem.with_suffix(".cfl"))


def read_cfl(stem: Path) -> np.ndarray:
    dims = [int(v) for v in stem.with_suffix(".hdr").read_text().splitlines()[1].split()]
    return np.fromfile(stem.with_suffix(".cfl"), np.complex64).reshape(dims, order="F")


def bart_pics(masked_kspace: np.ndarray, lam: float, workdir: Path, threads: int) -> np.ndarray:
    """ESPIRiT + L1-wavelet ``pics`` of one slice: ``(C, H, W)`` complex k-space → ``(H, W)`` magnitude."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    write_cfl(workdir / "ksp", masked_kspace.transpose(1, 2, 0)[:, :, None, :])  # (H, W, 1, C)
    ecalib = ["ecalib", "-m1", "-c", "0", "ksp", "sens"]
    for command in (ecalib, ["pics", "-S", "-R", f"W:3:0:{lam}", "ksp", "sens", "img"]):
        subprocess.run(["bart", *command], check=True, capture_output=True, env=env, cwd=workdir)
    return np.abs(read_cfl(workdir / "img")).reshape(masked_kspace.shape[-2:])


def bart_volume(volume: Volume, mask: np.ndarray, lam: float, threads: int, slices=None) -> tuple[np.ndarray, float]:
    """BART over the slices of ``volume``: ``(slices, h, w)`` cropped like the others, and seconds per slice."""
    kspace = volume.kspace if slices is None else volume.kspace[slices]
    columns = mask.reshape(-1)
    crop = tuple(volume.info.header.recon_size[:2])
    images, start = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for coil_kspace in kspace:
            images.append(center_crop(bart_pics(coil_kspace * columns, lam, Path(tmp), threads), crop))
    return np.stack(images).astype(np.float32), (time.perf_counter() - start) / len(kspace)


def tune_bart(tuning: Volume, threads: int) -> tuple[float, dict[float, float]]:
    """λ with the best PSNR on 3 slices of the tuning scan; returns ``(λ, {λ: PSNR})``."""
    mask, _ = volume_mask(tuning, *MASK, seed=None)
    picked = slice(3, 6)
    scores = {}
    for lam in BART_LAMBDAS:
        image, _ = bart_volume(tuning, mask, lam, threads, picked)
        scores[lam] = volume_metrics(tuning.target[picked], image)["PSNR"]
    return max(scores, key=scores.get), scores


def model_pass(reconstructor, volumes: list[Volume], masks: list[np.ndarray], metrics: list[dict]) -> Callable[[], float]:
    """One pass of a reconkit method over all slices: returns seconds per slice (model calls); the first pass
    appends each volume's metrics to ``metrics``."""

    def run() -> float:
        seconds = slices = 0
        for volume, mask in zip(volumes, masks):
            result = reconstruct_volume(volume, reconstructor, mask, batch_size=1)
            seconds, slices = seconds + result.seconds, slices + len(result.reconstruction)
            if len(metrics) < len(volumes):
                metrics.append(volume_metrics(result.target, result.reconstruction))
        return seconds / slices

    return run


def bart_pass(volumes: list[Volume], masks: list[np.ndarray], lam: float, threads: int,
              metrics: list[dict]) -> Callable[[], float]:
    """One BART pass over all slices, as :func:`model_pass`: seconds per slice; metrics on the first pass."""

    def run() -> float:
        seconds = []
        for volume, mask in zip(volumes, masks):
            image, per_slice = bart_volume(volume, mask, lam, threads)
            if len(metrics) < len(volumes):
                metrics.append(volume_metrics(volume.target, image))
            seconds.append(per_slice)
        return float(np.mean(seconds))

    return run


def table_header(args: argparse.Namespace, scan: dict) -> str:
    """The line above the table: the scans, the thread count, the repeats, and the machine and library versions the
    times belong to (the table alone once left them to be written down by hand)."""
    import onnxruntime

    return (f"held-out dipy_b0, {args.volumes} volume(s) × {scan['slices']} slices, {scan['coils']} coils, "
            f"{scan['encoded_size'][0]}×{scan['encoded_size'][1]} k-space, 4× equispaced, {args.threads} thread(s), "
            f"median of {args.repeats} interleaved passes; {machine()}, "
            f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--volumes", type=int, default=1, help="held-out volumes (10 slices each)")
    parser.add_argument("--repeats", type=int, default=3, help="timing passes over all slices, every method (median)")
    parser.add_argument("--threads", type=int, default=1, help="threads for every method")
    parser.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints",
                        help="folder with varnet_small.ckpt / .onnx (default: %(default)s)")
    parser.add_argument("--no-bart", action="store_true", help="skip BART even if installed")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=SCAN["encoded_size"],
                        help="encoded k-space size (default: %(default)s); recon size H/2 x H/2")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    scan = {**SCAN, "encoded_size": tuple(args.size), "recon_size": (args.size[0] // 2, args.size[0] // 2)}

    with tempfile.TemporaryDirectory() as tmp:
        paths = [
            write_volume(simulate_volume(300 + i, **scan), Path(tmp) / f"held_out_{i}.h5")
            for i in range(args.volumes + 1)
        ]
        tuning, volumes = read_volume(paths[0]), [read_volume(p) for p in paths[1:]]
    masks = [volume_mask(v, *MASK, seed=None)[0] for v in volumes]
    methods = {
        "zero-filled": "zero-filled",
        "CG-SENSE (ACS maps, 10 CG iterations)": "cg-sense",
        "VarNet, torch": str(args.checkpoints / "varnet_small.ckpt"),
        "VarNet, ONNX Runtime": str(args.checkpoints / "varnet_small.onnx"),
    }
    passes: dict[str, Callable[[], float]] = {}
    metrics: dict[str, list[dict]] = {}
    for label, model in methods.items():
        reconstructor = load_reconstructor(model, threads=args.threads, torch_fallback=False)
        passes[label] = model_pass(reconstructor, volumes, masks, metrics.setdefault(label, []))

    bart_note = "BART not installed (`bart` not on PATH): not measured"
    if shutil.which("bart") and not args.no_bart:
        lam, scores = tune_bart(tuning, args.threads)
        label = f"BART pics (ESPIRiT + L1-wavelet, λ={lam:g})"
        passes[label] = bart_pass(volumes, masks, lam, args.threads, metrics.setdefault(label, []))
        bart_note = "BART λ tuned on a separate scan (PSNR): " + ", ".join(
            f"{k:g} → {v:.2f} dB" for k, v in scores.items()
        )
    seconds = interleaved_medians(passes, args.repeats, warmup=0, self_timed=True)
    rows = {label: ({k: float(np.mean([m[k] for m in metrics[label]])) for k in metrics[label][0]}, seconds[label])
            for label in passes}

    print(f"\n{table_header(args, scan)}\n")
    print("| method | NMSE | PSNR (dB) | SSIM | s / slice |")
    print("|---|---:|---:|---:|---:|")
    for label, (m, seconds) in rows.items():
        print(f"| {label} | {m['NMSE']:.4f} | {m['PSNR']:.2f} | {m['SSIM']:.4f} | {seconds:.3f} |")
    print(f"\n{bart_note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
