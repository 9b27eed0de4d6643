"""Data-efficiency study (issue 9): E2E-VarNet trained on 5 %, 20 % and 100 % of a simulated training set,
each supervised, supervised + MRAugment, and self-supervised (SSDU), plus a CG-SENSE row.

All runs share one model size, one optimiser and one fixed budget of optimiser steps (batch 1), so they differ
only in the data they see and the loss. Training subsets are ``FastMriDataModule(fraction=f)`` (nested,
seeded); the test split is held out (other volumes) and scored per volume (SSIM / PSNR with each volume's
``max``, as the training module's test loop). CG-SENSE (``reconkit.models.CGSense``, ACS sensitivities) is run
with a few Tikhonov weights on the same test slices and reported at its best, so the baseline gets its best shot.

Writes ``docs/data_efficiency.json`` (rows ``{"method", "fraction", "ssim", "psnr"}``), the plot
``docs/images/data_efficiency.png`` and the data-efficiency section of ``docs/results.md`` (between its markers).

    .venv/bin/python benchmarks/data_efficiency.py                  # the documented run (~70 min on 2 busy cores)
    .venv/bin/python benchmarks/data_efficiency.py --steps 5 --no-docs --fractions 0.05   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _timing import machine  # benchmarks/_timing.py (the script's folder is on sys.path)

from reconkit.data.augment import AugmentConfig, AugmentedVarNetTransform
from reconkit.data.simulate import simulate_dataset
from reconkit.data.ssdu import SsduVarNetTransform
from reconkit.data.transforms import center_crop
from reconkit.metrics import SSIMLoss
from reconkit.metrics.image import volume_metrics
from reconkit.models import VarNet
from reconkit.models.classical import CGSense, ZeroFilled
from reconkit.training import FastMriDataModule
from reconkit.training.self_supervised import ssdu_loss

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("supervised", "augmented", "self_supervised")
MASK = {"mask_type": "equispaced_fraction", "center_fractions": [0.08], "accelerations": [4]}
MODEL = {"num_cascades": 3, "chans": 8, "pools": 2, "sens_chans": 4, "sens_pools": 2, "init_scale": 0.1}
DATA = {"num_volumes": 26, "coils": (4, 6), "snr_db": (30.0,), "slices": 4, "encoded_size": (160, 96), "recon_size": (80, 80),
            "split": (20, 0, 6), "seed": 9}
CG_L2 = (0.0, 0.01, 0.05)
SECTION_START, SECTION_END = "<!-- data-efficiency:start -->", "<!-- data-efficiency:end -->"


def ensure_data(path: Path) -> None:
    """Simulate the study's data set into ``path`` unless its manifest is there."""
    if not (path / "manifest.json").exists():
        simulate_dataset(path, DATA["num_volumes"], DATA["coils"], snr_db=DATA["snr_db"], slices=DATA["slices"],
                         encoded_size=DATA["encoded_size"], recon_size=DATA["recon_size"], split=DATA["split"],
                         seed=DATA["seed"], progress=False)  # fmt: skip


def train_transform(method: str, steps: int, seed: int) -> Callable | None:
    """The training transform of ``method`` (None: the data module's default random-mask transform)."""
    if method == "augmented":  # MRAugment defaults, exponential ramp over the run's steps
        config = AugmentConfig(schedule="exp", schedule_unit="step", ramp_length=steps)
        return AugmentedVarNetTransform(**MASK, config=config, seed=seed)
    if method == "self_supervised":
        return SsduVarNetTransform(**MASK, rho=0.4, selection="gaussian", num_splits=1, seed=seed)
    return None


def supervised_loss(model: VarNet, batch, ssim_loss: SSIMLoss) -> torch.Tensor:
    """1 − SSIM of the cropped reconstruction against the target (data range = the volume's max)."""
    output = model(batch.masked_kspace, batch.mask, int(batch.num_low_frequencies[0]))
    output = center_crop(output, tuple(batch.target.shape[-2:]))
    return ssim_loss(output.unsqueeze(1), batch.target.unsqueeze(1), data_range=batch.max_value.to(output))


