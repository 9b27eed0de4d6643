"""Reconstruction models: E2E-VarNet and U-Nets (state_dict-compatible with ``fastmri.models``), an image-domain
vision transformer baseline (``VisionTransformer``) and the registry
(which also builds the classical baselines of ``reconkit.models.classical``: ``zero_filled``, ``cg_sense``).

``build_model(model_type, **model_kwargs)`` is the one registry of model types; ``load_model(path)`` rebuilds a
model from a checkpoint (see "Checkpoints" in docs/architecture.md).
"""

from reconkit.models.classical import CGSense, ZeroFilled
from reconkit.models.contract import ZeroFilledFrontEnd, contract_model
from reconkit.models.registry import (
    MODEL_TYPES,
    CheckpointError,
    ModelConfigError,
    build_model,
    check_checkpoint_file,
    load_model,
    save_model,
)
from reconkit.models.unet import NormUnet, Unet, instance_norm_leaky_relu
from reconkit.models.varnet import SensitivityModel, VarNet, VarNetBlock, low_frequency_window
from reconkit.models.vit import VisionTransformer

__all__ = [
    "MODEL_TYPES",
    "CGSense",
    "CheckpointError",
    "ModelConfigError",
    "NormUnet",
    "SensitivityModel",
    "Unet",
    "VarNet",
    "VarNetBlock",
    "VisionTransformer",
    "ZeroFilled",
    "ZeroFilledFrontEnd",
    "build_model",
    "check_checkpoint_file",
    "contract_model",
    "instance_norm_leaky_relu",
    "load_model",
    "low_frequency_window",
    "save_model",
]
