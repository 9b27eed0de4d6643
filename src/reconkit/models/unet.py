"""U-Net and normalised U-Net (the E2E-VarNet regulariser), state_dict-compatible with ``fastmri.models``.

Parameter names equal fastmri's (``down_sample_layers.0.layers.0.weight``, ``up_conv.3.1.bias``, ...), so a
state_dict saved from ``fastmri.models.Unet`` / ``NormUnet`` loads unchanged and gives the same output.

Where the forward pass differs from fastmri's (same arithmetic, fewer memory passes):

* instance norm + LeakyReLU run as one autograd function (:class:`InstanceNormLeakyReLU`) that keeps only its
  output and the per-channel ``1/std`` for the backward pass; the normalised input is recomputed from the output
  (LeakyReLU is invertible), so one activation per convolution is stored instead of two;
* the concatenation of upsampled and skip features before each decoder convolution is replaced by two
  convolutions on the halves of the weight, summed (no concatenated copy kept for backward; the ONNX export keeps
  the concatenation, which ONNX Runtime runs faster);
* padding for odd sizes is decided from static shapes (Python ints), so tracing/export sees no data-dependent
  control flow;
* on the CPU (eager) the activations are channels-last: oneDNN's NCHW convolution kernels pad the channel axis to
  blocks of 16, so fastMRI's 18 / 36 channels cost as much as 32 / 48, while its channels-last kernels do not
  (about 1.6× faster U-Net forward + backward at 18 channels, 640 × 368). Instance-norm statistics are then taken
  in two passes, because PyTorch's channels-last batch-norm statistics lose ~1e-5 relative accuracy.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from reconkit.errors import ReconkitError
from reconkit.models.sizes import check_model_size

__all__ = ["ConvBlock", "NormUnet", "TransposeConvBlock", "Unet", "instance_norm_leaky_relu", "unet_weights"]


class InstanceNormLeakyReLU(torch.autograd.Function):
    """``leaky_relu(instance_norm(x))`` (no affine) storing only the output and ``1/std`` for backward.

    Works in any memory format (channels-last included) without copies. For a batch of one, instance norm is a
    batch norm over the channels and runs as PyTorch's fused batch-norm kernels; larger batches use reductions.
    Forward-mode AD (``torch.func.jvp``, used by :mod:`reconkit.training.regime`) runs through :meth:`jvp`; the
    backward is differentiable itself (double backward: ``create_graph=True``, Hessian-vector products).
    Returns ``(out, invstd)``; ``invstd`` ``(N, C, 1, 1)`` is differentiable too, so that the double backward
    follows it (the backward reads it).
    """

    generate_vmap_rule = True  # torch.func.vmap / jacfwd / hessian: forward, backward and jvp are plain ops

    @staticmethod
    def forward(x: torch.Tensor, eps: float, negative_slope: float) -> tuple[torch.Tensor, torch.Tensor]:
        channels = x.shape[1]
        if x.shape[0] == 1 and x.is_contiguous():
            out, _, invstd = torch.native_batch_norm(x, None, None, None, None, True, 0.0, eps)
            invstd = invstd.view(1, channels, 1, 1)
        elif x.shape[0] == 1:
            # channels-last: PyTorch's CPU batch-norm statistics lose ~1e-5 relative accuracy in this layout, so
            # mean and variance come from two plain reductions (var_mean's Welford reduction is slow in this layout)
            # and only the normalisation runs as the (inference) batch-norm kernel
            mean = x.mean(dim=(0, 2, 3))
            var = torch.sub(x, mean.view(1, channels, 1, 1)).square_().mean(dim=(0, 2, 3))
            out = torch.native_batch_norm(x, None, None, mean, var, False, 0.0, eps)[0]
            invstd = torch.rsqrt(var.to(torch.promote_types(x.dtype, torch.float32)) + eps).view(1, channels, 1, 1)
        else:
            var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
            stats_dtype = torch.promote_types(x.dtype, torch.float32)
            invstd = torch.rsqrt(var.to(stats_dtype) + eps)  # (N, C, 1, 1)
            out = torch.addcmul((-mean.to(stats_dtype) * invstd).to(x.dtype), x, invstd.to(x.dtype))
        return F.leaky_relu_(out, negative_slope), invstd

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: tuple) -> None:
        _, eps, negative_slope = inputs
        out, invstd = output
        ctx.set_materialize_grads(False)  # invstd's gradient is None unless a double backward asks for it
        ctx.save_for_backward(out, invstd)
        ctx.save_for_forward(out, invstd)
        ctx.negative_slope = negative_slope
        ctx.eps = eps

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor, _eps: None, _negative_slope: None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tangent of the output: ``invstd · (t − mean(t) − n · mean(n · t))`` through the norm (``n`` the
        normalised input), times the LeakyReLU slope where ``n < 0``; of ``invstd``: ``−invstd² · mean(n · t)``."""
        out, invstd = ctx.saved_tensors
        slope = ctx.negative_slope
        normed = F.leaky_relu(out, 1.0 / slope)
        centred = tangent - tangent.mean(dim=(2, 3), keepdim=True)
        mean_normed_tangent = (normed * tangent).mean(dim=(2, 3), keepdim=True)
        tangent_normed = (centred - normed * mean_normed_tangent) * invstd.to(out.dtype)
        tangent_invstd = -invstd.square() * mean_normed_tangent.to(invstd.dtype)
        return torch.where(out > 0, tangent_normed, tangent_normed * slope), tangent_invstd

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor | None, grad_invstd: torch.Tensor | None):
        """Plain differentiable ops, in place unless ``create_graph=True`` records them for a double backward."""
        out, invstd = ctx.saved_tensors
        slope = ctx.negative_slope
        normed = F.leaky_relu(out, 1.0 / slope)  # LeakyReLU is invertible: the normalised input
        in_place = not torch.is_grad_enabled()
        grad_in = None
        if grad_out is not None:
            grad_normed = torch.ops.aten.leaky_relu_backward(grad_out, out, slope, True)
            # d/dx of (x - mean) * invstd:  invstd * (g - mean(g) - normed * mean(g * normed))
            # batch-norm backward of `normed` with mean 0, invstd 1 gives the bracket (not under create_graph: its own
            # derivative takes that invstd for the statistics of `normed`, whose variance is var / (var + eps))
            if out.shape[0] == 1 and in_place:
                unit = torch.ones(out.shape[1], dtype=invstd.dtype, device=out.device)
                grad_in = torch.ops.aten.native_batch_norm_backward(
                    grad_normed, normed, None, None, None, torch.zeros_like(unit), unit, True, ctx.eps,
                    [True, False, False],
                )[0]
            else:
                mean_grad = grad_normed.mean(dim=(2, 3), keepdim=True)
                mean_grad_normed = (grad_normed * normed).mean(dim=(2, 3), keepdim=True)
                if in_place:
                    grad_in = grad_normed.sub_(mean_grad).addcmul_(normed, mean_grad_normed, value=-1)
                else:
                    grad_in = (grad_normed - mean_grad).addcmul(normed, mean_grad_normed, value=-1)
            scale = invstd.to(grad_in.dtype)
            grad_in = grad_in.mul_(scale) if in_place else grad_in * scale
        if grad_invstd is not None:  # d invstd / dx = −invstd² · normed / (H·W)
            term = normed * (grad_invstd * invstd.square() / (out.shape[2] * out.shape[3])).to(normed.dtype)
            grad_in = -term if grad_in is None else grad_in - term
        return grad_in, None, None


