"""``ReconModule``: the one Lightning 2 base for every reconstruction model reconkit trains.

A subclass builds ``self.model`` (through :func:`reconkit.models.build_model`, so the checkpoint can be rebuilt
without this code) and implements :meth:`ReconModule.images`, which turns a batch into magnitude images in the
target's units, cropped to the target's recon size. Everything else lives here once:

* loss: SSIM loss (``reconkit.metrics.SSIMLoss``, data range = the volume's ``max``) or L1 scaled by ``max``;
* Adam with a step (per epoch) or cosine (per optimizer step) learning-rate schedule;
* validation / test: per-slice statistics keyed by ``(fname, slice_num)``, gathered across ranks, combined
  into **per-volume** NMSE / PSNR / SSIM (:mod:`reconkit.training.volume_metrics`) and logged as
  ``val_nmse`` / ``val_psnr`` / ``val_ssim`` (``test_*`` for the test loop);
* a few target / reconstruction / error images to TensorBoard;
* ``checkpoint["reconkit"]`` (the checkpoint contract in ``docs/architecture.md``).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning_utilities.core.apply_func import apply_to_collection

from reconkit.data.ssdu import SsduSample
from reconkit.errors import ConfigError, ReconkitError, ReconkitWarning
from reconkit.io.metrics_csv import write_metrics_csv
from reconkit.metrics import SSIMLoss
from reconkit.training.volume_metrics import (
    SliceStats,
    gather_slice_stats,
    mean_over_volumes,
    slice_stats,
    volume_metrics,
)

LOSSES = ("ssim", "l1")
LR_SCHEDULERS = ("step", "cosine", "none")


class Images(NamedTuple):
    """A batch reduced to magnitude images in target units, cropped to the target's recon size.

    output: ``(B, h, w)`` reconstruction; target: ``(B, h, w)`` reference or ``None`` when the split has no
    targets; max_value: ``(B,)`` each slice's volume maximum (data range); fname: ``B`` file names;
    slice_num: ``(B,)`` slice indices.
    """

    output: torch.Tensor
    target: torch.Tensor | None
    max_value: torch.Tensor
    fname: list[str]
    slice_num: torch.Tensor


class ReconModule(LightningModule):
    """Base Lightning module: loss, optimiser, per-volume evaluation, image logging, checkpoint metadata.

    Subclasses set ``self.model``, ``self.model_type``, ``self.model_kwargs`` and ``self.normalization`` and
    implement :meth:`images`.
    """

    model: torch.nn.Module
    model_type: str
    model_kwargs: dict[str, Any]
    normalization: str
    # constructor arguments a subclass fills in for its parent: left out of hparams so that
    # ``load_from_checkpoint`` calls the subclass with its own signature only
    derived_hparams: tuple[str, ...] = ()

    def __init__(
        self,
        loss: str = "ssim",
        lr: float = 3e-4,
        lr_scheduler: str = "step",
        lr_step_size: int = 40,
        lr_gamma: float = 0.1,
        weight_decay: float = 0.0,
        num_log_images: int = 4,
    ):
        """
        Args:
            loss: ``"ssim"`` (1 - SSIM, fastMRI's VarNet loss) or ``"l1"`` (mean |output - target| / max).
            lr: Adam learning rate.
            lr_scheduler: ``"step"`` (multiply by ``lr_gamma`` every ``lr_step_size`` epochs), ``"cosine"``
                (cosine decay to 0 over all optimizer steps of the run) or ``"none"``.
            lr_step_size: epochs between step decays.
            lr_gamma: step decay factor.
            weight_decay: Adam weight decay.
            num_log_images: validation slices (first slice of the first batches) logged to TensorBoard.
        """
        super().__init__()
        if loss not in LOSSES:
            raise ConfigError(f"loss must be one of {LOSSES}, got {loss!r}")
        if lr_scheduler not in LR_SCHEDULERS:
            raise ConfigError(f"lr_scheduler must be one of {LR_SCHEDULERS}, got {lr_scheduler!r}")
        # NaN and inf passed (an infinite lr or weight_decay made every weight NaN or infinite after the first step)
        if not (0 < lr < math.inf and 0 <= weight_decay < math.inf and lr_step_size >= 1 and 0 < lr_gamma < math.inf):
            raise ConfigError(f"lr and lr_gamma must be positive, weight_decay >= 0 and lr_step_size >= 1 (finite "
                              f"numbers); got lr={lr}, "
                              f"lr_gamma={lr_gamma}, weight_decay={weight_decay}, lr_step_size={lr_step_size}")
        self.save_hyperparameters(ignore=list(self.derived_hparams))
        self.ssim_loss = SSIMLoss()
        self._slice_records: list[SliceStats] = []
        self.last_volume_metrics: dict[str, dict[str, float]] = {}

    # --- subclass hook -------------------------------------------------------------------------------------
    def images(self, batch: Any) -> Images:
        """Run the model on ``batch`` and return cropped magnitude images in target units."""
        raise NotImplementedError

    # --- loss ------------------------------------------------------------------------------------------------
    def compute_loss(self, images: Images) -> torch.Tensor:
        """Scalar loss between ``images.output`` and ``images.target`` (both ``(B, h, w)``)."""
        if images.target is None:
            raise ReconkitError("this batch has no target images; training and validation need fully sampled data")
        max_value = images.max_value.to(images.output)
        if self.hparams.loss == "ssim":
            return self.ssim_loss(images.output.unsqueeze(1), images.target.unsqueeze(1), data_range=max_value)
        scale = max_value.view(-1, 1, 1)
        return torch.nn.functional.l1_loss(images.output / scale, images.target / scale)

    # --- batches ---------------------------------------------------------------------------------------------
    def in_weights_dtype(self, batch: Any) -> Any:
        """``batch`` with its floating-point tensors in the weights' dtype, as every step (and the diagnostics'
        probe) gives it to the model. The data come as float32 (fastMRI's transforms); a module made after
        ``torch.set_default_dtype(torch.float64)`` has float64 weights, which refused them ("expected scalar type
        Float but found Double"): it trains, validates and predicts in float64, as with
        ``Trainer(precision="64-true")``. Masks (bool), slice numbers and ``num_low_frequencies`` (integers) are
        left as they are. Not Lightning's ``on_after_batch_transfer``, which warns whenever a data module is passed
        that does not override it too."""
        dtype = next((p.dtype for p in self.parameters() if p.is_floating_point()), self.dtype)
        return apply_to_collection(batch, torch.Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t)

    # --- loops -----------------------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if isinstance(batch, SsduSample):
            raise ConfigError(f"{type(self).__name__} got an SSDU training batch (data.train_transform "
                              "SsduVarNetTransform, which holds no target): train it with --model "
                              "reconkit.training.SsduVarNetModule (configs/varnet_sim_small_ssdu.yaml)")
        images = self.images(self.in_weights_dtype(batch))
        loss = self.compute_loss(images)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(images.fname))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Images:
        """Records the batch's per-slice statistics; returns its images for callbacks (``TrainingDiagnostics``)."""
        return self._evaluation_step(batch, batch_idx, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Images:
        return self._evaluation_step(batch, batch_idx, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        """Reconstructions ``(B, h, w)`` with their ``fname`` and ``slice_num`` (targets not needed)."""
        images = self.images(self.in_weights_dtype(batch))
        return {"fname": list(images.fname), "slice_num": images.slice_num.cpu(), "output": images.output.cpu()}

    def on_validation_epoch_start(self) -> None:
        self._slice_records = []

    def on_test_epoch_start(self) -> None:
        self._slice_records = []

    def on_validation_epoch_end(self) -> None:
        self._log_volume_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_volume_metrics("test")
        folder = next((lg.log_dir for lg in self.loggers if isinstance(lg, CSVLogger)), self.trainer.log_dir)
        if self.trainer.is_global_zero and folder and self.last_volume_metrics:
            self._write_volume_csv(Path(folder) / "test_volumes.csv")  # next to the CSV logger's metrics.csv

    def _write_volume_csv(self, path: Path) -> None:
        """One row per test volume (``volume, slices, nmse, psnr_db, ssim``, the columns of ``reconkit evaluate
        --csv``) plus the ``mean`` row that the logged ``test_*`` metrics are."""
        mean = mean_over_volumes(self.last_volume_metrics)
        rows = [(name, m["num_slices"], m["nmse"], m["psnr"], m["ssim"]) for name, m in self.last_volume_metrics.items()]
        rows.append(("mean", sum(m["num_slices"] for m in self.last_volume_metrics.values()), mean["nmse"],
                     mean["psnr"], mean["ssim"]))
        write_metrics_csv(path, rows)

    def _evaluation_step(self, batch: Any, batch_idx: int, stage: str) -> Images:
        images = self.images(self.in_weights_dtype(batch))
        if images.target is None:
            raise ReconkitError(f"the {stage} split has no target images; use `reconkit train predict` for "
                                "undersampled test files")
        loss = self.compute_loss(images)
        self.log(f"{stage}_loss", loss, sync_dist=True, batch_size=len(images.fname))
        for i, fname in enumerate(images.fname):
            self._slice_records.append(
                slice_stats(images.output[i], images.target[i], float(images.max_value[i]), fname,
                            int(images.slice_num[i]))
            )
        if stage == "val" and batch_idx < self.hparams.num_log_images:
            self._log_images(images)
        return images

    def _log_volume_metrics(self, stage: str) -> None:
        records = gather_slice_stats(self._slice_records)
        self._slice_records = []
        if self.trainer.sanity_checking:
            return
        self.last_volume_metrics = volume_metrics(records)
        for name, value in mean_over_volumes(self.last_volume_metrics).items():
            # every rank holds the same gathered numbers; sync_dist only silences Lightning's DDP warning
            self.log(f"{stage}_{name}", value, sync_dist=True, prog_bar=name == "ssim")
        self.log(f"{stage}_volumes", float(len(self.last_volume_metrics)), sync_dist=True)

    def _log_images(self, images: Images) -> None:
        tensorboard = next((lg for lg in self.loggers if isinstance(lg, TensorBoardLogger)), None)
        if tensorboard is None or images.target is None:
            return
        target, output = images.target[0].detach(), images.output[0].detach()
        error = (target - output).abs()
        key = f"val_images/{images.fname[0]}_slice{int(images.slice_num[0])}"
        for name, image in (("target", target), ("reconstruction", output), ("error", error)):
            scaled = (image / image.max().clamp_min(1e-12)).clamp(0, 1).unsqueeze(0).float().cpu()
            tensorboard.experiment.add_image(f"{key}/{name}", scaled, global_step=self.global_step)

    # --- optimisation ----------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        if not any(p.requires_grad for p in self.parameters()):
            raise ConfigError(
                f"the {self.model_type} model has no trainable weights, so there is nothing to fit; score it with "
                "`reconkit train validate` / `test` (or `reconkit reconstruct --model cg-sense`) instead"
            )
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if self.hparams.lr_scheduler == "none":
            return optimizer
        if self.hparams.lr_scheduler == "step":
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, self.hparams.lr_step_size, self.hparams.lr_gamma)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
        total_steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(total_steps):
            raise ValueError("lr_scheduler='cosine' needs a finite run: set trainer.max_epochs or max_steps")
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(int(total_steps), 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        """Warn when a resumed cosine schedule does not span this run (``--trainer.max_epochs`` raised on resume):
        the restored schedule keeps its own length, so past its end the learning rate climbs the cosine again."""
        if self.hparams.lr_scheduler != "cosine" or not self.trainer.lr_scheduler_configs:
            return
        scheduler = self.trainer.lr_scheduler_configs[0].scheduler
        total = int(self.trainer.estimated_stepping_batches)
        if getattr(scheduler, "T_max", total) != max(total, 1):
            warnings.warn(ReconkitWarning(
                f"the cosine learning-rate schedule restored from the checkpoint spans {scheduler.T_max} steps, but "
                f"this run has {total}: the rate follows the restored curve (rising again after step "
                f"{scheduler.T_max}); start a new run with the checkpoint's weights for a schedule of this length"),
                stacklevel=1)

    # --- checkpoint contract ---------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["reconkit"] = {
            "model_type": self.model_type,
            "model_kwargs": dict(self.model_kwargs),
            "mask": self._mask_info(),
            "normalization": self.normalization,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse weights that do not fit this module's model (``--ckpt_path last`` builds the model from the
        configuration, not from the checkpoint) with one line naming the checkpoint and the tensors, instead of
        torch's list of every size mismatch."""
        stored = {name: tuple(value.shape) for name, value in checkpoint.get("state_dict", {}).items()}
        own = {name: tuple(value.shape) for name, value in self.state_dict().items()}
        differ = [f"{name} {list(stored[name])} (checkpoint) vs {list(own[name])}" for name in own
                  if name in stored and stored[name] != own[name]]
        missing, unexpected = sorted(set(own) - set(stored)), sorted(set(stored) - set(own))
        if self._trainer is None or not self.strict_loading:  # load_from_checkpoint(strict=False) may drop keys
            missing, unexpected = [], []
        if not differ and not missing and not unexpected:
            return
        problems = [f"{len(names)} {what}, e.g. {names[0]}" for names, what in (
            (differ, "tensors differ in shape"), (missing, "are missing"), (unexpected, "are not in the model"))
            if names]
        source = f"--ckpt_path {self._trainer.ckpt_path}" if self._trainer is not None else "the checkpoint"
        raise ConfigError(f"{source}: its weights do not fit the configured "
                          f"{type(self).__name__} ({'; '.join(problems)}): configure the model as the run that wrote "
                          "it, or pass the checkpoint file itself as --ckpt_path (its stored model arguments are "
                          "then used)")

    def _mask_info(self) -> dict[str, Any]:
        """The training data's mask settings (from the attached datamodule; ``None`` values without one)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        info = {}
        for key in ("mask_type", "center_fractions", "accelerations"):
            value = getattr(datamodule, key, None)
            info[key] = list(value) if isinstance(value, (list, tuple)) else value
        return info
