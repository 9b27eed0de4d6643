"""The exported file's format, readable without PyTorch: contract names, ``reconkit.*`` metadata, size branches.

This module needs only ``onnx``, so the inference server (whose image has no PyTorch, deploy/Dockerfile) reads
the same metadata and cuts the same size branches as ``reconkit reconstruct``.

A file exported for several sizes holds one ``If`` branch per size (docs/export.md, "Several sizes in one file").
ONNX Runtime optimises and prepares every branch when it opens such a file, though a call runs only one: for the
bundled model's eight sizes that is ≈ 10 s of session start on a 2-core CPU with ONNX Runtime 1.32 (133 s with
1.23, the newest release for Python 3.10), against < 1 s (5 s) for one branch. :func:`single_size_model` cuts one
branch out, so a caller that knows its input's size prepares only what it runs. The branch is the graph a
single-size export of that size would hold, so its output is the multi-size file's output up to float32 round-off.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from reconkit.errors import ReconkitError

__all__ = [
    "ExportError",
    "decoded_metadata",
    "format_sizes",
    "load_onnx_metadata",
    "read_onnx",
    "session_source",
    "single_size_model",
]

INPUT_NAMES = ("masked_kspace", "mask")
OUTPUT_NAME = "image"
SIZES_KEY = "reconkit.spatial_sizes"
# how torch.save's files start: a zip archive, or a pickle (legacy). The twin of reconkit.models.registry's
# TORCH_SAVE_MAGIC, kept here so that this module, which the service reads ONNX files with, never imports torch
_TORCH_SAVE_MAGIC = (b"PK\x03\x04", b"\x80")
JSON_KEYS = (SIZES_KEY, "reconkit.acceleration", "reconkit.center_fraction", "reconkit.model_kwargs",
             "reconkit.weight_aliases")


class ExportError(ReconkitError):
    """A model or checkpoint could not be exported; the message names the file and the problem."""


def format_sizes(sizes: Sequence[Sequence[int]]) -> str:
    """``[(32, 24), (40, 30)]`` → ``"32x24, 40x30"``: how errors and node names list a model's sizes."""
    return ", ".join(f"{h}x{w}" for h, w in sizes)


def _pick_name(height: int, width: int) -> str:
    """Name of the ``If`` node whose then-branch is the graph for k-space of ``height × width``."""
    return f"pick_{height}x{width}"


def _subgraphs(node) -> Iterator:
    """The ``GraphProto`` attributes of ``node``: an ``If``'s branches, a ``Loop`` / ``Scan`` body (none for others)."""
    for attribute in node.attribute:
        if attribute.HasField("g"):
            yield attribute.g
        yield from attribute.graphs


def _hw_input(value, height: int | str, width: int | str):
    """Copy of a contract input (``masked_kspace`` / ``mask``) with its height / width axes set: to symbolic
    names (str) or fixed sizes (int)."""
    import onnx

    new = onnx.ValueInfoProto()
    new.CopyFrom(value)
    dims = new.type.tensor_type.shape.dim
    axes = {2: height, 3: width} if new.name == "masked_kspace" else {3: width}
    for axis, size in axes.items():
        dims[axis].Clear()
        if isinstance(size, str):
            dims[axis].dim_param = size
        else:
            dims[axis].dim_value = size
    return new


