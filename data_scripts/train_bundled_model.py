"""Train the bundled small VarNet on simulated data, export it to ONNX and write ``checkpoints/`` + its model card.

    .venv/bin/python data_scripts/train_bundled_model.py [--steps 5000] [--finetune-steps 2000] [--threads 1] \
        [--init CKPT] [--minutes 95] [--data data/bundled] [--out checkpoints]

1. Simulates a varied training set from three real sources (``mni152`` template brain: many slice positions, axial /
   coronal / sagittal, T1 / T2 / PD at 1.5 and 3 T; ``nibabel_epi`` real EPI brain; ``pydicom_abdomen`` real
   abdominal slice; 4 / 8 / 12 coils, SNR 22–40 dB) at 192 × 112 encoded k-space (2× readout oversampling,
   96 × 96 recon); for stage 2, two larger matrices (320 × 184 and 640 × 368, about 1.2 and 0.6 mm pixels) of
   these and two more real images from pydicom-data (``pydicom_liver`` abdomen, ``pydicom_shoulder``), and more
   192 × 112 volumes of the pydicom images; plus held-out scans of a different, real subject (``dipy_b0``) at all
   three sizes.
2. Trains a VarNet with ``reconkit.training.KspaceModule`` and Lightning (L1 loss, Adam, cosine decay) on 4× and 8×
   equispaced masks on the CPU in two stages: stage 1, ``--steps`` optimizer steps from scratch at 192 × 112;
   stage 2, ``--finetune-steps`` more at a lower learning rate on all three matrix sizes and five sources (a model
   trained at one size only loses to CG-SENSE at the larger ones: the aliased copies of a 4× scan lie further
   apart, in pixels, than its U-Nets had learned). ``--init CKPT`` takes a stage-1 checkpoint instead of training one;
   ``--minutes`` is a wall-clock safety stop per stage.
3. Exports ``checkpoints/varnet_small.onnx`` with ``reconkit.export.export_onnx`` (one graph branch per k-space size
   of :data:`EXPORT_SIZES`: the training sizes and six fastMRI sizes), checks ONNX Runtime against torch,
   measures NMSE / PSNR / SSIM on the held-out scans (zero-filled, CG-SENSE, VarNet) and writes
   ``checkpoints/MODEL_CARD.md`` from those measurements.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
ENCODED, RECON = (192, 112), (96, 96)
# Stage 2's larger matrices: (encoded, recon, volumes, slices per volume); fewer slices where a step costs more
LARGER = (((320, 184), (160, 160), 24, 8), ((640, 368), (320, 320), 8, 6))
FASTMRI_SIZES = [(640, 368), (640, 372), (640, 320), (768, 396), (768, 392), (640, 272)]  # knee and brain k-space sizes
EXPORT_SIZES = [ENCODED, (320, 184), *FASTMRI_SIZES]
MODEL = {"num_cascades": 8, "chans": 12, "pools": 3, "sens_chans": 6, "sens_pools": 2, "init_scale": 0.1}
# the SENSE data-consistency step after the cascades (no weights; switched on after training): maps, ρ, κ and the
# iteration count chosen on the training sources by data_scripts/choose_final_dc_prior.py, never on the held-out
# subject (2026-12-03: ESPIRiT maps, ρ = 3, κ = 0.15, 30 FISTA iterations; before: ACS maps, ρ = 0.05, 10 CG)
FINAL_DC = {"final_dc_iters": 30, "final_dc_prior": 3.0, "final_dc_maps": "espirit", "final_dc_wavelet": 0.15}
LOSS, LR = "l1", 1e-3  # L1: the held-out target is PSNR against classical CS; SSIM is checked, not optimised
FINETUNE_LR = 3e-4  # stage 2 (all matrix sizes), from the stage-1 weights
MASK = {"mask_type": "equispaced_fraction", "center_fractions": [0.08, 0.08, 0.04], "accelerations": [4, 4, 8]}
# Training subjects, drawn per volume (a repeated name weighs double): the MNI152 template with synthesised
# contrasts, a real EPI brain and a real abdominal slice — none from dipy, the held-out subject's package.
TRAIN_SOURCES = ("mni152", "mni152", "nibabel_epi", "nibabel_epi", "pydicom_abdomen")
# Stage 2 adds two more real slices from pydicom-data (a contrast-enhanced abdomen and a coronal shoulder): its
# larger matrices draw from all of them, and STAGE2_EXTRA more 192 x 112 volumes come from the pydicom images only.
STAGE2_SOURCES = (*TRAIN_SOURCES, "pydicom_liver", "pydicom_shoulder")
STAGE2_EXTRA = {"volumes": 24, "source": ("pydicom_abdomen", "pydicom_liver", "pydicom_shoulder", "pydicom_shoulder")}
TRAIN_SIM = {
    "source": TRAIN_SOURCES, "coils": (4, 8, 12), "snr_db": (22.0, 28.0, 34.0, 40.0), "slices": 8, "contrast": "mixed",
    "orientation": "mixed",
}
HELD_OUT = {"source": "dipy_b0", "coils": 8, "slices": 10, "snr_db": 32.0}


def simulate(data: Path, num_volumes: int) -> dict:
    """Training / test volumes of the training sources at 192 × 112 (``data/{train,test}``) and at the
    :data:`LARGER` sizes (``data/larger/{train,test}``, sources :data:`STAGE2_SOURCES`), stage 2's extra
    192 × 112 volumes (``data/extra/{train,test}``), and held-out volumes of another subject (dipy_b0) at every
    size (``data/held_out``, ``data/held_out_larger``). Returns the 192 × 112 manifest with a ``"larger"`` entry
    holding the larger sizes' manifests and an ``"extra"`` entry."""
    from reconkit.data.simulate import simulate_dataset, simulate_volume, write_volume
    from reconkit.data.simulate.volume import json_text

    manifest = simulate_dataset(
        data, num_volumes, encoded_size=ENCODED, recon_size=RECON, seed=7, split=(0.85, 0.0, 0.15), **TRAIN_SIM
    )
    for seed in (101, 102):
        write_volume(
            simulate_volume(seed, encoded_size=ENCODED, recon_size=RECON, **HELD_OUT),
            data / "held_out" / f"dipy_b0_{seed}.h5",
        )
    extra = {**TRAIN_SIM, "source": STAGE2_EXTRA["source"]}
    manifest["extra"] = simulate_dataset(
        data / "extra", STAGE2_EXTRA["volumes"], encoded_size=ENCODED, recon_size=RECON, seed=11,
        split=(0.85, 0.0, 0.15), **extra,
    )  # fmt: skip
    manifest["larger"] = []
    for index, (encoded, recon, volumes, slices) in enumerate(LARGER):
        options = {**TRAIN_SIM, "source": STAGE2_SOURCES, "slices": slices}
        manifest["larger"].append(simulate_dataset(
            data / "larger", volumes, encoded_size=encoded, recon_size=recon, seed=8 + index, split=(0.85, 0.0, 0.15),
            **options,
        ))  # fmt: skip
        write_volume(
            simulate_volume(101, encoded_size=encoded, recon_size=recon, **HELD_OUT),
            data / "held_out_larger" / f"dipy_b0_101_{encoded[0]}x{encoded[1]}.h5",
        )
    (data / "manifest.json").write_text(json_text(manifest, indent=1))
    return manifest


