"""Complex arithmetic on fastMRI's real layout: the last axis holds (real, imag) and has size 2."""

from __future__ import annotations

import torch

__all__ = ["complex_mul", "complex_conj", "complex_abs", "complex_abs_sq", "rss", "rss_complex"]


def _check_layout(x: torch.Tensor, name: str) -> None:
    if x.shape[-1] != 2:
        raise ValueError(f"{name}: last axis must have size 2 (real, imag); got shape {tuple(x.shape)}")


def complex_mul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Elementwise complex product of ``(..., 2)`` tensors (broadcasting)."""
    _check_layout(x, "complex_mul")
    _check_layout(y, "complex_mul")
    re = x[..., 0] * y[..., 0] - x[..., 1] * y[..., 1]
    im = x[..., 0] * y[..., 1] + x[..., 1] * y[..., 0]
    return torch.stack((re, im), dim=-1)


def complex_conj(x: torch.Tensor) -> torch.Tensor:
    """Complex conjugate of a ``(..., 2)`` tensor."""
    _check_layout(x, "complex_conj")
    return torch.stack((x[..., 0], -x[..., 1]), dim=-1)


def complex_abs_sq(x: torch.Tensor) -> torch.Tensor:
    """Squared magnitude ``(...,)`` of a ``(..., 2)`` tensor."""
    _check_layout(x, "complex_abs_sq")
    return (x**2).sum(dim=-1)


def complex_abs(x: torch.Tensor) -> torch.Tensor:
    """Magnitude ``(...,)`` of a ``(..., 2)`` tensor."""
    return complex_abs_sq(x).sqrt()


def rss(data: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Root sum of squares of real magnitudes along ``dim`` (the coil axis)."""
    return torch.sqrt((data**2).sum(dim))


def rss_complex(data: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Root sum of squares of ``(..., 2)`` complex coil images along ``dim``; drops the last axis."""
    return torch.sqrt(complex_abs_sq(data).sum(dim))
