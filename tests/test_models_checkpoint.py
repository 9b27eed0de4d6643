"""reconkit.models.build_model / load_model: the checkpoint contract and clear errors for bad files."""

import os
import pickle

import h5py
import numpy as np
import pytest
import torch

from reconkit.errors import ReconkitError
from reconkit.models import CheckpointError, ModelConfigError, VarNet, build_model, load_model, save_model

KWARGS = {"num_cascades": 1, "sens_chans": 2, "sens_pools": 1, "chans": 2, "pools": 1}
MASK = {"mask_type": "equispaced_fraction", "center_fractions": [0.08], "accelerations": [4]}


def _lightning_style(model, **reconkit_overrides) -> dict:
    """What the training module writes: Lightning's keys, our entry, weights under ``model.`` plus other keys."""
    entry = {"model_type": "varnet", "model_kwargs": dict(KWARGS), "mask": MASK, "normalization": "max",
             **reconkit_overrides}
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state["loss.w"] = torch.ones(3)  # a non-model buffer of the LightningModule: ignored
    return {"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.6.6", "state_dict": state,
            "optimizer_states": [], "reconkit": entry}


def _inputs():
    mask = torch.zeros(1, 1, 1, 16, 1)
    mask[..., 6:10, :] = 1
    return torch.randn(1, 2, 16, 16, 2) * mask, mask


def test_build_model_registry():
    net = build_model("varnet", **KWARGS)
    assert isinstance(net, VarNet) and len(net.cascades) == 1
    with pytest.raises(ModelConfigError, match="unknown model_type 'resnet'"):
        build_model("resnet")
    with pytest.raises(ModelConfigError, match="bad model_kwargs"):
        build_model("varnet", num_cascade=3)


def test_classical_baselines_are_registered(tmp_path):
    kspace, mask = _inputs()
    zero_filled = build_model("zero_filled")
    assert zero_filled(kspace, mask).shape == (1, 16, 16)
    path = save_model(tmp_path / "cg.pt", build_model("cg_sense", num_iters=3), "cg_sense", {"num_iters": 3})
    model, info = load_model(path)
    assert info["model_type"] == "cg_sense" and model.num_iters == 3


def test_lightning_style_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model("varnet", **KWARGS)
    path = tmp_path / "epoch=3.ckpt"
    torch.save(_lightning_style(model), path)

    loaded, info = load_model(path)
    assert not loaded.training
    assert info["model_type"] == "varnet" and info["model_kwargs"] == KWARGS
    assert info["mask"] == MASK and info["normalization"] == "max"
    assert info["path"] == str(path) and info["epoch"] == 3 and info["global_step"] == 120
    kspace, mask = _inputs()
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(kspace, mask), model(kspace, mask))


def test_save_model_round_trip(tmp_path):
    torch.manual_seed(1)
    kwargs = {"in_chans": 1, "out_chans": 1, "chans": 4, "num_pool_layers": 2}
    model = build_model("unet", **kwargs)
    path = save_model(tmp_path / "unet.pt", model, "unet", kwargs)
    assert [p.name for p in tmp_path.iterdir()] == ["unet.pt"]  # no temp file left behind
    loaded, info = load_model(path)
    assert info["mask"] is None and info["normalization"] is None
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoint_loads_as_float32_and_reconstructs(tmp_path, dtype):
    """A U-Net trained with --trainer.precision bf16-true (data.transform unet allows it) saved bfloat16 weights;
    reconstruct failed on every file: 'Input type (torch.FloatTensor) and weight type (CPUBFloat16Type) should be
    the same', the zero-filled front end's FFTs giving float32 images."""
    from reconkit.inference import load_reconstructor
    from reconkit.models import contract_model

    torch.manual_seed(3)
    kwargs = {"in_chans": 1, "out_chans": 1, "chans": 4, "num_pool_layers": 2}
    half = build_model("unet", **kwargs).to(dtype)
    path = save_model(tmp_path / "unet.ckpt", half, "unet", kwargs)
    loaded, _ = load_model(path)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    for name, value in half.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value.float()), name  # upcast exactly
    kspace, mask = _inputs()
    image = load_reconstructor(str(path)).run(kspace.numpy(), mask.numpy())
    with torch.no_grad():
        expected = contract_model(half.float().eval())(kspace, mask)
    np.testing.assert_array_equal(image, expected.numpy())


def _write(tmp_path, name, payload) -> str:
    path = tmp_path / name
    torch.save(payload, path)
    return str(path)


class _NotWeights:
    pass


class _RunsCode:
    """Unpickled, it would call ``os.getcwd``: what a crafted checkpoint does with ``os.system``."""

    def __reduce__(self):
        return os.getcwd, ()