def stage2_root(data: Path) -> Path:
    """``data/stage2/train``: links to the training files of every size (stage 2's data module root)."""
    root = data / "stage2"
    shutil.rmtree(root, ignore_errors=True)
    (root / "train").mkdir(parents=True)
    (root / "val").mkdir()
    for folder in (data / "train", data / "extra" / "train", data / "larger" / "train"):
        for path in sorted(folder.glob("*.h5")):
            (root / "train" / path.name).symlink_to(path.resolve())
    return root


def train(root: Path, steps: int, minutes: float, work: Path, name: str, lr: float, init: Path | None = None) -> Path:
    """Lightning training on ``root/train`` for ``steps`` optimizer steps (at most ``minutes`` of wall clock),
    from the weights of checkpoint ``init`` if given, else from scratch; returns the weights-only checkpoint
    ``work/name``."""
    from lightning.pytorch import Trainer, seed_everything

    from reconkit.training import FastMriDataModule, KspaceModule

    seed_everything(0, workers=True)
    (root / "val").mkdir(exist_ok=True)
    datamodule = FastMriDataModule(
        root,
        mask_type=MASK["mask_type"],
        center_fractions=MASK["center_fractions"],
        accelerations=MASK["accelerations"],
        batch_size=1,
        num_workers=0,
        seed=0,
    )
    module = KspaceModule(model_type="varnet", model_kwargs=MODEL, loss=LOSS, lr=lr, lr_scheduler="cosine")
    if init is not None:
        module.load_state_dict(torch.load(init, weights_only=True)["state_dict"])
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        max_time={"minutes": minutes},
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        default_root_dir=work,
        log_every_n_steps=10,
        enable_progress_bar=True,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    print(
        f"{name}: trained {trainer.global_step} steps ({trainer.current_epoch} epochs) in "
        f"{(time.perf_counter() - start) / 60:.1f} min"
    )
    path = work / name
    trainer.save_checkpoint(path, weights_only=True)
    return path


