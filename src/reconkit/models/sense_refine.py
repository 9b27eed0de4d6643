"""A SENSE data-consistency step after an unrolled network: the cascades' k-space, corrected towards the data.

The cascades of a VarNet enforce the measured data softly, coil by coil. On data unlike its training data (other
anatomy, more coils, higher SNR) a small network leaves part of the coil redundancy unused: CG-SENSE then beats it.
This step solves, per slice, the regularised SENSE problem around the network's image (MoDL's data-consistency
block, here with a noise-adaptive weight and no learned weights)::

    x = argmin_x ‖M F S x − y‖² + λ ‖x − x₀‖²,     x₀ = Sᴴ F⁻¹ k_net,

by conjugate gradient from ``x₀``, with ``S`` the ACS sensitivity maps of CG-SENSE
(:func:`reconkit.models.classical.estimate_sens_maps_acs`) or ESPIRiT maps
(:func:`reconkit.models.espirit_poly.estimate_sens_maps_espirit_poly`), as the caller passes. With a wavelet weight
``κ > 0`` the problem gains ``+ κ σ̂ ‖Ψ x‖₁`` (``Ψ`` an orthonormal Haar basis, cycle-spun) and is solved by FISTA
instead. It returns ``k_net + F S (x − x₀)``: the network's coil k-space plus the SENSE-consistent correction. So for λ → ∞ the output is the network's own, and the coil-specific part of the
network's k-space (what ``S x`` cannot express) is kept. The caller takes the RSS image as before.

``λ = σ̂² / (ρ · P)`` per slice is the MAP weight for data noise of variance ``σ̂²`` and a network error of
variance ``ρ · P``:

* ``σ̂²`` is the mean ``|k_net − y|²`` on the measured samples, the cascades' misfit to the data: mostly noise,
  because they denoise.
* ``P`` is the mean ``|x₀|²`` over the image.
* ``ρ`` (``prior``, the network's relative error variance) sets the weight; ``κ`` (``wavelet``) the L1 term.

So noisy scans trust the network and clean ones the data, with no knowledge of the noise level.

Three layouts, one algorithm: :func:`refine_kspace` (eager, ``(B, C, H, W, 2)``, k-space or hybrid space) and
the export path's :func:`refine_planar` / :func:`refine_stacked` (docs/export.md). In hybrid space ``AᴴA =
Sᴴ F_Wᴴ M F_W S``: the readout transform cancels, so every iteration needs 1D FFTs along W only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from reconkit.ops import (
    accurate_sum,
    conjugate_gradient,
    fista,
    haar_soft_threshold,
    planar_sens_expand,
    planar_sens_reduce,
    sens_expand,
    sens_reduce,
    stacked_sens_expand,
    stacked_sens_reduce,
    wavelet_shifts,
)

__all__ = ["WAVELET_LEVELS", "noise_adaptive_weight", "refine_kspace", "refine_planar", "refine_stacked"]

WAVELET_LEVELS = 4  # Haar levels of the optional L1-wavelet term


def noise_adaptive_weight(
    residual_sq: torch.Tensor, samples: torch.Tensor, image_sq: torch.Tensor, pixels: int, prior: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(λ, σ̂²)`` per batch item, ``λ = σ̂² / (ρ · P)``: ``residual_sq`` ``(B,)`` summed ``|k_net − y|²`` over
    ``samples`` measured complex samples (``σ̂²`` its mean), ``image_sq`` ``(B,)`` summed ``|x₀|²`` over ``pixels``
    pixels, ``ρ = prior``."""
    tiny = torch.finfo(residual_sq.dtype).tiny
    noise = residual_sq / samples.clamp_min(1)
    power = image_sq / pixels
    return noise / (prior * power).clamp_min(tiny), noise


