"""Inference: run a trained model (checkpoint or ONNX) or a classical baseline on fastMRI-layout volumes."""

from reconkit.inference.engine import (
    CLASSICAL,
    DEFAULT_MASK,
    Reconstructor,
    TrainingMask,
    VolumeResult,
    acquired_columns,
    default_backend,
    load_reconstructor,
    recon_crop,
    reconstruct_volume,
    training_mask_mismatch,
    volume_mask,
)

__all__ = [
    "CLASSICAL",
    "DEFAULT_MASK",
    "Reconstructor",
    "TrainingMask",
    "VolumeResult",
    "acquired_columns",
    "default_backend",
    "load_reconstructor",
    "recon_crop",
    "reconstruct_volume",
    "training_mask_mismatch",
    "volume_mask",
]
