"""Image-quality metrics as fastMRI reports them, on whole volumes and on batches.

Volume metrics take numpy magnitude volumes ``(slices, H, W)`` (ground truth first) and return the numbers of
``fastmri.evaluate``: ``nmse`` (``‖gt − pred‖² / ‖gt‖²``), ``psnr`` (dB, over the whole volume, peak = ``maxval``,
by default the ground truth's maximum) and ``ssim`` (mean over slices of the per-slice SSIM with data range
``maxval``). They are computed in float64.

``psnr_torch`` / ``ssim_torch`` are batch versions for validation loops: one value per image of a ``(B, H, W)``
batch, peak / data range per image (default: each ground-truth image's maximum), on the tensors' device.

:class:`MetricTable` collects per-volume values and reports mean ± std over volumes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from reconkit.metrics.losses import ssim_map, uniform_window

__all__ = ["MetricTable", "nmse", "psnr", "psnr_torch", "ssim", "ssim_torch", "volume_metrics"]


def _check_pair(gt: np.ndarray, pred: np.ndarray, metric: str, ndim: int | None = None, real: bool = True) -> None:
    if real and (np.iscomplexobj(gt) or np.iscomplexobj(pred)):  # a float64 cast would keep the real parts alone
        raise ValueError(f"{metric}: complex images; pass magnitudes (np.abs), as fastmri.evaluate needs")
    if gt.shape != pred.shape:
        raise ValueError(f"{metric}: ground truth {gt.shape} and prediction {pred.shape} differ in shape")
    if ndim is not None and gt.ndim != ndim:
        raise ValueError(f"{metric}: expected volumes of {ndim} dimensions (slices, H, W); got shape {gt.shape}")
    if gt.size == 0:
        raise ValueError(f"{metric}: empty volume")


def nmse(gt: np.ndarray, pred: np.ndarray) -> float:
    """Normalised mean squared error ``‖gt − pred‖² / ‖gt‖²`` of two arrays of one shape (complex ones too, as
    fastmri's). ValueError for arrays of different shapes (fastmri broadcasts them) or empty ones."""
    _check_pair(gt, pred, "nmse", real=False)
    dtype = np.complex128 if np.iscomplexobj(gt) or np.iscomplexobj(pred) else np.float64
    gt64 = np.asarray(gt, dtype).ravel()
    error = gt64 - np.asarray(pred, dtype).ravel()
    return float(np.vdot(error, error).real / np.vdot(gt64, gt64).real)  # BLAS dot products, as fastmri's norms


def psnr(gt: np.ndarray, pred: np.ndarray, maxval: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(maxval² / MSE)``; ``maxval`` defaults to ``gt.max()``. ``inf``
    for a prediction equal to the ground truth (as fastmri's, without numpy's divide-by-zero warning). ValueError
    for arrays of different shapes, complex or empty ones."""
    _check_pair(gt, pred, "psnr")
    gt64, pred64 = np.asarray(gt, np.float64), np.asarray(pred, np.float64)
    peak = gt64.max() if maxval is None else float(maxval)
    mse = np.mean((gt64 - pred64) ** 2)
    with np.errstate(divide="ignore"):
        return float(10 * np.log10(peak**2 / mse))


def ssim(gt: np.ndarray, pred: np.ndarray, maxval: float | None = None, win_size: int = 7) -> float:
    """Mean over slices of the SSIM of ``(slices, H, W)`` volumes; data range ``maxval`` (default ``gt.max()``).
    ValueError for volumes of different shapes, not 3D, complex or empty."""
    _check_pair(gt, pred, "ssim", ndim=3)
    x = torch.from_numpy(np.asarray(gt, np.float64)).unsqueeze(1)
    y = torch.from_numpy(np.asarray(pred, np.float64)).unsqueeze(1)
    data_range = torch.full((1,), float(x.max() if maxval is None else maxval), dtype=torch.float64)
    # slice by slice (the local statistics of a whole volume at once are ~10 float64 copies of it), with box means
    # from running sums: a float64 convolution unfolds every window (win_size² copies of the image), ~40× slower
    per_slice = [ssim_map(x[s : s + 1], y[s : s + 1], data_range, win_size).mean() for s in range(x.shape[0])]
    return float(torch.stack(per_slice).mean())


def _per_image_peak(gt: torch.Tensor, maxval: torch.Tensor | float | None, name: str) -> torch.Tensor:
    """``(B,)`` peaks: ``maxval`` as a scalar or one value per image of any shape (``(B,)``, ``(B, 1)``,
    ``(B, 1, 1)`` from ``amax(keepdim=True)``), by default each ground-truth image's maximum."""
    if maxval is None:
        return gt.flatten(1).amax(dim=1)
    peak = torch.as_tensor(maxval, dtype=gt.dtype, device=gt.device)
    if peak.numel() not in (1, gt.shape[0]):
        raise ValueError(f"{name}: maxval must be a scalar or one value per image ({gt.shape[0]}); got shape "
                         f"{tuple(peak.shape)}")
    return peak.reshape(-1).expand(gt.shape[0])


def psnr_torch(gt: torch.Tensor, pred: torch.Tensor, maxval: torch.Tensor | float | None = None) -> torch.Tensor:
    """PSNR in dB per image of ``(B, H, W)`` batches → ``(B,)``.

    ``maxval`` is a scalar or one value per image (``(B,)``, ``(B, 1)``, ...); by default each ground-truth image's
    maximum.
    """
    if gt.shape != pred.shape:
        raise ValueError(f"psnr_torch: shapes {tuple(gt.shape)} and {tuple(pred.shape)} differ")
    if gt.is_complex() or pred.is_complex():
        raise ValueError("psnr_torch: complex images; pass magnitudes (abs)")
    mse = ((gt - pred) ** 2).flatten(1).mean(dim=1)
    return 10 * torch.log10(_per_image_peak(gt, maxval, "psnr_torch") ** 2 / mse)


def ssim_torch(
    gt: torch.Tensor, pred: torch.Tensor, maxval: torch.Tensor | float | None = None, win_size: int = 7
) -> torch.Tensor:
    """SSIM per image of ``(B, H, W)`` batches → ``(B,)``; data range scalar or one per image (``(B,)``, ``(B, 1)``,
    ...), default per-image max.

    With ``maxval`` set to the volume's maximum for every slice, the mean of this over a volume's slices is
    :func:`ssim` of the volume (up to float32 rounding).
    """
    if gt.shape != pred.shape or gt.ndim != 3:
        raise ValueError(
            f"ssim_torch: expected two (B, H, W) batches of one shape; got {tuple(gt.shape)}, {tuple(pred.shape)}"
        )
    window = uniform_window(win_size, torch.promote_types(gt.dtype, torch.float32), gt.device)
    data_range = _per_image_peak(gt, maxval, "ssim_torch")
    return ssim_map(gt.unsqueeze(1), pred.unsqueeze(1), data_range, window).mean(dim=(1, 2, 3))


def volume_metrics(gt: np.ndarray, pred: np.ndarray, maxval: float | None = None) -> dict[str, float]:
    """``{"NMSE", "PSNR", "SSIM"}`` of one ``(slices, H, W)`` volume, as ``fastmri.evaluate`` computes them;
    ValueError as :func:`ssim`."""
    return {"NMSE": nmse(gt, pred), "PSNR": psnr(gt, pred, maxval), "SSIM": ssim(gt, pred, maxval)}


@dataclass
class MetricTable:
    """Per-volume metric values and their mean ± standard deviation over volumes.

    Example:
        >>> table = MetricTable()
        >>> table.add("file1", {"PSNR": 30.0, "SSIM": 0.8})
        >>> table.add("file2", {"PSNR": 32.0, "SSIM": 0.9})
        >>> table.summary()["PSNR"]
        (31.0, 1.4142135623730951)
    """

    rows: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(self, name: str, values: dict[str, float]) -> None:
        """Record the metrics of volume ``name`` (replacing an earlier entry of that name)."""
        self.rows[name] = {key: float(value) for key, value in values.items()}

    def metric_names(self) -> list[str]:
        """Metric names in first-seen order."""
        return list(dict.fromkeys(key for values in self.rows.values() for key in values))

    def summary(self) -> dict[str, tuple[float, float]]:
        """``{metric: (mean, std)}`` over the volumes that have it; sample std (n − 1, as fastmri's runstats), 0 for
        a single volume."""
        out = {}
        for key in self.metric_names():
            values = [row[key] for row in self.rows.values() if key in row]
            mean = sum(values) / len(values)
            spread = sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)
            out[key] = (mean, math.sqrt(spread))
        return out

    def format(self) -> str:
        """One line per metric: ``NAME = mean +/- std (n volumes)``, ``n`` the volumes that have that metric.

        Example:
            >>> table = MetricTable()
            >>> table.add("file1", {"PSNR": 30.0, "SSIM": 0.8})
            >>> table.add("file2", {"PSNR": 32.0})
            >>> print(table.format())
            PSNR = 31 +/- 1.414 (2 volumes)
            SSIM = 0.8 +/- 0 (1 volume)
        """
        lines = []
        for key, (mean, std) in self.summary().items():
            count = sum(key in row for row in self.rows.values())
            lines.append(f"{key} = {mean:.4g} +/- {std:.4g} ({count} volume{'' if count == 1 else 's'})")
        return "\n".join(lines)
