"""Training diagnostics: spectral bias per k-space band and the lazy vs feature-learning regime, while a model trains.

:class:`TrainingDiagnostics` is a Lightning callback (``reconkit train fit --diagnostics.every_n_steps 100``).
Every ``every_n_steps`` optimizer steps it runs a fixed *probe* (a few slices of the validation split, fixed masks)
through the model in eval mode and records

* ``band_nmse``: the probe's NMSE per k-space band (:func:`reconkit.metrics.spectral.band_nmse`, band 0 = DC);
  spectral bias shows as the low bands' curves falling long before the high bands';
* ``weight_change`` (``‖θ − θ₀‖ / ‖θ₀‖``, also per top-level block of the model), ``ntk_distance`` (kernel
  distance of the probe's empirical NTK to its value at the first step) and ``linearization_error`` (the part of
  the change in the probe's output that the network linearised at ``θ₀`` does not explain; exact JVP, or a finite
  difference for models forward-mode AD cannot run, named in ``linearization_method``):
  :mod:`reconkit.training.regime`. All three near 0: lazy (kernel) regime; kernel distance and linearisation error
  of order 0.1 to 1: feature learning.

At every validation it also logs the whole validation split's NMSE per band (``val_band_nmse/b<k>``), summed over
its slices, each once (gathered from the DDP ranks, whose sampler repeats slices to even them out). Everything
goes to the run's loggers (TensorBoard, CSV) under ``diagnostics/…`` and to ``<dirpath>/diagnostics.json``
(``history``: one record per measurement or validation; ``band_radius_edges``: the bands' edges in normalised
radius, the last one open) with a plot ``diagnostics.png`` (also TensorBoard's ``diagnostics`` image);
``diagnostics_init.pt`` keeps ``θ₀``, the first kernel and the probe so that a resumed run (``--ckpt_path last``)
measures from the same start.

``step`` in the records is the number of optimizer steps taken (``trainer.global_step``). Cost per measurement:
2 forward passes over the probe (bands and the current output, kernel) and one forward-mode pass, or 5 forward
passes instead of the forward-mode one on the finite-difference fallback, and ``ntk_projections`` backward passes,
on global rank 0 only (the other ranks wait at their next gradient all-reduce); memory ``ntk_projections × #weights`` floats. Measuring leaves training bit-identical: it runs in
eval mode on a forked RNG and puts the weights back exactly.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import move_data_to_device, rank_zero_info, rank_zero_warn

from reconkit.atomic import atomic_path
from reconkit.errors import ConfigError, ReconkitError
from reconkit.metrics.spectral import band_energies, band_ratio
from reconkit.training.base import Images
from reconkit.training.datamodule import collate_slices
from reconkit.training.regime import (
    empirical_ntk,
    kernel_distance,
    linearization_error,
    relative_weight_change,
    snapshot,
)
from reconkit.training.volume_metrics import gather_slice_stats

__all__ = ["TrainingDiagnostics", "measurements", "plot_diagnostics", "regime_label"]


def regime_label(ntk_distance: float, linearization_error: float, threshold: float = 0.1) -> str:
    """``"lazy"`` when both the kernel distance and the linearisation error are below ``threshold``, else
    ``"feature learning"``. A rule of thumb for reading the numbers, not a sharp boundary: in the kernel limit both
    go to 0, and networks that learn features reach values of order 0.1 to 1 (Fort et al., NeurIPS 2020)."""
    return "lazy" if ntk_distance < threshold and linearization_error < threshold else "feature learning"


class TrainingDiagnostics(Callback):
    """Spectral bias and lazy / feature-learning measures on a fixed probe during ``fit`` (module docstring)."""

    def __init__(self, every_n_steps: int = 0, num_bands: int = 8, probe_split: str = "val", probe_slices: int = 2,
                 ntk_projections: int = 8, dirpath: str | None = None, seed: int = 0):
        """
        Args:
            every_n_steps: optimizer steps between measurements; 0 switches the diagnostics off.
            num_bands: concentric rings of the 2D spectrum of the reconstructed (cropped, magnitude) image and its
                target, DC (0) to the edge; not the acquired k-space, whose phase the magnitude image drops.
            probe_split: the data module's split the probe slices come from (``"val"`` or ``"train"``: fit on
                held-out or on training data; ``"train"`` draws from the volumes training reads, e.g. the
                ``--data.fraction`` subset), read with the validation transform (fixed masks).
            probe_slices: slices in the probe, evenly spread over the split.
            ntk_projections: random projections of the probe's output that sketch its neural tangent kernel.
            dirpath: folder for ``diagnostics.json`` / ``.png`` / ``_init.pt``; ``reconkit train`` sets
                ``<trainer.default_root_dir>/diagnostics``, else the trainer's ``default_root_dir``.
            seed: seed of the projections.
        """
        if every_n_steps < 0 or num_bands < 1 or probe_slices < 1 or ntk_projections < 2:
            raise ConfigError("every_n_steps must be >= 0, num_bands and probe_slices >= 1, and ntk_projections >= 2 "
                              "(a kernel sketched by one projection is 1 x 1: its distance is always 0)")
        if probe_split not in ("val", "train"):
            raise ConfigError(f"probe_split must be 'val' or 'train', got {probe_split!r}")
        self.every_n_steps = every_n_steps
        self.num_bands = num_bands
        self.probe_split = probe_split
        self.probe_slices = probe_slices
        self.ntk_projections = ntk_projections
        self.dirpath = dirpath
        self.seed = seed
        self.history: list[dict[str, Any]] = []
        self._active = False
        self._val_slices: list[_BandSlice] = []

    # --- Lightning hooks -------------------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._active = self.every_n_steps > 0
        if not self._active or not trainer.is_global_zero:
            return
        self._folder = Path(self.dirpath or trainer.default_root_dir)
        init_file = self._folder / "diagnostics_init.pt"
        if trainer.ckpt_path is not None and init_file.is_file():
            # this run's own file; the probe batches are the transforms' NamedTuples, which weights_only refuses
            state = torch.load(init_file, map_location="cpu", weights_only=False)
        else:
            if trainer.ckpt_path is not None:
                rank_zero_warn(f"diagnostics: {init_file} is missing, so this resumed run measures from its "
                               "resumed weights")
            state = self._start_state(trainer, pl_module)
            self._folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(init_file) as tmp:
                torch.save(state, tmp)
        device = pl_module.device
        self._initial = {name: value.to(device) for name, value in state["initial"].items()}
        self._probe = [self._as_steps_get_it(pl_module, batch) for batch in state["probe"]]
        self._projections = state["projections"].to(device)
        self._initial_kernel = state["kernel"]
        if trainer.global_step != self._last_step():  # a resumed run measured its resume step already
            self._measure(trainer, pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self._active and trainer.is_global_zero and step % self.every_n_steps == 0 and step != self._last_step():
            self._measure(trainer, pl_module)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._val_slices = []

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._active or trainer.sanity_checking or not isinstance(outputs, Images) or outputs.target is None:
            return
        for i, (fname, slice_num) in enumerate(zip(outputs.fname, outputs.slice_num.tolist())):
            error, energy = band_energies(outputs.output[i], outputs.target[i], self.num_bands)
            self._val_slices.append(_BandSlice(str(fname), int(slice_num), error.tolist(), energy.tolist()))

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._active or trainer.sanity_checking:
            return
        # every rank's slices, each once: under DDP the validation sampler pads the ranks by repeating slices
        records = gather_slice_stats(self._val_slices)
        self._val_slices = []
        sums = torch.tensor([[r.error, r.energy] for r in records], dtype=torch.float64).reshape(-1, 2, self.num_bands)
        values = band_ratio(sums[:, 0].sum(0), sums[:, 1].sum(0)).tolist()
        for band, value in enumerate(values):
            pl_module.log(f"val_band_nmse/b{band}", value)
        if trainer.is_global_zero:
            self.history.append({"step": trainer.global_step, "epoch": trainer.current_epoch,
                                 "val_band_nmse": [_number(v) for v in values]})
            self._write(plot=True, trainer=trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._active or not trainer.is_global_zero:
            return
        if trainer.global_step != self._last_step():
            self._measure(trainer, pl_module)
        self._write(plot=True, trainer=trainer)
        last = measurements(self.history)[-1]
        bands = ", ".join("-" if v is None else f"{v:.3g}" for v in last["band_nmse"] or [])
        rank_zero_info(f"diagnostics at step {last['step']}: weight change {last['weight_change']:.3g}, NTK distance "
                       f"{last['ntk_distance']:.3g}, linearisation error {_fmt(last['linearization_error'])} "
                       f"({last['regime'] or 'no change yet'}); probe NMSE per band, DC to edge: {bands}; in {self._folder}")

    def _settings(self) -> dict[str, Any]:
        """What a resumed run must share with the run it resumes (the probe and its sketch are kept on disk)."""
        return {"num_bands": self.num_bands, "probe_split": self.probe_split, "probe_slices": self.probe_slices,
                "ntk_projections": self.ntk_projections, "seed": self.seed}

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "settings": self._settings()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        stored = state_dict.get("settings", {})  # absent in checkpoints written before 2026-12-07
        changed = {k: (v, stored[k]) for k, v in self._settings().items() if k in stored and stored[k] != v}
        if changed:
            listed = ", ".join(f"--diagnostics.{k} {new} (the checkpoint's run: {old})" for k, (new, old) in changed.items())
            raise ConfigError(f"diagnostics: resuming with {listed}; the resumed series would mix two settings. "
                              "Resume with the checkpoint's settings, or start a new run (another "
                              "--trainer.default_root_dir)")
        self.history = list(state_dict.get("history", []))

    # --- measurement -----------------------------------------------------------------------------------------
    def _last_step(self) -> int | None:
        records = measurements(self.history)
        return records[-1]["step"] if records else None

    def _start_state(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        """``θ₀``, the probe batches (CPU), the projections and the kernel at ``θ₀``."""
        datamodule = trainer.datamodule
        if not all(hasattr(datamodule, name) for name in ("slice_dataset", "default_transform", "training_volumes")):
            raise ReconkitError("TrainingDiagnostics reads its probe through a FastMriDataModule (reconkit.training)")
        transform = datamodule.transform_overrides.get("val") or datamodule.default_transform("val")
        dataset = datamodule.slice_dataset(self.probe_split, transform, None, None)
        if self.probe_split == "train":  # the volumes training reads, not the whole split (--data.fraction)
            trained = datamodule.training_volumes()
            dataset.raw_samples = [s for s in dataset.raw_samples if Path(s.fname).name in trained]
        if len(dataset) == 0:
            raise ReconkitError(f"TrainingDiagnostics: the {self.probe_split!r} split has no slices for the probe")
        # evenly spread, away from the first and last slice of the split (edge slices hold little signal)
        picks = np.linspace(0, len(dataset) - 1, self.probe_slices + 2)[1:-1].round().astype(int)
        probe = [collate_slices([dataset[int(i)]]) for i in sorted(set(picks.tolist()))]
        if len(probe) < self.probe_slices:
            rank_zero_warn(f"diagnostics: the {self.probe_split!r} split has {len(dataset)} slice(s); the probe holds "
                           f"{len(probe)} of the {self.probe_slices} asked (diagnostics.json lists them)")
        self._probe = [self._as_steps_get_it(pl_module, batch) for batch in probe]
        size = int(self._eval_mode(pl_module, lambda: self._probe_outputs(pl_module, grad=False)).numel())
        generator = torch.Generator().manual_seed(self.seed)
        projections = torch.randn(self.ntk_projections, size, generator=generator) / math.sqrt(size)
        kernel = self._eval_mode(pl_module, lambda: empirical_ntk(
            pl_module, lambda: self._probe_outputs(pl_module, grad=True), projections.to(pl_module.device)))
        return {"initial": {k: v.cpu() for k, v in snapshot(pl_module).items()}, "probe": probe,
                "projections": projections, "kernel": kernel.cpu()}

    @staticmethod
    def _as_steps_get_it(pl_module: LightningModule, batch: Any) -> Any:
        """A probe batch on the module's device and as its steps give it to the model: floating-point tensors in
        the weights' dtype (:meth:`reconkit.training.ReconModule.in_weights_dtype`; float64 for a module made under
        ``torch.set_default_dtype(torch.float64)``)."""
        return pl_module.in_weights_dtype(move_data_to_device(batch, pl_module.device))

    def _probe_outputs(self, pl_module: LightningModule, grad: bool) -> torch.Tensor:
        with torch.set_grad_enabled(grad):
            return torch.cat([pl_module.images(batch).output.flatten() for batch in self._probe])

    @staticmethod
    def _eval_mode(pl_module: LightningModule, run):
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.random.fork_rng(devices=[pl_module.device] if pl_module.device.type == "cuda" else []):
                return run()
        finally:
            pl_module.train(was_training)

    def _measure(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_mode(pl_module, lambda: self._record(trainer, pl_module))
        self._write(plot=False)

    def _record(self, trainer: Trainer, pl_module: LightningModule) -> None:
        started = time.perf_counter()
        with torch.no_grad():
            images = [pl_module.images(batch) for batch in self._probe]
        band_nmse = None
        if all(image.target is not None for image in images):
            sums = sum(torch.stack(band_energies(im.output, im.target, self.num_bands)) for im in images)
            band_nmse = [_number(v) for v in band_ratio(sums[0], sums[1]).tolist()]
        outputs = lambda: self._probe_outputs(pl_module, grad=False)  # noqa: E731
        kernel = empirical_ntk(pl_module, lambda: self._probe_outputs(pl_module, grad=True), self._projections)
        record = {
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "band_nmse": band_nmse,
            "weight_change": relative_weight_change(pl_module, self._initial),
            "weight_change_by_block": {block: _number(relative_weight_change(pl_module, self._initial, block + "."))
                                       for block in _blocks(self._initial)},
            "ntk_distance": kernel_distance(self._initial_kernel, kernel.cpu()),
        }
        now = torch.cat([image.output.flatten() for image in images])  # what ``outputs()`` returns now
        linearization = linearization_error(pl_module, outputs, self._initial, current_output=now)
        record["linearization_error"] = _number(linearization.error)
        record["linearization_method"] = linearization.method
        if record["linearization_error"] is None:  # the first step: nothing to judge yet
            record["regime"] = None
        else:
            record["regime"] = regime_label(record["ntk_distance"], record["linearization_error"])
        record["seconds"] = round(time.perf_counter() - started, 3)  # what this measurement cost
        self.history.append(record)
        metrics = {"diagnostics/weight_change": record["weight_change"],
                   "diagnostics/ntk_distance": record["ntk_distance"]}
        if record["linearization_error"] is not None:
            metrics["diagnostics/linearization_error"] = record["linearization_error"]
        for band, value in enumerate(band_nmse or []):
            if value is not None:
                metrics[f"diagnostics/band_nmse/b{band}"] = value
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=trainer.global_step)

    # --- files -----------------------------------------------------------------------------------------------
    def _write(self, plot: bool, trainer: Trainer | None = None) -> None:
        """``diagnostics.json``; with ``plot`` also ``diagnostics.png``, which also goes to TensorBoard's images."""
        edges = [round(b / self.num_bands, 6) for b in range(self.num_bands)] + [None]
        probe = [{"fname": Path(str(b.fname[0])).name, "slice": int(b.slice_num[0])} for b in self._probe]
        document = {"num_bands": self.num_bands, "band_radius_edges": edges, "probe_split": self.probe_split,
                    "probe": probe, "history": self.history}
        with atomic_path(self._folder / "diagnostics.json") as tmp:
            tmp.write_text(json.dumps(document, indent=1))
        if not plot:
            return
        with atomic_path(self._folder / "diagnostics.png") as tmp:
            plot_diagnostics(document, tmp)
        tensorboard = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None) if trainer else None
        if tensorboard is not None:
            import matplotlib.image

            image = matplotlib.image.imread(self._folder / "diagnostics.png")[..., :3]
            tensorboard.experiment.add_image("diagnostics", image, global_step=trainer.global_step, dataformats="HWC")


