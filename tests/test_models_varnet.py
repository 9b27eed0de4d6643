"""reconkit.models.VarNet against fastmri.models.VarNet (the oracle), plus checkpointing, AMP and tracing."""

import math

import fastmri.models
import numpy as np
import onnxruntime
import pytest
import torch
from fastmri.models.varnet import SensitivityModel as FastmriSensitivityModel

from reconkit.models import SensitivityModel, VarNet, low_frequency_window, sizes
from reconkit.ops import fft_impl

SMALL = {"num_cascades": 2, "sens_chans": 3, "sens_pools": 2, "chans": 4, "pools": 2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    """Relative closeness that also holds for two zero tensors (e.g. the first cascade's dc_weight gradient)."""
    return bool((a - b).norm() <= tol * b.norm())


def _line_mask(batch: int, width: int, centres: list[int], every: int, seed: int = 0) -> torch.Tensor:
    """(B, 1, 1, W, 1) float mask: a centred block of ``centres[b]`` lines plus every ``every``-th line (offset)."""
    gen = np.random.default_rng(seed)
    mask = torch.zeros(batch, 1, 1, width, 1)
    for b in range(batch):
        start = (width - centres[b] + 1) // 2
        mask[b, 0, 0, start : start + centres[b], 0] = 1
        mask[b, 0, 0, int(gen.integers(every)) :: every, 0] = 1
    return mask


def _pair(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    kwargs = {**SMALL, **overrides}
    ref = fastmri.models.VarNet(**kwargs)
    ours = VarNet(**kwargs)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize(
    "batch, coils, height, width, centres, num_low_frequencies",
    [
        (1, 4, 32, 24, [6], None),
        (2, 3, 33, 27, [4, 8], None),
        (2, 3, 33, 27, [4, 8], 4),
        (1, 2, 20, 17, [5], 4),
        (1, 5, 48, 40, [10], None),
    ],
)
def test_varnet_matches_fastmri_with_its_weights(batch, coils, height, width, centres, num_low_frequencies):
    ref, ours = _pair(seed=batch + coils)
    mask = _line_mask(batch, width, centres, every=4, seed=coils)
    kspace = torch.randn(batch, coils, height, width, 2) * mask

    out_ref = ref(kspace, mask.bool(), num_low_frequencies)
    out = ours(kspace, mask, num_low_frequencies)
    assert out.shape == (batch, height, width)
    assert _rel(out, out_ref) < 1e-4


def test_varnet_gradients_match_fastmri():
    ref, ours = _pair(seed=7)
    mask = _line_mask(1, 24, [6], every=3)
    kspace = torch.randn(1, 3, 28, 24, 2) * mask
    target = torch.rand(1, 28, 24)
    for model, m in ((ref, mask.bool()), (ours, mask)):
        ((model(kspace, m) - target) ** 2).mean().backward()
    grads_ref = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert _close(p.grad, grads_ref[name].grad, 1e-3), name


@pytest.mark.parametrize("height, width", [(32, 24), (33, 27)])
def test_line_masks_run_in_hybrid_space_with_the_kspace_result(height, width):
    """A line mask (B,1,1,W,1) takes the hybrid-space cascades (1D FFTs along W); the same mask broadcast to 2D
    (B,1,H,W,1) takes the k-space cascades. Output, k-space prediction and gradients agree."""
    _, ours = _pair(seed=3)
    mask = _line_mask(2, width, [6, 4], every=3)
    full_mask = mask.expand(2, 1, height, width, 1).contiguous()
    kspace = torch.randn(2, 3, height, width, 2) * mask
    assert _rel(ours(kspace, mask), ours(kspace, full_mask)) < 1e-5
    assert _rel(ours.predict_kspace(kspace, mask), ours.predict_kspace(kspace, full_mask)) < 1e-5
    grads = []
    for m in (mask, full_mask):
        ours.zero_grad()
        ours(kspace, m).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters()})
    for name, grad in grads[0].items():
        assert _close(grad, grads[1][name], 1e-4), name


