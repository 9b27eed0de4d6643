"""ONNX export (reconkit.export): ORT vs torch parity, dynamic batch / coils, several sizes, metadata, CLI, errors."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from reconkit.cli.export import main as export_main
from reconkit.errors import ReconkitError
from reconkit.export import (
    ExportError,
    export_onnx,
    load_onnx_as_torch,
    load_onnx_metadata,
    read_onnx,
    single_size_model,
)
from reconkit.export.onnx_export import _subgraphs, load_checkpoint_model, normalise_sizes
from reconkit.inference import load_reconstructor
from reconkit.models import ZeroFilledFrontEnd, build_model, contract_model, save_model

ROOT = Path(__file__).resolve().parents[1]
VARNET_KWARGS = {"num_cascades": 2, "sens_chans": 2, "sens_pools": 1, "chans": 4, "pools": 2}
UNET_KWARGS = {"in_chans": 1, "out_chans": 1, "chans": 4, "num_pool_layers": 2}
MASK_INFO = {"mask_type": "equispaced_fraction", "center_fractions": [0.08], "accelerations": [4]}


def sample(batch: int, coils: int, height: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Masked k-space and a line mask with a fully sampled centre, as numpy float32."""
    rng = np.random.default_rng(seed)
    mask = (rng.random(width) < 0.3).astype(np.float32)
    mask[width // 2 - 3 : width // 2 + 3] = 1
    mask = np.broadcast_to(mask.reshape(1, 1, 1, width, 1), (batch, 1, 1, width, 1)).copy()
    kspace = rng.standard_normal((batch, coils, height, width, 2)).astype(np.float32) * mask
    return kspace, mask


def assert_parity(session: ort.InferenceSession, model: torch.nn.Module, kspace: np.ndarray, mask: np.ndarray):
    (image,) = session.run(None, {"masked_kspace": kspace, "mask": mask})
    with torch.no_grad():
        expected = model(torch.from_numpy(kspace), torch.from_numpy(mask)).numpy()
    assert image.shape == expected.shape == (kspace.shape[0],) + kspace.shape[2:4]
    assert np.linalg.norm(image - expected) <= 1e-4 * np.linalg.norm(expected)
    assert np.abs(image - expected).max() <= 1e-4 * np.abs(expected).max()


@pytest.fixture(scope="module")
def varnet_export(tmp_path_factory) -> tuple[torch.nn.Module, Path, ort.InferenceSession]:
    torch.manual_seed(0)
    model = build_model("varnet", **VARNET_KWARGS).eval()
    path = tmp_path_factory.mktemp("varnet") / "varnet.onnx"
    export_onnx(model, path, [(32, 24), (40, 30), (24, 72)],
                metadata={"mask_family": "random", "acceleration": [4, 8]})
    return model, path, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("batch,coils,height,width", [(1, 3, 32, 24), (3, 5, 40, 30), (2, 1, 32, 24), (2, 4, 24, 72)])
def test_varnet_parity_on_every_size_batch_and_coil_count(varnet_export, batch, coils, height, width) -> None:
    model, _, session = varnet_export
    assert_parity(session, model, *sample(batch, coils, height, width, seed=batch * coils))


def test_varnet_graph_follows_the_contract(varnet_export) -> None:
    _, path, _ = varnet_export
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    inputs = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
    assert inputs == {"masked_kspace": ["batch", "coils", "height", "width", 2], "mask": ["batch", 1, 1, "width", 1]}
    assert [v.name for v in model.graph.output] == ["image"]
    ops = {n.op_type for n in model.graph.node} | {
        n.op_type for node in model.graph.node for attr in node.attribute if attr.g for n in attr.g.node}
    assert "If" in ops and "MatMul" in ops and "DFT" not in ops
    # weights are stored once, in the main graph, and shared by the size branches
    conv_weights = [i for i in model.graph.initializer if len(i.dims) == 4]
    assert conv_weights and all(len(i.dims) != 4 for n in model.graph.node for a in n.attribute if a.g
                                for i in a.g.initializer)
    # each size branch holds each DFT matrix once, though every cascade uses it
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.g:
                tensors = [n.attribute[0].t.raw_data for n in attr.g.node
                           if n.op_type == "Constant" and len(n.attribute[0].t.raw_data) > 1024]
                assert len(tensors) == len(set(tensors))


def test_varnet_graph_is_valid_onnx_beyond_onnx_runtime(varnet_export) -> None:
    """Strict shape inference keeps the contract's output dims, and ONNX's reference implementation gives ONNX
    Runtime's image, so the graph relies on no ONNX Runtime behaviour outside the spec (docs/export.md)."""
    from onnx.reference import ReferenceEvaluator

    _, path, session = varnet_export
    model = onnx.load(str(path))
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    dims = [d.dim_param or d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "height", "width"]
    feeds = dict(zip(("masked_kspace", "mask"), sample(1, 2, 32, 24, seed=3)))
    (expected,) = session.run(None, feeds)
    (image,) = ReferenceEvaluator(model).run(None, feeds)
    assert np.linalg.norm(image - expected) <= 1e-5 * np.linalg.norm(expected)


@pytest.mark.parametrize("step", [{"final_dc_iters": 6}, {"final_dc_iters": 4, "final_dc_maps": "espirit",
                                                           "final_dc_wavelet": 0.3}])
def test_varnet_with_final_sense_step_exports_with_parity(tmp_path, step) -> None:
    torch.manual_seed(5)
    model = build_model("varnet", **VARNET_KWARGS, final_dc_prior=0.05, **step).eval()
    path = export_onnx(model, tmp_path / "dc.onnx", [(32, 24), (24, 72)])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, coils, height, width in ((2, 3, 32, 24), (1, 4, 24, 72)):
        assert_parity(session, model, *sample(batch, coils, height, width, seed=width))


def test_sense_step_sums_keep_onnx_runtime_at_torchs_accuracy_on_many_coils(tmp_path) -> None:
    """24 coils at 320 × 184: ONNX Runtime's float32 ReduceSum over the 2.8 M k-space residuals put 2.7e-5 relative
    error in the image (3e-4 at 638 × 366); accumulated in float64 on export (ops.accurate_sum) it is ~1e-7."""
    torch.manual_seed(0)
    model = build_model("varnet", num_cascades=1, chans=2, pools=1, sens_chans=2, sens_pools=1,
                        final_dc_iters=3).eval()
    path = export_onnx(model, tmp_path / "coils.onnx", (2, 320, 184))
    kspace, mask = sample(1, 24, 320, 184, seed=3)
    with torch.no_grad():
        expected = model(torch.from_numpy(kspace), torch.from_numpy(mask)).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {"masked_kspace": kspace, "mask": mask})
    assert np.linalg.norm(output - expected) / np.linalg.norm(expected) < 2e-6


