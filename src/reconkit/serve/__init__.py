"""KServe V2 / Open Inference Protocol inference server for reconkit's ONNX models (ONNX Runtime).

``reconkit serve --model-repository DIR`` runs :func:`serve`; see docs/serving.md.
"""

from reconkit.serve.app import ServerConfig, create_app
from reconkit.serve.repository import BatchingConfig, discover_models
from reconkit.serve.server import build_server, serve

__all__ = ["BatchingConfig", "ServerConfig", "build_server", "create_app", "discover_models", "serve"]
