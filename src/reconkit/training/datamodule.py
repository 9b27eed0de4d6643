"""``FastMriDataModule``: fastMRI-layout folders (``train/``, ``val/``, ``test/``) as Lightning dataloaders.

Training masks are random (a fresh draw per slice and epoch, like fastmri's ``use_seed=False``) but
*reproducible*: each sample's mask seed is derived from ``(seed, epoch, fname, slice_num)``, the epoch travelling
with the sample index, so a resumed run, a run with more dataloader workers and a DDP run see the same masks.
Validation / test masks are fixed per volume (seeded by the file name, fastmri's ``use_seed=True``). The
training shuffle is seeded by ``(seed, epoch)`` through a :class:`~torch.utils.data.DistributedSampler` (one
replica without DDP), which is what makes ``--ckpt_path last`` resume exactly at an epoch boundary.

Data that mixes coil counts or matrix sizes (fastMRI's brain set: 4–20 coils, several matrix sizes) trains with
``batch_size > 1``: the training sampler then forms every batch from slices of one shape
(:func:`shape_grouped_batches`), and validation / test fall back to one slice per batch.

Hooks for later features: ``train_transform`` / ``val_transform`` / ``test_transform`` replace the default
transforms (augmentation, SSDU self-supervision); ``fraction`` / ``num_volumes`` select a reproducible subset of
training volumes (data-efficiency studies).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import warnings
import zlib
from collections.abc import Callable, Hashable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from lightning.pytorch import LightningDataModule
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, Subset, default_collate

from reconkit.data import (
    SliceDataset,
    UnetDataTransform,
    VarNetDataTransform,
    create_mask_for_mask_type,
    list_volume_files,
    target_key,
)
from reconkit.data.augment import AugmentedVarNetTransform
from reconkit.data.slice_dataset import check_sample_rates
from reconkit.data.ssdu import SsduVarNetTransform
from reconkit.errors import ConfigError, DataError, ReconkitError, ReconkitWarning, check_number, printable

TRANSFORMS = ("varnet", "unet")

logger = logging.getLogger(__name__)


def collate_slices(samples: list) -> Any:
    """``default_collate``, except that slices whose tensors differ in shape (a dataset mixing coil counts or
    matrix sizes, batched with ``batch_size > 1``) raise a :class:`ReconkitError` naming the slices and the fix,
    instead of torch's size error (or, in a worker process, its shared-memory resize error)."""
    first = samples[0]
    if isinstance(first, tuple):  # the NamedTuple samples of the transforms
        for i, value in enumerate(first):
            if not isinstance(value, torch.Tensor):
                continue
            for other in samples[1:]:
                if isinstance(other[i], torch.Tensor) and other[i].shape != value.shape:
                    field = first._fields[i] if hasattr(first, "_fields") else f"field {i}"
                    raise ReconkitError(
                        f"cannot batch slices {_slice_name(first)} and {_slice_name(other)}: their {field} shapes "
                        f"differ ({list(value.shape)} vs {list(other[i].shape)}); batch only slices of one shape "
                        f"(FastMriDataModule's loaders do, see shape_grouped_batches) or use --data.batch_size 1"
                    )
    return default_collate(samples)


def _slice_name(sample: Any) -> str:
    return f"{getattr(sample, 'fname', '?')}[{getattr(sample, 'slice_num', '?')}]"


def select_volumes(fnames: Sequence[str], fraction: float | None, num_volumes: int | None, seed: int) -> set[str]:
    """A reproducible subset of volume names: ``num_volumes`` of them, or ``round(fraction * len)`` (at least
    one), drawn with a generator seeded by ``seed``. Subsets of one seed are nested: the 25% subset is inside the
    50% subset."""
    unique = sorted(set(fnames))
    if fraction is None and num_volumes is None:
        return set(unique)
    if fraction is not None and num_volumes is not None:
        raise ConfigError("set fraction or num_volumes, not both")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ConfigError(f"fraction must be in (0, 1], got {fraction}")
        count = max(1, round(fraction * len(unique)))
    else:
        if num_volumes < 1:
            raise ConfigError(f"num_volumes must be >= 1, got {num_volumes}")
        count = min(num_volumes, len(unique))
    order = torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed)).tolist()
    return {unique[i] for i in order[:count]}


