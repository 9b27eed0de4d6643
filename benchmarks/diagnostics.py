"""Training-diagnostics study: spectral bias per k-space band and the training regime of the small VarNet in three
settings side by side (the config as shipped; ``init_scale`` 1.0; learning rate 1e-4).

Each setting is one ``reconkit train fit --config configs/varnet_sim_small.yaml --diagnostics.every_n_steps N``
run. From each run's ``diagnostics.json`` the script prints markdown tables:

* the probe's NMSE per band at the first and the last step, and the first measured step by which each band's error
  had halved;
* the regime measures (weight change, kernel distance, linearisation error, label) over the steps, and the cost of
  a measurement.

It also draws the runs next to each other in ``docs/images/training_diagnostics_runs.png``. The results and how to
read them are in docs/results.md ("Training diagnostics").

    reconkit simulate --output data/sim_small --num-volumes 12 --coils 8 --snr-db 30 --encoded-size 192 112 \\
        --recon-size 96 96 --slices 16 --seed 0
    .venv/bin/python benchmarks/diagnostics.py           # the documented run (~12 min on 2 quiet cores)
    .venv/bin/python benchmarks/diagnostics.py --small   # smoke run on tiny simulated data (~1 min)
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np

from reconkit.cli.train import main as train_main
from reconkit.training.diagnostics import measurements

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    "init_scale 0.1": [],  # the config as shipped
    "init_scale 1.0": ["--model.init_args.init_scale", "1.0"],
    "lr 1e-4": ["--model.init_args.lr", "0.0001"],
}
SMALL = ["--model.init_args.num_cascades", "2", "--model.init_args.chans", "4", "--model.init_args.pools", "2",
         "--model.init_args.sens_chans", "2", "--model.init_args.sens_pools", "1", "--trainer.max_epochs", "1",
         "--trainer.limit_train_batches", "8", "--data.center_fractions", "[0.25]", "--data.accelerations", "[2]"]


def run(name: str, overrides: list[str], data: Path, output: Path, every: int, small: bool) -> Path:
    """One ``reconkit train fit`` with diagnostics; returns its run folder."""
    folder = output / name.replace(" ", "_")
    args = ["fit", "--config", str(ROOT / "configs" / "varnet_sim_small.yaml"), "--data.data_path", str(data),
            "--trainer.default_root_dir", str(folder), "--trainer.enable_progress_bar", "false",
            "--diagnostics.every_n_steps", str(every), *(SMALL if small else []), *overrides]
    if train_main(args) != 0:
        raise SystemExit(f"reconkit train fit failed for {name}")
    return folder


def halved_by(records: list[dict], band: int) -> int | None:
    """The first measured step at which the band's NMSE is at most half its step-0 value."""
    start = records[0]["band_nmse"][band]
    return next((r["step"] for r in records if r["band_nmse"][band] <= start / 2), None)


