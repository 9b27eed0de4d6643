"""Linear MRI forward models as small, pure operator objects (in the style of deepinv's ``Physics``).

A forward call never changes stored state: an operator holds its mask and sensitivity maps and nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from reconkit.errors import check_number
from reconkit.ops.coils import sampling_mask, sens_expand, sens_reduce
from reconkit.ops.fft import check_tensors

__all__ = ["MultiCoilMRI", "accurate_sum", "conjugate_gradient", "fista", "real_inner"]


def accurate_sum(x: torch.Tensor, dim: int | tuple[int, ...]) -> torch.Tensor:
    """``x.sum(dim)``, accumulated in float64 while exporting to ONNX.

    PyTorch sums float32 pairwise; ONNX Runtime's float32 ``ReduceSum`` is less accurate on long reductions: over
    the ~10⁷ k-space values of a 24-coil 638 × 366 slice its round-off moved the SENSE step's noise-adaptive
    weight enough for 2.6e-4 relative error in the exported image (4e-6 with this). Eager PyTorch is unchanged.
    """
    if torch.onnx.is_in_onnx_export():
        return x.double().sum(dim=dim).to(x.dtype)
    return x.sum(dim=dim)


def real_inner(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Real part of the complex inner product ``<x, y>`` per batch item, for ``(B, ..., 2)`` tensors → ``(B,)``."""
    return (x * y).flatten(1).sum(dim=1)


def conjugate_gradient(
    normal_op, rhs: torch.Tensor, x0: torch.Tensor | None = None, max_iter: int = 10, tol: float = 1e-6
) -> torch.Tensor:
    """Solve ``normal_op(x) = rhs`` for a Hermitian positive (semi-)definite operator, batched over axis 0.

    Args:
        normal_op: callable mapping ``(B, ...)`` to ``(B, ...)``.
        rhs: right-hand side ``(B, ..., 2)``.
        x0: initial guess (zeros if None).
        max_iter: iteration count, an integer >= 0 (fixed; no data-dependent early exit, so the loop is traceable).
        tol: relative residual ``‖rhs − normal_op(x)‖ / ‖rhs‖`` below which a batch item stops moving.

    Returns:
        ``x`` of ``rhs``'s shape.

    Raises:
        ConfigError: ``max_iter`` not an integer >= 0 (a negative one returned the start point without a word).
    """
    check_number("conjugate_gradient: max_iter", max_iter, 0, integer=True)
    x = torch.zeros_like(rhs) if x0 is None else x0.clone()
    r = rhs - normal_op(x)
    p = r.clone()
    rs_old = real_inner(r, r)
    rhs_norm = real_inner(rhs, rhs).clamp_min(torch.finfo(rhs.dtype).tiny)
    shape = (-1,) + (1,) * (rhs.ndim - 1)
    for _ in range(max_iter):
        ap = normal_op(p)
        active = (rs_old / rhs_norm) > tol**2
        alpha = torch.where(active, rs_old / real_inner(p, ap).clamp_min(torch.finfo(rhs.dtype).tiny), 0.0)
        x = x + alpha.view(shape) * p
        r = r - alpha.view(shape) * ap
        rs_new = real_inner(r, r)
        beta = torch.where(active, rs_new / rs_old.clamp_min(torch.finfo(rhs.dtype).tiny), 0.0)
        p = r + beta.view(shape) * p
        rs_old = rs_new
    return x


def fista(
    normal_op: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    x0: torch.Tensor,
    step: torch.Tensor,
    prox: Callable[[torch.Tensor, int], torch.Tensor],
    max_iter: int = 30,
) -> torch.Tensor:
    """FISTA (Beck & Teboulle 2009) for ``min ½⟨x, N x⟩ − ⟨rhs, x⟩ + g(x)``: the quadratic of
    :func:`conjugate_gradient` (gradient ``N x − rhs``) plus a term ``g`` given by its proximal step.

    Args:
        normal_op: ``N``, Hermitian positive semi-definite, ``(B, ...)`` → ``(B, ...)``.
        rhs: ``(B, ...)``.
        x0: starting point ``(B, ...)``.
        step: gradient step per batch item, broadcastable (e.g. ``(B, 1, ...)``); at most ``1 / ‖N‖``.
        prox: ``prox(v, iteration)``, the proximal step of ``step · g`` at ``v`` (it may vary with the iteration,
            e.g. a cyclic shift of a wavelet).
        max_iter: iteration count, an integer >= 0 (fixed, so the loop is traceable).

    Raises:
        ConfigError: ``max_iter`` not an integer >= 0 (a negative one returned ``x0`` without a word).
    """
    check_number("fista: max_iter", max_iter, 0, integer=True)
    x = z = x0
    momentum = 1.0
    for iteration in range(max_iter):
        x_next = prox(z - step * (normal_op(z) - rhs), iteration)
        momentum_next = (1 + math.sqrt(1 + 4 * momentum * momentum)) / 2
        z = x_next + ((momentum - 1) / momentum_next) * (x_next - x)
        x, momentum = x_next, momentum_next
    return x


