"""``reconkit demo``: runs end to end (tiny untrained ONNX model), reports a missing model, and the bundled model
beats zero-filling on the held-out demo scan."""

from __future__ import annotations

import pytest

from reconkit.cli import demo
from reconkit.cli.main import main as reconkit_main


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    import torch

    from reconkit.export import export_onnx
    from reconkit.models import build_model

    torch.manual_seed(0)
    model = build_model("varnet", num_cascades=1, sens_chans=2, sens_pools=1, chans=2, pools=1)
    path = tmp_path_factory.mktemp("model") / "tiny.onnx"
    return export_onnx(model, path, example_shape=(8, *demo.SCAN["encoded_size"]))


def test_demo_end_to_end(tmp_path, tiny_onnx, capsys):
    code = reconkit_main(["demo", "--output", str(tmp_path / "demo"), "--model", str(tiny_onnx)])
    out = capsys.readouterr().out
    assert code == 0
    for method in ("zero-filled", "CG-SENSE", "VarNet (ONNX)"):
        assert method in out
    assert str(tmp_path / "demo" / "png") in out.replace("\n", "")
    assert len(list((tmp_path / "demo" / "png").glob("slice_*.png"))) == demo.SCAN["slices"]
    for name in ("zero-filled", "cg-sense", "varnet"):
        assert (tmp_path / "demo" / name / "h5" / "demo_scan.h5").is_file()


def test_demo_missing_model_is_one_line(tmp_path, capsys):
    assert demo.main(["--output", str(tmp_path), "--model", str(tmp_path / "none.onnx")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "none.onnx" in err and "not found" in err


def test_bundled_model_beats_zero_filled(tmp_path):
    assert demo.BUNDLED_ONNX.is_file(), f"bundled model missing: {demo.BUNDLED_ONNX}"
    rows = {row.method: row for row in demo.run_demo(tmp_path, demo.BUNDLED_ONNX)}
    assert rows["VarNet (ONNX)"].ssim > rows["zero-filled"].ssim + 0.05
    assert rows["VarNet (ONNX)"].psnr > rows["zero-filled"].psnr


def test_help_has_example(capsys):
    with pytest.raises(SystemExit) as exit_info:
        reconkit_main(["demo", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--output" in text and "--model" in text and "reconkit demo --output demo_output" in text
