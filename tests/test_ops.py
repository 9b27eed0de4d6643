"""reconkit.ops against the oracle (fastmri's fftc, math, coil_combine and VarNet formulas) and operator identities."""

from __future__ import annotations

import fastmri
import pytest
import torch
from fastmri.models.varnet import VarNetBlock

from reconkit.ops import (
    MultiCoilMRI,
    as_complex,
    centering_modulation,
    centering_signs,
    complex_abs,
    complex_abs_sq,
    complex_conj,
    complex_mul,
    current_fft_impl,
    data_consistency,
    fft2c,
    fft_impl,
    fftc,
    ifft2c,
    ifftc,
    real_inner,
    resolve_backend,
    rss,
    rss_complex,
    sens_expand,
    sens_reduce,
)

# (H, W): both divisible by 4, both ≡ 2 mod 4, mixed, odd, odd × even, fastMRI-like
SIZES = [(8, 12), (6, 10), (6, 12), (7, 5), (9, 8), (40, 30)]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


class ZeroModel(torch.nn.Module):
    """Regulariser that returns zeros, so a fastmri VarNetBlock reduces to its soft data-consistency term."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def fastmri_block(dc_weight: float = 1.0) -> VarNetBlock:
    block = VarNetBlock(ZeroModel())
    with torch.no_grad():
        block.dc_weight.fill_(dc_weight)
    return block


# ---------------------------------------------------------------------------------------------------- centred FFTs


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("batch", [(), (3,), (2, 4)])
def test_fft2c_ifft2c_equal_fastmri_real_layout(size, batch):
    x = torch.randn(*batch, *size, 2, generator=gen())
    assert rel_err(fft2c(x), fastmri.fft2c(x)) <= 1e-5
    assert rel_err(ifft2c(x), fastmri.ifft2c(x)) <= 1e-5
    assert fft2c(x).shape == x.shape and fft2c(x).dtype == torch.float32


@pytest.mark.parametrize("size", SIZES)
def test_fft2c_complex_tensors_match_real_layout(size):
    x = torch.randn(2, 3, *size, 2, generator=gen(1))
    z = torch.view_as_complex(x)
    out = fft2c(z)
    assert out.is_complex() and out.shape == z.shape
    assert rel_err(torch.view_as_real(out), fastmri.fft2c(x)) <= 1e-5
    assert rel_err(torch.view_as_real(ifft2c(z)), fastmri.ifft2c(x)) <= 1e-5


@pytest.mark.parametrize("size", SIZES)
def test_fft2c_roundtrip_and_parseval(size):
    x = torch.randn(2, *size, 2, generator=gen(2), dtype=torch.float64)
    k = fft2c(x)
    assert k.dtype == torch.float64
    torch.testing.assert_close(ifft2c(k), x)
    torch.testing.assert_close((k**2).sum(), (x**2).sum())  # orthonormal


def test_fft2c_non_contiguous_and_half_inputs():
    x = torch.randn(4, 10, 12, 2, generator=gen(3))
    strided = x[::2]  # non-contiguous batch slice
    torch.testing.assert_close(fft2c(strided), fastmri.fft2c(strided.contiguous()))
    transposed = x.transpose(1, 2)  # spatial axes swapped: a non-contiguous (…, W, H, 2) input
    torch.testing.assert_close(fft2c(transposed), fastmri.fft2c(transposed.contiguous()))
    half = fft2c(x.half())
    assert half.dtype == torch.float32  # promoted: FFTs stay in full precision
    torch.testing.assert_close(half, fastmri.fft2c(x.half().float()))


def test_fft2c_rejects_bad_layout():
    with pytest.raises(ValueError, match="shape"):
        fft2c(torch.randn(4, 6, 3))
    with pytest.raises(ValueError, match="shape"):
        ifft2c(torch.randn(6, 2))


@pytest.mark.parametrize("impl", ["torch", "matmul"])
def test_fft_of_empty_batch_is_empty_and_empty_axis_is_an_error(impl):
    with fft_impl(impl):
        for shape in [(0, 8, 6, 2), (3, 0, 8, 6, 2)]:
            x = torch.zeros(shape, requires_grad=True)
            for out in (fft2c(x), ifft2c(x), fftc(x, (-1,))):
                assert out.shape == shape
            fft2c(x).sum().backward()
            assert x.grad.shape == shape
        assert ifft2c(torch.zeros(0, 8, 6, dtype=torch.complex64)).shape == (0, 8, 6)
        assert fftc(torch.zeros(2, 0, 6, 2), (-1,)).shape == (2, 0, 6, 2)  # H is empty but not transformed
        for shape in [(2, 0, 6, 2), (2, 8, 0, 2)]:
            with pytest.raises(ValueError, match="length 0"):
                fft2c(torch.zeros(shape))


@pytest.mark.parametrize("size", [(6, 8), (5, 7)])
def test_fft_gradcheck(size):
    x = torch.randn(2, *size, 2, dtype=torch.float64, generator=gen(4), requires_grad=True)
    assert torch.autograd.gradcheck(fft2c, (x,))
    assert torch.autograd.gradcheck(ifft2c, (x,))


def test_fft_impl_context_and_unknown_name():
    assert current_fft_impl() == "torch"
    with pytest.raises(ValueError, match="unknown FFT implementation 'cufft'"), fft_impl("cufft"):
        pass
    with fft_impl("torch"):
        assert current_fft_impl() == "torch"
    assert current_fft_impl() == "torch"


# ------------------------------------------------------------------------------------------------- complex helpers


def test_complex_helpers_equal_fastmri():
    x = torch.randn(2, 3, 5, 7, 2, generator=gen(5))
    y = torch.randn(2, 1, 5, 7, 2, generator=gen(6))  # broadcast over coils
    torch.testing.assert_close(complex_mul(x, y), fastmri.complex_mul(x, y))
    torch.testing.assert_close(complex_conj(x), fastmri.complex_conj(x))
    torch.testing.assert_close(complex_abs(x), fastmri.complex_abs(x))
    torch.testing.assert_close(complex_abs_sq(x), fastmri.complex_abs_sq(x))
    torch.testing.assert_close(rss(x[..., 0], dim=1), fastmri.rss(x[..., 0], dim=1))
    torch.testing.assert_close(rss_complex(x, dim=1), fastmri.rss_complex(x, dim=1))


def test_complex_mul_strided_half_and_real_arithmetic_paths():
    x = torch.randn(3, 6, 4, generator=gen(7))
    pairs = x[..., :2], x[..., 2:]  # odd storage offset / stride-4 rows: no complex view possible without a copy
    torch.testing.assert_close(complex_mul(*pairs), fastmri.complex_mul(pairs[0].contiguous(), pairs[1].contiguous()))
    torch.testing.assert_close(torch.view_as_real(as_complex(pairs[1])), pairs[1])
    a, b = torch.randn(4, 5, 2, generator=gen(8)), torch.randn(4, 5, 2, generator=gen(9))
    torch.testing.assert_close(complex_mul(a.half(), b.half()).float(), fastmri.complex_mul(a, b), atol=2e-2, rtol=1e-2)
    with fft_impl("matmul"):  # the ONNX export path: real arithmetic only (no complex view)
        torch.testing.assert_close(complex_mul(a, b), fastmri.complex_mul(a, b))


def test_complex_layout_errors_name_the_op():
    with pytest.raises(ValueError, match="complex_mul: last axis must have size 2"):
        complex_mul(torch.randn(3, 3), torch.randn(3, 2))
    with pytest.raises(ValueError, match="complex_abs: last axis"):
        complex_abs(torch.randn(4, 3))
    with pytest.raises(ValueError, match="complex_abs_sq: last axis"):
        complex_abs_sq(torch.randn(4, 3))
    with pytest.raises(ValueError, match="rss_complex: last axis"):
        rss_complex(torch.randn(4, 3))


def test_complex_mul_gradcheck():
    a = torch.randn(3, 4, 2, dtype=torch.float64, generator=gen(10), requires_grad=True)
    b = torch.randn(1, 4, 2, dtype=torch.float64, generator=gen(11), requires_grad=True)
    assert torch.autograd.gradcheck(complex_mul, (a, b))


# ------------------------------------------------------------------------------------------------------ coil ops


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dims", [(-2,), (-1,), (-2, -1)])
def test_fftc_along_chosen_axes_equals_numpy(size, dims):
    import numpy as np

    x = torch.randn(2, *size, 2, dtype=torch.float64, generator=gen(30))
    z = x[..., 0].numpy() + 1j * x[..., 1].numpy()
    for ours, transform in ((fftc, np.fft.fftn), (ifftc, np.fft.ifftn)):
        expected = np.fft.fftshift(transform(np.fft.ifftshift(z, axes=dims), axes=dims, norm="ortho"), axes=dims)
        result = ours(x, dims)
        assert result.shape == x.shape
        assert np.abs(result[..., 0].numpy() + 1j * result[..., 1].numpy() - expected).max() <= 1e-12
        assert torch.allclose(ours(torch.view_as_complex(x.contiguous()), dims), torch.view_as_complex(result))
    torch.testing.assert_close(fftc(fftc(x, (-1,)), (-2,)), fft2c(x))
    with pytest.raises(ValueError, match="dims"):
        fftc(x, (-3,))


@pytest.mark.parametrize("size", SIZES)
def test_hybrid_space_coil_ops_equal_the_kspace_ones(size):
    """Hybrid space = k-space after ifftc along H: sens_expand / sens_reduce there use 1D FFTs along W only."""
    image = torch.randn(2, 1, *size, 2, generator=gen(31))
    sens_maps = torch.randn(2, 3, *size, 2, generator=gen(32))
    kspace = torch.randn(2, 3, *size, 2, generator=gen(33))
    expanded = sens_expand(image, sens_maps, hybrid=True)
    assert rel_err(expanded, ifftc(sens_expand(image, sens_maps), (-2,))) <= 1e-5
    reduced = sens_reduce(ifftc(kspace, (-2,)), sens_maps, hybrid=True)
    assert rel_err(reduced, sens_reduce(kspace, sens_maps)) <= 1e-5
    # mismatched dtypes take the unfused path (complex_mul, then the FFT); it agrees too
    half = sens_reduce(ifftc(kspace, (-2,)).double(), sens_maps, hybrid=True)
    assert rel_err(half.float(), sens_reduce(kspace, sens_maps)) <= 1e-5


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("coils", [1, 3])
def test_sens_expand_reduce_equal_fastmri_varnet(size, coils):
    image = torch.randn(2, 1, *size, 2, generator=gen(12))
    sens_maps = torch.randn(2, coils, *size, 2, generator=gen(13))
    kspace = torch.randn(2, coils, *size, 2, generator=gen(14))
    block = fastmri_block()
    assert rel_err(sens_expand(image, sens_maps), block.sens_expand(image, sens_maps)) <= 1e-5
    assert rel_err(sens_reduce(kspace, sens_maps), block.sens_reduce(kspace, sens_maps)) <= 1e-5
    assert sens_reduce(kspace, sens_maps).shape == image.shape
    # explicit backend and float64 give the same
    assert rel_err(sens_expand(image, sens_maps, backend="torch"), block.sens_expand(image, sens_maps)) <= 1e-5
    k64 = sens_expand(image.double(), sens_maps.double())
    assert k64.dtype == torch.float64
    assert rel_err(k64, block.sens_expand(image.double(), sens_maps.double())) <= 1e-12


def test_coil_ops_real_arithmetic_path_equal_fast_path():
    """Half precision and mismatched dtypes take the unfused path; its result equals the fused one."""
    image = torch.randn(1, 1, 8, 6, 2, generator=gen(15))
    sens_maps = torch.randn(1, 4, 8, 6, 2, generator=gen(16))
    fused = sens_expand(image.double(), sens_maps.double())
    torch.testing.assert_close(sens_expand(image.double(), sens_maps), fused)
    torch.testing.assert_close(sens_reduce(fused, sens_maps), sens_reduce(fused, sens_maps.double()))


def test_coil_ops_keep_float64_beside_half_precision():
    """Half precision with float64 computes in float64 (torch's promotion, the Triton path's and sens_reduce's);
    sens_expand cast the float64 operand to float32 too."""
    image = torch.randn(1, 1, 8, 6, 2, dtype=torch.float64, generator=gen(40))
    sens_maps = torch.randn(1, 3, 8, 6, 2, dtype=torch.float64, generator=gen(41))
    for half in (torch.float16, torch.bfloat16):
        for x, s in [(image.to(half), sens_maps), (image, sens_maps.to(half))]:
            out = sens_expand(x, s)
            assert out.dtype == sens_reduce(out, s).dtype == torch.float64
            torch.testing.assert_close(out, sens_expand(x.double(), s.double()), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size", [(6, 8), (5, 7)])
def test_coil_ops_gradcheck(size):
    image = torch.randn(1, 1, *size, 2, dtype=torch.float64, generator=gen(17), requires_grad=True)
    sens_maps = torch.randn(1, 2, *size, 2, dtype=torch.float64, generator=gen(18), requires_grad=True)
    kspace = torch.randn(1, 2, *size, 2, dtype=torch.float64, generator=gen(19), requires_grad=True)
    assert torch.autograd.gradcheck(sens_expand, (image, sens_maps))
    assert torch.autograd.gradcheck(sens_reduce, (kspace, sens_maps))
    assert torch.autograd.gradcheck(lambda x, s: sens_expand(x, s, hybrid=True), (image, sens_maps))
    assert torch.autograd.gradcheck(lambda k, s: sens_reduce(k, s, hybrid=True), (kspace, sens_maps))


@pytest.mark.parametrize("size", [(6, 8), (5, 7)])
@pytest.mark.parametrize("hybrid", [False, True])
def test_coil_ops_of_empty_batch_or_coils_are_empty_as_the_ffts(size, hybrid):
    """An empty batch or coil axis gives the empty result (no coils: a zero image), forward and backward, as
    fft2c does; the fused path for even sizes raised MKL's 'Inconsistent configuration parameters'."""
    for batch, coils in [(0, 3), (2, 0)]:
        image = torch.randn(batch, 1, *size, 2, requires_grad=True)
        sens_maps = torch.randn(batch, coils, *size, 2, requires_grad=True)
        kspace = sens_expand(image, sens_maps, hybrid=hybrid)
        assert kspace.shape == sens_maps.shape
        combined = sens_reduce(kspace, sens_maps, hybrid=hybrid)
        assert combined.shape == image.shape and not combined.any()
        combined.sum().backward()
        assert image.grad.shape == image.shape and sens_maps.grad.shape == sens_maps.shape
    with pytest.raises(ValueError, match="length 0"):
        sens_expand(torch.zeros(1, 1, 0, 4, 2), torch.zeros(1, 2, 0, 4, 2))


@pytest.mark.parametrize("mask_shape", [(2, 1, 1, 10, 1), (2, 1, 8, 10, 1)])
def test_data_consistency_equals_fastmri_soft_dc(mask_shape):
    current = torch.randn(2, 3, 8, 10, 2, generator=gen(20))
    ref = torch.randn(2, 3, 8, 10, 2, generator=gen(21))
    mask = torch.rand(mask_shape, generator=gen(22)) > 0.5
    sens_maps = torch.randn(2, 3, 8, 10, 2, generator=gen(23))
    expected = fastmri_block(0.37)(current, ref, mask, sens_maps)
    torch.testing.assert_close(data_consistency(current, ref, mask, torch.tensor([0.37])), expected)
    torch.testing.assert_close(data_consistency(current, ref, mask.float(), 0.37, backend="torch"), expected)


def test_data_consistency_scalar_mask_and_integer_kspace():
    current, ref = torch.randn(1, 2, 4, 6, 2, generator=gen(26)), torch.randn(1, 2, 4, 6, 2, generator=gen(27))
    for impl in ("torch", "matmul"):  # a 0-dim mask (everything sampled) broadcasts on both paths
        with fft_impl(impl):
            torch.testing.assert_close(data_consistency(current, ref, torch.tensor(1.0), 0.25),
                                       current - 0.25 * (current - ref))
    with pytest.raises(ValueError, match="kspace must be a floating-point tensor; got torch.int64"):
        data_consistency(current.long(), ref.long(), torch.ones(1, 1, 1, 6, 1), 0.3)  # η would have become 0


def test_data_consistency_says_how_to_pass_complex_kspace():
    """Complex k-space was told "must be a floating-point tensor" only, as if another real dtype were wanted."""
    current, ref = torch.randn(1, 2, 4, 6, 2, generator=gen(26)), torch.randn(1, 2, 4, 6, 2, generator=gen(27))
    with pytest.raises(ValueError, match=r"got torch.complex64 \(complex tensors: torch.view_as_real gives fastMRI's "):
        data_consistency(as_complex(current), as_complex(ref), torch.ones(1, 1, 1, 6), 0.3)


def test_data_consistency_refuses_a_batched_mask_with_fewer_axes_than_kspace():
    """A (B, 1, W, 1) mask (fastMRI's single-coil layout, batched) on multi-coil k-space put its batch on the coil
    axis when B equals the coil count; masks of fewer axes without a batch still broadcast as before."""
    current, ref = torch.randn(2, 2, 4, 6, 2, generator=gen(28)), torch.randn(2, 2, 4, 6, 2, generator=gen(29))
    lines = torch.rand(2, 1, 6, 1, generator=gen(30)) > 0.5
    with pytest.raises(ValueError, match=r"mask \(2, 1, 6, 1\) has fewer axes than kspace \(2, 2, 4, 6, 2\)"):
        data_consistency(current, ref, lines, 0.5)
    torch.testing.assert_close(data_consistency(current, ref, lines[0, 0], 0.5),
                               data_consistency(current, ref, lines[:1, None], 0.5))
    torch.testing.assert_close(data_consistency(current[:, 0], ref[:, 0], lines, 0.5),  # single-coil batch: fine
                               data_consistency(current[:, :1], ref[:, :1], lines[:, None], 0.5)[:, 0])


def test_nonzero_integer_mask_values_mark_sampled_locations_not_weights():
    """A 0/255 (uint8 from a PNG) or integer mask weighted the data by its values: 255 × the data consistency step,
    and A / Aᴴ 255 × too large (CG-SENSE 1/255 × too dark); fastmri takes every nonzero location as sampled. A float
    mask still weights the data, differentiably (soft masks of learned sampling)."""
    current, ref = torch.randn(2, 3, 8, 10, 2, generator=gen(24)), torch.randn(2, 3, 8, 10, 2, generator=gen(25))
    sens_maps, image = torch.randn(2, 3, 8, 10, 2, generator=gen(31)), torch.randn(2, 1, 8, 10, 2, generator=gen(32))
    mask = torch.rand(2, 1, 1, 10, 1, generator=gen(33)) > 0.5
    expected = MultiCoilMRI(mask.float(), sens_maps)
    for given in ((mask * 255).to(torch.uint8), mask.long() * 3):
        torch.testing.assert_close(data_consistency(current, ref, given, 0.37),
                                   data_consistency(current, ref, mask, 0.37))
        op = MultiCoilMRI(given, sens_maps)
        torch.testing.assert_close(op.A(image), expected.A(image))
        torch.testing.assert_close(op.A_adjoint(current), expected.A_adjoint(current))
    soft = (mask * 0.5).requires_grad_()
    data_consistency(current, ref, soft, 0.37).sum().backward()
    assert soft.grad is not None and bool(soft.grad.any())


def test_data_consistency_weight_gets_gradient():
    current, ref = torch.randn(1, 2, 4, 6, 2, generator=gen(24)), torch.randn(1, 2, 4, 6, 2, generator=gen(25))
    mask = torch.zeros(1, 1, 1, 6, 1)
    mask[..., 2:4, :] = 1
    weight = torch.tensor(0.5, requires_grad=True)
    data_consistency(current, ref, mask, weight).sum().backward()
    assert weight.grad is not None
    torch.testing.assert_close(weight.grad, -((current - ref) * mask).sum())


# ------------------------------------------------------------------------------------------------------ backends


def test_backend_argument_and_environment(monkeypatch):
    image, sens_maps = torch.randn(1, 1, 4, 4, 2), torch.randn(1, 2, 4, 4, 2)
    monkeypatch.delenv("RECONKIT_OPS_BACKEND", raising=False)
    assert resolve_backend(None, image) == "torch"  # automatic choice on CPU tensors
    assert resolve_backend("torch", image) == "torch"
    with pytest.raises(ValueError, match="unknown ops backend 'cuda'"):
        sens_expand(image, sens_maps, backend="cuda")
    with pytest.raises(ValueError, match="unknown ops backend"):
        data_consistency(sens_maps, sens_maps, torch.ones(1, 1, 1, 4, 1), 1.0, backend="fast")
    # also where the path does not depend on it (hybrid space, the export path): it was silently accepted there
    with pytest.raises(ValueError, match="unknown ops backend 'trtion'"):
        sens_expand(image, sens_maps, backend="trtion", hybrid=True)
    with pytest.raises(ValueError, match="unknown ops backend 'trtion'"), fft_impl("matmul"):
        sens_reduce(sens_maps, sens_maps, backend="trtion")
    with pytest.raises(ValueError, match="unknown ops backend 'trtion'"), fft_impl("matmul"):
        data_consistency(sens_maps, sens_maps, torch.ones(1, 1, 1, 4, 1), 1.0, backend="trtion")
    monkeypatch.setenv("RECONKIT_OPS_BACKEND", "bogus")  # the error names the variable, which no option shows
    with pytest.raises(ValueError, match=r"unknown ops backend 'bogus' \(environment variable RECONKIT_OPS_BACKEND\)"):
        sens_reduce(sens_maps, sens_maps)
    monkeypatch.setenv("RECONKIT_OPS_BACKEND", "torch")
    torch.testing.assert_close(sens_expand(image, sens_maps), fastmri_block().sens_expand(image, sens_maps))
    # the argument wins over the environment
    assert resolve_backend("torch", image) == "torch"
    monkeypatch.setenv("RECONKIT_OPS_BACKEND", "bogus")
    assert resolve_backend("torch", image) == "torch"


# ------------------------------------------------------------------------------------------------- MultiCoilMRI


def random_operator(size=(12, 10), coils=4, acceleration=2, dtype=torch.float64, seed=30) -> MultiCoilMRI:
    g = gen(seed)
    sens_maps = torch.randn(2, coils, *size, 2, dtype=dtype, generator=g)
    mask = torch.zeros(2, 1, 1, size[1], 1, dtype=dtype)
    mask[..., ::acceleration, :] = 1
    return MultiCoilMRI(mask, sens_maps)


@pytest.mark.parametrize("size", [(12, 10), (9, 7)])
def test_multicoil_adjoint_identity(size):
    op = random_operator(size)
    x = torch.randn(2, 1, *size, 2, dtype=torch.float64, generator=gen(31))
    y = torch.randn(2, 4, *size, 2, dtype=torch.float64, generator=gen(32))
    torch.testing.assert_close(real_inner(op.A(x), y), real_inner(x, op.A_adjoint(y)), rtol=1e-12, atol=1e-12)
    # the normal operator is self-adjoint and positive semi-definite
    z = torch.randn_like(x)
    torch.testing.assert_close(real_inner(op.normal(x), z), real_inner(x, op.normal(z)), rtol=1e-12, atol=1e-12)
    assert (real_inner(op.normal(x), x) >= 0).all()


def test_centering_sign_patterns_of_odd_lengths_are_refused():
    """For odd lengths the patterns were returned all the same, and post · FFT(pre · x) is not the centred FFT
    (2.7 off for a 5 × 7 image); a length that is not transformed may be odd."""
    for call in (lambda: centering_modulation(5, 7, None, torch.complex64),
                 lambda: centering_modulation(6, 7, None, torch.complex64, dims=(-1,)),
                 lambda: centering_signs(6, 5)):
        with pytest.raises(ValueError, match="centring sign patterns exist for even lengths only"):
            call()
    x = torch.randn(5, 8, dtype=torch.complex64, generator=gen(40))
    pre, post = centering_modulation(5, 8, None, torch.complex64, dims=(-1,))
    torch.testing.assert_close(post * torch.fft.fft(pre * x, norm="ortho"), fftc(x, (-1,)))


def test_centering_modulation_hands_out_copies_that_do_not_change_later_ffts():
    x = torch.randn(2, 8, 6, 2)
    before = fft2c(x)
    pre, post = centering_modulation(8, 6, x.device, torch.complex64)
    pre.mul_(-1)
    post.zero_()
    torch.testing.assert_close(fft2c(x), before, rtol=0, atol=0)


def test_numpy_arrays_are_refused_with_a_type_error_naming_the_function():
    """A numpy array failed deep inside with AttributeError ("'numpy.ndarray' object has no attribute
    'is_complex'" / "'is_floating_point'" / "'is_cuda'")."""
    kspace, image = torch.randn(1, 2, 8, 6, 2).numpy(), torch.randn(1, 1, 8, 6, 2)
    mask = torch.ones(1, 1, 1, 6, 1)
    op = MultiCoilMRI(mask, torch.randn(1, 2, 8, 6, 2))
    for name, call in (("fft2c", lambda: fft2c(kspace)), ("ifft2c", lambda: ifft2c(kspace)),
                       ("fftc", lambda: fftc(kspace, (-1,))), ("ifftc", lambda: ifftc(kspace, (-2,))),
                       ("data_consistency", lambda: data_consistency(kspace, kspace, mask, 0.5)),
                       ("data_consistency", lambda: data_consistency(image, image, mask.numpy(), 0.5)),
                       ("sens_expand", lambda: sens_expand(image, kspace)),
                       ("sens_reduce", lambda: sens_reduce(kspace, kspace)),
                       ("MultiCoilMRI", lambda: MultiCoilMRI(mask.numpy(), op.sens_maps)),
                       ("MultiCoilMRI: kspace", lambda: op.A_adjoint(kspace))):
        with pytest.raises(TypeError, match=rf"^{name}: expected torch tensors in fastMRI's real layout \(\.\.\., 2\)"
                                            r".*got numpy\.ndarray \(torch\.from_numpy"):
            call()


def test_multicoil_operator_refuses_layouts_that_would_broadcast_into_wrong_answers():
    """Batch 3 with 3 coils: an image without its coil axis, or coil k-space as the image, broadcast silently."""
    op = MultiCoilMRI(torch.ones(3, 1, 1, 6, 1), torch.randn(3, 3, 8, 6, 2))
    for call, tensor, message in ((op.A, torch.randn(3, 8, 6, 2), r"image must be \(3, 1, 8, 6, 2\)"),
                                  (op.A, torch.randn(3, 3, 8, 6, 2), r"image must be \(3, 1, 8, 6, 2\)"),
                                  (op.A_adjoint, torch.randn(3, 1, 8, 6, 2), r"kspace must be \(3, 3, 8, 6, 2\)"),
                                  (op.A_adjoint, torch.randn(3, 3, 6, 8, 2), r"kspace must be \(3, 3, 8, 6, 2\)")):
        with pytest.raises(ValueError, match=message):
            call(tensor)
    with pytest.raises(ValueError, match=r"sens_maps must be \(B, C, H, W, 2\)"):
        MultiCoilMRI(torch.ones(1), torch.randn(3, 8, 6, 2))
    assert op.A(torch.randn(1, 1, 8, 6, 2)).shape == (3, 3, 8, 6, 2)  # a batch of one still broadcasts
    # a (B, 1, W, 1) line mask (no readout axis) broadcast its batch of 3 onto the 3 coils: coil c got item c's mask
    for mask in (torch.ones(3, 1, 6, 1), torch.ones(6), torch.ones(3, 1, 8, 6)):
        with pytest.raises(ValueError, match=r"mask must broadcast against k-space \(B, 3, 8, 6, 2\) axis by axis"):
            MultiCoilMRI(mask, torch.randn(3, 3, 8, 6, 2))


def test_a_dagger_recovers_image_from_consistent_data():
    op = random_operator(acceleration=2, coils=6)  # 6 random coils at R = 2: A is injective
    x_true = torch.randn(2, 1, 12, 10, 2, dtype=torch.float64, generator=gen(33))
    kspace = op.A(x_true)
    errors = [rel_err(op.A_dagger(kspace, max_iter=n, tol=0.0), x_true) for n in (2, 10, 60)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-6


def test_a_dagger_with_l2_reg_solves_regularised_normal_equations():
    op = random_operator(acceleration=3, coils=2, seed=34)  # under-determined: regularisation needed
    kspace = op.A(torch.randn(2, 1, 12, 10, 2, dtype=torch.float64, generator=gen(35)))
    lam = 0.1
    x = op.A_dagger(kspace, max_iter=100, tol=1e-12, l2_reg=lam)
    residual = op.normal(x) + lam * x - op.A_adjoint(kspace)
    assert (residual.abs().max() / op.A_adjoint(kspace).abs().max()).item() < 1e-8


def test_iterative_solvers_refuse_a_negative_max_iter():
    """A negative max_iter ran no iteration and returned the start point without a word."""
    from reconkit.ops.operators import conjugate_gradient, fista

    op = random_operator(acceleration=2, coils=2)
    kspace = op.A(torch.randn(2, 1, 12, 10, 2, dtype=torch.float64, generator=gen(36)))
    rhs = op.A_adjoint(kspace)
    for solve, name in ((lambda n: op.A_dagger(kspace, max_iter=n), "conjugate_gradient"),
                        (lambda n: conjugate_gradient(op.normal, rhs, max_iter=n), "conjugate_gradient"),
                        (lambda n: fista(op.normal, rhs, rhs, 0.1, lambda v, _: v, max_iter=n), "fista")):
        with pytest.raises(ValueError, match=rf"{name}: max_iter must be an integer >= 0, got -1"):
            solve(-1)
        assert solve(0).shape == rhs.shape  # no iteration: the start point, as before


def test_coil_ops_under_fake_tensor_mode_leave_the_shared_signs_real():
    """Shape / memory estimation under FakeTensorMode: a size already cached failed there ('Please convert all
    Tensors to FakeTensors first'), and a new one left fake signs in the cache that broke every later real call."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    image, sens_maps = torch.randn(1, 1, 6, 8, 2, generator=gen(42)), torch.randn(1, 3, 6, 8, 2, generator=gen(43))
    expected = sens_expand(image, sens_maps)  # caches the signs of (6, 8)
    with FakeTensorMode():
        for height in (6, 14):  # cached, then not yet cached
            fake_image, fake_maps = torch.zeros(1, 1, height, 8, 2), torch.zeros(1, 3, height, 8, 2)
            assert sens_reduce(sens_expand(fake_image, fake_maps), fake_maps).shape == (1, 1, height, 8, 2)
            assert fft2c(fake_maps).shape == (1, 3, height, 8, 2)
    torch.testing.assert_close(sens_expand(image, sens_maps), expected)
    maps_14 = torch.randn(1, 3, 14, 8, 2, generator=gen(44))
    torch.testing.assert_close(fft2c(maps_14), fastmri.fft2c(maps_14))


def test_cached_centring_signs_first_built_in_inference_mode_still_support_autograd():
    """The sign patterns are cached; built first under inference_mode they must still be usable with autograd."""
    size = (14, 22)  # a size no other test uses, so the cache entry is new here
    image = torch.randn(1, 1, *size, 2, generator=gen(40))
    sens_maps = torch.randn(1, 2, *size, 2, generator=gen(41))
    with torch.inference_mode():
        sens_expand(image, sens_maps, hybrid=True)
        fftc(image, (-1,))
    image.requires_grad_(True)
    sens_expand(image, sens_maps, hybrid=True).square().sum().backward()
    assert image.grad is not None and torch.isfinite(image.grad).all()


def test_multicoil_operator_compiles_to_one_graph():
    """torch.compile(fullgraph=True) of A / Aᴴ: as_complex's storage_offset() check was a Dynamo graph break."""
    op = random_operator(dtype=torch.float32)
    x, y = torch.randn(2, 1, 12, 10, 2, generator=gen(45)), torch.randn(2, 4, 12, 10, 2, generator=gen(46))
    for method, data in ((op.A, x), (op.A_adjoint, y)):
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(method, fullgraph=True, backend="eager")(data), method(data))
