"""Multi-coil operators on fastMRI's layout: coil expand / reduce and soft data consistency.

Shapes: ``image`` is ``(B, 1, H, W, 2)``, ``kspace`` and ``sens_maps`` are ``(B, C, H, W, 2)``, ``mask`` broadcasts
against k-space, e.g. ``(B, 1, 1, W, 1)`` for Cartesian line masks or ``(B, 1, H, W, 1)`` for 2D masks.

**Hybrid space.** With ``hybrid=True`` the coil data are in hybrid space ``(x, k_y)``: k-space after the inverse FFT
along the readout ``H`` (``ifftc(kspace, (-2,))``). A Cartesian line mask is constant along ``H``, so masking and
data consistency are the same there, and the coil operators need only 1D FFTs along the phase-encode ``W``: half the
FFT work of the k-space form, with the same result (VarNet uses it for line masks, see ``reconkit.models.varnet``).
"""

from __future__ import annotations

import torch

from reconkit.ops.backend import backend_choice, resolve_backend
from reconkit.ops.complex import as_complex, complex_conj, complex_mul, native_complex_ok, pair_factor
from reconkit.ops.dft_matmul import centred_fft_matmul_planar, planar_mul, stacked_fft_w, stacked_ifft_w
from reconkit.ops.fft import check_tensors, current_fft_impl, fftc, ifftc, shared_centering_modulation

__all__ = [
    "data_consistency",
    "planar_sens_expand",
    "planar_sens_reduce",
    "sampling_mask",
    "sens_expand",
    "sens_reduce",
    "stacked_sens_expand",
    "stacked_sens_reduce",
]


_HALF = (torch.float16, torch.bfloat16)


def sampling_mask(mask: torch.Tensor) -> torch.Tensor:
    """An integer mask as bool, True wherever it is nonzero: a 0/255 uint8 mask read from a PNG marks the sampled
    locations, as in fastmri's ``torch.where(mask, ...)``, instead of weighting the data by 255. Bool and floating
    masks are returned as they are: a float mask weights the data (0/1 samples; soft values, e.g. of learned
    sampling, stay differentiable)."""
    return mask if mask.dtype == torch.bool or mask.is_floating_point() else mask != 0


def _fft_dims(hybrid: bool) -> tuple[int, ...]:
    """Axes the coil operators transform: W only from / to hybrid space, else both."""
    return (-1,) if hybrid else (-2, -1)


def sens_expand(
    image: torch.Tensor, sens_maps: torch.Tensor, backend: str | None = None, hybrid: bool = False
) -> torch.Tensor:
    """Coil k-space from a combined image: ``fft2c(image · S_c)`` (hybrid space ``fftc(image · S_c, W)``).

    Args:
        image: ``(B, 1, H, W, 2)`` combined complex image.
        sens_maps: ``(B, C, H, W, 2)`` coil sensitivity maps.
        backend: ``"torch"``, ``"triton"`` or ``None`` (automatic, see :mod:`reconkit.ops.backend`). The Triton
            kernels work in k-space; ``hybrid=True`` always runs the torch path.
        hybrid: return hybrid-space coil data (module docstring) instead of k-space.

    Returns:
        ``(B, C, H, W, 2)`` coil k-space (hybrid space with ``hybrid=True``).

    Example:
        >>> from reconkit.ops import real_inner
        >>> image, sens_maps = torch.randn(1, 1, 8, 6, 2), torch.randn(1, 4, 8, 6, 2)
        >>> kspace = sens_expand(image, sens_maps)
        >>> kspace.shape
        torch.Size([1, 4, 8, 6, 2])
        >>> y = torch.randn(1, 4, 8, 6, 2)  # sens_reduce is the adjoint: <E x, y> = <x, Eᴴ y>
        >>> lhs, rhs = real_inner(kspace, y), real_inner(image, sens_reduce(y, sens_maps))
        >>> bool((lhs - rhs).abs() <= 1e-5 * kspace.norm() * y.norm())  # float32 error scales with the norms
        True
    """
    check_tensors("sens_expand", image, sens_maps)
    dims = _fft_dims(hybrid)
    backend_choice(backend)  # a misspelt name fails here too, where the path below does not depend on it
    if current_fft_impl() == "matmul":  # the export path wins over any ops backend
        return _sens_expand_planar(image, sens_maps, dims)
    if not hybrid and resolve_backend(backend, image, sens_maps) == "triton":
        from reconkit.ops import triton_kernels

        return triton_kernels.sens_expand(image, sens_maps)
    if image.dtype in _HALF or sens_maps.dtype in _HALF:  # half precision to float32, as the FFT's; float64 stays
        image, sens_maps = (t.float() if t.dtype in _HALF else t for t in (image, sens_maps))
    height, width = sens_maps.shape[-3], sens_maps.shape[-2]
    if not (native_complex_ok(image, sens_maps) and height % 2 == 0 and width % 2 == 0):
        return fftc(complex_mul(image, sens_maps), dims)
    # fftc(x) = post · FFT(pre · x): the pre-modulation goes onto the one-coil image before the coil product,
    # and the post-modulation is done in place on the FFT's output, so the C-coil data are written twice only.
    z_image, z_sens = as_complex(image), as_complex(sens_maps)
    pre, post = shared_centering_modulation(height, width, z_sens.device, z_sens.dtype, dims)
    kspace = torch.fft.fftn((z_image * pre) * z_sens, dim=dims, norm="ortho").mul_(post)
    return torch.view_as_real(kspace)


