"""Classical baselines (zero-filled, CG-SENSE, ACS and ESPIRiT-style sensitivity maps, ESPIRiT from MatMuls) on
simulated multi-coil data."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from reconkit.errors import ReconkitError
from reconkit.metrics import nmse, ssim
from reconkit.models.classical import (
    CGSense,
    ZeroFilled,
    acs_lines,
    cg_sense,
    estimate_sens_maps_acs,
    estimate_sens_maps_espirit,
    zero_filled,
)
from reconkit.models.contract import ZeroFilledFrontEnd
from reconkit.models.espirit_poly import _espirit_poly, estimate_sens_maps_espirit_poly
from reconkit.ops import complex_abs, fft2c, power_of_two_scale, rss_complex


def phantom(height: int, width: int) -> torch.Tensor:
    """Smooth real phantom ``(H, W)``: a soft-edged ellipse with two inner blobs of other intensity."""
    y = torch.linspace(-1, 1, height).unsqueeze(1)
    x = torch.linspace(-1, 1, width).unsqueeze(0)

    def soft_ellipse(cy, cx, ry, rx, sharpness=12.0):
        r = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2
        return torch.sigmoid(sharpness * (1 - r))

    body = soft_ellipse(0, 0, 0.8, 0.7)
    return body + 0.5 * soft_ellipse(0.25, -0.2, 0.25, 0.2) - 0.4 * soft_ellipse(-0.3, 0.25, 0.2, 0.25)


def coil_maps(coils: int, height: int, width: int) -> torch.Tensor:
    """Smooth complex sensitivities ``(C, H, W, 2)``: Gaussian profiles from coils on a ring, each with a phase ramp."""
    y = torch.linspace(-1, 1, height).unsqueeze(1)
    x = torch.linspace(-1, 1, width).unsqueeze(0)
    maps = []
    for c in range(coils):
        angle = 2 * math.pi * c / coils
        cy, cx = 1.3 * math.sin(angle), 1.3 * math.cos(angle)
        magnitude = torch.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 1.5)
        phase = 0.8 * (math.cos(angle) * y - math.sin(angle) * x) + angle
        maps.append(torch.stack((magnitude * torch.cos(phase), magnitude * torch.sin(phase)), dim=-1))
    return torch.stack(maps)


def equispaced_mask(width: int, acceleration: int, num_low_frequencies: int) -> torch.Tensor:
    """``(1, 1, 1, W, 1)`` float mask: every ``acceleration``-th line plus a fully sampled centre."""
    mask = torch.zeros(width)
    mask[::acceleration] = 1
    start = (width - num_low_frequencies + 1) // 2
    mask[start : start + num_low_frequencies] = 1
    return mask.view(1, 1, 1, width, 1)


def simulate(coils=8, height=64, width=48, acceleration=4, num_low_frequencies=12, batch=1):
    """(masked_kspace, mask, target RSS, true maps, object support) for a noise-free acquisition."""
    maps = coil_maps(coils, height, width).unsqueeze(0)
    image = phantom(height, width)
    coil_images = maps * image[None, None, :, :, None]
    kspace = fft2c(coil_images).expand(batch, -1, -1, -1, -1)
    mask = equispaced_mask(width, acceleration, num_low_frequencies).expand(batch, -1, -1, -1, -1)
    target = rss_complex(coil_images, dim=1).expand(batch, -1, -1)
    return kspace * mask, mask, target, maps, image > 0.3


def phase_aligned_error(estimate: torch.Tensor, truth: torch.Tensor, support: torch.Tensor) -> float:
    """Relative error of maps ``(C, H, W, 2)`` inside ``support`` after removing the best common phase."""
    est = torch.view_as_complex(estimate.contiguous())[:, support]
    ref = torch.view_as_complex(truth.contiguous())[:, support]
    phase = torch.sum(ref * est.conj())
    est = est * phase / phase.abs()
    return (torch.linalg.norm(est - ref) / torch.linalg.norm(ref)).item()


def interior(support: torch.Tensor, margin: int = 3) -> torch.Tensor:
    """``support`` shrunk by ``margin`` pixels (where low-resolution estimates are not blurred by the edge)."""
    outside = (~support).float()[None, None]
    return ~torch.nn.functional.max_pool2d(outside, 2 * margin + 1, stride=1, padding=margin)[0, 0].bool()


def normalised(maps: torch.Tensor) -> torch.Tensor:
    return maps / rss_complex(maps, dim=0)[None, :, :, None]


def test_acs_lines_from_mask_and_override():
    mask = equispaced_mask(40, 4, 10)
    lines = acs_lines(mask)
    expected = torch.zeros(40, dtype=torch.bool)
    expected[15:25] = True  # 12 and 24 are also sampled by the equispaced part: the run is [15, 25)
    expected[12:13] = False
    assert torch.equal(lines[0], expected)
    assert torch.equal(acs_lines(mask, num_low_frequencies=6)[0], torch.arange(40).ge(17) & torch.arange(40).lt(23))
    # per batch item, from a 2D mask too
    two = torch.cat([equispaced_mask(41, 3, 7), equispaced_mask(41, 3, 13)]).expand(2, 1, 5, 41, 1)
    assert acs_lines(two).sum(dim=1).tolist() == [8, 14]  # the equispaced lines at 24 and 27 extend both runs by one


def test_acs_lines_rejects_unsampled_centre():
    mask = torch.zeros(1, 1, 1, 16, 1)
    mask[..., ::4, :] = 1  # centre line 8 is sampled by equispacing, 9 is not: shift so 8 is empty
    mask = mask.roll(1, dims=3)
    with pytest.raises(ReconkitError, match="mask: the centre phase-encode line is not fully sampled"):
        acs_lines(mask)


def test_bad_shapes_name_the_tensor():
    kspace, mask, *_ = simulate(coils=2, height=16, width=12)
    with pytest.raises(ReconkitError, match="masked_kspace"):
        ZeroFilled()(kspace[0], mask)
    with pytest.raises(ReconkitError, match="mask: expected shape"):
        CGSense()(kspace, mask[..., :-1, :])


def test_kspace_without_coils_is_refused_clearly():
    """C = 0 failed inside the power-of-two scaling with "IndexError: amax(): Expected reduction dim 1 to have
    non-zero size"."""
    kspace, mask, *_ = simulate(coils=2, height=16, width=12)
    for model in (ZeroFilled(), CGSense(), ZeroFilledFrontEnd(torch.nn.Identity())):
        with pytest.raises(ReconkitError, match=r"masked_kspace: no coils \(C = 0 in .* = \(1, 0, 16, 12, 2\)"):
            model(kspace[:, :0], mask)


