"""MatMul FFT (reconkit.ops.dft_matmul): equal to fft2c / ifft2c and fastmri on many sizes, ONNX-exportable."""

from __future__ import annotations

import io
import math

import fastmri
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from reconkit.ops import (
    data_consistency,
    fft2c,
    fft_impl,
    fftc,
    ifft2c,
    ifftc,
    pair_factor,
    rss_complex,
    sens_expand,
    sens_reduce,
    zero_filled_rss_sampled_lines,
)
from reconkit.ops.dft_matmul import (
    STAGE_PASS_COST,
    axis_plan,
    centred_fft_matmul,
    centred_fft_matmul_planar,
    fft2_radices,
    radices,
    stacked_factors,
    stacked_fft_w,
    stacked_ifft_w,
    stacked_radices,
    to_stacked_kspace,
)

FASTMRI_SIZES = [(640, 368), (640, 372), (640, 320), (768, 396), (640, 272)]
OTHER_SIZES = [(32, 24), (30, 22), (96, 70), (7, 9), (45, 33), (1, 5), (13, 2), (4100, 6)]
ALLOWED_OPS = {"MatMul", "Reshape", "Transpose", "Mul", "Add", "Sub", "Constant", "Gather", "Split", "Slice",
               "Squeeze", "Unsqueeze", "Concat", "Shape", "Cast"}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


@pytest.mark.parametrize("height,width", FASTMRI_SIZES + OTHER_SIZES)
@pytest.mark.parametrize("inverse", [False, True])
def test_equals_fft2c(height: int, width: int, inverse: bool) -> None:
    batch = 1 if height * width > 50_000 else 2
    x = torch.randn(batch, height, width, 2, generator=torch.Generator().manual_seed(height * width))
    reference = ifft2c(x) if inverse else fft2c(x)
    result = centred_fft_matmul(x, inverse)
    assert result.shape == x.shape and result.dtype == torch.float32
    assert relative_error(result, reference) <= 1e-5
    assert float((result - reference).abs().max()) <= 1e-5 * float(reference.abs().max())


@pytest.mark.parametrize("height,width", [(640, 368), (30, 22), (45, 33)])
def test_planar_form_equals_fft2c(height: int, width: int) -> None:
    x = torch.randn(3, 1, height, width, 2, generator=torch.Generator().manual_seed(2))
    for inverse, reference in ((False, fft2c(x)), (True, ifft2c(x))):
        re, im = centred_fft_matmul_planar(x[..., 0], x[..., 1], inverse)
        assert re.shape == im.shape == x.shape[:-1]
        assert relative_error(torch.stack((re, im), dim=-1), reference) <= 1e-5
    with pytest.raises(ValueError, match="one shape"):
        centred_fft_matmul_planar(x[..., 0], x[:1, ..., 1], False)


@pytest.mark.parametrize("height,width", [(640, 368), (30, 22), (45, 33), (7, 1)])
@pytest.mark.parametrize("dims", [(-2,), (-1,)])
def test_single_axis_equals_fftc(height: int, width: int, dims: tuple[int, ...]) -> None:
    x = torch.randn(2, height, width, 2, generator=torch.Generator().manual_seed(5))
    for inverse, reference in ((False, fftc(x, dims)), (True, ifftc(x, dims))):
        assert relative_error(centred_fft_matmul(x, inverse, dims), reference) <= 1e-5
        re, im = centred_fft_matmul_planar(x[..., 0], x[..., 1], inverse, dims)
        assert relative_error(torch.stack((re, im), dim=-1), reference) <= 1e-5
    with pytest.raises(ValueError, match="dims"):
        centred_fft_matmul_planar(x[..., 0], x[..., 1], False, (0,))


@pytest.mark.parametrize("width", [368, 372, 320, 396, 272, 24, 37, 134, 2, 1, 8192])
def test_stacked_w_transform_equals_fftc(width: int) -> None:
    """The stacked W-major form (export cascades): fftc along W, output in the stated (k₁…k_{m-1}, part, k_m) order,
    and its inverse returns the input; one radix (37), two (134 = 67·2), three and more (fastMRI widths, 8192)."""
    factors = stacked_radices(width)
    outer, last = stacked_factors(width)
    assert math.prod(factors) == width and outer * last == width and last == factors[-1]
    rest = (1, 2, 3) if width > 1000 else (2, 3, 5)
    x = torch.randn(*rest, width, 2, generator=torch.Generator().manual_seed(width))
    stacked = torch.stack((x[..., 0], x[..., 1])).permute(0, 4, 1, 2, 3)  # (2, W, *rest)
    kspace = stacked_fft_w(stacked)
    assert kspace.shape == (outer, 2, last) + rest
    reference = fftc(x, (-1,))
    expected = to_stacked_kspace(torch.stack((reference[..., 0], reference[..., 1])))
    assert relative_error(kspace, expected) <= 1e-5
    # the layout: element (b, part, k_m), b = (k₁, …, k_{m-1}) with k₁ major, is frequency k = Σ k_s·f₁⋯f_{s-1}
    b, k_m = outer - 1 - outer // 3, last // 2
    digits = np.unravel_index(b, factors[:-1]) if len(factors) > 1 else ()
    k = sum(int(d) * math.prod(factors[:s]) for s, d in enumerate(digits)) + outer * k_m
    assert torch.allclose(kspace[b, 1, k_m], reference[..., k, 1], atol=1e-5)
    assert relative_error(stacked_ifft_w(kspace), stacked) <= 1e-5


