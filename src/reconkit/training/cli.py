"""LightningCLI wiring for ``reconkit train``: subcommands fit / validate / test / predict, YAML configs.

Defaults added on top of Lightning's: seed 0, a Rich progress bar, a learning-rate monitor, TensorBoard + CSV
loggers under ``trainer.default_root_dir`` (``outputs/``: ``tensorboard/version_N``, ``csv/version_N``), a
:class:`~lightning.pytorch.callbacks.ModelCheckpoint` (``checkpoint.*``) writing ``<root>/checkpoints/``: the best
model by per-volume validation SSIM plus ``last.ckpt``, which ``--ckpt_path last`` resumes from, and
:class:`~reconkit.training.diagnostics.TrainingDiagnostics` (``diagnostics.*``, off until
``--diagnostics.every_n_steps N``) writing ``<root>/diagnostics/``, and
:class:`~reconkit.training.predictions.PredictionWriter` (``predictions.*``): ``predict`` writes one fastMRI
submission file per volume to ``<root>/predictions/``, and :class:`CliWarningFormat`: warnings of the ranks
``--trainer.strategy ddp_spawn`` starts in the command's one-line format.
"""

from __future__ import annotations

import argparse
import copy
import pickle
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.distributed
from jsonargparse import DefaultHelpFormatter, Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback

from reconkit.errors import ConfigError, ReconkitError, ReconkitWarning, format_warning
from reconkit.models import check_checkpoint_file
from reconkit.models.registry import weights_only_refusal
from reconkit.training.base import ReconModule
from reconkit.training.datamodule import FastMriDataModule
from reconkit.training.diagnostics import TrainingDiagnostics
from reconkit.training.predictions import PredictionWriter

DESCRIPTION = """Train, validate, test or predict a reconkit model with Lightning.

examples:
  reconkit train fit --config configs/varnet_sim_small.yaml
  reconkit train fit --config configs/varnet_sim_small.yaml --ckpt_path last          # resume exactly
  reconkit train fit --config configs/varnet_multicoil.yaml --data.data_path /data/knee --trainer.devices 8
  reconkit train fit --config configs/vit_multicoil.yaml --data.data_path /data/knee    # ViT baseline (unet: U-Net)
  reconkit train fit --config configs/varnet_sim_small.yaml --diagnostics.every_n_steps 25
      # spectral bias per k-space band and lazy vs feature-learning measures -> outputs/.../diagnostics/
  reconkit train test --config configs/varnet_sim_small.yaml --ckpt_path outputs/varnet_sim_small/checkpoints/last.ckpt
  reconkit train test --config configs/varnet_sim_small.yaml --model reconkit.training.KspaceModule \\
      --model.model_type zero_filled                                                  # classical baseline
  reconkit train predict --config configs/varnet_sim_small.yaml --ckpt_path outputs/varnet_sim_small/checkpoints/last.ckpt
      # reconstructs the test split (targets not needed) -> outputs/varnet_sim_small/predictions/<file>.h5
"""

# logger class -> folder under default_root_dir (separate folders, so both number their versions alike)
LOGGERS = {"lightning.pytorch.loggers.TensorBoardLogger": "tensorboard", "lightning.pytorch.loggers.CSVLogger": "csv"}


class CliWarningFormat(Callback):
    """Prints warnings in the ranks that ``--trainer.strategy ddp_spawn`` starts as the ``reconkit`` command does
    (:func:`reconkit.errors.format_warning`: reconkit's own in one line, control characters escaped).

    Those ranks are new interpreters, which kept Python's ``warnings.formatwarning`` (a ReconkitWarning naming a file
    printed as two lines with the file name's control characters raw). They receive the trainer, this callback
    included, pickled: unpickling it installs the format there, before the data module's ``prepare_data`` /
    ``setup`` (whose warnings name files) run. The ``ddp`` strategy re-runs the command and a forked rank inherits
    the format, so both already have it. Only ``reconkit train`` adds this callback: ``Trainer`` users keep theirs.
    """

    def __reduce__(self) -> tuple:
        return _cli_warning_format, ()


def _cli_warning_format() -> CliWarningFormat:
    """A :class:`CliWarningFormat` unpickled in a process: installs the CLI's warning format there."""
    warnings.formatwarning = format_warning
    return CliWarningFormat()


class _HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help formatter that keeps the description's line breaks (the examples)."""


