"""``reconkit demo``: runs end to end (tiny untrained ONNX model), reports a missing model, and the bundled model
beats zero-filling on the held-out demo scan and serves fastMRI-sized k-space."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from fastmri import evaluate as fm_evaluate

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
    """The printed PSNR / SSIM are fastmri.evaluate's of the written reconstructions against the scan's reference."""
    code = reconkit_main(["demo", "--output", str(tmp_path / "demo"), "--model", str(tiny_onnx)])
    out = capsys.readouterr().out
    assert code == 0
    printed = {cells[0]: cells[1:3] for line in out.splitlines()
               if len(cells := [cell.strip() for cell in line.split("│")[1:-1]]) == 4}
    assert str(tmp_path / "demo" / "png") in out
    assert len(list((tmp_path / "demo" / "png").glob("slice_*.png"))) == demo.SCAN["slices"]
    with h5py.File(tmp_path / "demo" / "scan" / "demo_scan.h5") as hf:
        target = hf["reconstruction_rss"][()]
    for method, name in (("zero-filled", "zero-filled"), ("CG-SENSE", "cg-sense"), ("VarNet (ONNX)", "varnet")):
        with h5py.File(tmp_path / "demo" / name / "h5" / "demo_scan.h5") as hf:
            reconstruction = hf["reconstruction"][()]
        expected = [f"{fm_evaluate.psnr(target, reconstruction):.2f}", f"{fm_evaluate.ssim(target, reconstruction)[0]:.4f}"]
        assert printed[method] == expected, (method, out)


def test_demo_prints_output_paths_as_they_are(tmp_path, capsys):
    """Rich read ``[test]`` in the output path as markup (``runs/[test]`` printed as ``runs/``) and wrapped a long
    path over two lines of a log file."""
    output = tmp_path / "a_rather_long_folder_name_for_the_demo_outputs" / "[test]"
    demo.print_table([demo.DemoRow("zero-filled", 25.0, 0.7, 0.01)], output)
    lines = capsys.readouterr().out.splitlines()
    assert f"PNG panels (zero-filled | VarNet | reference | error): {output / 'png'}/" in lines
    scan = output / "scan" / "demo_scan.h5"
    assert f"scan: {scan}; reconstructions: {output}/{{zero-filled,cg-sense,varnet}}/h5/" in lines


def test_demo_missing_model_is_one_line(tmp_path, capsys):
    assert demo.main(["--output", str(tmp_path), "--model", str(tmp_path / "none.onnx")]) == 2  # as reconstruct's
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "none.onnx" in err and "not found" in err


def test_installed_package_without_bundled_model(tmp_path, monkeypatch, capsys):
    """Installed from a wheel, the default model was looked for at ``<site-packages>/../../checkpoints`` and the
    error sent the user to data_scripts/, which the package lacks; now the working directory's checkpoints/ is
    used, or one line says where the model is and to pass --model."""
    monkeypatch.setattr(demo, "BUNDLED_ONNX", tmp_path / "site" / "checkpoints" / "varnet_small.onnx")
    monkeypatch.chdir(tmp_path)
    assert demo.main(["--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "source repository" in err and "--model PATH" in err, err
    assert not (tmp_path / "out").exists()
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "varnet_small.onnx").write_bytes(b"")
    assert demo.bundled_model() == Path("checkpoints/varnet_small.onnx")


def test_demo_output_that_cannot_be_written_is_one_line(tmp_path, capsys):
    """An --output below a file (or in a read-only folder) ended in a NotADirectoryError / PermissionError
    traceback; then it was exit 1 and an errno line, found after simulating the scan. Now exit 2 before any work,
    naming the option, as reconstruct, evaluate and simulate do."""
    (tmp_path / "a_file").write_text("")
    output = tmp_path / "a_file" / "demo"
    assert demo.main(["--output", str(output), "--model", str(demo.BUNDLED_ONNX)]) == 2
    err = capsys.readouterr().err
    assert err == f"reconkit demo: --output {output}: {tmp_path / 'a_file'} exists and is not a directory\n"


def test_demo_negative_seed_is_one_line_before_any_work(tmp_path, capsys):
    """``--seed -1`` ended in numpy's ValueError traceback (exit 1) after the demo had begun writing; reconstruct and
    simulate refuse it in one line, exit 2."""
    assert demo.main(["--output", str(tmp_path / "out"), "--model", str(demo.BUNDLED_ONNX), "--seed", "-1"]) == 2
    assert capsys.readouterr().err == "reconkit demo: --seed must be a non-negative integer, got -1\n"
    assert not (tmp_path / "out").exists()


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


FASTMRI_SIZES = {(640, 368), (640, 372), (640, 320), (768, 396), (640, 272)}


def test_bundled_onnx_serves_fastmri_sizes_and_reconstructs_a_knee_sized_scan(tmp_path):
    """The bundled graph has a branch for each fastMRI k-space size; on a held-out 640 × 368 scan (real subject,
    8 coils, 4×) it agrees with the checkpoint and clearly beats zero-filling."""
    from reconkit.data import read_volume
    from reconkit.data.simulate import simulate_volume, write_volume
    from reconkit.export import load_onnx_metadata
    from reconkit.inference import load_reconstructor, reconstruct_volume, volume_mask
    from reconkit.metrics import volume_metrics

    sizes = {tuple(size) for size in load_onnx_metadata(demo.BUNDLED_ONNX)["reconkit.spatial_sizes"]}
    assert sizes >= FASTMRI_SIZES
    scan = simulate_volume(5, source="dipy_b0", coils=8, slices=2, encoded_size=(640, 368), recon_size=(320, 320),
                           snr_db=32.0)
    volume = read_volume(write_volume(scan, tmp_path / "knee_sized.h5"))
    mask, _ = volume_mask(volume, "equispaced_fraction", 4, 0.08, seed=None)
    models = {"onnx": str(demo.BUNDLED_ONNX), "torch": str(demo.BUNDLED_ONNX.with_suffix(".ckpt")),
              "zero-filled": "zero-filled"}
    results = {name: reconstruct_volume(volume, load_reconstructor(model), mask, batch_size=1)
               for name, model in models.items()}
    scores = {name: volume_metrics(result.target, result.reconstruction) for name, result in results.items()}
    gap = np.abs(results["onnx"].reconstruction - results["torch"].reconstruction).max()
    assert gap <= 1e-4 * results["torch"].reconstruction.max()
    assert scores["onnx"]["PSNR"] > scores["zero-filled"]["PSNR"] + 3.0
    assert scores["onnx"]["SSIM"] > scores["zero-filled"]["SSIM"] + 0.02
