"""Haar soft-thresholding (reconkit.ops.wavelet) and FISTA (reconkit.ops.fista)."""

from __future__ import annotations

import pytest
import torch

from reconkit.ops import fista, haar_soft_threshold, wavelet_shifts
from reconkit.ops.wavelet import _analysis, _synthesis


@pytest.mark.parametrize("size,shift", [((16, 8), (0, 0)), ((13, 10), (3, 7)), ((1, 5), (0, 2))])
def test_zero_threshold_is_the_identity_for_any_size_and_shift(size, shift):
    re, im = torch.randn(2, 1, *size), torch.randn(2, 1, *size)
    out_re, out_im = haar_soft_threshold(re, im, torch.zeros(2, 1, 1, 1), levels=3, shift=shift)
    torch.testing.assert_close(out_re, re, rtol=0, atol=1e-5)
    torch.testing.assert_close(out_im, im, rtol=0, atol=1e-5)


def test_haar_stays_float32_under_bf16_autocast():
    """Under autocast (bf16-mixed training with VarNet's final_dc_wavelet) the Haar MatMuls ran in bfloat16: the
    identity at τ = 0 came back bfloat16 with 3e-3 relative error."""
    re, im = torch.randn(2, 1, 32, 24), torch.randn(2, 1, 32, 24)
    threshold = torch.full((2, 1, 1, 1), 0.1)
    expected = haar_soft_threshold(re, im, threshold, levels=4, shift=(1, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = haar_soft_threshold(re, im, threshold, levels=4, shift=(1, 2))
    for part, reference in zip(out, expected):
        assert part.dtype == torch.float32
        torch.testing.assert_close(part, reference)


def test_one_haar_level_is_orthonormal():
    x = torch.randn(2, 3, 8, 6)
    coefficients = _analysis(x)
    assert coefficients.shape == (2, 3, 4, 3, 4)
    torch.testing.assert_close(coefficients.pow(2).sum(), x.pow(2).sum())
    torch.testing.assert_close(_synthesis(coefficients), x)
    # the approximation band is the 2 × 2 block sum / 2
    torch.testing.assert_close(coefficients[..., 0], x.reshape(2, 3, 4, 2, 3, 2).sum(dim=(3, 5)) / 2)


def test_it_is_the_proximal_step_of_the_l1_haar_norm():
    """For sizes divisible by 2**levels, no shift: the output minimises ½‖x − v‖² + τ Σ |detail coefficients|."""
    torch.manual_seed(0)
    v_re, v_im = torch.randn(1, 1, 16, 16), torch.randn(1, 1, 16, 16)
    tau = torch.full((1, 1, 1, 1), 0.4)

    def objective(re, im):
        _, details_re = _levels(re)
        _, details_im = _levels(im)
        l1 = sum(torch.sqrt(a**2 + b**2).sum() for a, b in zip(details_re, details_im))
        return 0.5 * ((re - v_re) ** 2 + (im - v_im) ** 2).sum() + 0.4 * l1

    def _levels(x):
        bands = []
        x = x.reshape(1, 1, 16, 16)
        for _ in range(2):
            coefficients = _analysis(x)
            x = coefficients[..., 0]
            bands.extend(coefficients[..., i] for i in (1, 2, 3))
        return x, bands

    best_re, best_im = haar_soft_threshold(v_re, v_im, tau, levels=2, shift=(0, 0))
    best = objective(best_re, best_im)
    assert best < objective(v_re, v_im) - 1
    for _ in range(20):
        d_re, d_im = 0.05 * torch.randn_like(v_re), 0.05 * torch.randn_like(v_im)
        assert objective(best_re + d_re, best_im + d_im) > best
    # a constant image has no detail coefficients: untouched by any threshold
    flat = torch.full((1, 1, 16, 16), 2.0)
    torch.testing.assert_close(haar_soft_threshold(flat, -flat, tau * 100, 2, (1, 2))[0], flat)


def test_fista_solves_a_weighted_lasso():
    """min ½⟨x, Dx⟩ − ⟨b, x⟩ + τ‖x‖₁ with diagonal D: x_i = soft(b_i, τ) / d_i."""
    torch.manual_seed(1)
    d = torch.rand(2, 50) + 0.5
    b = 2 * torch.randn(2, 50)
    tau = 0.7
    step = (1 / d.amax(dim=1)).view(2, 1)

    def prox(v, iteration):
        return torch.sign(v) * torch.relu(v.abs() - step * tau)

    x = fista(lambda x: d * x, b, torch.zeros_like(b), step, prox, max_iter=300)
    torch.testing.assert_close(x, torch.sign(b) * torch.relu(b.abs() - tau) / d, rtol=1e-4, atol=1e-4)


def test_shifts_cycle():
    assert wavelet_shifts(0) == wavelet_shifts(8) == (0, 0) and len({wavelet_shifts(i) for i in range(8)}) == 8
