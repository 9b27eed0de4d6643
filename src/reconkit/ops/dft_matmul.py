"""Centred orthonormal 2D (i)FFT built only from MatMul / Reshape / Transpose / Mul / Add / Sub.

This is the FFT the ONNX exporter puts in the graph (``with reconkit.ops.fft_impl("matmul"):``): ONNX Runtime's
``DFT`` op is slow and inaccurate, while a factorised DFT made of small real matrix products runs on its tuned
GEMM kernels. No complex dtypes are used: real and imaginary parts travel as two float tensors.

**Algorithm (per spatial axis of length N).** N is split into radices ``N = f_1 · f_2 · … · f_m`` (each ≤ 64 when
N allows it; e.g. 640 = 20·32, 368 = 16·23, 372 = 12·31, 768 = 24·32). Writing the input index with ``f_1`` as
its most significant digit, ``n = (N/f_1)·n_1 + q`` and the output index ``k = k_1 + f_1·k'``, the DFT is the
Cooley–Tukey four-step recursion::

    X[k_1 + f_1 k'] = Σ_q W_{N/f_1}^{q k'} · W_N^{q k_1} · Σ_{n_1} W_{f_1}^{n_1 k_1} x[(N/f_1) n_1 + q]

i.e. a dense ``f_1 × f_1`` DFT along digit ``n_1`` (one batched MatMul on that tensor axis), a twiddle product
``W_N^{q k_1}`` (Mul), and the same algorithm on the remaining ``N/f_1`` points. The output index has its digits
in the opposite order; see :func:`centred_fft_matmul` for how the stages are laid out so that this costs one
block Transpose at the end.

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

import numpy as np
import torch

from reconkit.ops.fft import check_fft_dims

__all__ = [
    "DIGIT_MOVE_COST", "STAGE_PASS_COST", "AxisPlan", "axis_plan", "centred_fft2_stacked", "centred_fft_matmul",
    "centred_fft_matmul_planar", "fft2_radices", "planar_matmul",
    "planar_mul", "radices", "stacked_factors", "stacked_fft_w", "stacked_frequencies", "stacked_ifft_w",
    "stacked_radices", "to_stacked_kspace",
]

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
    """Stage constants of the centred orthonormal 1D DFT of ``length = prod(factors)`` points.

    ``matrices[i]``: ``(2, f_i, f_i)`` float32 (real, imag) stage matrix applied as ``out = M @ in`` along digit i.
    ``twiddles[i]``: ``(2, f_i, N_i / f_i)`` float32 twiddle after stage i (``N_i`` = length still to transform),
    absent (one fewer than matrices) after the last stage.
    ``folded``: for two radices, ``(2, f_1, f_2, f_2)``: the second stage matrix with the twiddle folded into its
    columns, one matrix per first-stage output digit ``k_1`` (``M_2 · diag(twiddle[k_1, :])``); else ``None``.
    """

    length: int
    factors: tuple[int, ...]
    matrices: tuple[torch.Tensor, ...]
    twiddles: tuple[torch.Tensor, ...]
    folded: torch.Tensor | None


def _as_pair(z: np.ndarray) -> torch.Tensor:
    """Complex array → float32 tensor with a leading (real, imag) axis of size 2 (a normal tensor even under
    ``torch.inference_mode()``: :func:`axis_plan` caches it, and a later autograd call may save it for backward)."""
    with torch.inference_mode(False):
        return torch.from_numpy(np.stack((z.real, z.imag)).astype(np.float32))


@functools.lru_cache(maxsize=64)
def axis_plan(length: int, inverse: bool) -> AxisPlan:
    """Build (and cache) the stage matrices and twiddles of the centred orthonormal DFT of ``length`` points."""
    sign = 1.0 if inverse else -1.0
    h = length // 2
    factors = radices(length)
    matrices, twiddles, complex_stages = [], [], []
    remaining = length  # N_i: length of the sub-transform stage i starts
    in_slope = -h  # input modulation W_{N_i}^{in_slope · n}; only the first stage has one
    out_slope = -h  # output modulation W_{N_i}^{out_slope · k} of the sub-transform
    for i, f in enumerate(factors):
        rest = remaining // f
        n1 = k1 = np.arange(f)
        # DFT_f with the digit-n_1 part of the input modulation (W_{N_i}^{u·rest·n_1} = W_f^{u·n_1}) and the
        # digit-k_1 part of the output modulation (W_{N_i}^{v·k_1}), orthonormal
        phase = (np.outer(k1, n1) + in_slope * n1[None, :]) / f + out_slope * k1[:, None] / remaining
        matrix = np.exp(sign * 2j * np.pi * phase) / np.sqrt(f)
        if i == 0:
            matrix = matrix * np.exp(sign * 2j * np.pi * (h * h % length) / length)
        matrices.append(_as_pair(matrix))
        complex_stages.append(matrix)
        if rest > 1:
            q = np.arange(rest)
            # twiddle W_{N_i}^{q·k_1} times the digit-q part of the input modulation W_{N_i}^{u·q}
            tw = np.exp(sign * 2j * np.pi * (np.outer(k1, q) + in_slope * q[None, :]) / remaining)
            twiddles.append(_as_pair(tw))
            complex_stages.append(tw)
        # the sub-transform keeps the k' part of the output modulation: W_{N_i}^{v·f·k'} = W_{rest}^{v·k'}
        out_slope = out_slope % rest if rest > 1 else 0
        in_slope = 0
        remaining = rest
    folded = None
    if len(factors) == 2:
        _, first_twiddle, second = complex_stages
        folded = _as_pair(second[None, :, :] * first_twiddle[:, None, :])
    return AxisPlan(length, tuple(factors), tuple(matrices), tuple(twiddles), folded)


@functools.lru_cache(maxsize=128)
def _constants(length: int, inverse: bool, device: torch.device) -> tuple[tuple, tuple, torch.Tensor | None]:
    """Stage constants on ``device`` (cached; a tracer records them as graph constants). Built as normal tensors
    even under ``torch.inference_mode()``, so a later autograd call can save them for backward."""
    plan = axis_plan(length, inverse)
    with torch.inference_mode(False):
        folded = None if plan.folded is None else plan.folded.to(device)
        return tuple(m.to(device) for m in plan.matrices), tuple(t.to(device) for t in plan.twiddles), folded


def planar_matmul(
    re: torch.Tensor, im: torch.Tensor, m_re: torch.Tensor, m_im: torch.Tensor, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``M @ x`` (``left``) or ``x @ M`` for x = re + i·im and M = m_re + i·m_im: four real MatMuls."""
    if left:
        return m_re @ re - m_im @ im, m_im @ re + m_re @ im
    return re @ m_re - im @ m_im, re @ m_im + im @ m_re


