"""Lightning 2 training: one base module, per-model subclasses, the fastMRI data module and the CLI wiring."""

from reconkit.training.base import Images, ReconModule
from reconkit.training.datamodule import FastMriDataModule
from reconkit.training.diagnostics import TrainingDiagnostics
from reconkit.training.modules import ImageModule, KspaceModule, UnetModule, VarNetModule, VitModule
from reconkit.training.predictions import PredictionWriter
from reconkit.training.self_supervised import SsduVarNetModule

__all__ = [
    "FastMriDataModule",
    "ImageModule",
    "Images",
    "KspaceModule",
    "PredictionWriter",
    "ReconModule",
    "SsduVarNetModule",
    "TrainingDiagnostics",
    "UnetModule",
    "VarNetModule",
    "VitModule",
]
