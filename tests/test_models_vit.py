"""The image-domain vision transformer baseline (reconkit.models.VisionTransformer)."""

from __future__ import annotations

import pytest
import torch

from reconkit.models import VisionTransformer, build_model
from reconkit.models.vit import self_attention

TINY = {"patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2}


def _trained_like(**kwargs) -> VisionTransformer:
    """A tiny ViT whose head is not the zero of a fresh residual model (so its output depends on the tokens)."""
    torch.manual_seed(0)
    model = VisionTransformer(**{**TINY, **kwargs}).eval()
    torch.nn.init.normal_(model.head.weight, std=0.1)
    return model


@pytest.mark.parametrize(("height", "width"), [(32, 32), (30, 21), (5, 3), (4, 9)])
def test_any_size_in_gives_the_same_size_out(height, width):
    image = torch.randn(2, 1, height, width)
    with torch.no_grad():
        out = _trained_like()(image)
    assert out.shape == image.shape and torch.isfinite(out).all()


def test_batch_items_do_not_mix():
    model = _trained_like()
    images = torch.randn(3, 1, 22, 18)
    with torch.no_grad():
        together = model(images)
        one_by_one = torch.cat([model(images[i : i + 1]) for i in range(3)])
        changed = images.clone()
        changed[1] += torch.randn(1, 22, 18)
        others = model(changed)
    torch.testing.assert_close(together, one_by_one, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(others[[0, 2]], together[[0, 2]], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(others[1], together[1])


def test_every_weight_gets_a_gradient():
    model = _trained_like().train()
    model(torch.randn(2, 1, 20, 20)).square().mean().backward()
    silent = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent


def test_without_residual_the_output_is_the_head_alone():
    model = _trained_like(residual=False)
    image = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(model(image), image + model(image))  # no input added back
        model.head.weight.zero_()
        model.head.bias.zero_()
        assert torch.equal(model(image), torch.zeros_like(image))


def test_learns_to_undo_a_fixed_corruption():
    """A few dozen Adam steps on one image pair reduce the L1 error to well under half of the input's."""
    torch.manual_seed(1)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 24), torch.linspace(-1, 1, 24), indexing="ij")
    target = ((xx**2 + yy**2 < 0.6).float() + 0.5 * (xx > 0.2).float()).view(1, 1, 24, 24)
    corrupted = target + 0.3 * torch.randn_like(target)
    model = VisionTransformer(**TINY)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = (corrupted - target).abs().mean().item()
    for _ in range(60):
        optimiser.zero_grad()
        loss = (model(corrupted) - target).abs().mean()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        assert (model(corrupted) - target).abs().mean().item() < 0.5 * start


def test_self_attention_is_softmax_attention_per_head():
    q, k, v = (torch.randn(2, 7, 12) for _ in range(3))
    heads = 3
    out = self_attention(q, k, v, heads)
    for head in range(heads):
        cols = slice(4 * head, 4 * head + 4)
        weights = torch.softmax(q[..., cols] @ k[..., cols].transpose(1, 2) / 2.0, dim=-1)  # 1 / sqrt(4)
        torch.testing.assert_close(out[..., cols], weights @ v[..., cols], rtol=1e-5, atol=1e-6)


def test_bad_hyper_parameters_are_refused():
    with pytest.raises(ValueError, match="embed_dim 20 is not divisible by num_heads 3"):
        VisionTransformer(embed_dim=20, num_heads=3)
    with pytest.raises(ValueError, match="residual=True needs in_chans == out_chans"):
        VisionTransformer(in_chans=2, out_chans=1)
    with pytest.raises(ValueError, match="patch_size and depth must be ≥ 1"):
        VisionTransformer(patch_size=0)
    # num_heads 0 was a ZeroDivisionError, in_chans 0 was built and failed in forward with a convolution's RuntimeError
    for options, got in (({"num_heads": 0}, "1, 1, 128 and 0"), ({"in_chans": 0, "out_chans": 0}, "0, 0, 128 and 8"),
                         ({"embed_dim": 0, "num_heads": 1}, "1, 1, 0 and 1")):
        with pytest.raises(ValueError, match=f"in_chans, out_chans, embed_dim and num_heads must be ≥ 1, got {got}"):
            VisionTransformer(**options)
    assert isinstance(build_model("vit", **TINY), VisionTransformer)


def test_impossible_sizes_are_refused_by_name():
    """``VisionTransformer(depth=10**5)`` built blocks for 15 s, ``embed_dim=2**20`` asked for 13 TB at once (gapfix
    audit); both are refused before anything is built."""
    with pytest.raises(ValueError, match=r"VisionTransformer: depth=100000 is more than 1000 "):
        VisionTransformer(depth=10**5)
    with pytest.raises(ValueError, match=r"VisionTransformer\(.*embed_dim=1048576.*\): 7\.92e\+13 weights take"):
        VisionTransformer(embed_dim=2**20, num_heads=1)
