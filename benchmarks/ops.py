"""Side-by-side timing of reconkit.ops against fastmri: fft2c, ifft2c, sens_expand, sens_reduce; and of the volume
metrics ``reconkit evaluate`` computes (NMSE, PSNR, SSIM on a 16 × 320 × 320 float64 volume, fastMRI's recon size)
against ``fastmri.evaluate``.

Ours and fastmri's run alternately inside one loop (which one goes first alternates too), so allocator state,
caches and machine load hit both alike. Prints a Markdown table: medians over repeats in milliseconds, the ratio
fastmri / ours (> 1 means ours is faster) and the maximum relative error of ours against fastmri.

    .venv/bin/python benchmarks/ops.py                       # 15 coils x 640 x 368, fp32, CPU
    .venv/bin/python benchmarks/ops.py --coils 4 --height 64 --width 48 --repeats 5   # quick check
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import fastmri
import numpy as np
import torch
from _timing import (  # benchmarks/_timing.py (the script's folder is on sys.path)
    add_problem_options,
    check_device,
    interleaved_medians,
    machine,
)
from fastmri import evaluate as fastmri_evaluate
from fastmri.models.varnet import VarNetBlock

from reconkit.metrics import nmse, psnr, ssim
from reconkit.ops import fft2c, ifft2c, sens_expand, sens_reduce

Op = Callable[[], torch.Tensor]


def compare(ours: Op, theirs: Op, repeats: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Interleaved timing of two implementations of one op; returns medians (ms), ratio and max relative error."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    med = interleaved_medians({"ours": ours, "theirs": theirs}, repeats, warmup, sync)
    ref, out = theirs(), ours()
    rel_err = ((out - ref).abs().max() / ref.abs().max()).item()
    med_ours, med_theirs = med["ours"] * 1e3, med["theirs"] * 1e3
    return {"ours_ms": med_ours, "fastmri_ms": med_theirs, "ratio": med_theirs / med_ours, "max_rel_err": rel_err}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_problem_options(parser, repeats=30, warmup=3)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args(argv)
    check_device(parser, args.device)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, args.coils, args.height, args.width, 2)
    kspace = torch.randn(shape, generator=gen).to(device)
    sens_maps = torch.randn(shape, generator=gen).to(device)
    image = torch.randn((args.batch, 1, args.height, args.width, 2), generator=gen).to(device)
    block = VarNetBlock(torch.nn.Identity())  # fastmri's sens_expand / sens_reduce are methods of this block

    cases = {
        "fft2c": (lambda: fft2c(kspace), lambda: fastmri.fft2c(kspace)),
        "ifft2c": (lambda: ifft2c(kspace), lambda: fastmri.ifft2c(kspace)),
        "sens_expand": (
            lambda: sens_expand(image, sens_maps, backend="torch"),
            lambda: block.sens_expand(image, sens_maps),
        ),
        "sens_reduce": (
            lambda: sens_reduce(kspace, sens_maps, backend="torch"),
            lambda: block.sens_reduce(kspace, sens_maps),
        ),
    }
    print(
        f"shape {tuple(shape)} float32, device {device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {machine()}, "
        f"median of {args.repeats} interleaved repeats"
    )
    print()
    print("| op | reconkit (ms) | fastmri (ms) | speed-up (fastmri / reconkit) | max rel. error |")
    print("|---|---:|---:|---:|---:|")
    with torch.no_grad():
        for name, (ours, theirs) in cases.items():
            row = compare(ours, theirs, args.repeats, args.warmup, device)
            print(
                f"| {name} | {row['ours_ms']:.2f} | {row['fastmri_ms']:.2f} | {row['ratio']:.2f}x "
                f"| {row['max_rel_err']:.1e} |"
            )
    print()
    metric_table(args.repeats, args.warmup)
    return 0


def metric_table(repeats: int, warmup: int) -> None:
    """Volume NMSE / PSNR / SSIM, reconkit.metrics vs fastmri.evaluate, on one (16, 320, 320) float64 volume."""
    rng = np.random.default_rng(0)
    target = np.zeros((16, 320, 320))
    target[:, 40:280, 60:260] = rng.random((16, 240, 200))
    prediction = target + 0.05 * rng.standard_normal(target.shape)
    cases = {"nmse": (nmse, fastmri_evaluate.nmse), "psnr": (psnr, fastmri_evaluate.psnr),
             "ssim": (ssim, fastmri_evaluate.ssim)}
    print("| volume metric, 16 × 320 × 320 float64 | reconkit (ms) | fastmri (ms) | speed-up | rel. difference |")
    print("|---|---:|---:|---:|---:|")
    for name, (ours, theirs) in cases.items():
        med = interleaved_medians({"ours": lambda f=ours: f(target, prediction),
                                   "theirs": lambda f=theirs: f(target, prediction)}, repeats, warmup)
        ref = float(np.asarray(theirs(target, prediction)).ravel()[0])
        difference = abs(ours(target, prediction) - ref) / abs(ref)
        print(f"| {name} | {med['ours'] * 1e3:.1f} | {med['theirs'] * 1e3:.1f} | {med['theirs'] / med['ours']:.2f}x "
              f"| {difference:.1e} |")


if __name__ == "__main__":
    raise SystemExit(main())
