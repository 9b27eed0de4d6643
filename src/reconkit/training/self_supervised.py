"""Self-supervised VarNet training with SSDU (Yaman et al., MRM 2020): no fully sampled data in training.

Each training sample (:class:`reconkit.data.ssdu.SsduSample`) carries only the acquired k-space and K splits of
its locations into Θ and Λ. The network sees ``kspace · Θ`` (and Θ as its data-consistency mask), and the loss
compares its multi-coil k-space prediction with the acquired data on Λ, with the paper's normalised L1-L2 loss

    L = ‖y_Λ − ŷ_Λ‖₂ / ‖y_Λ‖₂ + ‖y_Λ − ŷ_Λ‖₁ / ‖y_Λ‖₁      (per slice and split, averaged).

Validation / test are the usual per-volume metrics against fully sampled held-out data, the network then using
all acquired locations (Θ ∪ Λ), as in the paper.
"""

from __future__ import annotations

from typing import Any

import torch

from reconkit.data.ssdu import SsduSample
from reconkit.errors import ConfigError
from reconkit.models import VarNet
from reconkit.training.modules import VarNetModule

__all__ = ["SsduVarNetModule", "normalized_l1_l2_loss", "ssdu_loss"]


def normalized_l1_l2_loss(prediction: torch.Tensor, reference: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """SSDU's loss per batch item, averaged: ``‖r − p‖₂/‖r‖₂ + ‖r − p‖₁/‖r‖₁`` over all but the first axis.

    Args:
        prediction, reference: ``(B, ...)`` real tensors (k-space in real layout, already restricted to Λ).
    """
    diff = (reference - prediction).flatten(1)
    ref = reference.flatten(1)
    l2 = diff.norm(dim=1) / ref.norm(dim=1).clamp_min(eps)
    l1 = diff.abs().sum(dim=1) / ref.abs().sum(dim=1).clamp_min(eps)
    return (l2 + l1).mean()


def ssdu_loss(model: VarNet, batch: SsduSample) -> torch.Tensor:
    """The SSDU loss of one batch: every split k runs ``model`` on ``kspace · Θ_k`` and is scored on Λ_k.

    Only ``masked_kspace``, ``theta_mask``, ``lambda_mask`` and ``num_low_frequencies`` are read.
    ``masked_kspace`` is ``(B, C, H, W, 2)`` (single-coil ``(B, H, W, 2)`` runs as one coil, as the VarNet module
    runs it), the masks ``(B, K, 1, H, W, 1)``; the K splits are run as one batch of ``B · K``.
    """
    kspace = batch.masked_kspace
    if kspace.ndim == 4:  # single-coil: without a coil axis, · Θ would broadcast the batch into the coils
        kspace = kspace.unsqueeze(1)
    k = batch.theta_mask.shape[1]
    theta = batch.theta_mask.flatten(0, 1).to(kspace)  # (B·K, 1, H, W, 1)
    lam = batch.lambda_mask.flatten(0, 1).to(kspace)
    repeated = kspace.repeat_interleave(k, dim=0)  # (B·K, C, H, W, 2), split-major within each slice
    num_low = batch.num_low_frequencies
    if torch.is_tensor(num_low):
        num_low = num_low.reshape(-1).expand(kspace.shape[0]).repeat_interleave(k)  # one ACS width per split
    prediction = model.predict_kspace(repeated * theta, theta, num_low)
    return normalized_l1_l2_loss(prediction * lam, repeated * lam)


class SsduVarNetModule(VarNetModule):
    """:class:`VarNetModule` trained self-supervised with SSDU on :class:`SsduSample` batches.

    Training never reads a target (the SSDU transform does not even put one in the batch); validation and test
    are :class:`VarNetModule`'s (per-volume NMSE / PSNR / SSIM on fully sampled held-out data). Use with
    ``data.train_transform: reconkit.data.ssdu.SsduVarNetTransform`` (see ``configs/varnet_sim_small_ssdu.yaml``).
    """

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if not isinstance(batch, SsduSample):
            raise ConfigError(f"SsduVarNetModule trains on SSDU batches: set data.train_transform to "
                              f"reconkit.data.ssdu.SsduVarNetTransform (got {type(batch).__name__} batches)")
        loss = ssdu_loss(self.model, self.in_weights_dtype(batch))
        self.log("train_loss", loss, prog_bar=True, batch_size=batch.masked_kspace.shape[0])
        return loss
