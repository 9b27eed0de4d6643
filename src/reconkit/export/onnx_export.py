"""Export a reconstruction model to ONNX with the FFT inside the graph (MatMul FFT, see ``reconkit.ops.dft_matmul``).

Contract (docs/architecture.md, "ONNX contract"): inputs ``masked_kspace`` float32 ``[batch, coils, height, width,
2]`` and ``mask`` float32 ``[batch, 1, 1, width, 1]``, output ``image`` float32 ``[batch, height, width]``;
``reconkit.*`` metadata in ``model.metadata_props``. Batch and coil axes are dynamic.

Several spatial sizes: the graph is traced once per ``(H, W)`` (the DFT matrices are constants of that size), and
the per-size graphs become the branches of nested ``If`` nodes chosen by the input's ``(height, width)``; the
network weights are stored once, in the main graph, and shared by all branches. See docs/export.md.
"""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from reconkit.atomic import atomic_path, temporary_prefix
from reconkit.errors import ReconkitError
from reconkit.export.onnx_format import (
    INPUT_NAMES,
    JSON_KEYS,
    OUTPUT_NAME,
    ExportError,
    _hw_input,
    _pick_name,
    _subgraphs,
    decoded_metadata,
    format_sizes,
    load_onnx_metadata,
    read_onnx,
)
from reconkit.models import MODEL_TYPES, ZeroFilledFrontEnd, contract_model, load_model
from reconkit.ops import fft_impl

__all__ = [
    "DEFAULT_OPSET",
    "ExportError",
    "check_export_options",
    "decoded_metadata",
    "export_onnx",
    "format_sizes",
    "load_checkpoint_model",
    "load_onnx_metadata",
    "normalise_sizes",
    "read_onnx",
]

DEFAULT_OPSET = 17
MAX_OPSET = int(getattr(torch.onnx._constants, "ONNX_MAX_OPSET", 23))  # the newest opset this PyTorch exports
UNKNOWN_MASK_FAMILY = "unknown"  # reconkit.mask_family of a model exported without mask info
WEIGHT_PREFIX = "model."  # the traced wrapper holds the contract model as ``model``: initialisers "model.<key>"
INPUT_LAYOUT = (
    "masked_kspace float32 [batch, coils, height, width, 2] (last axis real, imag; height = readout); "
    "mask float32 0/1 [batch, 1, 1, width, 1]; image float32 [batch, height, width] (RSS magnitude)"
)


def normalise_sizes(example_shape: Sequence[int] | Sequence[Sequence[int]]) -> tuple[int, list[tuple[int, int]]]:
    """``(coils, H, W)`` or a list of ``(H, W)`` / ``(coils, H, W)`` → ``(coils for tracing, [(H, W), ...])``.

    >>> normalise_sizes((15, 640, 368))
    (15, [(640, 368)])
    >>> normalise_sizes([(32, 24), (40, 28)])
    (4, [(32, 24), (40, 28)])
    """
    items = list(example_shape)
    if items and all(isinstance(v, numbers.Integral) for v in items):  # numpy's integers too (a np.array shape)
        items = [tuple(items)]
    coils, sizes = 4, []
    for item in items:
        item = tuple(int(v) for v in item)
        if len(item) == 3:
            coils, item = item[0], item[1:]
        if len(item) != 2 or min(item) < 2 or coils < 1:
            raise ValueError(f"example_shape: expected (coils, H, W) or a list of (H, W); got {example_shape!r}")
        if item not in sizes:
            sizes.append(item)
    if not sizes:
        raise ValueError("example_shape: no spatial size given")
    return coils, sizes