def test_stacked_radices_trade_multiply_adds_for_passes() -> None:
    """Radices minimise Σ (f + STAGE_PASS_COST): small radices for smooth widths, a prime alone."""
    for width in range(2, 700):
        factors = stacked_radices(width)
        assert math.prod(factors) == width and list(factors) == sorted(factors, reverse=True)
        cost = sum(f + STAGE_PASS_COST for f in factors)
        for f in (d for d in range(2, width) if width % d == 0):  # one stage more or less never helps
            assert cost <= f + STAGE_PASS_COST + sum(g + STAGE_PASS_COST for g in stacked_radices(width // f)) + 1e-9
    assert stacked_radices(1031) == (1031,) and stacked_radices(368) == (23, 4, 4)
    with pytest.raises(ValueError, match="stacked layout"):
        stacked_ifft_w(torch.zeros(3, 2, 8, 1))
    with pytest.raises(ValueError, match="stacked layout"):
        stacked_ifft_w(torch.zeros(92, 3, 4, 1))
    with pytest.raises(ValueError, match="do not multiply"):
        stacked_fft_w(torch.zeros(2, 12, 1), (5, 2))


def test_stacked_transform_with_another_split() -> None:
    """``factors`` (the benchmark's alternative splits): the same transform, output in that split's digit order."""
    x = torch.randn(2, 48, 7, generator=torch.Generator().manual_seed(7))  # (part, W, rest)
    natural = fftc(x.permute(2, 1, 0), (-1,)).permute(2, 1, 0)  # (part, k, rest), k natural
    for factors in ((16, 3), (3, 16), (2, 2, 2, 2, 3), stacked_radices(48)):
        out = stacked_fft_w(x, factors)
        p = 48 // factors[-1]
        assert out.shape == (p, 2, factors[-1], 7)
        digits = np.indices(factors[:-1]).reshape(len(factors) - 1, -1)  # k₁ major
        k_before = sum(digits[t] * math.prod(factors[:t]) for t in range(len(factors) - 1))
        index = torch.as_tensor(k_before[:, None] + p * np.arange(factors[-1])[None, :])  # (P, f_m) → k
        assert relative_error(out, natural[:, index].permute(1, 0, 2, 3)) <= 1e-5


@pytest.mark.parametrize("height,width", [(64, 46), (45, 33)])
def test_export_path_hybrid_coil_ops_equal_the_eager_ones(height: int, width: int) -> None:
    g = torch.Generator().manual_seed(4)
    image, maps = torch.randn(2, 1, height, width, 2, generator=g), torch.randn(2, 3, height, width, 2, generator=g)
    hybrid = torch.randn(2, 3, height, width, 2, generator=g)
    eager = sens_expand(image, maps, hybrid=True), sens_reduce(hybrid, maps, hybrid=True)
    with fft_impl("matmul"):
        exported = sens_expand(image, maps, hybrid=True), sens_reduce(hybrid, maps, hybrid=True)
    for actual, expected in zip(exported, eager):
        assert actual.shape == expected.shape and relative_error(actual, expected) <= 1e-5


@pytest.mark.parametrize("height,width", [(64, 46), (45, 33)])
def test_export_path_coil_ops_equal_the_eager_ones(height: int, width: int) -> None:
    """sens_expand / sens_reduce / data_consistency under fft_impl("matmul") (planar FFT, expanded factors)."""
    g = torch.Generator().manual_seed(3)
    image, maps = torch.randn(2, 1, height, width, 2, generator=g), torch.randn(2, 4, height, width, 2, generator=g)
    kspace, ref = torch.randn(2, 4, height, width, 2, generator=g), torch.randn(2, 4, height, width, 2, generator=g)
    mask = (torch.rand(2, 1, 1, width, 1, generator=g) < 0.4).float()
    eager = sens_expand(image, maps), sens_reduce(kspace, maps), data_consistency(kspace, ref, mask, 0.7)
    assert pair_factor(mask).shape == mask.shape  # eager: unchanged
    with fft_impl("matmul"):
        exported = sens_expand(image, maps), sens_reduce(kspace, maps), data_consistency(kspace, ref, mask, 0.7)
        assert pair_factor(mask).shape == (2, 1, 1, width, 2) and pair_factor(kspace).shape == kspace.shape
    for actual, expected in zip(exported, eager):
        assert actual.shape == expected.shape and relative_error(actual, expected) <= 1e-5


@pytest.mark.parametrize("height,width", [(640, 368), (30, 22), (45, 33)])
def test_equals_fastmri(height: int, width: int) -> None:
    x = torch.randn(2, 1, height, width, 2, generator=torch.Generator().manual_seed(1))
    with fft_impl("matmul"):
        forward, inverse = fft2c(x), ifft2c(x)
    assert relative_error(forward, fastmri.fft2c(x)) <= 1e-5
    assert relative_error(inverse, fastmri.ifft2c(x)) <= 1e-5


def test_round_trip_and_leading_dims() -> None:
    x = torch.randn(2, 3, 1, 40, 28, 2)
    y = centred_fft_matmul(centred_fft_matmul(x, False), True)
    assert y.shape == x.shape
    assert relative_error(y, x) <= 1e-5


def test_radices_multiply_to_length() -> None:
    for length in list(range(1, 300)) + [320, 368, 372, 396, 640, 768, 4100, 8191]:
        factors = radices(length)
        assert int(np.prod(factors)) == length
        assert len(factors) == 1 or max(factors) <= 64 or length % max(factors) == 0


def test_plan_is_unitary() -> None:
    """Each stage matrix is unitary (the 1/sqrt(f) normalisation and the centring phases are folded in)."""
    plan = axis_plan(368, inverse=False)
    for pair in plan.matrices:
        matrix = torch.complex(pair[0].double(), pair[1].double())
        identity = matrix @ matrix.conj().T
        assert torch.allclose(identity, torch.eye(len(matrix), dtype=identity.dtype), atol=1e-6)


def test_rejects_bad_layout() -> None:
    with pytest.raises(ValueError, match=r"\(\.\.\., H, W, 2\)"):
        centred_fft_matmul(torch.randn(4, 6, 3), False)


class _FFT(torch.nn.Module):
    def __init__(self, inverse: bool):
        super().__init__()
        self.inverse = inverse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ifft2c(x) if self.inverse else fft2c(x)


@pytest.mark.parametrize("height,width,inverse", [(96, 70, False), (45, 33, True)])
def test_onnx_graph_has_only_matmul_ops_and_matches(height: int, width: int, inverse: bool) -> None:
    x = torch.randn(2, 3, height, width, 2)
    buffer = io.BytesIO()
    with fft_impl("matmul"):
        torch.onnx.export(_FFT(inverse), (x,), buffer, dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "batch", 1: "coils"}})
    model = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(model)
    ops = {node.op_type for node in model.graph.node}
    assert "MatMul" in ops and ops <= ALLOWED_OPS, ops - ALLOWED_OPS
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    other = torch.randn(1, 5, height, width, 2)  # batch and coil counts other than the traced ones
    for data in (x, other):
        (result,) = session.run(None, {"x": data.numpy()})
        expected = (ifft2c(data) if inverse else fft2c(data)).numpy()
        assert np.linalg.norm(result - expected) <= 1e-5 * np.linalg.norm(expected)