def tracing() -> bool:
    """Whether the model is being traced or compiled (ONNX export, ``torch.compile``) rather than run eagerly."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def _vmapped(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is batched by ``torch.func.vmap`` (also ``jacfwd``, ``hessian``) in any of its functorch
    wrappers: a batched tensor has no channels-last copy (``empty_like`` raises), so the U-Net keeps NCHW there."""
    while torch._C._functorch.is_functorch_wrapped_tensor(tensor):
        if torch._C._functorch.is_batchedtensor(tensor):
            return True
        tensor = torch._C._functorch.get_unwrapped(tensor)
    return False


def instance_norm_leaky_relu(x: torch.Tensor, eps: float = 1e-5, negative_slope: float = 0.2) -> torch.Tensor:
    """Instance norm (no affine, biased variance) followed by LeakyReLU on ``(N, C, H, W)``.

    Equal to ``nn.LeakyReLU(negative_slope)(nn.InstanceNorm2d(C, eps=eps)(x))``. Eager mode uses
    :class:`InstanceNormLeakyReLU` (half the saved activations, any memory format); tracing / compiling uses the
    plain ops.

    Example:
        >>> x = torch.randn(2, 3, 5, 4)
        >>> ref = F.leaky_relu(F.instance_norm(x), 0.2)
        >>> bool(torch.allclose(instance_norm_leaky_relu(x), ref, atol=1e-6))
        True
    """
    if tracing():  # export / compile: plain ops (ONNX InstanceNormalization + LeakyRelu)
        return F.leaky_relu_(F.instance_norm(x, eps=eps), negative_slope)
    return InstanceNormLeakyReLU.apply(x, eps, negative_slope)[0]


