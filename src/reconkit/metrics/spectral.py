"""Reconstruction error per k-space band: where in frequency a reconstruction is wrong.

A network fits the low spatial frequencies of its targets long before the high ones (the *spectral bias* of
neural networks, Rahaman et al., ICML 2019); in MRI the high bands hold the edges and fine texture a reviewer
looks for. :func:`band_nmse` splits the 2D spectrum of the error into concentric rings and normalises each ring
by the target's energy in it, so a curve per ring over training shows which frequencies a model has learned.

Bands. The spectrum of an ``(h, w)`` image is indexed by the orthonormal DFT frequencies ``(k_y, k_x)``; the
normalised radius ``r = sqrt((k_y / (h/2))² + (k_x / (w/2))²)`` is 0 at DC and 1 at the middle of each edge of
the spectrum (so the rings are ellipses for non-square images). Band ``b`` of ``n`` holds ``b/n ≤ r < (b+1)/n``;
the last band also holds the corners (``r ≥ 1``). Every frequency is in exactly one band, so by Parseval the
bands' error energies add up to the image-domain squared error.

These are bands of the *image's* spectrum at the size the metric sees (the reconstruction cropped to the recon
size for fastMRI's images), not of the acquired multi-coil k-space: cropping and the coil combination change the
grid, so an image band does not map onto acquired lines.

Example:
    >>> import torch
    >>> target = torch.rand(2, 32, 24)
    >>> band_nmse(target, target, num_bands=4)
    tensor([0., 0., 0., 0.], dtype=torch.float64)
    >>> for row in torch.fft.fftshift(band_index((6, 6), 3)).tolist():  # DC in the middle
    ...     print(row)
    [2, 2, 2, 2, 2, 2]
    [2, 2, 2, 2, 2, 2]
    [2, 2, 1, 1, 1, 2]
    [2, 2, 1, 0, 1, 2]
    [2, 2, 1, 1, 1, 2]
    [2, 2, 2, 2, 2, 2]
"""

from __future__ import annotations

import math

import torch

__all__ = ["band_energies", "band_index", "band_nmse", "band_ratio"]


def band_index(shape: tuple[int, int], num_bands: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The band of every frequency of an ``(h, w)`` spectrum in ``torch.fft.fft2`` order (DC at ``[0, 0]``).

    Returns an ``(h, w)`` int64 tensor with values in ``[0, num_bands)``.
    """
    h, w = (int(n) for n in shape)
    if h < 1 or w < 1:
        raise ValueError(f"band_index: image shape must be positive, got {shape}")
    if num_bands < 1:
        raise ValueError(f"band_index: num_bands must be at least 1, got {num_bands}")
    ky = torch.fft.fftfreq(h, device=device, dtype=torch.float64) * 2  # cycles per image / (h/2)
    kx = torch.fft.fftfreq(w, device=device, dtype=torch.float64) * 2
    radius = torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)
    return torch.clamp((radius * num_bands).floor().long(), max=num_bands - 1)


def band_energies(output: torch.Tensor, target: torch.Tensor, num_bands: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Error and target energy per band, summed over the batch: the two sums :func:`band_nmse` divides.

    Args:
        output: ``(B, h, w)`` or ``(h, w)`` real images (reconstructions).
        target: same shape (references).
        num_bands: number of rings (see the module docstring).

    Returns:
        ``(error_energy, target_energy)``, each ``(num_bands,)`` float64: ``Σ |F(output − target)|²`` and
        ``Σ |F(target)|²`` over the band's frequencies and the batch (orthonormal 2D DFT, so the error energies add
        up to ``‖output − target‖²``). Sums over several batches or ranks combine by adding.
    """
    if output.shape != target.shape:
        raise ValueError(f"band_energies: output {tuple(output.shape)} and target {tuple(target.shape)} differ")
    if output.ndim not in (2, 3):
        raise ValueError(f"band_energies: expected (B, h, w) or (h, w) images, got shape {tuple(output.shape)}")
    if output.is_complex() or target.is_complex():  # .double() would keep the real parts alone
        raise ValueError("band_energies: complex images; pass magnitudes (abs)")
    output64, target64 = output.detach().double(), target.detach().double()
    bands = band_index(tuple(output.shape[-2:]), num_bands, device=output.device).flatten()

    def per_band(image: torch.Tensor) -> torch.Tensor:
        power = torch.fft.fft2(image, norm="ortho").abs().square().reshape(-1, bands.numel()).sum(0)
        return torch.zeros(num_bands, dtype=torch.float64, device=output.device).index_add_(0, bands, power)

    return per_band(output64 - target64), per_band(target64)


def band_nmse(output: torch.Tensor, target: torch.Tensor, num_bands: int = 8) -> torch.Tensor:
    """Normalised squared error per k-space band: ``Σ_band |F(output) − F(target)|² / Σ_band |F(target)|²``.

    Args:
        output: ``(B, h, w)`` or ``(h, w)`` real images (reconstructions), any units.
        target: same shape and units (references).
        num_bands: number of concentric rings from DC (band 0) to the edge of the spectrum (band ``n − 1``).

    Returns:
        ``(num_bands,)`` float64: each band's NMSE over the whole batch (energy-weighted, like fastMRI's volume
        NMSE). A band where the target has no energy (at most :data:`EMPTY_BAND` of its total) gives ``nan``. With
        ``num_bands=1`` it is the image's NMSE.

    Example:
        >>> target = torch.rand(2, 16, 16, dtype=torch.float64)
        >>> output = target + 0.01 * torch.randn(2, 16, 16, dtype=torch.float64)
        >>> band_nmse(output, target, num_bands=4).shape
        torch.Size([4])
        >>> nmse = ((output - target) ** 2).sum() / (target**2).sum()
        >>> bool(torch.allclose(band_nmse(output, target, num_bands=1), nmse))
        True
    """
    return band_ratio(*band_energies(output, target, num_bands))


EMPTY_BAND = 1e-12
"""A band holding at most this share of the target's energy has none (:func:`band_ratio`): float32 images carry
round-off of ~1e-7 of their amplitude, ~1e-14 of their energy, in every band."""


def band_ratio(error: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """``error / energy`` per band (sums from :func:`band_energies`, possibly added over batches or ranks), ``nan``
    where the target's band energy is at most :data:`EMPTY_BAND` of its total: there the ratio would be one of two
    round-off residues (e.g. 0.84 for a pure sinusoid's empty bands), not a measurement."""
    empty = energy <= EMPTY_BAND * energy.sum()
    return torch.where(empty, torch.full_like(energy, math.nan), error / torch.where(empty, 1.0, energy))
