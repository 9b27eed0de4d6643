"""Fused Triton kernels for the coil operators and soft data consistency (forward and backward).

Same maths and layout as :mod:`reconkit.ops.coils` (fastMRI's real layout ``(..., H, W, 2)``, float32 or float64;
a float32 / float64 mix is computed in float64 and half precision in float32, as the torch path does;
``data_consistency`` casts its result back to half precision as the torch path keeps it; a batch of 1
broadcasts), used through its ``backend=`` dispatch:

* ``sens_expand(image, sens_maps)``: one kernel forms ``pre · (image · S_c)`` for all coils, ``torch.fft.fft2``
  (cuFFT) transforms, one in-place kernel applies the post-modulation.
* ``sens_reduce(kspace, sens_maps)``: one kernel applies the pre-modulation, ``torch.fft.ifft2`` transforms, one
  kernel applies the post-modulation, multiplies by ``conj(S_c)`` and sums the coils (no C-coil temporary).
* ``data_consistency(kspace, ref_kspace, mask, weight)``: ``k − η·mask·(k − k₀)`` in one pass; the backward is
  one pass too and returns the gradient of ``η`` from per-block partial sums (deterministic).

Centring (see :mod:`reconkit.ops.fft`): for even ``H`` and ``W`` the ``ifftshift`` / ``fftshift`` pair is the
checkerboard ``(-1)^(y+x)`` before and after the FFT with the global sign ``(-1)^(H/2 + W/2)`` after it; for odd
sizes the kernels read at rolled indices instead (``ifftshift``: ``(i + N//2) mod N``, ``fftshift``:
``(i + (N+1)//2) mod N``), so no roll copies are made except after the forward FFT of ``sens_expand``, where the
output of cuFFT is rolled with ``torch.fft.fftshift``.

Backward passes use that the centred orthonormal FFT is unitary: the gradient of ``sens_expand`` with respect to
the image is ``sens_reduce`` of the output gradient, and vice versa. Forward-mode AD (``torch.func.jvp``,
``torch.autograd.forward_ad``) is supported, and so is double backward (``create_graph=True``, Hessian-vector
products), whose backward runs the torch path's ops so that autograd can differentiate it; ``torch.func.vmap`` is not.

Kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before
this module is imported), which is how the tests check them on machines without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from reconkit.ops.fft import empty_transform

__all__ = ["data_consistency", "interpreted", "sens_expand", "sens_reduce"]

_BLOCK = 1024


def interpreted() -> bool:
    """Whether this module's kernels run under Triton's interpreter (``TRITON_INTERPRET=1`` when Triton decorated
    them, i.e. at import), where they accept CPU tensors. Setting or clearing the variable later changes nothing."""
    return _INTERPRETED


# ------------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _source_index(offs, H, W, SH, SW, MODULATE: tl.constexpr):
    """Flat ``(h, w)`` source index (rolled by ``(SH, SW)`` unless modulating) and the checkerboard sign."""
    h = offs // W
    w = offs % W
    if MODULATE:
        src = offs
        sign = 1.0 - 2.0 * ((h + w) % 2).to(tl.float32)
    else:
        src = ((h + SH) % H) * W + (w + SW) % W
        sign = tl.full(offs.shape, 1.0, tl.float32)
    return src, sign


@triton.jit
def _expand_kernel(
    out_ptr, coil_ptr, image_ptr, C, H, W, SH, SW,
    MODULATE: tl.constexpr, HAS_IMAGE: tl.constexpr, BLOCK: tl.constexpr,
):
    """``out[b, c] = pre(coil[b, c] · image[b])`` over one block of one coil plane ``(H, W)``; grid ``(B·C, blocks)``."""
    bc = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < H * W
    src, sign = _source_index(offs, H, W, SH, SW, MODULATE)
    pair = tl.arange(0, 2)[None, :]
    ld_mask = valid[:, None]
    coil = tl.load(coil_ptr + (bc * H * W + src)[:, None] * 2 + pair, mask=ld_mask, other=0.0)
    re, im = tl.split(coil)
    if HAS_IMAGE:
        image = tl.load(image_ptr + ((bc // C) * H * W + src)[:, None] * 2 + pair, mask=ld_mask, other=0.0)
        x_re, x_im = tl.split(image)
        re, im = re * x_re - im * x_im, re * x_im + im * x_re
    s = sign.to(re.dtype)
    tl.store(out_ptr + (bc * H * W + offs)[:, None] * 2 + pair, tl.join(re * s, im * s), mask=ld_mask)


@triton.jit
def _sign_kernel(data_ptr, H, W, global_sign, BLOCK: tl.constexpr):
    """In place ``data[bc] *= global_sign · (-1)^(h+w)`` (the post-modulation); grid ``(B·C, blocks)``."""
    bc = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < H * W
    sign = global_sign * (1.0 - 2.0 * (((offs // W) + (offs % W)) % 2).to(tl.float32))
    ptrs = data_ptr + (bc * H * W + offs)[:, None] * 2 + tl.arange(0, 2)[None, :]
    data = tl.load(ptrs, mask=valid[:, None], other=0.0)
    tl.store(ptrs, data * sign.to(data.dtype)[:, None], mask=valid[:, None])


@triton.jit
def _reduce_kernel(
    raw_ptr, sens_ptr, x_ptr, coil_out_ptr, image_out_ptr, C, H, W, SH, SW, global_sign,
    MODULATE: tl.constexpr, WRITE_COIL: tl.constexpr, WRITE_IMAGE: tl.constexpr, BLOCK: tl.constexpr,
):
    """With ``u_c = post(raw[b, c])``: ``image_out[b] = Σ_c conj(S_c) · u_c`` and/or ``coil_out[b, c] = u_c · conj(x[b])``.

    Grid ``(B, blocks)``; the coil loop runs inside the program, so the coil sum needs no atomics.
    """
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < H * W
    src, sign = _source_index(offs, H, W, SH, SW, MODULATE)
    pair = tl.arange(0, 2)[None, :]
    ld_mask = valid[:, None]
    if WRITE_COIL:
        x_re, x_im = tl.split(tl.load(x_ptr + (b * H * W + offs)[:, None] * 2 + pair, mask=ld_mask, other=0.0))
    acc_re = tl.zeros((BLOCK,), sens_ptr.dtype.element_ty)
    acc_im = tl.zeros((BLOCK,), sens_ptr.dtype.element_ty)
    for c in range(C):
        plane = (b * C + c) * H * W
        u_re, u_im = tl.split(tl.load(raw_ptr + (plane + src)[:, None] * 2 + pair, mask=ld_mask, other=0.0))
        s = (sign * global_sign).to(u_re.dtype)
        u_re, u_im = u_re * s, u_im * s
        if WRITE_IMAGE:
            s_re, s_im = tl.split(tl.load(sens_ptr + (plane + offs)[:, None] * 2 + pair, mask=ld_mask, other=0.0))
            acc_re = acc_re + (s_re * u_re + s_im * u_im)
            acc_im = acc_im + (s_re * u_im - s_im * u_re)
        if WRITE_COIL:
            out = tl.join(u_re * x_re + u_im * x_im, u_im * x_re - u_re * x_im)
            tl.store(coil_out_ptr + (plane + offs)[:, None] * 2 + pair, out, mask=ld_mask)
    if WRITE_IMAGE:
        out = tl.join(acc_re, acc_im).to(image_out_ptr.dtype.element_ty)
        tl.store(image_out_ptr + (b * H * W + offs)[:, None] * 2 + pair, out, mask=ld_mask)


@triton.jit
def _dc_index(offs, C, H, W, m_b, m_c, m_h, m_w):
    """Offset into the (broadcast) mask of complex element ``offs`` of a ``(B, C, H, W)`` plane stack."""
    w = offs % W
    h = (offs // W) % H
    c = (offs // (W * H)) % C
    b = offs // (W * H * C)
    return b * m_b + c * m_c + h * m_h + w * m_w


# decided by triton.jit when the kernels above were decorated, not by the environment at call time
_INTERPRETED = type(_expand_kernel).__name__ == "InterpretedFunction"


@triton.jit
def _dc_forward_kernel(
    k_ptr, k0_ptr, mask_ptr, weight_ptr, out_ptr, n, C, H, W, m_b, m_c, m_h, m_w, BLOCK: tl.constexpr
):
    """``out = k − η · mask · (k − k₀)`` over ``n`` complex elements."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    ptrs = offs[:, None] * 2 + tl.arange(0, 2)[None, :]
    k = tl.load(k_ptr + ptrs, mask=valid[:, None], other=0.0)
    k0 = tl.load(k0_ptr + ptrs, mask=valid[:, None], other=0.0)
    m = tl.load(mask_ptr + _dc_index(offs, C, H, W, m_b, m_c, m_h, m_w), mask=valid, other=0).to(k.dtype)
    eta = tl.load(weight_ptr).to(k.dtype)
    tl.store(out_ptr + ptrs, k - (eta * m)[:, None] * (k - k0), mask=valid[:, None])


