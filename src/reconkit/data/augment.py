"""Physics-aware data augmentation for k-space training (MRAugment; Fabian, Heckel & Soltanolkotabi, ICML 2021).

The fully sampled k-space of a slice is taken to the image domain (complex coil images ``(C, H, W, 2)``), the
same geometric transform is applied to every coil image (real and imaginary parts interpolated separately, so
complex data stays complex), and from the augmented coil images everything is recomputed:

* k-space = ``fft2c(augmented coil images)``, then undersampled with the usual mask (so the input obeys the
  forward model of the augmented object);
* target = RSS of the augmented coil images, centre-cropped to the recon size.

Augmentations (each applied independently with probability ``weight * p``, ``p`` the overall probability at the
current point of training): horizontal / vertical flip, 90° rotations (exact), arbitrary rotation, translation,
isotropic and anisotropic scaling, shearing. The affine ones are combined into one resampling with
``torch.nn.functional.grid_sample`` (bilinear or bicubic, reflection or zero padding, as MRAugment).

``p`` follows a schedule over training (:func:`augmentation_probability`): constant, linear ramp or
exponential ramp, in epochs or optimiser steps. Every random draw comes from a generator seeded by
``(seed, epoch, fname, slice_num)``, so a sample's augmentation is reproducible and independent of data-loader
workers.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from reconkit.data.masks import MaskFunc, create_mask_for_mask_type
from reconkit.data.transforms import VarNetDataTransform, VarNetSample, to_tensor
from reconkit.errors import ConfigError, DataError, check_number
from reconkit.ops import fft2c, ifft2c, rss_complex

__all__ = [
    "AugmentConfig",
    "AugmentParams",
    "AugmentedVarNetTransform",
    "augment_coil_images",
    "augmentation_probability",
    "sample_augmentation",
]

SCHEDULES = ("constant", "linear", "exp")
SCHEDULE_UNITS = ("epoch", "step")
INTERPOLATIONS = ("bilinear", "bicubic")
PADDINGS = ("reflection", "zeros")


@dataclass
class AugmentConfig:
    """Augmentation settings (MRAugment's defaults where it has them).

    Attributes:
        probability: overall augmentation probability ``p`` at the end of the ramp (0 turns augmentation off).
        schedule: ``"constant"`` (``p`` from the start), ``"linear"`` (``p · t / T``) or ``"exp"``
            (``p · (1 − e^(−c·t/T)) / (1 − e^(−c))``), ``t`` the epoch or step, ``T = ramp_length``.
        schedule_unit: ``"epoch"`` or ``"step"`` (what ``t`` counts; under the data module a step is a training
            batch, i.e. an optimizer step without gradient accumulation).
        ramp_length: ``T``, epochs or steps to reach ``probability``.
        exp_rate: ``c`` of the exponential ramp.
        weights: per-augmentation weight (probability of each = ``weight · p``, clipped to 1); keys ``fliph``,
            ``flipv``, ``rot90``, ``rotation``, ``translation``, ``scaling_iso``, ``scaling_aniso``, ``shearing``.
            A dict given replaces the defaults whole: kinds it leaves out get weight 0 (``{rotation: 0}`` switches
            every augmentation off; list all eight to change one, as configs/varnet_sim_small_augment.yaml does).
        max_rotation: degrees, arbitrary rotation drawn from ``U(−max, max)``.
        max_translation: ``(y, x)`` fractions of the image height / width.
        max_scaling: scale factors drawn from ``U(1 − max, 1 + max)``.
        max_shearing: degrees, shear angles (x and y) drawn from ``U(−max, max)``.
        interpolation: ``"bilinear"`` or ``"bicubic"``.
        padding: ``"reflection"`` or ``"zeros"`` (what fills the field of view outside the moved image).

    Raises ValueError (:class:`~reconkit.errors.ConfigError` for the numbers) naming the field for a value that
    cannot work: a probability outside [0, 1], an unknown name, a negative or non-finite weight, ``max_rotation``,
    ``max_translation`` or ``max_shearing``, a ``max_scaling`` outside [0, 1), a ``ramp_length`` that is not a
    finite number > 0, or (``"exp"`` schedule) an ``exp_rate`` of 0 or not finite.
    """

    probability: float = 0.55
    schedule: str = "exp"
    schedule_unit: str = "epoch"
    ramp_length: float = 10.0
    exp_rate: float = 5.0
    weights: dict[str, float] = field(default_factory=lambda: {
        "fliph": 0.5, "flipv": 0.5, "rot90": 0.5, "rotation": 0.5, "translation": 1.0, "scaling_iso": 1.0,
        "scaling_aniso": 1.0, "shearing": 0.5,
    })  # fmt: skip
    max_rotation: float = 180.0
    max_translation: Sequence[float] = (0.125, 0.08)
    max_scaling: float = 0.25
    max_shearing: float = 15.0
    interpolation: str = "bilinear"
    padding: str = "reflection"

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"augmentation probability must be in [0, 1], got {self.probability}")
        for name, value, allowed in (("schedule", self.schedule, SCHEDULES),
                                     ("schedule_unit", self.schedule_unit, SCHEDULE_UNITS),
                                     ("interpolation", self.interpolation, INTERPOLATIONS),
                                     ("padding", self.padding, PADDINGS)):  # fmt: skip
            if value not in allowed:
                raise ValueError(f"augmentation {name} must be one of {allowed}, got {value!r}")
        unknown = set(self.weights) - set(AugmentParams.KINDS)
        if unknown:
            raise ValueError(f"unknown augmentation weights {sorted(unknown)}; known: {list(AugmentParams.KINDS)}")
        for kind, weight in self.weights.items():  # NaN switched the kind off without a word
            check_number(f"augmentation weights[{kind!r}]", weight, 0)
        check_number("augmentation ramp_length", self.ramp_length, 0, strict=True)  # NaN: p = NaN, nothing applied
        if self.schedule == "exp" and not (math.isfinite(self.exp_rate) and self.exp_rate != 0):
            raise ConfigError(f"augmentation exp_rate must be a finite number other than 0 (the exp schedule divides "
                              f"by 1 − e^(−exp_rate)), got {self.exp_rate!r}")
        # NaN made numpy's draw an OverflowError, a scale beyond [0, 2] a flipped or collapsed image
        check_number("augmentation max_rotation", self.max_rotation, 0)
        check_number("augmentation max_shearing", self.max_shearing, 0)
        check_number("augmentation max_scaling", self.max_scaling, 0)
        if self.max_scaling >= 1:
            raise ConfigError(f"augmentation max_scaling must be below 1 (scale factors from U(1 − max, 1 + max) must "
                              f"stay positive), got {self.max_scaling!r}")
        if np.ndim(self.max_translation) != 1 or len(self.max_translation) != 2:
            raise ConfigError(f"augmentation max_translation must be (y, x) fractions of the image height / width, "
                              f"got {self.max_translation!r}")
        for fraction in self.max_translation:
            check_number("augmentation max_translation", fraction, 0)


@dataclass
class AugmentParams:
    """One drawn augmentation. Angles in degrees; translation in pixels ``(dy, dx)``; scale ``(sy, sx)``."""

    KINDS = ("fliph", "flipv", "rot90", "rotation", "translation", "scaling_iso", "scaling_aniso", "shearing")

    fliph: bool = False
    flipv: bool = False
    rot90: int = 0
    rotation: float = 0.0
    translation: tuple[float, float] = (0.0, 0.0)
    scale: tuple[float, float] = (1.0, 1.0)
    shear: tuple[float, float] = (0.0, 0.0)

    def is_affine_identity(self) -> bool:
        return (self.rotation == 0.0 and self.translation == (0.0, 0.0) and self.scale == (1.0, 1.0)
                and self.shear == (0.0, 0.0))  # fmt: skip


def augmentation_probability(config: AugmentConfig, progress: float) -> float:
    """Overall probability ``p`` after ``progress`` epochs or steps (``config.schedule_unit``)."""
    ramp = min(max(progress / config.ramp_length, 0.0), 1.0)
    if config.schedule == "constant":
        return config.probability
    if config.schedule == "linear":
        return config.probability * ramp
    c = config.exp_rate
    return config.probability * (1.0 - math.exp(-c * ramp)) / (1.0 - math.exp(-c))


def sample_augmentation(config: AugmentConfig, p: float, rng: np.random.Generator, shape: tuple[int, int]
                        ) -> AugmentParams:
    """Draw which augmentations apply (each with probability ``min(weight · p, 1)``) and their parameters.

    ``shape`` is the image ``(H, W)`` (for translations in pixels). Draws are made for every augmentation in a
    fixed order, applied or not, so one choice does not shift the random stream of the others.
    """
    def chosen(kind: str) -> bool:
        return bool(rng.uniform() < min(config.weights.get(kind, 0.0) * p, 1.0))

    params = AugmentParams()
    apply = {kind: chosen(kind) for kind in AugmentParams.KINDS}
    k = int(rng.integers(1, 4))
    angle = float(rng.uniform(-config.max_rotation, config.max_rotation))
    shift = (float(rng.uniform(-1, 1)) * config.max_translation[0] * shape[0],
             float(rng.uniform(-1, 1)) * config.max_translation[1] * shape[1])  # fmt: skip
    iso = float(rng.uniform(1 - config.max_scaling, 1 + config.max_scaling))
    aniso = (float(rng.uniform(1 - config.max_scaling, 1 + config.max_scaling)),
             float(rng.uniform(1 - config.max_scaling, 1 + config.max_scaling)))  # fmt: skip
    shear = (float(rng.uniform(-config.max_shearing, config.max_shearing)),
             float(rng.uniform(-config.max_shearing, config.max_shearing)))  # fmt: skip
    params.fliph, params.flipv = apply["fliph"], apply["flipv"]
    params.rot90 = k if apply["rot90"] else 0
    params.rotation = angle if apply["rotation"] else 0.0
    params.translation = shift if apply["translation"] else (0.0, 0.0)
    scale = (iso, iso) if apply["scaling_iso"] else (1.0, 1.0)
    if apply["scaling_aniso"]:
        scale = (scale[0] * aniso[0], scale[1] * aniso[1])
    params.scale = scale
    params.shear = shear if apply["shearing"] else (0.0, 0.0)
    return params


def _fit_to_shape(images: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Centre-crop (as :func:`~reconkit.data.transforms.center_crop`) or zero-pad ``(..., h, w, 2)`` to ``shape`` ``(H, W)`` (after a 90° turn
    of a non-square FOV; the target of k-space narrower than the recon size)."""
    for axis, size in ((-3, shape[0]), (-2, shape[1])):
        current = images.shape[axis]
        if current > size:
            start = (current - size) // 2
            images = images.narrow(axis, start, size)
        elif current < size:
            before = (size - current) // 2
            pad = [0, 0] * 3  # F.pad order: last axis first
            pad_index = 2 * (-axis - 1)
            pad[pad_index], pad[pad_index + 1] = before, size - current - before
            images = F.pad(images, pad)
    return images


def _affine_matrix(params: AugmentParams, shape: tuple[int, int]) -> torch.Tensor:
    """``(2, 3)`` matrix for ``F.affine_grid`` (maps output to input normalised coordinates ``(x, y)``).

    The forward transform (in pixel units about the image centre) is ``T · R · Sh · S``; the grid needs its
    inverse, expressed in the normalised coordinates of ``align_corners=False`` (``x_n = x_px / (W / 2)``).
    """
    height, width = shape
    theta = math.radians(params.rotation)
    rotation = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]],
                            dtype=torch.float64)
    shear = torch.tensor([[1.0, math.tan(math.radians(params.shear[1]))],
                          [math.tan(math.radians(params.shear[0])), 1.0]], dtype=torch.float64)
    scale = torch.diag(torch.tensor([params.scale[1], params.scale[0]], dtype=torch.float64))  # (x, y)
    forward = rotation @ shear @ scale
    shift = torch.tensor([params.translation[1], params.translation[0]], dtype=torch.float64)  # (dx, dy)
    inverse = torch.linalg.inv(forward)
    to_norm = torch.diag(torch.tensor([2.0 / width, 2.0 / height], dtype=torch.float64))
    linear = to_norm @ inverse @ torch.linalg.inv(to_norm)
    offset = -(to_norm @ inverse @ shift)
    return torch.cat([linear, offset[:, None]], dim=1).to(torch.float32)


