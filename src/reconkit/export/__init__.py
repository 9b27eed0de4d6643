"""ONNX export with the FFT inside the graph, metadata, and the Triton model repository writer.

``export_onnx(model_or_checkpoint, output_path, example_shape=(coils, H, W) or [(H, W), ...])`` and
``load_onnx_metadata(path)``; ``load_onnx_as_torch(path)`` rebuilds the PyTorch model from the file alone (for
sizes the graph lacks); ``single_size_model(read_onnx(path), H, W)`` is one size of a multi-size file as a model of
its own (a session that opens in a fraction of the time); see docs/export.md.
"""

from reconkit.export.onnx_branches import single_size_model
from reconkit.export.onnx_export import ExportError, export_onnx, format_sizes, load_onnx_metadata, read_onnx
from reconkit.export.onnx_weights import load_onnx_as_torch

__all__ = [
    "ExportError",
    "export_onnx",
    "format_sizes",
    "load_onnx_as_torch",
    "load_onnx_metadata",
    "read_onnx",
    "single_size_model",
]
