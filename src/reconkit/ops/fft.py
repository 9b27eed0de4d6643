"""Centred, orthonormal 2D (and 1D) FFTs on fastMRI's real layout ``(..., H, W, 2)`` and on complex tensors.

The centred transform is ``fftshift ∘ FFT ∘ ifftshift`` over the last two spatial axes. For an even length N,
``ifftshift`` and ``fftshift`` are rolls by N/2, and rolling by N/2 in one domain is a multiplication by
``(-1)^n`` in the other. Hence, per axis,

    fftshift(FFT(ifftshift(x)))[k] = (-1)^(N/2) · (-1)^k · FFT((-1)^n · x)[k],

so for even H and W the centring is a checkerboard sign ``(-1)^(x+y)`` before and after the FFT, with a global
sign ``(-1)^(H/2 + W/2)`` (1 when both are divisible by 4). No ``roll`` copies are made. Odd sizes fall back to
rolls. The inverse has the same form. :func:`fftc` / :func:`ifftc` transform a chosen subset of the two axes (the
1D transforms along the readout ``H`` or the phase-encode ``W`` that hybrid-space operators use).

Computation is done in float32 (half / bfloat16 inputs are promoted), so mixed-precision models keep their FFTs
in full precision; float64 stays float64 with ``torch.fft``, while the ``"matmul"`` implementation (the export
path) computes in float32.

Which implementation runs is chosen by :func:`fft_impl`: ``"torch"`` (``torch.fft``, the default everywhere) or
``"matmul"`` (an FFT made of MatMul/Reshape ops, used by the ONNX exporter; see ``reconkit.ops.dft_matmul``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

__all__ = [
    "centering_modulation",
    "centering_signs",
    "current_fft_impl",
    "fft2c",
    "fft_impl",
    "fftc",
    "ifft2c",
    "ifftc",
]  # fmt: skip

SPATIAL_DIMS = (-2, -1)  # (H, W) of a complex (..., H, W) tensor; -3 / -2 of the real layout (..., H, W, 2)

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


def check_tensors(name: str, *values: object) -> None:
    """TypeError naming the public function ``name`` for an argument that is not a torch tensor (a numpy array
    fails deep inside with an AttributeError otherwise)."""
    for value in values:
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected torch tensors in fastMRI's real layout (..., 2) (last axis real, imag); "
                            f"got {type(value).__module__}.{type(value).__qualname__} (torch.from_numpy converts a "
                            "numpy array, torch.view_as_real a complex tensor)")


def centering_signs(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Checkerboard ``(-1)^(x+y)`` of shape ``(height, width)``; both sizes must be even."""
    _check_even((height, width), "centering_signs")
    y = torch.arange(height, device=device).unsqueeze(1)
    x = torch.arange(width, device=device).unsqueeze(0)
    return (1 - 2 * ((x + y) % 2)).to(dtype)