class ReconLightningCLI(LightningCLI):
    """LightningCLI over :class:`ReconModule` subclasses (``--model VarNetModule``) and
    :class:`FastMriDataModule`, with a best-SSIM + last checkpoint callback configurable as ``checkpoint.*``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # Lightning's save_last only writes last.ckpt when the monitored checkpoint improves, so the latest
        # state is kept by a second, unmonitored callback writing <dirpath>/last.ckpt after every validation
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.add_lightning_class_args(TrainingDiagnostics, "diagnostics")  # off until every_n_steps > 0
        parser.add_lightning_class_args(PredictionWriter, "predictions")  # acts in `predict` only
        parser.set_defaults({
            "trainer.default_root_dir": "outputs",
            "checkpoint.monitor": "val_ssim",
            "checkpoint.mode": "max",
            "checkpoint.save_top_k": 1,
            "checkpoint.filename": "best-epoch{epoch:03d}-val_ssim{val_ssim:.4f}",
            "checkpoint.auto_insert_metric_name": False,
            "last_checkpoint.filename": "last",
            "last_checkpoint.save_top_k": 1,
            "last_checkpoint.enable_version_counter": False,
        })

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Lightning's parsing, without its warning about ``args`` given while ``sys.argv`` has arguments too:
        ``reconkit train ...`` passes its own arguments while ``sys.argv`` still holds the whole command line, which
        DDP's launcher re-runs in the child processes (each parses there again), so ``sys.argv`` stays as it is. The
        warning filter lasts for the parsing only: one left in place muted the message for the rest of the process
        (a notebook that called :func:`run_cli`)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within")
            super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Lightning's LightningCLI replaces the model's configuration by the hyperparameters stored in a
        ``--ckpt_path`` file (not for ``--ckpt_path last``), silently overriding ``--model`` and ``--model.*``.
        Refuse a checkpoint of another module class than the configuration names (or a truncated file), and warn
        which configured model arguments the checkpoint's values replace."""
        subcommand = self.config.get("subcommand")
        section = self.config.get(subcommand) if subcommand else None
        before = copy.deepcopy(section.get("model")) if section is not None else None
        ckpt_path = section.get("ckpt_path") if section is not None else None
        if ckpt_path and Path(ckpt_path).is_file():
            check_checkpoint_file(ckpt_path)  # a cut-short file: one line naming it, not torch's OSError traceback
        try:
            super()._parse_ckpt_path()  # reads the file weights-only
        except pickle.UnpicklingError as exc:  # a crafted file, or one pickling other objects: one line, no traceback
            raise weights_only_refusal(ckpt_path, exc) from None
        section = self.config.get(subcommand) if subcommand else None
        after = section.get("model") if section is not None else None
        if before is None or after is None or before == after:
            return
        before_class, after_class = before.get("class_path"), after.get("class_path")
        if before_class != after_class:
            raise ConfigError(f"--ckpt_path {ckpt_path} holds a {after_class} but the configuration (--model / "
                              f"--config) names {before_class}: pass --model {after_class} (or the checkpoint "
                              "of a model of the configured class)")
        old_args, new_args = before.get("init_args") or {}, after.get("init_args") or {}
        old_args = old_args.as_dict() if hasattr(old_args, "as_dict") else dict(old_args)
        new_args = new_args.as_dict() if hasattr(new_args, "as_dict") else dict(new_args)
        changed = [f"{key} {old_args.get(key)!r} -> {new_args.get(key)!r}"
                   for key in sorted(set(old_args) | set(new_args)) if old_args.get(key) != new_args.get(key)]
        if changed:
            warnings.warn(ReconkitWarning(
                f"--ckpt_path {ckpt_path}: the model arguments stored in the checkpoint replace the configured ones "
                f"(LightningCLI's rule; --model.* options are ignored with a checkpoint file): {', '.join(changed)}"),
                stacklevel=1)

    def before_instantiate_classes(self) -> None:
        """Defaults that depend on ``trainer.default_root_dir``: loggers (unless the config names some) and the
        checkpoint folder (unless ``checkpoint.dirpath`` is set), fixed so that ``--ckpt_path last`` finds it
        (``--ckpt_path best``, which Lightning resolves only after a fit in the same process, is refused naming the
        files there).
        ``--trainer.enable_progress_bar false`` drops the default progress bar (Lightning refuses the pair).
        ``predict`` defaults to ``--return_predictions false``: :class:`PredictionWriter` writes the volumes, and
        Lightning's list of every batch's output would grow with the whole split."""
        config = self.config.get(str(self.subcommand), self.config)
        # the config.yaml saved next to the logs keeps these defaults unset, so that a run from it with another
        # --trainer.default_root_dir writes there instead of over the first run's checkpoints and logs
        self._config_as_given = copy.deepcopy(config)
        if config.trainer.enable_progress_bar is False:
            self.trainer_defaults["callbacks"] = [
                callback for callback in self.trainer_defaults["callbacks"] if not isinstance(callback, RichProgressBar)
            ]
        root = config.trainer.default_root_dir or "outputs"
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = f"{root}/checkpoints"
        if config.last_checkpoint.dirpath is None:
            config.last_checkpoint.dirpath = config.checkpoint.dirpath
        last = Path(config.last_checkpoint.dirpath) / f"{config.last_checkpoint.filename}.ckpt"
        if config.get("ckpt_path") == "last" and last.is_file():
            check_checkpoint_file(last)  # the file Lightning resumes from: a cut-short one is named in one line
        if config.get("ckpt_path") == "best":  # Lightning's "best" is only known in the process that ran the fit
            found = sorted(str(path) for path in Path(config.checkpoint.dirpath).glob("*.ckpt") if path != last)
            raise ConfigError("--ckpt_path best names the best checkpoint of a fit run in the same process, which a "
                              "`reconkit train` command is not: pass the checkpoint file" +
                              (f" ({', '.join(found)})" if found else f" (none in {config.checkpoint.dirpath})"))
        if config.last_checkpoint.save_on_train_epoch_end is None and config.trainer.check_val_every_n_epoch not in (
                None, 1):
            # Lightning's ModelCheckpoint then saves only after a validation, so the epochs after the last validated
            # one (check_val_every_n_epoch 2, max_epochs 3: epoch 2) would be missing from last.ckpt
            config.last_checkpoint.save_on_train_epoch_end = True
        if config.diagnostics.dirpath is None:
            config.diagnostics.dirpath = f"{root}/diagnostics"
        if config.predictions.dirpath is None:
            config.predictions.dirpath = f"{root}/predictions"
        if self.subcommand == "predict" and config.get("return_predictions") is None:
            config.return_predictions = False  # the files are the result: Lightning would keep every batch's output
        if config.trainer.logger in (None, True):
            config.trainer.logger = [
                Namespace(class_path=cls, init_args=Namespace(save_dir=root, name=name))
                for cls, name in LOGGERS.items()
            ]

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        """``--trainer.enable_checkpointing false`` leaves out the ``checkpoint`` / ``last_checkpoint`` callbacks
        (Lightning refuses a ModelCheckpoint callback with it). The ``config.yaml`` that Lightning saves with the logs
        is the configuration as given, without the folders :meth:`before_instantiate_classes` derives from
        ``trainer.default_root_dir``. Trainer options Lightning refuses (an accelerator this machine lacks, e.g.
        ``--trainer.accelerator gpu`` without a GPU, or an unknown name) are a :class:`ConfigError`: one line."""
        if config.get("enable_checkpointing") is False:
            callbacks = [callback for callback in callbacks if not isinstance(callback, ModelCheckpoint)]
        try:
            trainer = super()._instantiate_trainer(config, callbacks)
        except ReconkitError:
            raise
        except (MisconfigurationException, ValueError) as err:
            raise ConfigError(f"--trainer options (accelerator {config.get('accelerator')!r}, devices "
                              f"{config.get('devices')!r}): {' '.join(str(err).split())}") from None
        for callback in trainer.callbacks:
            if isinstance(callback, SaveConfigCallback):
                callback.config = self._config_as_given
        return trainer