def load_onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``reconkit.*`` metadata of an exported model; JSON-valued keys (sizes, acceleration, centre fraction,
    model kwargs) are decoded, e.g. ``{"reconkit.model_type": "varnet", "reconkit.spatial_sizes": [[640, 368]], ...}``.

    Raises:
        ExportError: the file is missing or not an ONNX model.
    """
    path = Path(path)
    return decoded_metadata(read_onnx(path, load_external_data=False), path)


def read_onnx(path: str | os.PathLike, load_external_data: bool = True):
    """The ``onnx.ModelProto`` of ``path``; ExportError naming the file when it is missing, unreadable or not ONNX
    (or, with ``load_external_data``, its external weight files cannot be read).

    ``load_external_data=False`` leaves the weights of a model saved with external data in their files (the
    initialisers then hold only their locations): enough for the metadata and the graph's inputs and outputs.
    """
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: ONNX model not found" if not path.exists() else f"{path}: is not a regular file")
    try:
        return onnx.load(str(path), load_external_data=load_external_data)
    except Exception as exc:
        try:
            with path.open("rb") as f:
                head = f.read(4)
        except OSError as err:  # e.g. no read permission: ONNX's own error was the same
            raise ExportError(f"{path}: cannot read the file: {err.strerror or err}") from None
        if head.startswith(_TORCH_SAVE_MAGIC):
            raise ExportError(f"{path}: looks like a PyTorch checkpoint, not an ONNX model (export it with "
                              "'reconkit export', or name it .ckpt to run it in PyTorch)") from exc
        if load_external_data and _loads_without_external_data(path):  # e.g. its .data file was not copied along
            raise ExportError(f"{path}: cannot read the model's external data (keep the files that "
                              f"onnx.save(..., save_as_external_data=True) wrote next to it): {exc}") from exc
        raise ExportError(f"{path}: not an ONNX model ({type(exc).__name__}: {exc})") from exc


def session_source(path: Path, proto) -> str | bytes:
    """What ONNX Runtime opens ``path``'s model from: its name, or ``proto`` (:func:`read_onnx`'s, external data read
    in) serialized where ONNX Runtime cannot take the name.

    ONNX Runtime takes a name as a str it encodes as UTF-8 and opens those bytes. Python holds a name's bytes that
    its file-system encoding cannot decode (``modèles`` under ``LC_ALL=C``: ASCII) as surrogates, which cannot be
    encoded: the name's own bytes are passed, as UTF-8; where they are not UTF-8 (e.g. Latin-1), the model itself.

    Raises:
        ExportError: the name is not UTF-8 (no locale helps then) and ``proto`` is None (the file did not read as
            ONNX) or over protobuf's 2 GiB limit.
    """
    try:
        return os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        pass
    if proto is None or proto.ByteSize() >= 2**31:
        reason = "it does not read as ONNX" if proto is None else "the model is too large (over 2 GiB) to pass in memory"
        raise ExportError(f"{path}: ONNX Runtime cannot open a file whose name is not UTF-8, and {reason}: "
                          "move or rename it to a UTF-8 (e.g. ASCII) path")
    return proto.SerializeToString()


def _loads_without_external_data(path: Path) -> bool:
    """Whether ``path`` parses as ONNX when the tensors it stores in other files are not read."""
    import onnx

    try:
        onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 -- protobuf's and ONNX's own errors: not ONNX after all
        return False
    return True


def _is_number(value: Any) -> bool:
    """An int or float of magnitude below 1e300 (not JSON's ``NaN`` / ``Infinity``, which Python's decoder takes,
    nor an integer too large for a float)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and -1e300 < value < 1e300


def _numbers(value: Any) -> bool:
    """A number, a list of numbers or null: a mask setting as the export writes it (or ``metadata=`` gives it)."""
    return value is None or _is_number(value) or isinstance(value, list) and all(map(_is_number, value))


def _sizes(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(size, list) and len(size) == 2 and all(isinstance(n, int) and not isinstance(n, bool) and n > 0
                                                          for n in size) for size in value)


_JSON_SHAPES = {
    SIZES_KEY: (_sizes, 'a list of [height, width] pairs of positive integers (or "dynamic")'),
    "reconkit.acceleration": (_numbers, "a number or a list of numbers"),
    "reconkit.center_fraction": (_numbers, "a number or a list of numbers"),
    "reconkit.model_kwargs": (lambda value: value is None or isinstance(value, dict), "a JSON object"),
    "reconkit.weight_aliases": (lambda value: value is None or isinstance(value, dict), "a JSON object"),
}
"""What each JSON-valued key must decode to for the readers (reconstruct, serve, ``load_onnx_as_torch``)."""