def test_single_size_export_stores_each_dft_matrix_once(tmp_path) -> None:
    torch.manual_seed(2)
    model = build_model("varnet", **VARNET_KWARGS).eval()
    path = export_onnx(model, tmp_path / "one.onnx", (3, 24, 72))
    tensors = [n.attribute[0].t.raw_data for n in onnx.load(str(path)).graph.node
               if n.op_type == "Constant" and len(n.attribute[0].t.raw_data) > 1024]
    assert tensors and len(tensors) == len(set(tensors))
    assert_parity(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), model,
                  *sample(2, 3, 24, 72, seed=7))


def test_varnet_metadata_round_trip(varnet_export) -> None:
    _, path, session = varnet_export
    meta = load_onnx_metadata(path)
    assert meta["reconkit.model_type"] == "varnet"
    assert meta["reconkit.spatial_sizes"] == [[32, 24], [40, 30], [24, 72]]
    assert meta["reconkit.mask_family"] == "random"
    assert meta["reconkit.acceleration"] == [4, 8]
    assert meta["reconkit.normalization"] == "none"
    assert set(meta) >= {"reconkit.version", "reconkit.input_layout", "reconkit.center_fraction"}
    assert session.get_modelmeta().custom_metadata_map["reconkit.spatial_sizes"] == "[[32, 24], [40, 30], [24, 72]]"


@pytest.mark.parametrize(("batch", "coils"), [(1, 2), (1, 0), (0, 2)])
def test_size_not_exported_is_refused(varnet_export, batch, coils) -> None:
    """Also for an empty input (no coils, no items), which a Reshape to zero elements would pass as an empty image."""
    _, _, session = varnet_export
    kspace, mask = sample(batch, coils, 36, 28, seed=3)
    with pytest.raises(Exception, match=r"not exported; this model serves 32x24, 40x30"):
        session.run(None, {"masked_kspace": kspace, "mask": mask})