class ConvBlock(nn.Module):
    """Two (3×3 conv → instance norm → LeakyReLU(0.2) → Dropout2d) stages; ``(N, in, H, W) → (N, out, H, W)``.

    ``layers`` holds the same modules as fastmri's ``ConvBlock`` (so parameter names match); the forward pass
    reads eps / slope from them and runs norm + activation fused.
    """

    def __init__(self, in_chans: int, out_chans: int, drop_prob: float):
        super().__init__()
        self.in_chans = in_chans
        self.out_chans = out_chans
        self.drop_prob = drop_prob
        self.layers = nn.Sequential(
            nn.Conv2d(in_chans, out_chans, kernel_size=3, padding=1, bias=False),
            nn.InstanceNorm2d(out_chans),
            nn.LeakyReLU(negative_slope=0.2, inplace=True),
            nn.Dropout2d(drop_prob),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            nn.InstanceNorm2d(out_chans),
            nn.LeakyReLU(negative_slope=0.2, inplace=True),
            nn.Dropout2d(drop_prob),
        )

    def _stage(self, x: torch.Tensor, first: int) -> torch.Tensor:
        """Norm + activation + dropout of the stage whose convolution output is ``x``."""
        norm, act, drop = self.layers[first + 1], self.layers[first + 2], self.layers[first + 3]
        return drop(instance_norm_leaky_relu(x, norm.eps, act.negative_slope))

    def forward(self, image: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the block; with ``skip`` given, the input is the channel concatenation ``[image, skip]``.

        Eager mode never builds the concatenation: the first convolution runs on each part with its slice of the
        weight. The ONNX export (TorchScript tracing) does concatenate: ONNX Runtime runs one convolution on the
        concatenation in its blocked NCHWc layout, ~3 % faster for the whole U-Net than the two summed ones
        (docs/benchmarks.md).
        """
        conv = self.layers[0]
        if skip is not None and torch.jit.is_tracing():
            image, skip = torch.cat((image, skip), dim=1), None
        if skip is None:
            x = conv(image)
        else:
            split = image.shape[1]
            x = F.conv2d(image, conv.weight[:, :split], padding=1) + F.conv2d(skip, conv.weight[:, split:], padding=1)
        x = self._stage(x, 0)
        return self._stage(self.layers[4](x), 4)


class TransposeConvBlock(nn.Module):
    """2×2 stride-2 transposed conv → instance norm → LeakyReLU(0.2); ``(N, in, H, W) → (N, out, 2H, 2W)``."""

    def __init__(self, in_chans: int, out_chans: int):
        super().__init__()
        self.in_chans = in_chans
        self.out_chans = out_chans
        self.layers = nn.Sequential(
            nn.ConvTranspose2d(in_chans, out_chans, kernel_size=2, stride=2, bias=False),
            nn.InstanceNorm2d(out_chans),
            nn.LeakyReLU(negative_slope=0.2, inplace=True),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        conv, norm, act = self.layers
        return instance_norm_leaky_relu(conv(image), norm.eps, act.negative_slope)


class Unet(nn.Module):
    """U-Net (Ronneberger et al. 2015) as in fastMRI: ``(N, in_chans, H, W) → (N, out_chans, H, W)``.

    Args:
        in_chans: input channels.
        out_chans: output channels.
        chans: channels of the first convolution (doubled at each pooling level).
        num_pool_layers: number of 2× down-/up-sampling levels.
        drop_prob: Dropout2d probability.

    Raises ValueError for a count below 1 (``num_pool_layers`` below 0).

    H, W ≥ 2**num_pool_layers run; keep them ≥ 2**(num_pool_layers + 1): at exactly 2**num_pool_layers the
    bottleneck is one pixel, which instance norm sets to zero, so it carries nothing (fastmri 0.3.0 refuses that
    size, in training and in eval mode); smaller ones raise ReconkitError. Odd sizes are handled as fastmri does (reflect pad of the upsampled features by one pixel on
    the right / bottom).

    Example:
        >>> net = Unet(1, 1, chans=4, num_pool_layers=2)
        >>> net(torch.randn(2, 1, 13, 10)).shape
        torch.Size([2, 1, 13, 10])
    """

    image_domain = True  # as a whole model it takes an image: export puts the zero-filled front end before it

    def __init__(
        self, in_chans: int, out_chans: int, chans: int = 32, num_pool_layers: int = 4, drop_prob: float = 0.0
    ):
        if min(in_chans, out_chans, chans) < 1 or num_pool_layers < 0:  # else built, and failed in forward
            raise ValueError(f"Unet: in_chans, out_chans and chans must be >= 1 and num_pool_layers >= 0; got "
                             f"{in_chans}, {out_chans}, {chans} and {num_pool_layers}")
        check_model_size("Unet", {"in_chans": in_chans, "out_chans": out_chans, "chans": chans,
                                  "num_pool_layers": num_pool_layers},
                         lambda: unet_weights(in_chans, out_chans, chans, num_pool_layers), pools=("num_pool_layers",))
        super().__init__()
        self.in_chans = in_chans
        self.out_chans = out_chans
        self.chans = chans
        self.num_pool_layers = num_pool_layers
        self.drop_prob = drop_prob

        self.down_sample_layers = nn.ModuleList([ConvBlock(in_chans, chans, drop_prob)])
        ch = chans
        for _ in range(num_pool_layers - 1):
            self.down_sample_layers.append(ConvBlock(ch, ch * 2, drop_prob))
            ch *= 2
        self.conv = ConvBlock(ch, ch * 2, drop_prob)

        self.up_conv = nn.ModuleList()
        self.up_transpose_conv = nn.ModuleList()
        for _ in range(num_pool_layers - 1):
            self.up_transpose_conv.append(TransposeConvBlock(ch * 2, ch))
            self.up_conv.append(ConvBlock(ch * 2, ch, drop_prob))
            ch //= 2
        self.up_transpose_conv.append(TransposeConvBlock(ch * 2, ch))
        self.up_conv.append(
            nn.Sequential(ConvBlock(ch * 2, ch, drop_prob), nn.Conv2d(ch, out_chans, kernel_size=1, stride=1))
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``(N, in_chans, H, W)`` → ``(N, out_chans, H, W)`` (contiguous).

        Eagerly on the CPU the activations run channels-last: oneDNN's NCHW kernels pad the channel axis to
        blocks of 16 (18 channels cost as much as 32), its channels-last kernels do not.

        Raises:
            ReconkitError: H or W is below ``2**num_pool_layers`` (pooling would leave no pixel).
        """
        height, width, smallest = image.shape[-2], image.shape[-1], 2**self.num_pool_layers
        if not tracing() and min(height, width) < smallest:
            raise ReconkitError(f"image: {height} × {width} is smaller than the U-Net's {smallest} × {smallest} "
                                f"minimum ({self.num_pool_layers} pooling levels)")  # fmt: skip
        stack = []
        channels_last = image.device.type == "cpu" and not tracing() and not _vmapped(image)
        output = image
        if channels_last:  # a copy with channels-last strides (a permuted view may only look channels-last when
            # its batch stride is ambiguous, and convolutions then fall back to NCHW)
            output = torch.empty_like(image, memory_format=torch.channels_last).copy_(image)
        for layer in self.down_sample_layers:
            output = layer(output)
            stack.append(output)
            output = F.avg_pool2d(output, kernel_size=2, stride=2, padding=0)
        output = self.conv(output)

        for transpose_conv, conv in zip(self.up_transpose_conv, self.up_conv):
            skip = stack.pop()
            output = transpose_conv(output)
            pad_right = skip.shape[-1] - output.shape[-1]
            pad_bottom = skip.shape[-2] - output.shape[-2]
            if pad_right or pad_bottom:  # static shapes: odd input sizes only
                output = F.pad(output, [0, pad_right, 0, pad_bottom], "reflect")
            if isinstance(conv, ConvBlock):
                output = conv(output, skip)
            else:  # last level: ConvBlock then the 1×1 output convolution
                output = conv[1](conv[0](output, skip))
        return output.contiguous() if channels_last else output


def unet_weights(in_chans: int, out_chans: int, chans: int, num_pool_layers: int) -> int:
    """The number of weights of ``Unet(in_chans, out_chans, chans, num_pool_layers)`` (and of the ``NormUnet``
    around it), from its layer sizes alone: what :mod:`reconkit.models.sizes` checks before building one.

    Example:
        >>> unet_weights(2, 2, 18, 4) == sum(p.numel() for p in Unet(2, 2, 18, 4).parameters())
        True
    """
    def conv_block(c_in: int, c_out: int) -> int:  # two 3 × 3 convolutions without bias
        return 9 * c_in * c_out + 9 * c_out * c_out

    def up_block(ch: int) -> int:  # a 2 × 2 transposed convolution without bias (2·ch → ch), then a conv block
        return 4 * 2 * ch * ch + conv_block(2 * ch, ch)

    weights, ch = conv_block(in_chans, chans), chans
    for _ in range(num_pool_layers - 1):
        weights, ch = weights + conv_block(ch, 2 * ch), 2 * ch
    weights += conv_block(ch, 2 * ch)
    for _ in range(num_pool_layers - 1):
        weights, ch = weights + up_block(ch), ch // 2
    return weights + up_block(ch) + ch * out_chans + out_chans  # the last with the final 1 × 1 convolution (bias)


class NormUnet(nn.Module):
    """U-Net on complex images with per-sample normalisation and padding to multiples of 16, as fastmri's.

    Input / output ``(B, C, H, W, 2)`` with ``2·C == in_chans``. Real and imaginary parts are stacked along the
    channel axis, normalised by the mean / (unbiased) std of all real resp. all imaginary values of each sample,
    zero-padded to multiples of 16, passed through :class:`Unet`, cropped and de-normalised.

    Example:
        >>> net = NormUnet(chans=4, num_pools=2)
        >>> net(torch.randn(1, 1, 21, 18, 2)).shape
        torch.Size([1, 1, 21, 18, 2])
    """

    def __init__(self, chans: int, num_pools: int, in_chans: int = 2, out_chans: int = 2, drop_prob: float = 0.0):
        """Raises ValueError unless ``in_chans == out_chans`` and both are even: they count the real and imaginary
        channels of the same complex images (the output is de-normalised with the input's statistics)."""
        if in_chans != out_chans or in_chans < 2 or in_chans % 2:
            raise ValueError("NormUnet: in_chans and out_chans must be equal, even and >= 2 (the real and imaginary "
                             f"channels of C complex images, in and out); got in_chans={in_chans}, "
                             f"out_chans={out_chans}")
        super().__init__()
        self.unet = Unet(in_chans=in_chans, out_chans=out_chans, chans=chans, num_pool_layers=num_pools,
                         drop_prob=drop_prob)

    @staticmethod
    def _pads(size: int) -> tuple[int, int]:
        """(before, after) zero padding bringing ``size`` to the next multiple of 16."""
        total = (((size - 1) | 15) + 1) - size
        return math.floor(total / 2), math.ceil(total / 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W, 2)`` complex images, ``2·C == in_chans`` → same shape.

        Raises:
            ValueError: ``x`` is not ``(B, C, H, W, 2)``, or ``2·C != in_chans`` (naming both counts).
        """
        if x.ndim != 5 or x.shape[-1] != 2:
            raise ValueError(f"NormUnet: expected (B, C, H, W, 2) complex images; got shape {tuple(x.shape)}")
        b, c, h, w, _ = x.shape
        x = self.forward_channels(x.permute(0, 4, 1, 2, 3).reshape(b, 2 * c, h, w))
        return x.reshape(b, 2, c, h, w).permute(0, 2, 3, 4, 1).contiguous()

    def forward_channels(self, x: torch.Tensor) -> torch.Tensor:
        """The same on the channel layout ``(B, 2·C, H, W)`` (C real channels, then C imaginary ones) → same shape;
        for callers that hold real and imaginary parts apart (the export path).

        Raises:
            ValueError: ``2·C != in_chans`` (naming both counts).
        """
        b, channels, h, w = x.shape
        if channels != self.unet.in_chans:  # else a convolution's RuntimeError deep in the U-Net (or a bad reshape)
            raise ValueError(f"NormUnet was built for in_chans={self.unet.in_chans} real channels "
                             f"({self.unet.in_chans / 2:g} complex); got {channels} ({channels / 2:g} complex)")
        grouped = x.reshape(b, 2, channels // 2 * h * w)
        std, mean = torch.std_mean(grouped, dim=2)
        mean, std = mean.view(b, 2, 1, 1, 1), std.view(b, 2, 1, 1, 1)
        x = ((x.view(b, 2, channels // 2, h, w) - mean) / std).view(b, channels, h, w)

        (top, bottom), (left, right) = self._pads(h), self._pads(w)
        x = self.unet(F.pad(x, [left, right, top, bottom]))
        x = x[..., top : top + h, left : left + w]
        return (x.reshape(b, 2, channels // 2, h, w) * std + mean).reshape(b, channels, h, w)
