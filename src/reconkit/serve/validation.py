"""Checks on decoded inputs beyond names, datatypes and shapes: batch sizes, finiteness, the ONNX contract.

The reconkit ONNX contract (docs/architecture.md): ``masked_kspace`` float32 ``[batch, coils, height, width, 2]``
and ``mask`` float32 ``[batch, 1, 1, width, 1]`` of 0 / 1; the mask's width must equal the k-space width, and
``(height, width)`` must be one of the graph's ``reconkit.spatial_sizes`` when the metadata lists them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from reconkit.serve.protocol import InferRequest, RequestError

__all__ = ["check_inputs", "check_outputs"]


def check_inputs(request: InferRequest, max_batch_size: int,
                 spatial_sizes: Sequence[tuple[int, int]] | None = None) -> None:
    """Raise ``RequestError(400)`` naming the tensor when the inputs cannot form a valid batch.

    max_batch_size: the model's largest batch (0: no limit, requests run one by one).
    spatial_sizes: the ``(H, W)`` of ``masked_kspace`` the graph was exported for (None: any).
    """
    inputs = request.inputs
    batches = {name: array.shape[0] for name, array in inputs.items() if array.ndim}
    if len(set(batches.values())) > 1:
        raise RequestError(400, f"inputs disagree on the batch size (first axis): {batches}")
    for name, batch in batches.items():
        if batch < 1:
            raise RequestError(400, f"input '{name}': batch size (first axis) must be at least 1")
        if max_batch_size and batch > max_batch_size:
            raise RequestError(400, f"input '{name}': batch size {batch} exceeds the model's max_batch_size "
                                    f"{max_batch_size}")
    for name, array in inputs.items():
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            bad = int(array.size - np.isfinite(array).sum())
            raise RequestError(400, f"input '{name}': {bad} value(s) are NaN or infinite")
    kspace, mask = inputs.get("masked_kspace"), inputs.get("mask")
    contract = kspace is not None and mask is not None and kspace.ndim == 5 and mask.ndim == 5
    if contract and mask.shape[3] != kspace.shape[3]:
        raise RequestError(400, f"input 'mask': width {mask.shape[3]} (axis 3) does not match "
                                f"'masked_kspace' width {kspace.shape[3]}")
    if kspace is not None and kspace.ndim == 5 and spatial_sizes and tuple(kspace.shape[2:4]) not in spatial_sizes:
        sizes = ", ".join(f"{h}x{w}" for h, w in spatial_sizes)
        raise RequestError(400, f"input 'masked_kspace': height x width {kspace.shape[2]}x{kspace.shape[3]} is not "
                                f"a size the model was exported for ({sizes})")
    if contract:
        soft = np.flatnonzero(~np.isin(mask, (0.0, 1.0)))
        if soft.size:
            raise RequestError(400, f"input 'mask': values must be 0 or 1 (acquired columns), got "
                                    f"{float(mask.ravel()[soft[0]]):g}; the graph takes every nonzero column as "
                                    "acquired")
        # nothing to reconstruct: the VarNet's per-sample normalisation would divide 0 by 0 and return NaN
        for name, array, problem in (("masked_kspace", kspace, "is all zero (no acquired data)"),
                                     ("mask", mask, "selects no k-space column (all zero)")):
            empty = np.flatnonzero(~array.reshape(array.shape[0], -1).any(axis=1))
            if empty.size:
                raise RequestError(400, f"input '{name}': sample {int(empty[0])} {problem}")


def check_outputs(results: dict[str, np.ndarray], model_name: str) -> None:
    """Raise ``RequestError(422)`` when an output holds NaN / inf: the request was well formed, but the model cannot
    reconstruct this input (and JSON has no NaN, so such a response would not even parse in strict clients)."""
    for name, array in results.items():
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            bad = int(array.size - np.isfinite(array).sum())
            raise RequestError(422, f"model '{model_name}': output '{name}' holds {bad} NaN / inf value(s) for "
                                    f"this input")