def switch_on_final_dc(path: Path) -> None:
    """Add :data:`FINAL_DC` to the checkpoint's model hyper-parameters (its ``"reconkit"`` entry, which
    ``load_model`` reads, and Lightning's ``hyper_parameters``); the weights are unchanged."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    for entry in (checkpoint["reconkit"], checkpoint.get("hyper_parameters", {})):
        if "model_kwargs" in entry:
            entry["model_kwargs"] = {**entry["model_kwargs"], **FINAL_DC}
    torch.save(checkpoint, path)


def evaluate(files: list[Path], models: dict[str, str]) -> dict[str, dict[str, float]]:
    """Mean per-volume NMSE / PSNR / SSIM and seconds per slice of each model on ``files`` (4× equispaced)."""
    from reconkit.data import read_volume
    from reconkit.inference import load_reconstructor, reconstruct_volume, volume_mask
    from reconkit.metrics import volume_metrics

    results = {}
    for label, model in models.items():
        reconstructor = load_reconstructor(model, torch_fallback=False)
        rows, seconds, slices = [], 0.0, 0
        for path in files:
            volume = read_volume(path)
            mask, _ = volume_mask(volume, "equispaced_fraction", 4, 0.08, seed=None)
            result = reconstruct_volume(volume, reconstructor, mask, batch_size=2)
            rows.append(volume_metrics(result.target, result.reconstruction))
            seconds, slices = seconds + result.seconds, slices + len(result.reconstruction)
        results[label] = {k: float(np.mean([r[k] for r in rows])) for k in ("NMSE", "PSNR", "SSIM")}
        results[label]["seconds_per_slice"] = seconds / slices
    return results


def model_card(out: Path, manifest: dict, trained: dict, metrics: dict, onnx_gap: float) -> str:
    def table(section: dict) -> str:
        lines = ["| method | NMSE | PSNR (dB) | SSIM | s / slice |", "|---|---:|---:|---:|---:|"]
        for label, m in section.items():
            lines.append(
                f"| {label} | {m['NMSE']:.4f} | {m['PSNR']:.2f} | {m['SSIM']:.4f} | {m['seconds_per_slice']:.3f} |"
            )
        return "\n".join(lines)

    def larger_table(sections: dict) -> str:
        lines = ["| k-space | method | NMSE | PSNR (dB) | SSIM | s / slice |", "|---|---|---:|---:|---:|---:|"]
        for size, section in sections.items():
            for label, m in section.items():
                lines.append(f"| {size} | {label} | {m['NMSE']:.4f} | {m['PSNR']:.2f} | {m['SSIM']:.4f} | "
                             f"{m['seconds_per_slice']:.3f} |")
        return "\n".join(lines)

    stage2_sets = [*manifest.get("larger", []), manifest.get("extra", {"volumes": []})]
    larger = [v for m in stage2_sets for v in m["volumes"]]
    train_files = [v for v in manifest["volumes"] + larger if v["split"] == "train"]
    contrasts = sorted({v["params"]["protocol"]["contrast"] for v in train_files})
    orientations = sorted({v["params"]["orientation"] for v in train_files})
    coils = sorted({v["params"]["coils"] for v in train_files})
    snrs = sorted({v["params"]["snr_db"] for v in train_files})
    sources = dict(Counter(v["params"]["source"] for v in train_files))
    sizes = dict(Counter("×".join(map(str, v["params"]["encoded_size"])) for v in train_files))
    recons = " / ".join(f"{h}×{w}" for h, w in [RECON] + [recon for _, recon, _, _ in LARGER])
    size_ckpt = (out / "varnet_small.ckpt").stat().st_size / 2**20
    size_onnx = (out / "varnet_small.onnx").stat().st_size / 2**20
    stage1, stage2 = trained["stage1"], trained.get("stage2")
    stage1_text = (f"{stage1['steps']} steps, {stage1['minutes']:.1f} min" if "minutes" in stage1
                   else f"{stage1['steps']} steps (the checkpoint `{Path(stage1['init']).name}` given by `--init`, "
                        f"trained earlier by stage 1 with the default `--steps`)")
    stage2_text = (f"{stage2['steps']} more steps, {stage2['minutes']:.1f} min, lr {FINETUNE_LR:g} with cosine decay, "
                   f"on all three matrix sizes" if stage2 else "none")
    return f"""# Model card: `varnet_small` (bundled)