class EpochSeededMasks:
    """Wraps a training transform whose ``mask_func`` draws from its own generator: reseeds that generator for
    every sample from ``(seed, epoch, fname, slice_num)`` so masks change with the epoch but not with workers,
    ranks or restarts. ``epoch`` and ``step`` (training batches before this sample's batch, over all epochs) are
    set by :class:`EpochTaggedDataset` from the index it is asked for."""

    def __init__(self, transform: Callable, seed: int):
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.step = 0

    def __call__(self, kspace, mask, target, attrs, fname, slice_num):
        # data-efficiency hook: transforms that follow the epoch or the step (augmentation schedule, SSDU splits)
        for name, value in (("set_epoch", self.epoch), ("set_step", self.step)):
            setter = getattr(self.transform, name, None)
            if setter is not None:
                setter(value)
        mask_func = getattr(self.transform, "mask_func", None)
        if mask_func is not None:
            key = f"{self.seed}:{self.epoch}:{fname}:{slice_num}".encode()
            getattr(mask_func, "reseed", mask_func.rng.seed)(zlib.crc32(key))  # reseed: kept in workers
        return self.transform(kspace, mask, target, attrs, fname, slice_num)


def shape_grouped_batches(shape_keys: Sequence[Hashable], batch_size: int, num_replicas: int = 1,
                          generator: torch.Generator | None = None) -> list[list[int]]:
    """Batches of dataset indices in which every index has the same shape key, for all replicas together.

    Indices are grouped by ``shape_keys[i]``; each group is shuffled (with ``generator``; kept in order without),
    cut into batches of ``batch_size`` and its last batch filled up by repeating the group's first indices; the
    batches are shuffled as a whole and repeated from the start until their count is a multiple of
    ``num_replicas``. Replica ``r`` takes ``batches[r::num_replicas]``, so every replica runs the same number of
    full batches (as ``DistributedSampler`` pads, a few slices appear twice per epoch: fewer than ``batch_size``
    per shape, plus fewer than ``num_replicas`` batches).

    Example:
        >>> shape_grouped_batches(["a", "b", "a", "a", "b"], batch_size=2)
        [[0, 2], [3, 0], [1, 4]]
    """
    if batch_size < 1 or num_replicas < 1:
        raise ValueError(f"batch_size and num_replicas must be >= 1, got {batch_size}, {num_replicas}")
    groups: dict[Hashable, list[int]] = {}
    for index, key in enumerate(shape_keys):
        groups.setdefault(key, []).append(index)
    batches = []
    for indices in groups.values():
        if generator is not None:
            indices = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
        filled = indices + [indices[i % len(indices)] for i in range(-len(indices) % batch_size)]
        batches += [filled[start:start + batch_size] for start in range(0, len(filled), batch_size)]
    if generator is not None:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches + [batches[i % len(batches)] for i in range(-len(batches) % num_replicas)] if batches else []


def batches_run(batches: int, limit: int | float) -> int:
    """Training batches Lightning runs per epoch of ``batches`` under ``limit_train_batches`` ``limit`` (an int caps
    the count, a float takes that fraction of it, as Lightning's ``_parse_num_batches``); at least 1."""
    return max(min(batches, limit) if isinstance(limit, int) else int(batches * limit), 1)


