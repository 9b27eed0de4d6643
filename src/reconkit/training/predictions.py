"""``reconkit train predict`` output: one fastMRI submission file per volume.

:class:`PredictionWriter` collects the ``predict_step`` outputs (``fname``, ``slice_num``, ``output`` ``(B, h, w)``)
and writes ``<dirpath>/<file name>`` with a float32 ``reconstruction`` ``(slices, h, w)`` in slice order, cropped to
the recon size: the layout fastMRI's evaluation and ``reconkit evaluate`` read. In one process a volume is written
as soon as all its slices are predicted, so memory holds the volumes in progress, not the whole split. Under DDP the
slices of a volume may come from several ranks; rank 0 gathers them at the end of the pass and writes. Volumes left
incomplete (a pass cut short) are written at the end with what was predicted. Each file is written atomically.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed
from lightning.pytorch import Callback, LightningModule, Trainer

from reconkit.io.hdf5 import write_fastmri_h5

__all__ = ["PredictionWriter"]

logger = logging.getLogger(__name__)


class PredictionWriter(Callback):
    """Write the predicted volumes as fastMRI submission files under ``dirpath``.

    Args:
        dirpath: output folder (``reconkit train predict`` sets ``<trainer.default_root_dir>/predictions``).
    """

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath
        self._slices: dict[str, dict[int, np.ndarray]] = {}
        self._file_slices: dict[str, int] = {}  # slice count of each file the predict loaders read
        self.written: list[Path] = []

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._slices, self.written = {}, []
        loaders = trainer.predict_dataloaders
        datasets = [getattr(loader, "dataset", None) for loader in (loaders if isinstance(loaders, list) else [loaders])]
        self._file_slices = {Path(fname).name: count for dataset in datasets
                             for fname, count in getattr(dataset, "num_slices", {}).items()}

    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        images = outputs["output"].float().cpu().numpy()
        names = set()
        for fname, slice_num, image in zip(outputs["fname"], outputs["slice_num"].tolist(), images):
            names.add(Path(fname).name)
            self._slices.setdefault(Path(fname).name, {})[int(slice_num)] = image.copy()  # not a view of the batch
        if trainer.world_size > 1:  # other ranks hold slices of the same volumes: written at the end of the pass
            return
        for name in sorted(names):
            if sorted(self._slices[name]) == list(range(self._file_slices.get(name, -1))):
                self._write(name, self._slices.pop(name))

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        volumes = self._slices
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[dict[str, dict[int, np.ndarray]] | None] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, volumes)
            volumes = {}
            for part in gathered:
                for name, slices in (part or {}).items():
                    volumes.setdefault(name, {}).update(slices)
        if not trainer.is_global_zero:
            return
        if self.dirpath is None:
            raise ValueError("PredictionWriter: dirpath is not set")
        for name, slices in sorted(volumes.items()):
            self._write(name, slices)
        self._slices = {}
        folder = Path(self.dirpath)
        logger.info("wrote %d predicted volume(s) to %s", len(self.written), folder)
        print(f"reconkit train predict: wrote {len(self.written)} volume(s) to {folder}/ (fastMRI submission layout)")

    def _write(self, name: str, slices: dict[int, np.ndarray]) -> None:
        """Write one volume from its predicted ``{slice_num: (h, w) image}``, warning when slices are missing."""
        if self.dirpath is None:
            raise ValueError("PredictionWriter: dirpath is not set")
        order = sorted(slices)
        expected = self._file_slices.get(name, len(order))
        if order != list(range(expected)):
            logger.warning("%s: %d of the file's %d slices were predicted (%s); the written volume holds only "
                           "those (limit_predict_batches or a slice sample rate cut the pass short)", name,
                           len(order), expected, ", ".join(map(str, order)))
        self.written.append(write_fastmri_h5(Path(self.dirpath) / name, np.stack([slices[i] for i in order])))
