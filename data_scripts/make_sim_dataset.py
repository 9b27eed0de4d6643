"""Make the project's standard simulated datasets (see docs/data.md), or the example figure in docs/images/.

usage:
    python data_scripts/make_sim_dataset.py --preset small --output data          # data/sim_small/...
    python data_scripts/make_sim_dataset.py --preset all --output data
    python data_scripts/make_sim_dataset.py --example-png docs/images/sim_example.png

Presets (each a call of reconkit.data.simulate.simulate_dataset with a fixed seed, so everyone gets the same
files):

    tiny          12 volumes, 4-8 coils, 4 slices, 128 x 80 -> 64 x 64           (unit tests, smoke runs)
    small         48 volumes, 4-16 coils, 16 slices, 320 x 184 -> 160 x 160     (CPU training)
    small_heldout  8 volumes of the held-out subject (dipy_b0), 320 x 184 -> 160 x 160, all in test/
    full          24 volumes, 8-20 coils, 16 slices, 640 x 368 -> 320 x 320     (fastMRI knee-sized, GPU)
    full_heldout   8 volumes of dipy_b0 at 640 x 368 -> 320 x 320, all in test/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from reconkit.data.simulate import simulate_dataset, simulate_volume

SMALL = {"encoded_size": (320, 184), "recon_size": (160, 160)}
FULL = {"encoded_size": (640, 368), "recon_size": (320, 320)}
PRESETS: dict[str, dict] = {
    "tiny": {"num_volumes": 12, "coils": (4, 8), "snr_db": (20.0, 30.0, 40.0), "slices": 4, "encoded_size": (128, 80),
                 "recon_size": (64, 64), "seed": 100},
    "small": dict(num_volumes=48, coils=(4, 8, 12, 16), snr_db=(20.0, 25.0, 30.0, 40.0), slices=16, seed=200,
                  **SMALL),
    "small_heldout": dict(num_volumes=8, coils=(8, 16), snr_db=(25.0, 35.0), slices=10, source="dipy_b0",
                          split=(0, 0, 1), seed=300, **SMALL),
    "full": dict(num_volumes=24, coils=(8, 12, 15, 16, 20), snr_db=(20.0, 25.0, 30.0, 40.0), slices=16, seed=400,
                 **FULL),
    "full_heldout": dict(num_volumes=8, coils=(15, 16), snr_db=(25.0, 35.0), slices=10, source="dipy_b0",
                         split=(0, 0, 1), seed=500, **FULL),
}  # fmt: skip


def example_png(path: Path) -> None:
    """Figure for docs/data.md: target, four coil images, one sensitivity map and the object phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from reconkit.ops import ifft2c

    rows = [
        ("mni152, T1", simulate_volume(14, coils=8, slices=5, contrast="t1", orientation="axial", snr_db=30, **SMALL)),
        ("mni152, T2", simulate_volume(8, coils=8, slices=5, contrast="t2", orientation="sagittal", snr_db=30,
                                       **SMALL)),
        ("dipy_b0 (held out)", simulate_volume(1, coils=8, slices=5, source="dipy_b0", snr_db=30, **SMALL)),
    ]  # fmt: skip
    fig, axes = plt.subplots(len(rows), 8, figsize=(20, 3.3 * len(rows)))
    for ax_row, (label, vol) in zip(axes, rows):
        s = vol.kspace.shape[0] // 2
        coil_images = ifft2c(torch.from_numpy(vol.kspace[s])).numpy()
        height = vol.kspace.shape[-2]
        rows_shown = slice(height // 4, 3 * height // 4)  # the recon FOV along the 2x oversampled readout
        ax_row[0].imshow(vol.reconstruction_rss[s], cmap="gray")
        ax_row[0].set_title(f"{label}\n{vol.params['acquisition']}: reconstruction_rss")
        for k in range(4):
            coil = 2 * k * vol.kspace.shape[1] // 8
            ax_row[1 + k].imshow(np.abs(coil_images[coil, rows_shown]), cmap="gray")
            ax_row[1 + k].set_title(f"|coil {coil} image|")
        ax_row[5].imshow(np.abs(vol.sens_maps[s, 0, rows_shown]), cmap="viridis")
        ax_row[5].set_title("|sensitivity| coil 0")
        ax_row[6].imshow(np.angle(vol.sens_maps[s, 0, rows_shown]), cmap="twilight")
        ax_row[6].set_title("sensitivity phase coil 0")
        phase = np.where(np.abs(vol.image[s]) > 0.05 * np.abs(vol.image[s]).max(), np.angle(vol.image[s]), np.nan)
        ax_row[7].imshow(phase[rows_shown], cmap="twilight")
        ax_row[7].set_title("object phase")
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("reconkit simulator: 8 coils, SNR 30 dB, 320 x 184 encoded -> 160 x 160 (coil images: recon FOV)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=55)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=[*PRESETS, "all"], help="dataset to make")
    parser.add_argument("--output", type=Path, default=Path("data"), help="parent folder; writes OUTPUT/sim_<preset>")
    parser.add_argument("--example-png", type=Path, help="write the docs example figure here instead")
    args = parser.parse_args(argv)
    if args.example_png:
        example_png(args.example_png)
        return 0
    if not args.preset:
        parser.error("give --preset or --example-png")
    for name in PRESETS if args.preset == "all" else [args.preset]:
        options = dict(PRESETS[name])
        simulate_dataset(args.output / f"sim_{name}", options.pop("num_volumes"), **options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
