"""``FastMriDataModule``: fastMRI-layout folders (``train/``, ``val/``, ``test/``) as Lightning dataloaders.

Training masks are random (a fresh draw per slice and epoch, like fastmri's ``use_seed=False``) but
*reproducible*: each sample's mask seed is derived from ``(seed, epoch, fname, slice_num)``, so a resumed run,
a run with more dataloader workers and a DDP run see the same masks. Validation / test masks are fixed per
volume (seeded by the file name, fastmri's ``use_seed=True``). The training shuffle is seeded by
``(seed, epoch)`` through a :class:`~torch.utils.data.DistributedSampler` (one replica without DDP), which is
what makes ``--ckpt_path last`` resume exactly at an epoch boundary.

Hooks for later features: ``train_transform`` / ``val_transform`` / ``test_transform`` replace the default
transforms (augmentation, SSDU self-supervision); ``fraction`` / ``num_volumes`` select a reproducible subset of
training volumes (data-efficiency studies).
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, Subset

from reconkit.data import SliceDataset, UnetDataTransform, VarNetDataTransform, create_mask_for_mask_type
from reconkit.errors import DataError

TRANSFORMS = ("varnet", "unet")


def select_volumes(fnames: Sequence[str], fraction: Optional[float], num_volumes: Optional[int], seed: int) -> set[str]:
    """A reproducible subset of volume names: ``num_volumes`` of them, or ``round(fraction * len)`` (at least
    one), drawn with a generator seeded by ``seed``. Subsets of one seed are nested: the 25% subset is inside the
    50% subset."""
    unique = sorted(set(fnames))
    if fraction is None and num_volumes is None:
        return set(unique)
    if fraction is not None and num_volumes is not None:
        raise ValueError("set fraction or num_volumes, not both")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        count = max(1, round(fraction * len(unique)))
    else:
        if num_volumes < 1:
            raise ValueError(f"num_volumes must be >= 1, got {num_volumes}")
        count = min(num_volumes, len(unique))
    order = torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed)).tolist()
    return {unique[i] for i in order[:count]}


class EpochSeededMasks:
    """Wraps a training transform whose ``mask_func`` draws from its own generator: reseeds that generator for
    every sample from ``(seed, epoch, fname, slice_num)`` so masks change with the epoch but not with workers,
    ranks or restarts. ``epoch`` is set by :class:`EpochSampler` before each epoch's workers start."""

    def __init__(self, transform: Callable, seed: int):
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __call__(self, kspace, mask, target, attrs, fname, slice_num):
        mask_func = getattr(self.transform, "mask_func", None)
        if mask_func is not None:
            key = f"{self.seed}:{self.epoch}:{fname}:{slice_num}".encode()
            mask_func.rng.seed(zlib.crc32(key))
        return self.transform(kspace, mask, target, attrs, fname, slice_num)


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` (shuffle seeded by ``seed + epoch``) that also tells the training transform the
    epoch. Lightning calls ``set_epoch`` before every training epoch."""

    def __init__(self, dataset: Dataset, transforms: Sequence[EpochSeededMasks], **kwargs: Any):
        super().__init__(dataset, **kwargs)
        self.transforms = list(transforms)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        for transform in self.transforms:
            transform.epoch = epoch
            # data-efficiency hook (augmentation schedule, SSDU splits): inner transforms that track the epoch
            inner_set_epoch = getattr(transform.transform, "set_epoch", None)
            if inner_set_epoch is not None:
                inner_set_epoch(epoch)


class FastMriDataModule(LightningDataModule):
    """Slices of fastMRI HDF5 files under ``data_path/{train,val,test}`` for Lightning.

    Batches are ``VarNetSample`` (``transform="varnet"``, for every k-space model) or ``UnetSample``
    (``transform="unet"``) from ``reconkit.data``; masks come from
    ``create_mask_for_mask_type(mask_type, center_fractions, accelerations)``.
    """

    def __init__(
        self,
        data_path: Path,
        challenge: str = "multicoil",
        transform: str = "varnet",
        mask_type: str = "equispaced_fraction",
        center_fractions: Sequence[float] = (0.08,),
        accelerations: Sequence[int] = (4,),
        batch_size: int = 1,
        num_workers: int = 4,
        sample_rate: Optional[float] = None,
        volume_sample_rate: Optional[float] = None,
        val_sample_rate: Optional[float] = None,
        val_volume_sample_rate: Optional[float] = None,
        use_dataset_cache: bool = False,
        combine_train_val: bool = False,
        fraction: Optional[float] = None,
        num_volumes: Optional[int] = None,
        seed: int = 0,
        test_split: str = "test",
        train_transform: Optional[Callable] = None,
        val_transform: Optional[Callable] = None,
        test_transform: Optional[Callable] = None,
    ):
        """
        Args:
            data_path: folder holding ``train/``, ``val/`` and ``test/`` with fastMRI ``.h5`` files.
            challenge: ``"multicoil"`` or ``"singlecoil"``.
            transform: default transforms, ``"varnet"`` (masked k-space) or ``"unet"`` (zero-filled image).
            mask_type, center_fractions, accelerations: mask family and its parameters (paired lists).
            batch_size: slices per batch (per device under DDP).
            num_workers: dataloader worker processes.
            sample_rate / volume_sample_rate: fraction of training slices / volumes (as ``SliceDataset``).
            val_sample_rate / val_volume_sample_rate: the same for validation and test.
            use_dataset_cache: cache the per-file slice index (``SliceDataset``'s cache file).
            combine_train_val: train on train + val (for a final model); validation still runs on val.
            fraction / num_volumes: reproducible subset of training volumes (``select_volumes``), seeded by seed.
            seed: seed for the training subset, shuffle order and training masks.
            test_split: subfolder used by ``test`` and ``predict``.
            train_transform / val_transform / test_transform: replace the default transform of a split
                (a callable taking SliceDataset's sample tuple); a replacement training transform with a
                ``mask_func`` still gets reproducible per-epoch masks.
        """
        super().__init__()
        if transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
        if len(center_fractions) != len(accelerations):
            raise ValueError("center_fractions and accelerations must have the same length (paired)")
        select_volumes([], fraction, num_volumes, seed)  # validate early
        self.data_path = Path(data_path)
        self.challenge = challenge
        self.transform = transform
        self.mask_type = mask_type
        self.center_fractions = list(center_fractions)
        self.accelerations = list(accelerations)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.sample_rate = sample_rate
        self.volume_sample_rate = volume_sample_rate
        self.val_sample_rate = val_sample_rate
        self.val_volume_sample_rate = val_volume_sample_rate
        self.use_dataset_cache = use_dataset_cache
        self.combine_train_val = combine_train_val
        self.fraction = fraction
        self.num_volumes = num_volumes
        self.seed = seed
        self.test_split = test_split
        self.transform_overrides = {"train": train_transform, "val": val_transform, "test": test_transform}

    # --- transforms and datasets ---------------------------------------------------------------------------
    def default_transform(self, split: str) -> Callable:
        """The default transform for ``split``: random masks for training, per-volume fixed masks otherwise."""
        mask_func = create_mask_for_mask_type(self.mask_type, self.center_fractions, self.accelerations)
        use_seed = split != "train"
        if self.transform == "varnet":
            return VarNetDataTransform(mask_func=mask_func, use_seed=use_seed)
        return UnetDataTransform(self.challenge, mask_func=mask_func, use_seed=use_seed)

    def split_dir(self, split: str) -> Path:
        folder = self.data_path / split
        if not folder.is_dir():
            raise DataError(folder, f"missing the {split!r} folder (expected {self.data_path}/{{train,val,test}})")
        return folder

    def slice_dataset(self, split: str, transform: Callable, sample_rate: Optional[float],
                      volume_sample_rate: Optional[float]) -> SliceDataset:
        return SliceDataset(
            root=self.split_dir(split),
            challenge=self.challenge,
            transform=transform,
            use_dataset_cache=self.use_dataset_cache,
            sample_rate=sample_rate,
            volume_sample_rate=volume_sample_rate,
        )

    def train_dataset(self) -> tuple[Dataset, list[EpochSeededMasks]]:
        """The training dataset (subset and combined with val as configured) and its epoch-seeded transforms."""
        splits = ["train", "val"] if self.combine_train_val else ["train"]
        parts, transforms = [], []
        for split in splits:
            transform = EpochSeededMasks(self.transform_overrides["train"] or self.default_transform("train"), self.seed)
            dataset = self.slice_dataset(split, transform, self.sample_rate, self.volume_sample_rate)
            parts.append(dataset)
            transforms.append(transform)
        dataset = parts[0] if len(parts) == 1 else ConcatDataset(parts)
        fnames = [name for part in parts for name in self._slice_fnames(part)]
        keep = select_volumes(fnames, self.fraction, self.num_volumes, self.seed)
        if len(keep) < len(set(fnames)):
            dataset = Subset(dataset, [i for i, name in enumerate(fnames) if name in keep])
        return dataset, transforms

    @staticmethod
    def _slice_fnames(dataset: SliceDataset) -> list[str]:
        """File name of every slice of ``dataset``, in index order."""
        return [Path(sample.fname).name for sample in dataset.raw_samples]

    def eval_dataset(self, split: str) -> SliceDataset:
        transform = self.transform_overrides[split if split in ("val", "test") else "test"]
        return self.slice_dataset(split, transform or self.default_transform(split), self.val_sample_rate,
                                  self.val_volume_sample_rate)

    # --- dataloaders ---------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        dataset, transforms = self.train_dataset()
        world_size = self.trainer.world_size if self.trainer is not None else 1
        rank = self.trainer.global_rank if self.trainer is not None else 0
        sampler = EpochSampler(dataset, transforms, num_replicas=world_size, rank=rank, shuffle=True, seed=self.seed)
        return self._loader(dataset, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_dataset("val"))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.eval_dataset(self.test_split))

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.eval_dataset(self.test_split))

    def _loader(self, dataset: Dataset, sampler: Optional[torch.utils.data.Sampler] = None) -> DataLoader:
        # val/test: Lightning adds a DistributedSampler under DDP; per-volume metrics are gathered across ranks
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, shuffle=False,
                          num_workers=self.num_workers, persistent_workers=False)
