"""ONNX export with the FFT inside the graph, metadata, and the Triton model repository writer.

``export_onnx(model_or_checkpoint, output_path, example_shape=(coils, H, W) or [(H, W), ...])`` and
``load_onnx_metadata(path)``; ``load_onnx_as_torch(path)`` rebuilds the PyTorch model from the file alone (for
sizes the graph lacks); see docs/export.md.
"""

from reconkit.export.onnx_export import ExportError, export_onnx, load_onnx_metadata
from reconkit.export.onnx_weights import load_onnx_as_torch

__all__ = ["ExportError", "export_onnx", "load_onnx_as_torch", "load_onnx_metadata"]