def augment_coil_images(images: torch.Tensor, params: AugmentParams, interpolation: str = "bilinear",
                        padding: str = "reflection") -> torch.Tensor:
    """Apply ``params`` to complex coil images ``(C, H, W, 2)``; returns ``(C, H, W, 2)`` (same size).

    Flips and 90° turns are exact index operations (a turn of a non-square image is centre-cropped / zero-padded
    back to ``(H, W)``); rotation, translation, scaling and shearing are one ``grid_sample`` over real and
    imaginary parts as separate channels.
    """
    if images.ndim != 4 or images.shape[-1] != 2:
        raise ValueError(f"augment_coil_images: images must be (C, H, W, 2), got {tuple(images.shape)}")
    shape = (images.shape[-3], images.shape[-2])
    if params.fliph:
        images = images.flip(-2)
    if params.flipv:
        images = images.flip(-3)
    if params.rot90:
        images = _fit_to_shape(torch.rot90(images, params.rot90, dims=(-3, -2)), shape)
    if params.is_affine_identity():
        return images
    coils = images.shape[0]
    channels = images.permute(0, 3, 1, 2).reshape(1, coils * 2, *shape)  # (1, 2C, H, W)
    grid = F.affine_grid(_affine_matrix(params, shape)[None].to(images), [1, coils * 2, *shape],
                         align_corners=False)
    moved = F.grid_sample(channels, grid, mode=interpolation, padding_mode=padding, align_corners=False)
    return moved.reshape(coils, 2, *shape).permute(0, 2, 3, 1).contiguous()


