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
from reconkit.errors import check_number

__all__ = ["SELECTIONS", "SsduSample", "SsduVarNetTransform", "acs_region", "ssdu_split"]

SELECTIONS = ("uniform", "gaussian")


def _centre_run(line: np.ndarray) -> int:
    """ACS width of a line mask measured as fastmri's VarNet measures it: twice the shorter run of acquired
    entries going out from index ``len // 2`` (at least 1)."""
    centre = line.size // 2
    right = int(np.argmin(np.append(line[centre:], False)))
    left = int(np.argmin(np.append(line[:centre][::-1], False)))
    return max(2 * min(left, right), 1)


def acs_region(acquired: np.ndarray, num_low_frequencies: int = 0) -> np.ndarray:
    """Bool ``(H, W)``: the fully sampled centre (ACS) of the acquired locations ``acquired`` ``(H, W)``.

    Columns: the ``num_low_frequencies`` centre columns ``[(W − n + 1) // 2, … + n)`` as the mask functions place
    them, or, when it is 0 (a file's stored mask), the width measured on the centre row as the VarNet's
    sensitivity model measures it. Rows: the run around ``H // 2`` of rows that hold all those columns, i.e. every
    row for a line mask and the centre block's rows for a 2D mask.

    >>> lines = np.zeros((4, 10), bool); lines[:, 3:7] = lines[:, ::3] = True
    >>> acs_region(lines).sum(axis=0).tolist()
    [0, 0, 0, 4, 4, 4, 4, 0, 0, 0]
    """
    acquired = acquired.astype(bool)
    height, width = acquired.shape
    count = int(num_low_frequencies) or _centre_run(acquired[height // 2])
    start = (width - count + 1) // 2
    window = np.zeros(width, dtype=bool)
    window[start : start + count] = True
    full_rows = (acquired | ~window).all(axis=1)
    top = height // 2 - int(np.argmin(np.append(full_rows[: height // 2][::-1], False)))
    bottom = height // 2 + int(np.argmin(np.append(full_rows[height // 2 :], False)))
    rows = np.zeros(height, dtype=bool)
    rows[top:bottom] = True
    return rows[:, None] & window[None, :] & acquired


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
        std_scale: the Gaussian's ``(H, W) / std`` ratio, a finite number > 0.

    Returns:
        ``(theta, lam)``: disjoint, ``theta | lam == acquired``, ACS ⊂ theta.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"SSDU selection must be one of {SELECTIONS}, got {selection!r}")
    if not 0.0 < rho < 1.0:
        raise ValueError(f"SSDU rho must be in (0, 1), got {rho}")
    check_number("SSDU std_scale", std_scale, 0, strict=True)  # gaussian: 0 divided by zero, NaN made NaN weights
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
        masked_kspace: ``(C, H, W, 2)`` acquired (undersampled) k-space, zero elsewhere (``(H, W, 2)`` single-coil).
        theta_mask: ``(K, 1, H, W, 1)`` float Θ masks (network input and data consistency), one per split.
        lambda_mask: ``(K, 1, H, W, 1)`` float Λ masks (loss locations), disjoint from Θ.
        num_low_frequencies: ACS width in columns (the ACS is kept in every Θ).
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
    """Training transform for SSDU: undersample as :class:`VarNetDataTransform` (a file with a stored ``mask`` is
    taken as acquired: its lines are split, no mask is drawn over them), then split the acquired locations
    ``num_splits`` times into Θ / Λ, the ACS (:func:`acs_region`) always in Θ. The fully sampled target is
    dropped (never leaves the transform).

    Args:
        mask_type, center_fractions, accelerations: the acquisition's mask family (as the data module's).
        rho: fraction of acquired points in Λ (default 0.4).
        selection: ``"uniform"`` or ``"gaussian"``.
        num_splits: K, splits per slice (multi-mask SSDU); 1 is the original SSDU.
        std_scale: Gaussian selection's ``size / std``.
        seed: base seed of the split draws (per sample from ``(seed, epoch, fname, slice_num)``).
        use_seed: fixed acquisition mask per volume (seeded by file name), as a real undersampled scan has.
            Default True: a self-supervised data set is a set of undersampled scans.

    ``needs_target`` is False: the data module does not require the training files to hold a target.
    """

    needs_target = False

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
        ssdu_split(np.ones((2, 2), dtype=bool), np.zeros(2, dtype=bool), rho, selection, None, std_scale)  # validate
        self.mask_func: MaskFunc = create_mask_for_mask_type(mask_type, list(center_fractions), list(accelerations))
        # a file with a stored mask is an undersampled scan already: split its acquired lines, draw no mask over it
        self.plain = VarNetDataTransform(mask_func=self.mask_func, use_seed=use_seed, stored_mask_first=True)
        self.rho, self.selection, self.num_splits, self.std_scale = rho, selection, num_splits, std_scale
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """New splits every epoch (the data module passes the epoch with every sample index, so DataLoader workers
        see it; a call in the main process does not reach persistent workers)."""
        self.epoch = epoch

    def __call__(self, kspace: np.ndarray, mask: np.ndarray | None, target: np.ndarray | None, attrs: dict,
                 fname: str, slice_num: int) -> SsduSample:
        sample = self.plain(kspace, mask, None, attrs, fname, slice_num)  # target deliberately not passed
        height, width = sample.masked_kspace.shape[-3], sample.masked_kspace.shape[-2]
        acquired = np.broadcast_to(sample.mask.reshape(-1, width).numpy(), (height, width)).astype(bool)
        acs = acs_region(acquired, int(sample.num_low_frequencies or 0))
        num_low_frequencies = int(acs.any(axis=0).sum())
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
            num_low_frequencies=num_low_frequencies,
            fname=fname,
            slice_num=slice_num,
            max_value=float(attrs.get("max", 0.0)),
            crop_size=sample.crop_size,
        )