@triton.jit
def _dc_backward_kernel(
    grad_ptr, k_ptr, k0_ptr, mask_ptr, weight_ptr, grad_k_ptr, grad_k0_ptr, partial_ptr,
    n, C, H, W, m_b, m_c, m_h, m_w,
    WRITE_K: tl.constexpr, WRITE_K0: tl.constexpr, WRITE_WEIGHT: tl.constexpr, BLOCK: tl.constexpr,
):
    """Gradients of the DC step: ``g·(1 − η·m)``, ``g·η·m`` and per-block partial sums of ``−Σ g·m·(k − k₀)``."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    ptrs = offs[:, None] * 2 + tl.arange(0, 2)[None, :]
    g = tl.load(grad_ptr + ptrs, mask=valid[:, None], other=0.0)
    m = tl.load(mask_ptr + _dc_index(offs, C, H, W, m_b, m_c, m_h, m_w), mask=valid, other=0).to(g.dtype)
    eta = tl.load(weight_ptr).to(g.dtype)
    if WRITE_K:
        tl.store(grad_k_ptr + ptrs, g - (eta * m)[:, None] * g, mask=valid[:, None])
    if WRITE_K0:
        tl.store(grad_k0_ptr + ptrs, (eta * m)[:, None] * g, mask=valid[:, None])
    if WRITE_WEIGHT:
        k = tl.load(k_ptr + ptrs, mask=valid[:, None], other=0.0)
        k0 = tl.load(k0_ptr + ptrs, mask=valid[:, None], other=0.0)
        tl.store(partial_ptr + tl.program_id(0), -tl.sum(tl.sum(g * m[:, None] * (k - k0), axis=1), axis=0))


# ------------------------------------------------------------------------------------------ launch helpers


def _centring(height: int, width: int, inverse_shift: bool) -> tuple[bool, int, int, float]:
    """``(modulate, shift_h, shift_w, global_sign)`` for a pre (``inverse_shift``: ifftshift) or post step."""
    if height % 2 == 0 and width % 2 == 0:
        return True, 0, 0, -1.0 if (height // 2 + width // 2) % 2 else 1.0
    if inverse_shift:
        return False, height // 2, width // 2, 1.0
    return False, (height + 1) // 2, (width + 1) // 2, 1.0


def _complex_buffer(real_like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Empty complex tensor ``shape`` matching the float dtype and device of ``real_like``."""
    dtype = torch.complex128 if real_like.dtype == torch.float64 else torch.complex64
    return torch.empty(shape, dtype=dtype, device=real_like.device)


