"""Structural similarity in PyTorch: the SSIM map shared by the loss, the batch metric and the volume metric.

SSIM here is the one fastMRI reports: a uniform ``win_size × win_size`` window, sample (``N − 1``) covariances,
constants ``C1 = (k1 · L)²`` and ``C2 = (k2 · L)²`` for data range ``L``, averaged over the window positions that
lie fully inside the image. That equals ``skimage.metrics.structural_similarity`` with its defaults (which pads,
filters and then crops the ``(win_size − 1) / 2`` border) and ``fastmri.losses.SSIMLoss``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reconkit.errors import check_number

__all__ = ["SSIMLoss", "ssim_map", "uniform_window"]


def _check_win_size(win_size: object) -> None:
    """ConfigError (a ValueError) unless ``win_size`` is an integer >= 2: the sample covariances divide by
    ``win_size² − 1`` (1 was a ZeroDivisionError, 0 a shape error, a negative size gave SSIM 1 for any images)."""
    check_number("ssim win_size", win_size, 2, integer=True)


def uniform_window(win_size: int, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    """``(1, 1, win_size, win_size)`` averaging kernel (all entries ``1 / win_size²``); ValueError unless
    ``win_size`` is an integer >= 2."""
    _check_win_size(win_size)
    return torch.full((1, 1, win_size, win_size), 1.0 / win_size**2, dtype=dtype, device=device)


def ssim_map(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: torch.Tensor,
    window: torch.Tensor | int,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Local SSIM at every window position fully inside the images.

    Computed in float32 (float64 stays float64), also for half-precision inputs and under ``torch.autocast``: in
    bfloat16 / float16 the variances ``E[x²] − E[x]²`` cancel to noise (SSIM above 1) and float16 squares of
    raw-scale MRI magnitudes (~1e-4) underflow.

    Args:
        x, y: images ``(B, 1, H, W)`` (x and y enter symmetrically).
        data_range: ``(B,)`` dynamic range ``L`` per image (fastMRI uses the target volume's maximum).
        window: ``(1, 1, w, w)`` averaging kernel summing to 1, or ``w`` (an integer >= 2, else ValueError) for
            the uniform ``w × w`` window computed from running sums (the same values up to rounding; in float64 on
            the CPU ~20× faster than a convolution, which unfolds every window).
        k1, k2: SSIM stabilisation constants.

    Returns:
        ``(B, 1, H − w + 1, W − w + 1)`` SSIM values (1 where ``x == y``), float32 or float64.
    """
    if isinstance(window, torch.Tensor):
        win_size = window.shape[-1]
    else:
        _check_win_size(window)
        win_size = window
    if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(
            f"ssim: expected two (B, 1, H, W) images of one shape; got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.is_complex() or y.is_complex():
        raise ValueError("ssim: complex images; pass magnitudes (abs)")
    if min(x.shape[-2:]) < win_size:
        raise ValueError(f"ssim: images {tuple(x.shape[-2:])} are smaller than the {win_size}x{win_size} window")
    num_px = win_size**2
    cov_norm = num_px / (num_px - 1)
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    x, y = x.to(dtype), y.to(dtype)
    data_range = data_range.to(dtype).reshape(-1, 1, 1, 1)
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2

    def local_mean(image: torch.Tensor) -> torch.Tensor:
        return F.conv2d(image, window.to(dtype)) if isinstance(window, torch.Tensor) else _box_mean(image, win_size)

    with torch.autocast(x.device.type, enabled=False):  # autocast would run the convolutions in half precision
        ux, uy = local_mean(x), local_mean(y)
        uxx, uyy, uxy = local_mean(x * x), local_mean(y * y), local_mean(x * y)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    numerator = (2 * ux * uy + c1) * (2 * vxy + c2)
    denominator = (ux**2 + uy**2 + c1) * (vx + vy + c2)
    return numerator / denominator


def _box_mean(image: torch.Tensor, size: int) -> torch.Tensor:
    """Mean over every ``size × size`` window fully inside ``(..., H, W)`` → ``(..., H − size + 1, W − size + 1)``,
    as differences of running sums along W then H (scipy's ``uniform_filter``, which fastMRI's SSIM uses, also
    runs sums): 4× faster than ``avg_pool2d`` in float64 on the CPU, which adds up each window."""
    sums = F.pad(image.cumsum(-1), (1, 0))
    rows = sums[..., size:] - sums[..., :-size]
    sums = F.pad(rows.cumsum(-2), (0, 0, 1, 0))
    return (sums[..., size:, :] - sums[..., :-size, :]) / size**2


class SSIMLoss(nn.Module):
    """``1 − SSIM``, a drop-in for ``fastmri.losses.SSIMLoss`` (same call, same numbers, same ``w`` buffer).

    Args:
        win_size: side of the uniform window.
        k1, k2: SSIM constants.

    Call ``loss(X, Y, data_range, reduced=True)`` with ``X, Y`` of shape ``(B, 1, H, W)`` and ``data_range``
    ``(B,)``; returns a scalar (``reduced``) or the ``(B, 1, H − w + 1, W − w + 1)`` map of ``1 − SSIM``.

    Example:
        >>> x = torch.rand(2, 1, 16, 16)
        >>> float(SSIMLoss()(x, x, torch.ones(2)))
        0.0
    """

    w: torch.Tensor

    def __init__(self, win_size: int = 7, k1: float = 0.01, k2: float = 0.03):
        super().__init__()
        self.win_size = win_size
        self.k1, self.k2 = k1, k2
        self.register_buffer("w", uniform_window(win_size, torch.float32))

    def forward(self, X: torch.Tensor, Y: torch.Tensor, data_range: torch.Tensor, reduced: bool = True) -> torch.Tensor:
        """``1 − SSIM`` of ``(B, 1, H, W)`` images ``X``, ``Y`` with dynamic range ``data_range`` ``(B,)`` (fastMRI:
        each slice's volume maximum): the mean, a scalar (``reduced``), or the ``(B, 1, H − w + 1, W − w + 1)`` map
        (:func:`ssim_map`)."""
        window = self.w
        if window.dtype in (torch.float16, torch.bfloat16):
            # a module cast to half precision (bf16-true) rounded 1/49: a window summing to 0.9989 (the loss 16 % off)
            window = uniform_window(self.win_size, torch.float32, window.device)
        loss = 1 - ssim_map(X, Y, data_range, window, self.k1, self.k2)
        return loss.mean() if reduced else loss
