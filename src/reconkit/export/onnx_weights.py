"""Rebuild the PyTorch model an ONNX file was exported from, from the file alone.

An export of a checkpoint records the model type and its hyper-parameters (``reconkit.model_type``,
``reconkit.model_kwargs``), and the exporter keeps every weight as an initialiser named ``model.<state_dict key>``
(the traced wrapper holds the contract model as ``model``), or, where it merged weights of equal values, under the
name ``reconkit.weight_aliases`` gives. Those are enough to run the same weights in
PyTorch on k-space sizes the graph was not specialised for: ``reconkit reconstruct`` does so instead of failing
(docs/export.md, "Sizes the graph lacks").
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from reconkit.export.onnx_export import WEIGHT_PREFIX
from reconkit.export.onnx_format import ExportError, decoded_metadata, read_onnx
from reconkit.models import contract_model

__all__ = ["load_onnx_as_torch"]


def load_onnx_as_torch(path: str | os.PathLike) -> torch.nn.Module:
    """The exported model as a PyTorch module with the file's weights (float32), in eval mode on the CPU.

    Called like the graph: ``module(masked_kspace (B, C, H, W, 2), mask (B, 1, 1, W, 1)) -> image (B, H, W)``, for
    any spatial size the model itself takes (U-Nets wrapped in the same zero-filled front end as the export).

    Raises:
        ExportError: the file lacks ``reconkit.model_kwargs`` (exported from a bare module, or by reconkit before
            this key existed), names an unknown model type or ``model_kwargs`` too large to build, or its
            initialisers do not hold every weight of that model with the right shape (checked before the model is
            allocated). The message names the file.
    """
    from onnx import numpy_helper

    from reconkit.models import build_model
    from reconkit.models.registry import ModelConfigError

    path = Path(path)
    proto = read_onnx(path)  # read once: the metadata and the weights
    metadata = decoded_metadata(proto, path)
    model_type, model_kwargs = metadata.get("reconkit.model_type"), metadata.get("reconkit.model_kwargs")
    if not isinstance(model_kwargs, dict):
        raise ExportError(f"{path}: no 'reconkit.model_kwargs' metadata, so its weights cannot be rebuilt in PyTorch "
                          "(re-export it from the checkpoint with 'reconkit export')")
    try:  # on the meta device first: model_kwargs asking for a huge model (chans=10**6) allocate nothing there
        with torch.device("meta"):
            expected_state = contract_model(build_model(str(model_type), **model_kwargs)).state_dict()
    except ModelConfigError as exc:
        raise ExportError(f"{path}: {exc}") from exc
    except RuntimeError as exc:  # e.g. "Storage size calculation overflowed" for chans=10**10
        raise ExportError(f"{path}: model_type {model_type!r} with {model_kwargs} cannot be built: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    aliases = metadata.get("reconkit.weight_aliases") or {}
    initialisers = {init.name: init for init in proto.graph.initializer}
    state, missing, wrong = {}, [], []
    for key, expected in expected_state.items():
        init = initialisers.get(WEIGHT_PREFIX + str(aliases.get(key, key)))
        if init is None:
            missing.append(key)
            continue
        array = numpy_helper.to_array(init)
        if array.shape != tuple(expected.shape):
            wrong.append(f"{key} {array.shape} vs {tuple(expected.shape)}")
            continue
        state[key] = torch.from_numpy(np.array(array, dtype=np.float32 if expected.is_floating_point() else None))
    if missing or wrong:
        problems = ([f"{len(missing)} weights missing (e.g. {missing[0]})"] if missing else []) + (
            [f"shapes differ: {wrong[0]}"] if wrong else [])
        raise ExportError(f"{path}: the graph's initialisers do not fit model_type {model_type!r} with "
                          f"{model_kwargs}: " + "; ".join(problems))
    module = contract_model(build_model(str(model_type), **model_kwargs))  # as large as the file's own weights
    module.float()  # the graph's float32 weights, whatever the caller's default dtype (torch.set_default_dtype)
    module.load_state_dict(state)
    return module.eval()