def _fft2(buffer: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Orthonormal (i)FFT over ``(H, W)`` of a complex ``(B, C, H, W)`` buffer; an empty batch or coil axis gives
    the empty result and an empty ``H`` or ``W`` is an error, as in :mod:`reconkit.ops.fft`."""
    if buffer.numel() == 0:  # torch's MKL FFT raises 'Inconsistent configuration parameters' on it
        return empty_transform(buffer, (-2, -1))
    transform = torch.fft.ifft2 if inverse else torch.fft.fft2
    return transform(buffer, dim=(-2, -1), norm="ortho")


def _expand(coil: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
    """``fft2c(coil · image)`` (or ``fft2c(coil)`` when ``image`` is None) as a complex ``(B, C, H, W)`` tensor."""
    batch, coils, height, width, _ = coil.shape
    modulate, shift_h, shift_w, global_sign = _centring(height, width, inverse_shift=True)
    buffer = _complex_buffer(coil, (batch, coils, height, width))
    # planes on grid axis 0: CUDA allows 2³¹ − 1 programs there, 65535 on axis 1 (batch × coils can pass that)
    grid = (batch * coils, triton.cdiv(height * width, _BLOCK))
    _expand_kernel[grid](
        torch.view_as_real(buffer), coil, coil if image is None else image, coils, height, width, shift_h, shift_w,
        MODULATE=modulate, HAS_IMAGE=image is not None, BLOCK=_BLOCK,
    )
    kspace = _fft2(buffer, inverse=False)
    if not modulate:
        return torch.fft.fftshift(kspace, dim=(-2, -1))
    _sign_kernel[grid](torch.view_as_real(kspace), height, width, global_sign, BLOCK=_BLOCK)
    return kspace


def _raw_coil_images(kspace: torch.Tensor) -> torch.Tensor:
    """``IFFT(pre · kspace)``: coil images before the post-modulation, complex ``(B, C, H, W)``."""
    batch, coils, height, width, _ = kspace.shape
    modulate, shift_h, shift_w, _ = _centring(height, width, inverse_shift=True)
    buffer = _complex_buffer(kspace, (batch, coils, height, width))
    grid = (batch * coils, triton.cdiv(height * width, _BLOCK))
    _expand_kernel[grid](
        torch.view_as_real(buffer), kspace, kspace, coils, height, width, shift_h, shift_w,
        MODULATE=modulate, HAS_IMAGE=False, BLOCK=_BLOCK,
    )
    return _fft2(buffer, inverse=True)


def _reduce(
    raw: torch.Tensor, sens_maps: torch.Tensor, x: torch.Tensor | None, write_image: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """From raw coil images ``raw`` (complex ``(B, C, H, W)``), with ``u = post(raw)``: the image
    ``Σ_c conj(S_c) u_c`` ``(B, 1, H, W, 2)`` if ``write_image``, and ``u_c · conj(x)`` ``(B, C, H, W, 2)`` if ``x``
    ``(B, 1, H, W, 2)`` is given."""
    batch, coils, height, width = raw.shape
    modulate, shift_h, shift_w, global_sign = _centring(height, width, inverse_shift=False)
    raw_real = torch.view_as_real(raw)
    image = torch.empty((batch, 1, height, width, 2), dtype=raw_real.dtype, device=raw.device) if write_image else None
    coil_out = torch.empty_like(raw_real) if x is not None else None
    grid = (batch, triton.cdiv(height * width, _BLOCK))
    _reduce_kernel[grid](
        raw_real, sens_maps, raw_real if x is None else x, raw_real if coil_out is None else coil_out,
        raw_real if image is None else image, coils, height, width, shift_h, shift_w, global_sign,
        MODULATE=modulate, WRITE_COIL=x is not None, WRITE_IMAGE=write_image, BLOCK=_BLOCK,
    )
    return image, coil_out


def _mask_strides(mask: torch.Tensor, shape: torch.Size) -> tuple[int, int, int, int]:
    """Strides ``(b, c, h, w)`` of ``mask`` broadcast to k-space ``shape`` ``(B, C, H, W, 2)`` (0 where broadcast)."""
    return tuple(mask.expand(*shape[:-1], 1).stride()[:4])  # type: ignore[return-value]


def _mask_for_kernel(mask: torch.Tensor) -> torch.Tensor:
    """The mask as the kernels read it: detached, bool viewed as uint8."""
    mask = mask.detach()
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


# ------------------------------------------------------------------------------------------ autograd functions


def _recorded_vjp(
    torch_op, inputs: tuple[torch.Tensor, ...], needs: tuple[bool, ...], grad: torch.Tensor
) -> tuple[torch.Tensor | None, ...]:
    """The backward under ``create_graph=True`` (double backward, Hessian-vector products): the vector-Jacobian
    product of the op's torch path ``torch_op(*inputs)``, recorded so that autograd can differentiate it again (the
    kernels' backward is not recorded: Hessian-vector products came back as zeros)."""
    wanted = [t for t, need in zip(inputs, needs) if need]
    with torch.enable_grad():
        grads = iter(torch.autograd.grad(torch_op(*inputs), wanted, grad, create_graph=True, allow_unused=True))
    return tuple(next(grads) if need else None for need in needs)


class _SensExpand(torch.autograd.Function):
    @staticmethod
    def forward(image: torch.Tensor, sens_maps: torch.Tensor) -> torch.Tensor:
        return torch.view_as_real(_expand(sens_maps, image))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        image, sens_maps = ctx.saved_tensors
        if torch.is_grad_enabled():
            from reconkit.ops.coils import sens_expand as torch_expand

            return _recorded_vjp(lambda x, s: torch_expand(x, s, backend="torch"), (image, sens_maps),
                                 ctx.needs_input_grad, grad)
        need_image, need_sens = ctx.needs_input_grad
        raw = _raw_coil_images(grad.contiguous())
        grad_image, grad_sens = _reduce(raw, sens_maps, image if need_sens else None, write_image=need_image)
        return grad_image, grad_sens

    @staticmethod
    def jvp(ctx, d_image: torch.Tensor | None, d_sens: torch.Tensor | None) -> torch.Tensor:
        """Forward mode: the op is bilinear over the reals, so the tangent is ``E(dx, S) + E(x, dS)``; computed by
        the torch path (``torch.func`` hands wrapped tensors that Triton cannot read)."""
        from reconkit.ops.coils import sens_expand as torch_expand

        image, sens_maps = ctx.saved_tensors
        tangent = torch.zeros_like(sens_maps)
        if d_image is not None:
            tangent = tangent + torch_expand(d_image, sens_maps, backend="torch")
        if d_sens is not None:
            tangent = tangent + torch_expand(image, d_sens, backend="torch")
        return tangent


class _SensReduce(torch.autograd.Function):
    """Returns ``(image, raw)``; ``raw`` (the coil images the backward needs for the maps' gradient) is an extra,
    non-differentiable output because ``setup_context`` (needed by ``torch.func``) cannot see forward's locals."""

    @staticmethod
    def forward(kspace: torch.Tensor, sens_maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = _raw_coil_images(kspace)
        image, _ = _reduce(raw, sens_maps, None, write_image=True)
        return image, raw

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        kspace, sens_maps = inputs
        raw = output[1]
        ctx.mark_non_differentiable(raw)
        ctx.save_for_backward(kspace, sens_maps, raw if ctx.needs_input_grad[1] else None)
        ctx.save_for_forward(kspace, sens_maps)

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _grad_raw: torch.Tensor | None):
        kspace, sens_maps, raw = ctx.saved_tensors
        if torch.is_grad_enabled():
            from reconkit.ops.coils import sens_reduce as torch_reduce

            return _recorded_vjp(lambda k, s: torch_reduce(k, s, backend="torch"), (kspace, sens_maps),
                                 ctx.needs_input_grad, grad)
        grad = grad.contiguous()
        grad_kspace = torch.view_as_real(_expand(sens_maps, grad)) if ctx.needs_input_grad[0] else None
        grad_sens = _reduce(raw, sens_maps, grad, write_image=False)[1] if ctx.needs_input_grad[1] else None
        return grad_kspace, grad_sens

    @staticmethod
    def jvp(ctx, d_kspace: torch.Tensor | None, d_sens: torch.Tensor | None):
        """Forward mode: ``Σ conj(S) F⁻¹k`` is bilinear over the reals: ``R(dk, S) + R(k, dS)`` (torch path, as in
        :meth:`_SensExpand.jvp`)."""
        from reconkit.ops.coils import sens_reduce as torch_reduce

        kspace, sens_maps = ctx.saved_tensors
        batch, _, height, width, _ = kspace.shape
        tangent = torch.zeros((batch, 1, height, width, 2), dtype=kspace.dtype, device=kspace.device)
        if d_kspace is not None:
            tangent = tangent + torch_reduce(d_kspace, sens_maps, backend="torch")
        if d_sens is not None:
            tangent = tangent + torch_reduce(kspace, d_sens, backend="torch")
        return tangent, None


class _DataConsistency(torch.autograd.Function):
    @staticmethod
    def forward(kspace, ref_kspace, mask, weight):
        strides = _mask_strides(mask, kspace.shape)
        _, coils, height, width, _ = kspace.shape
        n = kspace.numel() // 2
        out = torch.empty_like(kspace)
        kernel_mask = _mask_for_kernel(mask)
        _dc_forward_kernel[(triton.cdiv(n, _BLOCK),)](
            kspace, ref_kspace, kernel_mask, weight, out, n, coils, height, width, *strides, BLOCK=_BLOCK
        )
        return out

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        kspace, ref_kspace, mask, weight = ctx.saved_tensors
        if torch.is_grad_enabled():
            from reconkit.ops.coils import data_consistency as torch_dc

            return _recorded_vjp(lambda k, k0, m, w: torch_dc(k, k0, m, w, backend="torch"),
                                 (kspace, ref_kspace, mask, weight), ctx.needs_input_grad, grad)
        need_k, need_k0, need_mask, need_weight = ctx.needs_input_grad
        grad = grad.contiguous()
        strides = _mask_strides(mask, kspace.shape)
        _, coils, height, width, _ = kspace.shape
        n = kspace.numel() // 2
        blocks = triton.cdiv(n, _BLOCK)
        grad_k = torch.empty_like(kspace) if need_k else None
        grad_k0 = torch.empty_like(kspace) if need_k0 else None
        partial = torch.empty(blocks, dtype=kspace.dtype, device=kspace.device) if need_weight else None
        _dc_backward_kernel[(blocks,)](
            grad, kspace, ref_kspace, _mask_for_kernel(mask), weight,
            grad if grad_k is None else grad_k, grad if grad_k0 is None else grad_k0,
            grad if partial is None else partial, n, coils, height, width, *strides,
            WRITE_K=need_k, WRITE_K0=need_k0, WRITE_WEIGHT=need_weight, BLOCK=_BLOCK,
        )
        grad_weight = partial.sum().reshape(weight.shape) if need_weight else None
        grad_mask = None
        if need_mask:  # a learnable mask is rare; plain torch ops are enough here
            grad_mask = (-weight * grad * (kspace - ref_kspace)).sum_to_size(mask.shape)
        return grad_k, grad_k0, grad_mask, grad_weight

    @staticmethod
    def jvp(ctx, d_kspace, d_ref, d_mask, d_weight):
        """Forward mode (plain torch ops): ``dk − η·m·(dk − dk₀) − (dη·m + η·dm)·(k − k₀)``."""
        kspace, ref_kspace, mask, weight = ctx.saved_tensors
        m = mask.to(kspace.dtype)
        eta = weight.reshape(())
        tangent = torch.zeros_like(kspace)
        if d_kspace is not None:
            tangent = tangent + d_kspace - eta * m * d_kspace
        if d_ref is not None:
            tangent = tangent + eta * m * d_ref
        if d_weight is not None:
            tangent = tangent - d_weight.reshape(()) * m * (kspace - ref_kspace)
        if d_mask is not None:
            tangent = tangent - eta * d_mask * (kspace - ref_kspace)
        return tangent


# ------------------------------------------------------------------------------------------ public functions


def _prepare(name_tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Check device and layout; broadcast a batch of 1 (as the torch path does); promote half precision to
    float32 and a float32 / float64 mix to float64 (torch's promotion); make contiguous."""
    tensors = list(name_tensors.values())
    for name, t in name_tensors.items():
        if t.ndim != 5 or t.shape[-1] != 2:
            raise ValueError(f"{name}: expected shape (B, C, H, W, 2); got {tuple(t.shape)}")
        if not (t.is_cuda or interpreted()):
            raise RuntimeError(
                f"{name}: the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1 set before Triton is "
                f"imported); got a tensor on {t.device}"
            )
        if t.numel() >= 2**31:  # the kernels index in int32: (plane offset + element) * 2 must not wrap
            raise ValueError(f"{name}: {t.numel()} values; the Triton kernels take fewer than 2**31 per tensor")
        if t.device != tensors[0].device:
            raise ValueError(f"{name} is on {t.device}, {next(iter(name_tensors))} on {tensors[0].device}")
    batches = {t.shape[0] for t in tensors} - {1}
    if len(batches) == 1:
        batch = batches.pop()
        tensors = [t.expand(batch, *t.shape[1:]) for t in tensors]
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    return [t.to(dtype).contiguous() for t in tensors]


def _check_spatial(first: str, a: torch.Tensor, second: str, b: torch.Tensor) -> None:
    if a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
        raise ValueError(f"{first} {tuple(a.shape)} and {second} {tuple(b.shape)} differ in batch or (H, W)")


def sens_expand(image: torch.Tensor, sens_maps: torch.Tensor) -> torch.Tensor:
    """``fft2c(image · S_c)``: image ``(B, 1, H, W, 2)``, sens_maps ``(B, C, H, W, 2)`` → k-space ``(B, C, H, W, 2)``."""
    image, sens_maps = _prepare({"image": image, "sens_maps": sens_maps})
    _check_spatial("image", image, "sens_maps", sens_maps)
    if image.shape[1] != 1:
        raise ValueError(f"image: expected one coil axis entry (B, 1, H, W, 2); got {tuple(image.shape)}")
    return _SensExpand.apply(image, sens_maps)


def sens_reduce(kspace: torch.Tensor, sens_maps: torch.Tensor) -> torch.Tensor:
    """``Σ_c conj(S_c) · ifft2c(k_c)``: kspace and sens_maps ``(B, C, H, W, 2)`` → image ``(B, 1, H, W, 2)``."""
    kspace, sens_maps = _prepare({"kspace": kspace, "sens_maps": sens_maps})
    if kspace.shape != sens_maps.shape:
        raise ValueError(f"kspace {tuple(kspace.shape)} and sens_maps {tuple(sens_maps.shape)} differ in shape")
    return _SensReduce.apply(kspace, sens_maps)[0]


def data_consistency(
    kspace: torch.Tensor, ref_kspace: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """``k − η · mask · (k − k₀)``: kspace, ref_kspace ``(B, C, H, W, 2)``; mask bool / float broadcasting as
    ``(B, 1, 1, W, 1)`` or ``(B, 1, H, W, 1)``; weight ``η`` a one-element tensor (learnable). Computed in
    float32 for half-precision k-space, returned in the inputs' dtype as the torch path does."""
    out_dtype = torch.promote_types(kspace.dtype, ref_kspace.dtype)
    kspace, ref_kspace = _prepare({"kspace": kspace, "ref_kspace": ref_kspace})
    if kspace.shape != ref_kspace.shape:
        raise ValueError(f"kspace {tuple(kspace.shape)} and ref_kspace {tuple(ref_kspace.shape)} differ in shape")
    target = tuple(kspace.shape[:-1]) + (1,)
    if mask.ndim > 5 or not all(m in (1, t) for m, t in zip(reversed(mask.shape), reversed(target))):
        raise ValueError(
            f"mask: expected a shape broadcasting as (B, C, H, W, 1) against kspace {tuple(kspace.shape)}, "
            f"e.g. (B, 1, 1, W, 1); got {tuple(mask.shape)}"
        )
    mask = mask.reshape((1,) * (5 - mask.ndim) + tuple(mask.shape))
    if weight.numel() != 1:
        raise ValueError(f"weight: expected one element (the DC weight η); got shape {tuple(weight.shape)}")
    weight = weight.to(device=kspace.device, dtype=kspace.dtype)
    mask = mask.to(kspace.device)
    if mask.dtype != torch.bool:
        mask = mask.to(kspace.dtype)
    out = _DataConsistency.apply(kspace, ref_kspace, mask, weight)
    return out.to(out_dtype) if out_dtype in (torch.float16, torch.bfloat16) else out
