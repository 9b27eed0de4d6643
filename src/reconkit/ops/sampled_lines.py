"""Zero-filled RSS image from the sampled phase-encode lines only, made of MatMul / Gather / ScatterND (export path).

The image-domain models' front end (``reconkit.models.contract.ZeroFilledFrontEnd``) starts with the RSS of the
inverse FFT of line-masked k-space. A line mask zeroes whole columns ``w`` of the ``(H, W)`` k-space, so the
transform along ``H`` only has to run on the ``K`` sampled columns (a quarter of them at 4× acceleration, an eighth
at 8×). This module computes

    image[b, y, x] = sqrt( Σ_c |IFFT2c(mask · kspace)[b, c, y, x]|² )

as: gather the sampled columns, inverse FFT along H on those alone (:func:`centred_fft_matmul_planar`), scatter
them into the zero-filled stacked k layout, inverse FFT along W there (:func:`stacked_ifft_w`), and one ``ReduceL2``
over (real / imaginary part, coil). The columns come from the mask at run time (``NonZero``), so one exported graph
serves any line mask; a batch uses the union of its items' lines, each item still multiplied by its own mask.

Exact up to float32 round-off (the skipped columns are zeros). The cost of the H transform scales with ``K / W``;
at full sampling the gather and scatter make it ~10 % slower than the full 2D transform, at 4× about twice as fast
(docs/benchmarks.md). Eager PyTorch keeps ``torch.fft`` (:func:`reconkit.models.classical.zero_filled`).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from reconkit.ops.complex import pair_factor
from reconkit.ops.dft_matmul import (
    centred_fft_matmul_planar,
    stacked_factors,
    stacked_frequencies,
    stacked_ifft_w,
    stacked_radices,
)

__all__ = ["zero_filled_rss_sampled_lines"]


@functools.lru_cache(maxsize=64)
def _stacked_rows(width: int) -> torch.Tensor:
    """``(W,)`` int64: the row of the flattened stacked k layout ``(P·2·f_m, …)`` that holds the real part of
    natural frequency ``w`` (the imaginary part is ``f_m`` rows further on)."""
    outer, last = stacked_factors(width)
    frequencies = stacked_frequencies(stacked_radices(width))  # (P, f_m): natural k held at each slot
    slot_p, slot_m = np.meshgrid(np.arange(outer), np.arange(last), indexing="ij")
    rows = np.empty(width, dtype=np.int64)
    rows[frequencies.reshape(-1)] = (slot_p * 2 * last + slot_m).reshape(-1)
    with torch.inference_mode(False):
        return torch.from_numpy(rows)


def zero_filled_rss_sampled_lines(masked_kspace: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RSS over coils of the centred inverse 2D FFT of ``masked_kspace · mask``, from the sampled lines only.

    Args:
        masked_kspace: ``(B, C, H, W, 2)`` float k-space (real, imag last).
        mask: ``(B, 1, 1, W, 1)`` (or ``(1, 1, 1, W, 1)``) line mask; a column counts as sampled where any batch
            item's mask is non-zero.

    Returns:
        ``(B, H, W)`` float32 magnitude image, equal to ``rss_complex(ifft2c(masked_kspace * mask), dim=1)``.

    Example:
        >>> from reconkit.ops import ifft2c, rss_complex
        >>> mask = torch.zeros(1, 1, 1, 12, 1); mask[..., 4:8, :] = 1; mask[..., 0, :] = 1
        >>> kspace = torch.randn(2, 3, 10, 12, 2) * mask
        >>> image = zero_filled_rss_sampled_lines(kspace, mask)
        >>> image.shape, bool(torch.allclose(image, rss_complex(ifft2c(kspace), dim=1), atol=1e-5))
        (torch.Size([2, 10, 12]), True)
    """
    if masked_kspace.ndim != 5 or masked_kspace.shape[-1] != 2 or mask.ndim != 5 or mask.shape[-3] != 1:
        raise ValueError(f"zero_filled_rss_sampled_lines: expected k-space (B, C, H, W, 2) and a line mask "
                         f"(B, 1, 1, W, 1); got {tuple(masked_kspace.shape)} and {tuple(mask.shape)}")
    height, width = int(masked_kspace.shape[2]), int(masked_kspace.shape[3])
    outer, last = stacked_factors(width)
    mask = mask.float()
    # the centre column always joins (a zero column if unsampled: exact), so K ≥ 1 even for an empty mask
    centre = torch.zeros(width, dtype=torch.float32, device=mask.device)
    centre[width // 2] = 1
    columns = torch.nonzero(mask.abs().amax(dim=0).reshape(width) + centre).reshape(-1)  # (K,)
    lines = masked_kspace.float().index_select(3, columns)  # (B, C, H, K, 2)
    line_mask = mask.index_select(3, columns)
    lines = lines * pair_factor(line_mask)  # (…, K, 2) against (…, K, 2) on the export path: a fast Mul in ORT
    lines = lines.permute(4, 3, 0, 1, 2)  # (2, K, B, C, H)
    rest = lines.shape[2:]
    re, im = centred_fft_matmul_planar(lines[0].reshape(-1, 1, height), lines[1].reshape(-1, 1, height), True, (-1,))
    updates = torch.stack((re.reshape((-1,) + tuple(rest)), im.reshape((-1,) + tuple(rest))), dim=1)  # (K, 2, B, C, H)
    rows = _stacked_rows(width).to(columns.device).index_select(0, columns)
    rows = torch.stack((rows, rows + last), dim=1).reshape(-1)  # (2K,): real and imaginary rows of each line
    stacked = torch.zeros((outer * 2 * last,) + tuple(rest), dtype=updates.dtype, device=updates.device)
    stacked[rows] = updates.reshape((-1,) + tuple(rest))
    coil_images = stacked_ifft_w(stacked.reshape((outer, 2, last) + tuple(rest)))  # (2, W, B, C, H)
    return torch.linalg.vector_norm(coil_images, dim=(0, 3)).permute(1, 2, 0)  # (B, H, W)