class EpochTaggedDataset(Dataset):
    """Training dataset whose indices carry the epoch and the batch: index ``(epoch · B + b) · len + i`` is sample
    ``i`` in batch ``b`` of ``epoch``, with ``B = batches_per_epoch`` (set by :class:`EpochSampler`; 1 without).
    The transforms' ``step`` is ``epoch · S + b`` with ``S = steps_per_epoch``, the batches training runs per epoch
    (``B``, or fewer with Lightning's ``limit_train_batches``: :meth:`FastMriDataModule.train_dataloader`).

    Epoch and batch travel with each index into the dataloader workers (which are forked before or after Lightning
    calls ``set_epoch``, depending on the loop's state), so the per-epoch masks and a per-step augmentation
    schedule do not depend on timing. ``shape_keys[i]`` is sample ``i``'s :meth:`SliceDataset.shape_key`.
    """

    def __init__(self, dataset: Dataset, transforms: Sequence[EpochSeededMasks], shape_keys: Sequence[Hashable]):
        self.dataset = dataset
        self.transforms = list(transforms)
        self.shape_keys = list(shape_keys)
        self.batches_per_epoch = 1
        self.steps_per_epoch = 1

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, tagged_index: int):
        tag, index = divmod(int(tagged_index), len(self.dataset))
        epoch, batch = divmod(tag, self.batches_per_epoch)
        for transform in self.transforms:
            transform.epoch, transform.step = epoch, epoch * self.steps_per_epoch + batch
        return self.dataset[index]


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` (shuffle seeded by ``seed + epoch``; one replica without DDP) that tags each index
    with the epoch and its batch for :class:`EpochTaggedDataset`.

    The epoch is read from ``epoch_source`` when iteration starts: on resume Lightning may create the first
    epoch's iterator before it restores its loops and calls ``set_epoch`` (e.g. when the cosine schedule asks for
    the number of steps), and dataloader workers prefetch indices at once, so ``set_epoch`` alone would replay
    epoch 0's order and masks (see :meth:`FastMriDataModule.training_epoch`).

    With ``batch_size > 1`` and slices of several shapes, the order is :func:`shape_grouped_batches`' (seeded the
    same way), flattened: a ``DataLoader`` with that ``batch_size`` then cuts it into single-shape batches.
    """

    def __init__(self, dataset: EpochTaggedDataset, epoch_source: Callable[[], int] | None = None,
                 batch_size: int = 1, **kwargs: Any):
        super().__init__(dataset, **kwargs)
        self.epoch_source = epoch_source
        self.batch_size = batch_size
        self.grouped = batch_size > 1 and len(set(dataset.shape_keys)) > 1
        if self.grouped:  # the batch count does not depend on the shuffle: count an unshuffled plan once
            batches = shape_grouped_batches(dataset.shape_keys, batch_size, self.num_replicas)
            self.grouped_length = len(batches) // self.num_replicas * batch_size
        dataset.batches_per_epoch = dataset.steps_per_epoch = max(math.ceil(len(self) / batch_size), 1)

    def _my_batches(self) -> list[list[int]]:
        generator = None
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
        batches = shape_grouped_batches(self.dataset.shape_keys, self.batch_size, self.num_replicas, generator)
        return batches[self.rank::self.num_replicas]

    def __len__(self) -> int:
        return self.grouped_length if self.grouped else super().__len__()

    def __iter__(self):
        if self.epoch_source is not None:
            self.set_epoch(self.epoch_source())
        indices = [i for batch in self._my_batches() for i in batch] if self.grouped else super().__iter__()
        first_batch = self.epoch * self.dataset.batches_per_epoch
        return ((first_batch + position // self.batch_size) * len(self.dataset) + index
                for position, index in enumerate(indices))


def init_worker(worker_id: int, rank: int = 0) -> None:
    """Start of a dataloader worker: ignore SIGUSR1 and seed the worker as Lightning does for a loader without its
    own ``worker_init_fn`` (``seed_everything(workers=True)``, which LightningCLI calls).

    SLURM's ``--signal`` reaches every process of a job step, and a forked worker inherits Lightning's SIGUSR1
    (auto-requeue) handler: each worker would save its stale copy of the trainer as the next ``hpc_ckpt_N.ckpt``
    (the highest number, which Lightning resumes from without ``--ckpt_path``) and call ``scontrol requeue`` again.
    The training process handles the signal."""
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        pl_worker_init_function(worker_id, rank)


def _check_training_transform(train_transform: Callable | None, transform: str, data_masks) -> None:
    """Refuse a k-space training transform with the image-crop default (training and validation batches would be
    different inputs), and warn when its mask family differs from the data module's (used for validation)."""
    if not isinstance(train_transform, (AugmentedVarNetTransform, SsduVarNetTransform)):
        return
    name = type(train_transform).__name__
    if transform != "varnet":
        raise ConfigError(f"data.train_transform {name} gives k-space samples, but data.transform {transform!r} "
                          "gives validation image crops: use data.transform varnet (image models then see the "
                          "zero-filled image of their deployed front end in training and validation alike)")
    masks = train_transform.mask_func

    def family(m) -> tuple:
        return type(m).__name__, list(m.center_fractions), [float(a) for a in m.accelerations]

    if family(masks) != family(data_masks):
        warnings.warn(f"data.train_transform {name} draws {family(masks)} masks but data.* (validation, test) "
                      f"{family(data_masks)}; set the transform's mask_type / center_fractions / accelerations "
                      "to the data module's unless training and validation are meant to differ",
                      ReconkitWarning, stacklevel=3)


class FastMriDataModule(LightningDataModule):
    """Slices of fastMRI HDF5 files under ``data_path/{train,val,test}`` for Lightning.

    Batches are ``VarNetSample`` (``transform="varnet"``: every k-space model, and image-domain models trained
    through their deployed zero-filled front end) or ``UnetSample`` (``transform="unet"``, fastMRI's U-Net recipe:
    the recon-size crop) from ``reconkit.data``; masks come from
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
        sample_rate: float | None = None,
        volume_sample_rate: float | None = None,
        val_sample_rate: float | None = None,
        val_volume_sample_rate: float | None = None,
        use_dataset_cache: bool = False,
        skip_bad_files: bool = False,
        combine_train_val: bool = False,
        fraction: float | None = None,
        num_volumes: int | None = None,
        seed: int = 0,
        test_split: str = "test",
        train_transform: AugmentedVarNetTransform | SsduVarNetTransform | Callable | None = None,
        val_transform: Callable | None = None,
        test_transform: Callable | None = None,
    ):
        """
        Args:
            data_path: folder holding ``train/``, ``val/`` and ``test/`` with fastMRI ``.h5`` files.
            challenge: ``"multicoil"`` or ``"singlecoil"``.
            transform: default transforms, ``"varnet"`` (masked k-space) or ``"unet"`` (zero-filled image crop).
            mask_type: undersampling mask family: ``equispaced_fraction`` (fastMRI's default), ``random``,
                ``equispaced``, ``magic``, ``magic_fraction`` or ``variable_density`` (2D). Files with a stored
                ``mask`` (already undersampled) keep it.
            center_fractions: fraction of fully sampled centre (ACS) columns, one per acceleration.
            accelerations: undersampling factors, paired with center_fractions (one pair is drawn per sample).
            batch_size: slices per batch (per device under DDP). On data of several shapes (coil counts, matrix
                sizes) each training batch holds slices of one shape (:func:`shape_grouped_batches`) and
                validation / test / predict use batches of one slice (so they do on several recon sizes).
            num_workers: dataloader worker processes.
            sample_rate: fraction of training slices kept (as ``SliceDataset``; the draw is seeded by ``seed``).
            volume_sample_rate: fraction of training volumes kept (as ``SliceDataset``; seeded by ``seed``).
            val_sample_rate: fraction of validation / test slices kept.
            val_volume_sample_rate: fraction of validation / test volumes kept.
            use_dataset_cache: cache the per-file slice index (``SliceDataset``'s cache file), filled once per
                node by :meth:`prepare_data` before the DDP ranks' ``setup`` reads it.
            skip_bad_files: leave out files that fail validation (corrupt, truncated, wrong schema) with a warning
                naming each; default: stop with an error listing them.
            combine_train_val: train on train + val (for a final model); validation still runs on val.
            fraction: train on this fraction of the training volumes (a reproducible subset seeded by seed; the
                data-efficiency curves of docs/results.md); not with num_volumes.
            num_volumes: train on this many training volumes (the same subset rule); not with fraction.
            seed: seed for the training subset, the sample-rate draws, shuffle order and training masks.
            test_split: subfolder used by ``test`` and ``predict``.
            train_transform: replace the training split's transform (a callable taking SliceDataset's sample
                tuple), e.g. ``reconkit.data.augment.AugmentedVarNetTransform`` (MRAugment-style augmentation,
                configs/varnet_sim_small_augment.yaml) or ``reconkit.data.ssdu.SsduVarNetTransform`` (SSDU
                self-supervision with ``SsduVarNetModule``, configs/varnet_sim_small_ssdu.yaml); its ``mask_func``
                still gets reproducible per-epoch masks. Both give k-space samples: use ``transform: varnet``.
                Training files without a target are refused at setup unless the transform has
                ``needs_target = False`` (as SSDU's).
            val_transform: replace the validation split's transform.
            test_transform: replace the test / predict split's transform.
        """
        super().__init__()
        if transform not in TRANSFORMS:
            raise ConfigError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
        if len(center_fractions) != len(accelerations):
            raise ConfigError("center_fractions and accelerations must have the same length (paired)")
        select_volumes([], fraction, num_volumes, seed)  # validate early
        # each was found only after the data scan: batch_size 0 a ZeroDivisionError in the sampler, num_workers -1
        # the DataLoader's ValueError, an unknown challenge SliceDataset's
        check_number("batch_size", batch_size, 1, integer=True)
        check_number("num_workers", num_workers, 0, integer=True)
        try:
            target_key(challenge)
            check_sample_rates(sample_rate, volume_sample_rate)
            check_sample_rates(val_sample_rate, val_volume_sample_rate, prefix="val_")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        try:
            data_masks = create_mask_for_mask_type(mask_type, center_fractions, accelerations)
        except ValueError as err:
            raise ConfigError(f"data mask options: {err}") from None
        _check_training_transform(train_transform, transform, data_masks)
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
        self._scan_memo: dict = {}
        self.skip_bad_files = skip_bad_files
        self.combine_train_val = combine_train_val
        self.fraction = fraction
        self.num_volumes = num_volumes
        self.seed = seed
        self.test_split = test_split
        self.transform_overrides = {"train": train_transform, "val": val_transform, "test": test_transform}
        self._restored_epochs = 0
        self._checked_train_parts: dict[str, SliceDataset] = {}  # setup("fit")'s datasets, for train_dataset

    # --- resume state --------------------------------------------------------------------------------------
    def training_epoch(self) -> int:
        """Index of the training epoch about to run: epochs the fit loop has processed (what Lightning passes
        to ``set_epoch``), or the count stored in the checkpoint being resumed if the loop is not restored yet."""
        return max(self.trainer.fit_loop.epoch_progress.current.processed, self._restored_epochs)

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints; restored before Lightning builds the first dataloader iterator."""
        return {"epochs_processed": self.trainer.fit_loop.epoch_progress.current.processed} if self.trainer else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_epochs = int(state_dict.get("epochs_processed", 0))

    def _stage_splits(self, stage: str) -> list[str]:
        """The splits ``stage`` reads: ``fit`` train and val (train alone with ``limit_val_batches=0``, unless
        ``combine_train_val`` trains on val), the others one split each."""
        splits = {"fit": ["train", "val"], "validate": ["val"]}.get(stage, [self.test_split])
        if stage == "fit" and not self._fit_validates():
            splits = self._train_splits()  # without validation, fit reads val only to train on it
        return splits

    def _fit_validates(self) -> bool:
        """Whether ``fit`` validates: not with ``limit_val_batches=0``."""
        return self.trainer is None or self.trainer.limit_val_batches != 0

    def prepare_data(self) -> None:
        """With ``use_dataset_cache``, scan the splits the trainer's stage reads (all three without a trainer) into
        the dataset cache file, so that :meth:`setup` and the datasets read it instead of every file's header.

        Lightning calls this once per node (local rank 0; once in all with ``prepare_data_per_node = False``, for a
        cache file every node shares) before ``setup`` on every rank, the other ranks waiting: under DDP, every rank
        had scanned every file at once (fastMRI brain: 4,500 headers × 8 ranks on a shared file system). Nothing is
        reported here: bad files and missing folders are cached as bad or found again, and :meth:`setup` (or, with
        ``skip_bad_files``, the datasets) reports them as without this step. Without the cache this does nothing."""
        if not self.use_dataset_cache:
            return
        stage = None if self.trainer is None else self.trainer.state.fn  # what Lightning then passes to setup
        splits = ["train", "val", self.test_split] if stage is None else self._stage_splits(stage.value)
        for split in dict.fromkeys(splits):
            with contextlib.suppress(DataError):
                SliceDataset(self.split_dir(split), challenge=self.challenge, scan_memo=self._scan_memo)

    def setup(self, stage: str) -> None:
        """Check every split the stage reads (:meth:`_stage_splits`) before any of it runs, so that one error lists
        the bad files (and missing or empty folders) of all of them.

        For ``fit``, the splits training reads are built as :meth:`train_dataset` builds them (``sample_rate`` /
        ``volume_sample_rate``; the draw is seeded by ``(seed, split)``, so it is the same draw, and every file is
        checked before it) and kept for the next :meth:`train_dataset`, which then does not build them again (each
        build reloads the dataset cache and lists the folder: about 0.5 s at 4,500 files)."""
        if self.skip_bad_files:  # they are left out, with a warning each, when the datasets are built
            return
        problems = []
        self._checked_train_parts = {}
        for split in self._stage_splits(stage):
            training = stage == "fit" and split in self._train_splits()
            try:
                dataset = self.slice_dataset(split, transform=None,
                                             sample_rate=self.sample_rate if training else None,
                                             volume_sample_rate=self.volume_sample_rate if training else None,
                                             require_target=self._needs_target(split, stage))
            except DataError as err:
                problems.append(str(err))
                continue
            if training:
                self._checked_train_parts[split] = dataset
        if len(problems) == 1:
            raise DataError(None, problems[0])
        if problems:
            raise DataError(None, f"{len(problems)} splits have problems: " + " | ".join(problems))

    # --- transforms and datasets ---------------------------------------------------------------------------
    def default_transform(self, split: str) -> Callable:
        """The default transform for ``split``: random masks for training, per-volume fixed masks otherwise; a file
        that stores its own ``mask`` (already undersampled, e.g. fastMRI's test set) keeps it."""
        mask_func = create_mask_for_mask_type(self.mask_type, self.center_fractions, self.accelerations)
        use_seed = split != "train"
        if self.transform == "varnet":
            return VarNetDataTransform(mask_func=mask_func, use_seed=use_seed, stored_mask_first=True)
        return UnetDataTransform(self.challenge, mask_func=mask_func, use_seed=use_seed, stored_mask_first=True)

    def split_dir(self, split: str) -> Path:
        """``data_path / split``; :class:`DataError` naming it when it is missing or holds no ``.h5`` / ``.hdf5``
        file."""
        folder = self.data_path / split
        if not folder.is_dir():
            raise DataError(folder, f"missing the {split!r} folder (expected {self.data_path}/{{train,val,test}})")
        if not list_volume_files(folder):
            raise DataError(folder, f"the {split!r} folder holds no .h5 / .hdf5 files")
        return folder

    def _needs_target(self, split: str, stage: str) -> bool:
        """Whether ``stage`` needs ``split``'s fully sampled targets: not for predict, nor for a training split
        whose transform says ``needs_target = False`` (SSDU trains without targets; augmentation needs them), nor
        for val read by a fit without validation only to train on (``combine_train_val``)."""
        if stage == "predict":
            return False
        if stage == "fit" and split == "val" and not self._fit_validates():
            split = "train"
        return split != "train" or getattr(self.transform_overrides["train"], "needs_target", True)

    def slice_dataset(self, split: str, transform: Callable | None, sample_rate: float | None,
                      volume_sample_rate: float | None, require_target: bool = False) -> SliceDataset:
        """``split``'s :class:`SliceDataset`. Its ``sample_rate`` / ``volume_sample_rate`` draw (Python's ``random``,
        as fastmri's) is seeded by ``(seed, split)``: every DDP rank must draw the same slices (ranks seeded apart,
        as with ``--seed_everything false`` under torchrun, split different subsets, so slices were skipped and the
        ranks' batch counts could differ, a hang), whatever ``seed_everything`` did; the global state is restored."""
        folder = self.split_dir(split)
        state = random.getstate()
        random.seed(f"{self.seed}:{split}")
        try:
            dataset = SliceDataset(
                root=folder,
                challenge=self.challenge,
                transform=transform,
                use_dataset_cache=self.use_dataset_cache,
                skip_bad_files=self.skip_bad_files,
                sample_rate=sample_rate,
                volume_sample_rate=volume_sample_rate,
                scan_memo=self._scan_memo,  # setup's check and the datasets built after it read each header once
            )
        finally:
            random.setstate(state)
        if require_target:  # found here, before any training, not at the first batch of such a file
            missing = sorted(f for f, shapes in dataset.slice_shapes.items() if shapes[1] is None)
            if missing and not self.skip_bad_files:
                raise DataError(missing[0], f"no target ('{dataset.recons_key}') in the {split!r} split" + (
                    f" (and {len(missing) - 1} more file(s) without one: {'; '.join(map(str, missing[1:]))})"
                    if len(missing) > 1 else "") + "; training, validation and test need fully sampled targets "
                    "(`reconkit train predict` reconstructs files without them); skip_bad_files leaves such files "
                    "out with a warning")
            for name in missing:
                logger.warning("skipping %s: no target ('%s') in the %r split", printable(name), dataset.recons_key, split)
            left_out = set(missing)
            dataset.raw_samples = [s for s in dataset.raw_samples if s.fname not in left_out]
        if not dataset.raw_samples:
            raise DataError(folder, f"no slices left in the {split!r} split (every file skipped as bad, or sampled "
                                    "away)")
        return dataset

    def train_dataset(self) -> EpochTaggedDataset:
        """The training dataset: subset and combined with val as configured, with epoch-seeded masks. Takes the
        datasets the last ``setup("fit")`` built and checked (once: a second call builds them again)."""
        parts, transforms = [], []
        for split in self._train_splits():
            base_transform = self.transform_overrides["train"] or self.default_transform("train")
            transform = EpochSeededMasks(base_transform, self.seed)
            dataset = self._checked_train_parts.pop(split, None)
            if dataset is None:
                dataset = self.slice_dataset(split, None, self.sample_rate, self.volume_sample_rate,
                                             require_target=self._needs_target("train", "fit"))
            dataset.transform = transform
            parts.append(dataset)
            transforms.append(transform)
        dataset = parts[0] if len(parts) == 1 else ConcatDataset(parts)
        fnames = [name for part in parts for name in self._slice_fnames(part)]
        shape_keys = [part.shape_key(i) for part in parts for i in range(len(part))]
        keep = select_volumes(fnames, self.fraction, self.num_volumes, self.seed)
        if len(keep) < len(set(fnames)):
            kept = [i for i, name in enumerate(fnames) if name in keep]
            dataset, shape_keys = Subset(dataset, kept), [shape_keys[i] for i in kept]
        return EpochTaggedDataset(dataset, transforms, shape_keys)

    def training_volumes(self) -> set[str]:
        """Names of the volumes ``fit`` trains on: the ``sample_rate`` / ``volume_sample_rate`` draw (seeded, see
        :meth:`slice_dataset`) and the ``fraction`` / ``num_volumes`` subset of the training split (and val with
        ``combine_train_val``), as :meth:`train_dataset` draws them."""
        datasets = [self.slice_dataset(split, None, self.sample_rate, self.volume_sample_rate,
                                       require_target=self._needs_target("train", "fit"))
                    for split in self._train_splits()]  # the files train_dataset draws from (those without a target left out)
        fnames = [name for dataset in datasets for name in self._slice_fnames(dataset)]
        return select_volumes(fnames, self.fraction, self.num_volumes, self.seed)

    def _train_splits(self) -> list[str]:
        """The splits :meth:`train_dataset` reads: train, and val with ``combine_train_val``."""
        return ["train", "val"] if self.combine_train_val else ["train"]

    @staticmethod
    def _slice_fnames(dataset: SliceDataset) -> list[str]:
        """File name of every slice of ``dataset``, in index order. ``os.path.basename``, not ``Path(fname).name``:
        a ``Path`` built per slice cost 0.3 s per call on 70,000 slices (fastMRI brain), this 0.02 s."""
        return [os.path.basename(sample.fname) for sample in dataset.raw_samples]

    def eval_dataset(self, split: str, require_target: bool = False) -> SliceDataset:
        """``split``'s dataset for validation, test or predict: its transform override (``val_transform`` for ``"val"``,
        ``test_transform`` for any other) or :meth:`default_transform`, and ``val_sample_rate`` /
        ``val_volume_sample_rate``."""
        transform = self.transform_overrides[split if split in ("val", "test") else "test"]
        return self.slice_dataset(split, transform or self.default_transform(split), self.val_sample_rate,
                                  self.val_volume_sample_rate, require_target=require_target)

    # --- dataloaders ---------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset()
        trainer = self.trainer
        sampler = EpochSampler(
            dataset,
            epoch_source=None if trainer is None else self.training_epoch,
            num_replicas=1 if trainer is None else trainer.world_size,
            rank=0 if trainer is None else trainer.global_rank,
            shuffle=True,
            seed=self.seed,
            batch_size=self.batch_size,
        )
        if trainer is not None:  # the augmentation's step schedule counts the batches that are run
            dataset.steps_per_epoch = batches_run(dataset.batches_per_epoch, trainer.limit_train_batches)
        return self._loader(dataset, self.batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val", require_target=True)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_split, require_target=True)

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_split)

    def _eval_loader(self, split: str, require_target: bool = False) -> DataLoader:
        """``batch_size`` slices per batch when all of the split's slices have one shape and recon size, else one
        (the order and the per-volume metrics stay those of a plain sequential pass). The recon size counts for
        files without a target (predict): a batch is cropped to its first slice's, so a file of another recon size
        came out at the wrong size."""
        dataset = self.eval_dataset(split, require_target=require_target)
        shapes = {(dataset.shape_key(i), tuple(sample.metadata["recon_size"]))
                  for i, sample in enumerate(dataset.raw_samples)}
        batch_size = self.batch_size if len(shapes) <= 1 else 1
        if batch_size < self.batch_size:
            logger.info("%s: slices of %d shapes (coil counts / matrix sizes / recon sizes), batch size 1", split,
                        len(shapes))
        return self._loader(dataset, batch_size)

    def _loader(self, dataset: Dataset, batch_size: int, sampler: torch.utils.data.Sampler | None = None) -> DataLoader:
        # val/test: Lightning adds a DistributedSampler under DDP; per-volume metrics are gathered across ranks
        rank = 0 if self.trainer is None else self.trainer.global_rank
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                          num_workers=self.num_workers, persistent_workers=False, collate_fn=collate_slices,
                          worker_init_fn=partial(init_worker, rank=rank))