class AugmentedVarNetTransform:
    """``VarNetDataTransform`` with MRAugment applied to the fully sampled data before undersampling.

    Use it as the training transform (``FastMriDataModule(train_transform=...)`` or in YAML under
    ``data.train_transform``). Validation / test keep the plain transform.

    Args:
        mask_type, center_fractions, accelerations: the training mask family (as the data module's).
        config: augmentation settings (:class:`AugmentConfig`; a dict is accepted for YAML).
        seed: base seed of the per-sample augmentation draws.
        use_seed: seed masks by file name (fixed mask per volume) instead of drawing them.

    The sample equals ``VarNetDataTransform``'s (with ``stored_mask_first``, as the data module's); with ``p = 0``
    it is exactly what that transform gives. A file with a stored ``mask`` holds undersampled k-space, which has no
    fully sampled image to augment: its samples are never augmented. Single-coil ``(H, W)`` k-space is augmented
    as one coil. The schedule position is set with :meth:`set_epoch` and :meth:`set_step` (the data module sets
    both for every sample: the epoch, and the training batches before this sample's batch).
    """

    def __init__(
        self,
        mask_type: str = "equispaced_fraction",
        center_fractions: Sequence[float] = (0.08,),
        accelerations: Sequence[int] = (4,),
        config: AugmentConfig | dict | None = None,
        seed: int = 0,
        use_seed: bool = False,
    ):
        self.config = config if isinstance(config, AugmentConfig) else AugmentConfig(**(config or {}))
        self.mask_func: MaskFunc = create_mask_for_mask_type(mask_type, list(center_fractions), list(accelerations))
        self.plain = VarNetDataTransform(mask_func=self.mask_func, use_seed=use_seed, stored_mask_first=True)
        self.seed = seed
        self.epoch = 0
        self.step = 0

    def set_epoch(self, epoch: int) -> None:
        """Where the schedule stands (``schedule_unit: epoch``). The data module passes the epoch with every sample
        index, so DataLoader workers see it; a call in the main process does not reach persistent workers."""
        self.epoch = epoch

    def set_step(self, step: int) -> None:
        self.step = step

    def probability(self) -> float:
        """Overall augmentation probability now (from the schedule)."""
        progress = self.epoch if self.config.schedule_unit == "epoch" else self.step
        return augmentation_probability(self.config, progress)

    def rng(self, fname: str, slice_num: int) -> np.random.Generator:
        """The generator of this sample's draws: seeded by ``(seed, epoch, fname, slice_num)``."""
        key = f"augment:{self.seed}:{self.epoch}:{fname}:{slice_num}".encode()
        return np.random.default_rng(zlib.crc32(key))

    def __call__(self, kspace: np.ndarray, mask: np.ndarray | None, target: np.ndarray | None, attrs: dict,
                 fname: str, slice_num: int) -> VarNetSample:
        p = self.probability()
        if p > 0 and target is not None and mask is None:  # a stored mask: undersampled data, nothing to augment
            kspace, target = self.augment(kspace, target, fname, slice_num, p)
        return self.plain(kspace, mask, target, attrs, fname, slice_num)

    def augment(self, kspace: np.ndarray, target: np.ndarray, fname: str, slice_num: int, p: float
                ) -> tuple[np.ndarray, np.ndarray]:
        """Fully sampled ``(C, H, W)`` (or single-coil ``(H, W)``) complex k-space → augmented k-space of the same
        shape and its ``(h, w)`` RSS target (the target's shape; zero-padded along an axis where the k-space is
        smaller than the recon size, as fastMRI brain FLAIR 203, whose loss and metrics crop to the image there)."""
        if kspace.ndim not in (2, 3):
            raise DataError(fname, f"augmentation needs (C, H, W) or single-coil (H, W) k-space, got {kspace.shape}")
        if kspace.ndim == 2:
            new_kspace, new_target = self.augment(kspace[None], target, fname, slice_num, p)
            return new_kspace[0], new_target
        images = ifft2c(to_tensor(kspace))
        params = sample_augmentation(self.config, p, self.rng(fname, slice_num), (images.shape[-3], images.shape[-2]))
        images = augment_coil_images(images, params, self.config.interpolation, self.config.padding)
        new_kspace = fft2c(images)
        new_target = rss_complex(_fit_to_shape(images, (target.shape[-2], target.shape[-1])), dim=0)
        return torch.view_as_complex(new_kspace.contiguous()).numpy(), new_target.numpy()
