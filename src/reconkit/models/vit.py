"""Image-domain vision transformer baseline (Lin & Heckel, "Vision Transformers Enable Fast and Robust
Accelerated MRI", MIDL 2022): the zero-filled image cut into ``p × p`` patches, a stack of pre-norm transformer
blocks with global self-attention over the patch tokens, and a linear head back to pixels.

Two choices differ from that paper, both so that one model serves every matrix size:

* **Position:** no learned absolute position table (it would have to be resized for every image size, and a model
  trained on 320 × 320 crops would see it stretched on a 640 × 368 image). Instead a depth-wise 3 × 3 convolution
  on the token grid after the first block (a "positional encoding generator", Chu et al., CPVT 2021) gives each
  token its neighbourhood, the same way at any size.
* **Residual:** with ``residual=True`` (the default) the head predicts a correction added to the input image and
  starts at zero, so an untrained model returns its input (the zero-filled image) and short runs train stably.

Sizes that are not multiples of ``p`` are reflect-padded on the bottom / right and cropped back (static shapes,
so the ONNX exporter sees no data-dependent control flow).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from reconkit.models.sizes import check_model_size, meta_weights

__all__ = ["TransformerBlock", "VisionTransformer", "self_attention"]


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + MHSA(LN(x))`` then ``x + MLP(LN(x))``.

    Tokens come flattened over the batch, ``(B·N, dim)`` in and out, with ``tokens = N`` per image: the linear
    layers then see 2-D inputs and export as ``Gemm`` on the stored weight (a 3-D input would export as a MatMul
    with a transposed copy of it under another name).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, tokens: int) -> torch.Tensor:
        dim = x.shape[-1]
        q, k, v = self.qkv(self.norm1(x)).reshape(-1, tokens, 3, dim).unbind(2)  # each (B, N, dim), heads packed
        x = x + self.proj(self_attention(q, k, v, self.num_heads).reshape(-1, dim))
        return x + self.mlp(self.norm2(x))


def self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Scaled dot-product attention with the heads packed in the last axis: ``(B, N, dim)`` each → ``(B, N, dim)``.

    Eager: PyTorch's fused ``scaled_dot_product_attention``. In an ONNX export: ONNX Runtime's fused
    ``com.microsoft.MultiHeadAttention`` (measured ≈ 25 % faster there than the MatMul + Softmax + MatMul the
    standard opset gives, which also holds the whole ``N × N`` score matrix per head); the graph then needs ONNX
    Runtime, as every reconkit graph is run.
    """
    if torch.onnx.is_in_onnx_export():
        return _OrtMultiHeadAttention.apply(q, k, v, num_heads)
    return _packed_sdpa(q, k, v, num_heads)


def _packed_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (num_heads, -1)).transpose(1, 2)  # (B, heads, N, dim / heads)

    return F.scaled_dot_product_attention(heads(q), heads(k), heads(v)).transpose(1, 2).flatten(2)