Files: `varnet_small.ckpt` ({size_ckpt:.1f} MiB, reconkit checkpoint contract, `reconkit.models.load_model`) and
`varnet_small.onnx` ({size_onnx:.1f} MiB, ONNX contract of docs/architecture.md, MatMul FFT in the graph, branches
for k-space sizes {", ".join(f"{h}×{w}" for h, w in EXPORT_SIZES)}). Written by
`data_scripts/train_bundled_model.py`; every number below was measured by that script in the same run.

## Model
E2E-VarNet (`reconkit.models.VarNet`): {MODEL["num_cascades"]} cascades, U-Net channels {MODEL["chans"]} with
{MODEL["pools"]} pooling levels, sensitivity U-Net channels {MODEL["sens_chans"]} with {MODEL["sens_pools"]} levels
({sum(p.numel() for p in torch.load(out / "varnet_small.ckpt", weights_only=True)["state_dict"].values()):,}
weights; the last convolution of each cascade initialised ×{MODEL["init_scale"]}, so training starts close to
plain data consistency). After the cascades, a SENSE data-consistency step without weights
(`reconkit.models.sense_refine`: {FINAL_DC["final_dc_iters"]} FISTA iterations with {FINAL_DC["final_dc_maps"]} maps, a
noise-adaptive weight ρ = {FINAL_DC["final_dc_prior"]} and an L1-Haar term κ = {FINAL_DC["final_dc_wavelet"]}, chosen on the training
sources by `data_scripts/choose_final_dc_prior.py`), switched on after training. Output: RSS magnitude at the encoded size; crop to the header's recon size.

## Training
* Trainer: `reconkit.training.KspaceModule` (model_type `varnet`) + `FastMriDataModule` with Lightning;
  {LOSS.upper()} loss, Adam, batch 1, CPU ({trained.get("threads", 1)} thread(s)) on a shared 2-core machine.
  Stage 1, from scratch at {ENCODED[0]}×{ENCODED[1]} only, lr {LR:g} with cosine decay: {stage1_text}.
  Stage 2: {stage2_text}.
