"""Complex arithmetic on fastMRI's real layout: the last axis holds (real, imag) and has size 2."""

from __future__ import annotations

import torch

from reconkit.ops.fft import current_fft_impl

__all__ = [
    "as_complex",
    "complex_abs",
    "complex_abs_sq",
    "complex_conj",
    "complex_mul",
    "native_complex_ok",
    "pair_factor",
    "power_of_two_scale",
    "rss",
    "rss_complex",
]


def _check_layout(x: torch.Tensor, name: str) -> None:
    if x.shape[-1] != 2:
        raise ValueError(f"{name}: last axis must have size 2 (real, imag); got shape {tuple(x.shape)}")


def native_complex_ok(*tensors: torch.Tensor) -> bool:
    """Whether ``tensors`` (real layout ``(..., 2)``) may be computed on as native complex tensors.

    True for non-empty float32 / float64 tensors of one dtype while the ``torch`` FFT implementation is selected.
    Under ``fft_impl("matmul")`` (ONNX export, which has no complex type) and for half precision, ops keep to real
    arithmetic; so do empty tensors (torch's MKL FFT raises on an empty batch, and the backward of
    ``view_as_complex`` on the stride-0 gradient of an empty sum).
    """
    dtype = tensors[0].dtype
    return (
        dtype in (torch.float32, torch.float64)
        and all(t.dtype == dtype and t.numel() for t in tensors)
        and current_fft_impl() == "torch"
        and not torch.jit.is_tracing()
    )


def as_complex(x: torch.Tensor) -> torch.Tensor:
    """Complex view ``(...)`` of a real ``(..., 2)`` tensor; copies only when its strides forbid a view.

    Under ``torch.compile`` the tensor is made contiguous without looking at its storage offset (Dynamo cannot
    trace ``storage_offset()``: a graph break in every coil operator); the compiler drops the no-op copy.
    """
    _check_layout(x, "as_complex")
    if torch.compiler.is_compiling() or x.stride(-1) != 1 or x.storage_offset() % 2 or any(s % 2 for s in x.stride()[:-1]):
        x = x.contiguous()
    return torch.view_as_complex(x)


def pair_factor(factor: torch.Tensor) -> torch.Tensor:
    """A real factor ``(..., 1)`` that multiplies (or divides) data in the ``(..., 2)`` layout, ready to broadcast.

    On the export path (``fft_impl("matmul")``) it is expanded to ``(..., 2)``: ONNX Runtime broadcasts a
    size-1 innermost axis against pairs of floats one pair at a time (a mask Mul on 15-coil k-space cost as much
    as a FFT stage), but whole rows when the trailing axes match. Eager PyTorch gets the factor unchanged.
    """
    if factor.ndim and factor.shape[-1] == 1 and current_fft_impl() == "matmul":
        return factor.expand(*factor.shape[:-1], 2)
    return factor


def complex_mul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Elementwise complex product of ``(..., 2)`` tensors (broadcasting)."""
    _check_layout(x, "complex_mul")
    _check_layout(y, "complex_mul")
    if native_complex_ok(x, y):
        return torch.view_as_real(as_complex(x) * as_complex(y))
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
    _check_layout(x, "complex_abs")
    return complex_abs_sq(x).sqrt()


def rss(data: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Root sum of squares of real magnitudes along ``dim`` (the coil axis)."""
    return torch.sqrt((data**2).sum(dim))


def rss_complex(data: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Root sum of squares of ``(..., 2)`` complex coil images along ``dim``; drops the last axis."""
    _check_layout(data, "rss_complex")
    return torch.sqrt(complex_abs_sq(data).sum(dim))


def power_of_two_scale(x: torch.Tensor) -> torch.Tensor:
    """The power of two at or below each batch item's largest ``|value|``: ``(B, ...)`` → ``(B, 1, ..., 1)``.

    Dividing by it and multiplying back is exact in floating point, so a reconstruction that is equivariant to the
    scale of its input (``f(a·y) = a·f(y)``) can compute on values of magnitude ~1 whatever the scanner's or
    converter's units (k-space from 1e-20 to 1e20), away from float32 underflow and overflow. An all-zero item
    gets the dtype's smallest normal number (``2^-126`` in float32), so the division stays finite. The exponent is
    taken in float32, or float64 for float64 input (whose peaks float32 would round to 0 or inf). Exports to ONNX
    (Abs, ReduceMax, Log, Floor, Pow).
    """
    peak = x.detach().abs().amax(dim=tuple(range(1, x.dim())), keepdim=True)
    peak = peak.clamp_min(torch.finfo(x.dtype).tiny).to(torch.promote_types(x.dtype, torch.float32))
    exponent = torch.floor(torch.log2(peak))
    return torch.pow(2.0, exponent).to(x.dtype)