@pytest.mark.parametrize("height,width", [(32, 24), (24, 72)])
def test_single_size_model_is_that_sizes_branch(varnet_export, height, width) -> None:
    """One size cut out of a multi-size file: a valid model with fixed H / W, no size dispatch, metadata naming
    only that size, and the multi-size file's output."""
    _, path, session = varnet_export
    proto = read_onnx(path)
    branch = single_size_model(proto, height, width)
    onnx.checker.check_model(branch, full_check=True)
    inputs = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in branch.graph.input}
    assert inputs == {"masked_kspace": ["batch", "coils", height, width, 2], "mask": ["batch", 1, 1, width, 1]}
    assert "If" not in {n.op_type for n in branch.graph.node}
    assert len(branch.graph.node) < len(list(_all_nodes(proto.graph))) / 2
    metadata = {e.key: e.value for e in branch.metadata_props}
    assert metadata.pop("reconkit.spatial_sizes") == f"[[{height}, {width}]]"
    assert metadata == {e.key: e.value for e in proto.metadata_props if e.key != "reconkit.spatial_sizes"}
    one = ort.InferenceSession(branch.SerializeToString(), providers=["CPUExecutionProvider"])
    kspace, mask = sample(2, 3, height, width, seed=height)
    (expected,) = session.run(None, {"masked_kspace": kspace, "mask": mask})
    (image,) = one.run(None, {"masked_kspace": kspace, "mask": mask})
    np.testing.assert_allclose(image, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    with pytest.raises(Exception, match="masked_kspace"):  # the dims are fixed: ONNX Runtime checks them
        one.run(None, dict(zip(("masked_kspace", "mask"), sample(1, 3, 40, 30, seed=1))))


def test_single_size_model_refuses_sizes_not_exported(varnet_export, tmp_path) -> None:
    _, path, _ = varnet_export
    with pytest.raises(ExportError, match=r"no graph for 36x28 .* serves 32x24, 40x30, 24x72"):
        single_size_model(read_onnx(path), 36, 28)
    single = read_onnx(export_onnx(build_model("zero_filled"), tmp_path / "zf.onnx", (2, 32, 24)))
    assert single_size_model(single, 32, 24) is single  # already one size
    with pytest.raises(ExportError, match="serves 32x24"):
        single_size_model(single, 24, 32)
    for entry in single.metadata_props:  # a graph declared for any size ("dynamic") has no size branches
        if entry.key == "reconkit.spatial_sizes":
            entry.value = "dynamic"
    with pytest.raises(ExportError, match="no graph for 32x24 k-space in this model .it serves any size"):
        single_size_model(single, 32, 24)


def _all_nodes(graph):
    """Every node of ``graph``, inside control-flow subgraphs (the size branches' nested If) too."""
    for node in graph.node:
        yield node
        for subgraph in _subgraphs(node):
            yield from _all_nodes(subgraph)


@pytest.mark.parametrize("model_type", ["zero_filled", "cg_sense"])
@pytest.mark.parametrize("sizes", [(3, 32, 24), [(32, 24), (24, 72)]])
def test_classical_baselines_export_with_the_contract_inputs(tmp_path, model_type, sizes) -> None:
    """Every shipped model type exports; the zero-filled baseline never reads the mask, yet its graph still takes
    both contract inputs, so a client feeding them (the CLI, the service) is not refused."""
    model = build_model(model_type).eval()
    path = export_onnx(model, tmp_path / f"{model_type}.onnx", sizes)
    graph = onnx.load(str(path)).graph
    assert [v.name for v in graph.input] == ["masked_kspace", "mask"]
    mask_dims = [d.dim_param or d.dim_value for d in graph.input[1].type.tensor_type.shape.dim]
    assert mask_dims[:3] == ["batch", 1, 1] and mask_dims[4] == 1
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["masked_kspace", "mask"]
    assert_parity(session, model, *sample(2, 3, 32, 24, seed=11))


def test_cg_sense_with_espirit_maps_is_refused_with_the_reason(tmp_path) -> None:
    """Its maps come from eigen-decompositions (no ONNX operator): one ExportError naming why and what exports,
    not a trace-time TypeError; no file is left."""
    with pytest.raises(ExportError, match=r"CGSense: cg_sense with sens_method 'espirit' .* eigen-decompositions"):
        export_onnx(build_model("cg_sense", sens_method="espirit"), tmp_path / "cg.onnx", (3, 96, 80))
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def unet_checkpoint(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(1)
    model = build_model("unet", **UNET_KWARGS).eval()
    path = tmp_path_factory.mktemp("unet") / "unet.ckpt"
    save_model(path, model, "unet", UNET_KWARGS, mask=MASK_INFO, normalization="instance")
    return model, path


def test_float64_checkpoint_exports_in_float32_and_reconstructs_in_float64(tmp_path) -> None:
    """A float64 checkpoint (e.g. ``--trainer.precision 64-true``; ``load_model`` keeps its dtype) failed
    ``export`` with "Input type (torch.FloatTensor) and weight type (torch.DoubleTensor) should be the same" and
    ``reconstruct``'s PyTorch backend with "expected scalar type Float but found Double"."""
    torch.manual_seed(0)
    model = build_model("varnet", **VARNET_KWARGS).double().eval()
    checkpoint = tmp_path / "float64.ckpt"
    save_model(checkpoint, model, "varnet", VARNET_KWARGS)
    kspace, mask = sample(1, 2, 16, 12, seed=0)
    with torch.no_grad():
        expected = model(torch.from_numpy(kspace).double(), torch.from_numpy(mask).double()).float()
    torch.testing.assert_close(torch.from_numpy(load_reconstructor(str(checkpoint)).run(kspace, mask)), expected)
    export_onnx(checkpoint, tmp_path / "float64.onnx", (2, 16, 12))
    (image,) = ort.InferenceSession(str(tmp_path / "float64.onnx")).run(None, {"masked_kspace": kspace, "mask": mask})
    torch.testing.assert_close(torch.from_numpy(image), expected, rtol=1e-4, atol=1e-4 * float(expected.max()))


def test_unet_checkpoint_export_parity_and_metadata(unet_checkpoint, tmp_path) -> None:
    model, checkpoint = unet_checkpoint
    path = export_onnx(checkpoint, tmp_path / "unet.onnx", (3, 72, 66))  # 72 = 8·9, 66 = 6·11: two-stage FFTs
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, coils in ((1, 3), (2, 4)):
        assert_parity(session, ZeroFilledFrontEnd(model), *sample(batch, coils, 72, 66, seed=coils))
    kspace, mask = sample(1, 3, 72, 66, seed=5)
    (image,) = session.run(None, {"masked_kspace": kspace, "mask": mask})
    for scale in (1e-15, 1e15):  # k-space in other units: the image in those units (the eps was absolute)
        (scaled,) = session.run(None, {"masked_kspace": kspace * np.float32(scale), "mask": mask})
        np.testing.assert_allclose(scaled / scale, image, rtol=1e-4, atol=1e-4 * np.abs(image).max())
        with torch.no_grad():
            eager = ZeroFilledFrontEnd(model)(torch.from_numpy(kspace * np.float32(scale)), torch.from_numpy(mask))
        np.testing.assert_allclose(eager.numpy() / scale, image, rtol=1e-4, atol=1e-4 * np.abs(image).max())
    meta = load_onnx_metadata(path)
    assert meta["reconkit.model_type"] == "unet"
    assert meta["reconkit.normalization"] == "instance"
    assert meta["reconkit.mask_family"] == "equispaced_fraction"
    assert meta["reconkit.acceleration"] == [4] and meta["reconkit.center_fraction"] == [0.08]
    assert meta["reconkit.spatial_sizes"] == [[72, 66]]


def test_checkpoint_with_single_number_mask_settings_exports_them_as_lists(tmp_path) -> None:
    """A checkpoint's ``"accelerations": 4`` (as ``reconkit reconstruct`` reads it) is ``[4]`` in the metadata, not a
    TypeError out of the export."""
    mask = {"mask_type": "equispaced_fraction", "accelerations": 4, "center_fractions": 0.08}
    checkpoint = save_model(tmp_path / "u.ckpt", build_model("unet", **UNET_KWARGS), "unet", UNET_KWARGS, mask=mask)
    meta = load_onnx_metadata(export_onnx(checkpoint, tmp_path / "u.onnx", (2, 24, 20)))
    assert meta["reconkit.acceleration"] == [4] and meta["reconkit.center_fraction"] == [0.08]


VIT_KWARGS = {"patch_size": 6, "embed_dim": 24, "depth": 2, "num_heads": 3}


def test_vit_checkpoint_exports_with_parity_on_two_sizes_and_rebuilds_for_others(tmp_path) -> None:
    torch.manual_seed(2)
    model = build_model("vit", **VIT_KWARGS).eval()
    torch.nn.init.normal_(model.head.weight, std=0.05)  # a trained-like head: the untrained one outputs zeros
    checkpoint = save_model(tmp_path / "vit.ckpt", model, "vit", VIT_KWARGS, mask=MASK_INFO, normalization="instance")
    path = export_onnx(checkpoint, tmp_path / "vit.onnx", [(72, 66), (45, 37)])  # 45 × 37: padded to 48 × 42
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, coils, height, width in ((1, 3, 72, 66), (2, 4, 72, 66), (2, 2, 45, 37)):
        assert_parity(session, ZeroFilledFrontEnd(model), *sample(batch, coils, height, width, seed=coils))
    fused = [n for n in _all_nodes(onnx.load(str(path)).graph)
             if (n.domain, n.op_type) == ("com.microsoft", "MultiHeadAttention")]
    assert len(fused) == 2 * VIT_KWARGS["depth"]  # each block's attention is one fused node, in both size branches
    # one size cut out of the file keeps the fused attention (a com.microsoft op) and the ViT's own If
    branch = single_size_model(read_onnx(path), 45, 37)
    assert {"If", "MultiHeadAttention"} <= {n.op_type for n in _all_nodes(branch.graph)}
    one = ort.InferenceSession(branch.SerializeToString(), providers=["CPUExecutionProvider"])
    assert_parity(one, ZeroFilledFrontEnd(model), *sample(2, 2, 45, 37, seed=4))
    meta = load_onnx_metadata(path)
    assert meta["reconkit.model_type"] == "vit" and meta["reconkit.normalization"] == "instance"
    assert meta["reconkit.model_kwargs"] == VIT_KWARGS
    rebuilt = load_onnx_as_torch(path)
    kspace, mask = (torch.from_numpy(a) for a in sample(1, 2, 30, 26, seed=5))  # a size the graph lacks
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(kspace, mask), ZeroFilledFrontEnd(model)(kspace, mask), rtol=0, atol=0)


def test_onnx_file_rebuilds_its_torch_model_for_sizes_it_lacks(unet_checkpoint, tmp_path) -> None:
    torch.manual_seed(3)
    varnet = build_model("varnet", **VARNET_KWARGS).eval()  # both cascades' dc_weight are 1.0: merged on export
    checkpoint = save_model(tmp_path / "varnet.ckpt", varnet, "varnet", VARNET_KWARGS, mask=MASK_INFO)
    path = export_onnx(checkpoint, tmp_path / "varnet.onnx", [(32, 24), (40, 30)])
    meta = load_onnx_metadata(path)
    assert meta["reconkit.model_kwargs"] == VARNET_KWARGS
    assert meta["reconkit.weight_aliases"] == {"cascades.1.dc_weight": "cascades.0.dc_weight"}
    rebuilt = load_onnx_as_torch(path)
    assert not rebuilt.training
    expected = varnet.state_dict()
    assert rebuilt.state_dict().keys() == expected.keys()
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in expected.items())
    kspace, mask = (torch.from_numpy(a) for a in sample(2, 3, 36, 28, seed=4))  # a size the graph lacks
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(kspace, mask), varnet(kspace, mask), rtol=0, atol=0)

    unet, unet_ckpt = unet_checkpoint
    rebuilt = load_onnx_as_torch(export_onnx(unet_ckpt, tmp_path / "unet.onnx", (2, 24, 20)))
    assert isinstance(rebuilt, ZeroFilledFrontEnd)
    kspace, mask = (torch.from_numpy(a) for a in sample(1, 2, 30, 26, seed=5))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(kspace, mask), ZeroFilledFrontEnd(unet)(kspace, mask), rtol=0, atol=0)


