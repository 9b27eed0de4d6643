"""End-to-end variational network (Sriram et al. 2020), state_dict-compatible with ``fastmri.models.VarNet``.

Parameter names equal fastmri's (``sens_net.norm_unet.unet.*``, ``cascades.<i>.model.unet.*``,
``cascades.<i>.dc_weight``): a fastmri state_dict loads unchanged and, with the same hyper-parameters, gives the
same image. The forward pass is export-friendly: the low-frequency (ACS) width is computed from the mask with
tensor ops only, all padding comes from static shapes, no complex dtypes are used, and every FFT / coil operation
goes through :mod:`reconkit.ops` (so ``with reconkit.ops.fft_impl("matmul")`` swaps the FFT).

For Cartesian line masks ``(B, 1, 1, W, 1)`` the cascades run in hybrid space (k-space after the inverse FFT along
the readout H, see :mod:`reconkit.ops.coils`): the mask is constant along H, so every cascade is the same operator
with 1D FFTs along W instead of 2D FFTs, half the FFT work. 2D masks, and the fused Triton kernels on GPU (which
work in k-space), keep the k-space form. Both give the same result up to float round-off.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from reconkit.models.classical import estimate_sens_maps_acs
from reconkit.models.contract import check_float_weights
from reconkit.models.espirit_poly import estimate_sens_maps_espirit_poly
from reconkit.models.sense_refine import refine_kspace, refine_planar, refine_stacked
from reconkit.models.sizes import check_model_size
from reconkit.models.unet import NormUnet, tracing, unet_weights
from reconkit.ops import (
    current_fft_impl,
    data_consistency,
    fftc,
    ifft2c,
    ifftc,
    pair_factor,
    planar_sens_expand,
    planar_sens_reduce,
    power_of_two_scale,
    resolve_backend,
    rss_complex,
    sens_expand,
    sens_reduce,
    stacked_sens_expand,
    stacked_sens_reduce,
)
from reconkit.ops.dft_matmul import (
    centred_fft_matmul_planar,
    stacked_ifft_w,
    to_stacked_kspace,
)
from reconkit.ops.fft import check_tensors

__all__ = ["STEP_MAPS", "SensitivityModel", "VarNet", "VarNetBlock", "low_frequency_window"]

# sensitivity-map estimators the SENSE step after the cascades can use (VarNet(final_dc_maps=...))
STEP_MAPS = {"acs": estimate_sens_maps_acs, "espirit": estimate_sens_maps_espirit_poly}


def _leading_ones(mask_lines: torch.Tensor) -> torch.Tensor:
    """Per row of a ``(B, N)`` 0/1 tensor, the number of consecutive ones from index 0, or 0 if all are ones.

    The "0 if all ones" case reproduces fastmri's ``argmin`` (which returns index 0 for an all-ones row).
    Computed with a cumulative sum, no argmin / data-dependent branching.
    """
    count = (torch.cumsum(1 - mask_lines, dim=1) == 0).sum(dim=1)
    return torch.where(count == mask_lines.shape[1], torch.zeros_like(count), count)


def low_frequency_window(
    mask: torch.Tensor, num_low_frequencies: int | torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Start column and width of the fully sampled centre (ACS) of a line mask, per batch item.

    Args:
        mask: ``(B, 1, 1, W, 1)`` (or ``(B, 1, H, W, 1)``: its first row is used, as fastmri does) 0/1 or bool.
        num_low_frequencies: known ACS width — an int, or a tensor of one width per batch item ``(B,)`` (a 0
            entry is measured); ``None`` or 0 measures it: twice the shorter run of sampled lines going out from
            column ``W // 2`` (at least 1), exactly as ``fastmri.models.varnet.SensitivityModel``.

    Returns:
        ``(pad, num_low_freqs)``, both ``(B,)`` int64; the window is columns ``[pad, pad + num_low_freqs)``.

    Example:
        >>> mask = torch.zeros(2, 1, 1, 10, 1); mask[..., 3:8, :] = 1; mask[..., 0, :] = 1
        >>> low_frequency_window(mask)
        (tensor([3, 3]), tensor([4, 4]))
        >>> low_frequency_window(mask, torch.tensor([2, 0]))
        (tensor([4, 3]), tensor([2, 4]))
    """
    width = mask.shape[-2]
    if isinstance(num_low_frequencies, torch.Tensor):
        given = num_low_frequencies.to(device=mask.device, dtype=torch.long).reshape(-1).expand(mask.shape[0])
        num_low = torch.where(given > 0, given, _measured_low_frequencies(mask))
    elif num_low_frequencies:
        num_low = torch.full((mask.shape[0],), int(num_low_frequencies), dtype=torch.long, device=mask.device)
    else:
        num_low = _measured_low_frequencies(mask)
    return (width - num_low + 1) // 2, num_low


