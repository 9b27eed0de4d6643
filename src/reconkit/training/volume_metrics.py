"""Per-volume NMSE / PSNR / SSIM from per-slice statistics, gathered across distributed ranks.

fastMRI scores a reconstruction per *volume* (all slices of one file) and then averages over volumes. Under
DDP a volume's slices can land on different ranks, so each rank reduces its slices to small
:class:`SliceStats` records, the records are gathered on every rank, de-duplicated by ``(fname, slice_num)``
(distributed samplers pad the last batch with repeats) and combined per volume:

* NMSE = sum of squared errors / sum of squared target over the volume (``fastmri.evaluate.nmse``),
* PSNR = 20 log10(max_value) - 10 log10(MSE over the volume) (``fastmri.evaluate.psnr`` with ``maxval``),
* SSIM = mean over slices of the slice SSIM (``fastmri.evaluate.ssim`` averages slices the same way).

The slice SSIM comes from :func:`reconkit.metrics.ssim`; the sums are exact, so the volume numbers equal
``reconkit.metrics`` / ``fastmri.evaluate`` on the stacked volume (``tests/test_training_metrics.py``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from reconkit.metrics import ssim

METRIC_NAMES = ("nmse", "psnr", "ssim")
Record = TypeVar("Record")


@dataclass(frozen=True)
class SliceStats:
    """What one reconstructed slice contributes to its volume's metrics.

    sse / target_energy are sums over the slice's pixels (units: target intensity squared); ssim is the slice
    SSIM with ``data_range = max_value`` (the volume's maximum target value, file attribute ``max``).
    """

    fname: str
    slice_num: int
    sse: float
    target_energy: float
    num_pixels: int
    ssim: float
    max_value: float


def slice_stats(output: torch.Tensor, target: torch.Tensor, max_value: float, fname: str, slice_num: int) -> SliceStats:
    """Reduce one slice to :class:`SliceStats`.

    Args:
        output: reconstructed magnitude image ``(h, w)``, already cropped to the target's recon size.
        target: reference magnitude image ``(h, w)``.
        max_value: the volume's maximum target value (data range for SSIM and PSNR).
    """
    if output.shape != target.shape:
        raise ValueError(f"{fname} slice {slice_num}: output shape {tuple(output.shape)} != target shape "
                         f"{tuple(target.shape)}; crop the output to the target's recon size first")
    out = output.detach().cpu().double().numpy()  # float64 on the CPU: MPS has no float64
    ref = target.detach().cpu().double().numpy()
    return SliceStats(
        fname=str(fname),
        slice_num=int(slice_num),
        sse=float(np.sum((ref - out) ** 2)),
        target_energy=float(np.sum(ref**2)),
        num_pixels=int(ref.size),
        ssim=float(ssim(ref[None], out[None], maxval=float(max_value))),
        max_value=float(max_value),
    )


def gather_slice_stats(local: list[Record]) -> list[Record]:
    """All ranks' records on every rank (a no-op without an initialised process group), de-duplicated by
    ``(fname, slice_num)`` and in that order: :class:`SliceStats`, or any record with those two fields."""
    records = local
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list[list[SliceStats]] = [[] for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather_object(gathered, local)
        records = [r for rank_records in gathered for r in rank_records]
    unique = {(r.fname, r.slice_num): r for r in records}
    return [unique[key] for key in sorted(unique)]


def volume_metrics(records: Iterable[SliceStats]) -> dict[str, dict[str, float]]:
    """``{fname: {"nmse", "psnr", "ssim", "num_slices"}}`` for every volume in ``records``."""
    by_volume: dict[str, list[SliceStats]] = defaultdict(list)
    for r in records:
        by_volume[r.fname].append(r)
    result = {}
    for fname, slices in sorted(by_volume.items()):
        sse = sum(s.sse for s in slices)
        energy = sum(s.target_energy for s in slices)
        pixels = sum(s.num_pixels for s in slices)
        max_value = max(s.max_value for s in slices)
        result[fname] = {
            "nmse": sse / energy if energy > 0 else math.nan,
            "psnr": 20 * math.log10(max_value) - 10 * math.log10(sse / pixels) if sse > 0 else math.inf,
            "ssim": float(np.mean([s.ssim for s in slices])),
            "num_slices": len(slices),
        }
    return result


def mean_over_volumes(per_volume: dict[str, dict[str, float]]) -> dict[str, float]:
    """Average each metric over volumes (fastMRI's leaderboard convention); empty input gives NaNs."""
    if not per_volume:
        return dict.fromkeys(METRIC_NAMES, math.nan)
    return {name: float(np.mean([v[name] for v in per_volume.values()])) for name in METRIC_NAMES}