def train(method: str, fraction: float, data: Path, steps: int, lr: float, seed: int) -> tuple[VarNet, float, int]:
    """Train one VarNet for ``steps`` optimiser steps; returns ``(model, seconds, training slices)``."""
    torch.manual_seed(seed)
    model = VarNet(**MODEL)
    transform = train_transform(method, steps, seed)
    module = FastMriDataModule(data, **MASK, batch_size=1, num_workers=0, fraction=fraction, seed=seed,
                               train_transform=transform)
    loader = module.train_dataloader()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    ssim_loss = SSIMLoss()
    step, epoch, start = 0, 0, time.perf_counter()
    model.train()
    while step < steps:
        loader.sampler.set_epoch(epoch)  # what Lightning does: new masks / augmentations / splits per epoch
        if transform is not None:
            transform.set_epoch(epoch)  # also done per sample by the data module's hook; explicit here
        for batch in loader:
            if step == steps:
                break
            if method == "augmented":
                transform.set_step(step + 1)  # the next sample drawn uses the schedule at this step
            loss = ssdu_loss(model, batch) if method == "self_supervised" else supervised_loss(model, batch, ssim_loss)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step % 50 == 0:
                print(f"  {method} {fraction:.0%}: step {step}/{steps}, loss {loss.item():.4f}", flush=True)
        epoch += 1
    return model, time.perf_counter() - start, len(loader.dataset)


def test_batches(data: Path) -> list:
    """The held-out test slices (fixed per-volume masks), loaded once for every model."""
    module = FastMriDataModule(data, **MASK, batch_size=1, num_workers=0)
    return list(module.test_dataloader())


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list) -> dict[str, float]:
    """Mean over test volumes of per-volume SSIM / PSNR (data range = the volume's ``max``)."""
    model.eval()
    slices: dict[str, dict[int, tuple[np.ndarray, np.ndarray, float]]] = defaultdict(dict)
    for batch in batches:
        output = model(batch.masked_kspace, batch.mask, int(batch.num_low_frequencies[0]))
        output = center_crop(output, tuple(batch.target.shape[-2:]))
        slices[batch.fname[0]][int(batch.slice_num[0])] = (batch.target[0].numpy(), output[0].numpy(),
                                                           float(batch.max_value[0]))
    per_volume = []
    for volume in slices.values():
        order = sorted(volume)
        gt = np.stack([volume[i][0] for i in order])
        pred = np.stack([volume[i][1] for i in order])
        per_volume.append(volume_metrics(gt, pred, volume[order[0]][2]))
    return {"ssim": statistics.fmean(v["SSIM"] for v in per_volume),
            "psnr": statistics.fmean(v["PSNR"] for v in per_volume)}  # fmt: skip


def gap_verdict(rows: list[dict], fraction: float) -> str:
    """The augmentation target at ``fraction``: the share of the SSIM gap (supervised at ``fraction`` → supervised at
    100 %) that augmentation closes; "no gap" only where the three runs it compares were made, else which of them
    is missing (e.g. a run without ``--fractions 1.0``)."""
    score = {(r["method"], r["fraction"]): r["ssim"] for r in rows}
    needed = (("supervised", fraction), ("augmented", fraction), ("supervised", 1.0))
    missing = [f"{method} at {f:.0%}" for method, f in needed if (method, f) not in score]
    if missing:
        return f"not measured (no {' / '.join(missing)} run)"
    low, aug, full = (score[key] for key in needed)
    if full <= low:
        return "n/a (no gap: the low-data model is not worse)"
    share = (aug - low) / (full - low)
    return f"{share:.0%} of the gap recovered: {'met' if share >= 0.5 else 'NOT met'}"


def machine_and_load() -> str:
    """The machine as the results section records it (``_timing.machine``), the load average at the end of the run
    and torch (the section said "a 2-core machine shared with other jobs" whatever the machine was)."""
    try:
        load = f", load average {os.getloadavg()[0]:.1f} at the end"
    except OSError:  # no load average (Windows)
        load = ""
    return f"{machine()}{load}, torch {torch.__version__}"


