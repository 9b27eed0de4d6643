"""Sample transforms: from a ``SliceDataset`` tuple to model-ready tensors.

``VarNetDataTransform`` and ``UnetDataTransform`` produce the same tensors as ``fastmri.data.transforms`` for the
same inputs (same masks, crops and normalisation): ``VarNetDataTransform``'s bit for bit, ``UnetDataTransform``'s
to float32 round-off (its inverse FFT is reconkit's, which differs from fastmri's by about one rounding step). One
exception: the stored ``mask`` of a single-coil file (fastMRI's single-coil test and challenge sets) without a
``mask_func``, which fastmri's ``VarNetDataTransform`` zeroes entirely (it applies the padding to the last axis of
the ``(1, W, 1)`` mask, not to W); here it is kept inside ``[padding_left, padding_right)`` as for multi-coil files.
Complex tensors use fastMRI's real layout ``(..., 2)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, TypeVar

import numpy as np
import torch

from reconkit.data.masks import MaskFunc
from reconkit.errors import DataError
from reconkit.ops import complex_abs, ifft2c, rss

__all__ = [
    "UnetDataTransform",
    "UnetSample",
    "VarNetDataTransform",
    "VarNetSample",
    "apply_mask",
    "center_crop",
    "center_crop_to_smallest",
    "complex_center_crop",
    "filename_seed",
    "normalize",
    "normalize_instance",
    "to_tensor",
]


def to_tensor(data: np.ndarray) -> torch.Tensor:
    """numpy → torch; complex arrays become real ``(..., 2)`` (real, imag stacked last)."""
    if np.iscomplexobj(data):
        data = np.stack((data.real, data.imag), axis=-1)
    return torch.from_numpy(data)


def apply_mask(
    data: torch.Tensor,
    mask_func: MaskFunc,
    offset: int | None = None,
    seed: int | tuple[int, ...] | None = None,
    padding: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Undersample k-space ``(..., H, W, 2)`` with a mask drawn from ``mask_func``.

    Args:
        data: k-space, real layout, at least 3 dims.
        mask_func: mask function (see :mod:`reconkit.data.masks`).
        offset: passed to ``mask_func``.
        seed: passed to ``mask_func``.
        padding: ``(padding_left, padding_right)``: columns outside ``[left, right)`` are zeroed in the mask
            (zero-padded, never acquired).

    Returns:
        ``(masked_kspace, mask, num_low_frequencies)``; mask of shape ``(1, ..., 1, W, 1)`` (or ``(1, ..., H, W,
        1)`` for 2D masks), float32.

    Example:
        >>> from reconkit.data import create_mask_for_mask_type
        >>> mask_func = create_mask_for_mask_type("equispaced_fraction", [0.08], [4])
        >>> kspace = torch.randn(8, 640, 368, 2)  # (coils, H, W, 2)
        >>> masked, mask, num_low = apply_mask(kspace, mask_func, seed=0, padding=(4, 364))
        >>> masked.shape, mask.shape, num_low, int(mask.sum())
        (torch.Size([8, 640, 368, 2]), torch.Size([1, 1, 368, 1]), 29, 90)
    """
    if not isinstance(data, torch.Tensor) or data.is_complex() or data.ndim < 3 or data.shape[-1] != 2:
        # a complex (C, H, W) tensor would be masked along H, its W taken for the (real, imag) axis
        got = f"{data.dtype} {tuple(data.shape)}" if isinstance(data, torch.Tensor) else type(data).__name__
        raise ValueError(f"apply_mask: data must be a real tensor (..., H, W, 2), real and imaginary parts last "
                         f"(torch.view_as_real of complex k-space); got {got}")
    shape = (1,) * len(data.shape[:-3]) + tuple(data.shape[-3:])
    mask, num_low_frequencies = mask_func(shape, offset, seed)
    if padding is not None:
        mask[..., : padding[0], :] = 0
        mask[..., padding[1] :, :] = 0
    # the mask repeated along (real, imag): broadcast along that axis of 2, the product was not vectorised (3x slower)
    masked = data * mask.expand(*mask.shape[:-1], data.shape[-1]).contiguous()
    masked += 0.0  # turns -0.0 into 0.0; in place, where `+ 0.0` made a second k-space-sized tensor
    return masked, mask, num_low_frequencies


def _check_crop(shape: tuple[int, int], available: tuple[int, int], what: str) -> None:
    if not (0 < shape[0] <= available[0] and 0 < shape[1] <= available[1]):
        raise ValueError(f"{what}: cannot crop {available[0]}x{available[1]} to {shape[0]}x{shape[1]}")


_Image = TypeVar("_Image", torch.Tensor, np.ndarray)


def center_crop(data: _Image, shape: tuple[int, int]) -> _Image:
    """Centre crop of the last two axes of a real image ``(..., H, W)`` (tensor or numpy array: a view of the same
    type) to ``shape`` ``(h, w)``; ValueError unless ``0 < h ≤ H`` and ``0 < w ≤ W``."""
    height, width = data.shape[-2], data.shape[-1]
    _check_crop(shape, (height, width), "center_crop")
    top, left = (height - shape[0]) // 2, (width - shape[1]) // 2
    return data[..., top : top + shape[0], left : left + shape[1]]


