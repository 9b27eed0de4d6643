"""The reconstruction contract ``(masked_kspace, mask) -> image`` for every registered model.

k-space models (VarNet, the classical baselines) take it as they are. Image-domain models (``image_domain = True``
on the class: the U-Net, the ViT) take an image, so :func:`contract_model` puts :class:`ZeroFilledFrontEnd` in
front of them; the ONNX exporter, ``reconkit reconstruct`` and the service all call models this way.
"""

from __future__ import annotations

import torch

from reconkit.models.classical import _check_inputs, zero_filled
from reconkit.ops import power_of_two_scale

__all__ = ["ZeroFilledFrontEnd", "check_float_weights", "contract_model"]


def check_float_weights(model: torch.nn.Module, name: str) -> None:
    """TypeError naming ``name`` for a model with float16 / bfloat16 weights (``model.half()``): its FFTs give
    float32 activations, which half-precision weights cannot take ('expected scalar type Float but found
    BFloat16' from deep inside otherwise). Mixed precision keeps float32 weights under ``torch.autocast``."""
    dtype = next((p.dtype for p in model.parameters()), None)
    if dtype in (torch.float16, torch.bfloat16):
        raise TypeError(f"{name}: its weights are {dtype}, but its FFTs run in float32 and give float32 activations; "
                        "keep the weights float32 (model.float()) and run it under torch.autocast for mixed "
                        "precision")


class ZeroFilledFrontEnd(torch.nn.Module):
    """Contract call ``(masked_kspace, mask) -> image`` for an image-domain model (the U-Net, the ViT).

    As ``reconkit.data.UnetDataTransform`` (and fastmri's): zero-filled RSS image, normalised per batch item by its
    mean and unbiased standard deviation (eps 1e-11), clamped to ±6, through the model, de-normalised. Unlike the
    transform it works on the full encoded size (the contract crops outside the model), so the statistics come
    from the whole image rather than the recon-size crop. And it runs on the k-space divided by the power of two at
    its peak (:func:`reconkit.ops.power_of_two_scale`), the image multiplied back: so the eps (absolute in the
    transform, where it is 1e-6 of a fastMRI image's std) stays negligible for k-space in any units (at the raw
    scale it swamped the std for k-space peaks below about 1e-11, 10 % off at 1e-14).

    Shapes: ``masked_kspace (B, C, H, W, 2)``, ``mask (B, 1, 1, W, 1)`` → ``(B, H, W)``. The mask is applied
    once more (a no-op on masked k-space); in the exported graph it also picks the lines that are transformed
    (:func:`reconkit.models.classical.zero_filled`).
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, masked_kspace: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W, 2)`` k-space, ``(B, 1, 1, W, 1)`` mask → ``(B, H, W)`` image in the zero-filled image's
        units (the model's output de-normalised); ReconkitError for inputs of another shape."""
        _check_inputs("ZeroFilledFrontEnd", masked_kspace, mask)
        check_float_weights(self.model, f"ZeroFilledFrontEnd({type(self.model).__name__})")
        scale = power_of_two_scale(masked_kspace).view(-1, 1, 1)
        image = zero_filled(masked_kspace / scale[..., None, None], mask)
        mean = image.mean(dim=(1, 2), keepdim=True)
        std = image.std(dim=(1, 2), keepdim=True)
        normalised = ((image - mean) / (std + 1e-11)).clamp(-6, 6)
        return (self.model(normalised.unsqueeze(1)).squeeze(1) * std + mean) * scale


def contract_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself for k-space models; image-domain models (``image_domain = True``: the U-Net, the ViT) get
    the :class:`ZeroFilledFrontEnd`."""
    return ZeroFilledFrontEnd(model) if getattr(model, "image_domain", False) else model