class _BandSlice(NamedTuple):
    """One validation slice's error and target energy per band (:func:`band_energies`), keyed like
    :class:`~reconkit.training.volume_metrics.SliceStats` so that :func:`gather_slice_stats` de-duplicates it."""

    fname: str
    slice_num: int
    error: list[float]
    energy: list[float]


def _blocks(names) -> list[str]:
    """Top-level blocks of a model's parameter names: ``model.cascades.3`` for a ModuleList item, else
    ``model.sens_net``."""
    blocks = []
    for name in names:
        parts = name.split(".")
        depth = 3 if len(parts) > 3 and parts[2].isdigit() else 2
        block = ".".join(parts[:depth]) if len(parts) > depth else parts[0]
        if block not in blocks:
            blocks.append(block)
    return blocks


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _number(value: float) -> float | None:
    """JSON has no NaN: an undefined value becomes ``None``."""
    return float(value) if math.isfinite(value) else None


def measurements(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The probe measurements of a ``diagnostics.json`` history, without the validation records."""
    return [record for record in history if "weight_change" in record]


def plot_diagnostics(document: dict[str, Any], path: Path) -> None:
    """Three panels from ``diagnostics.json``'s content: the probe's NMSE per band over the steps, the regime
    measures over the steps, and the validation split's NMSE per band at each validation. Drawn on a figure of its
    own Agg canvas: pyplot's backend and figures (a notebook's inline plots) are left as they are."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = measurements(document["history"])
    validations = [r for r in document["history"] if "val_band_nmse" in r]
    num_bands = document["num_bands"]
    colors = colormaps["viridis"](np.linspace(0, 0.9, num_bands))
    fig = Figure(figsize=(16, 4.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    steps = [r["step"] for r in records]
    for band in range(num_bands):
        values = [np.nan if r["band_nmse"] is None or r["band_nmse"][band] is None else r["band_nmse"][band]
                  for r in records]
        axes[0].plot(steps, values, color=colors[band], marker=".", label=f"band {band}")
    axes[0].set(yscale="log", xlabel="optimizer step", ylabel="NMSE in band",
                title=f"probe ({document['probe_split']}): error per k-space band")
    axes[0].legend(fontsize=7, ncol=2, title="0 = DC", title_fontsize=7)
    for key, label in (("weight_change", "‖θ−θ₀‖/‖θ₀‖"), ("ntk_distance", "NTK distance"),
                       ("linearization_error", "linearisation error")):
        axes[1].plot(steps, [np.nan if r[key] is None else r[key] for r in records], marker=".", label=label)
    title = "lazy vs feature learning"
    if records and records[-1]["regime"] is not None:
        title += f": {records[-1]['regime']} at step {records[-1]['step']}"
    axes[1].set(xlabel="optimizer step", title=title)
    axes[1].legend(fontsize=8)
    shades = colormaps["plasma"](np.linspace(0, 0.85, max(len(validations), 1)))
    for shade, r in zip(shades, validations):
        values = [np.nan if v is None else v for v in r["val_band_nmse"]]
        axes[2].plot(range(num_bands), values, color=shade, marker="o", label=f"step {r['step']}")
    axes[2].set(yscale="log", xlabel="k-space band (0 = DC)", ylabel="NMSE in band",
                title="validation split: error per band")
    if validations:
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=90)