class _OrtMultiHeadAttention(torch.autograd.Function):
    """Traced as one ``com.microsoft.MultiHeadAttention`` node (inference only: no backward)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
        return _packed_sdpa(q, k, v, num_heads)

    @staticmethod
    def symbolic(g, q, k, v, num_heads: int):
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=num_heads)
        out.setType(q.type())
        return out


class VisionTransformer(nn.Module):
    """Image-to-image ViT: ``(B, in_chans, h, w)`` → ``(B, out_chans, h, w)`` for any ``h, w``.

    Cost: ``⌈h/p⌉·⌈w/p⌉`` tokens with global attention, so the attention's work grows with the square of the
    token count (a 320 × 320 image at ``p = 10``: 1024 tokens; 640 × 368: 2368). Trained on recon-size crops
    (``--data.transform unet``), it sees more tokens when it reconstructs the full encoded image; trained through
    the zero-filled front end (``--data.transform varnet``), it sees the same.

    Args:
        in_chans / out_chans: image channels (1 for a magnitude image). ``residual`` needs them equal.
        patch_size: ``p``, the side of the square patches that become tokens.
        embed_dim: token width; num_heads: attention heads (must divide ``embed_dim``).
        depth: number of transformer blocks.
        mlp_ratio: hidden width of each block's MLP relative to ``embed_dim``.
        residual: add the input image to the head's output (the head starts at zero).

    Example:
        >>> vit = VisionTransformer(patch_size=4, embed_dim=16, depth=2, num_heads=2)
        >>> vit(torch.randn(2, 1, 30, 21)).shape
        torch.Size([2, 1, 30, 21])
        >>> bool(torch.equal(vit(torch.ones(1, 1, 8, 8)), torch.ones(1, 1, 8, 8)))  # untrained: the input
        True
    """

    image_domain = True  # takes an image, not k-space: export puts the zero-filled front end before it

    def __init__(
        self,
        in_chans: int = 1,
        out_chans: int = 1,
        patch_size: int = 10,
        embed_dim: int = 128,
        depth: int = 6,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        residual: bool = True,
    ):
        super().__init__()
        if residual and in_chans != out_chans:
            raise ValueError(f"residual=True needs in_chans == out_chans, got {in_chans} and {out_chans}")
        if patch_size < 1 or depth < 1:
            raise ValueError(f"patch_size and depth must be ≥ 1, got {patch_size} and {depth}")
        if min(in_chans, out_chans, embed_dim, num_heads) < 1:  # else a ZeroDivisionError, or a RuntimeError in forward
            raise ValueError(f"in_chans, out_chans, embed_dim and num_heads must be ≥ 1, got {in_chans}, {out_chans}, "
                             f"{embed_dim} and {num_heads}")
        check_model_size(
            "VisionTransformer",
            {"in_chans": in_chans, "out_chans": out_chans, "patch_size": patch_size, "embed_dim": embed_dim,
             "depth": depth, "mlp_ratio": mlp_ratio},
            lambda: meta_weights(
                (1, lambda: VisionTransformer(in_chans, out_chans, patch_size, embed_dim, 1, num_heads, mlp_ratio, residual)),
                (depth - 1, lambda: TransformerBlock(embed_dim, num_heads, mlp_ratio)),
            ),
            repeats=("depth",),
        )
        self.out_chans, self.patch_size = out_chans, patch_size
        self.residual = residual
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.position = nn.Conv2d(embed_dim, embed_dim, 3, padding=1, groups=embed_dim)
        self.blocks = nn.ModuleList(TransformerBlock(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, out_chans * patch_size * patch_size)
        self.apply(_init_weights)
        if residual:  # _init_weights already zeroed the bias
            nn.init.zeros_(self.head.weight)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, h, w)`` → ``(B, out_chans, h, w)``; ``h, w`` are padded up to multiples of the patch size
        (reflected; replicated when a side is no longer than a patch) and the output cropped back."""
        height, width = image.shape[-2:]
        p = self.patch_size
        pad_bottom, pad_right = -height % p, -width % p
        x = image
        if pad_bottom or pad_right:
            x = F.pad(x, [0, pad_right, 0, pad_bottom], mode="reflect" if min(height, width) > p else "replicate")
        grid = self.patch_embed(x)  # (B, dim, gh, gw)
        dim, gh, gw = grid.shape[1:]
        tokens = grid.permute(0, 2, 3, 1).reshape(-1, dim)  # (B·N, dim), N = gh·gw, row-major over the grid
        for index, block in enumerate(self.blocks):
            tokens = block(tokens, gh * gw)
            if index == 0:
                grid = tokens.reshape(-1, gh, gw, dim).permute(0, 3, 1, 2)
                tokens = tokens + self.position(grid).permute(0, 2, 3, 1).reshape(-1, dim)
        patches = self.head(self.norm(tokens))  # (B·N, out·p·p)
        out = patches.reshape(-1, gh, gw, self.out_chans, p, p).permute(0, 3, 1, 4, 2, 5)
        out = out.reshape(-1, self.out_chans, gh * p, gw * p)[..., :height, :width]
        return out + image if self.residual else out


def _init_weights(module: nn.Module) -> None:
    """ViT initialisation: truncated normal (std 0.02) linear weights, zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