def markdown(rows: list[dict], extra: dict, args: argparse.Namespace) -> str:
    """The results.md section: setup, table, targets."""
    fractions = sorted({r["fraction"] for r in rows if r["method"] != "cg_sense"})
    score = {(r["method"], r["fraction"]): r for r in rows}
    cg = next(r for r in rows if r["method"] == "cg_sense")
    lines = [
        SECTION_START,
        "## Data efficiency: augmentation, SSDU self-supervision, low-data subsets (issue 9)",
        "",
        (f"`benchmarks/data_efficiency.py` (run {extra['date']} at commit `{extra['commit']}`, {extra['platform']}, "
         f"{args.threads} torch thread(s)). Simulated data (`reconkit.data.simulate`, seed "
        f"{DATA['seed']}): {DATA['split'][0]} training and {DATA['split'][2]} held-out test volumes, "
        f"{DATA['slices']} slices each, {'/'.join(map(str, DATA['coils']))} coils, encoded "
        f"{DATA['encoded_size'][0]}×{DATA['encoded_size'][1]}, recon {DATA['recon_size'][0]}×{DATA['recon_size'][1]}, "
        f"SNR {DATA['snr_db'][0]:g} dB; equispaced 4× masks with 8 % centre. E2E-VarNet "
        f"({MODEL['num_cascades']} cascades, chans {MODEL['chans']}, pools {MODEL['pools']}, init_scale "
        f"{MODEL['init_scale']:g}), Adam lr {args.lr:g} "
        f"with cosine decay, **{args.steps} steps of batch 1 for every run**, seed {args.seed}. Supervised: SSIM loss "
        "on fresh random masks each epoch. Augmented: the same plus MRAugment (`AugmentedVarNetTransform`, "
        "default weights, p = 0.55 reached by an exponential ramp over the steps). Self-supervised: SSDU "
        "(`SsduVarNetTransform` + `ssdu_loss`), fixed mask per volume (as real undersampled scans), Gaussian "
        "selection, ρ = 0.4, K = 1, normalised L1-L2 k-space loss on Λ; it never sees a fully sampled target. "
        f"CG-SENSE: ACS sensitivities, 10 CG iterations, best of λ ∈ {list(CG_L2)} (λ = {extra['cg_l2']:g}). "
        "Test metrics: mean over test volumes of per-volume SSIM / PSNR (data range = the volume's `max`)."),
        "",
        "| method | " + " | ".join(f"{f:.0%} ({extra['slices'][f]} slices) SSIM / PSNR" for f in fractions) + " |",
        "|---|" + "---|" * len(fractions),
    ]
    for method in METHODS:
        cells = []
        for f in fractions:
            r = score.get((method, f))
            cells.append(f"{r['ssim']:.4f} / {r['psnr']:.2f}" if r else "–")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append("| cg_sense (no training) | " + " | ".join(f"{cg['ssim']:.4f} / {cg['psnr']:.2f}"
                                                          for _ in fractions) + " |")
    zf = extra["zero_filled"]
    lines.append("| zero-filled (context, not in the JSON) | " + " | ".join(f"{zf['ssim']:.4f} / {zf['psnr']:.2f}"
                                                                          for _ in fractions) + " |")
    lines += ["", "Training time per run (s, same step budget): " + ", ".join(
        f"{m} {f:.0%}: {extra['seconds'][(m, f)]:.0f}"
        for m in METHODS for f in fractions if (m, f) in extra["seconds"]),
        "", "![SSIM vs training fraction](images/data_efficiency.png)", "", "Targets:"]
    for f in (x for x in fractions if x <= 0.2):
        lines.append(f"- augmentation at {f:.0%} of the volumes recovers ≥ 50 % of the SSIM gap to 100 %: "
                     f"{gap_verdict(rows, f)}")
    for f in fractions:
        r = score.get(("self_supervised", f))
        if r:
            met = r["ssim"] > cg["ssim"]
            lines.append(f"- self-supervised at {f:.0%} beats CG-SENSE (SSIM {r['ssim']:.4f} vs {cg['ssim']:.4f}): "
                         f"{'met' if met else 'NOT met'}")
    lines += ["", extra["caveat"], SECTION_END]
    return "\n".join(lines) + "\n"