@pytest.mark.parametrize(("model_type", "kwargs"), [("vit", {**VIT_KWARGS, "depth": 1}), ("zero_filled", {})])
def test_bare_module_export_records_its_registered_model_type(tmp_path, model_type, kwargs) -> None:
    """A bare module's file names its registered type (``vit``, not the class name ``visiontransformer``), so with
    ``model_kwargs`` given as metadata it rebuilds in PyTorch like a checkpoint's."""
    torch.manual_seed(3)
    model = build_model(model_type, **kwargs).eval()
    path = export_onnx(model, tmp_path / "bare.onnx", (2, 36, 30), metadata={"model_kwargs": kwargs})
    assert load_onnx_metadata(path)["reconkit.model_type"] == model_type
    kspace, mask = (torch.from_numpy(a) for a in sample(1, 2, 30, 24, seed=6))  # a size the graph lacks
    with torch.no_grad():
        torch.testing.assert_close(load_onnx_as_torch(path)(kspace, mask), contract_model(model)(kspace, mask),
                                   rtol=0, atol=0)


def test_onnx_file_that_cannot_be_rebuilt_says_why(varnet_export, tmp_path) -> None:
    _, module_export, _ = varnet_export  # exported from a bare module: no hyper-parameters recorded
    with pytest.raises(ExportError, match=r"varnet.onnx: no 'reconkit.model_kwargs' metadata"):
        load_onnx_as_torch(module_export)
    torch.manual_seed(4)
    checkpoint = save_model(tmp_path / "v.ckpt", build_model("varnet", **VARNET_KWARGS), "varnet", VARNET_KWARGS)
    proto = onnx.load(str(export_onnx(checkpoint, tmp_path / "v.onnx", (2, 32, 24))))
    edits = {
        "wrong_kwargs": lambda p: _set_metadata(p, "reconkit.model_kwargs", '{"num_cascades": 2, "chans": 6, '
                                                '"sens_chans": 2, "sens_pools": 1, "pools": 2}'),
        "unknown_type": lambda p: _set_metadata(p, "reconkit.model_type", "transformer9000"),
        # a model of terabytes: torch's allocator RuntimeError (with less, gigabytes filled before the weight check)
        "huge_kwargs": lambda p: _set_metadata(p, "reconkit.model_kwargs", json.dumps({**VARNET_KWARGS, "chans": 10**6})),
        "overflow_kwargs": lambda p: _set_metadata(p, "reconkit.model_kwargs",
                                                   json.dumps({**VARNET_KWARGS, "chans": 10**13})),
        "missing_weight": lambda p: p.graph.initializer.remove(
            next(i for i in p.graph.initializer if i.name == "model.sens_net.norm_unet.unet.conv.layers.0.weight")),
    }
    messages = {"wrong_kwargs": r"shapes differ: cascades\.0\.model\.unet", "unknown_type": "unknown model_type",
                "huge_kwargs": r"shapes differ: .* \(1000000, ", "overflow_kwargs": "cannot be built: Storage size",
                "missing_weight": r"1 weights missing \(e\.g\. sens_net\.norm_unet\.unet\.conv"}
    for name, edit in edits.items():
        broken = onnx.ModelProto()
        broken.CopyFrom(proto)
        edit(broken)
        target = tmp_path / f"{name}.onnx"
        onnx.save(broken, str(target))
        with pytest.raises(ExportError, match=rf"{name}\.onnx: .*{messages[name]}"):
            load_onnx_as_torch(target)


