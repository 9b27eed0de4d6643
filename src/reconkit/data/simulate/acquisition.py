"""Acquisition physics: smooth image phase, k-space with readout oversampling and phase-encode padding, noise.

k-space convention (fastMRI's): ``kspace = fft2c(coil_images)`` with the centred orthonormal FFT, H = readout
(rows), W = phase-encode (columns). Of the W phase-encode columns only ``[padding_left, padding_right)`` are
acquired; the others are exactly zero, as in real fastMRI files, and the header's
``encodingLimits/kspace_encoding_step_1`` records them (``center = lines // 2``, ``maximum = lines − 1``), so
``padding_left = W // 2 − center`` as fastmri computes it. ``reconstruction_rss`` is the RSS of
``ifft2c(kspace)`` centre-cropped to the recon size, computed from the final (noisy, zero-padded) k-space.
"""

from __future__ import annotations

import numpy as np
import torch

from reconkit.ops import fft2c, ifft2c

__all__ = ["add_correlated_noise", "center_crop", "encode", "image_phase", "phase_encode_limits", "rss_target"]


def image_phase(points_mm: np.ndarray, te_ms: float, spin_echo: bool, rng: np.random.Generator) -> np.ndarray:
    """Smooth object phase (radians) at world points ``(..., 3)``.

    Sum of (1) a random polynomial of degree ≤ 2 in the coordinates (scaled to ±1 over 100 mm, about ±π over the
    head), from RF transmit phase and eddy currents, and (2) a B0-like off-resonance term ``2π · ΔB0 · TE``:
    ``ΔB0`` (Hz) is a residual linear shim (±5 Hz over 100 mm) plus 2–3 Gaussian susceptibility hot spots
    (15–30 mm wide, ±20–80 Hz) near the head. A spin echo refocuses static off-resonance, so only 5 % of it stays.
    """
    x = (points_mm - points_mm.reshape(-1, 3).mean(axis=0)) / 100.0
    terms = [x[..., 0], x[..., 1], x[..., 2], x[..., 0] ** 2, x[..., 1] ** 2, x[..., 2] ** 2,
             x[..., 0] * x[..., 1], x[..., 1] * x[..., 2], x[..., 0] * x[..., 2]]  # fmt: skip
    coefficients = rng.normal(0, [1.2] * 3 + [0.5] * 6)
    phase = rng.uniform(-np.pi, np.pi) + sum(c * t for c, t in zip(coefficients, terms))
    field_hz = sum(c * t for c, t in zip(rng.normal(0, 5, 3), terms[:3]))
    for _ in range(int(rng.integers(2, 4))):
        spot = rng.normal(0, 0.5, 3)
        width = rng.uniform(0.15, 0.3)
        amplitude = rng.uniform(20, 80) * rng.choice([-1, 1])
        field_hz = field_hz + amplitude * np.exp(-((x - spot) ** 2).sum(axis=-1) / (2 * width**2))
    phase = phase + 2 * np.pi * field_hz * te_ms * 1e-3 * (0.05 if spin_echo else 1.0)
    return phase.astype(np.float32)


def phase_encode_limits(width: int, fraction: float) -> tuple[int, int, int]:
    """Acquired phase-encode lines: ``(lines, center, padding_left)`` for ``round(fraction · W)`` lines (even)."""
    lines = max(2, min(width, 2 * round(fraction * width / 2)))
    center = lines // 2
    return lines, center, width // 2 - center


def encode(coil_images: np.ndarray, padding_left: int, lines: int) -> np.ndarray:
    """``(S, C, H, W)`` complex coil images -> k-space, zero outside columns ``[padding_left, padding_left + lines)``.
    """
    kspace = fft2c(torch.from_numpy(np.ascontiguousarray(coil_images, dtype=np.complex64))).numpy()
    kspace[..., :padding_left] = 0
    kspace[..., padding_left + lines :] = 0
    return kspace


def add_correlated_noise(
    kspace: np.ndarray, covariance: np.ndarray, rng: np.random.Generator, columns: slice = slice(None)
) -> np.ndarray:
    """Add complex Gaussian noise with coil covariance ``covariance`` ``(C, C)`` to ``kspace[..., columns]``.

    ``noise = L · z`` with ``L`` the Cholesky factor of the covariance and ``z`` white circular complex noise of
    unit variance (real and imaginary parts each of variance 1/2), so ``E[n nᴴ] = covariance``.

    Args:
        kspace: ``(S, C, H, W)`` complex64, changed in place and returned.
        covariance: Hermitian positive-definite ``(C, C)``.
        rng: random generator.
        columns: phase-encode columns that were acquired (the others stay exactly zero).
    """
    target = torch.from_numpy(kspace[..., columns])
    slices, num_coils = target.shape[:2]
    white = torch.from_numpy(rng.standard_normal((2, *target.shape), dtype=np.float32))
    white = torch.complex(white[0], white[1]).mul_(np.sqrt(0.5)).reshape(slices, num_coils, -1)
    chol = torch.from_numpy(np.linalg.cholesky(covariance).astype(np.complex64))
    noise = torch.matmul(chol, white).reshape(target.shape)
    kspace[..., columns] = (target + noise).numpy()
    return kspace


def center_crop(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Centre crop the last two axes to ``size`` exactly as ``fastmri.data.transforms.center_crop``."""
    top = (image.shape[-2] - size[0]) // 2
    left = (image.shape[-1] - size[1]) // 2
    return image[..., top : top + size[0], left : left + size[1]]


def rss_target(kspace: np.ndarray, recon_size: tuple[int, int]) -> np.ndarray:
    """``reconstruction_rss``: RSS over coils of ``ifft2c(kspace)``, centre-cropped -> ``(S, h, w)`` float32."""
    images = ifft2c(torch.from_numpy(kspace)).numpy()
    rss = np.sqrt((images.real**2 + images.imag**2).sum(axis=1))
    return np.ascontiguousarray(center_crop(rss, recon_size), dtype=np.float32)
