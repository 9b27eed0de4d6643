"""An ONNX model on ONNX Runtime, described the way the Open Inference Protocol describes tensors."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from reconkit.errors import ReconkitError

__all__ = ["V2_DATATYPES", "OnnxModel", "TensorSpec", "select_providers"]

# ONNX Runtime type string -> (KServe V2 datatype, numpy dtype)
_ORT_TYPES: dict[str, tuple[str, np.dtype]] = {
    "tensor(float)": ("FP32", np.dtype("<f4")),
    "tensor(float16)": ("FP16", np.dtype("<f2")),
    "tensor(double)": ("FP64", np.dtype("<f8")),
    "tensor(int8)": ("INT8", np.dtype("i1")),
    "tensor(int16)": ("INT16", np.dtype("<i2")),
    "tensor(int32)": ("INT32", np.dtype("<i4")),
    "tensor(int64)": ("INT64", np.dtype("<i8")),
    "tensor(uint8)": ("UINT8", np.dtype("u1")),
    "tensor(bool)": ("BOOL", np.dtype("?")),
}
V2_DATATYPES = dict(_ORT_TYPES.values())


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: name, V2 datatype (``"FP32"``...) and shape with -1 for dynamic axes."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        return V2_DATATYPES[self.datatype]

    def as_metadata(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def _spec(node) -> TensorSpec:
    if node.type not in _ORT_TYPES:
        raise ReconkitError(f"tensor {node.name!r} has type {node.type}, which the server does not handle")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in node.shape)
    return TensorSpec(node.name, _ORT_TYPES[node.type][0], shape)


def _spatial_sizes(value: str | None) -> list[tuple[int, int]] | None:
    """``reconkit.spatial_sizes`` metadata (JSON list of ``[H, W]``) -> sizes; None when absent or "dynamic"."""
    try:
        sizes = json.loads(value) if value else None
        return [(int(h), int(w)) for h, w in sizes] if isinstance(sizes, list) else None
    except (ValueError, TypeError):
        return None


def select_providers(device: str) -> list[str]:
    """ONNX Runtime execution providers for ``device`` (``"cpu"``, ``"cuda"`` or ``"auto"``: CUDA when present)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise ReconkitError(f"device 'cuda' requested but ONNX Runtime offers only {available}")
    return ["CPUExecutionProvider"]


class OnnxModel:
    """One ONNX Runtime session with its input/output specs and ``reconkit.*`` metadata.

    ``spatial_sizes``: the ``(H, W)`` sizes the graph was exported for (``reconkit.spatial_sizes``), or None.

    ``run`` is thread-safe (ONNX Runtime sessions are) and releases the GIL while the graph runs.
    """

    def __init__(self, path: Path | str, providers: Sequence[str] = ("CPUExecutionProvider",), intra_op_threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        # Idle ONNX Runtime threads would otherwise spin for a while after each run, taking CPU from the event
        # loop that receives the next request.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable / invalid graphs
            raise ReconkitError(f"{path}: cannot load ONNX model: {exc}") from exc
        self.path = Path(path)
        self.inputs = [_spec(node) for node in self.session.get_inputs()]
        self.outputs = [_spec(node) for node in self.session.get_outputs()]
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self.providers: list[str] = self.session.get_providers()
        self.spatial_sizes = _spatial_sizes(self.metadata.get("reconkit.spatial_sizes"))

    def input(self, name: str) -> TensorSpec | None:
        return next((spec for spec in self.inputs if spec.name == name), None)

    def run(self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run the graph; returns ``{output name: array}`` for ``output_names`` (all outputs by default)."""
        names = list(output_names) if output_names else [spec.name for spec in self.outputs]
        return dict(zip(names, self.session.run(names, dict(feeds))))
