"""Centred, orthonormal 2D FFTs on fastMRI's real layout ``(..., H, W, 2)`` and on complex tensors.

The centred transform is ``fftshift ∘ FFT ∘ ifftshift`` over the last two spatial axes. For an even length N,
``ifftshift`` and ``fftshift`` are rolls by N/2, and rolling by N/2 in one domain is a multiplication by
``(-1)^n`` in the other. Hence, per axis,

    fftshift(FFT(ifftshift(x)))[k] = (-1)^(N/2) · (-1)^k · FFT((-1)^n · x)[k],

so for even H and W the centring is a checkerboard sign ``(-1)^(x+y)`` before and after the FFT, with a global
sign ``(-1)^(H/2 + W/2)`` (1 when both are divisible by 4). No ``roll`` copies are made. Odd sizes fall back to
rolls. The inverse has the same form.

Computation is done in float32 (half / bfloat16 inputs are promoted), so mixed-precision models keep their FFTs
in full precision.

Which implementation runs is chosen by :func:`fft_impl`: ``"torch"`` (``torch.fft``, the default everywhere) or
``"matmul"`` (an FFT made of MatMul/Reshape ops, used by the ONNX exporter; see ``reconkit.ops.dft_matmul``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Iterator

import torch

__all__ = ["fft2c", "ifft2c", "fft_impl", "current_fft_impl", "centering_signs", "centering_modulation"]

_FFT_IMPL: contextvars.ContextVar[str] = contextvars.ContextVar("reconkit_fft_impl", default="torch")


@contextlib.contextmanager
def fft_impl(name: str) -> Iterator[None]:
    """Select the FFT implementation inside a ``with`` block (``"torch"`` or ``"matmul"``).

    The exporter uses ``with fft_impl("matmul"): torch.onnx.export(...)`` so that the graph holds MatMul-based
    FFTs instead of ONNX's slow ``DFT`` op. Eager code never needs this.
    """
    if name not in ("torch", "matmul"):
        raise ValueError(f"unknown FFT implementation {name!r}; expected 'torch' or 'matmul'")
    token = _FFT_IMPL.set(name)
    try:
        yield
    finally:
        _FFT_IMPL.reset(token)


def current_fft_impl() -> str:
    """The FFT implementation selected for the current context."""
    return _FFT_IMPL.get()


def centering_signs(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Checkerboard ``(-1)^(x+y)`` of shape ``(height, width)``; both sizes must be even."""
    y = torch.arange(height, device=device).unsqueeze(1)
    x = torch.arange(width, device=device).unsqueeze(0)
    return (1 - 2 * ((x + y) % 2)).to(dtype)


@functools.lru_cache(maxsize=32)
def _cached_signs(height: int, width: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    pre = centering_signs(height, width, device=device, dtype=dtype)
    post = -pre if (height // 2 + width // 2) % 2 else pre
    return pre, post


def centering_modulation(
    height: int, width: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pre, post)`` sign patterns ``(H, W)`` with ``fft2c(x) = post · FFT(pre · x)`` for even ``H`` and ``W``.

    ``dtype`` should be the dtype of the tensor they multiply (complex for complex data), so that no conversion
    happens per call. Cached in eager mode, built from ops while tracing or compiling.
    """
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return _cached_signs.__wrapped__(height, width, device, dtype)
    return _cached_signs(height, width, device, dtype)


def _centred_fft_complex(z: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Centred orthonormal 2D (i)FFT of a complex tensor ``(..., H, W)``."""
    height, width = z.shape[-2], z.shape[-1]
    transform = torch.fft.ifft2 if inverse else torch.fft.fft2
    if height % 2 or width % 2:
        z = torch.fft.ifftshift(z, dim=(-2, -1))
        z = transform(z, dim=(-2, -1), norm="ortho")
        return torch.fft.fftshift(z, dim=(-2, -1))
    pre, post = centering_modulation(height, width, z.device, z.dtype)
    # the FFT's backward does not need its output, so modulating it in place is autograd-safe
    return transform(z * pre, dim=(-2, -1), norm="ortho").mul_(post)


def _centred_fft(data: torch.Tensor, inverse: bool) -> torch.Tensor:
    if data.is_complex():
        if data.dtype != torch.complex64 and data.dtype != torch.complex128:
            data = data.to(torch.complex64)
        return _centred_fft_complex(data, inverse)
    if data.ndim < 3 or data.shape[-1] != 2:
        raise ValueError(f"expected a complex tensor or a real tensor (..., H, W, 2); got shape {tuple(data.shape)}")
    if data.dtype in (torch.float16, torch.bfloat16):
        data = data.float()
    if _FFT_IMPL.get() == "matmul":
        from reconkit.ops.dft_matmul import centred_fft_matmul

        return centred_fft_matmul(data, inverse)
    z = torch.view_as_complex(data.contiguous())
    return torch.view_as_real(_centred_fft_complex(z, inverse))


def fft2c(data: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2D FFT over the two spatial axes.

    Args:
        data: real tensor ``(..., H, W, 2)`` (fastMRI layout, last axis = real/imag) or complex ``(..., H, W)``.

    Returns:
        k-space of the same layout and shape (float32 / complex64 for low-precision inputs).

    Example:
        >>> import torch, fastmri
        >>> x = torch.randn(4, 8, 6, 2)
        >>> torch.allclose(fft2c(x), fastmri.fft2c(x), atol=1e-6)
        True
    """
    return _centred_fft(data, inverse=False)


def ifft2c(data: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2D inverse FFT; layout as :func:`fft2c`."""
    return _centred_fft(data, inverse=True)