def _measured_low_frequencies(mask: torch.Tensor) -> torch.Tensor:
    """ACS width ``(B,)`` measured from a line mask as fastmri does (see :func:`low_frequency_window`)."""
    lines = (mask[:, 0, 0, :, 0] != 0).to(torch.int32)
    cent = mask.shape[-2] // 2
    left = _leading_ones(lines[:, :cent].flip(1))
    right = _leading_ones(lines[:, cent:])
    return torch.clamp(2 * torch.minimum(left, right), min=1).to(torch.long)


class SensitivityModel(nn.Module):
    """Learned coil sensitivities: centre of k-space → per-coil image → :class:`NormUnet` → divide by RSS.

    Args:
        chans, num_pools, in_chans, out_chans, drop_prob: of the :class:`NormUnet` (applied coil by coil, so
            ``in_chans`` and ``out_chans`` must be 2, one complex image: as fastmri's, whose other values fail in
            forward; ValueError otherwise).
        mask_center: keep only the low-frequency window of k-space before estimating (fastmri's default).
    """

    def __init__(
        self,
        chans: int,
        num_pools: int,
        in_chans: int = 2,
        out_chans: int = 2,
        drop_prob: float = 0.0,
        mask_center: bool = True,
    ):
        if (in_chans, out_chans) != (2, 2):
            raise ValueError(f"SensitivityModel runs its NormUnet coil by coil, one complex image (2 channels) in and "
                             f"out; got in_chans={in_chans}, out_chans={out_chans}")
        super().__init__()
        self.mask_center = mask_center
        self.norm_unet = NormUnet(chans, num_pools, in_chans=in_chans, out_chans=out_chans, drop_prob=drop_prob)

    def _acs_window(self, mask: torch.Tensor, num_low_frequencies, width: int) -> torch.Tensor:
        """``(B, W)`` bool: the columns of the low-frequency (ACS) window of ``mask``."""
        pad, num_low = low_frequency_window(mask, num_low_frequencies)
        columns = torch.arange(width, device=mask.device)
        return (columns >= pad[:, None]) & (columns < (pad + num_low)[:, None])

    def forward(
        self, masked_kspace: torch.Tensor, mask: torch.Tensor, num_low_frequencies: int | torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(B, C, H, W, 2)`` k-space, ``(B, 1, 1, W, 1)`` mask → ``(B, C, H, W, 2)`` maps with unit RSS."""
        _check_inputs(masked_kspace, mask, "SensitivityModel")
        if self.mask_center:
            keep = self._acs_window(mask, num_low_frequencies, masked_kspace.shape[-2])
            masked_kspace = masked_kspace * pair_factor(keep[:, None, None, :, None].to(masked_kspace.dtype))

        images = ifft2c(masked_kspace)
        b, c, h, w, _ = images.shape
        coil_images = images.reshape(b * c, 1, h, w, 2)
        if tracing():  # export / compile: one batched U-Net call (the coil count stays a graph dimension)
            sens_maps = self.norm_unet(coil_images)
        else:  # eager: coil by coil (identical result; smaller tensors and batch-of-one norm kernels, faster)
            sens_maps = torch.cat([self.norm_unet(image) for image in coil_images.split(1)])
        sens_maps = sens_maps.reshape(b, c, h, w, 2)
        return sens_maps / pair_factor(rss_complex(sens_maps, dim=1)[:, None, :, :, None])

    def forward_planar(
        self,
        parts: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        num_low_frequencies: int | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Export path: :meth:`forward` on planar k-space parts ``(B, C, H, W)`` (MatMul FFT, one batched U-Net
        call) → planar map parts; no ``(..., 2)`` pairing of C-coil tensors."""
        re, im = parts
        b, c, h, w = re.shape
        if self.mask_center:
            keep = self._acs_window(mask, num_low_frequencies, w)[:, None, None, :].to(re.dtype)
            re, im = re * keep, im * keep
        re, im = centred_fft_matmul_planar(re, im, inverse=True)
        channels = torch.stack((re, im), dim=2).reshape(b * c, 2, h, w)  # each coil: (real, imag) channels
        maps = self.norm_unet.forward_channels(channels).reshape(b, c, 2, h, w)
        re, im = maps[:, :, 0], maps[:, :, 1]
        rss = torch.sqrt((re * re + im * im).sum(dim=1, keepdim=True))
        return re / rss, im / rss

    def forward_stacked(
        self, hybrid: torch.Tensor, mask: torch.Tensor, num_low_frequencies: int | torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Export path, line masks: hybrid-space coil data in the stacked k layout ``(P, 2, f_m, B, C, H)`` (see
        :func:`reconkit.ops.dft_matmul.stacked_fft_w`) → the stacked maps ``[S_re; S_im]`` and ``[−S_im; S_re]``,
        each ``(2, W, B, C, H)``. The ACS window acts along W only, so ``ifft2c(k·window)`` is the W transform of
        the hybrid data times the window: no second H transform."""
        outer, _, last, b, c, h = hybrid.shape
        width = outer * last
        if self.mask_center:
            keep = self._acs_window(mask, num_low_frequencies, width).to(hybrid.dtype)
            hybrid = hybrid * to_stacked_kspace(keep[None])[..., None, None]
        images = stacked_ifft_w(hybrid)  # (2, W, B, C, H)
        channels = images.permute(2, 3, 0, 4, 1).reshape(b * c, 2, h, width)  # each coil: (real, imag) channels
        maps = self.norm_unet.forward_channels(channels).reshape(b, c, 2, h, width).permute(2, 4, 0, 1, 3)
        maps = maps / torch.sqrt((maps * maps).sum(dim=(0, 3), keepdim=True))
        return maps, torch.stack((-maps[1], maps[0]))


def _check_inputs(masked_kspace: torch.Tensor, mask: torch.Tensor, name: str = "VarNet") -> None:
    """ValueError naming ``name`` (the model called) for k-space not ``(B, C, H, W, 2)`` or a mask not of its size
    (TypeError for arguments that are not tensors)."""
    check_tensors(name, masked_kspace, mask)
    if masked_kspace.ndim != 5 or masked_kspace.shape[-1] != 2:
        raise ValueError(f"{name}: masked_kspace must be (B, C, H, W, 2); got shape {tuple(masked_kspace.shape)}")
    batch, coils, height, width, _ = masked_kspace.shape
    if coils == 0:
        raise ValueError(f"{name}: masked_kspace has no coils (C = 0 in (B, C, H, W, 2) = "
                         f"{tuple(masked_kspace.shape)})")
    # a mask of one column, e.g. (B, 1, 1, 1, 1) for "all sampled", broadcasts in the data consistency, but the
    # ACS window measured on it is column 0 of k-space (fastmri fails on it)
    if mask.ndim != 5 or mask.shape[-2] != width or mask.shape[-3] not in (1, height) or mask.shape[0] not in (1, batch):
        raise ValueError(f"{name}: mask must be (B, 1, 1, W, 1) or (B, 1, H, W, 1) with (H, W) = ({height}, {width}) "
                         f"of masked_kspace; got shape {tuple(mask.shape)}")


class VarNetBlock(nn.Module):
    """One cascade: ``k − η·M(k − k₀) − E(R(Eᴴ k))`` with E = sens_expand, R the regulariser.

    Args:
        model: image-domain regulariser ``(B, 1, H, W, 2) → (B, 1, H, W, 2)`` (a :class:`NormUnet`).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.dc_weight = nn.Parameter(torch.ones(1))

    def forward(
        self,
        current_kspace: torch.Tensor,
        ref_kspace: torch.Tensor,
        mask: torch.Tensor,
        sens_maps: torch.Tensor,
        hybrid: bool = False,
    ) -> torch.Tensor:
        """All k-space / maps ``(B, C, H, W, 2)``, mask ``(B, 1, 1, W, 1)`` (or 2D ``(B, 1, H, W, 1)``) → updated
        ``(B, C, H, W, 2)``.

        ``hybrid=True``: ``current_kspace`` / ``ref_kspace`` / the result are in hybrid space (line masks only).
        """
        image = sens_reduce(current_kspace, sens_maps, hybrid=hybrid)
        model_term = sens_expand(self.model(image), sens_maps, hybrid=hybrid)
        return data_consistency(current_kspace, ref_kspace, mask, self.dc_weight) - model_term

    def forward_planar(
        self,
        parts: tuple[torch.Tensor, torch.Tensor],
        ref_parts: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        map_parts: tuple[torch.Tensor, torch.Tensor],
        dims: tuple[int, ...],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Export path: the same cascade on planar (real, imag) parts, each ``(B, C, H, W)``; ``mask``
        ``(B, 1, 1, W)`` or ``(B, 1, H, W)``; FFTs along ``dims`` (``(-1,)`` in hybrid space). MatMul FFT only."""
        image_re, image_im = planar_sens_reduce(*parts, *map_parts, dims)
        refined = self.model(torch.stack((image_re, image_im), dim=-1))  # one-coil image: cheap to pair
        model_re, model_im = planar_sens_expand(refined[..., 0], refined[..., 1], *map_parts, dims)
        weight = mask * self.dc_weight
        (re, im), (ref_re, ref_im) = parts, ref_parts
        return re - (re - ref_re) * weight - model_re, im - (im - ref_im) * weight - model_im

    def forward_stacked(
        self, kspace: torch.Tensor, masked_ref: torch.Tensor, mask: torch.Tensor, maps: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """Export path, line masks: the cascade in hybrid space on the stacked W-major layout
        (:func:`reconkit.ops.dft_matmul.stacked_fft_w`).

        Args:
            kspace: ``(P, 2, f_m, B, C, H)`` hybrid-space coil data, stacked k layout.
            masked_ref: ``mask · reference`` in the same layout (the measured data, hence ``k − η·M(k − k₀) =
                k·(1 − η·M) + η·M·k₀``).
            mask: ``(P, 1, f_m, B, 1, 1)`` line mask in the same order.
            maps: ``(2, W, B, C, H)`` stacked sensitivities ``[S_re; S_im]`` and ``[−S_im; S_re]``.
        """
        image = stacked_sens_reduce(kspace, maps)  # (2, W, B, H)
        refined = self.model.forward_channels(image.permute(2, 0, 3, 1))  # (B, 2, H, W): one coil, cheap to move
        model_term = stacked_sens_expand(refined.permute(1, 3, 0, 2).unsqueeze(3), maps)  # F(S·x)
        return kspace * (1 - self.dc_weight * mask) + self.dc_weight * masked_ref - model_term


class VarNet(nn.Module):
    """E2E-VarNet: learned sensitivities, then ``num_cascades`` unrolled :class:`VarNetBlock` s.

    Args:
        num_cascades: number of unrolled cascades.
        sens_chans, sens_pools: U-Net channels / pooling levels of the sensitivity network.
        chans, pools: U-Net channels / pooling levels of each cascade's regulariser.
        mask_center: restrict the sensitivity estimate to the low-frequency window (as fastmri).
        drop_prob: Dropout2d probability inside all U-Nets (fastmri: 0).
        checkpoint_cascades: in training, recompute each cascade's activations in the backward pass instead of
            storing them (activation checkpointing; less memory, about one extra forward pass of compute).
        init_scale: multiplies the initial weights and bias of each cascade U-Net's final 1×1 convolution, so a
            value < 1 starts training closer to plain data consistency; 1.0 leaves PyTorch's default init
            (as fastmri). Only affects initialisation, not loading.
        final_dc_iters: after the cascades, this many iterations (conjugate gradient, or FISTA with
            ``final_dc_wavelet``) of a SENSE data-consistency step with a noise-adaptive weight
            (:mod:`reconkit.models.sense_refine`): the cascades' k-space, corrected towards the measured data where
            the coils determine it. 0 (the default, as
            fastmri): off. It has no weights, so it can be switched on for a trained model.
        final_dc_prior: ``ρ`` of that step, the network image's relative error variance: smaller trusts the data
            more.
        final_dc_maps: the step's sensitivity maps: ``"acs"`` (low-pass ACS coil images over their RSS, as
            CG-SENSE) or ``"espirit"`` (:func:`reconkit.models.espirit_poly.estimate_sens_maps_espirit_poly`,
            ESPIRiT from MatMuls, exportable; far more accurate where the object has edges, about 0.07 s per slice
            at 8 coils).
        final_dc_wavelet: ``κ`` of an optional L1 term on the step's image in an orthonormal 4-level Haar basis
            (cycle-spun), threshold ``κ · σ̂`` with ``σ̂`` the noise level the step estimates; the step then runs
            ``final_dc_iters`` FISTA iterations instead of CG. 0 (the default): no such term.

    ``forward(masked_kspace (B, C, H, W, 2), mask (B, 1, 1, W, 1), num_low_frequencies=None) -> (B, H, W)``:
    root-sum-of-squares magnitude at the full encoded size. ``mask`` may be of any dtype: nonzero = sampled (as
    fastmri's), so a 0/255 mask acts as 0/1; a 2D mask ``(B, 1, H, W, 1)`` works too (the cascades then run in
    k-space instead of hybrid space).

    Example:
        >>> net = VarNet(num_cascades=2, sens_chans=2, sens_pools=2, chans=2, pools=2)
        >>> mask = torch.zeros(1, 1, 1, 24, 1); mask[..., 8:16, :] = 1
        >>> net(torch.randn(1, 3, 20, 24, 2) * mask, mask).shape
        torch.Size([1, 20, 24])
    """

    def __init__(
        self,
        num_cascades: int = 12,
        sens_chans: int = 8,
        sens_pools: int = 4,
        chans: int = 18,
        pools: int = 4,
        mask_center: bool = True,
        drop_prob: float = 0.0,
        checkpoint_cascades: bool = False,
        init_scale: float = 1.0,
        final_dc_iters: int = 0,
        final_dc_prior: float = 0.05,
        final_dc_maps: str = "acs",
        final_dc_wavelet: float = 0.0,
    ):
        super().__init__()
        # NaN passed the plain comparisons (a NaN prior or wavelet weight made every image NaN)
        if not (final_dc_iters >= 0 and 0 < final_dc_prior < math.inf and 0 <= final_dc_wavelet < math.inf):
            raise ValueError(f"VarNet: final_dc_iters must be >= 0, final_dc_prior > 0 and final_dc_wavelet >= 0 "
                             f"(finite numbers); "
                             f"got {final_dc_iters}, {final_dc_prior}, {final_dc_wavelet}")
        if final_dc_maps not in STEP_MAPS:
            raise ValueError(f"VarNet: final_dc_maps must be one of {sorted(STEP_MAPS)}; got {final_dc_maps!r}")
        check_model_size("VarNet", {"num_cascades": num_cascades, "chans": chans, "pools": pools,
                                    "sens_chans": sens_chans, "sens_pools": sens_pools},
                         lambda: unet_weights(2, 2, sens_chans, sens_pools) + num_cascades * (unet_weights(2, 2, chans, pools) + 1),
                         repeats=("num_cascades",), pools=("pools", "sens_pools"))
        self.checkpoint_cascades = checkpoint_cascades
        self.final_dc_iters, self.final_dc_prior = int(final_dc_iters), float(final_dc_prior)
        self.final_dc_maps, self.final_dc_wavelet = final_dc_maps, float(final_dc_wavelet)
        self.sens_net = SensitivityModel(chans=sens_chans, num_pools=sens_pools, drop_prob=drop_prob,
                                         mask_center=mask_center)
        self.cascades = nn.ModuleList(
            [VarNetBlock(NormUnet(chans, pools, drop_prob=drop_prob)) for _ in range(num_cascades)]
        )
        if init_scale != 1.0:
            with torch.no_grad():
                for cascade in self.cascades:
                    final_conv = cascade.model.unet.up_conv[-1][1]
                    final_conv.weight.mul_(init_scale)
                    final_conv.bias.mul_(init_scale)

    def forward(
        self, masked_kspace: torch.Tensor, mask: torch.Tensor, num_low_frequencies: int | torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(B, C, H, W, 2)`` undersampled k-space, ``(B, 1, 1, W, 1)`` line mask (or 2D ``(B, 1, H, W, 1)``) →
        ``(B, H, W)`` image.

        The network is equivariant to the k-space's scale (every U-Net input is normalised by its mean / std, the
        sensitivities have unit RSS, the SENSE step's weights are ratios), so each item runs divided by the power of
        two at its peak (:func:`reconkit.ops.power_of_two_scale`) and its image is multiplied back: the same image,
        exactly, for k-space in any units; at the raw scale float32 sums of squares over- or underflow outside
        about 1e-9 ... 1e12 (NaN images). Weights float32 or float64 (TypeError for half precision; mixed precision
        is ``torch.autocast``)."""
        _check_inputs(masked_kspace, mask)
        check_float_weights(self, "VarNet")
        mask = mask != 0  # every nonzero value sampled, as fastmri's torch.where(mask, ...) and the ACS window
        scale = power_of_two_scale(masked_kspace)
        masked_kspace = masked_kspace / scale
        if current_fft_impl() == "matmul":
            return self._export_forward(masked_kspace, mask, num_low_frequencies) * scale.view(-1, 1, 1)
        prediction, hybrid, reference = self._cascades(masked_kspace, mask, num_low_frequencies)
        if self.final_dc_iters:
            maps = self._step_maps(masked_kspace, mask, num_low_frequencies)
            prediction = refine_kspace(prediction, reference, mask.to(prediction.dtype), maps, hybrid,
                                       self.final_dc_iters, self.final_dc_prior, self.final_dc_wavelet)
        coil_images = ifftc(prediction, (-1,)) if hybrid else ifft2c(prediction)
        return rss_complex(coil_images, dim=1) * scale.view(-1, 1, 1)

    def _step_maps(self, masked_kspace: torch.Tensor, mask: torch.Tensor, num_low_frequencies) -> torch.Tensor:
        """Sensitivity maps ``(B, C, H, W, 2)`` for the ``final_dc_iters`` step (``final_dc_maps``)."""
        given = num_low_frequencies if isinstance(num_low_frequencies, int) and num_low_frequencies > 0 else None
        return STEP_MAPS[self.final_dc_maps](masked_kspace, mask.to(masked_kspace.dtype), given)

    def predict_kspace(
        self, masked_kspace: torch.Tensor, mask: torch.Tensor, num_low_frequencies: int | torch.Tensor | None = None
    ) -> torch.Tensor:
        """The cascades' multi-coil k-space prediction ``(B, C, H, W, 2)`` (what :meth:`forward` takes the RSS image
        of, before any ``final_dc_iters`` step); self-supervised losses score it directly in k-space. Arguments as
        :meth:`forward`, and run at the same power-of-two scale (k-space in any units)."""
        _check_inputs(masked_kspace, mask)
        check_float_weights(self, "VarNet")
        mask = mask != 0  # every nonzero value sampled, as fastmri's torch.where(mask, ...) and the ACS window
        scale = power_of_two_scale(masked_kspace).view(-1, 1, 1, 1, 1)
        prediction, hybrid, _ = self._cascades(masked_kspace / scale, mask, num_low_frequencies)
        return (fftc(prediction, (-2,)) if hybrid else prediction) * scale

    def _export_forward(
        self, masked_kspace: torch.Tensor, mask: torch.Tensor, num_low_frequencies: int | torch.Tensor | None
    ) -> torch.Tensor:
        """:meth:`forward` on the export path (``fft_impl("matmul")``): the coil data stay planar (real, imag) from
        the first FFT to the RSS, so ONNX Runtime never pairs / unpairs a C-coil tensor between cascades."""
        mask = mask.to(masked_kspace.dtype)
        parts = masked_kspace[..., 0], masked_kspace[..., 1]
        if mask.shape[-3] == 1:  # line mask: hybrid space, the stacked W-major cascades
            hybrid_parts = centred_fft_matmul_planar(*parts, inverse=True, dims=(-2,))
            return self._stacked_forward(masked_kspace, hybrid_parts, mask, num_low_frequencies)
        map_parts = self.sens_net.forward_planar(parts, mask, num_low_frequencies)
        reference = parts
        for cascade in self.cascades:
            parts = cascade.forward_planar(parts, reference, mask[..., 0], map_parts, (-2, -1))
        if self.final_dc_iters:
            maps = self._step_maps(masked_kspace, mask, num_low_frequencies)
            parts = refine_planar(parts, reference, mask[..., 0], (maps[..., 0], maps[..., 1]), (-2, -1),
                                  self.final_dc_iters, self.final_dc_prior, self.final_dc_wavelet)
        re, im = centred_fft_matmul_planar(*parts, inverse=True)
        return torch.sqrt((re * re + im * im).sum(dim=1))

    def _stacked_forward(
        self, masked_kspace: torch.Tensor, parts: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
        num_low_frequencies: int | torch.Tensor | None,
    ) -> torch.Tensor:
        """Export path, line mask: hybrid-space planar parts ``(B, C, H, W)`` → RSS image ``(B, H, W)``, the
        sensitivities and cascades on the stacked W-major layout (each W transform two large real MatMuls;
        docs/export.md)."""
        reference = to_stacked_kspace(torch.stack(parts))  # (P, 2, f_m, B, C, H)
        maps = self.sens_net.forward_stacked(reference, mask, num_low_frequencies)
        line = to_stacked_kspace(mask[:, 0, 0, :, 0][None])[..., None, None]  # (P, 1, f_m, B, 1, 1)
        masked_ref = reference * line
        kspace = reference
        for cascade in self.cascades:
            kspace = cascade.forward_stacked(kspace, masked_ref, line, maps)
        if self.final_dc_iters:
            maps = self._step_maps(masked_kspace, mask, num_low_frequencies).permute(4, 3, 0, 1, 2)  # (2, W, B, C, H)
            kspace = refine_stacked(kspace, masked_ref, line, (maps, torch.stack((-maps[1], maps[0]))),
                                    self.final_dc_iters, self.final_dc_prior, self.final_dc_wavelet)
        coils = stacked_ifft_w(kspace)  # (2, W, B, C, H)
        return torch.sqrt((coils * coils).sum(dim=(0, 3))).permute(1, 2, 0)

    def _cascades(
        self, masked_kspace: torch.Tensor, mask: torch.Tensor, num_low_frequencies: int | torch.Tensor | None
    ) -> tuple[torch.Tensor, bool, torch.Tensor]:
        """Sensitivities, then the cascades: ``(prediction (B, C, H, W, 2), hybrid, reference)``, the
        prediction and the measured data ``reference`` in hybrid space when ``hybrid`` (line mask, torch backend),
        else in k-space. (Inputs checked by the public callers.)"""
        mask = mask.to(masked_kspace.dtype)
        sens_maps = self.sens_net(masked_kspace, mask, num_low_frequencies)
        hybrid = mask.shape[-3] == 1 and resolve_backend(None, masked_kspace, sens_maps) == "torch"
        reference = ifftc(masked_kspace, (-2,)) if hybrid else masked_kspace
        use_checkpoint = self.checkpoint_cascades and self.training and torch.is_grad_enabled()
        prediction = reference
        for cascade in self.cascades:
            if use_checkpoint:
                prediction = checkpoint(cascade, prediction, reference, mask, sens_maps, hybrid, use_reentrant=False)
            else:
                prediction = cascade(prediction, reference, mask, sens_maps, hybrid)
        return prediction, hybrid, reference
