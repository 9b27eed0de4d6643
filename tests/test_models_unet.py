"""reconkit.models.unet against fastmri.models (the oracle): same weights → same outputs and gradients."""

import fastmri.models
import pytest
import torch
import torch.nn.functional as F

from reconkit.errors import ReconkitError
from reconkit.models import NormUnet, Unet, contract_model, instance_norm_leaky_relu
from reconkit.models.unet import unet_weights


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


def _forward_backward(model, x, grad_out_seed=1):
    x = x.clone().requires_grad_(True)
    y = model(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_out_seed))
    (y * g).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "shape, chans, pools",
    [((2, 1, 32, 32), 4, 3), ((1, 2, 37, 29), 4, 3), ((3, 3, 16, 20), 3, 2), ((1, 1, 23, 45), 2, 4)],
)
def test_unet_matches_fastmri_with_its_weights(shape, chans, pools):
    torch.manual_seed(0)
    ref = fastmri.models.Unet(shape[1], 2, chans=chans, num_pool_layers=pools)
    ours = Unet(shape[1], 2, chans=chans, num_pool_layers=pools)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(shape)

    y_ref, gx_ref, gp_ref = _forward_backward(ref, x)
    y, gx, gp = _forward_backward(ours, x)
    assert y.shape == (shape[0], 2, shape[2], shape[3])
    assert _rel(y, y_ref) < 1e-5
    assert _rel(gx, gx_ref) < 1e-4
    for name in gp_ref:
        assert _rel(gp[name], gp_ref[name]) < 1e-4, name

    ref.eval(), ours.eval()
    with torch.no_grad():
        assert _rel(ours(x), ref(x)) < 1e-5


@pytest.mark.parametrize("shape", [(2, 1, 30, 24, 2), (3, 1, 17, 33, 2)])
def test_norm_unet_matches_fastmri(shape):
    """fastmri's NormUnet only broadcasts for one complex channel (in_chans=2), the VarNet case. The oracle runs
    in float64: fastmri's own float32 input gradient is off by up to ~2e-2 relative on some CPUs (AVX2 oneDNN
    kernels; ours stays within 1e-6 of the float64 oracle there)."""
    torch.manual_seed(1)
    ref = fastmri.models.varnet.NormUnet(4, 2)
    ours = NormUnet(4, 2)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(shape) * 3 + 0.5
    y_ref, gx_ref, _ = _forward_backward(ref.double(), x.double())
    y, gx, _ = _forward_backward(ours, x)
    assert y.shape == shape
    assert _rel(y, y_ref) < 1e-5
    assert _rel(gx, gx_ref) < 1e-4


def test_norm_unet_several_complex_channels_normalises_real_and_imag_groups():
    torch.manual_seed(3)
    net = NormUnet(2, 1, in_chans=4, out_chans=4)
    x = torch.randn(2, 2, 16, 18, 2)
    y = net(x)
    assert y.shape == x.shape
    # the output is de-normalised with the input's statistics: a scaled, shifted input scales the output alike
    shifted = torch.tensor([1.5, -2.0])
    assert torch.allclose(net(x * 4 + shifted), y * 4 + shifted, atol=1e-4)


def test_norm_unet_rejects_real_input():
    with pytest.raises(ValueError, match="NormUnet"):
        NormUnet(2, 1)(torch.randn(1, 1, 16, 16, 3))


