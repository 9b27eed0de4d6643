"""One spatial size of a multi-size export as a model of its own.

A file exported for several sizes holds one ``If`` branch per size (docs/export.md, "Several sizes in one file").
ONNX Runtime optimises and prepares every branch when it opens such a file, though a call runs only one: for the
bundled model's eight sizes that is ≈ 10 s of session start on a 2-core CPU, against < 1 s for one branch.
:func:`single_size_model` cuts one branch out, so a caller that knows its input's size (``reconkit reconstruct``)
prepares only what it runs. The branch is the graph a single-size export of that size would hold, so its output is
the multi-size file's output up to float32 round-off.
"""

from __future__ import annotations

import json

from reconkit.export.onnx_export import (
    INPUT_NAMES,
    OUTPUT_NAME,
    ExportError,
    _hw_input,
    _pick_name,
    _subgraphs,
    decoded_metadata,
    format_sizes,
)

__all__ = ["single_size_model"]

SIZES_KEY = "reconkit.spatial_sizes"


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