@pytest.mark.parametrize("options, problem", [({"l2_reg": -0.5}, r"CGSense l2_reg must be a finite number >= 0"),
                                              ({"l2_reg": math.nan}, r"CGSense l2_reg must be a finite number >= 0"),
                                              ({"num_iters": 0}, r"CGSense num_iters must be an integer >= 1, got 0"),
                                              ({"num_iters": 2.5}, r"num_iters must be an integer >= 1, got 2.5")])
def test_cg_sense_refuses_settings_that_cannot_give_an_image(options, problem):
    """A negative or NaN λ made every CG-SENSE image NaN and 0 iterations an image of zeros, without a word; 2.5
    iterations failed in forward (range() of a float)."""
    with pytest.raises(ValueError, match=problem):
        CGSense(**options)


def test_numpy_arrays_are_refused_with_a_type_error_naming_the_function():
    """A numpy array failed deep inside with AttributeError ("'numpy.ndarray' object has no attribute 'detach'")."""
    kspace, mask, *_ = simulate(coils=2, height=16, width=12)
    for name, call in (("ZeroFilled", lambda: ZeroFilled()(kspace.numpy(), mask)),
                       ("CGSense", lambda: CGSense()(kspace, mask.numpy())),
                       ("zero_filled", lambda: zero_filled(kspace.numpy(), mask)),
                       ("estimate_sens_maps_acs", lambda: estimate_sens_maps_acs(kspace.numpy(), mask))):
        with pytest.raises(TypeError, match=rf"^{name}: expected torch tensors .* got numpy\.ndarray"):
            call()


