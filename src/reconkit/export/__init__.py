"""ONNX export with the FFT inside the graph, metadata, and the Triton model repository writer.

``export_onnx(model_or_checkpoint, output_path, example_shape=(coils, H, W) or [(H, W), ...])`` and
``load_onnx_metadata(path)``; ``load_onnx_as_torch(path)`` rebuilds the PyTorch model from the file alone (for
sizes the graph lacks); ``single_size_model(read_onnx(path), H, W)`` is one size of a multi-size file as a model of
its own (a session that opens in a fraction of the time); see docs/export.md.

Reading an exported file (``reconkit.export.onnx_format``: metadata, size branches) needs only ``onnx``; the names
that export or rebuild a model import PyTorch when first used, so the inference server imports this package
without it.
"""

import importlib

from reconkit.export.onnx_format import ExportError, format_sizes, load_onnx_metadata, read_onnx, single_size_model

__all__ = [
    "ExportError",
    "export_onnx",
    "format_sizes",
    "load_onnx_as_torch",
    "load_onnx_metadata",
    "read_onnx",
    "single_size_model",
]

_NEEDS_TORCH = {"export_onnx": "reconkit.export.onnx_export", "load_onnx_as_torch": "reconkit.export.onnx_weights"}


def __getattr__(name: str):
    if name in _NEEDS_TORCH:
        return getattr(importlib.import_module(_NEEDS_TORCH[name]), name)
    raise AttributeError(f"module 'reconkit.export' has no attribute {name!r}")