def _set_metadata(proto, key: str, value: str) -> None:
    next(entry for entry in proto.metadata_props if entry.key == key).value = value


def test_cli_export_with_triton_repository(unet_checkpoint, tmp_path, capsys) -> None:
    _, checkpoint = unet_checkpoint
    output = tmp_path / "out" / "unet.onnx"
    code = export_main(["--checkpoint", str(checkpoint), "--output", str(output), "--size", "32", "24",
                        "--triton-repository", str(tmp_path / "repo"), "--model-name", "unet_small"])
    assert code == 0, capsys.readouterr().err
    assert load_onnx_metadata(output)["reconkit.spatial_sizes"] == [[32, 24]]
    assert (tmp_path / "repo" / "unet_small" / "1" / "model.onnx").read_bytes() == output.read_bytes()
    assert 'name: "unet_small"' in (tmp_path / "repo" / "unet_small" / "config.pbtxt").read_text()
    # a single-size file declares the output's fixed height and width, so Triton's config carries them
    output_dims = onnx.load(str(output)).graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in output_dims] == ["batch", 32, 24]
    assert "dims: [ 32, 24 ]" in (tmp_path / "repo" / "unet_small" / "config.pbtxt").read_text()


def test_cli_export_refuses_bad_options_and_outputs_before_exporting(unet_checkpoint, tmp_path, capsys) -> None:
    """One line naming the option or path, exit 2 (1 before: unlike every other command's refusals before any work,
    and argparse's own for a value that is not a number), nothing written (not even a folder made for the output)."""
    _, checkpoint = unet_checkpoint
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    cases = [
        (["--size", "0", "48"], "--size 0 48: height and width must be at least 2"),
        (["--coils", "0"], "--coils 0: must be at least 1"),
        (["--opset", "99"], "opset must be between 17 and"),
        (["--triton-repository", str(tmp_path / "repo"), "--model-name", "bad/name"], "invalid model name 'bad/name'"),
        (["--triton-repository", str(tmp_path / "repo"), "--version", "0"], "invalid model version 0"),
        (["--triton-repository", str(tmp_path / "repo"), "--version", "1765000000"],  # reconkit serve: ≤ 9 digits
         "invalid model version 1765000000: must be an integer from 1 to 999999999"),
        (["--output", str(tmp_path / "adir")], "adir: is a directory"),
        (["--output", str(checkpoint)], "the output would overwrite the checkpoint"),
        (["--output", str(tmp_path / "afile" / "x.onnx")], "afile/x.onnx: " + str(tmp_path / "afile") + " exists and"),
        (["--output", str(tmp_path / "new" / "deeper" / "x.onnx"), "--opset", "99"], "opset must be between"),
    ]
    for extra, message in cases:
        args = ["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out" / "x.onnx"), "--size", "32", "24"]
        code = export_main(args + extra)
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (extra, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"]  # no out/, new/, repo/ or .tmp-*
    assert checkpoint.stat().st_size > 0 and load_checkpoint_model(checkpoint)


def test_cli_export_reports_outputs_it_cannot_write_in_one_line(unet_checkpoint, tmp_path, capsys,
                                                                monkeypatch) -> None:
    """A FIFO (or device, or /dev/stdout) as --output is refused, not replaced by the final rename; a folder that
    refuses files and a Triton repository path that cannot be written are one line naming the path: exit 2 where
    found before the export, 1 where the export or the repository's write fails."""
    _, checkpoint = unet_checkpoint
    fifo = tmp_path / "fifo.onnx"
    os.mkfifo(fifo)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "repo" / "m" / "1" / "model.onnx").mkdir(parents=True)
    locked = tmp_path / "locked"  # a folder that refuses new files (chmod cannot show it when tests run as root)
    locked.mkdir()

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(locked))

    cases = [
        (["--output", str(fifo)], "fifo.onnx: is not a regular file", 2),
        (["--output", str(tmp_path / "x.onnx"), "--triton-repository", str(tmp_path / "afile")],
         "--triton-repository " + str(tmp_path / "afile") + ": is not a directory", 2),
        (["--output", str(tmp_path / "m.onnx"), "--triton-repository", str(tmp_path / "repo")],
         "m/1/model.onnx: cannot write the Triton model repository there: Is a directory", 1),
        (["--output", str(locked / "x.onnx")], "locked/x.onnx: cannot write it: Permission denied", 1),
    ]
    for extra, message, expected in cases:
        if locked in Path(extra[1]).parents:
            monkeypatch.setattr("reconkit.export.onnx_export.tempfile.TemporaryDirectory", refuse)
        code = export_main(["--checkpoint", str(checkpoint), "--size", "32", "24", *extra])
        err = capsys.readouterr().err
        assert code == expected and message in err and len(err.strip().splitlines()) == 1, (extra, err)
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert not (tmp_path / "x.onnx").exists() and list(locked.iterdir()) == []