@pytest.mark.parametrize("width", [27, 96])
def test_export_path_equals_eager(width):
    """Under fft_impl("matmul"): line masks take the stacked W-major cascades (one W radix at 27, two at 96), 2D
    masks the planar k-space ones; both equal eager."""
    _, ours = _pair(seed=5)
    mask = _line_mask(2, width, [6, 4], every=3)
    kspace = torch.randn(2, 3, 33, width, 2) * mask
    with torch.no_grad():
        for m in (mask, mask.expand(2, 1, 33, width, 1)):
            eager = ours(kspace, m)
            with fft_impl("matmul"):
                exported = ours(kspace, m)
            assert exported.shape == eager.shape and _rel(exported, eager) < 1e-5


def test_bool_and_float_masks_agree():
    _, ours = _pair()
    mask = _line_mask(1, 24, [6], every=4)
    kspace = torch.randn(1, 3, 16, 24, 2) * mask
    assert torch.allclose(ours(kspace, mask.bool()), ours(kspace, mask), atol=1e-6)


def test_masks_of_any_dtype_mark_every_nonzero_line_sampled_as_fastmri_does():
    """A 0/255 mask (uint8 from a PNG) went into the data consistency as 255 × the data: a 42× wrong image, no
    error; fastmri's ``torch.where(mask, ...)`` takes every nonzero line as sampled (as the ACS window here did)."""
    ref, ours = _pair()
    mask = _line_mask(1, 24, [6], every=4)
    kspace = torch.randn(1, 3, 16, 24, 2) * mask
    expected = ref(kspace, mask.bool())
    for given in ((mask * 255).to(torch.uint8), mask.long() * 3, mask * 255):
        assert _rel(ours(kspace, given), expected) < 1e-4
        assert _rel(ours.predict_kspace(kspace, given), ours.predict_kspace(kspace, mask)) < 1e-6
        with fft_impl("matmul"):
            assert _rel(ours(kspace, given), expected) < 1e-4