def _stage(
    re: torch.Tensor, im: torch.Tensor, matrix: torch.Tensor, shape: list[int], axis: int, to_end: bool
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Apply a ``(2, f, f)`` stage matrix along axis ``axis`` of the ``(-1, *shape)`` tensor pair.

    In place (``to_end=False``): a batched MatMul ``M (f, f) @ x (rows, f, post)`` over the leading axes, or one
    large ``(rows, f) @ Mᵀ`` when ``axis`` is the last axis. ``to_end=True`` contracts ``xᵀ (rows, post, f) @ Mᵀ``
    so the transformed digit moves to the last axis (ONNX Runtime fuses the transpose into the MatMul).

    Returns the new pair and its shape (without the leading batch axis).
    """
    f = shape[axis - 1]
    post = math.prod(shape[axis:])
    if post == 1 or to_end:
        x_re, x_im = re.reshape(-1, f, post), im.reshape(-1, f, post)
        if post == 1:
            x_re, x_im = x_re.reshape(-1, f), im.reshape(-1, f)
        else:
            x_re, x_im = x_re.transpose(1, 2), x_im.transpose(1, 2)
        y_re, y_im = planar_matmul(x_re, x_im, matrix[0].t(), matrix[1].t(), left=False)
        shape = shape[: axis - 1] + shape[axis:] + [f]
    else:
        y_re, y_im = planar_matmul(re.reshape(-1, f, post), im.reshape(-1, f, post), matrix[0], matrix[1], True)
    return y_re.reshape([-1] + shape), y_im.reshape([-1] + shape), shape


def _twiddle(
    re: torch.Tensor, im: torch.Tensor, twiddle: torch.Tensor, shape: list[int], first: int, count: int, last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multiply by ``twiddle (2, f, q)`` where q spans the ``count`` digit axes starting at axis ``first``.

    The digit ``k`` (size f) sits just before them, or, with ``last=True``, on the last axis.
    """
    f = twiddle.shape[1]
    digits = shape[first - 1 : first - 1 + count]
    if last:
        tw = twiddle.reshape([2, f] + digits).permute([0] + list(range(2, 2 + count)) + [1])
        tw = tw.reshape([2] + [1] * (first - 1) + digits + [1] * (len(shape) - first - count) + [f])
    else:
        tw = twiddle.reshape([2] + [1] * (first - 2) + [f] + digits + [1] * (len(shape) - first + 1 - count))
    return planar_mul(re, im, tw[0], tw[1])


def planar_mul(
    a_re: torch.Tensor, a_im: torch.Tensor, b_re: torch.Tensor, b_im: torch.Tensor, conj_b: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise complex product ``a · b`` (``a · conj(b)`` with ``conj_b``) of planar (real, imag) pairs."""
    if conj_b:
        return a_re * b_re + a_im * b_im, a_im * b_re - a_re * b_im
    return a_re * b_re - a_im * b_im, a_re * b_im + a_im * b_re


def centred_fft_matmul(data: torch.Tensor, inverse: bool, dims: tuple[int, ...] = (-2, -1)) -> torch.Tensor:
    """Centred orthonormal 2D FFT (``inverse=False``) or inverse FFT of a real-layout tensor, from MatMuls.

    Equal to :func:`reconkit.ops.fft2c` / :func:`reconkit.ops.ifft2c` (float32 round-off, ~3e-7 relative), or to
    :func:`reconkit.ops.fftc` along ``dims``. Both axes: :func:`centred_fft2_stacked`; one axis: see
    :func:`centred_fft_matmul_planar` for the layout of the work.

    Args:
        data: float tensor ``(..., H, W, 2)`` (last axis = real, imag); any H, W ≥ 1.
        inverse: compute the inverse transform.
        dims: ``(-2, -1)`` (both axes), ``(-2,)`` (H only) or ``(-1,)`` (W only), as :func:`reconkit.ops.fftc`.

    Returns:
        float32 tensor ``(..., H, W, 2)``.
    """
    if data.ndim < 3 or data.shape[-1] != 2:
        raise ValueError(f"centred_fft_matmul: expected a real tensor (..., H, W, 2); got shape {tuple(data.shape)}")
    if check_fft_dims(dims) == (-2, -1):
        return centred_fft2_stacked(data, inverse)
    re, im = centred_fft_matmul_planar(data[..., 0], data[..., 1], inverse, dims)
    return torch.stack((re, im), dim=-1)


def centred_fft_matmul_planar(
    re: torch.Tensor, im: torch.Tensor, inverse: bool, dims: tuple[int, ...] = (-2, -1)
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`centred_fft_matmul` on planar data: real and imaginary parts as two ``(..., H, W)`` tensors.

    Operators that multiply by coil maps right before or after the transform (``sens_expand`` / ``sens_reduce``
    on the export path) use this form, so that the 2-float (real, imag) axis is never built and taken apart again
    around the FFT: in ONNX Runtime those Concat / Gather copies of C-coil tensors cost as much as a FFT stage.

    Layout of the work: ``(B, H, W)`` is viewed as ``(B, h_1, …, h_m, w_1, …, w_n)`` digit axes. H stages run in
    place (batched MatMuls whose rows are the whole W extent; with two H radices the twiddle is folded into the
    second stage's per-``k_1`` matrices); the first W stage moves its digit to the end and the next ones run in
    place, so for n ≤ 2 the W digits come out in order and the one final Transpose (per part) only swaps H digits
    (blocks of W contiguous floats). An axis left out of ``dims`` is one untouched digit axis of full length.

    Args:
        re, im: float tensors ``(..., H, W)`` of one shape; any H, W ≥ 1.
        inverse: compute the inverse transform.
        dims: the axes to transform: ``(-2, -1)``, ``(-2,)`` (H) or ``(-1,)`` (W).

    Returns:
        ``(re, im)``, float32 tensors ``(..., H, W)``.
    """
    if re.ndim < 2 or re.shape != im.shape:
        raise ValueError(
            f"centred_fft_matmul_planar: expected two (..., H, W) tensors of one shape; got {tuple(re.shape)} "
            f"and {tuple(im.shape)}"
        )
    if re.dtype != torch.float32 or im.dtype != torch.float32:
        re, im = re.float(), im.float()
    dims = check_fft_dims(dims)
    height, width = int(re.shape[-2]), int(re.shape[-1])
    lead = re.shape[:-2]
    # an axis that is not transformed stays one digit axis with no stages
    h_factors = axis_plan(height, inverse).factors if -2 in dims else (height,)
    w_factors = axis_plan(width, inverse).factors if -1 in dims else (width,)
    h_mats, h_tws, h_folded = _constants(height, inverse, re.device) if -2 in dims else ((), (), None)
    w_mats, w_tws, _ = _constants(width, inverse, re.device) if -1 in dims else ((), (), None)
    h_n, w_n = len(h_factors), len(w_factors)
    shape = list(h_factors + w_factors)  # digit axes, most significant first; axis i + 1 of the tensor

    re, im = re.reshape([-1] + shape), im.reshape([-1] + shape)
    if h_folded is not None:
        # two H radices: the twiddle rides in the second stage, one (f_2, f_2) matrix per k_1 (broadcast MatMul)
        re, im, shape = _stage(re, im, h_mats[0], shape, 1, to_end=False)
        grouped = [-1, shape[0], shape[1], math.prod(shape[2:])]
        re, im = planar_matmul(re.reshape(grouped), im.reshape(grouped), h_folded[0], h_folded[1], left=True)
        re, im = re.reshape([-1] + shape), im.reshape([-1] + shape)
    else:
        for i in range(len(h_mats)):
            re, im, shape = _stage(re, im, h_mats[i], shape, 1 + i, to_end=False)
            if i < len(h_tws):
                re, im = _twiddle(re, im, h_tws[i], shape, 2 + i, h_n - i - 1, last=False)
    for i in range(len(w_mats)):
        # the first W digit moves to the end; the later ones then sit at axis 1 + h_n onwards
        re, im, shape = _stage(re, im, w_mats[i], shape, 1 + h_n + (i > 0) * (i - 1), to_end=(i == 0))
        if i < len(w_tws):
            re, im = _twiddle(re, im, w_tws[i], shape, 1 + h_n + i, w_n - i - 1, last=(i == 0))

    # output index k = k_1 + f_1·(k_2 + …): H digits are stored (k_1, …, k_m) and W digits (k_2, …, k_n, k_1)
    h_axes = list(range(1, 1 + h_n))[::-1]
    w_axes = list(range(1 + h_n, h_n + w_n))[::-1] + [h_n + w_n]
    order = [0] + h_axes + w_axes
    if order != sorted(order):
        re, im = re.permute(order), im.permute(order)
    return re.reshape(tuple(lead) + (height, width)), im.reshape(tuple(lead) + (height, width))


# ---- stacked, W-major layout: the hybrid-space cascades of the exported VarNet --------------------------------------
#
# In hybrid space the cascades transform along W only. With W as the *leading* axis and the (real, imag) parts
# stacked next to the transformed digit, each stage of the W transform is one real MatMul of a (2f, 2f) matrix with a
# (2f, rows) operand: large GEMMs, no twiddle pass (each stage's matrices carry the twiddles of the digits before it)
# and no complex-combine Add / Sub. Between the stages the tensor is only reshaped (a view): the stages write their
# output digits where their input digits were. The k-space side therefore keeps the output digits in stage order
# (``k = k₁ + f₁·k₂ + f₁f₂·k₃ + …`` stored as ``(k₁, k₂, …, part, k_m)``, the first m − 1 digits flattened into one
# axis); elementwise work (mask, data consistency) does not care, as long as the mask and reference are in the same
# order (:func:`to_stacked_kspace`).

STAGE_PASS_COST = 3.5
"""What one more stage costs in ONNX Runtime, in units of one radix step of GEMM work (a stage of radix f costs
≈ ``f + STAGE_PASS_COST``): the memory pass over the data every stage makes. Estimated from timings of several
splits of the fastMRI widths (15 × 640 × W, 2-vCPU AVX2 VM, ORT 1.32; ``benchmarks/export.py --stacked-plans``
compares the chosen split with others). Many small radices save multiply-adds but each costs a pass; one large
radix the reverse."""


DIGIT_MOVE_COST = 7.0
"""What one more stage costs the 2D transform on interleaved data (:func:`centred_fft2_stacked`) on top of
:data:`STAGE_PASS_COST`, in the same units: its output digit needs one more Transpose to come out in natural order.
From ONNX Runtime profiles of splits of 640 and 368 (15 coils, 2-vCPU Intel Xeon VM, ORT 1.32): a Transpose pass
costs about what a GEMM stage of radix 7 costs."""


@functools.lru_cache(maxsize=256)
def stacked_radices(width: int, stage_cost: float = STAGE_PASS_COST) -> tuple[int, ...]:
    """The stacked W transform's radices, largest first: the split of ``width`` into factors ``f_1·…·f_m`` with the
    least ``Σ (f_i + stage_cost)`` (multiply-adds per point plus what each stage costs beyond them: by default one
    memory pass, :data:`STAGE_PASS_COST`). A prime becomes one dense stage.

    >>> stacked_radices(368), stacked_radices(372), stacked_radices(320), stacked_radices(396), stacked_radices(7)
    ((23, 4, 4), (31, 4, 3), (5, 4, 4, 4), (11, 6, 6), (7,))
    """
    if width < 1:
        raise ValueError(f"FFT length must be positive; got {width}")
    if width == 1:
        return (1,)

    @functools.cache
    def cheapest(n: int) -> tuple[float, tuple[int, ...]]:
        if n == 1:
            return 0.0, ()
        options = []
        for f in (d for d in range(2, n + 1) if n % d == 0):
            cost, rest = cheapest(n // f)
            options.append((cost + f + stage_cost, tuple(sorted((f,) + rest, reverse=True))))
        return min(options)

    return cheapest(width)[1]


def stacked_factors(width: int) -> tuple[int, int]:
    """``(P, f_m)`` of the stacked k layout ``(P, 2, f_m, …)`` of ``width``: the last radix and the product of the
    others (``P = 1``: one dense stage).

    >>> stacked_factors(368), stacked_factors(7), stacked_factors(134)
    ((92, 4), (1, 7), (67, 2))
    """
    factors = stacked_radices(width)
    return width // factors[-1], factors[-1]


def stacked_frequencies(factors: tuple[int, ...]) -> np.ndarray:
    """``(P, f_m)`` int array: the natural frequency ``k = k₁ + f₁·k₂ + … + P·k_m`` held at each ``(b, ·, k_m)``
    slot of the stacked k layout of the split ``factors`` (``b`` = the digits ``k₁ … k_{m-1}`` flattened, ``k₁``
    major: the natural index with its digits reversed).

    >>> stacked_frequencies((2, 3)).tolist()
    [[0, 2, 4], [1, 3, 5]]
    """
    return _digit_reversed(factors).reshape(-1, factors[-1])


def _digit_reversed(factors: tuple[int, ...]) -> np.ndarray:
    """``Σ k_s·f₁⋯f_{s-1}`` for every digit tuple ``(k₁, …, k_m)`` of ``factors``, ``k₁`` major (flat)."""
    return np.arange(math.prod(factors)).reshape(factors[::-1]).T.reshape(-1)


def _real_form(matrix: np.ndarray) -> np.ndarray:
    """Complex ``(..., a, b)`` → real ``(..., 2a, 2b)``: rows (part, a), columns (part, b); acts on stacked
    [re; im]."""
    top = np.concatenate((matrix.real, -matrix.imag), axis=-1)
    return np.concatenate((top, np.concatenate((matrix.imag, matrix.real), axis=-1)), axis=-2)


def _stage_matrices(factors: tuple[int, ...]) -> list[np.ndarray]:
    """Complex stage matrices of the centred orthonormal forward DFT of ``prod(factors)`` points split into
    ``factors``, stage s ``(P_s, f_s, f_s)`` (``P_s = f_1·…·f_{s-1}``, one matrix per value of the output digits
    before it, ``k_1`` major), entry ``[b, k_s, n_s]``.

    The input index has its digits most significant first, ``n = Σ n_s·R_s`` with ``R_s = N / (f_1·…·f_s)``, the
    output index least significant first, ``k = Σ k_s·P_s``. Stage s sums over ``n_s`` the terms of
    ``W^{n·k}`` that couple ``n_s`` with ``k_1 … k_s`` (the later digits give whole turns), so no twiddle is left
    between stages. The centring ``W^{h²} · W^{-h n} · W^{-h k}`` (``h = N // 2``) splits into a column factor
    ``W^{-h n_s R_s}`` and a row factor ``W^{-h k_s P_s}`` per stage, ``W^{h²}`` rides on stage 1, and each stage
    carries its ``1/√f_s``."""
    width = math.prod(factors)
    h, stages, done = width // 2, [], 1
    for s, f in enumerate(factors):
        stride = width // (done * f)  # R_s
        k_s, n_s = np.arange(f)[:, None], np.arange(f)[None, :]
        partial_k = _digit_reversed(factors[:s])[:, None, None] + done * k_s  # (P_s, f, 1): k₁ … k_s
        phase = n_s * stride * partial_k - h * n_s * stride - h * k_s * done + (h * h if s == 0 else 0)
        stages.append(np.exp(-2j * np.pi * (phase % width) / width) / np.sqrt(f))
        done *= f
    return stages


@functools.lru_cache(maxsize=64)
def _stacked_constants(
    factors: tuple[int, ...], inverse: bool, device: torch.device, conjugate: bool = False
) -> tuple[torch.Tensor, ...]:
    """Real stage matrices of the stacked centred FFT of ``prod(factors)`` points split into ``factors``, in the
    order the forward transform applies them, float32 on ``device`` (cached).

    Stage s is ``(P_s, 2f_s, 2f_s)`` (``(2f, 2f)`` when ``P_s = 1``, one plain GEMM), columns (part, n_s), rows
    (k_s, part) so that the next stage's operand ``(part, n_{s+1})`` is contiguous, rows (part, k_m) for the last.
    ``inverse``: their transposes (the real form of a unitary matrix is orthogonal), applied in reverse order, from
    the stacked order back to the natural one. ``conjugate``: the stages of the inverse transform in the forward
    direction (natural order in, stacked order out): the centred DFT's kernel ``W^{(n-h)(k-h)}`` conjugated.
    """
    stages = []
    for s, matrix in enumerate(_stage_matrices(factors)):
        real = _real_form(matrix.conj() if conjugate else matrix)  # (P, 2f, 2f), rows (part, k)
        batch, f = matrix.shape[0], matrix.shape[1]
        if s < len(factors) - 1:
            real = real.reshape(batch, 2, f, 2 * f).transpose(0, 2, 1, 3).reshape(batch, 2 * f, 2 * f)
        if inverse:
            real = real.transpose(0, 2, 1)
        stages.append(np.ascontiguousarray(real[0] if batch == 1 else real, dtype=np.float32))
    with torch.inference_mode(False):
        return tuple(torch.from_numpy(a).to(device) for a in stages)


def stacked_fft_w(x: torch.Tensor, factors: tuple[int, ...] | None = None) -> torch.Tensor:
    """Centred orthonormal FFT along W in the stacked layout: ``(2, W, *rest)`` (part, natural W) →
    ``(P, 2, f_m, *rest)`` (k₁…k_{m-1} flattened, ``k₁`` major; part; k_m), ``(P, f_m) = stacked_factors(W)``.
    Equal to :func:`reconkit.ops.fftc` along W up to float32 round-off and the stated order of the output index.

    ``factors``: another split of W than :func:`stacked_radices` (``benchmarks/export.py --stacked-plans`` times
    the alternatives; the output layout follows the split, so only this function's caller can read it)."""
    width, rest = int(x.shape[1]), tuple(x.shape[2:])
    factors = stacked_radices(width) if factors is None else tuple(factors)
    if math.prod(factors) != width:
        raise ValueError(f"stacked_fft_w: radices {factors} do not multiply to W = {width}")
    batch = 1
    for factor, matrix in zip(factors, _stacked_constants(factors, False, x.device)):
        x = _stacked_stage(matrix, x, batch, factor)
        batch *= factor
    return x.reshape((width // factors[-1], 2, factors[-1]) + rest)


def stacked_ifft_w(k: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`stacked_fft_w`: ``(P, 2, f_m, *rest)`` → ``(2, W, *rest)``."""
    outer, last, rest = int(k.shape[0]), int(k.shape[2]), tuple(k.shape[3:])
    width = outer * last
    expected = stacked_factors(width)
    if k.shape[1] != 2 or expected != (outer, last):
        raise ValueError(f"stacked_ifft_w: axes ({outer}, {k.shape[1]}, {last}) are not the stacked layout "
                         f"({expected[0]}, 2, {expected[1]}) of W = {width}")
    factors = stacked_radices(width)
    batch = width
    for factor, matrix in reversed(list(zip(factors, _stacked_constants(factors, True, k.device)))):
        batch //= factor
        k = _stacked_stage(matrix, k, batch, factor)
    return k.reshape((2, width) + rest)


def _stacked_stage(matrix: torch.Tensor, x: torch.Tensor, batch: int, factor: int) -> torch.Tensor:
    """One stage: ``matrix`` ``(batch, 2f, 2f)`` (or ``(2f, 2f)`` when ``batch`` is 1, a plain GEMM) times ``x``
    viewed as ``(batch, 2f, rest)``."""
    return matrix @ x.reshape(batch, 2 * factor, -1) if matrix.ndim == 3 else matrix @ x.reshape(2 * factor, -1)


def to_stacked_kspace(x: torch.Tensor) -> torch.Tensor:
    """``(P, *lead, W)`` with W in natural k order → the stacked k layout ``(P_W, P, f_m, *lead)``
    (:func:`stacked_fft_w`): P = 2 for data (real, imag), P = 1 for a real factor that broadcasts against it (a
    line mask)."""
    width = int(x.shape[-1])
    factors = stacked_radices(width)
    parts, lead, m = int(x.shape[0]), tuple(x.shape[1:-1]), len(factors)
    # two moves, both fast in ONNX Runtime (a permutation with small inner blocks is ~20× slower): W to the front,
    # then its digits (k_m, …, k_1, most significant first) to (k_1, …, k_{m-1}, part, k_m) in blocks of the lead
    x = x.permute([x.ndim - 1] + list(range(x.ndim - 1)))  # (W, P, *lead)
    x = x.reshape(factors[::-1] + (parts,) + lead)
    order = list(range(m - 1, 0, -1)) + [m, 0] + list(range(m + 1, m + 1 + len(lead)))
    return x.permute(order).reshape((width // factors[-1], parts, factors[-1]) + lead)


# ---- 2D transform of interleaved (..., H, W, 2) data ------------------------------------------------------------
#
# The same stacked real-form stages along both axes. ONNX Runtime moves one tensor axis (of any block size) in one
# fast pass, while a Transpose that permutes several axes at once takes a generic path ~10× slower, so the data are
# brought next to each axis's stages, and their output digits into natural order, by Transposes that each move one
# axis: (real, imag) out of the innermost place, one per extra H digit, W in front of H, and one per extra W digit
# (the last W stage writes its output transposed, so (real, imag) comes back innermost without a pass of its own).


def fft2_radices(length: int) -> tuple[int, ...]:
    """Radices of one axis of :func:`centred_fft2_stacked`: as :func:`stacked_radices`, each stage also paying
    :data:`DIGIT_MOVE_COST` for the Transpose that puts its output digit in natural order.

    >>> fft2_radices(640), fft2_radices(368), fft2_radices(372), fft2_radices(320), fft2_radices(396)
    ((10, 8, 8), (23, 16), (31, 12), (8, 8, 5), (11, 6, 6))
    """
    return stacked_radices(length, STAGE_PASS_COST + DIGIT_MOVE_COST)


def _axis_stages(x: torch.Tensor, factors: tuple[int, ...], inverse: bool, transpose_last: bool) -> torch.Tensor:
    """The stacked stages along axis 2 of ``x`` ``(B, 2, N, R)`` (part, natural N, rest), batched over B (left
    dynamic in a traced graph: every reshape keeps it as -1).

    Returns ``(B, P, 2, f_m, R)``, or with ``transpose_last`` ``(B, P, R, f_m, 2)``: the last stage computed as
    ``xᵀ · Mᵀ`` (ONNX Runtime fuses the transpose into the MatMul) with its rows in (k_m, part) order, so that the
    (real, imag) axis comes out innermost. N's output digits are in the stacked order (:func:`stacked_fft_w`).
    """
    n, r = int(x.shape[2]), int(x.shape[3])
    batch = 1
    for i, (f, matrix) in enumerate(zip(factors, _stacked_constants(factors, False, x.device, conjugate=inverse))):
        rest = n * r // (batch * f)  # the GEMM's columns: digits after this one, and R
        operand = x.reshape((-1, batch, 2 * f, rest) if matrix.ndim == 3 else (-1, 2 * f, rest))
        if transpose_last and i == len(factors) - 1:
            rows = matrix.reshape(matrix.shape[:-2] + (2, f, 2 * f)).transpose(-3, -2).reshape(matrix.shape)
            return (operand.transpose(-1, -2) @ rows.transpose(-1, -2)).reshape(-1, n // f, r, f, 2)
        x = matrix @ operand
        batch *= f
    return x.reshape(-1, n // factors[-1], 2, factors[-1], r)


def centred_fft2_stacked(data: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Centred orthonormal 2D FFT (or inverse) of interleaved ``(..., H, W, 2)`` data from stacked real-form stages.

    Equal to :func:`reconkit.ops.fft2c` / :func:`reconkit.ops.ifft2c` up to float32 round-off (~3e-7 relative at
    the fastMRI sizes, below 1e-6 with large dense stages); any H, W ≥ 1, though a large prime length is one dense
    stage of ``4N²`` constants (an ONNX file of ~270 MB at N = 4093). Layout of the work (B = the leading axes flattened): ``(B, 2, H, W)``; H stages
    (:func:`fft2_radices`, GEMMs batched over B) → ``(B, P_H, 2, f, W)``; one Transpose per extra H digit →
    ``(B, 2, H, W)`` in natural order; W in front of H → ``(B, 2, W, H)``; W stages, the last transposed →
    ``(B, P_W, H, f, 2)``; one Transpose per extra W digit → ``(B, H, W, 2)``. The inverse uses the conjugate
    stage matrices in the same order.

    Returns:
        float32 tensor ``(..., H, W, 2)``.
    """
    if data.ndim < 3 or data.shape[-1] != 2:
        raise ValueError(f"centred_fft2_stacked: expected a real tensor (..., H, W, 2); got {tuple(data.shape)}")
    lead, height, width = data.shape[:-3], int(data.shape[-3]), int(data.shape[-2])
    h_factors, w_factors = fft2_radices(height), fft2_radices(width)
    x = data.float().reshape(-1, height, width, 2).permute(0, 3, 1, 2)  # (B, 2, H, W)
    x = _axis_stages(x, h_factors, inverse, transpose_last=False)  # (B, P_H, 2, f, W)
    moved = 1  # H digits k_1, k_2, … each move behind the last one: (…, 2, k_m, …, k_2, k_1, W)
    for j, f in enumerate(h_factors[:-1]):
        x = x.reshape(-1, f, math.prod(h_factors[j + 1 : -1]), 2 * h_factors[-1], moved * width)
        x = x.permute(0, 2, 3, 1, 4)
        moved *= f
    x = x.reshape(-1, 2, height, width).transpose(2, 3)  # (B, 2, W, H)
    x = _axis_stages(x, w_factors, inverse, transpose_last=True)  # (B, P_W, H, f, 2)
    moved = 1
    for j, f in enumerate(w_factors[:-1]):
        x = x.reshape(-1, f, math.prod(w_factors[j + 1 : -1]) * height * w_factors[-1], moved * 2).permute(0, 2, 1, 3)
        moved *= f
    return x.reshape(tuple(lead) + (height, width, 2))