def _solve(
    normal: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    start: torch.Tensor,
    weight: torch.Tensor,
    noise: torch.Tensor,
    iters: int,
    wavelet: float,
    split: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    join: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    w_first: bool = False,
) -> torch.Tensor:
    """The step's image: CG on ``normal(x) = rhs`` (``wavelet = 0``), else FISTA with the L1-Haar term, threshold
    ``κ · σ̂`` (``κ = wavelet``) per unit step. ``weight`` / ``noise`` ``(B, 1, …)`` broadcast against the image;
    ``split`` gives its ``(re, im)`` parts with (H, W) as the last two axes (``w_first``: (W, H); the Haar
    transform is the same up to the order of its bands, so only the cyclic shift is swapped), ``join`` the
    inverse."""
    if not wavelet:
        return conjugate_gradient(normal, rhs, x0=start, max_iter=iters)
    step = 1 / (1 + weight)  # 1 / ‖AᴴA + λ‖: unit-RSS maps and a 0/1 mask give ‖A‖ ≤ 1
    threshold = step * wavelet * torch.sqrt(noise)

    def prox(image: torch.Tensor, iteration: int) -> torch.Tensor:
        re, im = split(image)
        tau = threshold.reshape((-1,) + (1,) * (re.ndim - 1))
        shift = wavelet_shifts(iteration)
        return join(*haar_soft_threshold(re, im, tau, WAVELET_LEVELS, shift[::-1] if w_first else shift))

    return fista(normal, rhs, start, step, prox, max_iter=iters)


def refine_kspace(
    prediction: torch.Tensor,
    reference: torch.Tensor,
    mask: torch.Tensor,
    sens_maps: torch.Tensor,
    hybrid: bool,
    iters: int,
    prior: float,
    wavelet: float = 0.0,
) -> torch.Tensor:
    """The step on ``(B, C, H, W, 2)`` network k-space ``prediction`` and measured ``reference`` (hybrid space when
    ``hybrid``), ``mask (B, 1, 1, W, 1)`` or ``(B, 1, H, W, 1)``, maps ``(B, C, H, W, 2)`` → corrected k-space.
    ``wavelet`` ``κ > 0`` adds the L1-Haar term (solved by FISTA instead of CG)."""
    batch, coils, height, width, _ = prediction.shape
    start = sens_reduce(prediction, sens_maps, hybrid=hybrid)  # (B, 1, H, W, 2)
    samples = mask.expand(batch, 1, height, width, 1).sum(dim=(1, 2, 3, 4)) * coils
    residual = accurate_sum(((prediction - reference) * mask) ** 2, dim=(1, 2, 3, 4))
    weight, noise = noise_adaptive_weight(residual, samples, accurate_sum(start**2, dim=(1, 2, 3, 4)), height * width,
                                          prior)
    weight, noise = weight.view(-1, 1, 1, 1, 1), noise.view(-1, 1, 1, 1, 1)

    def normal(image: torch.Tensor) -> torch.Tensor:
        return sens_reduce(sens_expand(image, sens_maps, hybrid=hybrid) * mask, sens_maps, hybrid=hybrid) \
            + weight * image

    rhs = sens_reduce(reference * mask, sens_maps, hybrid=hybrid) + weight * start
    image = _solve(normal, rhs, start, weight, noise, iters, wavelet, lambda x: (x[..., 0], x[..., 1]),
                   lambda re, im: torch.stack((re, im), dim=-1))
    return prediction + sens_expand(image - start, sens_maps, hybrid=hybrid)