@pytest.mark.parametrize("size", [(64, 48), (63, 45)])
def test_acs_maps_close_to_truth_in_object(size):
    kspace, mask, _, maps, support = simulate(coils=8, height=size[0], width=size[1], num_low_frequencies=16)
    estimate = estimate_sens_maps_acs(kspace, mask)
    assert estimate.shape == kspace.shape
    torch.testing.assert_close(rss_complex(estimate[0], dim=0)[support], torch.ones(int(support.sum())))
    truth = normalised(maps[0])
    assert phase_aligned_error(estimate[0], truth, support) < 0.05
    assert phase_aligned_error(estimate[0], truth, interior(support)) < 0.02
    # a narrower ACS region gives blurrier, less accurate maps
    narrow = estimate_sens_maps_acs(kspace, mask, num_low_frequencies=8)
    assert phase_aligned_error(narrow[0], truth, support) > phase_aligned_error(estimate[0], truth, support)


@pytest.mark.parametrize("coils,size", [(8, (64, 48)), (12, (63, 45))])
def test_espirit_maps_close_to_truth_in_object(coils, size):
    kspace, mask, _, maps, support = simulate(coils=coils, height=size[0], width=size[1], num_low_frequencies=16)
    estimate = estimate_sens_maps_espirit(kspace, mask, grid_size=32)
    assert estimate.shape == kspace.shape
    truth = normalised(maps[0])
    assert phase_aligned_error(estimate[0], truth, support) < 0.02
    # better than the ACS estimate near edges
    acs_error = phase_aligned_error(estimate_sens_maps_acs(kspace, mask)[0], truth, support)
    assert phase_aligned_error(estimate[0], truth, support) < acs_error
    # background far from the object is cropped away
    assert complex_abs(estimate[0, :, 0, 0]).max() == 0


def test_espirit_needs_enough_acs_lines():
    kspace, mask, *_ = simulate(coils=4, height=32, width=24, num_low_frequencies=4)
    with pytest.raises(ReconkitError, match="fewer than the ESPIRiT kernel size"):
        estimate_sens_maps_espirit(kspace, mask)


@pytest.mark.parametrize("sens_method", ["acs", "espirit"])
def test_cg_sense_beats_zero_filled(sens_method):
    kspace, mask, target, *_ = simulate(coils=8, height=64, width=48, acceleration=4, num_low_frequencies=12, batch=2)
    zf = ZeroFilled()(kspace, mask)
    cg = CGSense(num_iters=15, l2_reg=1e-3, sens_method=sens_method)(kspace, mask)
    assert zf.shape == cg.shape == target.shape
    gt, zf_np, cg_np = target.numpy(), zf.numpy(), cg.numpy()
    assert nmse(gt, cg_np) < 0.5 * nmse(gt, zf_np)
    assert ssim(gt, cg_np) > ssim(gt, zf_np)
    assert nmse(gt, cg_np) < 0.02


def test_cg_sense_with_true_maps_is_exact_and_scale_free():
    kspace, mask, target, maps, _ = simulate(coils=8, height=32, width=24, acceleration=2, num_low_frequencies=6)
    unit_maps = normalised(maps[0]).unsqueeze(0)
    image = cg_sense(kspace, mask, unit_maps, num_iters=40)
    assert nmse(target.numpy(), image.numpy()) < 1e-8
    torch.testing.assert_close(cg_sense(1e-4 * kspace, mask, unit_maps, num_iters=40), 1e-4 * image)


def test_zero_filled_fully_sampled_is_target():
    kspace, _, target, *_ = simulate(coils=4, height=20, width=17, acceleration=1)
    torch.testing.assert_close(zero_filled(kspace), target, rtol=1e-5, atol=1e-6)
    assert not list(ZeroFilled().parameters()) and not list(CGSense().parameters())


def test_integer_masks_mark_every_nonzero_line_sampled():
    """A 0/255 mask (uint8 from a PNG) weighted the data: zero_filled and the U-Net's front end 255× too bright,
    CG-SENSE 255× too dark; every nonzero line is sampled, as in fastmri."""
    kspace, mask, *_ = simulate(coils=4, height=32, width=24, num_low_frequencies=8)
    front_end = ZeroFilledFrontEnd(torch.nn.Identity())
    for given in ((mask * 255).to(torch.uint8), mask.long() * 3):
        torch.testing.assert_close(zero_filled(kspace, given), zero_filled(kspace, mask))
        torch.testing.assert_close(front_end(kspace, given), front_end(kspace, mask))
        torch.testing.assert_close(CGSense()(kspace, given), CGSense()(kspace, mask))