class _Reconstruct(torch.nn.Module):
    """Contract-shaped wrapper ``(masked_kspace, mask) -> image`` traced by the exporter."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, masked_kspace: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(masked_kspace, mask)


def _example_inputs(batch: int, coils: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic example k-space and a Cartesian line mask with a fully sampled centre (8 % of lines)."""
    generator = torch.Generator().manual_seed(0)
    mask = (torch.rand(width, generator=generator) < 0.3).float()
    low = max(2, round(0.08 * width))
    mask[width // 2 - low // 2 : width // 2 - low // 2 + low] = 1
    mask = mask.reshape(1, 1, 1, width, 1).repeat(batch, 1, 1, 1, 1)
    kspace = torch.randn(batch, coils, height, width, 2, generator=generator) * mask
    return kspace, mask


def _trace_one(model: torch.nn.Module, coils: int, height: int, width: int, opset: int, path: Path) -> None:
    """Trace the model for one spatial size into ``path`` (TorchScript exporter, MatMul FFT, dynamic batch/coils)."""
    kspace, mask = _example_inputs(2, max(coils, 2), height, width)
    dynamic_axes = {"masked_kspace": {0: "batch", 1: "coils"}, "mask": {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    with fft_impl("matmul"), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about Python ints from shapes: sizes are specialised
        torch.onnx.export(
            _Reconstruct(model), (kspace, mask), str(path), dynamo=False, opset_version=opset,
            input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME], dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )


def _set_output_shape(model, height: int, width: int) -> None:
    """Declare the output's shape as the contract's ``[batch, height, width]`` in place: the tracer leaves names of
    its own for axes it cannot follow (``Transposeimage_dim_1``), and Triton's config then reads them as dynamic."""
    from onnx import helper

    (output,) = [value for value in model.graph.output if value.name == OUTPUT_NAME]
    output.type.CopyFrom(helper.make_tensor_type_proto(output.type.tensor_type.elem_type, ["batch", height, width]))


def _add_unused_contract_inputs(model, height: int, width: int) -> None:
    """Give ``model``'s graph every contract input, in contract order, in place.

    The tracer drops an input the model never reads. The zero-filled baseline ignores ``mask``, for example, and
    a client that feeds the contract's two inputs would then be refused ("Invalid input name: mask"). An unused
    graph input is valid ONNX, so the missing ones are declared with the contract's shape.
    """
    from onnx import TensorProto, helper

    shapes = {"masked_kspace": ["batch", "coils", height, width, 2], "mask": ["batch", 1, 1, width, 1]}
    present = {value.name: value for value in model.graph.input}
    inputs = [present.get(name) or helper.make_tensor_value_info(name, TensorProto.FLOAT, shapes[name])
              for name in INPUT_NAMES]
    extra = [value for value in model.graph.input if value.name not in INPUT_NAMES]
    del model.graph.input[:]
    model.graph.input.extend(inputs + extra)


def _dedupe_constants(model) -> None:
    """Fold repeated ``Constant`` tensors of ``model``'s graph into their first occurrence, in place, later inputs
    pointing at it (the tracer records the DFT matrices once per use: every cascade would carry its own copy)."""
    import onnx

    first: dict[bytes, str] = {}
    alias: dict[str, str] = {}
    kept = []
    for node in model.graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = ""
            blob = tensor.SerializeToString()
            if blob in first:
                alias[node.output[0]] = first[blob]
                continue
            first[blob] = node.output[0]
        new = onnx.NodeProto()
        new.CopyFrom(node)
        new.input[:] = [alias.get(name, name) for name in node.input]
        kept.append(new)
    del model.graph.node[:]
    model.graph.node.extend(kept)


def _merge_by_size(graphs: list, sizes: list[tuple[int, int]]):
    """One ``onnx.ModelProto`` choosing among per-size graphs with nested ``If`` on the input's (height, width).

    Initialisers equal (name and bytes) in every per-size graph — the network weights — move to the main graph
    and are shared; the rest (DFT matrices, size-dependent constants) stay in their branch, renamed with a
    per-size prefix so names stay unique across subgraphs.
    """
    import onnx
    from onnx import TensorProto, helper

    def key(init):
        return init.name, init.SerializeToString()

    shared_keys = {key(i) for i in graphs[0].graph.initializer}
    for model in graphs[1:]:
        shared_keys &= {key(i) for i in model.graph.initializer}
    shared = [i for i in graphs[0].graph.initializer if key(i) in shared_keys]
    shared_names = {i.name for i in shared}
    outer = set(INPUT_NAMES) | shared_names

    branches = []
    for model, (height, width) in zip(graphs, sizes):
        prefix = f"s{height}x{width}/"
        graph = model.graph

        def rename(name: str, prefix: str = prefix) -> str:
            return name if (not name or name in outer) else prefix + name

        nodes = []
        for node in graph.node:
            new = onnx.NodeProto()
            new.CopyFrom(node)
            _rename_node(new, rename, prefix)
            nodes.append(new)
        inits = []
        for init in graph.initializer:
            if init.name in shared_names:
                continue
            new = onnx.TensorProto()
            new.CopyFrom(init)
            new.name = rename(init.name)
            inits.append(new)
        out = onnx.ValueInfoProto()
        out.CopyFrom(graph.output[0])
        out.name = rename(out.name)
        branches.append(helper.make_graph(nodes, f"size_{height}x{width}", [], [out], initializer=inits))

    # (height, width) of the input as int64 [2], compared with each size in turn. The innermost else-branch
    # fails on purpose (ONNX has no "raise"): a Reshape to one element, whose node name ONNX Runtime quotes. The
    # input never holds exactly one (its last axis is 2), not even an empty one (no coils), which a Reshape to
    # zero elements would let through as an empty image.
    consts = [helper.make_tensor("hw_axes", TensorProto.INT64, [2], [2, 3])]
    nodes = [
        helper.make_node("Shape", ["masked_kspace"], ["input_shape"]),
        helper.make_node("Gather", ["input_shape", "hw_axes"], ["input_hw"], axis=0),
    ]
    served = format_sizes(sizes)
    # the [1, 1, 1] shape is computed from the input, so that load-time shape inference cannot reject the branch
    consts += [helper.make_tensor("bhw_axes", TensorProto.INT64, [3], [0, 2, 3]),
               helper.make_tensor("zero", TensorProto.INT64, [], [0]),
               helper.make_tensor("one", TensorProto.INT64, [], [1])]
    refuse = [
        helper.make_node("Gather", ["input_shape", "bhw_axes"], ["input_bhw"], axis=0),
        helper.make_node("Mul", ["input_bhw", "zero"], ["zero_shape"]),
        helper.make_node("Add", ["zero_shape", "one"], ["one_shape"]),
        helper.make_node("Reshape", ["masked_kspace", "one_shape"], ["refused"],
                         name=f"input height x width not exported; this model serves {served}"),
    ]
    refused = helper.make_tensor_value_info("refused", TensorProto.FLOAT, None)
    else_graph = helper.make_graph(refuse, "refuse", [], [refused])
    for index in range(len(sizes) - 1, -1, -1):
        height, width = sizes[index]
        consts.append(helper.make_tensor(f"size_{index}", TensorProto.INT64, [2], [height, width]))
        cond = f"is_size_{index}"
        test = [
            helper.make_node("Equal", ["input_hw", f"size_{index}"], [f"{cond}_each"]),
            helper.make_node("Cast", [f"{cond}_each"], [f"{cond}_each_int"], to=TensorProto.INT64),
            helper.make_node("ReduceMin", [f"{cond}_each_int"], [f"{cond}_int"], keepdims=0),
            helper.make_node("Cast", [f"{cond}_int"], [cond], to=TensorProto.BOOL),
        ]
        out_name = OUTPUT_NAME if index == 0 else f"image_{index}"
        pick = helper.make_node("If", [cond], [out_name], then_branch=branches[index], else_branch=else_graph,
                                name=_pick_name(height, width))
        if index == 0:
            nodes += test + [pick]
        else:
            out = helper.make_tensor_value_info(out_name, TensorProto.FLOAT, None)
            else_graph = helper.make_graph(test + [pick], f"pick_from_{index}", [], [out])
    first = graphs[0].graph
    inputs = [_hw_input(v, "height", "width") for v in first.input if v.name in INPUT_NAMES]
    output = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", "height", "width"])
    main = helper.make_graph(nodes, "reconkit", inputs, [output], initializer=shared + consts)
    merged = helper.make_model(main, opset_imports=graphs[0].opset_import, producer_name="reconkit")
    merged.ir_version = graphs[0].ir_version
    return merged


def _rename_node(node, rename, prefix: str) -> None:
    """Apply ``rename`` to ``node``'s inputs and outputs and prefix its name, in place, and likewise inside the
    subgraphs of control-flow nodes (an exporter's ``If`` reads the branch's tensors from its outer scope)."""
    node.name = prefix + node.name
    node.input[:] = [rename(n) for n in node.input]
    node.output[:] = [rename(n) for n in node.output]
    for graph in _subgraphs(node):
        for inner in graph.node:
            _rename_node(inner, rename, prefix)
        for value in [*graph.input, *graph.output, *graph.initializer]:
            value.name = rename(value.name)


def _weight_aliases(module: torch.nn.Module, proto) -> dict[str, str]:
    """``{state_dict key: key}`` for weights the exporter stored under another weight's name.

    The TorchScript exporter merges initialisers of equal bytes into the first one (two cascades whose
    data-consistency weights are both still 1.0 become one), so such a weight has no initialiser of its own; the
    alias names the one holding the same values, for :func:`reconkit.export.load_onnx_as_torch`.
    """
    stored = {init.name for init in proto.graph.initializer}
    state = module.state_dict()
    aliases = {}
    for key, value in state.items():
        if WEIGHT_PREFIX + key in stored:
            continue
        for other, candidate in state.items():
            if (WEIGHT_PREFIX + other in stored and candidate.shape == value.shape and candidate.dtype == value.dtype
                    and torch.equal(candidate, value)):
                aliases[key] = other
                break
    return aliases


def _info_get(info: Any, key: str, default: Any = None) -> Any:
    if isinstance(info, Mapping):
        return info.get(key, default)
    return getattr(info, key, default)


def _as_list(value: Any) -> list:
    """A checkpoint's mask setting as the metadata's JSON list: ``[4]`` for a single number (as ``reconkit
    reconstruct`` reads a checkpoint's ``"accelerations": 4``), ``[]`` for none."""
    if not value:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def load_checkpoint_model(path: str | os.PathLike) -> tuple[torch.nn.Module, Any]:
    """``reconkit.models.load_model(path)`` with every failure turned into an :class:`ExportError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: checkpoint not found" if not path.exists() else f"{path}: is not a regular file")
    if path.stat().st_size == 0:
        raise ExportError(f"{path}: checkpoint is empty")
    try:
        model, info = load_model(path)
    except ReconkitError as exc:
        if str(path) in str(exc):
            raise
        raise ExportError(f"{path}: {exc}") from exc
    except Exception as exc:  # torch.load / state_dict errors come in many types; keep the reason, name the file
        raise ExportError(f"{path}: not a loadable reconkit checkpoint ({type(exc).__name__}: {exc})") from exc
    return model, info


def _model_type(model: torch.nn.Module) -> str:
    """A bare module's ``reconkit.model_type``: its registered name (``"vit"`` for a ``VisionTransformer``, which
    ``build_model`` and so ``load_onnx_as_torch`` take), else its class name in lower case."""
    return next((name for name, cls in MODEL_TYPES.items() if type(model) is cls), type(model).__name__.lower())


def _metadata(model: torch.nn.Module, info: Any, sizes: list[tuple[int, int]], extra: Mapping[str, Any]) -> dict:
    from reconkit import __version__

    mask = _info_get(info, "mask", None) or {}
    values: dict[str, Any] = {
        "reconkit.version": __version__,
        "reconkit.model_type": _info_get(info, "model_type", None) or _model_type(model),
        "reconkit.input_layout": INPUT_LAYOUT,
        "reconkit.normalization": _info_get(info, "normalization", None)
        or ("instance" if isinstance(contract_model(model), ZeroFilledFrontEnd) else "none"),
        "reconkit.mask_family": _info_get(mask, "mask_type", None) or UNKNOWN_MASK_FAMILY,
        "reconkit.acceleration": _as_list(_info_get(mask, "accelerations", None)),
        "reconkit.center_fraction": _as_list(_info_get(mask, "center_fractions", None)),
        "reconkit.spatial_sizes": [list(s) for s in sizes],
    }
    model_kwargs = _info_get(info, "model_kwargs", None)
    if isinstance(model_kwargs, Mapping):
        # with the weights (initialisers named "model.<state_dict key>") this rebuilds the PyTorch model from the
        # file alone, for sizes the graph was not exported for (reconkit.export.load_onnx_as_torch)
        values["reconkit.model_kwargs"] = dict(model_kwargs)
    for name, value in extra.items():
        values[name if name.startswith("reconkit.") else f"reconkit.{name}"] = value
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}


def check_export_options(output_path: Path, checkpoint: str | os.PathLike | None, opset: int) -> None:
    """What :func:`export_onnx` refuses before any work: an opset outside 17 to :data:`MAX_OPSET` (ValueError), an
    ``output_path`` that is a directory, a device / FIFO / socket or ``checkpoint`` itself (ExportError)."""
    if not 17 <= opset <= MAX_OPSET:
        raise ValueError(f"opset must be between 17 and {MAX_OPSET} (what this PyTorch exports); got {opset}")
    if output_path.is_dir():
        raise ExportError(f"{output_path}: is a directory; give the .onnx file to write")
    if output_path.exists() and not output_path.is_file():  # the rename at the end would replace the node itself
        raise ExportError(f"{output_path}: is not a regular file (a device, FIFO or socket); give the .onnx file "
                          "to write")
    if checkpoint is not None and output_path.resolve() == Path(checkpoint).resolve():
        raise ExportError(f"{output_path}: the output would overwrite the checkpoint it is exported from")


def export_onnx(
    model_or_checkpoint: torch.nn.Module | str | os.PathLike,
    output_path: str | os.PathLike,
    example_shape: Sequence[int] | Sequence[Sequence[int]] = (4, 640, 368),
    opset: int = DEFAULT_OPSET,
    metadata: Mapping[str, Any] | None = None,
    check: bool = True,
) -> Path:
    """Export a model (or a reconkit checkpoint) to one ONNX file following the ONNX contract.

    Args:
        model_or_checkpoint: a ``torch.nn.Module`` called as ``model(masked_kspace, mask) -> image`` (every
            reconkit k-space model), or the path of a checkpoint for ``reconkit.models.load_model`` (its weights
            are exported in float32, the contract's dtype, also from a float64 checkpoint).
        output_path: ``.onnx`` file to write (atomically: temporary file, then rename).
        example_shape: ``(coils, H, W)``, or a list of ``(H, W)`` (or ``(coils, H, W)``) spatial sizes the graph
            serves. Batch and coil counts stay dynamic; each size gets its own specialised branch.
        opset: ONNX opset, 17 (the default) to :data:`MAX_OPSET` (the newest this PyTorch exports: 23 with 2.14).
        metadata: extra or overriding ``reconkit.*`` metadata (keys with or without the ``reconkit.`` prefix;
            non-string values are stored as JSON), e.g. ``{"mask_family": "equispaced_fraction"}``.
        check: run ``onnx.checker`` on the result.

    Returns:
        the written path.

    Raises:
        ValueError: before any work: an ``opset`` outside 17 to :data:`MAX_OPSET`, an ``example_shape`` that is
            neither ``(coils, H, W)`` nor a list of sizes, or ``metadata`` that sets a key derived from the graph or
            a value JSON cannot encode.
        ExportError: unreadable / incompatible checkpoint, a model that cannot be exported (e.g. ``cg_sense`` with
            ESPIRiT maps), a model that does not trace, a graph the checker rejects, or an output that cannot be
            written (a folder, a device or FIFO, the checkpoint itself, no write permission); the message names the
            file.
    """
    import onnx

    coils, sizes = normalise_sizes(example_shape)
    output_path = Path(output_path)
    check_export_options(output_path, None if isinstance(model_or_checkpoint, torch.nn.Module) else model_or_checkpoint,
                         opset)  # fmt: skip
    extra_metadata = _checked_metadata(metadata)
    if isinstance(model_or_checkpoint, torch.nn.Module):
        model, info, source = model_or_checkpoint, None, type(model_or_checkpoint).__name__
    else:
        model, info = load_checkpoint_model(model_or_checkpoint)
        model, source = model.float(), str(model_or_checkpoint)
    problem = model.export_problem() if callable(getattr(model, "export_problem", None)) else None
    if problem:
        raise ExportError(f"{source}: {problem}")
    was_training = model.training
    model.eval()
    created = _missing_folders(output_path.parent)
    try:
        output_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"{output_path}: cannot create its folder: {exc.strerror or exc}") from None
    try:
        # named as atomic_path's: the next write there removes it if this process is killed (SIGKILL) mid-export
        with tempfile.TemporaryDirectory(dir=output_path.parent, prefix=temporary_prefix(), suffix="-export") as tmp:
            graphs = []
            for height, width in sizes:
                traced = Path(tmp) / f"{height}x{width}.onnx"
                try:
                    _trace_one(contract_model(model), coils, height, width, opset, traced)
                except Exception as exc:
                    raise ExportError(f"{source}: export failed at size {height}x{width}: "
                                      f"{type(exc).__name__}: {exc}") from exc
                graphs.append(onnx.load(str(traced)))
                _add_unused_contract_inputs(graphs[-1], height, width)
                _set_output_shape(graphs[-1], height, width)
                _dedupe_constants(graphs[-1])
            proto = graphs[0] if len(graphs) == 1 else _merge_by_size(graphs, sizes)
            extra = {"weight_aliases": _weight_aliases(contract_model(model), proto), **extra_metadata}
            for key, value in _metadata(model, info, sizes, extra).items():
                entry = proto.metadata_props.add()
                entry.key, entry.value = key, value
            if check:
                try:
                    onnx.checker.check_model(proto)
                except onnx.checker.ValidationError as exc:
                    raise ExportError(f"{output_path}: exported graph fails onnx.checker: {exc}") from exc
            with atomic_path(output_path) as staged:  # keeps the mode of a file it replaces, else the umask's
                onnx.save(proto, str(staged))
    except BaseException as exc:
        for folder in created:  # folders made for this output, if the export left them empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        if isinstance(exc, OSError):  # the folder refuses the temporary files or the rename (permissions, space)
            raise ExportError(f"{output_path}: cannot write it: {exc.strerror or exc}") from exc
        raise
    finally:
        model.train(was_training)
    return output_path


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _checked_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """``metadata`` for :func:`export_onnx`: JSON-encodable values (the JSON-valued keys as numbers or lists),
    and none of the keys the export itself derives from the graph."""
    checked = {}
    for key, value in (metadata or {}).items():
        name = key if str(key).startswith("reconkit.") else f"reconkit.{key}"
        if name in ("reconkit.spatial_sizes", "reconkit.weight_aliases", "reconkit.input_layout"):
            raise ValueError(f"metadata: {name} is derived from the exported graph and cannot be set")
        try:
            json.dumps(value)
        except TypeError:
            raise ValueError(f"metadata: {name} = {value!r} is not JSON-encodable (use str, int, float, list, dict)"
                             ) from None
        if name in JSON_KEYS and isinstance(value, str):
            raise ValueError(f"metadata: {name} must be a number, list or dict, not the string {value!r}")
        checked[name] = value
    return checked