@pytest.mark.parametrize("width", [16, 17, 24])
def test_low_frequency_window_matches_fastmri(width):
    gen = torch.Generator().manual_seed(width)
    masks = [(torch.rand(3, 1, 1, width, 1, generator=gen) < p).float() for p in (0.3, 0.6, 0.9)]
    masks.append(_line_mask(3, width, [2, 5, 8], every=5))
    masks.append(torch.ones(2, 1, 1, width, 1))  # fully sampled: fastmri's argmin gives 1 low frequency
    masks.append(torch.zeros(2, 1, 1, width, 1))
    sens = FastmriSensitivityModel(2, 1)
    for mask in masks:
        pad_ref, num_ref = sens.get_pad_and_num_low_freqs(mask.bool())
        pad, num = low_frequency_window(mask)
        assert torch.equal(pad, pad_ref) and torch.equal(num, num_ref), mask.flatten(1)
    pad, num = low_frequency_window(masks[0], num_low_frequencies=6)
    assert num.tolist() == [6, 6, 6] and pad.tolist() == [(width - 5) // 2] * 3


def test_per_item_low_frequency_tensor_equals_per_item_calls():
    """A batch with one known ACS width per item (0 = measure) equals running each item on its own."""
    mask = _line_mask(3, 24, [2, 5, 8], every=5)
    widths = torch.tensor([4, 0, 6])
    pad, num = low_frequency_window(mask, widths)
    for i, width in enumerate(widths.tolist()):
        pad_i, num_i = low_frequency_window(mask[i : i + 1], width or None)
        assert (pad[i], num[i]) == (pad_i[0], num_i[0])
    model = VarNet(num_cascades=1, sens_chans=2, sens_pools=1, chans=2, pools=1).eval()
    kspace = torch.randn(3, 2, 12, 24, 2) * mask
    with torch.no_grad():
        batched = model(kspace, mask, widths)
        single = [model(kspace[i : i + 1], mask[i : i + 1], int(w) or None) for i, w in enumerate(widths)]
    torch.testing.assert_close(batched, torch.cat(single), rtol=1e-5, atol=1e-6)


def test_checkpoint_cascades_gives_same_output_and_gradients():
    torch.manual_seed(3)
    plain = VarNet(**SMALL)
    ckpt = VarNet(**SMALL, checkpoint_cascades=True)
    ckpt.load_state_dict(plain.state_dict())
    mask = _line_mask(1, 24, [6], every=4)
    kspace = torch.randn(1, 3, 32, 24, 2) * mask
    out_plain, out_ckpt = plain(kspace, mask), ckpt(kspace, mask)
    assert torch.equal(out_plain, out_ckpt)
    out_plain.sum().backward()
    out_ckpt.sum().backward()
    ckpt_params = dict(ckpt.named_parameters())
    for name, p in plain.named_parameters():
        assert _close(ckpt_params[name].grad, p.grad, 1e-5), name


def test_bf16_autocast_forward_backward():
    torch.manual_seed(4)
    net = VarNet(**SMALL)
    mask = _line_mask(1, 32, [8], every=4)
    kspace = torch.randn(1, 3, 32, 32, 2) * mask
    reference = net(kspace, mask).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(kspace, mask)
    assert out.dtype == torch.float32  # FFTs and the RSS run in float32
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    assert _rel(out, reference) < 0.05


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_are_a_clear_type_error(dtype):
    """VarNet().half() failed deep in the first U-Net with 'expected scalar type Float but found Half' (its FFTs
    give float32 activations)."""
    net = VarNet(**SMALL).to(dtype)
    mask = _line_mask(1, 32, [8], every=4)
    kspace = torch.randn(1, 3, 32, 32, 2) * mask
    for call in (net, net.predict_kspace):
        with pytest.raises(TypeError, match=rf"VarNet: its weights are {dtype}.*model.float\(\).*torch.autocast"):
            call(kspace.to(dtype), mask)


def test_init_scale_scales_final_convolution_only():
    torch.manual_seed(5)
    base = VarNet(**SMALL)
    torch.manual_seed(5)
    scaled = VarNet(**SMALL, init_scale=0.1)
    base_state, scaled_state = base.state_dict(), scaled.state_dict()
    last_level = SMALL["pools"] - 1
    final = {f"cascades.{i}.model.unet.up_conv.{last_level}.1.{w}" for i in range(2) for w in ("weight", "bias")}
    for name, value in base_state.items():
        expected = value * 0.1 if name in final else value
        assert torch.allclose(scaled_state[name], expected), name


def test_varnet_rejects_bad_shapes():
    net = VarNet(**SMALL)
    with pytest.raises(ValueError, match="masked_kspace"):
        net(torch.randn(1, 3, 16, 16), torch.ones(1, 1, 1, 16, 1))
    with pytest.raises(ValueError, match="mask"):
        net(torch.randn(1, 3, 16, 16, 2), torch.ones(16))
    # a one-column "all sampled" mask broadcast in the data consistency, while the ACS window was measured on it as
    # column 0 of k-space: a 37 % different image, no error (fastmri fails on it)
    for mask in (torch.ones(1, 1, 1, 1, 1), torch.ones(1, 1, 1, 12, 1), torch.ones(1, 1, 8, 16, 1),
                 torch.ones(2, 1, 1, 16, 1)):
        with pytest.raises(ValueError, match=r"mask must be .* with \(H, W\) = \(16, 16\) of masked_kspace; got"):
            net(torch.randn(1, 3, 16, 16, 2), mask)


def test_sensitivity_model_refuses_channel_counts_other_than_one_complex_image():
    """SensitivityModel(in_chans=4, out_chans=4) was built and then failed in forward with a convolution's
    RuntimeError (as fastmri's does): its NormUnet runs coil by coil on one complex image."""
    with pytest.raises(ValueError, match=r"SensitivityModel runs its NormUnet coil by coil.*got in_chans=4, "
                                         r"out_chans=4"):
        SensitivityModel(2, 1, in_chans=4, out_chans=4)


def test_sensitivity_model_called_directly_rejects_a_mask_of_another_width():
    """A mask 12 or 30 lines wide on 24-column k-space gave (1, 3, 16, 24, 2) maps from an ACS window measured on
    the wrong lines, no error (as fastmri's); VarNet's own input check now runs there too."""
    net = SensitivityModel(2, 2)
    kspace = torch.randn(1, 3, 16, 24, 2)
    for mask in (torch.ones(1, 1, 1, 12, 1), torch.ones(1, 1, 1, 30, 1), torch.ones(1, 1, 1, 1, 1)):
        with pytest.raises(ValueError, match=r"SensitivityModel: mask must be .* \(H, W\) = \(16, 24\)"):
            net(kspace, mask)
    assert net(kspace, torch.ones(1, 1, 1, 24, 1)).shape == kspace.shape


def test_kspace_without_coils_is_refused_clearly():
    """C = 0 failed inside the power-of-two scaling with "IndexError: amax(): Expected reduction dim 1 to have
    non-zero size"."""
    with pytest.raises(ValueError, match=r"VarNet: masked_kspace has no coils \(C = 0 in \(B, C, H, W, 2\)"):
        VarNet(**SMALL)(torch.zeros(1, 0, 16, 16, 2), torch.ones(1, 1, 1, 16, 1))


def test_numpy_arrays_are_refused_with_a_type_error_naming_the_model():
    """A numpy array failed deep inside with AttributeError ("'numpy.ndarray' object has no attribute 'detach'")."""
    kspace, mask = torch.randn(1, 3, 16, 16, 2), torch.ones(1, 1, 1, 16, 1)
    for name, call in (("VarNet", lambda: VarNet(**SMALL)(kspace.numpy(), mask)),
                       ("VarNet", lambda: VarNet(**SMALL).predict_kspace(kspace, mask.numpy())),
                       ("SensitivityModel", lambda: SensitivityModel(2, 2)(kspace, mask.numpy()))):
        with pytest.raises(TypeError, match=rf"^{name}: expected torch tensors .* got numpy\.ndarray"):
            call()


def test_varnet_traces_to_onnx_with_matmul_fft(tmp_path):
    """The model is traceable (no data-dependent control flow, no complex dtypes with the MatMul FFT)."""
    torch.manual_seed(6)
    net = VarNet(**SMALL).eval()
    mask = _line_mask(1, 24, [6], every=3)
    kspace = torch.randn(1, 3, 32, 24, 2) * mask
    path = tmp_path / "varnet.onnx"
    with fft_impl("matmul"):
        torch.onnx.export(net, (kspace, mask), str(path), dynamo=False,
                          input_names=["masked_kspace", "mask"], output_names=["image"])
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    other_mask = _line_mask(1, 24, [8], every=5, seed=3)  # a different ACS width: computed in-graph
    for m in (mask, other_mask):
        k = torch.randn(1, 3, 32, 24, 2) * m
        (image,) = session.run(None, {"masked_kspace": k.numpy(), "mask": m.numpy()})
        with torch.no_grad():
            assert _rel(torch.from_numpy(image), net(k, m)) < 1e-4
    (scaled,) = session.run(None, {"masked_kspace": (k * 1e20).numpy(), "mask": m.numpy()})  # scale in the graph
    assert _rel(torch.from_numpy(scaled) / 1e20, torch.from_numpy(image)) < 1e-4


def test_varnet_under_torch_compile_matches_eager():
    """torch.compile takes the batched, plain-op path (as export does) in one graph; same output and gradients."""
    torch.manual_seed(8)
    net = VarNet(**SMALL)
    mask = _line_mask(1, 16, [4], every=3)
    kspace = torch.randn(1, 3, 16, 16, 2) * mask
    compiled = torch.compile(net, fullgraph=True, backend="eager")
    out = compiled(kspace, mask)
    assert _rel(out, net(kspace, mask)) < 1e-5
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def _final_dc_pair(seed: int = 5, prior: float = 0.05, **step) -> tuple[VarNet, VarNet]:
    """The same weights without and with the SENSE data-consistency step (``step``: more VarNet settings)."""
    torch.manual_seed(seed)
    plain = VarNet(**SMALL).eval()
    refined = VarNet(**SMALL, final_dc_iters=8, final_dc_prior=prior, **step).eval()
    refined.load_state_dict(plain.state_dict())  # the step has no weights
    return plain, refined


def _multicoil_scan(batch: int, coils: int, height: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth object × smooth coil maps + a little noise, fully sampled ``(B, C, H, W, 2)`` k-space."""
    from reconkit.ops import fft2c

    gen = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    obj = ((x / 0.7) ** 2 + (y / 0.8) ** 2 < 1).float() * (1 + 0.5 * torch.cos(3 * x + 2 * y))
    angles = torch.arange(coils) * 2 * np.pi / coils
    maps = torch.stack([torch.exp(-((x - 0.9 * torch.cos(a)) ** 2 + (y - 0.9 * torch.sin(a)) ** 2)) for a in angles])
    phase = torch.stack((torch.cos(2 * x + y), torch.sin(2 * x + y)), -1)
    images = (obj * maps)[..., None] * phase  # (C, H, W, 2)
    kspace = fft2c(images).expand(batch, -1, -1, -1, -1)
    return kspace + 0.002 * torch.randn(kspace.shape, generator=gen), torch.ones(1)


def test_final_dc_step_moves_towards_the_data_and_vanishes_for_a_tiny_prior():
    kspace, _ = _multicoil_scan(2, 6, 40, 32, seed=1)
    mask = _line_mask(2, 32, [6, 8], every=3, seed=2)
    masked = kspace * mask
    plain, refined = _final_dc_pair()
    with torch.no_grad():
        net_k, hybrid, reference = plain._cascades(masked, mask, None)
        from reconkit.models.sense_refine import refine_kspace

        maps = plain._step_maps(masked, mask, None)
        refined_k = refine_kspace(net_k, reference, mask, maps, hybrid, iters=8, prior=0.05)
        # the data misfit on the measured lines drops; the unmeasured lines change too (the coils fill them)
        assert ((refined_k - reference) * mask).norm() < 0.9 * ((net_k - reference) * mask).norm()
        assert ((refined_k - net_k) * (1 - mask)).norm() > 0
        # a tiny prior (huge λ: trust the network) leaves the network's image
        trusting = VarNet(**SMALL, final_dc_iters=8, final_dc_prior=1e-9).eval()
        trusting.load_state_dict(plain.state_dict())
        torch.testing.assert_close(trusting(masked, mask), plain(masked, mask), rtol=1e-4, atol=1e-5)
        assert _rel(refined(masked, mask), plain(masked, mask)) > 1e-3


@pytest.mark.parametrize("step", [{}, {"final_dc_maps": "espirit", "final_dc_wavelet": 0.3}])
def test_final_dc_step_same_in_kspace_and_hybrid_space_and_on_the_export_path(step):
    kspace, _ = _multicoil_scan(1, 4, 32, 24, seed=3)
    line = _line_mask(1, 24, [6], every=3, seed=4)
    _, refined = _final_dc_pair(seed=6, **step)
    with torch.no_grad():
        hybrid = refined(kspace * line, line)  # line mask: hybrid space
        full = line.expand(1, 1, 32, 24, 1).contiguous()  # the same lines as a 2D mask: k-space form
        torch.testing.assert_close(refined(kspace * full, full), hybrid, rtol=1e-4, atol=1e-5)
        with fft_impl("matmul"):
            stacked = refined(kspace * line, line)  # export path, stacked layout
            planar = refined(kspace * full, full)  # export path, planar layout (2D masks)
    assert _rel(stacked, hybrid) < 1e-5 and _rel(planar, hybrid) < 1e-5


@pytest.mark.parametrize("scale", [1e-18, 1e-12, 1e15])
def test_varnet_is_equivariant_to_the_kspace_scale_in_eager_and_on_the_export_path(scale):
    """k-space in other units (a scanner's or converter's: 1e-18 ... 1e15 here) gives the image in those units; at
    the raw scale the ESPIRiT step's Gram norm (sums of 4th powers) and the U-Nets' variances under- / overflowed
    in float32 (NaN images)."""
    kspace, _ = _multicoil_scan(1, 4, 32, 24, seed=3)
    line = _line_mask(1, 24, [6], every=3, seed=4)
    _, refined = _final_dc_pair(seed=6, final_dc_maps="espirit", final_dc_wavelet=0.3)
    with torch.no_grad():
        for path in ("torch", "matmul"):
            with fft_impl(path):
                image = refined(kspace * line, line)
                scaled = refined(kspace * line * scale, line) / scale
            assert torch.isfinite(scaled).all() and _rel(scaled, image) < 1e-4, path


def test_the_kspace_prediction_of_self_supervised_losses_is_equivariant_to_the_kspace_scale():
    """``predict_kspace`` (what SSDU's loss scores) ran at the raw scale: NaN below ~1e-21 and above ~1e21 here, 55 %
    off at 1e20 (the U-Nets' variances in float32)."""
    kspace, _ = _multicoil_scan(1, 4, 32, 24, seed=3)
    line = _line_mask(1, 24, [6], every=3, seed=4)
    _, model = _final_dc_pair(seed=6, final_dc_maps="espirit", final_dc_wavelet=0.3)
    with torch.no_grad():
        prediction = model.predict_kspace(kspace * line, line)
        for scale in (1e-25, 1e20, 1e25):
            scaled = model.predict_kspace(kspace * line * scale, line) / scale
            assert torch.isfinite(scaled).all() and _rel(scaled, prediction) < 1e-4, scale


def test_final_dc_settings_are_checked():
    with pytest.raises(ValueError, match="final_dc_prior > 0"):
        VarNet(**SMALL, final_dc_iters=5, final_dc_prior=0.0)
    with pytest.raises(ValueError, match="final_dc_iters must be >= 0"):
        VarNet(**SMALL, final_dc_iters=-1)
    with pytest.raises(ValueError, match="final_dc_wavelet >= 0"):
        VarNet(**SMALL, final_dc_iters=5, final_dc_wavelet=-0.1)
    with pytest.raises(ValueError, match="final_dc_maps must be one of"):
        VarNet(**SMALL, final_dc_iters=5, final_dc_maps="walsh")
    # NaN passed the comparisons: a NaN prior or wavelet weight made every image NaN without a word
    for options in ({"final_dc_prior": math.nan}, {"final_dc_wavelet": math.nan}, {"final_dc_prior": math.inf}):
        with pytest.raises(ValueError, match=r"final_dc_prior > 0 and final_dc_wavelet >= 0 \(finite numbers\)"):
            VarNet(**SMALL, final_dc_iters=5, **options)


def test_final_dc_step_with_espirit_maps_and_wavelets_beats_acs_maps_on_a_sharp_object():
    """On an object with sharp edges the ACS maps are wrong near the edges, ESPIRiT's are not; the L1-Haar term
    then removes noise. Same weights, same data: each addition lowers the error against the fully sampled RSS."""
    from reconkit.ops import ifft2c, rss_complex

    kspace, _ = _multicoil_scan(1, 8, 64, 48, seed=11)
    mask = _line_mask(1, 48, [10], every=4, seed=12)
    target = rss_complex(ifft2c(kspace), dim=1)
    errors = []
    for step in ({}, {"final_dc_maps": "espirit"}, {"final_dc_maps": "espirit", "final_dc_wavelet": 0.3}):
        _, refined = _final_dc_pair(seed=13, prior=1.0, **step)
        with torch.no_grad():
            errors.append(_rel(refined(kspace * mask, mask), target))
    assert errors[1] < errors[0] and errors[2] < errors[1], errors


def test_size_check_under_cuda_counts_the_memory_pytorch_has_cached(monkeypatch):
    """Under a CUDA default device the free memory was the driver's alone (torch.cuda.mem_get_info), while PyTorch's
    caching allocator keeps freed tensors' memory reserved for reuse: after a training run filled the cache, a model
    that fits in it was refused (review41). Mocked CUDA: 1 MiB free for the driver, 1 GiB cached and unused."""
    monkeypatch.setattr(torch, "get_default_device", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**20, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2**30 + 2**20)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2**20)
    sizes.check_model_size("VarNet", {"chans": 18}, lambda: 2**27)  # 0.5 GiB of float32 weights
    with pytest.raises(ValueError, match=r"more than the 1 GiB of memory free on cuda"):
        sizes.check_model_size("VarNet", {"chans": 18}, lambda: 2**28 + 2**20)


def test_impossible_sizes_are_refused_before_anything_is_built(monkeypatch):
    """``VarNet(num_cascades=10**5)`` built cascades for 18 s before an allocation failed, ``VarNet(chans=10**5)``
    asked for 360 GB (gapfix audit): sizes whose weights cannot fit in the free memory, more cascades than
    ``MAX_REPEATS`` or more pooling levels than ``MAX_POOLS`` are refused first, naming the parameters."""
    monkeypatch.setattr(sizes, "available_memory", lambda: 2**20)  # 1 MiB free: fastMRI's VarNet needs 0.11 GiB
    with pytest.raises(ValueError, match=r"VarNet\(num_cascades=12, chans=18, pools=4, sens_chans=8, sens_pools=4\): "
                                         r"2\.99e\+07 weights take 0\.112 GiB in torch\.float32, more than the "
                                         r"0\.000977 GiB of memory free on cpu"):
        VarNet()
    VarNet(num_cascades=2, chans=2, pools=1, sens_chans=2, sens_pools=1)  # a few KiB
    with pytest.raises(ValueError, match=r"VarNet: num_cascades=100000 is more than 1000 "):
        VarNet(num_cascades=10**5, chans=1, pools=1, sens_chans=1, sens_pools=1)
    with pytest.raises(ValueError, match=r"VarNet: sens_pools=40 is more than 24 "):
        VarNet(sens_pools=40)