def sens_reduce(
    kspace: torch.Tensor, sens_maps: torch.Tensor, backend: str | None = None, hybrid: bool = False
) -> torch.Tensor:
    """Coil-combined image from coil k-space: ``Σ_c conj(S_c) · ifft2c(k_c)`` (from hybrid space: ``ifftc`` along W).

    Args:
        kspace: ``(B, C, H, W, 2)`` coil k-space (hybrid space with ``hybrid=True``).
        sens_maps: ``(B, C, H, W, 2)`` coil sensitivity maps.
        backend: as :func:`sens_expand`.
        hybrid: the input is hybrid-space coil data (module docstring).

    Returns:
        ``(B, 1, H, W, 2)`` combined complex image.
    """
    check_tensors("sens_reduce", kspace, sens_maps)
    dims = _fft_dims(hybrid)
    backend_choice(backend)  # a misspelt name fails here too, where the path below does not depend on it
    if current_fft_impl() == "matmul":  # the export path wins over any ops backend
        return _sens_reduce_planar(kspace, sens_maps, dims)
    if not hybrid and resolve_backend(backend, kspace, sens_maps) == "triton":
        from reconkit.ops import triton_kernels

        return triton_kernels.sens_reduce(kspace, sens_maps)
    height, width = kspace.shape[-3], kspace.shape[-2]
    if not (native_complex_ok(kspace, sens_maps) and height % 2 == 0 and width % 2 == 0):
        return complex_mul(ifftc(kspace, dims), complex_conj(sens_maps)).sum(dim=1, keepdim=True)
    # ifftc(k) = post · IFFT(pre · k); the post-modulation commutes with the coil sum, so it is applied to the
    # one-coil result. vecdot computes Σ_c conj(S_c) · x_c in one pass without a C-coil temporary.
    z_kspace, z_sens = as_complex(kspace), as_complex(sens_maps)
    pre, post = shared_centering_modulation(height, width, z_sens.device, z_sens.dtype, dims)
    coil_images = torch.fft.ifftn(z_kspace * pre, dim=dims, norm="ortho")
    image = torch.linalg.vecdot(z_sens, coil_images, dim=1).unsqueeze(1) * post
    return torch.view_as_real(image)