def refine_planar(
    parts: tuple[torch.Tensor, torch.Tensor],
    reference: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor,
    map_parts: tuple[torch.Tensor, torch.Tensor],
    dims: tuple[int, ...],
    iters: int,
    prior: float,
    wavelet: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Export path: :func:`refine_kspace` on planar ``(B, C, H, W)`` parts with the MatMul FFT along ``dims``;
    ``mask (B, 1, 1, W)`` or ``(B, 1, H, W)``; the image iterates as ``(B, 2, H, W)``."""
    (re, im), (ref_re, ref_im) = parts, reference
    batch, coils, height, width = re.shape

    def reduce(k_re: torch.Tensor, k_im: torch.Tensor) -> torch.Tensor:
        return torch.cat(planar_sens_reduce(k_re, k_im, *map_parts, dims), dim=1)

    def expand(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return planar_sens_expand(image[:, :1], image[:, 1:], *map_parts, dims)

    start = reduce(re, im)
    samples = mask.expand(batch, 1, height, width).sum(dim=(1, 2, 3)) * coils
    residual = accurate_sum(((re - ref_re) * mask) ** 2 + ((im - ref_im) * mask) ** 2, dim=(1, 2, 3))
    weight, noise = noise_adaptive_weight(residual, samples, accurate_sum(start**2, dim=(1, 2, 3)), height * width,
                                          prior)
    weight, noise = weight.view(-1, 1, 1, 1), noise.view(-1, 1, 1, 1)

    def normal(image: torch.Tensor) -> torch.Tensor:
        k_re, k_im = expand(image)
        return reduce(k_re * mask, k_im * mask) + weight * image

    image = _solve(normal, reduce(ref_re * mask, ref_im * mask) + weight * start, start, weight, noise, iters,
                   wavelet, lambda x: (x[:, :1], x[:, 1:]), lambda re, im: torch.cat((re, im), dim=1))
    d_re, d_im = expand(image - start)
    return re + d_re, im + d_im


def refine_stacked(
    kspace: torch.Tensor,
    masked_ref: torch.Tensor,
    line: torch.Tensor,
    maps: tuple[torch.Tensor, torch.Tensor],
    iters: int,
    prior: float,
    wavelet: float = 0.0,
) -> torch.Tensor:
    """Export path, line masks: :func:`refine_kspace` on the stacked W-major layout (``VarNetBlock.forward_stacked``):
    ``kspace`` / ``masked_ref`` ``(P, 2, f_m, B, C, H)``, ``line (P, 1, f_m, B, 1, 1)``, maps ``(2, W, B, C, H)``
    as ``[S_re; S_im]`` and ``[−S_im; S_re]``. The image iterates batch first as ``(B, 2, W, 1, H)``."""
    outer, _, last, _, coils, height = kspace.shape  # (P, 2, f_m, B, C, H): P·f_m = W

    def reduce(k: torch.Tensor) -> torch.Tensor:  # → (B, 2, W, 1, H)
        return stacked_sens_reduce(k, maps).permute(2, 0, 1, 3).unsqueeze(3)

    def expand(image: torch.Tensor) -> torch.Tensor:  # (B, 2, W, 1, H) → (P, 2, f_m, B, C, H)
        return stacked_sens_expand(image.permute(1, 2, 0, 3, 4), maps)

    start = reduce(kspace)
    samples = line.sum(dim=(0, 1, 2, 4, 5)) * coils * height
    residual = accurate_sum(((kspace - masked_ref) * line) ** 2, dim=(0, 1, 2, 4, 5))
    weight, noise = noise_adaptive_weight(residual, samples, accurate_sum(start**2, dim=(1, 2, 3, 4)),
                                          outer * last * height, prior)
    weight, noise = weight.view(-1, 1, 1, 1, 1), noise.view(-1, 1, 1, 1, 1)

    def normal(image: torch.Tensor) -> torch.Tensor:
        return reduce(expand(image) * line) + weight * image

    def split(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (B, 2, W, 1, H) → (B, 1, W, H) ×2
        return image[:, :1, :, 0], image[:, 1:, :, 0]

    def join(re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
        return torch.cat((re, im), dim=1).unsqueeze(3)

    image = _solve(normal, reduce(masked_ref) + weight * start, start, weight, noise, iters, wavelet, split, join,
                   w_first=True)
    return kspace + expand(image - start)
