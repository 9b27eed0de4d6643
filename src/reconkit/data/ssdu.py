"""SSDU self-supervision (Yaman et al., MRM 2020): split the acquired k-space into Θ (network input / data
consistency) and Λ (loss), train on undersampled data only.

Selection follows the paper's reference code: Λ takes ``ceil(ρ · |acquired|)`` of the acquired k-space
*points* (2D, readout × phase-encode), drawn uniformly or with a Gaussian density centred on k-space
(standard deviation ``(H, W) / std_scale``), never from the auto-calibration (ACS) lines, which stay in Θ;
Θ = acquired − Λ. The multi-mask variant draws ``num_splits`` (K) independent splits of the same slice.

Masks here are 2D ``(H, W)`` bool arrays; the transform returns them as ``(K, 1, H, W, 1)`` float tensors.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from reconkit.data.masks import MaskFunc, create_mask_for_mask_type
from reconkit.data.transforms import VarNetDataTransform, to_tensor

__all__ = ["SELECTIONS", "SsduSample", "SsduVarNetTransform", "acs_columns", "ssdu_split"]

SELECTIONS = ("uniform", "gaussian")


def acs_columns(line_mask: np.ndarray, num_low_frequencies: int) -> np.ndarray:
    """Bool ``(W,)``: the ``num_low_frequencies`` centre columns (the ACS block as the mask functions place it,
    columns ``[(W − n + 1) // 2, (W − n + 1) // 2 + n)``), restricted to acquired columns."""
    width = line_mask.shape[-1]
    acs = np.zeros(width, dtype=bool)
    if num_low_frequencies > 0:
        start = (width - num_low_frequencies + 1) // 2
        acs[start:start + num_low_frequencies] = True
    return acs & line_mask.astype(bool)


def ssdu_split(
    acquired: np.ndarray,
    acs: np.ndarray,
    rho: float = 0.4,
    selection: str = "uniform",
    rng: np.random.Generator | None = None,
    std_scale: float = 4.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Split acquired k-space locations into ``(theta, lam)`` (Θ, Λ), both bool ``(H, W)``.

    Args:
        acquired: bool ``(H, W)`` acquired locations (a line mask broadcast over the readout).
        acs: bool ``(H, W)`` (or ``(W,)`` columns) locations that must stay in Θ.
        rho: fraction of the acquired points moved to Λ (``ceil(ρ · |acquired|)``, capped by the points
            outside the ACS); the paper's default 0.4.
        selection: ``"uniform"`` or ``"gaussian"`` (density ∝ Gaussian centred on k-space, std ``size / std_scale``).
        rng: generator (a fresh unseeded one when None).
        std_scale: the Gaussian's ``(H, W) / std`` ratio.

    Returns:
        ``(theta, lam)``: disjoint, ``theta | lam == acquired``, ACS ⊂ theta.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"SSDU selection must be one of {SELECTIONS}, got {selection!r}")
    if not 0.0 < rho < 1.0:
        raise ValueError(f"SSDU rho must be in (0, 1), got {rho}")
    rng = rng if rng is not None else np.random.default_rng()
    acquired = acquired.astype(bool)
    acs = np.broadcast_to(acs.astype(bool), acquired.shape)
    candidates = np.flatnonzero(acquired & ~acs)
    count = min(int(np.ceil(rho * acquired.sum())), candidates.size)
    if selection == "uniform":
        weights = None
    else:
        height, width = acquired.shape
        rows, cols = np.unravel_index(candidates, acquired.shape)
        z = ((rows - height / 2) / (height / std_scale)) ** 2 + ((cols - width / 2) / (width / std_scale)) ** 2
        density = np.exp(-0.5 * z)
        weights = density / density.sum()
    chosen = rng.choice(candidates, size=count, replace=False, p=weights)
    lam = np.zeros(acquired.size, dtype=bool)
    lam[chosen] = True
    lam = lam.reshape(acquired.shape)
    return acquired & ~lam, lam


class SsduSample(NamedTuple):
    """A self-supervised training sample: undersampled data only, no fully sampled target.

    Attributes:
        masked_kspace: ``(C, H, W, 2)`` acquired (undersampled) k-space, zero elsewhere.
        theta_mask: ``(K, 1, H, W, 1)`` float Θ masks (network input and data consistency), one per split.
        lambda_mask: ``(K, 1, H, W, 1)`` float Λ masks (loss locations), disjoint from Θ.
        num_low_frequencies: ACS width (kept in every Θ).
        fname, slice_num: as the dataset.
        max_value: the volume's ``max`` attr (0.0 if absent); not used by the SSDU loss.
        crop_size: ``(h, w)`` recon size.
    """

    masked_kspace: torch.Tensor
    theta_mask: torch.Tensor
    lambda_mask: torch.Tensor
    num_low_frequencies: int
    fname: str
    slice_num: int
    max_value: float
    crop_size: tuple[int, int]


class SsduVarNetTransform:
    """Training transform for SSDU: undersample as :class:`VarNetDataTransform`, then split the acquired
    locations ``num_splits`` times into Θ / Λ. The fully sampled target is dropped (never leaves the transform).

    Args:
        mask_type, center_fractions, accelerations: the acquisition's mask family (as the data module's).
        rho: fraction of acquired points in Λ (default 0.4).
        selection: ``"uniform"`` or ``"gaussian"``.
        num_splits: K, splits per slice (multi-mask SSDU); 1 is the original SSDU.
        std_scale: Gaussian selection's ``size / std``.
        seed: base seed of the split draws (per sample from ``(seed, epoch, fname, slice_num)``).
        use_seed: fixed acquisition mask per volume (seeded by file name), as a real undersampled scan has.
            Default True: a self-supervised data set is a set of undersampled scans.
    """

    def __init__(
        self,
        mask_type: str = "equispaced_fraction",
        center_fractions: Sequence[float] = (0.08,),
        accelerations: Sequence[int] = (4,),
        rho: float = 0.4,
        selection: str = "uniform",
        num_splits: int = 1,
        std_scale: float = 4.0,
        seed: int = 0,
        use_seed: bool = True,
    ):
        if num_splits < 1:
            raise ValueError(f"SSDU num_splits must be >= 1, got {num_splits}")
        ssdu_split(np.ones((2, 2), dtype=bool), np.zeros(2, dtype=bool), rho, selection)  # validate early
        self.mask_func: MaskFunc = create_mask_for_mask_type(mask_type, list(center_fractions), list(accelerations))
        self.plain = VarNetDataTransform(mask_func=self.mask_func, use_seed=use_seed)
        self.rho, self.selection, self.num_splits, self.std_scale = rho, selection, num_splits, std_scale
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """New splits every epoch (the data module calls this)."""
        self.epoch = epoch

    def __call__(self, kspace: np.ndarray, mask: np.ndarray | None, target: np.ndarray | None, attrs: dict,
                 fname: str, slice_num: int) -> SsduSample:
        sample = self.plain(kspace, mask, None, attrs, fname, slice_num)  # target deliberately not passed
        height, width = sample.masked_kspace.shape[-3], sample.masked_kspace.shape[-2]
        line_mask = sample.mask.reshape(-1, width)[0].numpy()  # (W,) line masks; first row of a 2D mask
        acquired = np.broadcast_to(sample.mask.reshape(-1, width).numpy(), (height, width)).astype(bool)
        acs = acs_columns(line_mask, int(sample.num_low_frequencies or 0))
        key = f"ssdu:{self.seed}:{self.epoch}:{fname}:{slice_num}".encode()
        rng = np.random.default_rng(zlib.crc32(key))
        splits = [ssdu_split(acquired, acs, self.rho, self.selection, rng, self.std_scale)
                  for _ in range(self.num_splits)]  # fmt: skip
        theta = to_tensor(np.stack([s[0] for s in splits]).astype(np.float32))[:, None, :, :, None]
        lam = to_tensor(np.stack([s[1] for s in splits]).astype(np.float32))[:, None, :, :, None]
        return SsduSample(
            masked_kspace=sample.masked_kspace,
            theta_mask=theta,
            lambda_mask=lam,
            num_low_frequencies=int(sample.num_low_frequencies or 0),
            fname=fname,
            slice_num=slice_num,
            max_value=float(attrs.get("max", 0.0)),
            crop_size=sample.crop_size,
        )
