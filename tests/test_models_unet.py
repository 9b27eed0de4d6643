"""reconkit.models.unet against fastmri.models (the oracle): same weights → same outputs and gradients."""

import fastmri.models
import pytest
import torch
import torch.nn.functional as F

from reconkit.models import NormUnet, Unet, instance_norm_leaky_relu


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
    """fastmri's NormUnet only broadcasts for one complex channel (in_chans=2), the VarNet case."""
    torch.manual_seed(1)
    ref = fastmri.models.varnet.NormUnet(4, 2)
    ours = NormUnet(4, 2)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(shape) * 3 + 0.5
    y_ref, gx_ref, _ = _forward_backward(ref, x)
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


def test_fused_instance_norm_leaky_relu_gradients():
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: instance_norm_leaky_relu(t * 1.0, 1e-5, 0.2), (x,))
    ref = F.leaky_relu(F.instance_norm(x, eps=1e-5), 0.2)
    assert torch.allclose(instance_norm_leaky_relu(x * 1.0), ref, atol=1e-12)


def test_fused_norm_keeps_one_activation_per_convolution():
    """The fused op saves its output (shared with the next conv) and 1/std only, not the conv output."""
    x = torch.randn(1, 4, 32, 32, requires_grad=True)
    y = instance_norm_leaky_relu(x * 2.0)
    saved = [t for t in y.grad_fn.saved_tensors]
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