def _moves_one_axis(perm: list[int]) -> bool:
    """Whether a Transpose ``perm`` moves a single axis (the others keep their order): ONNX Runtime's fast path."""
    return any(sorted(perm[:i] + perm[i + 1 :]) == perm[:i] + perm[i + 1 :] for i in range(len(perm)))


@pytest.mark.parametrize("height,width", [(640, 368), (640, 320), (768, 396), (45, 33)])
def test_2d_graph_is_gemms_and_single_axis_transposes(height: int, width: int) -> None:
    """The 2D transform's speed in ONNX Runtime rests on its layout: no complex-combine Add / Sub, no Split /
    Concat of the (real, imag) axis, and Transposes that each move one axis (a multi-axis permutation is ~10×
    slower there): (real, imag) out of the innermost place, W in front of H, the last W stage's operand (fused into
    its MatMul) and one per radix beyond the first of each axis."""
    x = torch.randn(1, 2, height, width, 2)
    buffer = io.BytesIO()
    with fft_impl("matmul"):
        torch.onnx.export(_FFT(False), (x,), buffer, dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["y"])
    nodes = onnx.load_from_string(buffer.getvalue()).graph.node
    ops = [node.op_type for node in nodes]
    assert not {"Add", "Sub", "Mul", "Split", "Concat", "Gather"} & set(ops), ops
    perms = [list(next(a.ints for a in node.attribute if a.name == "perm")) for node in nodes
             if node.op_type == "Transpose"]
    assert all(_moves_one_axis(p) for p in perms), perms
    digits = len(fft2_radices(height)) + len(fft2_radices(width))
    last_stage = 1  # the last W stage's transposed operand (fused into the MatMul by ONNX Runtime)
    assert len(perms) == digits + last_stage, perms


