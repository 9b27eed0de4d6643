"""Choose the bundled VarNet's SENSE-step settings on the training sources, never on the held-out subject.

The SENSE data-consistency step after the cascades (:mod:`reconkit.models.sense_refine`) has no weights, only
settings: the map estimator (``final_dc_maps``: ACS or ESPIRiT), ``ρ`` (``final_dc_prior``), the L1-Haar weight
``κ`` (``final_dc_wavelet``, 0 = none) and an iteration count. This script simulates new volumes of the five
*training* sources (other seeds than training: other slices, coils, noise and geometry; no dipy image), at the
three training matrix sizes, with 8 / 12 / 15 coils and an SNR of 26, 30 or 34 dB each, undersamples them 4×
(equispaced, 8 % centre), runs the cascades once per volume and prints the mean PSNR of every setting in the
grid next to the step switched off.

The choice rule, fixed before the held-out subject was looked at (first used on 2026-12-03 for ``ρ`` with ACS
maps): the best mean PSNR among the settings that lower no volume by more than 0.5 dB.

* 2026-12-03, ACS maps, CG (``ρ`` only): off 38.07 dB, ρ = 0.05 39.58 (worst volume −0.17) was chosen.
* 2026-12-03, the whole grid below: see docs/benchmarks.md ("ESPIRiT maps and an L1-wavelet term in the step").

``data_scripts/train_bundled_model.py`` writes the chosen settings into the checkpoint (``FINAL_DC``).

    .venv/bin/python data_scripts/choose_final_dc_prior.py [--checkpoint checkpoints/varnet_small.ckpt]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from reconkit.data import center_crop, read_volume
from reconkit.data.simulate.volume import simulate_volume, write_volume
from reconkit.inference import volume_mask
from reconkit.metrics import volume_metrics
from reconkit.models import load_model
from reconkit.models.sense_refine import refine_kspace
from reconkit.models.varnet import STEP_MAPS
from reconkit.ops import ifft2c, rss_complex

SOURCES = ("mni152", "nibabel_epi", "pydicom_abdomen", "pydicom_liver", "pydicom_shoulder")
SIZES = (((192, 112), (96, 96), 8, 3), ((320, 184), (160, 160), 12, 2), ((640, 368), (320, 320), 15, 1))
# (maps, ρ, κ, iterations): CG (κ = 0) converges in 10 iterations, FISTA (κ > 0) gets 30 (and 20, to see the cost);
# ρ = 1000 all but ignores the network image (the step is then close to plain ESPIRiT + L1-wavelet SENSE)
GRID = (
    [("acs", prior, 0.0, 10) for prior in (0.03, 0.05, 0.07, 0.1)]
    + [("espirit", prior, 0.0, 10) for prior in (0.1, 0.2, 0.3, 0.5)]
    + [("espirit", prior, kappa, 30) for prior in (0.5, 1.0, 3.0, 10.0, 1000.0) for kappa in (0.05, 0.1, 0.15, 0.25)]
    + [("espirit", prior, kappa, 20) for prior in (3.0, 10.0) for kappa in (0.1, 0.15)]
)
MAX_LOSS_DB = 0.5


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/varnet_small.ckpt"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.checkpoint)
    scores: dict[tuple | None, list[float]] = {}
    seconds: dict[tuple, float] = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for (encoded, recon, coils, slices), (index, source) in itertools.product(SIZES, enumerate(SOURCES)):
            seed = 5000 + 10 * index + encoded[0]
            snr = float(np.random.default_rng(seed).choice([26.0, 30.0, 34.0]))
            volume = read_volume(write_volume(simulate_volume(seed, source=source, coils=coils, slices=slices,
                                                              encoded_size=encoded, recon_size=recon, snr_db=snr),
                                              Path(tmp) / f"{source}.h5"))
            mask, _ = volume_mask(volume, "equispaced_fraction", 4, 0.08, seed=None)
            kspace = torch.from_numpy(np.stack((volume.kspace.real, volume.kspace.imag), -1).astype(np.float32))
            masks = torch.from_numpy(mask).expand(kspace.shape[0], -1, -1, -1, -1).float()
            masked = kspace * masks
            prediction = model.predict_kspace(masked, masks)  # the cascades, once per volume

            def psnr(coil_kspace: torch.Tensor, target: np.ndarray = volume.target, size: tuple = recon) -> float:
                image = rss_complex(ifft2c(coil_kspace), dim=1).numpy()
                return volume_metrics(target, center_crop(image, size))["PSNR"]

            scores.setdefault(None, []).append(psnr(prediction))
            maps = {kind: STEP_MAPS[kind](masked, masks) for kind in sorted({s[0] for s in GRID})}
            for setting in GRID:
                kind, prior, kappa, iters = setting
                start = time.perf_counter()
                refined = refine_kspace(prediction, masked, masks, maps[kind], False, iters, prior, kappa)
                seconds[setting] = seconds.get(setting, 0.0) + time.perf_counter() - start
                scores.setdefault(setting, []).append(psnr(refined))
            best = max(GRID, key=lambda s: scores[s][-1])
            print(f"{encoded[0]}×{encoded[1]}, {coils} coils, {source}, SNR {snr:.0f} dB: off {scores[None][-1]:.2f}"
                  f" dB, best {scores[best][-1]:.2f} dB at {best}", flush=True)
    off = np.array(scores[None])
    print(f"\nmean PSNR over {len(off)} volumes: off {off.mean():.2f} dB")
    print("| maps | ρ | κ | iterations | mean PSNR (dB) | worst volume vs off (dB) | step seconds, all volumes |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    allowed = []
    for setting in GRID:
        change = np.array(scores[setting]) - off
        print(f"| {setting[0]} | {setting[1]:g} | {setting[2]:g} | {setting[3]} | {np.mean(scores[setting]):.2f} | "
              f"{change.min():+.2f} | {seconds[setting]:.1f} |")
        if change.min() >= -MAX_LOSS_DB:
            allowed.append(setting)
    best = max(allowed, key=lambda s: np.mean(scores[s])) if allowed else None
    print(f"chosen (best mean, no volume more than {MAX_LOSS_DB} dB worse): maps, ρ, κ, iterations = {best}")


if __name__ == "__main__":
    main()