@dataclass(frozen=True)
class MultiCoilMRI:
    r"""Cartesian multi-coil MRI: :math:`A x = M \, F \, S x`.

    ``F`` is the centred orthonormal 2D FFT, ``S`` multiplies by each coil's sensitivity map and ``M`` keeps the
    sampled k-space locations. The adjoint is :math:`A^H y = \sum_c \overline{S_c} F^{-1} (M y)_c`.

    Args:
        mask: sampling mask broadcasting against k-space ``(B, C, H, W, 2)``, e.g. ``(B, 1, 1, W, 1)``; an integer
            mask's nonzero values are sampled (:func:`reconkit.ops.coils.sampling_mask`).
        sens_maps: ``(B, C, H, W, 2)`` coil sensitivities.

    Raises:
        ValueError: ``sens_maps`` not ``(B, C, H, W, 2)``, a mask that does not broadcast against that k-space axis
            by axis, or (in the methods) an image or k-space of another shape.

    Example:
        >>> import torch
        >>> sens = torch.randn(1, 4, 8, 8, 2)
        >>> mask = (torch.rand(1, 1, 1, 8, 1) > 0.5).float()
        >>> op = MultiCoilMRI(mask, sens)
        >>> x, y = torch.randn(1, 1, 8, 8, 2), torch.randn(1, 4, 8, 8, 2)
        >>> lhs, rhs = real_inner(op.A(x), y), real_inner(x, op.A_adjoint(y))  # ⟨Ax, y⟩ = ⟨x, Aᴴy⟩
        >>> bool((lhs - rhs).abs() <= 1e-5 * op.A(x).norm() * y.norm())  # float32 error scales with the norms
        True
    """

    mask: torch.Tensor
    sens_maps: torch.Tensor

    def __post_init__(self) -> None:
        check_tensors("MultiCoilMRI", self.mask, self.sens_maps)
        if self.sens_maps.ndim != 5 or self.sens_maps.shape[-1] != 2:
            raise ValueError(f"MultiCoilMRI: sens_maps must be (B, C, H, W, 2); got {tuple(self.sens_maps.shape)}")
        _, coils, height, width, _ = self.sens_maps.shape
        # a mask without the coil or readout axis, e.g. (B, 1, W, 1), would broadcast its batch onto the coils
        if self.mask.ndim != 5 or any(m not in (1, n) for m, n in zip(self.mask.shape[1:], (coils, height, width, 2))):
            raise ValueError(f"MultiCoilMRI: mask must broadcast against k-space (B, {coils}, {height}, {width}, 2) "
                             f"axis by axis, e.g. (B, 1, 1, {width}, 1); got {tuple(self.mask.shape)}")

    def _check(self, tensor: torch.Tensor, coils: int, what: str) -> None:
        """ValueError naming the expected shape, for a layout that would otherwise broadcast into a wrong answer."""
        check_tensors(f"MultiCoilMRI: {what}", tensor)
        batch, _, height, width, _ = self.sens_maps.shape
        ok = (tensor.ndim == 5 and tensor.shape[1] == coils and tuple(tensor.shape[2:]) == (height, width, 2)
              and (tensor.shape[0] == batch or 1 in (batch, tensor.shape[0])))  # batch may broadcast
        if not ok:
            raise ValueError(f"MultiCoilMRI: {what} must be ({batch}, {coils}, {height}, {width}, 2) (B, "
                             f"{'1' if coils == 1 else 'C'}, H, W, 2 of the sensitivity maps); got {tuple(tensor.shape)}")

    def A(self, image: torch.Tensor) -> torch.Tensor:
        """Forward: ``(B, 1, H, W, 2)`` image → ``(B, C, H, W, 2)`` masked coil k-space."""
        self._check(image, 1, "image")
        return sens_expand(image, self.sens_maps) * sampling_mask(self.mask).to(image.dtype)

    def A_adjoint(self, kspace: torch.Tensor) -> torch.Tensor:
        """Adjoint: ``(B, C, H, W, 2)`` k-space → ``(B, 1, H, W, 2)`` coil-combined image."""
        self._check(kspace, self.sens_maps.shape[1], "kspace")
        return sens_reduce(kspace * sampling_mask(self.mask).to(kspace.dtype), self.sens_maps)

    def normal(self, image: torch.Tensor) -> torch.Tensor:
        """Normal operator ``AᴴA`` on ``(B, 1, H, W, 2)`` images."""
        return self.A_adjoint(self.A(image))

    def A_dagger(
        self, kspace: torch.Tensor, max_iter: int = 10, tol: float = 1e-6, l2_reg: float = 0.0
    ) -> torch.Tensor:
        """Regularised least squares ``argmin ||Ax − y||² + λ||x||²`` by conjugate gradient (CG-SENSE).

        Solves ``(AᴴA + λI) x = Aᴴ y`` for ``(B, C, H, W, 2)`` k-space ``y`` from ``x = 0`` (see
        :func:`conjugate_gradient` for ``max_iter`` and ``tol``) and returns the ``(B, 1, H, W, 2)`` image;
        ``l2_reg`` is λ.
        """

        def normal_op(x: torch.Tensor) -> torch.Tensor:
            return self.normal(x) + l2_reg * x

        return conjugate_gradient(normal_op, self.A_adjoint(kspace), max_iter=max_iter, tol=tol)