def last_val_ssim(folder: Path) -> float:
    """The last ``val_ssim`` of the run's newest CSV log (``csv/version_N``: a rerun into ``folder`` adds one; by
    number, as version_10 sorts before version_9 as text)."""
    (metrics,) = sorted(folder.glob("csv/version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))[-1:]
    with open(metrics) as f:
        values = [float(row["val_ssim"]) for row in csv.DictReader(f) if row.get("val_ssim")]
    return values[-1] if values else math.nan


def tables(runs: dict[str, Path]) -> str:
    """The two markdown tables of the study."""
    first = json.loads(next(iter(runs.values())).joinpath("diagnostics", "diagnostics.json").read_text())
    bands = first["num_bands"]
    lines = ["| run (val SSIM at the end) | | " + " | ".join(f"b{b}" for b in range(bands)) + " |",
             "|---|---|" + "---:|" * bands]
    regime = ["| run | step | weight change | kernel distance | linearisation error | method | regime | s |",
              "|---|---:|---:|---:|---:|---|---|---:|"]
    for name, folder in runs.items():
        records = measurements(json.loads((folder / "diagnostics" / "diagnostics.json").read_text())["history"])
        first_row, last_row = records[0]["band_nmse"], records[-1]["band_nmse"]
        lines.append(f"| {name} ({last_val_ssim(folder):.3f}) | step 0 | " + " | ".join(f"{v:.3g}" for v in first_row)
                     + " |")
        lines.append(f"| | step {records[-1]['step']} | " + " | ".join(f"{v:.3g}" for v in last_row) + " |")
        halves = [halved_by(records, b) for b in range(bands)]
        lines.append("| | halved by step | " + " | ".join("never" if h is None else str(h) for h in halves) + " |")
        picks = sorted({records[min(i, len(records) - 1)]["step"] for i in (1, len(records) // 3, len(records) - 1)})
        for r in (r for r in records if r["step"] in picks):
            regime.append(f"| {name} | {r['step']} | {r['weight_change']:.3f} | {r['ntk_distance']:.3f} | "
                          f"{r['linearization_error']:.3g} | {r['linearization_method']} | {r['regime']} | "
                          f"{r['seconds']:.2f} |")
    return "\n".join(lines) + "\n\n" + "\n".join(regime)


def plot(runs: dict[str, Path], path: Path) -> None:
    """Band curves (top) and regime measures (bottom), one column per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(runs), figsize=(5.2 * len(runs), 7.5), sharex="col", sharey="row", squeeze=False)
    for column, (name, folder) in enumerate(runs.items()):
        document = json.loads((folder / "diagnostics" / "diagnostics.json").read_text())
        records = measurements(document["history"])
        steps = [r["step"] for r in records]
        colors = plt.cm.viridis(np.linspace(0, 0.9, document["num_bands"]))
        for band, color in enumerate(colors):
            axes[0, column].plot(steps, [r["band_nmse"][band] for r in records], color=color, marker=".",
                                 label=f"band {band}")
        axes[0, column].set(yscale="log", title=name, ylabel="probe NMSE in band")
        for key, label in (("weight_change", "‖θ−θ₀‖/‖θ₀‖"), ("ntk_distance", "NTK distance"),
                           ("linearization_error", "linearisation error")):
            axes[1, column].plot(steps[1:], [np.nan if r[key] is None else r[key] for r in records[1:]], marker=".",
                                 label=label)  # step 0: all three are 0 or undefined
        axes[1, column].set(yscale="log", xlabel="optimizer step")
    axes[0, 0].legend(fontsize=7, ncol=2, title="0 = DC", title_fontsize=7)
    axes[1, 0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "sim_small", help="fastMRI-layout data folder")
    parser.add_argument("--output", type=Path, default=ROOT / "outputs" / "diagnostics_study", help="run folders")
    parser.add_argument("--every", type=int, default=25, help="optimizer steps between measurements (default 25)")
    parser.add_argument("--plot", type=Path, default=None,
                        help="figure of the runs (default: docs/images/training_diagnostics_runs.png; with --small "
                             "<output>/training_diagnostics_runs.png, so a smoke run leaves the documented figure)")
    parser.add_argument("--small", action="store_true", help="smoke run: tiny simulated data and model, 8 steps")
    args = parser.parse_args()
    data, every = args.data, args.every
    if args.small:
        from reconkit.data.simulate import simulate_dataset

        data, every = args.output / "data", 4
        simulate_dataset(data, num_volumes=6, coils=(3, 4), slices=3, encoded_size=(48, 32), recon_size=(24, 20),
                         split=(0.5, 0.34, 0.16), seed=0, progress=False)
    elif not (data / "train").is_dir():
        raise SystemExit(f"{data}: no train/ folder; make the data first (see this script's --help)")
    runs = {name: run(name, overrides, data, args.output, every, args.small) for name, overrides in RUNS.items()}
    print(tables(runs))
    figure = args.plot or (args.output if args.small else ROOT / "docs" / "images") / "training_diagnostics_runs.png"
    plot(runs, figure)
    print(f"\nwrote {figure}")


if __name__ == "__main__":
    main()
