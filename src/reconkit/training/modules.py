"""Per-model Lightning modules: every k-space model (VarNet, classical baselines) and the image-domain U-Net and
ViT.

Each module builds ``self.model`` with :func:`reconkit.models.build_model` from plain keyword arguments and
records ``model_type`` / ``model_kwargs`` so ``reconkit.models.load_model`` can rebuild it from the checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch

from reconkit.data.transforms import center_crop
from reconkit.errors import ConfigError
from reconkit.models import build_model, contract_model
from reconkit.training.base import Images, ReconModule


def batch_num_low_frequencies(num_low_frequencies: Any) -> int | None:
    """The collated ``num_low_frequencies`` of a batch as the model takes it: one int when every slice has the
    same count, else ``None`` (the model then finds each slice's ACS width from its mask)."""
    if not isinstance(num_low_frequencies, torch.Tensor):
        return num_low_frequencies
    values = num_low_frequencies.flatten().tolist()
    return int(values[0]) if values and all(v == values[0] for v in values) else None


class KspaceModule(ReconModule):
    """Any model with the k-space call ``model(masked_kspace (B,C,H,W,2), mask (B,1,1,W,1), num_low_frequencies)
    -> image (B, H, W)`` on ``VarNetDataTransform`` samples; the output is cropped to the target (or the
    header's recon size when there is no target).

    Use it directly to evaluate a registry model that has no trainable weights (``zero_filled``, ``cg_sense``):
    ``reconkit train test --config configs/varnet_sim_small.yaml --model reconkit.training.KspaceModule
    --model.model_type zero_filled``.
    """

    normalization = "none"

    def __init__(self, model_type: str = "varnet", model_kwargs: dict[str, Any] | None = None, **kwargs: Any):
        """
        Args:
            model_type: a name in ``reconkit.models``' registry.
            model_kwargs: keyword arguments for ``build_model(model_type, **model_kwargs)``.
            **kwargs: :class:`ReconModule` arguments (loss, lr, lr_scheduler, ...).
        """
        super().__init__(**kwargs)
        self.model_type = model_type
        self.model_kwargs = dict(model_kwargs or {})
        self.model = build_model(model_type, **self.model_kwargs)

    def setup(self, stage: str) -> None:
        """Refuse half-precision weights: the FFTs and data consistency run in float32 (the ops promote half input),
        so under ``bf16-true`` / ``16-true`` half weights would meet float32 activations."""
        refuse_half_weights(self, "keeps its FFTs in float32")

    def forward(self, masked_kspace, mask, num_low_frequencies=None):
        """``(B, C, H, W, 2)`` k-space and ``(B, 1, 1, W, 1)`` mask -> ``(B, H, W)`` magnitude image."""
        return self.model(masked_kspace, mask, num_low_frequencies)

    def images(self, batch: Any) -> Images:
        """Run the model on a :class:`~reconkit.data.VarNetSample` batch and return cropped magnitude images in
        target units; single-coil data runs as one coil (the VarNet's sensitivity map is then a phase map)."""
        output = self(*with_coil_axis(batch.masked_kspace, batch.mask),
                      batch_num_low_frequencies(batch.num_low_frequencies))
        return cropped_images(output, batch)


def refuse_half_weights(module: ReconModule, reason: str, alternative: str = "") -> None:
    """Raise a :class:`ConfigError` when ``module``'s trainer runs ``bf16-true`` / ``16-true`` (half-precision
    weights), which the float32 activations of ``reason`` would meet; ``alternative`` is a further way out."""
    precision = str(getattr(module.trainer, "precision", ""))
    if precision in ("bf16-true", "16-true"):
        raise ConfigError(f"--trainer.precision {precision}: {type(module).__name__} {reason}, so its weights cannot "
                          f"be half precision; use bf16-mixed or 16-mixed{alternative}")


def with_coil_axis(masked_kspace: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A single-coil batch (``(B, H, W, 2)`` k-space, ``(B, 1, W, 1)`` mask) as one coil of the multi-coil call
    ``(B, 1, H, W, 2)`` / ``(B, 1, 1, W, 1)``; a multi-coil batch as it is."""
    if masked_kspace.ndim == 4:
        return masked_kspace.unsqueeze(1), mask.unsqueeze(1)
    return masked_kspace, mask


def cropped_images(output: torch.Tensor, batch: Any) -> Images:
    """:class:`Images` of a full-size ``(B, H, W)`` output for a ``VarNetSample`` batch, output and target cropped to
    the target's size (or the header's recon size when there is no target)."""
    has_target = batch.target is not None and batch.target.ndim == 3
    if has_target:
        crop = tuple(batch.target.shape[-2:])
    else:
        crop = (int(batch.crop_size[0][0]), int(batch.crop_size[1][0]))
    crop = (min(crop[0], output.shape[-2]), min(crop[1], output.shape[-1]))  # FLAIR 203: recon > encoded
    return Images(
        output=center_crop(output, crop),
        target=center_crop(batch.target, crop) if has_target else None,
        max_value=batch.max_value,
        fname=list(batch.fname),
        slice_num=batch.slice_num,
    )


class VarNetModule(KspaceModule):
    """End-to-end VarNet (Sriram et al., MICCAI 2020) with fastMRI's defaults."""

    derived_hparams = ("model_type", "model_kwargs")

    def __init__(
        self,
        num_cascades: int = 12,
        chans: int = 18,
        pools: int = 4,
        sens_chans: int = 8,
        sens_pools: int = 4,
        checkpoint_cascades: bool = False,
        init_scale: float = 1.0,
        final_dc_iters: int = 0,
        final_dc_prior: float = 0.05,
        final_dc_maps: str = "acs",
        final_dc_wavelet: float = 0.0,
        **kwargs: Any,
    ):
        """
        Args:
            num_cascades: unrolled cascades (data consistency + refinement U-Net).
            chans: first-level channels of each cascade's U-Net.
            pools: down/up-sampling levels of each cascade's U-Net.
            sens_chans: first-level channels of the sensitivity-map U-Net.
            sens_pools: levels of the sensitivity-map U-Net.
            checkpoint_cascades: recompute cascade activations in the backward pass (activation checkpointing;
                less memory, ~30% more compute).
            init_scale: scale of each cascade's last convolution at initialisation (0.1 starts training close
                to plain data consistency, which helps short CPU runs; 1.0 is fastMRI's initialisation).
            final_dc_iters: iterations of the SENSE data-consistency step after the cascades
                (:mod:`reconkit.models.sense_refine`); 0: off, as fastMRI. Trained through when on.
            final_dc_prior: that step's ρ, the network image's relative error variance (smaller trusts the data
                more).
            final_dc_maps: that step's sensitivity maps, ``"acs"`` or ``"espirit"`` (ESPIRiT from MatMuls).
            final_dc_wavelet: κ of an L1-Haar term in that step (0: none; above 0 the step runs FISTA).
            **kwargs: :class:`ReconModule` arguments (loss, lr, lr_scheduler, ...).
        """
        if min(num_cascades, chans, pools, sens_chans, sens_pools) < 1:  # 0 cascades: no weight reaches the output
            raise ConfigError(f"VarNetModule: num_cascades, chans, pools, sens_chans and sens_pools must be >= 1; got "
                              f"{num_cascades}, {chans}, {pools}, {sens_chans}, {sens_pools}")
        model_kwargs = {"num_cascades": num_cascades, "chans": chans, "pools": pools, "sens_chans": sens_chans,
                            "sens_pools": sens_pools}
        if checkpoint_cascades:
            model_kwargs["checkpoint_cascades"] = True
        if init_scale != 1.0:  # only matters when the weights are initialised, kept for the record
            model_kwargs["init_scale"] = init_scale
        if final_dc_iters:
            model_kwargs.update(final_dc_iters=final_dc_iters, final_dc_prior=final_dc_prior,
                                final_dc_maps=final_dc_maps, final_dc_wavelet=final_dc_wavelet)
        super().__init__(model_type="varnet", model_kwargs=model_kwargs, **kwargs)


class ImageModule(ReconModule):
    """Any image-domain model; subclasses build it (:class:`UnetModule`, :class:`VitModule`). Two data transforms:

    * ``--data.transform unet`` (fastMRI's U-Net recipe, ``UnetDataTransform``): the zero-filled RSS image cropped
      to the recon size and instance-normalised by the crop's statistics; outputs are de-normalised
      (``* std + mean``) before loss and metrics.
    * ``--data.transform varnet``: masked k-space through :class:`reconkit.models.ZeroFilledFrontEnd`, the same
      call that ``reconkit reconstruct``, the ONNX export and the server run (full encoded image, its statistics),
      then cropped like a k-space model's output. Train this way for a model you will deploy: it sees in training
      exactly what it sees in use, at the cost of running on the full encoded image.
    """

    normalization = "instance"
    derived_hparams = ("model_type", "model_kwargs")

    def __init__(self, model_type: str, model_kwargs: dict[str, Any], **kwargs: Any):
        super().__init__(**kwargs)
        self.model_type = model_type
        self.model_kwargs = model_kwargs
        self.model = build_model(self.model_type, **self.model_kwargs)

    def setup(self, stage: str) -> None:
        """Refuse half-precision weights behind the zero-filled front end (``data.transform varnet``): its FFTs give
        float32 images (fastMRI's recipe, ``data.transform unet``, feeds the model the batch's own image)."""
        if getattr(getattr(self.trainer, "datamodule", None), "transform", None) == "varnet":
            refuse_half_weights(self, "runs behind the zero-filled front end (data.transform varnet), whose FFTs "
                                "give float32 images", " (or data.transform unet)")

    def forward(self, image):
        """``(B, h, w)`` normalised image -> ``(B, h, w)`` normalised reconstruction."""
        return self.model(image.unsqueeze(1)).squeeze(1)

    def images(self, batch: Any) -> Images:
        if hasattr(batch, "masked_kspace"):  # VarNetSample: the deployed contract, front end included
            return cropped_images(contract_model(self.model)(*with_coil_axis(batch.masked_kspace, batch.mask)), batch)
        mean = batch.mean.view(-1, 1, 1)
        std = batch.std.view(-1, 1, 1)
        has_target = batch.target is not None and batch.target.ndim == 3
        return Images(
            output=self(batch.image) * std + mean,
            target=batch.target * std + mean if has_target else None,
            max_value=batch.max_value,
            fname=list(batch.fname),
            slice_num=batch.slice_num,
        )


class UnetModule(ImageModule):
    """Image-domain U-Net (Ronneberger et al.), fastMRI's U-Net baseline (:class:`ImageModule`)."""

    def __init__(self, in_chans: int = 1, out_chans: int = 1, chans: int = 32, num_pool_layers: int = 4,
                 drop_prob: float = 0.0, **kwargs: Any):
        """
        Args:
            in_chans / out_chans: image channels (1 for magnitude).
            chans: first-level channels; num_pool_layers: down/up-sampling levels; drop_prob: dropout.
            **kwargs: :class:`ReconModule` arguments (loss, lr, lr_scheduler, ...).
        """
        super().__init__("unet", {"in_chans": in_chans, "out_chans": out_chans, "chans": chans,
                                  "num_pool_layers": num_pool_layers, "drop_prob": drop_prob}, **kwargs)


class VitModule(ImageModule):
    """Image-domain vision transformer baseline (Lin & Heckel 2022, :class:`reconkit.models.VisionTransformer`)."""

    def __init__(self, patch_size: int = 10, embed_dim: int = 128, depth: int = 6, num_heads: int = 8,
                 mlp_ratio: float = 4.0, residual: bool = True, **kwargs: Any):
        """
        Args:
            patch_size: side of the square patches that become tokens (pixels).
            embed_dim / num_heads / depth / mlp_ratio: token width, attention heads, blocks, MLP width ratio.
            residual: the model predicts a correction to the zero-filled image (starts as the identity).
            **kwargs: :class:`ReconModule` arguments (loss, lr, lr_scheduler, ...).
        """
        super().__init__("vit", {"in_chans": 1, "out_chans": 1, "patch_size": patch_size, "embed_dim": embed_dim,
                                 "depth": depth, "num_heads": num_heads, "mlp_ratio": mlp_ratio,
                                 "residual": residual}, **kwargs)