def _bad_checkpoints(tmp_path):
    torch.manual_seed(2)
    good = _lightning_style(build_model("varnet", **KWARGS))
    other = _lightning_style(build_model("varnet", **{**KWARGS, "chans": 3}))
    nan_state = dict(good["state_dict"])
    nan_state["model.cascades.0.dc_weight"] = torch.tensor([float("nan")])
    truncated = tmp_path / "truncated.ckpt"
    torch.save(good, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"this is not a checkpoint at all")
    yield str(tmp_path / "absent.ckpt"), "file not found"
    yield str(truncated), "not a readable PyTorch checkpoint"
    yield str(garbage), "not a PyTorch checkpoint (neither torch.save's zip format nor a pickle)"
    (tmp_path / "empty.ckpt").write_bytes(b"")
    yield str(tmp_path / "empty.ckpt"), "empty file (0 bytes)"
    with h5py.File(tmp_path / "scan.h5", "w") as f:
        f["kspace"] = np.zeros((1, 2, 4, 4), np.complex64)
    yield str(tmp_path / "scan.h5"), "is an HDF5 file (a scan?), not a model checkpoint"
    (tmp_path / "model.onnx").write_bytes(b"\x08\x08\x12\x07pytorch")  # the opening bytes of an ONNX ModelProto
    yield str(tmp_path / "model.onnx"), "looks like an ONNX graph, not a checkpoint"
    yield _write(tmp_path, "list.ckpt", [1, 2]), "expected a dict checkpoint"
    yield _write(tmp_path, "noentry.ckpt", {"state_dict": good["state_dict"]}), "missing the 'reconkit' entry"
    yield _write(tmp_path, "notype.ckpt", {**good, "reconkit": {"model_kwargs": {}}}), "model_type"
    yield _write(tmp_path, "unknown.ckpt", {**good, "reconkit": {**good["reconkit"], "model_type": "gan"}}), \
        "unknown model_type 'gan'"
    yield _write(tmp_path, "badkw.ckpt", {**good, "reconkit": {**good["reconkit"], "model_kwargs": {"depth": 3}}}), \
        "bad model_kwargs"
    yield _write(tmp_path, "nostate.ckpt", {"reconkit": good["reconkit"]}), "missing 'state_dict'"
    yield _write(tmp_path, "noprefix.ckpt", {**good, "state_dict": {"w": torch.ones(1)}}), "no weights under"
    yield _write(tmp_path, "shapes.ckpt", {**other, "reconkit": good["reconkit"]}), "weight shapes do not fit"
    yield _write(tmp_path, "missing.ckpt", {**good, "reconkit": {**good["reconkit"],
                                                                 "model_kwargs": {**KWARGS, "num_cascades": 2}}}), \
        "missing weights cascades.1"
    yield _write(tmp_path, "extra.ckpt", {**good, "reconkit": {**good["reconkit"],
                                                               "model_kwargs": {**KWARGS, "num_cascades": 0}}}), \
        "unexpected weights cascades.0"
    yield _write(tmp_path, "nan.ckpt", {**good, "state_dict": nan_state}), "NaN or Inf"
    # model_kwargs asking for terabytes ended in a RuntimeError traceback from torch's allocator (less, in filling memory)
    for chans, problem in ((10**6, "weight shapes do not fit"), (10**13, "cannot be built: Storage size")):
        entry = {**good["reconkit"], "model_kwargs": {**KWARGS, "chans": chans}}
        yield _write(tmp_path, f"chans{chans}.ckpt", {**good, "reconkit": entry}), problem
    # a mask entry reconstruct's and export's mask defaults cannot read: AttributeError / ValueError tracebacks
    yield _write(tmp_path, "masklist.ckpt", {**good, "reconkit": {**good["reconkit"], "mask": [4]}}), \
        "'reconkit' entry's 'mask' must be a dict, got list"
    for name, value in (("accstr", "x"), ("accnan", [4, float("nan")])):
        entry = {**good["reconkit"], "mask": {"accelerations": value}}
        yield _write(tmp_path, f"{name}.ckpt", {**good, "reconkit": entry}), \
            "'reconkit' entry's mask accelerations must be a number or a list of numbers"
    yield _write(tmp_path, "object.ckpt", {**good, "extra": _NotWeights()}), "refusing to unpickle other objects (Unsupported global"
    yield _write(tmp_path, "code.ckpt", {**good, "extra": _RunsCode()}), f"GLOBAL {os.name}.getcwd"  # what it calls
    plain_pickle = tmp_path / "pickle.ckpt"
    plain_pickle.write_bytes(pickle.dumps({"reconkit": good["reconkit"]}))
    yield str(plain_pickle), "refusing to unpickle"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # from the plain-pickle case
def test_bad_checkpoints_raise_checkpoint_error_naming_file_and_problem(tmp_path):
    cases = list(_bad_checkpoints(tmp_path))
    assert len(cases) == 25
    for path, problem in cases:
        with pytest.raises(CheckpointError) as excinfo:
            load_model(path)
        message = str(excinfo.value)
        assert isinstance(excinfo.value, ReconkitError)
        assert message.startswith(f"{path}: "), message
        assert problem in message, (path, message)
        assert "\n" not in message, message


def test_a_model_larger_than_free_memory_raises_checkpoint_error_naming_the_file(tmp_path, monkeypatch):
    """The memory check runs when the real model is built, after the checks on meta: its error was a
    ModelConfigError that did not name the checkpoint."""
    from reconkit.models import sizes

    path = tmp_path / "varnet.ckpt"
    save_model(path, build_model("varnet", **KWARGS), "varnet", KWARGS)
    monkeypatch.setattr(sizes, "available_memory", lambda: 1)  # sizes imported it by name: patched where it looks
    with pytest.raises(CheckpointError, match=f"^{path}: .*more than the .* GiB of memory free on cpu$"):
        load_model(path)


def test_an_unreadable_checkpoint_raises_checkpoint_error_naming_it(tmp_path, unreadable):
    """Reading its first bytes raised a bare PermissionError: a traceback from export and reconstruct."""
    path = tmp_path / "locked.ckpt"
    save_model(path, build_model("varnet", **KWARGS), "varnet", KWARGS)
    unreadable(path)
    with pytest.raises(CheckpointError, match=f"^{path}: cannot read the file: Permission denied$"):
        load_model(path)
