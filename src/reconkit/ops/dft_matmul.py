"""Centred orthonormal 2D (i)FFT built only from MatMul / Reshape / Transpose / Mul / Add / Sub.

This is the FFT the ONNX exporter puts in the graph (``with reconkit.ops.fft_impl("matmul"):``): ONNX Runtime's
``DFT`` op is slow and inaccurate, while a factorised DFT made of small real matrix products runs on its tuned
GEMM kernels. No complex dtypes are used: real and imaginary parts travel as two float tensors.

**Algorithm (per spatial axis of length N).** N is split into radices ``N = f_1 · f_2 · … · f_m`` (each ≤ 64 when
N allows it; e.g. 640 = 16·40, 368 = 16·23, 372 = 12·31, 768 = 24·32). Writing the input index with ``f_1`` as
its most significant digit, ``n = (N/f_1)·n_1 + q`` and the output index ``k = k_1 + f_1·k'``, the DFT is the
Cooley–Tukey four-step recursion::

    X[k_1 + f_1 k'] = Σ_q W_{N/f_1}^{q k'} · W_N^{q k_1} · Σ_{n_1} W_{f_1}^{n_1 k_1} x[(N/f_1) n_1 + q]

i.e. a dense ``f_1 × f_1`` DFT along digit ``n_1`` (one batched MatMul, done in place on that tensor axis), a
twiddle product ``W_N^{q k_1}`` (Mul), and the same algorithm on the remaining ``N/f_1`` points. Every digit is
transformed in place, so the only data movement is one Transpose at the end that reverses the digit order (the
output index has its digits in the opposite order).

**Centring** (``fftshift ∘ FFT ∘ ifftshift``) costs nothing extra: with ``h = N // 2`` the centred transform is
``Y[k] = W^{h²}/√N · Σ_n x[n] · W^{-h n} · W^{-h k} · W^{n k}``, valid for odd N too. The input modulation
``W^{-h n}`` splits over the digits into a column scaling of the first stage's matrix and a factor of the first
twiddle; the output modulation ``W^{-h k}`` splits into a row scaling of each stage's matrix. The ``1/√f_i``
normalisation is folded into the stage matrices as well. For the inverse, ``W = exp(+2πi/N)``.

All matrices and twiddles are built once per (N, direction) in float64, stored as float32 constants (in an ONNX
graph they become initialisers).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

__all__ = ["centred_fft_matmul", "radices", "AxisPlan", "axis_plan"]

MAX_RADIX = 64


def radices(length: int, max_radix: int = MAX_RADIX) -> list[int]:
    """Split ``length`` into factors for the four-step recursion, most significant digit first.

    Two-factor splits are preferred, the smaller factor (≤ ``√length``, as large as the divisors allow) first:
    fewest multiply-adds per point (``Σ f_i``). Lengths above ``max_radix²`` recurse. A prime factor above
    ``max_radix`` becomes one dense stage (correct, just slower).

    >>> radices(640), radices(368), radices(372), radices(768), radices(24), radices(37)
    ([20, 32], [16, 23], [12, 31], [24, 32], [24], [37])
    """
    if length < 1:
        raise ValueError(f"FFT length must be positive; got {length}")
    if length <= max_radix:
        return [length]
    divisors = [d for d in range(2, max_radix + 1) if length % d == 0]
    if not divisors:
        return [length]
    if length <= max_radix * max_radix:
        fitting = [d for d in divisors if d * d <= length and length // d <= max_radix]
        if fitting:
            return [max(fitting), length // max(fitting)]
    first = max(divisors)
    return [first] + radices(length // first, max_radix)


@dataclass(frozen=True)
class AxisPlan:
    """Stage constants of a centred 1D DFT along one axis of length ``sum(factors)``-digit form.

    ``matrices[i]``: ``(2, f_i, f_i)`` float32 (real, imag) stage matrix applied as ``out = M @ in`` along digit i.
    ``twiddles[i]``: ``(2, f_i, N_i / f_i)`` float32 twiddle after stage i (``N_i`` = length still to transform),
    absent (one fewer than matrices) after the last stage.
    """

    length: int
    factors: tuple[int, ...]
    matrices: tuple[torch.Tensor, ...]
    twiddles: tuple[torch.Tensor, ...]


def _as_pair(z: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack((z.real, z.imag)).astype(np.float32))


@functools.lru_cache(maxsize=64)
def axis_plan(length: int, inverse: bool) -> AxisPlan:
    """Build (and cache) the stage matrices and twiddles of the centred orthonormal DFT of ``length`` points."""
    sign = 1.0 if inverse else -1.0
    h = length // 2
    factors = radices(length)
    matrices, twiddles = [], []
    remaining = length  # N_i: length of the sub-transform stage i starts
    in_slope = -h  # input modulation W_{N_i}^{in_slope · n}; only the first stage has one
    out_slope = -h  # output modulation W_{N_i}^{out_slope · k} of the sub-transform
    for i, f in enumerate(factors):
        rest = remaining // f
        n1 = np.arange(f)
        k1 = np.arange(f)
        # DFT_f with the digit-n_1 part of the input modulation (W_{N_i}^{u·rest·n_1} = W_f^{u·n_1}) and the
        # digit-k_1 part of the output modulation (W_{N_i}^{v·k_1}), orthonormal
        phase = (np.outer(k1, n1) + in_slope * n1[None, :]) / f + out_slope * k1[:, None] / remaining
        matrix = np.exp(sign * 2j * np.pi * phase) / np.sqrt(f)
        if i == 0:
            matrix = matrix * np.exp(sign * 2j * np.pi * (h * h % length) / length)
        matrices.append(_as_pair(matrix))
        if rest > 1:
            q = np.arange(rest)
            # twiddle W_{N_i}^{q·k_1} times the digit-q part of the input modulation W_{N_i}^{u·q}
            tw = np.exp(sign * 2j * np.pi * (np.outer(k1, q) + in_slope * q[None, :]) / remaining)
            twiddles.append(_as_pair(tw))
        # the sub-transform keeps the k' part of the output modulation: W_{N_i}^{v·f·k'} = W_{rest}^{v·k'}
        out_slope = out_slope % rest if rest > 1 else 0
        in_slope = 0
        remaining = rest
    return AxisPlan(length, tuple(factors), tuple(matrices), tuple(twiddles))


@functools.lru_cache(maxsize=128)
def _constants(length: int, inverse: bool, device: torch.device) -> tuple[tuple, tuple]:
    """Stage constants on ``device`` (cached; a tracer records them as graph constants)."""
    plan = axis_plan(length, inverse)
    return tuple(m.to(device) for m in plan.matrices), tuple(t.to(device) for t in plan.twiddles)


def _complex_stage(
    re: torch.Tensor, im: torch.Tensor, matrix: torch.Tensor, axis: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``M @ x`` along tensor axis ``axis`` for x = re + i·im, M = matrix[0] + i·matrix[1] of shape (f, f)."""
    shape = re.shape
    f = shape[axis]
    pre = -1
    post = math.prod(int(s) for s in shape[axis + 1 :])
    m_re, m_im = matrix[0], matrix[1]
    if post == 1:
        # contract the last axis: one large GEMM (rows, f) @ (f, f)ᵀ
        x_re, x_im = re.reshape(pre, f), im.reshape(pre, f)
        m_re, m_im = m_re.t(), m_im.t()
        y_re = x_re @ m_re - x_im @ m_im
        y_im = x_re @ m_im + x_im @ m_re
    else:
        # contract a middle axis: batched GEMM (f, f) @ (f, post) over everything in front
        x_re, x_im = re.reshape(pre, f, post), im.reshape(pre, f, post)
        y_re = m_re @ x_re - m_im @ x_im
        y_im = m_im @ x_re + m_re @ x_im
    return y_re.reshape(shape), y_im.reshape(shape)