def test_cli_export_refuses_a_triton_repository_it_cannot_write_before_exporting(tmp_path, capsys, monkeypatch) -> None:
    """A --triton-repository in a read-only folder was found only after the (minutes-long) export."""
    from reconkit import atomic, export

    (tmp_path / "ro").mkdir()
    real_access = os.access  # a chmod 555 folder, which root (running tests in containers) may write anyway

    def access(path, mode):
        return Path(path).name != "ro" and real_access(path, mode)

    def no_export(*args, **kwargs):
        raise AssertionError("exported before the repository was checked")

    monkeypatch.setattr(atomic.os, "access", access)
    monkeypatch.setattr(export, "export_onnx", no_export)
    repository = tmp_path / "ro" / "models"
    code = export_main(["--checkpoint", "any.ckpt", "--output", str(tmp_path / "x.onnx"), "--triton-repository",
                        str(repository)])  # fmt: skip
    assert code == 2
    assert capsys.readouterr().err == (f"reconkit export: error: --triton-repository {repository}: {tmp_path / 'ro'} "
                                       "is not writable\n")  # fmt: skip


def test_sigterm_during_an_export_leaves_no_temporary_folder(tmp_path) -> None:
    """A scheduler's or ``kill``'s SIGTERM unwinds the export as Ctrl-C does: no ``.tmp-*`` folder, no file."""
    out = tmp_path / "out"
    out.mkdir()
    command = [sys.executable, "-m", "reconkit.cli.main", "export", "--checkpoint",
               str(ROOT / "checkpoints" / "varnet_small.ckpt"), "--output", str(out / "x.onnx"), "--size", "640", "368"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(out.glob(".tmp-*")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)  # until the export has made its temporary folder
    assert process.poll() is None, "the export ended before it could be stopped"
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM
    assert list(out.iterdir()) == []


def test_a_folder_left_by_an_export_killed_outright_is_removed_by_the_next_export(unet_checkpoint, tmp_path) -> None:
    """An export killed with SIGKILL (the OOM killer, while tracing a large model) left its ``.export-*`` folder of
    traced graphs beside the output for ever. It is named as the atomic writes' temporaries now, so the next export
    into that folder removes it once its process is gone and it is an hour old."""
    from reconkit import atomic

    _, checkpoint = unet_checkpoint
    code = ("import os, sys\n"
            "from reconkit.export import onnx_export\n"
            "onnx_export._trace_one = lambda *args: os.kill(os.getpid(), 9)\n"
            "onnx_export.export_onnx(sys.argv[1], sys.argv[2], [(2, 32, 24)])\n")  # fmt: skip
    with subprocess.Popen([sys.executable, "-c", code, str(checkpoint), str(tmp_path / "unet.onnx")]) as killed:
        assert killed.wait() == -signal.SIGKILL
    [left] = list(tmp_path.iterdir())
    hours_ago = time.time() - 2 * atomic.STALE_AFTER_S
    os.utime(left, (hours_ago, hours_ago))
    export_onnx(checkpoint, tmp_path / "unet.onnx", [(2, 32, 24)])
    assert [p.name for p in tmp_path.iterdir()] == ["unet.onnx"]


def test_export_replacing_a_file_keeps_its_permissions_and_checks_metadata(unet_checkpoint, tmp_path) -> None:
    _, checkpoint = unet_checkpoint
    output = tmp_path / "unet.onnx"
    output.write_bytes(b"old")
    output.chmod(0o600)
    export_onnx(checkpoint, output, [(2, 32, 24)])
    assert stat.S_IMODE(output.stat().st_mode) == 0o600 and load_onnx_metadata(output)
    for metadata, message in (({"acceleration": "four"}, "must be a number, list or dict"),
                              ({"spatial_sizes": [[640, 368]]}, "derived from the exported graph"),
                              ({"note": object()}, "not JSON-encodable")):
        with pytest.raises(ValueError, match=message):
            export_onnx(checkpoint, tmp_path / "meta.onnx", [(2, 32, 24)], metadata=metadata)
    assert not (tmp_path / "meta.onnx").exists()


def _bad_checkpoints(tmp_path: Path) -> dict[str, Path]:
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    mismatched = tmp_path / "mismatched.ckpt"
    save_model(mismatched, build_model("unet", **UNET_KWARGS), "unet", dict(UNET_KWARGS, chans=8))
    no_entry = tmp_path / "no_entry.ckpt"
    torch.save({"state_dict": {}}, no_entry)
    return {"missing": tmp_path / "missing.ckpt", "empty": empty, "garbage": garbage, "mismatched": mismatched,
            "no_entry": no_entry}


def test_bad_checkpoints_give_clear_errors(tmp_path) -> None:
    for kind, checkpoint in _bad_checkpoints(tmp_path).items():
        output = tmp_path / f"{kind}.onnx"
        with pytest.raises(ReconkitError) as info:
            export_onnx(checkpoint, output, (2, 32, 24))
        assert str(checkpoint) in str(info.value), kind
        assert not output.exists(), kind


def test_cli_reports_bad_checkpoint(tmp_path, capsys) -> None:
    """Exit 2, as reconstruct's for the same file given to --model (export's was 1)."""
    for checkpoint in (tmp_path / "missing.ckpt", _bad_checkpoints(tmp_path)["garbage"]):
        code = export_main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "x.onnx"), "--size", "32",
                            "24"])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2 and str(checkpoint) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.onnx").exists()