def run_cli(args: Sequence[str] | None = None, run: bool = True) -> ReconLightningCLI:
    """Build (and with ``run`` execute) the CLI on ``args`` (``sys.argv`` when ``None``)."""
    cli = ReconLightningCLI(
        ReconModule,
        FastMriDataModule,
        subclass_mode_model=True,
        seed_everything_default=0,
        # progress bar (off with --trainer.enable_progress_bar false), learning-rate logging, the CLI's warnings in
        # ddp_spawn's ranks
        trainer_defaults={"callbacks": [RichProgressBar(), LearningRateMonitor(logging_interval="step"),
                                        CliWarningFormat()]},
        # `reconkit train fit --help` (what the README points to) shows the examples too, not only Lightning's
        # one-line "Runs the full optimization routine."
        parser_kwargs={"description": DESCRIPTION, "prog": "reconkit train", "formatter_class": _HelpFormatter,
                       **{name: {"description": DESCRIPTION, "formatter_class": _HelpFormatter}
                          for name in ReconLightningCLI.subcommands()}},
        args=None if args is None else list(args),
        run=run,
    )
    if run:
        _destroy_process_group()
    return cli


def _destroy_process_group() -> None:
    """Shut down this process's distributed process group after a finished run (DDP, gloo or NCCL).

    Lightning destroys it at exit only for NCCL; a gloo group left to interpreter finalisation can abort the process
    ("terminate called without an active exception", SIGABRT: pytorch/pytorch#190489), which turned a successful
    torchrun validation into a failed one. Called only after success: on an error other ranks may still be inside a
    collective, and destroying the group then can hang.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
