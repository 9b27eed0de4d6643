"""Classical reconstructions with no learned weights, behind the same call as the networks.

``model(masked_kspace (B, C, H, W, 2), mask (B, 1, 1, W, 1)) -> image (B, H, W)`` (magnitude, full encoded size):

* :class:`ZeroFilled`: root-sum-of-squares of the inverse FFT of the zero-filled k-space.
* :class:`CGSense`: ``argmin_x ‖M F S x − y‖² + λ‖x‖²`` by conjugate gradient (``MultiCoilMRI.A_dagger``) with coil
  sensitivities ``S`` estimated from the fully sampled centre lines (the ACS lines) of the same k-space, by
  :func:`estimate_sens_maps_acs` (low-pass coil images ÷ their RSS) or :func:`estimate_sens_maps_espirit`.

Both maps estimators return maps normalised to unit root-sum-of-squares, so CG-SENSE's magnitude is on the scale
of the fully sampled RSS image (the fastMRI target).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reconkit.errors import ReconkitError, ReconkitWarning, check_number
from reconkit.ops import (
    MultiCoilMRI,
    as_complex,
    complex_abs,
    current_fft_impl,
    ifft2c,
    pair_factor,
    power_of_two_scale,
    rss_complex,
    sampling_mask,
    zero_filled_rss_sampled_lines,
)
from reconkit.ops.fft import check_tensors

__all__ = [
    "CGSense",
    "ZeroFilled",
    "acs_lines",
    "cg_sense",
    "estimate_sens_maps_acs",
    "estimate_sens_maps_espirit",
    "zero_filled",
]


def _check_inputs(name: str, masked_kspace: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    check_tensors(name, masked_kspace, *(() if mask is None else (mask,)))
    if masked_kspace.ndim != 5 or masked_kspace.shape[-1] != 2:
        raise ReconkitError(f"masked_kspace: expected shape (B, C, H, W, 2); got {tuple(masked_kspace.shape)}")
    if masked_kspace.shape[1] == 0:
        raise ReconkitError(f"masked_kspace: no coils (C = 0 in (B, C, H, W, 2) = {tuple(masked_kspace.shape)})")
    if mask is None:
        return
    batch, _, height, width, _ = masked_kspace.shape
    line_or_2d = mask.ndim == 5 and mask.shape[-2] == width and mask.shape[-3] in (1, height)
    if not line_or_2d or mask.shape[0] not in (1, batch):
        raise ReconkitError(
            f"mask: expected shape (B, 1, 1, W, 1) or (B, 1, H, W, 1) with W = {width}; got {tuple(mask.shape)}"
        )


def acs_lines(mask: torch.Tensor, num_low_frequencies: int | None = None) -> torch.Tensor:
    """The auto-calibration (ACS) phase-encode lines: the run of fully sampled lines around the centre ``W // 2``.

    A line counts as sampled when the mask is non-zero along the whole readout (so 2D masks work where their
    centre is fully sampled). Computed with cumulative sums, no loop over the data, so it exports to ONNX.

    Args:
        mask: ``(B, 1, 1, W, 1)`` or ``(B, 1, H, W, 1)`` sampling mask (bool or 0/1 float), or one of these
            expanded over coils or (real, imag).
        num_low_frequencies: if given, use exactly this many centre lines instead of reading them off the mask
            (fastmri's centre convention: lines ``[(W − n + 1) // 2, (W − n + 1) // 2 + n)``).

    Returns:
        ``(B, W)`` bool, True on the ACS lines.

    Raises:
        ReconkitError: the centre line is not sampled (no ACS region to calibrate from).
    """
    batch, width = mask.shape[0], mask.shape[-2]
    index = torch.arange(width, device=mask.device)
    if num_low_frequencies is not None:
        start = (width - num_low_frequencies + 1) // 2
        return ((index >= start) & (index < start + num_low_frequencies)).expand(batch, width)
    # per column over every other axis: a mask expanded over (real, imag) or coils is the same mask
    sampled = (mask[..., 0] != 0).flatten(1, -2).all(dim=1).to(torch.int32)
    centre = width // 2
    # run lengths of sampled lines from the centre rightwards and leftwards, centre included: the leading ones, as
    # the count of positions before the first zero (cumulative sums export to ONNX, cumulative products do not)
    right = (torch.cumsum(1 - sampled[:, centre:], dim=1) == 0).sum(dim=1)
    left = (torch.cumsum(1 - sampled[:, : centre + 1].flip(1), dim=1) == 0).sum(dim=1)
    if not torch.jit.is_tracing() and bool((right == 0).any()):
        raise ReconkitError(
            "mask: the centre phase-encode line is not fully sampled, so there are no ACS lines to estimate "
            "sensitivity maps from"
        )
    return (index >= (centre - left + 1).unsqueeze(1)) & (index <= (centre + right - 1).unsqueeze(1))


def _hann_centred(distance: torch.Tensor, half_width: torch.Tensor) -> torch.Tensor:
    """Hann taper ``cos²(π d / 2a)`` for ``|d| < a``, 0 beyond; symmetric about the k-space centre, so the
    low-pass point-spread function is real and coil images get no phase ramp."""
    ratio = (distance.abs() / half_width).clamp(max=1)
    return torch.cos(0.5 * math.pi * ratio) ** 2


def _lowpass_acs_kspace(
    masked_kspace: torch.Tensor, mask: torch.Tensor, num_low_frequencies: int | None
) -> torch.Tensor:
    """ACS k-space ``(B, C, H, W, 2)`` under a separable Hann window centred on the k-space centre: along the
    phase-encode axis as wide as the ACS run allows on both sides of the centre, along the readout axis over the
    same fraction of k-space (equally smooth coil images in both directions); zero elsewhere."""
    height, width = masked_kspace.shape[-3], masked_kspace.shape[-2]
    lines = acs_lines(mask, num_low_frequencies)
    centre = width // 2
    # sampled lines on each side of the centre, centre included; the window reaches up to the shorter side
    half_cols = torch.minimum(lines[:, : centre + 1].sum(dim=1), lines[:, centre:].sum(dim=1)).to(torch.float32)
    half_rows = (half_cols * height / width).clamp_min(1)
    device = masked_kspace.device
    col_window = _hann_centred(torch.arange(width, device=device) - centre, half_cols[:, None])  # (B, W)
    row_window = _hann_centred(torch.arange(height, device=device) - height // 2, half_rows[:, None])  # (B, H)
    window = (row_window[:, :, None] * col_window[:, None, :]).to(masked_kspace.dtype)
    return masked_kspace * pair_factor(window[:, None, :, :, None])


def _divide_by_rss(coil_images: torch.Tensor, eps: float) -> torch.Tensor:
    """``(B, C, H, W, 2)`` coil images divided by their root-sum-of-squares over coils (``eps`` relative to its max);
    an item whose coil images are all zero (ESPIRiT maps cropped everywhere, empty k-space) gets zero maps, not 0/0."""
    rss = rss_complex(coil_images, dim=1)[:, None, :, :, None]
    denominator = (rss + eps * rss.amax(dim=(2, 3), keepdim=True)).clamp_min(torch.finfo(rss.dtype).tiny)
    return coil_images / pair_factor(denominator)


def estimate_sens_maps_acs(
    masked_kspace: torch.Tensor,
    mask: torch.Tensor,
    num_low_frequencies: int | None = None,
    eps: float = 1e-12,
) -> torch.Tensor:
    """Sensitivity maps from the ACS lines: Hann-windowed low-pass coil images divided by their RSS.

    The window spans the ACS lines along the phase-encode axis and the same fraction of the readout axis. The
    maps carry the phase of the low-pass object image (common to all coils; SENSE absorbs it into the image).
    Accurate where the object is smooth on the scale of the ACS resolution; near sharp edges the low-pass object
    leaks into the maps (use :func:`estimate_sens_maps_espirit` there).

    Args:
        masked_kspace: ``(B, C, H, W, 2)`` undersampled k-space.
        mask: ``(B, 1, 1, W, 1)`` mask (see :func:`acs_lines`).
        num_low_frequencies: ACS width override.
        eps: added to the RSS before dividing (relative to the RSS maximum), for the empty background.

    Returns:
        ``(B, C, H, W, 2)`` maps with unit root-sum-of-squares over coils (0 where the coil images vanish).
    """
    _check_inputs("estimate_sens_maps_acs", masked_kspace, mask)
    return _divide_by_rss(ifft2c(_lowpass_acs_kspace(masked_kspace, mask, num_low_frequencies)), eps)


def _centre_crop_kspace(kspace: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Central ``rows × cols`` block of ``(..., H, W, 2)`` k-space (centre index ``N // 2`` kept at ``n // 2``)."""
    height, width = kspace.shape[-3], kspace.shape[-2]
    top, left = height // 2 - rows // 2, width // 2 - cols // 2
    return kspace[..., top : top + rows, left : left + cols, :]


@functools.lru_cache(maxsize=64)
def _linear_interpolation(size: int, coarse_size: int) -> torch.Tensor:
    """``(size, coarse_size)`` float32 matrix of linear interpolation weights: full-resolution index ``f`` lies
    at coarse position ``(f − size // 2) · coarse_size / size + coarse_size // 2``, clamped to the end samples."""
    position = (np.arange(size) - size // 2) * coarse_size / size + coarse_size // 2
    position = np.clip(position, 0, coarse_size - 1)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, coarse_size - 1)
    weights = np.zeros((size, coarse_size))
    np.add.at(weights, (np.arange(size), low), 1 - (position - low))
    np.add.at(weights, (np.arange(size), high), position - low)
    with torch.inference_mode(False):  # cached: built first under inference_mode, it must still serve autograd
        return torch.from_numpy(weights.astype(np.float32))


def _upsample_centred(coarse: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear interpolation of ``(B, K, h, w)`` samples on a centred-FFT grid of the same field of view to
    ``(B, K, height, width)``: coarse pixel ``n`` lies at full-resolution index ``(n − h // 2) · height / h +
    height // 2`` (clamped at the border). Separable: two MatMuls with constant weight matrices (cheaper than a
    grid sample in ONNX Runtime). In ``coarse``'s dtype also under ``torch.autocast`` (bfloat16 MatMuls there put
    2e-3 relative error into CG-SENSE's ESPIRiT maps)."""
    rows = _linear_interpolation(height, int(coarse.shape[-2])).to(coarse)
    cols = _linear_interpolation(width, int(coarse.shape[-1])).to(coarse)
    with torch.autocast(coarse.device.type, enabled=False):
        return rows @ coarse @ cols.t()


def _calibration_region(
    masked_kspace: torch.Tensor, mask: torch.Tensor, num_low_frequencies: int | None
) -> torch.Tensor:
    """Central block ``(B, C, rows, cols)`` (complex) of fully sampled k-space: the ACS lines common to the whole
    batch wide (one size keeps the decomposition batched), twice that many readout lines high (at most ``H``)."""
    height = masked_kspace.shape[-3]
    # every item's ACS lines are one run around the centre, so their intersection is one too
    common = acs_lines(mask, num_low_frequencies).all(dim=0)
    col_start, cols = int(common.to(torch.int32).argmax()), int(common.sum())
    rows = min(height, 2 * cols)
    row_start = height // 2 - rows // 2
    block = masked_kspace[:, :, row_start : row_start + rows, col_start : col_start + cols]
    return as_complex(block)


def estimate_sens_maps_espirit(
    masked_kspace: torch.Tensor,
    mask: torch.Tensor,
    num_low_frequencies: int | None = None,
    kernel_size: int = 6,
    threshold: float = 0.02,
    crop: float = 0.8,
    grid_size: int = 64,
) -> torch.Tensor:
    """ESPIRiT-style sensitivity maps (Uecker et al. 2014), one set of maps, computed on a coarse grid.

    1. Calibration matrix of all ``kernel_size²`` patches (all coils) of the fully sampled centre block.
    2. Its right singular vectors with singular value above ``threshold · σ_max`` span the signal subspace
       (found by eigen-decomposition of the matrix's Gram matrix).
    3. Those k-space kernels, taken to the image domain, give at each pixel ``x`` a ``C × C`` Hermitian matrix
       ``G(x) = Σ_r v_r(x) v_r(x)ᴴ`` whose top eigenvector (eigenvalue ≈ 1 inside the object) is the coil
       sensitivity vector. Each eigenvector's arbitrary phase is aligned to the low-resolution ACS maps
       (:func:`estimate_sens_maps_acs`), so both estimators share one phase convention.
    4. Maps are smooth, so step 3's eigen-decompositions run on a coarse grid of ``grid_size`` points per axis
       (at most the image size) spanning the same field of view, and the maps are bilinearly interpolated to
       ``H × W``; pixels with eigenvalue ``< crop`` are set to 0 (background).

    Cost: one eigen-decomposition of a ``(C · kernel_size²)²`` Gram matrix per slice plus ``grid_size²``
    eigen-decompositions of ``C × C`` matrices, independent of ``H × W`` apart from the final interpolation.

    Args:
        masked_kspace: ``(B, C, H, W, 2)`` undersampled k-space.
        mask: ``(B, 1, 1, W, 1)`` mask; the ACS run must be at least ``kernel_size`` lines wide.
        num_low_frequencies: ACS width override.
        kernel_size: calibration kernel side (k-space points).
        threshold: relative singular value threshold.
        crop: eigenvalue threshold below which maps are zeroed (0 disables cropping).
        grid_size: coarse grid points per axis for the eigen-decompositions.

    Returns:
        ``(B, C, H, W, 2)`` maps, unit norm over coils where not cropped.
    """
    _check_inputs("estimate_sens_maps_espirit", masked_kspace, mask)
    batch, coils, height, width, _ = masked_kspace.shape
    calib = _calibration_region(masked_kspace, mask, num_low_frequencies)
    if min(calib.shape[-2:]) < kernel_size:
        raise ReconkitError(
            f"mask: {calib.shape[-1]} ACS lines are fewer than the ESPIRiT kernel size {kernel_size}; lower "
            "kernel_size or use estimate_sens_maps_acs"
        )
    # 1. calibration matrix (B, patches, C · k · k)
    patches = calib.unfold(2, kernel_size, 1).unfold(3, kernel_size, 1)  # (B, C, pr, pc, k, k)
    calib_matrix = patches.permute(0, 2, 3, 1, 4, 5).reshape(batch, -1, coils * kernel_size**2)
    if 4 * calib_matrix.shape[1] < calib_matrix.shape[2] and not torch.jit.is_tracing():
        # a quarter: 0.39 still gave maps close to the truth in the tests, 0.15 left them zero over 43 % of an object
        warnings.warn(ReconkitWarning(
            f"ESPIRiT: the {calib.shape[-1]} ACS lines give {calib_matrix.shape[1]} calibration patches for "
            f"{calib_matrix.shape[2]} unknowns (coils x kernel_size^2): the signal subspace is poorly determined and "
            "the maps may vanish over much of the object; use more ACS lines, a smaller kernel_size or "
            "estimate_sens_maps_acs"), stacklevel=2)
    # 2. signal subspace from the eigen-decomposition of the (C·k², C·k²) Gram matrix (singular values² and right
    # singular vectors of the calibration matrix; much cheaper than its SVD); strongest first. A common number of
    # kernels for the batch keeps it batched, weaker ones are zeroed per item.
    eigenvalues, right_vectors = torch.linalg.eigh(calib_matrix.mH @ calib_matrix)
    eigenvalues, right_vectors = eigenvalues.flip(-1), right_vectors.flip(-1)
    keep = eigenvalues > threshold**2 * eigenvalues[:, :1]
    num_kernels = int(keep.sum(dim=1).max())
    kernels = (right_vectors[..., :num_kernels].mH * keep[:, :num_kernels, None]).reshape(
        batch, num_kernels, coils, kernel_size, kernel_size
    )
    # 3. image-domain kernels on the coarse grid and per-pixel top eigenvectors
    grid_h, grid_w = min(grid_size, height), min(grid_size, width)
    pad_h, pad_w = grid_h - kernel_size, grid_w - kernel_size
    padded = F.pad(kernels, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    image_kernels = ifft2c(padded) * (math.sqrt(grid_h * grid_w) / kernel_size)  # (B, r, C, gh, gw)
    vectors = image_kernels.permute(0, 3, 4, 2, 1).contiguous()  # (B, gh, gw, C, r); contiguous for a fast matmul
    eigenvalues, eigenvectors = torch.linalg.eigh(vectors @ vectors.mH)  # per pixel C × C
    maps, top = eigenvectors[..., -1], eigenvalues[..., -1]  # (B, gh, gw, C), (B, gh, gw)
    # eigenvectors have an arbitrary phase per pixel: align each to the low-resolution ACS maps on the same grid
    lowpass = _lowpass_acs_kspace(masked_kspace, mask, num_low_frequencies)
    reference = as_complex(ifft2c(_centre_crop_kspace(lowpass, grid_h, grid_w))).permute(0, 2, 3, 1)
    overlap = (reference.conj() * maps).sum(dim=-1, keepdim=True)
    maps = maps * (overlap.conj() / overlap.abs().clamp_min(torch.finfo(top.dtype).tiny))
    maps = maps * (top > crop).unsqueeze(-1)
    # 4. interpolate (real and imaginary parts) to the full image size, renormalise to unit RSS
    coarse = torch.view_as_real(maps).permute(0, 3, 4, 1, 2).reshape(batch, coils * 2, grid_h, grid_w)
    full = _upsample_centred(coarse, height, width).reshape(batch, coils, 2, height, width).permute(0, 1, 3, 4, 2)
    return _divide_by_rss(full.contiguous(), eps=1e-6).to(masked_kspace.dtype)


def zero_filled(masked_kspace: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """RSS of the coil images of zero-filled k-space: ``(B, C, H, W, 2)`` → ``(B, H, W)``.

    With ``mask`` the k-space is multiplied by it first (an integer mask's nonzero values count as 1). On the export
    path (``fft_impl("matmul")``) a line mask ``(B, 1, 1, W, 1)`` then selects
    :func:`reconkit.ops.zero_filled_rss_sampled_lines`, which transforms only the sampled lines (same result, about
    half the cost in ONNX Runtime at 4× acceleration).
    """
    _check_inputs("zero_filled", masked_kspace, mask)
    if mask is None:
        return rss_complex(ifft2c(masked_kspace), dim=1)
    mask = sampling_mask(mask)
    if current_fft_impl() == "matmul" and mask.shape[-3] == 1:
        return zero_filled_rss_sampled_lines(masked_kspace, mask)
    return rss_complex(ifft2c(masked_kspace * mask), dim=1)


def cg_sense(
    masked_kspace: torch.Tensor,
    mask: torch.Tensor,
    sens_maps: torch.Tensor,
    num_iters: int = 10,
    l2_reg: float = 0.0,
) -> torch.Tensor:
    """CG-SENSE magnitude ``|argmin ‖M F S x − y‖² + λ‖x‖²|`` → ``(B, H, W)``.

    ``λ = l2_reg`` is relative to the largest eigenvalue of ``AᴴA`` for unit-RSS maps (1 at full sampling), so
    it does not depend on the k-space scale.

    Args:
        masked_kspace: ``y``, ``(B, C, H, W, 2)`` undersampled k-space.
        mask: ``M``, ``(B, 1, 1, W, 1)`` line mask or ``(B, 1, H, W, 1)`` 2D mask (nonzero = sampled).
        sens_maps: ``S``, ``(B, C, H, W, 2)`` coil sensitivities (e.g. :func:`estimate_sens_maps_acs`).
        num_iters: conjugate-gradient iterations, starting from ``x = 0``.
        l2_reg: ``λ``.

    Returns:
        ``(B, H, W)`` magnitude image at the full encoded size, in the k-space's units and dtype.

    Raises:
        ReconkitError: ``masked_kspace`` or ``mask`` of another shape.
        ValueError: ``sens_maps`` not of ``masked_kspace``'s shape (:class:`reconkit.ops.MultiCoilMRI`).
    """
    _check_inputs("cg_sense", masked_kspace, mask)
    image = MultiCoilMRI(mask, sens_maps).A_dagger(masked_kspace, max_iter=num_iters, l2_reg=l2_reg)
    return complex_abs(image[:, 0])


class ZeroFilled(nn.Module):
    """Zero-filled RSS reconstruction (the classical lower baseline); see :func:`zero_filled`.

    The contract call ``(masked_kspace (B, C, H, W, 2), mask (B, 1, 1, W, 1) or (B, 1, H, W, 1)) -> (B, H, W)``, as
    :class:`reconkit.models.VarNet`; no weights.
    """

    def forward(
        self, masked_kspace: torch.Tensor, mask: torch.Tensor, num_low_frequencies: int | None = None
    ) -> torch.Tensor:
        """``(B, C, H, W, 2)`` k-space, ``(B, 1, 1, W, 1)`` or ``(B, 1, H, W, 1)`` mask → ``(B, H, W)`` RSS magnitude.

        ``num_low_frequencies`` is accepted for the common call and not used. Computed on the k-space divided by
        the power of two at its peak (:func:`reconkit.ops.power_of_two_scale`), so any units work in float32.
        Raises ReconkitError for inputs of another shape.
        """
        _check_inputs("ZeroFilled", masked_kspace, mask)
        scale = power_of_two_scale(masked_kspace)  # exact; the RSS's squares stay within float32 in any units
        return zero_filled(masked_kspace / scale) * scale.view(-1, 1, 1)


class CGSense(nn.Module):
    """CG-SENSE with sensitivity maps estimated from the ACS lines of the input itself.

    The contract call ``(masked_kspace (B, C, H, W, 2), mask (B, 1, 1, W, 1), num_low_frequencies=None) ->
    (B, H, W)`` magnitude, as :class:`reconkit.models.VarNet`; no weights.

    Args:
        num_iters: conjugate-gradient iterations.
        l2_reg: Tikhonov weight ``λ`` (see :func:`cg_sense`).
        sens_method: ``"acs"`` (:func:`estimate_sens_maps_acs`) or ``"espirit"`` (:func:`estimate_sens_maps_espirit`).

    Raises:
        ValueError: an unknown ``sens_method``; ``num_iters`` not an integer >= 1 or ``l2_reg`` not a finite number
            >= 0 (:class:`~reconkit.errors.ConfigError`: a negative or NaN λ made every image NaN, 0 iterations
            a zero image).
    """

    def __init__(self, num_iters: int = 10, l2_reg: float = 0.0, sens_method: Literal["acs", "espirit"] = "acs"):
        super().__init__()
        if sens_method not in ("acs", "espirit"):
            raise ValueError(f"unknown sens_method {sens_method!r}; expected 'acs' or 'espirit'")
        check_number("CGSense num_iters", num_iters, 1, integer=True)
        check_number("CGSense l2_reg", l2_reg, 0)
        self.num_iters, self.l2_reg, self.sens_method = num_iters, l2_reg, sens_method

    def export_problem(self) -> str | None:
        """Why this model cannot be exported to ONNX (``reconkit.export.export_onnx`` asks), or None."""
        if self.sens_method == "espirit":
            return ("cg_sense with sens_method 'espirit' computes its maps with eigen-decompositions, which ONNX has no "
                    "operator for; export it with sens_method 'acs' (a VarNet's SENSE step with final_dc_maps "
                    "'espirit' exports, through reconkit.models.espirit_poly)")
        return None

    def forward(
        self, masked_kspace: torch.Tensor, mask: torch.Tensor, num_low_frequencies: int | None = None
    ) -> torch.Tensor:
        """``(B, C, H, W, 2)`` k-space, ``(B, 1, 1, W, 1)`` mask → ``(B, H, W)`` CG-SENSE magnitude.

        ``num_low_frequencies``: the ACS width for the map estimate (None: measured from the mask). Raises
        ReconkitError for inputs of another shape, or (ESPIRiT) fewer ACS lines than its kernel size.
        """
        _check_inputs("CGSense", masked_kspace, mask)
        estimate = estimate_sens_maps_espirit if self.sens_method == "espirit" else estimate_sens_maps_acs
        # CG-SENSE is equivariant to the k-space's scale: run at peak ~1, away from float32 under- / overflow of the
        # maps' RSS and the CG inner products (k-space peaks below ~1e-17 gave NaN or wrong images)
        scale = power_of_two_scale(masked_kspace)
        masked_kspace = masked_kspace / scale
        sens_maps = estimate(masked_kspace, mask, num_low_frequencies)
        return cg_sense(masked_kspace, mask, sens_maps, self.num_iters, self.l2_reg) * scale.view(-1, 1, 1)