def test_maps_per_batch_item_with_different_acs_widths():
    kspace, _, _, maps, support = simulate(coils=8, height=64, width=48, batch=2)
    mask = torch.cat([equispaced_mask(48, 4, 16), equispaced_mask(48, 3, 22)])
    truth = normalised(maps[0])
    for estimate in (estimate_sens_maps_acs(kspace * mask, mask), estimate_sens_maps_espirit(kspace * mask, mask)):
        for item in range(2):
            assert phase_aligned_error(estimate[item], truth, support) < 0.05


@pytest.mark.parametrize("scale", [1e-20, 1e22])
def test_classical_baselines_are_equivariant_to_the_kspace_scale(scale):
    """k-space in other units gives the image in those units; at the raw scale the RSS's and the CG inner
    products' squares under- / overflowed float32 (zero, NaN or wrong images)."""
    kspace, mask, *_ = simulate(coils=4, height=32, width=24, num_low_frequencies=8)
    for model in (ZeroFilled(), CGSense(), CGSense(sens_method="espirit")):
        image = model(kspace, mask)
        torch.testing.assert_close(model(kspace * scale, mask) / scale, image, rtol=1e-4, atol=1e-4 * image.max())


def test_acs_lines_of_a_mask_expanded_over_real_imag_or_coils_and_of_an_empty_batch():
    """The ACS lines were read off ``mask.reshape(B, -1, W)``: a mask expanded over (real, imag) had its columns
    interleaved two per row, so the ACS lines were others (here none: an error; a CG-SENSE image 90 % off on
    another mask), and an empty batch failed."""
    kspace, mask, *_ = simulate(coils=4, height=32, width=24, num_low_frequencies=8)
    expected = acs_lines(mask)
    for expanded in (mask.expand(1, 1, 1, 24, 2), mask.expand(1, 4, 32, 24, 2)):
        assert torch.equal(acs_lines(expanded), expected)
    torch.testing.assert_close(CGSense()(kspace, mask.expand(1, 1, 1, 24, 2)), CGSense()(kspace, mask))
    assert CGSense()(kspace[:0], mask[:0]).shape == (0, 32, 24)


def test_float64_classical_baselines_keep_float64_peaks_and_all_zero_items():
    """float64 k-space: the power-of-two scale of a peak outside float32's range, or of an all-zero item, was
    taken through float32 (inf / 0), so the image was NaN where the float32 baseline gives one."""
    kspace, mask, *_ = simulate(coils=4, height=32, width=24, num_low_frequencies=8)
    kspace = torch.cat((kspace, torch.zeros_like(kspace))).double()
    mask = mask.expand(2, -1, -1, -1, -1)
    assert power_of_two_scale(kspace[1:]).item() == torch.finfo(torch.float64).tiny
    for model in (ZeroFilled(), CGSense()):
        image = model(kspace, mask)
        assert image.dtype == torch.float64 and not image[1].any()
        for scale in (1e-50, 1e50):
            torch.testing.assert_close(model(kspace * scale, mask) / scale, image)


# ---- ESPIRiT from MatMuls (reconkit.models.espirit_poly) ----


@pytest.mark.parametrize("coils,size,acs", [(8, (64, 48), 16), (12, (63, 45), 12), (4, (48, 64), 12)])
def test_espirit_poly_maps_close_to_truth_and_to_the_eigen_version(coils, size, acs):
    kspace, mask, _, maps, support = simulate(coils=coils, height=size[0], width=size[1], num_low_frequencies=acs)
    estimate = estimate_sens_maps_espirit_poly(kspace, mask, grid_size=32)
    assert estimate.shape == kspace.shape
    torch.testing.assert_close(rss_complex(estimate[0], dim=0), torch.ones(size), rtol=1e-4, atol=1e-4)
    truth = normalised(maps[0])
    error = phase_aligned_error(estimate[0], truth, support)
    assert error < 0.02
    assert error < phase_aligned_error(estimate_sens_maps_acs(kspace, mask)[0], truth, support)
    eigen = estimate_sens_maps_espirit(kspace, mask, grid_size=32, crop=0)
    assert phase_aligned_error(estimate[0], eigen[0], support) < 0.02