* Data: {len(train_files)} simulated training volumes from `reconkit.data.simulate`, k-space sizes {sizes}
  (volumes per size; 2× readout oversampling, recon {recons}, i.e. about 2, 1.2
  and 0.6 mm pixels), sources {sources} (volumes per source): the MNI152 template with synthesised T1 / T2 / PD
  contrast, a real T2*-weighted EPI brain (nibabel's example), a real T1 abdominal slice (pydicom's example) and,
  in stage 2 only, a contrast-enhanced T1 abdomen and a coronal shoulder (pydicom-data) — many slice positions,
  in-plane rotations, flips and fields of view; contrasts {contrasts}, orientations {orientations}, coils
  {coils}, SNR {snrs} dB. No training image comes from dipy, the package of the held-out subject.
* Masks: `{MASK["mask_type"]}`, (centre fraction, acceleration) drawn from
  {list(zip(MASK["center_fractions"], MASK["accelerations"]))} per slice and epoch.

## Held-out evaluation (4× equispaced, 8 % centre, one mask per volume seeded by the file name)
Real subject never seen in training (`dipy_b0`: dipy's real T2-weighted b = 0 brain slices, 8 coils simulated,
{HELD_OUT["slices"]} slices a volume, SNR {HELD_OUT["snr_db"]} dB); per-volume fastMRI metrics, mean over
volumes; seconds per slice on this CPU (shared). 2 volumes at {ENCODED[0]}×{ENCODED[1]}:

{table(metrics["held_out"])}

One volume at each larger matrix size (the 640×368 volume is a fastMRI knee-sized k-space):

{larger_table(metrics["held_out_larger"])}

Test split of the training sources (other slice positions / contrasts / coil counts than training; stage 2's
extra pydicom volumes included), at
{ENCODED[0]}×{ENCODED[1]}:

{table(metrics["test"])}

and at the larger sizes (320×184 and 640×368 volumes together):

{table(metrics["test_larger"])}

ONNX Runtime vs torch on the held-out scans: max |difference| / max image = {onnx_gap:.2e}.

## Limits
* Trained for under two hours on a CPU: far from converged; a full-size VarNet trained on real fastMRI data is much
  better. Use it for demos, smoke tests and as a starting point, not for diagnosis.
* Five training images (a template brain, one real EPI brain, two real abdominal slices, one shoulder); never trained
  on knee or real raw k-space; the held-out subject is real but its coils, noise and k-space are simulated.
* Trained on k-space of {", ".join(sizes)}; the ONNX graph accepts only the sizes listed above (use the checkpoint
  with `--backend torch` for other sizes).
* Cartesian line masks at 4× / 8×; other accelerations or 2D masks are out of distribution.