def planar_sens_expand(
    re: torch.Tensor, im: torch.Tensor, maps_re: torch.Tensor, maps_im: torch.Tensor, dims: tuple[int, ...] = (-2, -1)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Export path: :func:`sens_expand` on planar data with the MatMul FFT along ``dims`` (``(-1,)``: to hybrid space).

    ``re, im``: ``(B, 1, H, W)`` image parts; ``maps_re, maps_im``: ``(B, C, H, W)``. Returns ``(B, C, H, W)`` parts.
    No ``(..., 2)`` axis is built, so ONNX Runtime copies no C-coil tensor to pair or unpair the parts.
    """
    coil_re, coil_im = planar_mul(re, im, maps_re, maps_im)
    return centred_fft_matmul_planar(coil_re, coil_im, inverse=False, dims=dims)


def planar_sens_reduce(
    re: torch.Tensor, im: torch.Tensor, maps_re: torch.Tensor, maps_im: torch.Tensor, dims: tuple[int, ...] = (-2, -1)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Export path: :func:`sens_reduce` on planar ``(B, C, H, W)`` parts → ``(B, 1, H, W)`` parts (MatMul FFT)."""
    re, im = centred_fft_matmul_planar(re, im, inverse=True, dims=dims)
    re, im = planar_mul(re, im, maps_re, maps_im, conj_b=True)
    return re.sum(dim=1, keepdim=True), im.sum(dim=1, keepdim=True)


def _sens_expand_planar(image: torch.Tensor, sens_maps: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Export path (``fft_impl("matmul")``) of :func:`sens_expand`: planar inside, the C-coil (real, imag) axis is
    built once, at the end."""
    parts = planar_sens_expand(image[..., 0], image[..., 1], sens_maps[..., 0], sens_maps[..., 1], dims)
    return torch.stack(parts, dim=-1)


def _sens_reduce_planar(kspace: torch.Tensor, sens_maps: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Export path of :func:`sens_reduce`: planar inside (no C-coil stack)."""
    parts = planar_sens_reduce(kspace[..., 0], kspace[..., 1], sens_maps[..., 0], sens_maps[..., 1], dims)
    return torch.stack(parts, dim=-1)


def data_consistency(
    kspace: torch.Tensor,
    ref_kspace: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor | float,
    backend: str | None = None,
) -> torch.Tensor:
    """Soft data consistency ``k − η · mask · (k − k₀)`` (E2E-VarNet's learned DC term).

    Args:
        kspace: ``(B, C, H, W, 2)`` current k-space estimate ``k``.
        ref_kspace: ``(B, C, H, W, 2)`` measured k-space ``k₀`` (zero where not sampled).
        mask: sampling mask broadcasting against ``kspace``: bool, float (0/1, or weights) or integer (nonzero =
            sampled, :func:`sampling_mask`).
        weight: DC weight ``η`` (scalar tensor, learnable in VarNet).
        backend: as :func:`sens_expand`.

    Returns:
        ``(B, C, H, W, 2)`` updated k-space.

    Example:
        >>> kspace, measured = torch.randn(1, 2, 4, 6, 2), torch.randn(1, 2, 4, 6, 2)
        >>> mask = torch.zeros(1, 1, 1, 6, 1); mask[..., 2:4, :] = 1
        >>> out = data_consistency(kspace, measured * mask, mask, weight=1.0)  # η = 1: measured lines replace k
        >>> bool(torch.allclose(out[..., 2:4, :], measured[..., 2:4, :], atol=1e-6))  # sampled columns of W
        True
        >>> bool(torch.equal(out[..., 4:, :], kspace[..., 4:, :]))  # the others are kept
        True

    Raises:
        ValueError: ``kspace`` not floating point (e.g. a complex tensor), or a mask with fewer axes than
            ``kspace`` whose batch axis would broadcast onto another axis.
    """
    check_tensors("data_consistency", kspace, ref_kspace, mask)
    if not kspace.is_floating_point():  # η would be cast to the integer dtype (0.3 → 0)
        complex_hint = " (complex tensors: torch.view_as_real gives fastMRI's real layout (..., 2))"
        hint = complex_hint if kspace.is_complex() else ""
        raise ValueError(f"data_consistency: kspace must be a floating-point tensor; got {kspace.dtype}{hint}")
    if 0 < mask.ndim < kspace.ndim and any(size != 1 for size in mask.shape[:-3]):
        raise ValueError(f"data_consistency: mask {tuple(mask.shape)} has fewer axes than kspace {tuple(kspace.shape)},"
                         f" so its batch axis would broadcast onto another one; give it kspace's {kspace.ndim} axes, "
                         "e.g. (B, 1, 1, W, 1)")
    mask = sampling_mask(mask)
    weight_t = torch.as_tensor(weight, dtype=kspace.dtype, device=kspace.device)
    backend_choice(backend)
    if current_fft_impl() != "matmul" and resolve_backend(backend, kspace, ref_kspace) == "triton":
        from reconkit.ops import triton_kernels

        return triton_kernels.data_consistency(kspace, ref_kspace, mask, weight_t)
    return kspace - (kspace - ref_kspace) * pair_factor(mask.to(kspace.dtype) * weight_t)


def stacked_sens_reduce(kspace: torch.Tensor, maps: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Export path, stacked W-major layout (:func:`reconkit.ops.dft_matmul.stacked_fft_w`): ``Σ_c conj(S_c)·F_Wᴴ k_c``
    of ``(P, 2, f_m, B, C, H)`` hybrid k → ``(2, W, B, H)``; ``maps`` are ``[S_re; S_im]`` and ``[−S_im; S_re]``,
    each ``(2, W, B, C, H)``."""
    coils = stacked_ifft_w(kspace)  # (2, W, B, C, H)
    return torch.stack(((coils * maps[0]).sum(dim=(0, 3)), (coils * maps[1]).sum(dim=(0, 3))))


def stacked_sens_expand(image: torch.Tensor, maps: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Export path, stacked layout: ``F_W(S_c·x)`` of a ``(2, W, B, 1, H)`` image → ``(P, 2, f_m, B, C, H)``."""
    return stacked_fft_w(image[:1] * maps[0] + image[1:] * maps[1])
