"""Write an exported ONNX model into a Triton model repository (also served by ``reconkit serve``).

Layout: ``repository/<name>/<version>/model.onnx`` (plus any external-data files next to it) and
``repository/<name>/config.pbtxt`` for Triton's onnxruntime backend, with inputs / outputs read from the ONNX
graph. With ``max_batch_size > 0`` the first axis of every tensor is the batch axis (Triton's convention: the
``dims`` in ``config.pbtxt`` leave it out) and ``dynamic_batching`` is enabled.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from reconkit.atomic import atomic_path
from reconkit.errors import ReconkitError

__all__ = ["check_triton_options", "triton_config", "write_triton_repository"]

_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # same rule as reconkit.serve.repository
MAX_VERSION = 999_999_999  # reconkit.serve.repository reads version folders of 1 to 9 digits (Triton: any int64)
_TRITON_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 11: "TYPE_FP64", 2: "TYPE_UINT8", 3: "TYPE_INT8",
                 5: "TYPE_INT16", 6: "TYPE_INT32", 7: "TYPE_INT64", 9: "TYPE_BOOL"}


def _tensors(values, initializers: set[str], onnx_path: Path) -> list[tuple[str, str, list[int]]]:
    """(name, Triton data type, dims with -1 for dynamic axes) of graph inputs or outputs."""
    tensors = []
    for value in values:
        if value.name in initializers:
            continue
        elem_type = value.type.tensor_type.elem_type
        if elem_type not in _TRITON_TYPES:
            raise ReconkitError(f"{onnx_path}: tensor {value.name!r} has ONNX element type {elem_type}, "
                                "which has no Triton type here")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
        tensors.append((value.name, _TRITON_TYPES[elem_type], dims))
    return tensors


def _block(kind: str, tensors: list[tuple[str, str, list[int]]]) -> str:
    entries = ",\n".join(
        f'  {{\n    name: "{name}"\n    data_type: {dtype}\n    dims: [ {", ".join(map(str, dims))} ]\n  }}'
        for name, dtype, dims in tensors)
    return f"{kind} [\n{entries}\n]\n"


def triton_config(model, onnx_path: Path, model_name: str, max_batch_size: int) -> str:
    """``config.pbtxt`` text for the loaded ``onnx.ModelProto`` ``model``."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = _tensors(model.graph.input, initializers, onnx_path)
    outputs = _tensors(model.graph.output, set(), onnx_path)
    if max_batch_size > 0:
        static = [name for name, _, dims in inputs + outputs if not dims or dims[0] != -1]
        if static:
            raise ReconkitError(f"{onnx_path}: tensors {static} have no dynamic batch axis; export with a dynamic "
                                "batch axis or use max_batch_size=0")
        inputs = [(n, t, dims[1:]) for n, t, dims in inputs]
        outputs = [(n, t, dims[1:]) for n, t, dims in outputs]
    text = (f'name: "{model_name}"\nbackend: "onnxruntime"\nmax_batch_size: {max_batch_size}\n'
            + _block("input", inputs) + _block("output", outputs))
    if max_batch_size > 0:
        text += "dynamic_batching {\n  max_queue_delay_microseconds: 0\n}\n"
    return text


def _atomic_write(path: Path, write) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def check_triton_options(model_name: str, version: int, max_batch_size: int) -> None:
    """ReconkitError for a model name that is not one folder name, a version outside 1 … :data:`MAX_VERSION`
    (``reconkit serve`` would not find a longer one) or a negative batch size."""
    if not isinstance(model_name, str) or not _MODEL_NAME.match(model_name):
        raise ReconkitError(f"invalid model name {model_name!r}: use letters, digits, '_', '-', '.' (max 128)")
    if not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise ReconkitError(f"invalid model version {version!r}: must be an integer from 1 to {MAX_VERSION} "
                            "(reconkit serve reads version folders of up to 9 digits)")
    if max_batch_size < 0:
        raise ReconkitError(f"max_batch_size must be >= 0, got {max_batch_size}")


def write_triton_repository(onnx_path: os.PathLike | str, repository: os.PathLike | str, model_name: str,
                            version: int = 1, max_batch_size: int = 8) -> Path:
    """Copy ``onnx_path`` to ``repository/model_name/version/model.onnx`` and write ``config.pbtxt``.

    Returns the model directory ``repository/model_name``. Files are written atomically; an existing
    ``config.pbtxt`` of the model is replaced (it describes every version, which must share the graph's I/O).
    Raises ``ReconkitError`` for an invalid name / version, an unreadable ONNX file, a graph without a
    dynamic batch axis when ``max_batch_size > 0``, or a repository path it cannot write (the message names the
    path).
    """
    import onnx

    source = Path(onnx_path)
    check_triton_options(model_name, version, max_batch_size)
    try:
        model = onnx.load(str(source), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError / OSError / ValueError for bad files
        raise ReconkitError(f"{source}: cannot read ONNX model: {exc}") from exc
    config = triton_config(model, source, model_name, max_batch_size)
    external = {entry.value for init in model.graph.initializer for entry in init.external_data
                if entry.key == "location"}
    model_dir = Path(repository) / model_name
    version_dir = model_dir / str(version)
    try:
        version_dir.mkdir(parents=True, exist_ok=True)
        for location in sorted(external):
            data_path = source.parent / location
            # a link counts where it leads: copied, /etc/passwd behind one became a plain file, and ONNX Runtime
            # (which refuses links out of the model's folder) read it as the model's weights
            inside = data_path.resolve().is_relative_to(source.parent.resolve())
            if Path(location).is_absolute() or ".." in Path(location).parts or not inside or not data_path.is_file():
                raise ReconkitError(f"{source}: external data file {location!r} is missing or outside the model's "
                                    "folder")
            (version_dir / location).parent.mkdir(parents=True, exist_ok=True)
            with open(data_path, "rb") as src:
                _atomic_write(version_dir / location, lambda f: shutil.copyfileobj(src, f))
        with open(source, "rb") as src:
            _atomic_write(version_dir / "model.onnx", lambda f: shutil.copyfileobj(src, f))
        _atomic_write(model_dir / "config.pbtxt", lambda f: f.write(config.encode()))
    except OSError as exc:  # a path component that is a file, a model.onnx that is a folder, no permission, ...
        where = exc.filename2 or exc.filename or repository  # a rename names its destination second
        raise ReconkitError(f"{where}: cannot write the Triton model repository there: {exc.strerror or exc}"
                            ) from exc
    return model_dir