def _quoted(text: str, limit: int = 80) -> str:
    """``text`` quoted for an error message, cut to its first ``limit`` characters (a metadata value may be huge)."""
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def decoded_metadata(proto, path: str | os.PathLike) -> dict[str, Any]:
    """:func:`load_onnx_metadata` of an already read ``proto`` (``path``, a file or a description such as
    ``"ONNX model"``, names it in errors).

    Raises:
        ExportError: a JSON-valued key is not JSON (or nested too deeply to decode), or not of its
            :data:`_JSON_SHAPES` shape.
    """
    metadata: dict[str, Any] = {}
    for entry in proto.metadata_props:
        value: Any = entry.value
        if entry.key in JSON_KEYS and value != "dynamic":
            try:
                value = json.loads(value)
            except (json.JSONDecodeError, RecursionError) as exc:  # RecursionError: arrays in arrays thousands deep
                raise ExportError(f"{path}: metadata {entry.key!r} is not JSON: {_quoted(entry.value)}") from exc
            check, shape = _JSON_SHAPES[entry.key]
            if not check(value):
                raise ExportError(f"{path}: metadata {entry.key!r} must be {shape}, got {_quoted(entry.value)}")
        metadata[entry.key] = value
    return metadata


def _find_pick(graph, name: str):
    """The ``If`` node called ``name`` in ``graph`` or down its chain of else-branches, or None."""
    for node in graph.node:
        if node.op_type != "If":
            continue
        if node.name == name:
            return node
        for attribute in node.attribute:
            if attribute.name == "else_branch":
                found = _find_pick(attribute.g, name)
                if found is not None:
                    return found
    return None


def _names_read(graph, names: set[str]) -> set[str]:
    """Add to ``names`` every tensor name a node of ``graph`` (or of its control-flow subgraphs) reads."""
    for node in graph.node:
        names.update(node.input)
        for subgraph in _subgraphs(node):
            _names_read(subgraph, names)
    return names


def single_size_model(proto, height: int, width: int):
    """The ``(height, width)`` branch of an exported model as an ``onnx.ModelProto`` of its own.

    Inputs ``masked_kspace [batch, coils, height, width, 2]`` and ``mask [batch, 1, 1, width, 1]`` with height and
    width fixed, output ``image [batch, height, width]``, the file's metadata with ``reconkit.spatial_sizes`` set
    to this size. A single-size file of that size is returned as it is.

    Args:
        proto: the exported ``onnx.ModelProto`` (``reconkit.export.read_onnx``); not modified.
        height, width: k-space size (readout, phase encode).

    Raises:
        ExportError: the model was not exported for this size (the message lists the sizes it serves).
    """
    import onnx

    sizes = decoded_metadata(proto, "ONNX model").get(SIZES_KEY, "dynamic")
    if sizes == "dynamic" or [height, width] not in sizes:
        served = "any size" if sizes == "dynamic" else format_sizes(sizes)
        raise ExportError(f"no graph for {height}x{width} k-space in this model (it serves {served})")
    if len(sizes) == 1:
        return proto
    pick = _find_pick(proto.graph, _pick_name(height, width))
    if pick is None:
        raise ExportError(f"{SIZES_KEY} lists {height}x{width}, but the graph has no If node "
                          f"{_pick_name(height, width)!r}")
    branch = next(attribute.g for attribute in pick.attribute if attribute.name == "then_branch")

    graph = onnx.GraphProto()
    graph.CopyFrom(branch)
    graph.name = proto.graph.name
    read = _names_read(branch, set())
    graph.initializer.extend(init for init in proto.graph.initializer if init.name in read)  # shared weights
    graph.node.append(onnx.helper.make_node("Identity", [branch.output[0].name], [OUTPUT_NAME]))
    del graph.input[:], graph.output[:]
    graph.input.extend(_hw_input(value, height, width) for value in proto.graph.input if value.name in INPUT_NAMES)
    graph.output.append(onnx.helper.make_tensor_value_info(OUTPUT_NAME, onnx.TensorProto.FLOAT,
                                                           ["batch", height, width]))

    model = onnx.helper.make_model(graph, opset_imports=proto.opset_import, producer_name=proto.producer_name)
    model.ir_version = proto.ir_version
    for source in proto.metadata_props:
        entry = model.metadata_props.add()
        entry.key = source.key
        entry.value = json.dumps([[height, width]]) if source.key == SIZES_KEY else source.value
    return model
