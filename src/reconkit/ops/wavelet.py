"""Orthonormal 2D Haar wavelets and the complex soft-threshold (the proximal step of an L1-wavelet prior).

Reshapes, transposes, a 4 × 4 MatMul per level and arithmetic on planar (real, imag) pairs, so it traces to plain
ONNX ops and runs the same in eager PyTorch and in an exported graph.

For an orthonormal transform ``Ψ`` the proximal operator of ``τ‖Ψx‖₁`` (detail bands only) is ``Ψᴴ soft(Ψx, τ)``
with the complex soft-threshold ``soft(c, τ) = c · max(0, 1 − τ / |c|)``. Shifting the image cyclically before the
transform (a different shift per iteration, "cycle spinning", as BART's ``pics`` does with random shifts) avoids
the blocky artefacts of one fixed Haar grid.

>>> import torch
>>> re, im = torch.randn(2, 1, 12, 10), torch.randn(2, 1, 12, 10)
>>> out = haar_soft_threshold(re, im, torch.zeros(2, 1, 1, 1), levels=2, shift=(1, 3))
>>> bool(torch.allclose(out[0], re, atol=1e-6) and torch.allclose(out[1], im, atol=1e-6))  # τ = 0: identity
True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["haar_soft_threshold", "wavelet_shifts"]


# orthonormal 2 × 2 Haar: rows (approximation, horizontal, vertical, diagonal) over the pixels (a, b, c, d) of a
# block [[a, b], [c, d]]
_HAAR = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 1.0, -1.0], [1.0, 1.0, -1.0, -1.0], [1.0, -1.0, -1.0, 1.0]]) / 2


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in the inputs' dtype, also under ``torch.autocast`` (whose bfloat16 MatMuls gave 3e-3 relative
    error per Haar round trip, in every FISTA iteration of VarNet's ``final_dc_wavelet`` step)."""
    with torch.autocast(a.device.type, enabled=False):
        return a @ b


def _analysis(x: torch.Tensor) -> torch.Tensor:
    """One Haar level: ``(P, N, 2h, 2w)`` → ``(P, N, h, w, 4)`` coefficients (approximation first): one Reshape,
    one Transpose and one MatMul in a graph."""
    parts, rows, cols = int(x.shape[0]), int(x.shape[-2]) // 2, int(x.shape[-1]) // 2
    blocks = x.reshape(parts, -1, rows, 2, cols, 2).transpose(-3, -2)  # (P, N, h, w, 2, 2)
    return _matmul(blocks.reshape(parts, -1, rows, cols, 4), _HAAR.to(x).t())


def _synthesis(coefficients: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_analysis`: ``(P, N, h, w, 4)`` → ``(P, N, 2h, 2w)``."""
    parts, rows, cols = int(coefficients.shape[0]), int(coefficients.shape[-3]), int(coefficients.shape[-2])
    blocks = _matmul(coefficients, _HAAR.to(coefficients)).reshape(parts, -1, rows, cols, 2, 2).transpose(-3, -2)
    return blocks.reshape(parts, -1, 2 * rows, 2 * cols)


def haar_soft_threshold(
    re: torch.Tensor, im: torch.Tensor, threshold: torch.Tensor, levels: int, shift: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Ψᴴ soft(Ψ x, τ)``: the complex soft-threshold of the detail bands of an orthonormal ``levels``-level 2D
    Haar transform of ``x = re + i·im`` shifted cyclically by ``shift`` (rows, columns), shifted back.

    Args:
        re, im: ``(B, ..., H, W)`` float tensors (any H, W: zero-padded up to a multiple of ``2**levels``).
        threshold: ``τ`` broadcastable against ``re`` (e.g. ``(B, 1, 1, 1)``), ≥ 0.
        levels: decomposition levels (≥ 1).
        shift: cyclic shift applied before the transform.

    Returns:
        ``(re, im)`` of the input shape.
    """
    height, width = int(re.shape[-2]), int(re.shape[-1])
    block = 2**levels
    pad = (0, -width % block, 0, -height % block)
    shift = (shift[0] % height, shift[1] % width)
    lead = re.shape[:-2]
    # (2, N, H, W): both parts in one tensor, the leading axes in one (so every reshape has one dynamic size)
    x = torch.stack((re, im)).reshape(2, -1, height, width)
    threshold = torch.broadcast_to(threshold, lead + (1, 1)).reshape(-1, 1, 1)
    if any(shift):
        x = torch.roll(x, shift, dims=(-2, -1))
    if any(pad):
        x = F.pad(x, pad)
    details = []
    for _ in range(levels):
        coefficients = _analysis(x)
        x, detail = coefficients[..., 0], coefficients[..., 1:]
        details.append(detail)
    tiny = torch.finfo(re.dtype).tiny
    for detail in reversed(details):
        gain = torch.relu(1 - threshold.unsqueeze(-1) / torch.sqrt((detail * detail).sum(dim=0)).clamp_min(tiny))
        x = _synthesis(torch.cat((x[..., None], detail * gain), dim=-1))
    x = x[..., :height, :width]
    if any(shift):
        x = torch.roll(x, (-shift[0], -shift[1]), dims=(-2, -1))
    return x[0].reshape(lead + (height, width)), x[1].reshape(lead + (height, width))


def wavelet_shifts(iteration: int) -> tuple[int, int]:
    """The cyclic shift of iteration ``iteration`` (a fixed cycle of eight, so results are reproducible)."""
    cycle = ((0, 0), (1, 1), (0, 1), (1, 0), (2, 3), (3, 2), (1, 2), (2, 1))
    return cycle[iteration % len(cycle)]