def _commit() -> str:
    """The checkout's short commit (``+dirty`` with uncommitted changes), for the table's record; ``unknown`` outside
    a git checkout."""
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def write_results_section(section: str, path: Path) -> None:
    """Replace the data-efficiency section of ``path`` (between its markers), or append it at the end."""
    text = path.read_text() if path.exists() else ""
    if SECTION_START in text and SECTION_END in text:
        head, rest = text.split(SECTION_START, 1)
        tail = rest.split(SECTION_END, 1)[1].lstrip("\n")
        text = head + section + tail
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section
    path.write_text(text)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for method, style in zip(METHODS, ("o-", "s-", "^-")):
        points = sorted((r["fraction"], r["ssim"]) for r in rows if r["method"] == method)
        if points:
            ax.plot([p[0] * 100 for p in points], [p[1] for p in points], style, label=method)
    cg = next(r for r in rows if r["method"] == "cg_sense")
    ax.axhline(cg["ssim"], color="gray", linestyle="--", label="cg_sense")
    ax.set_xscale("log")
    ax.set_xlabel("training volumes used (%)")
    ax.set_ylabel("test SSIM (per-volume mean)")
    ax.set_title("VarNet, equal step budget, simulated 4× data")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "data_efficiency",
                        help="simulated dataset folder, made on first use (default: %(default)s)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.2, 1.0],
                        help="fractions of the training volumes to train on (default: %(default)s)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                        help="training methods to compare (default: all)")
    parser.add_argument("--steps", type=int, default=1000, help="optimiser steps per run (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subsets and weights (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.add_argument("--no-docs", action="store_true", help="print only; do not write docs/")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ensure_data(args.data)
    batches = test_batches(args.data)

    rows, seconds, slices = [], {}, {}
    cg_scores = {l2: evaluate(CGSense(num_iters=10, l2_reg=l2), batches) for l2 in CG_L2}
    best_l2 = max(cg_scores, key=lambda l2: cg_scores[l2]["ssim"])
    zero_filled = evaluate(ZeroFilled(), batches)
    print(f"cg_sense: {cg_scores}")
    for fraction in args.fractions:
        for method in args.methods:
            model, took, count = train(method, fraction, args.data, args.steps, args.lr, args.seed)
            scores = evaluate(model, batches)
            rows.append({"method": method, "fraction": fraction, **scores})
            seconds[(method, fraction)], slices[fraction] = took, count
            print(f"{method:16s} {fraction:5.0%} ({count} slices): SSIM {scores['ssim']:.4f} "
                  f"PSNR {scores['psnr']:.2f}  [{took:.0f} s]", flush=True)
    rows.append({"method": "cg_sense", "fraction": 1.0, **cg_scores[best_l2]})  # needs no training data

    extra = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "platform": machine_and_load(),
        "commit": _commit(),
        "cg_l2": best_l2, "zero_filled": zero_filled, "seconds": seconds, "slices": slices,
        "caveat": (f"Caveat: one seed per run and a small step budget ({args.steps} steps) on a small simulated set, "
                   "a budget for a CPU; the models are not converged and single runs differ by "
                   "several 0.01 SSIM for reasons other than the "
                   "method (compare neighbouring rows, e.g. augmented at 20 % vs 100 %, before reading a "
                   "difference as real)."),
    }  # fmt: skip
    section = markdown(rows, extra, args)
    print(section)
    if not args.no_docs:
        (ROOT / "docs" / "data_efficiency.json").write_text(json.dumps(rows, indent=1) + "\n")
        (ROOT / "docs" / "images").mkdir(parents=True, exist_ok=True)
        plot(rows, ROOT / "docs" / "images" / "data_efficiency.png")
        write_results_section(section, ROOT / "docs" / "results.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