def test_norm_unet_names_expected_and_actual_channels():
    """Three complex channels into a NormUnet built for one was a convolution's RuntimeError deep in the U-Net,
    counting the stacked real channels (6 against 2)."""
    net = NormUnet(2, 1)
    with pytest.raises(ValueError, match=r"NormUnet was built for in_chans=2 real channels \(1 complex\); got 6 "
                                         r"\(3 complex\)"):
        net(torch.randn(1, 3, 16, 16, 2))
    with pytest.raises(ValueError, match=r"in_chans=2 real channels \(1 complex\); got 3 \(1.5 complex\)"):
        net.forward_channels(torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize("in_chans, out_chans", [(2, 4), (4, 2), (3, 3), (0, 0)])
def test_norm_unet_refuses_channel_counts_its_forward_cannot_use(in_chans, out_chans):
    """NormUnet(in_chans=2, out_chans=4) was built and then failed in forward (a reshape's RuntimeError), as fastmri's
    does: the output is de-normalised with the input's real / imaginary statistics, so both counts must be equal
    and even; odd ones could take no complex input at all."""
    with pytest.raises(ValueError, match=rf"in_chans and out_chans must be equal, even and >= 2 .*got "
                                         rf"in_chans={in_chans}, out_chans={out_chans}"):
        NormUnet(2, 1, in_chans=in_chans, out_chans=out_chans)


@pytest.mark.parametrize("in_chans, out_chans, chans, pools", [(0, 1, 4, 2), (1, 0, 4, 2), (1, 1, 0, 2), (1, 1, 4, -1)])
def test_unet_refuses_counts_it_cannot_run(in_chans, out_chans, chans, pools):
    """Zero channels were built (PyTorch warning of zero-element tensors) and failed in forward with a convolution's
    RuntimeError; -1 pooling levels ran as 0."""
    with pytest.raises(ValueError, match=rf"Unet: in_chans, out_chans and chans must be >= 1 and num_pool_layers "
                                         rf">= 0; got {in_chans}, {out_chans}, {chans} and {pools}"):
        Unet(in_chans, out_chans, chans=chans, num_pool_layers=pools)


def test_unet_names_its_minimum_size_for_too_small_images():
    net = Unet(1, 1, chans=2, num_pool_layers=3)
    assert net(torch.randn(1, 1, 8, 9)).shape == (1, 1, 8, 9)  # 2**3 runs
    with pytest.raises(ReconkitError, match=r"image: 5 × 9 is smaller than the U-Net's 8 × 8 minimum \(3 pooling"):
        net(torch.randn(1, 1, 5, 9))  # pooled to 0 rows: torch's own error named no constraint


@pytest.mark.parametrize("batch", [1, 2])
def test_fused_instance_norm_leaky_relu_gradients(batch):
    x = torch.randn(batch, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    # reverse mode (training) and forward mode (torch.func.jvp: the training diagnostics' linearisation)
    assert torch.autograd.gradcheck(lambda t: instance_norm_leaky_relu(t * 1.0, 1e-5, 0.2), (x,),
                                    check_forward_ad=True)
    ref = F.leaky_relu(F.instance_norm(x, eps=1e-5), 0.2)
    assert torch.allclose(instance_norm_leaky_relu(x * 1.0), ref, atol=1e-12)
    tangent = torch.randn_like(x)
    for layout in (x.detach(), x.detach().contiguous(memory_format=torch.channels_last)):
        _, fused = torch.func.jvp(instance_norm_leaky_relu, (layout,), (tangent,))
        _, plain = torch.func.jvp(lambda t: F.leaky_relu(F.instance_norm(t, eps=1e-5), 0.2), (layout,), (tangent,))
        torch.testing.assert_close(fused, plain, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("batch", [1, 2])
def test_hessian_vector_products_match_fastmri(batch):
    """The fused norm's backward was once-differentiable: ``torch.autograd.functional.hvp`` (``create_graph=True``)
    returned zeros without a word and a second ``autograd.grad`` raised, where fastmri's U-Net gives the products
    (found by a gradient audit). The batch-of-one batch-norm backward, differentiated, was also off by ~1e-5."""
    torch.manual_seed(0)
    ours = Unet(1, 1, chans=2, num_pool_layers=1).double()
    ref = fastmri.models.Unet(1, 1, chans=2, num_pool_layers=1).double()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(batch, 1, 8, 8, dtype=torch.float64)
    products = []
    for model in (ours, ref):
        _, input_product = torch.autograd.functional.hvp(lambda t, m=model: m(t).square().sum(), x, torch.ones_like(x))
        params = list(model.parameters())
        grads = torch.autograd.grad(model(x).square().sum(), params, create_graph=True)
        weight_product = torch.autograd.grad(sum(g.sum() for g in grads), params)
        products.append(torch.cat([input_product.flatten()] + [p.flatten() for p in weight_product]))
    assert products[1].abs().max() > 1
    torch.testing.assert_close(products[0], products[1], rtol=1e-10, atol=1e-10)


def test_torch_func_transforms_run_and_match_fastmri():
    """``torch.func.vmap`` (per-sample gradients), ``jacfwd`` and ``hessian`` raised: the fused norm had no vmap rule
    and the channels-last copy of the input is not defined for a batched tensor (found by a gradient audit)."""
    torch.manual_seed(0)
    ours = Unet(1, 1, chans=2, num_pool_layers=1).double()
    ref = fastmri.models.Unet(1, 1, chans=2, num_pool_layers=1).double()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)

    def per_sample_grads(model):
        def loss(params, image):
            return torch.func.functional_call(model, params, (image[None],)).square().sum()

        params = {name: p.detach() for name, p in model.named_parameters()}
        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)

    for transform in (lambda m: per_sample_grads(m)["up_conv.0.1.weight"], lambda m: torch.func.jacfwd(m)(x[:1]),
                      lambda m: torch.func.hessian(lambda t: m(t).square().sum())(x[:1])):
        torch.testing.assert_close(transform(ours), transform(ref), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_fused_norm_single_image_is_accurate_in_both_memory_formats(memory_format):
    """Batch of one (the VarNet case): NCHW takes the fused batch-norm kernel, channels-last two-pass statistics;
    both must stay at float32 round-off against float64 on a large image with an offset mean (where PyTorch's
    channels-last batch-norm statistics are off by ~1e-5)."""
    torch.manual_seed(3)
    x = (torch.randn(1, 18, 320, 184) * 3 + 1).contiguous(memory_format=memory_format).requires_grad_(True)
    g = torch.randn(1, 18, 320, 184)
    y = instance_norm_leaky_relu(x)
    y.backward(g)
    x64 = x.detach().double().requires_grad_(True)
    ref = F.leaky_relu(F.instance_norm(x64, eps=1e-5), 0.2)
    ref.backward(g.double())
    assert y.is_contiguous(memory_format=memory_format)
    assert _rel(y.double(), ref) < 1e-6
    assert _rel(x.grad.double(), x64.grad) < 1e-6


def test_unet_runs_channels_last_on_cpu_and_returns_contiguous():
    """Eager CPU U-Nets run their activations channels-last (also for the permuted complex-to-channel view a
    NormUnet passes in) and hand back an NCHW-contiguous tensor."""
    torch.manual_seed(4)
    net = Unet(2, 2, chans=4, num_pool_layers=2)
    formats = []
    hook = net.down_sample_layers[0].layers[0].register_forward_hook(
        lambda module, inputs, output: formats.append(output.is_contiguous(memory_format=torch.channels_last))
    )
    view = torch.randn(1, 1, 32, 24, 2).permute(0, 4, 1, 2, 3).reshape(1, 2, 32, 24)  # as NormUnet builds it
    out = net(view)
    hook.remove()
    assert formats == [True] and out.is_contiguous()
    assert torch.equal(out, net(view.contiguous()))


def test_fused_norm_keeps_one_activation_per_convolution():
    """The fused op saves its output (shared with the next conv) and 1/std only, not the conv output."""
    x = torch.randn(1, 4, 32, 32, requires_grad=True)
    y = instance_norm_leaky_relu(x * 2.0)
    saved = list(y.grad_fn.saved_tensors)
    assert len(saved) == 2
    assert saved[0].data_ptr() == y.data_ptr()
    assert saved[1].numel() == 4


def test_unet_bf16_autocast_runs_and_is_close():
    torch.manual_seed(2)
    net = Unet(1, 1, chans=4, num_pool_layers=2)
    x = torch.randn(1, 1, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x)
        y.float().sum().backward()
    assert torch.isfinite(y.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    assert _rel(y.float(), net(x).detach()) < 0.05


@pytest.mark.parametrize("sizes", [(2, 2, 18, 4), (1, 1, 32, 4), (3, 5, 7, 1), (2, 2, 9, 3)])
def test_unet_weights_counts_the_weights_it_checks(sizes):
    """The count that the size check (reconkit.models.sizes) compares with the free memory is exact."""
    assert unet_weights(*sizes) == sum(p.numel() for p in Unet(*sizes).parameters())


def test_a_unet_too_large_for_the_memory_is_refused_by_name():
    """``Unet(1, 1, chans=10**6)`` asked the allocator for 36 TB (gapfix audit); refused before, naming its sizes."""
    with pytest.raises(ValueError, match=r"Unet\(in_chans=1, out_chans=1, chans=1000000, num_pool_layers=4\): 7\.57e\+15 "
                                         r"weights take .* GiB in torch\.float32, more than the .* GiB of memory free"):
        Unet(1, 1, chans=10**6)


def test_half_precision_unet_behind_the_zero_filled_front_end_is_a_clear_type_error():
    """contract_model(Unet(...).half()), as reconstruct and export call it, failed with 'expected scalar type Float
    but found Half' (the front end's FFTs give float32 images); the bare U-Net takes half-precision images."""
    net = Unet(1, 1, chans=4, num_pool_layers=2).half()
    assert net(torch.randn(1, 1, 16, 16).half()).dtype == torch.float16
    mask = torch.zeros(1, 1, 1, 16, 1)
    mask[..., 6:10, :] = 1
    with pytest.raises(TypeError, match=r"ZeroFilledFrontEnd\(Unet\): its weights are torch.float16"):
        contract_model(net)(torch.randn(1, 2, 16, 16, 2) * mask, mask)