Machine: {platform.machine()} / {platform.processor() or "cpu"}, torch {torch.__version__}, Python
{platform.python_version()}.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5000, help="stage-1 optimizer steps at 192x112 (cosine schedule)")
    parser.add_argument("--finetune-steps", type=int, default=2000,
                        help="stage-2 optimizer steps on all matrix sizes (0: none)")
    parser.add_argument("--init", type=Path, help="a stage-1 checkpoint to start stage 2 from (skips stage 1)")
    parser.add_argument("--minutes", type=float, default=95.0, help="wall-clock safety stop for each training stage")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for training")
    parser.add_argument("--volumes", type=int, default=48, help="simulated 192x112 training / test volumes")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "bundled", help="simulated data folder")
    parser.add_argument("--out", type=Path, default=ROOT / "checkpoints", help="where the model files go")
    parser.add_argument("--reuse-data", action="store_true", help="use already simulated data in --data")
    parser.add_argument(
        "--reuse-checkpoint", action="store_true", help="skip training if --data/work holds a trained checkpoint"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from reconkit.export import export_onnx

    if args.reuse_data and (args.data / "manifest.json").is_file():
        manifest = json.loads((args.data / "manifest.json").read_text())
    else:
        shutil.rmtree(args.data, ignore_errors=True)
        manifest = simulate(args.data, args.volumes)
    work = args.data / "work"
    work.mkdir(parents=True, exist_ok=True)
    checkpoint, info_path = work / "varnet_small.ckpt", work / "train_info.json"
    if not (args.reuse_checkpoint and checkpoint.is_file() and info_path.is_file()):
        def steps(path: Path) -> int | str:
            return torch.load(path, weights_only=True).get("global_step", "?")

        start = time.perf_counter()
        if args.init is None:
            stage1 = train(args.data, args.steps, args.minutes, work, "stage1.ckpt", LR)
            info = {"stage1": {"steps": steps(stage1), "minutes": (time.perf_counter() - start) / 60}}
        else:
            stage1 = args.init
            info = {"stage1": {"steps": steps(stage1), "init": str(args.init)}}
        if args.finetune_steps > 0:
            start = time.perf_counter()
            checkpoint = train(stage2_root(args.data), args.finetune_steps, args.minutes, work, checkpoint.name,
                               FINETUNE_LR, init=stage1)
            info["stage2"] = {"steps": steps(checkpoint), "minutes": (time.perf_counter() - start) / 60}
        else:
            shutil.copy(stage1, checkpoint)
        info_path.write_text(json.dumps({**info, "threads": args.threads}))
    trained = json.loads(info_path.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copy(checkpoint, args.out / "varnet_small.ckpt")
    switch_on_final_dc(args.out / "varnet_small.ckpt")
    onnx_path = export_onnx(
        args.out / "varnet_small.ckpt",
        args.out / "varnet_small.onnx",
        example_shape=[(8, *hw) for hw in EXPORT_SIZES],
        # every (acceleration, centre fraction) trained with: reconstruct's defaults take the first pair (4x, 0.08),
        # and its note on scans sampled beyond the training masks compares with all of them
        metadata={"mask_family": MASK["mask_type"], "acceleration": MASK["accelerations"],
                  "center_fraction": MASK["center_fractions"]},
    )

    models = {
        "zero-filled": "zero-filled",
        "CG-SENSE": "cg-sense",
        "VarNet (torch)": str(args.out / "varnet_small.ckpt"),
        "VarNet (ONNX Runtime)": str(onnx_path),
    }
    held_out = sorted((args.data / "held_out").glob("*.h5"))
    test = [*sorted((args.data / "test").glob("*.h5")), *sorted((args.data / "extra" / "test").glob("*.h5"))]
    metrics = {
        "held_out": evaluate(held_out, models),
        "held_out_larger": {path.stem.rsplit("_", 1)[-1].replace("x", "×"): evaluate([path], models)
                            for path in sorted((args.data / "held_out_larger").glob("*.h5"))},
        "test": evaluate(test, models),
        "test_larger": evaluate(sorted((args.data / "larger" / "test").glob("*.h5")), models),
    }
    onnx_gap = onnx_vs_torch(held_out[0], args.out)
    (args.out / "MODEL_CARD.md").write_text(model_card(args.out, manifest, trained, metrics, onnx_gap))
    print(json.dumps(metrics, indent=1))
    return 0


def onnx_vs_torch(path: Path, out: Path) -> float:
    """Largest |ONNX − torch| over one held-out volume, relative to the image maximum."""
    from reconkit.data import read_volume
    from reconkit.inference import load_reconstructor, reconstruct_volume, volume_mask

    volume = read_volume(path)
    mask, _ = volume_mask(volume, "equispaced_fraction", 4, 0.08, seed=None)
    images = [
        reconstruct_volume(volume, load_reconstructor(str(out / name)), mask).reconstruction
        for name in ("varnet_small.ckpt", "varnet_small.onnx")
    ]
    return float(np.abs(images[0] - images[1]).max() / images[0].max())


if __name__ == "__main__":
    sys.exit(main())