def complex_center_crop(data: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Centre crop of axes -3, -2 of a complex image ``(..., H, W, 2)`` to ``shape`` ``(h, w)``; ValueError unless
    ``0 < h ≤ H`` and ``0 < w ≤ W``."""
    height, width = data.shape[-3], data.shape[-2]
    _check_crop(shape, (height, width), "complex_center_crop")
    top, left = (height - shape[0]) // 2, (width - shape[1]) // 2
    return data[..., top : top + shape[0], left : left + shape[1], :]


def center_crop_to_smallest(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop both real images ``(..., H, W)`` to the smaller height and the smaller width of the two."""
    size = (min(x.shape[-2], y.shape[-2]), min(x.shape[-1], y.shape[-1]))
    return center_crop(x, size), center_crop(y, size)


def normalize(
    data: torch.Tensor,
    mean: float | torch.Tensor,
    stddev: float | torch.Tensor,
    eps: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """``(data − mean) / (stddev + eps)``."""
    return (data - mean) / (stddev + eps)


def normalize_instance(
    data: torch.Tensor, eps: float | torch.Tensor = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalise by the tensor's own mean and (unbiased) standard deviation; returns ``(normalised, mean, std)``."""
    mean, std = data.mean(), data.std()
    return normalize(data, mean, std, eps), mean, std


def filename_seed(fname: str) -> tuple[int, ...]:
    """Mask seed from a file name (code points), so every slice of a volume gets the same mask, as fastmri."""
    return tuple(map(ord, fname))


class VarNetSample(NamedTuple):
    """Input of k-space models (VarNet and the classical baselines).

    Attributes:
        masked_kspace: ``(C, H, W, 2)`` undersampled k-space (``(H, W, 2)`` for single-coil).
        mask: ``(1, 1, W, 1)`` bool sampling mask (``(1, H, W, 1)`` for 2D masks; one axis fewer for single-coil).
        num_low_frequencies: fully sampled centre lines (0 when the mask came from the file).
        target: ``(h, w)`` target image, or a 0-dim tensor when there is none.
        fname: file name.
        slice_num: slice index.
        max_value: the volume's ``max`` attr (0.0 without target), for PSNR / SSIM.
        crop_size: ``(h, w)`` recon size to crop the model output to.
    """

    masked_kspace: torch.Tensor
    mask: torch.Tensor
    num_low_frequencies: int | None
    target: torch.Tensor
    fname: str
    slice_num: int
    max_value: float
    crop_size: tuple[int, int]


def _require_max(attrs: dict, fname: str) -> float:
    if "max" not in attrs:
        raise DataError(fname, "file attrs lack 'max' (needed with a target for PSNR / SSIM)")
    return attrs["max"]


class VarNetDataTransform:
    """fastmri's ``VarNetDataTransform``: undersample with ``mask_func`` (or use the file's mask), keep crop info.

    Args:
        mask_func: mask function; None uses the file's stored mask, or a fully sampled mask when there is none.
        use_seed: seed the mask from the file name (same mask for all slices of a volume).
        stored_mask_first: use a file's stored ``mask`` (already undersampled k-space, e.g. fastMRI's test and
            challenge files) even when ``mask_func`` is set, instead of drawing a second mask over it (fastmri's
            transform draws one whenever it has a ``mask_func``; off by default for that reason).

    Call with the ``SliceDataset`` tuple ``(kspace, mask, target, attrs, fname, slice_num)``; ``attrs`` must hold
    ``padding_left``, ``padding_right`` and ``recon_size`` (and ``max`` when there is a target).
    """

    def __init__(self, mask_func: MaskFunc | None = None, use_seed: bool = True, stored_mask_first: bool = False):
        self.mask_func = mask_func
        self.use_seed = use_seed
        self.stored_mask_first = stored_mask_first

    def __call__(
        self,
        kspace: np.ndarray,
        mask: np.ndarray | None,
        target: np.ndarray | None,
        attrs: dict,
        fname: str,
        slice_num: int,
    ) -> VarNetSample:
        """One slice of :class:`reconkit.data.SliceDataset`'s tuple → :class:`VarNetSample`.

        ``kspace`` complex ``(C, H, W)`` (single-coil ``(H, W)``); ``mask`` the file's stored ``(W,)`` mask or
        None; ``target`` real ``(h, w)`` or None. Raises :class:`~reconkit.errors.DataError` naming ``fname`` for a
        target whose ``attrs`` lack ``max``.
        """
        if target is not None:
            target_torch, max_value = to_tensor(target), _require_max(attrs, fname)
        else:
            target_torch, max_value = torch.tensor(0), 0.0
        kspace_torch = to_tensor(kspace)
        padding = (attrs["padding_left"], attrs["padding_right"])
        crop_size = (attrs["recon_size"][0], attrs["recon_size"][1])

        if self.mask_func is not None and not (self.stored_mask_first and mask is not None):
            seed = filename_seed(fname) if self.use_seed else None
            masked_kspace, mask_torch, num_low_frequencies = apply_mask(
                kspace_torch, self.mask_func, seed=seed, padding=padding
            )
        else:
            num_cols = kspace_torch.shape[-2]
            columns = np.ones(num_cols, dtype=np.float32) if mask is None else mask
            mask_shape = [1] * kspace_torch.ndim
            mask_shape[-2] = num_cols
            mask_torch = torch.from_numpy(np.asarray(columns).reshape(*mask_shape).astype(np.float32))
            mask_torch[..., : padding[0], :] = 0
            mask_torch[..., padding[1] :, :] = 0
            masked_kspace, num_low_frequencies = kspace_torch, 0

        return VarNetSample(
            masked_kspace=masked_kspace,
            mask=mask_torch.to(torch.bool),
            num_low_frequencies=num_low_frequencies,
            target=target_torch,
            fname=fname,
            slice_num=slice_num,
            max_value=max_value,
            crop_size=crop_size,
        )


class UnetSample(NamedTuple):
    """Input of image-domain models (U-Net).

    Attributes:
        image: ``(h, w)`` normalised, clamped zero-filled magnitude (RSS over coils for multi-coil).
        target: ``(h, w)`` target normalised with the input's mean / std, or ``tensor([0])`` without target.
        mean, std: 0-dim tensors used for the normalisation.
        fname, slice_num: as the dataset.
        max_value: the volume's ``max`` attr, 0.0 if absent (with a target its absence is a ``DataError``).
    """

    image: torch.Tensor
    target: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    fname: str
    slice_num: int
    max_value: float


class UnetDataTransform:
    """fastmri's ``UnetDataTransform``: zero-filled magnitude image, centre-cropped and instance-normalised.

    Args:
        which_challenge: ``"singlecoil"`` or ``"multicoil"`` (RSS over coils).
        mask_func: mask function; None keeps k-space as is.
        use_seed: seed the mask from the file name.
        stored_mask_first: keep the k-space of a file with a stored ``mask`` (already undersampled) as it is, even
            when ``mask_func`` is set (as :class:`VarNetDataTransform`'s).
    """

    def __init__(self, which_challenge: str, mask_func: MaskFunc | None = None, use_seed: bool = True,
                 stored_mask_first: bool = False):
        if which_challenge not in ("singlecoil", "multicoil"):
            raise ValueError("Challenge should either be 'singlecoil' or 'multicoil'")
        self.which_challenge = which_challenge
        self.mask_func = mask_func
        self.use_seed = use_seed
        self.stored_mask_first = stored_mask_first

    def __call__(
        self,
        kspace: np.ndarray,
        mask: np.ndarray | None,
        target: np.ndarray | None,
        attrs: dict,
        fname: str,
        slice_num: int,
    ) -> UnetSample:
        """One slice of :class:`reconkit.data.SliceDataset`'s tuple → :class:`UnetSample`.

        ``kspace`` complex ``(C, H, W)`` (single-coil ``(H, W)``); ``mask`` the file's stored ``(W,)`` mask or
        None; ``target`` real ``(h, w)`` or None; ``attrs`` needs ``recon_size`` when there is no target. Raises
        :class:`~reconkit.errors.DataError` naming ``fname`` for a target whose ``attrs`` lack ``max``.
        """
        kspace_torch = to_tensor(kspace)
        # fastmri takes a missing 'max' as 0.0, with a target too: PSNR -inf, SSIM NaN
        max_value = attrs.get("max", 0.0) if target is None else _require_max(attrs, fname)
        if self.mask_func is not None and not (self.stored_mask_first and mask is not None):
            seed = filename_seed(fname) if self.use_seed else None
            kspace_torch = apply_mask(kspace_torch, self.mask_func, seed=seed)[0]
        image = ifft2c(kspace_torch)

        if target is not None:
            crop_size = (target.shape[-2], target.shape[-1])
        else:
            crop_size = (attrs["recon_size"][0], attrs["recon_size"][1])
        if image.shape[-2] < crop_size[1]:  # k-space narrower than the recon size (fastMRI brain FLAIR 203)
            crop_size = (image.shape[-2], image.shape[-2])

        image = complex_abs(complex_center_crop(image, crop_size))
        if self.which_challenge == "multicoil":
            image = rss(image)
        image, mean, std = normalize_instance(image, eps=1e-11)
        image = image.clamp(-6, 6)

        if target is not None:
            target_torch = normalize(center_crop(to_tensor(target), crop_size), mean, std, eps=1e-11).clamp(-6, 6)
        else:
            target_torch = torch.Tensor([0])
        return UnetSample(
            image=image, target=target_torch, mean=mean, std=std, fname=fname, slice_num=slice_num, max_value=max_value
        )
