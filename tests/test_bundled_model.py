"""The shipped checkpoints/: the ONNX file is the checkpoint's export (parity through ONNX Runtime), with its
metadata, within the size budget (≤ 50 MB together)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from reconkit.export import load_onnx_metadata
from reconkit.models import load_model

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
CKPT, ONNX = CHECKPOINTS / "varnet_small.ckpt", CHECKPOINTS / "varnet_small.onnx"


def test_bundled_files_fit_the_budget() -> None:
    assert (CKPT.stat().st_size + ONNX.stat().st_size) <= 50e6


@pytest.mark.parametrize("height,width,coils", [(192, 112, 8), (320, 184, 3), (192, 112, 20)])
def test_bundled_onnx_is_the_checkpoints_export(height: int, width: int, coils: int) -> None:
    model, info = load_model(CKPT)
    assert info["model_type"] == "varnet"
    rng = np.random.default_rng(height)
    mask = np.zeros(width, dtype=np.float32)
    mask[::4] = 1
    mask[width // 2 - 4 : width // 2 + 4] = 1
    mask = mask.reshape(1, 1, 1, width, 1)
    kspace = (rng.standard_normal((1, coils, height, width, 2)) * mask).astype(np.float32)
    (image,) = ort.InferenceSession(str(ONNX), providers=["CPUExecutionProvider"]).run(
        None, {"masked_kspace": kspace, "mask": mask})
    with torch.no_grad():
        expected = model(torch.from_numpy(kspace), torch.from_numpy(mask)).numpy()
    assert np.linalg.norm(image - expected) <= 1e-4 * np.linalg.norm(expected)
    meta = load_onnx_metadata(ONNX)
    assert meta["reconkit.model_type"] == "varnet" and [height, width] in meta["reconkit.spatial_sizes"]


def test_bundled_onnx_records_the_checkpoints_training_masks() -> None:
    """The ONNX file recorded 4× with 8 % centre alone (``reconkit.acceleration`` ``[4]``), though the checkpoint was
    trained with 8× and a 4 % centre too: the ONNX model claimed a narrower training mask than the same weights as a
    checkpoint."""
    _, info = load_model(CKPT)
    meta = load_onnx_metadata(ONNX)
    assert meta["reconkit.mask_family"] == info["mask"]["mask_type"]
    assert meta["reconkit.acceleration"] == info["mask"]["accelerations"]
    assert meta["reconkit.center_fraction"] == info["mask"]["center_fractions"]