def test_espirit_poly_float32_equals_its_float64_evaluation_in_the_object():
    """The subspace filter is iterated on P (P ← 2P − P²), not on I − P: with 20 coils (a 720 × 720 Gram matrix)
    the float32 maps stay within 1e-6 of the float64 ones in the object (I − (I − αG)^(2^n) gave 2–3e-6 here and
    1e-3 differences between ONNX Runtime and torch on a 512 × 270 scan)."""
    kspace, mask, _, _, support = simulate(coils=20, height=96, width=80, num_low_frequencies=16)
    single = estimate_sens_maps_espirit_poly(kspace, mask)
    double = _espirit_poly(kspace.double(), mask.double(), None, 6, 0.02, 32, 64, 64, 20)
    diff = (single.double() - double)[0][:, support]
    assert float(diff.norm() / double[0][:, support].norm()) < 1e-6


def assert_same_on_object(maps: torch.Tensor, reference: torch.Tensor, support: torch.Tensor) -> None:
    """Maps ``(C, H, W, 2)`` equal on the object. Outside it they are ill-defined, and float32 sums taken in another
    order (another batch size or thread count) change them by up to 3e-4 there; maps calibrated on another item's
    ACS lines differ by 3e-2 on the object."""
    diff = (maps - reference)[:, support]
    assert float(diff.norm() / reference[:, support].norm()) < 1e-5


@pytest.mark.parametrize("scale", [1e-16, 1e14])
def test_espirit_poly_maps_do_not_depend_on_the_kspace_scale(scale):
    """k-space in a scanner's or converter's units: the Gram matrix's Frobenius norm (a sum of 4th powers of the
    k-space) under- / overflowed float32 at these scales and the maps were NaN."""
    kspace, mask, _, _, support = simulate(coils=4, height=48, width=40, num_low_frequencies=12)
    maps = estimate_sens_maps_espirit_poly(kspace * scale, mask)
    assert torch.isfinite(maps).all()
    assert_same_on_object(maps[0], estimate_sens_maps_espirit_poly(kspace, mask)[0], support)


def test_espirit_poly_calibrates_each_batch_item_on_its_own_acs_lines():
    kspace, _, _, maps, support = simulate(coils=8, height=64, width=48, batch=2)
    # item 0 has 8 ACS lines, item 1 has 20: the fixed calibration block holds non-ACS lines for both
    mask = torch.cat([equispaced_mask(48, 4, 8), equispaced_mask(48, 3, 20)])
    together = estimate_sens_maps_espirit_poly(kspace * mask, mask)
    truth = normalised(maps[0])
    for item in range(2):
        alone = estimate_sens_maps_espirit_poly(kspace[item : item + 1] * mask[item : item + 1], mask[item : item + 1])
        assert_same_on_object(together[item], alone[0], support)
        assert phase_aligned_error(together[item], truth, support) < 0.05


def test_espirit_poly_falls_back_to_acs_maps_for_a_narrow_acs_run_and_refuses_tiny_kspace():
    kspace, _, _, _, support = simulate(coils=6, height=48, width=40, batch=2)
    mask = torch.cat([equispaced_mask(40, 4, 4), equispaced_mask(40, 4, 12)])  # item 0: 4 ACS lines < kernel 6
    estimate = estimate_sens_maps_espirit_poly(kspace * mask, mask)
    assert torch.isfinite(estimate).all()
    torch.testing.assert_close(estimate[0], estimate_sens_maps_acs(kspace[:1] * mask[:1], mask[:1])[0])
    alone = estimate_sens_maps_espirit_poly(kspace[1:] * mask[1:], mask[1:])
    assert_same_on_object(estimate[1], alone[0], support)
    kspace, mask, *_ = simulate(coils=2, height=5, width=24, num_low_frequencies=8)
    with pytest.raises(ReconkitError, match="smaller than the ESPIRiT kernel"):
        estimate_sens_maps_espirit_poly(kspace, mask)


def test_espirit_poly_stays_float32_under_autocast():
    kspace, mask, *_ = simulate(coils=6, height=48, width=40, num_low_frequencies=12)
    reference = estimate_sens_maps_espirit_poly(kspace, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = estimate_sens_maps_espirit_poly(kspace, mask)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, reference)


def test_espirit_maps_stay_float32_under_autocast():
    """The maps' bilinear interpolation (two MatMuls) ran in bfloat16 under autocast: 2e-3 relative error in
    CG-SENSE's ESPIRiT maps and images."""
    kspace, mask, *_ = simulate(coils=6, height=48, width=40, num_low_frequencies=12)
    reference = estimate_sens_maps_espirit(kspace, mask, grid_size=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = estimate_sens_maps_espirit(kspace, mask, grid_size=16)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, reference)