@functools.lru_cache(maxsize=32)
def _cached_signs(
    height: int, width: int, device: torch.device, dtype: torch.dtype, dims: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    # normal tensors even when first built under torch.inference_mode(): a cached inference tensor could not be
    # saved for backward by a later autograd call
    with torch.inference_mode(False):
        return _sign_patterns(height, width, device, dtype, dims)


def _check_even(lengths: tuple[int, ...], name: str) -> None:
    """ValueError for an odd length: ``(-1)^n`` modulation centres a FFT of even length only (odd sizes roll)."""
    if any(length % 2 for length in lengths):
        raise ValueError(f"{name}: the centring sign patterns exist for even lengths only; got {tuple(lengths)}")


def _sign_patterns(
    height: int, width: int, device: torch.device, dtype: torch.dtype, dims: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_even(tuple((height, width)[d] for d in dims), "centering_modulation")
    if dims == SPATIAL_DIMS:
        pre = centering_signs(height, width, device=device, dtype=dtype)
    else:  # one axis: (-1)^y as (H, 1) or (-1)^x as (W,)
        length = height if dims == (-2,) else width
        pre = (1 - 2 * (torch.arange(length, device=device) % 2)).to(dtype)
        pre = pre.unsqueeze(1) if dims == (-2,) else pre
    half_sum = (height // 2 if -2 in dims else 0) + (width // 2 if -1 in dims else 0)
    post = -pre if half_sum % 2 else pre
    return pre, post


def centering_modulation(
    height: int, width: int, device: torch.device, dtype: torch.dtype, dims: tuple[int, ...] = SPATIAL_DIMS
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pre, post)`` sign patterns with ``fftc(x, dims) = post · FFT(pre · x)`` along ``dims``, whose lengths
    must be even: ``(H, W)`` for both axes, ``(H, 1)`` for ``dims=(-2,)``, ``(W,)`` for ``dims=(-1,)``.

    ``dtype`` should be the dtype of the tensor they multiply (complex for complex data). The tensors returned are
    the caller's own (copies of the cache the FFTs share, so changing them in place changes no later FFT).
    """
    pre, post = shared_centering_modulation(height, width, device, dtype, dims)
    return pre.clone(), post.clone()


def shared_centering_modulation(
    height: int, width: int, device: torch.device, dtype: torch.dtype, dims: tuple[int, ...] = SPATIAL_DIMS
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`centering_modulation` without the copy, for the FFTs themselves: cached in eager mode (never modify
    them in place), built from ops while tracing or compiling and under a dispatch mode (``FakeTensorMode``'s fake
    tensors must neither enter the cache nor meet its real ones)."""
    dims = check_fft_dims(dims)
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or is_in_torch_dispatch_mode():
        return _sign_patterns(height, width, device, dtype, dims)
    return _cached_signs(height, width, device, dtype, dims)


def check_fft_dims(dims) -> tuple[int, ...]:
    """``dims`` as a sorted tuple, checked to be ``(-2,)`` (H), ``(-1,)`` (W) or ``(-2, -1)`` (both)."""
    dims = tuple(sorted(int(d) for d in dims))
    if dims not in ((-2,), (-1,), (-2, -1)):
        raise ValueError(f"FFT dims must be (-2,) (H), (-1,) (W) or (-2, -1) of (..., H, W); got {dims}")
    return dims


def _centred_fft_complex(z: torch.Tensor, inverse: bool, dims: tuple[int, ...] = SPATIAL_DIMS) -> torch.Tensor:
    """Centred orthonormal (i)FFT of a complex tensor ``(..., H, W)`` along ``dims``."""
    height, width = z.shape[-2], z.shape[-1]
    transform = torch.fft.ifftn if inverse else torch.fft.fftn
    if any(z.shape[d] % 2 for d in dims):
        z = torch.fft.ifftshift(z, dim=dims)
        z = transform(z, dim=dims, norm="ortho")
        return torch.fft.fftshift(z, dim=dims)
    pre, post = shared_centering_modulation(height, width, z.device, z.dtype, dims)
    # the FFT's backward does not need its output, so modulating it in place is autograd-safe
    return transform(z * pre, dim=dims, norm="ortho").mul_(post)


def empty_transform(data: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """The transform of a tensor with no values: empty batch or coil axes give an empty result (torch's MKL FFT
    raises on them); an empty transformed axis is an error."""
    spatial = data.shape[-2:] if data.is_complex() else data.shape[-3:-1]
    if any(spatial[d] == 0 for d in dims):
        raise ValueError(f"cannot transform an axis of length 0: (H, W) = {tuple(spatial)}")
    return data.clone()


def _centred_fft(data: torch.Tensor, inverse: bool, dims: tuple[int, ...] = SPATIAL_DIMS) -> torch.Tensor:
    dims = check_fft_dims(dims)
    if data.is_complex():
        if data.dtype != torch.complex64 and data.dtype != torch.complex128:
            data = data.to(torch.complex64)
        if data.numel() == 0:
            return empty_transform(data, dims)
        return _centred_fft_complex(data, inverse, dims)
    if data.ndim < 3 or data.shape[-1] != 2:
        raise ValueError(f"expected a complex tensor or a real tensor (..., H, W, 2); got shape {tuple(data.shape)}")
    if data.dtype in (torch.float16, torch.bfloat16):
        data = data.float()
    if data.numel() == 0:
        return empty_transform(data, dims)
    if _FFT_IMPL.get() == "matmul":
        from reconkit.ops.dft_matmul import centred_fft_matmul

        return centred_fft_matmul(data, inverse, dims)
    z = torch.view_as_complex(data.contiguous())
    return torch.view_as_real(_centred_fft_complex(z, inverse, dims))


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
    check_tensors("fft2c", data)
    return _centred_fft(data, inverse=False)


def ifft2c(data: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2D inverse FFT; layout as :func:`fft2c`."""
    check_tensors("ifft2c", data)
    return _centred_fft(data, inverse=True)


def fftc(data: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Centred orthonormal FFT along ``dims`` of the spatial axes: ``(-2,)`` the readout H, ``(-1,)`` the
    phase-encode W, ``(-2, -1)`` both (= :func:`fft2c`). Counted on the complex layout ``(..., H, W)``, so for the
    real layout ``(..., H, W, 2)`` the same numbers name the same axes. Layout and dtypes as :func:`fft2c`.

    Example:
        >>> x = torch.randn(3, 8, 6, 2)
        >>> torch.allclose(fftc(fftc(x, (-2,)), (-1,)), fft2c(x), atol=1e-5)
        True
    """
    check_tensors("fftc", data)
    return _centred_fft(data, inverse=False, dims=dims)


def ifftc(data: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Centred orthonormal inverse FFT along ``dims``; see :func:`fftc`."""
    check_tensors("ifftc", data)
    return _centred_fft(data, inverse=True, dims=dims)
