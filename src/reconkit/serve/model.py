"""An ONNX model on ONNX Runtime, described the way the Open Inference Protocol describes tensors."""

from __future__ import annotations

import dataclasses
import json
import logging
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
_log = logging.getLogger("reconkit.serve")


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
    except (ValueError, TypeError, RecursionError):  # RecursionError: arrays in arrays thousands deep
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
    """One ONNX model file on ONNX Runtime, with its input/output specs and ``reconkit.*`` metadata.

    ``spatial_sizes``: the ``(H, W)`` sizes the graph was exported for (``reconkit.spatial_sizes``), or None.

    A reconkit file exported for several sizes holds one ``If`` branch per size, and ONNX Runtime prepares every
    branch of a file it opens (the bundled model's eight sizes: 10 s with ONNX Runtime 1.32, 133 s with 1.23, the
    newest release for Python 3.10). Such a file is opened as one session per size instead, each from its branch
    alone (``reconkit.export.single_size_model``, as ``reconkit reconstruct`` does), and :meth:`run` picks the
    session of the input's ``(H, W)``; the specs are the whole file's (height and width dynamic). A file whose
    branches cannot be cut out (e.g. rewritten by an ONNX optimiser) is opened whole.

    ``run`` is thread-safe (ONNX Runtime sessions are) and releases the GIL while the graph runs.
    """

    def __init__(self, path: Path | str, providers: Sequence[str] = ("CPUExecutionProvider",), intra_op_threads: int = 0):
        import onnxruntime as ort

        from reconkit.export.onnx_format import SIZES_KEY, read_onnx, session_source, single_size_model

        self.path = Path(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        # Idle ONNX Runtime threads would otherwise spin for a while after each run, taking CPU from the event
        # loop that receives the next request.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")

        def open_session(model: str | bytes):
            try:
                return ort.InferenceSession(model, sess_options=options, providers=list(providers))
            except Exception as exc:  # onnxruntime raises its own exception types for unreadable / invalid graphs
                raise ReconkitError(f"{self.path}: cannot load ONNX model: {exc}") from exc

        try:
            proto = read_onnx(self.path)
            metadata = {entry.key: entry.value for entry in proto.metadata_props}
        except ReconkitError:  # not ONNX: ONNX Runtime's own error says why, below
            proto, metadata = None, {}
        sizes = _spatial_sizes(metadata.get(SIZES_KEY))
        self._sessions: dict[tuple[int, int] | None, object] = {}
        if proto is not None and sizes is not None and len(sizes) > 1:
            try:
                for height, width in sizes:
                    branch = single_size_model(proto, height, width).SerializeToString()
                    self._sessions[(height, width)] = open_session(branch)
            except ReconkitError as err:
                _log.warning("opening the whole file (slower to start): a size's branch cannot be opened alone",
                             extra={"path": str(self.path), "reason": str(err)})
                self._sessions.clear()
        whole = None if self._sessions else session_source(self.path, proto)
        del proto
        if whole is not None:
            self._sessions[None] = open_session(whole)
        sessions = list(self._sessions.values())
        self.inputs = _merged_specs([session.get_inputs() for session in sessions])
        self.outputs = _merged_specs([session.get_outputs() for session in sessions])
        if None in self._sessions:
            metadata = dict(sessions[0].get_modelmeta().custom_metadata_map)
        self.metadata: dict[str, str] = metadata
        self.providers: list[str] = sessions[0].get_providers()
        self.spatial_sizes = _spatial_sizes(self.metadata.get(SIZES_KEY))
        self.graphs = len(sessions)  # sessions open: one per size, or 1 for the whole file

    def input(self, name: str) -> TensorSpec | None:
        return next((spec for spec in self.inputs if spec.name == name), None)

    def run(self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run the graph; returns ``{output name: array}`` for ``output_names`` (all outputs by default)."""
        session = self._sessions.get(None)
        if session is None:
            size = tuple(feeds["masked_kspace"].shape[2:4])
            session = self._sessions.get(size)
            if session is None:  # the request checks (serve.validation) refuse such inputs first
                raise ReconkitError(f"{self.path}: no graph for {size[0]}x{size[1]} k-space")
        names = list(output_names) if output_names else [spec.name for spec in self.outputs]
        return dict(zip(names, session.run(names, dict(feeds))))


def _merged_specs(per_session: list[list]) -> list[TensorSpec]:
    """The specs of one file's tensors from its sessions (one per size): an axis whose length differs between
    the sessions is dynamic (-1)."""
    merged = []
    for nodes in zip(*per_session):
        specs = [_spec(node) for node in nodes]
        shape = tuple(sizes[0] if len(set(sizes)) == 1 else -1 for sizes in zip(*(spec.shape for spec in specs)))
        merged.append(TensorSpec(specs[0].name, specs[0].datatype, shape))
    return merged