def test_espirit_warns_when_the_acs_lines_cannot_determine_the_maps():
    """8 ACS lines at 64 rows with 6 coils: 33 calibration patches for 216 unknowns (the maps then vanished over 43 %
    of an object in an audit). 29 lines at 128 rows with 8 coils (1272 for 288) do not warn."""
    from reconkit.errors import ReconkitWarning
    from reconkit.models.classical import estimate_sens_maps_espirit

    for height, width, coils, acs, warns in ((64, 48, 6, 8, True), (128, 96, 8, 29, False)):
        mask = torch.zeros(1, 1, 1, width, 1)
        mask[..., width // 2 - acs // 2 : width // 2 - acs // 2 + acs, :] = 1
        kspace = torch.randn(1, coils, height, width, 2) * mask
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            estimate_sens_maps_espirit(kspace, mask, acs)
        assert any(issubclass(w.category, ReconkitWarning) and "calibration patches" in str(w.message)
                   for w in caught) == warns


def test_maps_that_vanish_everywhere_are_zero_and_cg_sense_stays_finite():
    """ESPIRiT maps cropped over the whole image (too few ACS patches for the unknowns) and ACS maps of empty
    k-space were 0/0 = NaN, and so was the CG-SENSE image; the maps docstrings promise 0 where coil images vanish."""
    mask = equispaced_mask(20, 3, 6).expand(2, -1, -1, -1, -1)
    kspace = torch.randn(2, 3, 16, 20, 2, generator=torch.Generator().manual_seed(0)) * mask
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the calibration-patch warning: the case this test is about
        maps = estimate_sens_maps_espirit(kspace, mask)
        image = CGSense(sens_method="espirit")(kspace, mask)
    assert torch.equal(maps, torch.zeros_like(maps)) and torch.isfinite(image).all()
    assert torch.equal(estimate_sens_maps_acs(torch.zeros_like(kspace), mask), torch.zeros_like(kspace))


def test_espirit_poly_constants_first_built_in_inference_mode_still_support_autograd():
    """Its cached interpolation weights and kernel phases, built first under inference_mode (a Reconstructor, a
    Lightning validation), were inference tensors: a later gradient with respect to the k-space raised."""
    from reconkit.models.classical import _linear_interpolation
    from reconkit.models.espirit_poly import _pair_phases

    _linear_interpolation.cache_clear()
    _pair_phases.cache_clear()
    kspace, mask, *_ = simulate(coils=4, height=32, width=24, num_low_frequencies=10)
    with torch.inference_mode():
        estimate_sens_maps_espirit_poly(kspace, mask)
    kspace = kspace.clone().requires_grad_(True)
    estimate_sens_maps_espirit_poly(kspace, mask).square().sum().backward()
    assert kspace.grad is not None and torch.isfinite(kspace.grad).all()


def test_espirit_poly_gradient_is_finite_for_an_item_that_falls_back_to_acs_maps():
    """An ACS run narrower than the kernel leaves no calibration patch: the discarded ESPIRiT branch of that item
    then took square roots of exact zeros, and their backward (0 · ∞) made the k-space gradient NaN (found by
    gradchecking VarNet(final_dc_maps="espirit") with respect to its input)."""
    kspace, _, _, _, _ = simulate(coils=3, height=32, width=24, batch=2)
    mask = torch.cat([equispaced_mask(24, 4, 4), equispaced_mask(24, 4, 10)])  # item 0: 4 ACS lines < kernel 6
    kspace = (kspace * mask).clone().requires_grad_(True)
    weights = torch.randn(2, 3, 32, 24, 2, generator=torch.Generator().manual_seed(0))
    (estimate_sens_maps_espirit_poly(kspace, mask) * weights).sum().backward()
    assert torch.isfinite(kspace.grad).all()
    fallback = kspace.detach()[:1].clone().requires_grad_(True)
    (estimate_sens_maps_acs(fallback, mask[:1]) * weights[:1]).sum().backward()
    scale = fallback.grad.abs().max().item()  # the gradients of scale-invariant maps cancel: float32 round-off
    torch.testing.assert_close(kspace.grad[:1], fallback.grad, rtol=1e-3, atol=1e-3 * scale)