def _twiddle(
    re: torch.Tensor, im: torch.Tensor, twiddle: torch.Tensor, axis: int, digits_after: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multiply by ``twiddle[k_i, q]`` where k_i is tensor axis ``axis`` and q the next ``digits_after`` axes."""
    f, rest = twiddle.shape[1], twiddle.shape[2]
    tail = re.ndim - (axis + 1 + digits_after)
    tw = twiddle.reshape((2, f) + tuple(re.shape[axis + 1 : axis + 1 + digits_after]) + (1,) * tail)
    t_re, t_im = tw[0], tw[1]
    return re * t_re - im * t_im, re * t_im + im * t_re


def centred_fft_matmul(data: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Centred orthonormal 2D FFT (``inverse=False``) or inverse FFT of a real-layout tensor, from MatMuls.

    Equal to :func:`reconkit.ops.fft2c` / :func:`reconkit.ops.ifft2c` (float32 round-off, ~1e-6 relative).

    Args:
        data: float tensor ``(..., H, W, 2)`` (last axis = real, imag); any H, W ≥ 1.
        inverse: compute the inverse transform.

    Returns:
        float32 tensor ``(..., H, W, 2)``.
    """
    if data.ndim < 3 or data.shape[-1] != 2:
        raise ValueError(f"centred_fft_matmul: expected a real tensor (..., H, W, 2); got shape {tuple(data.shape)}")
    if data.dtype != torch.float32:
        data = data.float()
    height, width = int(data.shape[-3]), int(data.shape[-2])
    lead = data.shape[:-3]
    h_mats, h_tws = _constants(height, inverse, data.device)
    w_mats, w_tws = _constants(width, inverse, data.device)
    h_digits, w_digits = len(h_mats), len(w_mats)
    h_factors = [int(m.shape[-1]) for m in h_mats]
    w_factors = [int(m.shape[-1]) for m in w_mats]

    # (B, 2, digits of H..., digits of W...) with the most significant digit of each axis first
    x = data.reshape(-1, height, width, 2).permute(0, 3, 1, 2).reshape([-1, 2] + h_factors + w_factors)
    re, im = x[:, 0], x[:, 1]

    for mats, tws, first_axis in ((h_mats, h_tws, 1), (w_mats, w_tws, 1 + h_digits)):
        for i, matrix in enumerate(mats):
            axis = first_axis + i
            re, im = _complex_stage(re, im, matrix, axis)
            if i < len(tws):
                re, im = _twiddle(re, im, tws[i], axis, len(mats) - i - 1)

    # output index k = k_1 + f_1·(k_2 + f_2·(…)): reverse the digit order of each axis, put (re, im) last
    out = torch.stack((re, im), dim=-1)
    h_axes = list(range(1, 1 + h_digits))[::-1]
    w_axes = list(range(1 + h_digits, 1 + h_digits + w_digits))[::-1]
    out = out.permute([0] + h_axes + w_axes + [out.ndim - 1])
    return out.reshape(tuple(lead) + (height, width, 2))