def _line_mask(batch: int, width: int, probability: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mask = (torch.rand(batch, width, generator=generator) < probability).float()
    return mask.reshape(batch, 1, 1, width, 1)


class _ZeroFilledRss(torch.nn.Module):
    def forward(self, kspace: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return zero_filled_rss_sampled_lines(kspace, mask)


@pytest.mark.parametrize("height,width", [(640, 368), (32, 24), (45, 37), (7, 9), (13, 2)])
def test_sampled_lines_rss_equals_the_full_transform(height: int, width: int) -> None:
    kspace = torch.randn(2, 3, height, width, 2)
    for mask in (_line_mask(2, width, 0.3, seed=width), torch.ones(1, 1, 1, width, 1), torch.zeros(2, 1, 1, width, 1),
                 _line_mask(2, width, 0.5, seed=1) * torch.rand(2, 1, 1, width, 1)):  # weights, per-item masks
        expected = rss_complex(ifft2c(kspace * mask), dim=1)
        actual = zero_filled_rss_sampled_lines(kspace, mask)
        assert actual.shape == (2, height, width)
        assert (actual - expected).norm() <= 1e-6 * expected.norm() + 1e-12


def test_sampled_lines_graph_serves_any_mask_batch_and_coil_count() -> None:
    """One exported graph, masks with 1 … W lines (and none), batch items with different masks."""
    height, width = 40, 30
    buffer = io.BytesIO()
    example = (torch.randn(2, 3, height, width, 2), _line_mask(2, width, 0.3, seed=0))
    torch.onnx.export(_ZeroFilledRss(), example, buffer, dynamo=False, opset_version=17,
                      input_names=["kspace", "mask"], output_names=["image"],
                      dynamic_axes={"kspace": {0: "batch", 1: "coils"}, "mask": {0: "batch"}})
    onnx.checker.check_model(onnx.load_from_string(buffer.getvalue()))
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    one_line = torch.zeros(1, 1, 1, width, 1)
    one_line[..., 3, :] = 1
    for batch, coils, mask in ((1, 5, one_line), (3, 2, _line_mask(3, width, 0.2, seed=2)),
                               (1, 4, torch.ones(1, 1, 1, width, 1)), (2, 1, torch.zeros(2, 1, 1, width, 1))):
        kspace = torch.randn(batch, coils, height, width, 2)
        (image,) = session.run(None, {"kspace": kspace.numpy(), "mask": mask.numpy()})
        expected = rss_complex(ifft2c(kspace * mask), dim=1).numpy()
        assert image.shape == expected.shape
        assert np.linalg.norm(image - expected) <= 1e-5 * np.linalg.norm(expected) + 1e-12


def test_sampled_lines_rss_rejects_a_2d_mask() -> None:
    with pytest.raises(ValueError, match="line mask"):
        zero_filled_rss_sampled_lines(torch.zeros(1, 2, 8, 6, 2), torch.ones(1, 1, 8, 6, 1))


def test_stage_constants_first_built_in_inference_mode_still_support_autograd():
    """axis_plan's cached stage matrices, built first under inference_mode, were inference tensors (the device copy
    of the same device is the tensor itself): a later gradient through the planar transform raised."""
    from reconkit.ops.dft_matmul import _constants

    axis_plan.cache_clear()
    _constants.cache_clear()
    re, im = torch.randn(1, 2, 30, 34), torch.randn(1, 2, 30, 34)
    with torch.inference_mode():
        centred_fft_matmul_planar(re, im, True, (-2,))
    re.requires_grad_(True)
    out_re, out_im = centred_fft_matmul_planar(re, im, True, (-2,))
    (out_re.square().sum() + out_im.square().sum()).backward()
    torch.testing.assert_close(re.grad, 2 * re.detach(), rtol=1e-4, atol=1e-4)  # unitary along H, im independent