def test_load_onnx_metadata_errors(tmp_path) -> None:
    with pytest.raises(ExportError, match="not found"):
        load_onnx_metadata(tmp_path / "none.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ExportError, match=str(bad)):
        load_onnx_metadata(bad)


def test_bad_example_shape() -> None:
    with pytest.raises(ValueError, match="example_shape"):
        export_onnx(torch.nn.Identity(), "unused.onnx", [(32,)])


def test_example_shape_may_be_any_integer_sequence(tmp_path) -> None:
    """A numpy array (coils, H, W) failed with "TypeError: 'numpy.int64' object is not iterable"."""
    assert normalise_sizes(np.array([3, 32, 24])) == normalise_sizes((np.int64(3), 32, 24)) == (3, [(32, 24)])
    assert normalise_sizes(np.array([[32, 24], [40, 28]])) == (4, [(32, 24), (40, 28)])
    export_onnx(build_model("zero_filled"), tmp_path / "zf.onnx", np.array([2, 16, 12]))
    assert load_onnx_metadata(tmp_path / "zf.onnx")["reconkit.spatial_sizes"] == [[16, 12]]


def test_odd_sizes_with_the_sense_step_keep_parity(tmp_path) -> None:
    """Odd H and W (no fastMRI size is odd, but cropped or converted data can be), the ESPIRiT + L1-Haar step on."""
    torch.manual_seed(0)
    kwargs = dict(VARNET_KWARGS, final_dc_iters=5, final_dc_maps="espirit", final_dc_wavelet=0.15, final_dc_prior=3.0)
    model = build_model("varnet", **kwargs).eval()
    path = export_onnx(model, tmp_path / "odd.onnx", [(33, 25), (45, 37)])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for height, width in ((33, 25), (45, 37)):
        assert_parity(session, model, *sample(2, 3, height, width, seed=height))


def test_device_cuda_needs_only_onnx_runtimes_cuda_provider_for_an_onnx_model(unet_checkpoint, tmp_path,
                                                                              monkeypatch) -> None:
    """``--device cuda`` with an ONNX model was refused unless PyTorch had CUDA too, so the CUDA image (onnxruntime-gpu
    beside a CPU build of PyTorch) could not run ``reconkit reconstruct --device cuda``. Here ONNX Runtime claims the
    CUDA provider (its sessions run on the CPU) and PyTorch has none: the ONNX model runs, its PyTorch fallback for
    a size outside the graph runs on the CPU, and a checkpoint is refused naming PyTorch."""
    from reconkit.inference import load_reconstructor

    model, checkpoint = unet_checkpoint
    path = export_onnx(checkpoint, tmp_path / "unet.onnx", (3, 32, 24))
    real_session = ort.InferenceSession
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession",
                        lambda model, options, providers: real_session(model, options, providers=providers[1:]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reconstructor = load_reconstructor(str(path), device="cuda")
    for height, width in ((32, 24), (36, 28)):  # in the graph; outside it (PyTorch fallback)
        kspace, mask = sample(1, 3, height, width, seed=height)
        run, note = reconstructor.runner_for(Path("scan.h5"), height, width)
        with torch.no_grad():
            expected = ZeroFilledFrontEnd(model)(torch.from_numpy(kspace), torch.from_numpy(mask)).numpy()
        np.testing.assert_allclose(run(kspace, mask), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
        assert (note is None) == (height == 32)
    with pytest.raises(ReconkitError, match="PyTorch sees no CUDA device"):
        load_reconstructor(str(checkpoint), device="cuda")
    with pytest.raises(ReconkitError, match="PyTorch sees no CUDA device"):
        load_reconstructor("zero-filled", device="cuda")


def test_bad_device_is_a_reconkit_error_naming_it_for_every_model_kind(unet_checkpoint, tmp_path,
                                                                       monkeypatch) -> None:
    """``load_reconstructor(..., device="tpu")`` was torch's RuntimeError listing its backends for the baselines and
    checkpoints, and an ONNX model ran on the CPU without a word (for ``"cuda:0"`` too); ``"cuda:7"`` on a machine
    with one GPU was torch's error at the first run. Each is a ReconkitError naming the device now, and an ONNX
    model's ``"cuda:N"`` opens the CUDA provider on GPU N."""
    from reconkit.inference import load_reconstructor

    _, checkpoint = unet_checkpoint
    path = export_onnx(checkpoint, tmp_path / "unet.onnx", (3, 32, 24))
    models = ["zero-filled", "cg-sense", str(checkpoint), str(path)]
    for model in models:
        with pytest.raises(ReconkitError, match=r"device 'tpu': reconkit runs models on 'cpu' or 'cuda'"):
            load_reconstructor(model, device="tpu")
    real_session, opened = ort.InferenceSession, []

    def session(model, options, providers):
        opened.append(providers[0])
        return real_session(model, options, providers=providers[1:])

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", session)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for model in models:
        with pytest.raises(ReconkitError, match=r"device 'cuda:7', but PyTorch sees 2 CUDA device\(s\): cuda:0 to "
                                                r"cuda:1"):
            load_reconstructor(model, device="cuda:7")
    assert load_reconstructor(str(path), device="cuda:1").backend == "onnx"
    assert opened == [("CUDAExecutionProvider", {"device_id": 1})]


def test_onnx_file_with_missing_external_data_says_so(tmp_path) -> None:
    """A file saved with ``save_as_external_data=True`` whose data file was not copied along is an ONNX model:
    the error names the missing external data instead of calling the file "not an ONNX model"."""
    import onnx

    proto = read_onnx(export_onnx(build_model("unet", **UNET_KWARGS), tmp_path / "u.onnx", (2, 32, 24)))
    path = tmp_path / "external" / "model.onnx"
    path.parent.mkdir()
    onnx.save(proto, str(path), save_as_external_data=True, location="model.data", size_threshold=0)
    assert load_onnx_metadata(path)["reconkit.model_type"] == "unet"  # read with its data file
    (path.parent / "model.data").unlink()
    with pytest.raises(ExportError, match="cannot read the model's external data") as error:
        read_onnx(path)
    assert str(path) in str(error.value) and "not an ONNX model" not in str(error.value)


_OPEN_UNDER_C_LOCALE = """
import os, sys
import numpy as np
from reconkit.inference import load_reconstructor
from reconkit.serve.model import OnnxModel
assert sys.getfilesystemencoding() == "ascii", sys.getfilesystemencoding()
kspace, mask = np.zeros((1, 2, 32, 24, 2), np.float32), np.ones((1, 1, 1, 24, 1), np.float32)
for folder in sys.argv[1:]:
    path = os.path.join(os.fsdecode(bytes.fromhex(folder)), "zf.onnx")  # surrogates: the name is not ASCII
    assert load_reconstructor(path).run(kspace, mask).shape == (1, 32, 24), path
    assert OnnxModel(path).run({"masked_kspace": kspace, "mask": mask})["image"].shape == (1, 32, 24), path
"""


def test_model_in_a_non_ascii_folder_opens_under_the_c_locale(tmp_path) -> None:
    """Under ``LC_ALL=C`` Python holds a file name's non-ASCII bytes as surrogates, which ONNX Runtime's constructor
    refused ("incompatible constructor arguments"): ``reconkit reconstruct`` and ``reconkit serve`` could not open a
    model in ``modèles/``. A UTF-8 name is passed as its own bytes; a Latin-1 one (not UTF-8) as the model itself."""
    model = export_onnx(build_model("zero_filled"), tmp_path / "zf.onnx", (2, 32, 24)).read_bytes()
    folders = [os.fsencode(tmp_path) + b"/mod\xc3\xa8les", os.fsencode(tmp_path) + b"/mod\xe8les"]
    for folder in folders:
        os.mkdir(folder)
        with open(folder + b"/zf.onnx", "wb") as f:
            f.write(model)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("LC_", "LANG"))}
    env.update(LC_ALL="C", PYTHONUTF8="0", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", _OPEN_UNDER_C_LOCALE, *(folder.hex() for folder in folders)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
