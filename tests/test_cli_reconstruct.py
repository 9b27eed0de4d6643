"""``reconkit reconstruct`` on fastMRI-layout files written with the fastmri package, bad files, all formats."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import fastmri
import h5py
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from fastmri import evaluate as fastmri_evaluate
from fastmri.data import subsample as fastmri_subsample
from fastmri.data import transforms as fastmri_transforms

from reconkit.cli.main import main as reconkit_main
from reconkit.inference import load_reconstructor


def fastmri_header(height: int, width: int, recon: tuple[int, int], lines: int, fov_mm=(200.0, 160.0, 3.0)) -> str:
    """ISMRMRD header as fastMRI files carry it: encoded (H, W), recon size, acquired lines centred in W."""
    padding_left = (width - lines) // 2
    center = width // 2 - padding_left
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><encoding>'
        f"<encodedSpace><matrixSize><x>{height}</x><y>{width}</y><z>1</z></matrixSize>"
        f"<fieldOfView_mm><x>{2 * fov_mm[0]}</x><y>{fov_mm[1]}</y><z>{fov_mm[2]}</z></fieldOfView_mm></encodedSpace>"
        f"<reconSpace><matrixSize><x>{recon[0]}</x><y>{recon[1]}</y><z>1</z></matrixSize>"
        f"<fieldOfView_mm><x>{fov_mm[0]}</x><y>{fov_mm[0] * recon[1] / recon[0]}</y><z>{fov_mm[2]}</z>"
        "</fieldOfView_mm></reconSpace><encodingLimits><kspace_encoding_step_1><minimum>0</minimum>"
        f"<maximum>{lines - 1}</maximum><center>{center}</center></kspace_encoding_step_1></encodingLimits>"
        "</encoding></ismrmrdHeader>"
    )


def phantom_coil_images(rng: np.random.Generator, slices: int, coils: int, height: int, width: int) -> np.ndarray:
    """Complex coil images ``(slices, coils, H, W)``: ellipses times smooth Gaussian coil sensitivities."""
    yy, xx = np.mgrid[:height, :width] / np.array([height, width])[:, None, None] - 0.5
    images = []
    for s in range(slices):
        body = ((yy / 0.22) ** 2 + (xx / 0.35) ** 2 < 1) * (1.0 + 0.1 * s)
        body = body + 0.6 * ((yy / 0.08) ** 2 + ((xx - 0.1) / 0.12) ** 2 < 1) + 0.05 * rng.random((height, width))
        phase = np.exp(1j * (2.0 * xx + rng.normal() * yy))
        angles = 2 * np.pi * np.arange(coils) / coils
        sens = np.stack([np.exp(-((yy - 0.4 * np.sin(a)) ** 2 + (xx - 0.4 * np.cos(a)) ** 2) / 0.1) for a in angles])
        images.append(sens * body * phase)
    return np.asarray(images, dtype=np.complex64) * 1e-3


def write_fastmri_file(
    path: Path,
    rng: np.random.Generator,
    slices: int = 2,
    coils: int = 4,
    height: int = 64,
    width: int = 48,
    recon: tuple[int, int] = (32, 32),
    lines: int | None = None,
    single_coil: bool = False,
) -> None:
    """A fastMRI-layout file made with fastmri's own functions (``fft2c``, ``rss``, ``center_crop``) and h5py."""
    lines = width if lines is None else lines
    images = phantom_coil_images(rng, slices, 1 if single_coil else coils, height, width)
    kspace = fastmri.fft2c(fastmri_transforms.to_tensor(images))
    left = (width - lines) // 2
    kspace[..., :left, :] = 0
    kspace[..., left + lines :, :] = 0
    coil_images = fastmri.ifft2c(kspace)
    target = fastmri.rss(fastmri.complex_abs(coil_images), dim=1)
    target = fastmri_transforms.center_crop(target, recon).numpy()
    kspace_np = torch.view_as_complex(kspace.contiguous()).numpy()
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=kspace_np[:, 0] if single_coil else kspace_np)
        f.create_dataset("reconstruction_esc" if single_coil else "reconstruction_rss", data=target)
        f.create_dataset("ismrmrd_header", data=fastmri_header(height, width, recon, lines))
        f.attrs.update({"acquisition": "CORPD_FBK", "max": float(target.max()), "norm": 1.0, "patient_id": "p01"})


def fastmri_zero_filled(path: Path, acceleration: int = 4, center_fraction: float = 0.08) -> np.ndarray:
    """fastmri's zero-filled reconstruction with its own equispaced-fraction mask seeded by the file name."""
    with h5py.File(path) as f:
        kspace = fastmri_transforms.to_tensor(f["kspace"][()])
        recon = f["reconstruction_rss"].shape[-2:]
    mask_func = fastmri_subsample.EquispacedMaskFractionFunc([center_fraction], [acceleration])
    masked, _, _ = fastmri_transforms.apply_mask(kspace, mask_func, seed=tuple(map(ord, path.name)))
    image = fastmri.rss(fastmri.complex_abs(fastmri.ifft2c(masked)), dim=1)
    return fastmri_transforms.center_crop(image, recon).numpy()


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = reconkit_main(["reconstruct", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_fastmri_file_zero_filled_matches_fastmri_and_is_scored_by_fastmri(tmp_path, capsys):
    rng = np.random.default_rng(0)
    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(2):
        write_fastmri_file(scans / f"file100{i}.h5", rng)
    code, out, err = _run(capsys, str(scans), "--model", "zero-filled", "--output", str(tmp_path / "out"))
    assert code == 0, err
    assert "file1000.h5" in out and "file1001.h5" in out
    for i in range(2):
        with h5py.File(tmp_path / "out" / "h5" / f"file100{i}.h5") as f:
            ours = f["reconstruction"][()]
            assert f["reconstruction"].dtype == np.float32
        np.testing.assert_allclose(ours, fastmri_zero_filled(scans / f"file100{i}.h5"), rtol=1e-4, atol=1e-9)
    args = argparse.Namespace(
        target_path=scans, predictions_path=tmp_path / "out" / "h5", acquisition=None, acceleration=None
    )
    metrics = fastmri_evaluate.evaluate(args, "reconstruction_rss").means()
    assert 0.0 < metrics["NMSE"] < 0.5 and metrics["SSIM"] > 0.3


def test_onnx_of_a_bare_module_runs_with_the_cli_mask_defaults(tmp_path, capsys):
    """An ONNX file exported from a module (no checkpoint: mask family "unknown" in its metadata, and a graph that
    never reads the mask) reconstructs with the CLI's default mask, equal to the built-in baseline."""
    from reconkit.export import export_onnx, load_onnx_metadata
    from reconkit.models import build_model

    write_fastmri_file(tmp_path / "scan.h5", np.random.default_rng(8), slices=2, coils=3, height=32, width=24,
                       recon=(16, 16))
    onnx_path = export_onnx(build_model("zero_filled"), tmp_path / "zf.onnx", (3, 32, 24))
    assert load_onnx_metadata(onnx_path)["reconkit.mask_family"] == "unknown"
    assert load_reconstructor(str(onnx_path)).mask_defaults == {}
    upper = tmp_path / "ZF.ONNX"  # the suffix in capitals (copied from Windows / a scanner console): still ONNX
    upper.write_bytes(onnx_path.read_bytes())
    outputs = {}
    for model, name in ((str(onnx_path), "onnx"), (str(upper), "upper"), ("zero-filled", "builtin")):
        code, out, err = _run(capsys, str(tmp_path / "scan.h5"), "--model", model, "--output", str(tmp_path / name))
        assert code == 0, err
        assert ("(onnx)" in out) == (name != "builtin")
        with h5py.File(tmp_path / name / "h5" / "scan.h5") as f:
            outputs[name] = f["reconstruction"][()]
    np.testing.assert_allclose(outputs["onnx"], outputs["builtin"], rtol=1e-4, atol=1e-5 * outputs["builtin"].max())
    np.testing.assert_array_equal(outputs["upper"], outputs["onnx"])
    assert load_reconstructor(str(upper), backend="onnx").backend == "onnx"


def test_onnx_metadata_of_the_wrong_shape_is_one_line_naming_file_and_key(tmp_path, capsys):
    """A model file from elsewhere whose ``reconkit.*`` metadata is JSON of another shape (sizes as a number or as
    triples, an acceleration as an object or NaN) or arrays nested thousands deep ended reconstruct with a
    TypeError / ValueError / RecursionError traceback; the error names the file and the key, and quotes at most
    the first 80 characters of a value that may be megabytes long."""
    import onnx

    from reconkit.export import export_onnx
    from reconkit.models import build_model

    write_fastmri_file(tmp_path / "scan.h5", np.random.default_rng(8), slices=1, coils=3, height=32, width=24,
                       recon=(16, 16))
    proto = onnx.load(str(export_onnx(build_model("zero_filled"), tmp_path / "zf.onnx", (3, 32, 24))))
    cases = {"reconkit.spatial_sizes": ("5", "[[32, 24, 1]]", "[" * 100_000 + "]" * 100_000),
             "reconkit.acceleration": ('{"x": 4}', "[NaN]"), "reconkit.weight_aliases": ("[]",)}
    for key, values in cases.items():
        for value in values:
            bad = onnx.ModelProto()
            bad.CopyFrom(proto)
            next(entry for entry in bad.metadata_props if entry.key == key).value = value
            onnx.save(bad, str(tmp_path / "bad.onnx"))
            code, _, err = _run(capsys, str(tmp_path / "scan.h5"), "--model", str(tmp_path / "bad.onnx"),
                                "--output", str(tmp_path / "out"))  # fmt: skip
            assert code == 2, (value[:20], err)
            assert err.startswith(f"reconkit reconstruct: {tmp_path / 'bad.onnx'}: metadata {key!r} "), err
            assert len(err.splitlines()) == 1 and len(err) < 400, err[:400]


def test_onnx_file_without_reconkit_metadata_fails_on_other_sizes_file_by_file(tmp_path, capsys):
    """A contract graph without ``reconkit.spatial_sizes`` (an optimiser dropped the metadata, or another tool made
    it) and fixed to one size: a scan of another size is that file's one-line error naming the scan and ONNX
    Runtime's reason; the other files are still written (the CLI stopped with a traceback)."""
    import onnx

    from reconkit.export import export_onnx
    from reconkit.models import build_model

    rng = np.random.default_rng(9)
    scans = tmp_path / "scans"
    scans.mkdir()
    write_fastmri_file(scans / "a_fits.h5", rng, slices=2, coils=3, height=32, width=24, recon=(16, 16))
    write_fastmri_file(scans / "b_other.h5", rng, slices=2, coils=3, height=40, width=30, recon=(16, 16))
    proto = onnx.load(str(export_onnx(build_model("zero_filled"), tmp_path / "zf.onnx", (3, 32, 24))))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "bare.onnx"))
    code, _, err = _run(capsys, str(scans), "--model", str(tmp_path / "bare.onnx"), "--output", str(tmp_path / "o"))
    assert code == 1
    assert (tmp_path / "o" / "h5" / "a_fits.h5").is_file() and not (tmp_path / "o" / "h5" / "b_other.h5").exists()
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: {scans / 'b_other.h5'}: model bare.onnx: ONNX Runtime failed on masked_kspace "
                           "[2, 3, 40, 30, 2]"), line
    assert "Got: 40 Expected: 32" in line


def test_cg_sense_all_formats_with_header_geometry(tmp_path, capsys):
    rng = np.random.default_rng(1)
    scan = tmp_path / "knee.h5"
    write_fastmri_file(scan, rng, slices=3, coils=6, lines=40)  # zero-padded columns outside the acquired window
    code, _, err = _run(
        capsys,
        str(scan),
        "--model",
        "cg-sense",
        "--output",
        str(tmp_path / "out"),
        "--format",  # aliases and any case: written under out/h5, out/nifti, out/dicom, out/png
        "hdf5",
        "nii",
        "DICOM",
        "png",
        "--batch-size",
        "2",
        "--acceleration",
        "2",
    )
    assert code == 0, err
    with h5py.File(tmp_path / "out" / "h5" / "knee.h5") as f:
        cg = f["reconstruction"][()]
    with h5py.File(scan) as f:
        target = f["reconstruction_rss"][()]
    zero_filled = fastmri_zero_filled(scan, acceleration=2)
    assert cg.shape == target.shape == (3, 32, 32)
    assert fastmri_evaluate.nmse(target, cg) < fastmri_evaluate.nmse(target, zero_filled)
    nifti = nib.load(tmp_path / "out" / "nifti" / "knee.nii.gz")
    assert nifti.shape == (32, 32, 3)
    assert nifti.header.get_zooms() == pytest.approx((200.0 / 32, 200.0 / 32, 3.0))
    slices = sorted((tmp_path / "out" / "dicom" / "knee").iterdir())
    assert [p.name for p in slices] == ["slice_000.dcm", "slice_001.dcm", "slice_002.dcm"]
    ds = pydicom.dcmread(slices[1])
    assert [float(v) for v in ds.PixelSpacing] == pytest.approx([200.0 / 32, 200.0 / 32])
    assert float(ds.SliceThickness) == pytest.approx(3.0) and ds.PatientID == "p01"
    slope = float(ds.RealWorldValueMappingSequence[0].RealWorldValueSlope)
    np.testing.assert_allclose(ds.pixel_array * slope, cg[1], atol=slope)
    assert len(list((tmp_path / "out" / "png" / "knee").glob("slice_*.png"))) == 3


def test_already_undersampled_input_is_used_as_is(tmp_path, capsys):
    rng = np.random.default_rng(2)
    full = tmp_path / "full.h5"
    write_fastmri_file(full, rng)
    columns = np.zeros(48, np.float32)
    columns[::3] = 1
    columns[20:28] = 1
    for name, store_mask in (("with_mask.h5", True), ("zero_columns.h5", False)):
        with h5py.File(full) as src, h5py.File(tmp_path / name, "w") as dst:
            dst.create_dataset("kspace", data=src["kspace"][()] * columns)
            dst.create_dataset("ismrmrd_header", data=src["ismrmrd_header"][()])
            if store_mask:
                dst.create_dataset("mask", data=columns)
            dst.attrs.update(dict(src.attrs))
    out = tmp_path / "out"
    code, _, err = _run(
        capsys,
        str(tmp_path / "with_mask.h5"),
        str(tmp_path / "zero_columns.h5"),
        "--model",
        "zero-filled",
        "--output",
        str(out),
        "--acceleration",
        "8",
    )
    assert code == 0, err
    with h5py.File(full) as f:
        masked = fastmri_transforms.to_tensor(f["kspace"][()] * columns)
    expected = fastmri_transforms.center_crop(fastmri.rss(fastmri.complex_abs(fastmri.ifft2c(masked)), dim=1), (32, 32))
    for name in ("with_mask.h5", "zero_columns.h5"):
        with h5py.File(out / "h5" / name) as f:
            np.testing.assert_allclose(f["reconstruction"][()], expected.numpy(), rtol=1e-4, atol=1e-9)
    # the --acceleration asked for was not applied: each file says so, naming how it was undersampled
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 2, err
    assert "with_mask.h5" in notes[0] and "its 'mask' dataset" in notes[0] and "--acceleration 8 not applied" in notes[0]
    assert "zero_columns.h5" in notes[1] and "columns left empty" in notes[1] and "--acceleration 8" in notes[1]
    # no note for a stored mask where nothing was asked for, nor where the mask options were applied; empty
    # columns without a stored mask are always noted (a header wider than its data would look the same)
    code, _, err = _run(capsys, str(tmp_path / "with_mask.h5"), "--model", "zero-filled", "--output", str(out))
    assert code == 0 and "note:" not in err, err
    code, _, err = _run(capsys, str(tmp_path / "zero_columns.h5"), "--model", "zero-filled", "--output", str(out))
    (note,) = [line for line in err.splitlines() if line.startswith("note:")]
    assert code == 0 and "columns left empty" in note and "no retrospective mask applied" in note, err
    code, _, err = _run(capsys, str(full), "--model", "zero-filled", "--output", str(out), "--acceleration", "8")
    assert code == 0 and "note:" not in err, err


def test_encoding_limits_outside_the_kspace_are_noted_and_the_width_used(tmp_path, capsys):
    rng = np.random.default_rng(6)
    write_fastmri_file(tmp_path / "good.h5", rng)
    with h5py.File(tmp_path / "good.h5") as src, h5py.File(tmp_path / "bad_limits.h5", "w") as dst:
        for key in ("kspace", "reconstruction_rss"):
            dst.create_dataset(key, data=src[key][()])
        header = src["ismrmrd_header"][()].decode()
        dst.create_dataset("ismrmrd_header", data=re.sub(r"<center>\d+</center>", "<center>300</center>", header))
        dst.attrs.update(dict(src.attrs))
    out = tmp_path / "out"
    code, _, err = _run(capsys, str(tmp_path / "good.h5"), str(tmp_path / "bad_limits.h5"), "--model", "zero-filled",
                        "--output", str(out), "--seed", "0")  # one mask for both files
    assert code == 0, err
    (note,) = [line for line in err.splitlines() if line.startswith("note:")]
    assert "bad_limits.h5" in note and "[-276, -228)" in note and "outside the 48 columns" in note
    assert "columns [0, 48) are taken as acquired" in note
    with h5py.File(out / "h5" / "good.h5") as a, h5py.File(out / "h5" / "bad_limits.h5") as b:
        np.testing.assert_array_equal(a["reconstruction"][()], b["reconstruction"][()])  # the whole width, as good.h5


def test_a_recon_size_beyond_the_kspace_is_noted_and_clipped(tmp_path, capsys):
    path = tmp_path / "wide_recon.h5"
    write_fastmri_file(path, np.random.default_rng(7), height=64, width=48)
    with h5py.File(path, "r+") as f:
        del f["ismrmrd_header"]
        f.create_dataset("ismrmrd_header", data=fastmri_header(64, 48, (32, 70), 48))
    code, _, err = _run(capsys, str(path), "--model", "zero-filled", "--output", str(tmp_path / "out"), "--format",
                        "h5", "nifti")
    assert code == 0, err
    (note,) = [line for line in err.splitlines() if line.startswith("note:")]
    assert "wide_recon.h5: the header's recon size 32x70 is larger than the 64x48 k-space; the images are 32x48" in note
    with h5py.File(tmp_path / "out" / "h5" / "wide_recon.h5") as f:
        assert f["reconstruction"].shape == (2, 32, 48)
    # the 48 columns keep the k-space grid: encoded FOV (160 mm) / 48, not the recon matrix's 6.25 mm; rows: 200 / 32
    zooms = nib.load(tmp_path / "out" / "nifti" / "wide_recon.nii.gz").header.get_zooms()
    np.testing.assert_allclose(zooms[:2], (160 / 48, 200 / 32), rtol=1e-6)


def test_bad_inputs_one_line_each_others_written(tmp_path, capsys):
    rng = np.random.default_rng(3)
    scans = tmp_path / "scans"
    scans.mkdir()
    write_fastmri_file(scans / "good.h5", rng)
    write_fastmri_file(scans / "truncated.h5", rng)
    data = (scans / "truncated.h5").read_bytes()
    (scans / "truncated.h5").write_bytes(data[: len(data) // 2])
    (scans / "empty.h5").write_bytes(b"")
    (scans / "corrupt.h5").write_bytes(b"this is not an HDF5 file at all" * 10)
    with h5py.File(scans / "schema.h5", "w") as f:
        f.create_dataset("image", data=np.zeros((2, 8, 8), np.float32))
    write_fastmri_file(scans / "nonfinite.h5", rng)  # one NaN sample: a clear input error, not a NaN image
    with h5py.File(scans / "nonfinite.h5", "r+") as f:
        kspace = f["kspace"][()]
        kspace[1, 0, 3, 5] = np.nan
        f["kspace"][...] = kspace
    out = tmp_path / "out"
    (tmp_path / "other").mkdir()
    write_fastmri_file(tmp_path / "other" / "good.h5", rng)  # same name as scans/good.h5
    code, stdout, err = _run(
        capsys,
        str(scans),
        str(tmp_path / "other" / "good.h5"),
        str(tmp_path / "missing.h5"),
        "--model",
        "zero-filled",
        "--output",
        str(out),
        "--format",
        "h5",
        "nifti",
        "dicom",
        "png",
    )
    assert code == 1
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 7, err
    assert sum("other/good.h5" in line and "same output name (good)" in line for line in error_lines) == 1
    for name, problem in (
        ("truncated.h5", "truncated"),
        ("empty.h5", "empty"),
        ("corrupt.h5", "not an HDF5"),
        ("schema.h5", "kspace"),
        ("missing.h5", "not found"),
        ("nonfinite.h5", "1 NaN / inf values (first at index (1, 0, 3, 5))"),
    ):
        assert sum(name in line and problem in line for line in error_lines) == 1, (name, error_lines)
    assert "good.h5" in stdout and "1 of 8 file(s) written" in stdout
    # the good file is complete in every format; nothing else (no temporary or partial files) was written
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == [
        "dicom/good/slice_000.dcm",
        "dicom/good/slice_001.dcm",
        "h5/good.h5",
        "nifti/good.nii.gz",
        "png/good/slice_000.png",
        "png/good/slice_001.png",
    ]


def test_a_byte_string_patient_id_is_the_dicom_patient_id(tmp_path, capsys):
    """An HDF5 fixed-length string attribute reads as ``numpy.bytes_``: its text is the DICOM PatientID, not its
    ``b'...'`` repr."""
    write_fastmri_file(tmp_path / "scan.h5", np.random.default_rng(9), slices=1)
    with h5py.File(tmp_path / "scan.h5", "a") as f:
        f.attrs["patient_id"] = np.bytes_(b"subj01")
    code, _, err = _run(capsys, str(tmp_path / "scan.h5"), "--model", "zero-filled", "--output", str(tmp_path / "out"),
                        "--format", "dicom")  # fmt: skip
    assert code == 0, err
    ds = pydicom.dcmread(tmp_path / "out" / "dicom" / "scan" / "slice_000.dcm")
    assert ds.PatientID == "subj01" and str(ds.PatientName) == "subj01"


def test_an_input_that_is_its_own_h5_output_is_refused_not_overwritten(tmp_path, capsys):
    """Scans kept in ``data/h5/`` and ``--output data``: ``data/h5/a.h5`` would be replaced by its reconstruction.
    That file is an error and left as it is; the others are written."""
    rng = np.random.default_rng(10)
    (tmp_path / "data" / "h5").mkdir(parents=True)
    write_fastmri_file(tmp_path / "data" / "h5" / "a.h5", rng, slices=1)
    write_fastmri_file(tmp_path / "b.h5", rng, slices=1)
    before = (tmp_path / "data" / "h5" / "a.h5").read_bytes()
    code, _, err = _run(capsys, str(tmp_path / "data" / "h5"), str(tmp_path / "b.h5"), "--model", "zero-filled",
                        "--output", str(tmp_path / "data"), "--format", "h5", "nifti")  # fmt: skip
    assert code == 1
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert "a.h5" in line and "is the input file itself" in line
    assert (tmp_path / "data" / "h5" / "a.h5").read_bytes() == before
    assert not (tmp_path / "data" / "nifti" / "a.nii.gz").exists()
    with h5py.File(tmp_path / "data" / "h5" / "b.h5") as f:
        assert f["reconstruction"].shape == (1, 32, 32)


def test_a_stale_image_index_is_ignored_and_an_unexpected_error_fails_one_file(tmp_path, capsys, monkeypatch):
    """An ``image_index`` attribute on a fastMRI file (only read_ismrmrd_raw's own describes images) ended the whole
    batch with an IndexError; it is ignored. Any other unexpected exception in one file is that file's error line,
    and the batch goes on."""
    import reconkit.cli.reconstruct as cli

    rng = np.random.default_rng(12)
    for name in ("a.h5", "b.h5", "c.h5"):
        write_fastmri_file(tmp_path / name, rng, slices=2)
    with h5py.File(tmp_path / "a.h5", "r+") as f:
        f.attrs["image_index"] = '[{"slice": 0, "contrast": 0}, {"slice": 7, "contrast": 3}, {"slice": 9}]'
    real = cli.reconstruct_volume

    def failing_for_b(volume, *args, **kwargs):
        if volume.info.path.name == "b.h5":
            raise KeyError("something unforeseen")
        return real(volume, *args, **kwargs)

    monkeypatch.setattr(cli, "reconstruct_volume", failing_for_b)
    code, stdout, err = _run(capsys, *(str(tmp_path / n) for n in ("a.h5", "b.h5", "c.h5")), "--model",
                             "zero-filled", "--output", str(tmp_path / "out"), "--format", "h5", "nifti", "dicom")  # fmt: skip
    assert code == 1
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert "b.h5" in line and "KeyError" in line and "something unforeseen" in line
    assert "2 of 3 file(s) written" in stdout
    with h5py.File(tmp_path / "out" / "h5" / "a.h5") as f:
        assert f["reconstruction"].shape[0] == 2 and "image_index" not in f.attrs
    assert len(list((tmp_path / "out" / "dicom" / "a").glob("*.dcm"))) == 2
    assert (tmp_path / "out" / "nifti" / "c.nii.gz").is_file()


def test_a_rerun_replaces_each_series_whole_and_names_the_earlier_outputs_a_failed_file_leaves(tmp_path, capsys,
                                                                                                  monkeypatch):
    """A second run into one --output: a scan with fewer slices replaces its DICOM / PNG series whole (no slice of
    the first run stays in the folder a viewer loads as one series). A scan that now fails left its first-run
    outputs without a word, and ``reconkit evaluate`` scored that h5 as this run's: a note: line names what was not
    replaced, and only that (not what this run wrote before the failure)."""
    import reconkit.cli.reconstruct as cli

    scan, out = tmp_path / "scan.h5", tmp_path / "out"
    write_fastmri_file(scan, np.random.default_rng(4), slices=3)
    options = ["--model", "zero-filled", "--output", str(out), "--format", "h5", "dicom", "png"]
    assert _run(capsys, str(scan), *options)[0] == 0
    write_fastmri_file(scan, np.random.default_rng(5), slices=2)
    assert _run(capsys, str(scan), *options)[0] == 0
    for series in (out / "dicom" / "scan", out / "png" / "scan"):
        assert sorted(p.stem for p in series.iterdir()) == ["slice_000", "slice_001"]
    assert len({pydicom.dcmread(p).SeriesInstanceUID for p in (out / "dicom" / "scan").iterdir()}) == 1

    real_dicom = cli.write_dicom_series

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli, "write_dicom_series", disk_full)  # after the h5 output is written
    code, _, err = _run(capsys, str(scan), *options)
    assert code == 1 and f"note: {scan}: not replaced, from an earlier run: {out / 'dicom' / 'scan'}, " \
                         f"{out / 'png' / 'scan'}\n" in err
    monkeypatch.setattr(cli, "write_dicom_series", real_dicom)
    scan.write_bytes(b"no longer a scan")
    code, _, err = _run(capsys, str(scan), "--model", "zero-filled", "--output", str(out), "--format", "h5", "nifti")
    assert code == 1 and err.endswith(f"note: {scan}: not replaced, from an earlier run: {out / 'h5' / 'scan.h5'}\n")


def test_an_image_index_in_the_file_cannot_name_outputs_outside_the_output_folder(tmp_path, capsys):
    """A fastMRI file's own ``acquisition`` / ``image_index`` attrs pass for read_ismrmrd_raw's: a series index
    ``"/../../../escaped"`` became the output name ``out/nifti/a_contrast/../../../escaped.nii.gz``, and DICOM and
    PNG replaced whatever directory that named. The file fails alone, naming the attribute."""
    rng = np.random.default_rng(13)
    scans = tmp_path / "scans"
    scans.mkdir()
    write_fastmri_file(scans / "a.h5", rng, slices=2)
    write_fastmri_file(scans / "b.h5", rng, slices=2)
    with h5py.File(scans / "a.h5", "r+") as f:
        f.attrs["acquisition"] = "ismrmrd_raw"
        f.attrs["image_index"] = '[{"slice": 0, "contrast": "/../../../escaped"}, {"slice": 0, "contrast": 1}]'
    out = tmp_path / "run" / "out"
    code, stdout, err = _run(capsys, str(scans), "--model", "zero-filled", "--output", str(out),
                             "--format", "nifti", "dicom", "png")  # fmt: skip
    assert code == 1
    assert not list(tmp_path.glob("**/escaped*"))
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert "a.h5" in line and "image_index: contrast must be an integer from 0 to 65535" in line, line
    assert "1 of 2 file(s) written" in stdout and (out / "nifti" / "b.nii.gz").is_file()


def test_names_that_differ_after_a_dot_keep_separate_outputs(tmp_path, capsys):
    """``sub01.run1.h5`` and ``sub01.run2.h5`` get ``sub01.run1.nii.gz`` and ``sub01.run2.nii.gz``; ``a.h5`` and
    ``a.hdf5``, whose NIfTI / DICOM / PNG outputs would share a name, are a clash reported for the second one."""
    rng = np.random.default_rng(5)
    scans = tmp_path / "scans"
    scans.mkdir()
    write_fastmri_file(scans / "sub01.run1.h5", rng, slices=2)
    write_fastmri_file(scans / "sub01.run2.h5", rng, slices=3)
    write_fastmri_file(scans / "a.h5", rng)
    write_fastmri_file(scans / "a.hdf5", rng)
    out = tmp_path / "out"
    code, _, err = _run(capsys, str(scans), "--model", "zero-filled", "--output", str(out), "--format", "h5",
                             "nifti", "dicom", "png")
    assert code == 1
    (clash,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert "a.hdf5" in clash and "same output name (a)" in clash
    for stem, slices in (("sub01.run1", 2), ("sub01.run2", 3)):
        assert nib.load(out / "nifti" / f"{stem}.nii.gz").shape[2] == slices
        assert len(list((out / "dicom" / stem).glob("*.dcm"))) == slices
        assert len(list((out / "png" / stem).glob("*.png"))) == slices
        assert (out / "h5" / f"{stem}.h5").is_file()
    assert (out / "nifti" / "a.nii.gz").is_file() and not (out / "h5" / "a.hdf5").exists()


def test_summary_prints_file_names_and_errors_as_they_are(tmp_path, capsys):
    """The summary table read names and error messages as Rich markup: ``s[t2].h5`` printed as ``s.h5``."""
    write_fastmri_file(tmp_path / "s[t2].h5", np.random.default_rng(8))
    (tmp_path / "[b]x.h5").write_bytes(b"not hdf5")
    code, out, _ = _run(capsys, str(tmp_path / "s[t2].h5"), str(tmp_path / "[b]x.h5"), "--model", "zero-filled",
                        "--output", str(tmp_path / "o"), "--format", "h5")  # fmt: skip
    assert code == 1 and "s[t2].h5" in out and "[b]x.h5" in out


def test_a_clean_run_into_a_log_file_writes_nothing_on_stderr(tmp_path, capsys):
    """The progress bars, which show nothing off a terminal, left an empty line on stderr: ``2> errors.log`` was
    never empty."""
    write_fastmri_file(tmp_path / "a.h5", np.random.default_rng(7))
    code, out, err = _run(capsys, str(tmp_path / "a.h5"), "--model", "zero-filled", "--output", str(tmp_path / "o"),
                          "--format", "h5")  # fmt: skip
    assert code == 0 and "a.h5" in out and err == ""


def _long_named_scans(tmp_path: Path) -> list[str]:
    """Two scans and a bad file named as fastMRI's brain files; the arguments that reconstruct them."""
    for name in ("file_brain_AXFLAIR_200_6002462.h5", "file_brain_AXFLAIR_200_6002471.h5"):
        write_fastmri_file(tmp_path / name, np.random.default_rng(8))
    (tmp_path / "file_brain_AXT2_209_2090296.h5").write_bytes(b"not hdf5")
    return [*map(str, sorted(tmp_path.glob("file_*.h5"))), "--model", "zero-filled", "--output", str(tmp_path / "o"),
            "--format", "h5"]


def test_summary_in_a_log_file_keeps_long_file_names_whole(tmp_path, capsys):
    """Rich's 80 columns cut fastMRI's brain file names in a log file or a pipe (``file_brain_AXFLAIR_200_600…``
    for both of two files) and the path in an error message."""
    code, out, _ = _run(capsys, *_long_named_scans(tmp_path))
    assert code == 1 and "\u2026" not in out
    assert "file_brain_AXFLAIR_200_6002462.h5" in out and "file_brain_AXFLAIR_200_6002471.h5" in out
    assert f"{tmp_path / 'file_brain_AXT2_209_2090296.h5'}: not an HDF5 file" in out


def test_summary_in_a_narrow_terminal_wraps_file_names(tmp_path, capsys, narrow_terminal):
    """A 40-column terminal cut each name to ``file_b…``."""
    code, out, _ = _run(capsys, *_long_named_scans(tmp_path))
    names = narrow_terminal(out)
    assert code == 1 and "\u2026" not in names
    for name in ("AXFLAIR_200_6002462", "AXFLAIR_200_6002471", "AXT2_209_2090296"):
        assert f"file_brain_{name}.h5" in names


def test_control_characters_in_file_names_are_printed_escaped(tmp_path, capsys):
    """A file name from elsewhere with ESC sequences (clear the screen, an OSC 8 link), a carriage return or a bell
    reached the terminal as they were, in the error line and the summary table: the terminal obeyed them. They are
    printed escaped, as Python writes them (``\\x1b``)."""
    good, bad = "ok\x1b[2J\x1b]8;;http:x\x07link\x1b]8;;\x07.h5", "bad\x1b[31m\rX\x07.h5"
    write_fastmri_file(tmp_path / good, np.random.default_rng(9))
    (tmp_path / bad).write_bytes(b"not hdf5")
    code, out, err = _run(capsys, str(tmp_path), "--model", "zero-filled", "--output", str(tmp_path / "o"))
    assert code == 1 and not any(c in out + err for c in "\x1b\r\x07")
    assert "bad\\x1b[31m\\rX\\x07.h5: not an HDF5 file" in err and "ok\\x1b[2J" in out


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs (Windows)")
def test_an_external_link_to_a_fifo_is_refused_not_waited_on(tmp_path, capsys):
    """A file's 'kspace' (or ISMRMRD 'dataset' group) may be an HDF5 external link, which HDF5 opens: to a FIFO it
    waited for a writer for ever, and SIGTERM could not stop it. The link is named and the batch goes on."""
    scans = tmp_path / "scans"
    scans.mkdir()
    os.mkfifo(scans / "pipe")
    for name, key in (("fastmri.h5", "kspace"), ("raw.h5", "dataset")):
        write_fastmri_file(scans / name, np.random.default_rng(10))
        with h5py.File(scans / name, "a") as f:
            del f["kspace"]
            f[key] = h5py.ExternalLink("pipe", "/kspace")  # relative: next to the file
    write_fastmri_file(scans / "good.h5", np.random.default_rng(11))
    code, _, err = _run(capsys, str(scans), "--model", "zero-filled", "--output", str(tmp_path / "o"))
    assert code == 1 and (tmp_path / "o" / "h5" / "good.h5").exists()
    for name, key in (("fastmri.h5", "kspace"), ("raw.h5", "dataset/xml")):
        assert f"{name}: '{key}' is a link to pipe:/kspace, which is not a regular file (a FIFO" in err


def test_names_that_differ_only_in_case_are_a_clash(tmp_path):
    """``a/Scan.h5`` and ``b/scan.h5`` (or one name in NFC and NFD Unicode) write one output file on macOS's and
    Windows' case- and normalisation-insensitive file systems: the second one's outputs silently replaced the
    first one's there. They are reported as the same-name clash they are."""
    from reconkit.cli.reconstruct import expand_inputs

    names = [("a", "Scan.h5"), ("b", "scan.h5"), ("c", "caf\u00e9.h5"), ("d", "cafe\u0301.h5"), ("e", "other.h5")]
    files, failures = expand_inputs([str(tmp_path / folder / name) for folder, name in names])
    assert files == [tmp_path / "a" / "Scan.h5", tmp_path / "c" / "caf\u00e9.h5", tmp_path / "e" / "other.h5"]
    assert [report.path for report in failures] == [tmp_path / "b" / "scan.h5", tmp_path / "d" / "cafe\u0301.h5"]
    assert "same output name (scan) as" in failures[0].status


def test_threads_option_sets_torch_and_onnx_runtime_threads(tmp_path, capsys, monkeypatch):
    """--threads N: torch's thread count and ONNX Runtime's intra-op threads (there was no thread option; ONNX
    Runtime took every core whatever OMP_NUM_THREADS said); below 1 it is refused before any file."""
    import torch

    from reconkit.cli import reconstruct

    write_fastmri_file(tmp_path / "a.h5", np.random.default_rng(7))
    asked, real_load = [], reconstruct.load_reconstructor

    def load(model, backend=None, device="cpu", threads=None, **options):
        asked.append(threads)
        return real_load(model, backend, device, threads, **options)

    monkeypatch.setattr(reconstruct, "load_reconstructor", load)
    before = torch.get_num_threads()
    try:
        code, _, err = _run(capsys, str(tmp_path / "a.h5"), "--model", "zero-filled", "--output", str(tmp_path / "o"),
                            "--threads", "1")  # fmt: skip
        assert code == 0, err
        assert asked == [1] and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    code, _, err = _run(capsys, str(tmp_path / "a.h5"), "--model", "zero-filled", "--output", str(tmp_path / "o"),
                        "--threads", "0")  # fmt: skip
    assert code == 2 and "--threads must be at least 1" in err


@pytest.mark.parametrize("model", ["zero-filled", "varnet_small.ckpt", "varnet_small.onnx"])
@pytest.mark.parametrize("threads", [-1, 0, 2.5, True])
def test_load_reconstructor_refuses_threads_below_1_for_every_model(model, threads):
    """ONNX Runtime took threads=-1 without a word, and PyTorch models never looked at it: every kind now refuses
    a value that is not an integer >= 1 before loading anything."""
    from reconkit.errors import ConfigError

    name = model if model == "zero-filled" else str(Path(__file__).parents[1] / "checkpoints" / model)
    with pytest.raises(ConfigError, match=r"threads must be an integer >= 1, got "):
        load_reconstructor(name, threads=threads)


@pytest.mark.parametrize("option,value,message", [("--center-fraction", "1.5", "center fractions must lie in [0, 1)"),
                                                   ("--acceleration", "0", "accelerations must be at least 1"),
                                                   ("--mask-type", "spiral", "spiral not supported"),
                                                   ("--mask-type", "variable_density",  # was drawn on a 1 x W grid
                                                    "mask type 'variable_density' gives a 2D mask; reconstruct takes "
                                                    "Cartesian line masks"),
                                                   ("--seed", "-1", "--seed must lie in [0, 2**32 - 1], got -1"),
                                                   ("--seed", str(2**32), "--seed must lie in [0, 2**32 - 1]")])
def test_bad_mask_options_are_one_error_before_any_file(tmp_path, capsys, option, value, message):
    write_fastmri_file(tmp_path / "a.h5", np.random.default_rng(7))
    code, _, err = _run(capsys, str(tmp_path / "a.h5"), "--model", "zero-filled", "--output", str(tmp_path / "out"),
                        option, value)
    assert code == 2 and f"reconkit reconstruct: mask options: {message}" in err, err
    assert not (tmp_path / "out").exists()


def test_volume_mask_refuses_a_2d_mask_type(tmp_path):
    """It drew the 2D mask on a 1 x W grid and used that row as a line mask."""
    from reconkit.data import read_volume
    from reconkit.errors import ReconkitError
    from reconkit.inference import volume_mask

    write_fastmri_file(tmp_path / "a.h5", np.random.default_rng(6), height=16, width=24, recon=(8, 8))
    with pytest.raises(ReconkitError, match="mask type 'variable_density' gives a 2D mask"):
        volume_mask(read_volume(tmp_path / "a.h5"), "variable_density", 4, 0.08, seed=None)


@pytest.mark.parametrize("output", ["taken", "taken/out"])
def test_an_output_path_through_a_file_is_one_error_before_any_file(tmp_path, capsys, output):
    """Each file used to be reconstructed and then fail at its write ('NotADirectoryError: ... taken/h5')."""
    write_fastmri_file(tmp_path / "a.h5", np.random.default_rng(7))
    (tmp_path / "taken").write_text("a file, not a directory\n")
    code, out, err = _run(capsys, str(tmp_path / "a.h5"), "--model", "zero-filled", "--output", str(tmp_path / output))
    assert code == 2 and err.strip() == (f"reconkit reconstruct: --output {tmp_path / output}: {tmp_path / 'taken'} "
                                         "exists and is not a directory"), err
    assert "a.h5" not in out


@pytest.mark.parametrize("output", ["link", "link/out"])
def test_an_output_through_a_broken_symlink_is_one_error_before_any_file(tmp_path, capsys, output):
    """A link to a folder that is not there (a network share not mounted) passed the check: each file was
    reconstructed, then failed with 'FileExistsError: [Errno 17] File exists: ...link'."""
    write_fastmri_file(tmp_path / "a.h5", np.random.default_rng(7))
    (tmp_path / "link").symlink_to(tmp_path / "unmounted" / "results")
    code, out, err = _run(capsys, str(tmp_path / "a.h5"), "--model", "zero-filled", "--output", str(tmp_path / output))
    assert code == 2 and err.strip() == (f"reconkit reconstruct: --output {tmp_path / output}: {tmp_path / 'link'} is "
                                         f"a symbolic link to {tmp_path / 'unmounted' / 'results'}, which does not "
                                         "exist"), err
    assert "a.h5" not in out


def test_a_sigterm_inside_a_finaliser_still_stops_the_run(monkeypatch):
    """A SIGTERM whose handler ran inside a weakref callback (garbage collection) was printed as "Exception ignored"
    and the run went on to its end with exit code 0 (seen once in 14 SIGTERMs to a 40-file run)."""
    import signal
    import time

    from reconkit.cli import main as cli_main

    class Finalised:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):  # the handler runs here, in the finaliser
                pass

    monkeypatch.setattr(sys, "unraisablehook", cli_main._unraisable)
    previous = signal.signal(signal.SIGTERM, cli_main._exit_on_sigterm)
    try:
        with pytest.raises(SystemExit) as exit_info:
            Finalised()  # dropped at once
            for _ in range(500):
                time.sleep(0.01)  # where the signal sent again arrives
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert exit_info.value.code == 143


def test_a_file_name_that_stdout_cannot_encode_is_escaped(tmp_path, monkeypatch):
    """With stdout piped or redirected on Windows, its encoding is the ANSI code page (cp1252): the summary of
    ``scan_\u03a9.h5`` failed with a UnicodeEncodeError traceback (exit 1) after its outputs were written."""
    import io
    import signal

    from reconkit.cli import main as cli_main

    write_fastmri_file(tmp_path / "scan_\u03a9.h5", np.random.default_rng(7))
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="cp1252")
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(sys, "argv", ["reconkit", "reconstruct", str(tmp_path / "scan_\u03a9.h5"), "--model",
                                      "zero-filled", "--output", str(tmp_path / "out"), "--format", "h5"])
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # the entry point's own settings, undone after
    monkeypatch.setattr(signal, "signal", lambda signum, handler: None)
    assert cli_main.main() == 0
    stdout.flush()
    assert "scan_\\u03a9.h5" in stdout.buffer.getvalue().decode("cp1252")


def test_a_read_only_output_is_one_error_before_any_file(tmp_path, capsys, monkeypatch):
    """Each file used to be reconstructed and then fail at its write ('PermissionError: ... out/h5')."""
    from reconkit import atomic

    write_fastmri_file(tmp_path / "a.h5", np.random.default_rng(7))
    (tmp_path / "ro").mkdir()
    real_access = os.access  # a chmod 555 folder, which root (running tests in containers) may write anyway

    def access(path, mode):
        return Path(path).name != "ro" and real_access(path, mode)

    monkeypatch.setattr(atomic.os, "access", access)
    output = tmp_path / "ro" / "o"
    code, out, err = _run(capsys, str(tmp_path / "a.h5"), "--model", "zero-filled", "--output", str(output))
    assert code == 2 and err.strip() == f"reconkit reconstruct: --output {output}: {tmp_path / 'ro'} is not writable"
    assert "a.h5" not in out
    (tmp_path / "out" / "png").mkdir(parents=True)
    (tmp_path / "out" / "h5").write_text("a file where the h5 folder goes")  # a format's folder: checked too
    code, out, err = _run(capsys, str(tmp_path / "a.h5"), "--model", "zero-filled", "--output", str(tmp_path / "out"),
                          "--format", "png", "h5")  # fmt: skip
    assert code == 2 and err.strip().endswith(f"{tmp_path / 'out' / 'h5'} exists and is not a directory")
    assert "a.h5" not in out


def test_an_interrupted_run_says_which_files_are_complete(tmp_path, capsys, monkeypatch):
    """Ctrl-C printed a traceback and SIGTERM nothing: neither said which files had been written."""
    from reconkit.cli import reconstruct

    rng = np.random.default_rng(8)
    for name in ("a", "b", "c"):
        write_fastmri_file(tmp_path / f"{name}.h5", rng)
    real_write = reconstruct.write_outputs
    args = ["reconstruct", str(tmp_path), "--model", "zero-filled", "--output", str(tmp_path / "o")]
    for interrupt in (KeyboardInterrupt(), SystemExit(143)):  # Ctrl-C; SIGTERM (reconkit.cli.main's handler)

        def write_outputs(volume, *rest, interrupt=interrupt):
            if volume.info.path.name == "b.h5":
                raise interrupt
            real_write(volume, *rest)

        monkeypatch.setattr(reconstruct, "write_outputs", write_outputs)
        if isinstance(interrupt, KeyboardInterrupt):
            try:
                assert reconkit_main(args) == 130
            except KeyboardInterrupt:
                pytest.fail("Ctrl-C came out of reconkit's main as a traceback")
        else:
            with pytest.raises(SystemExit, match="143"):
                reconkit_main(args)
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert (
            f"note: interrupted; 1 of 3 file(s) written under {tmp_path / 'o'}/ (the last: {tmp_path / 'a.h5'}); "
            f"{tmp_path / 'b.h5'} was being reconstructed (its outputs may be missing or from an earlier run in "
            "some formats) and 1 file(s) after it were not started\n"
        ) in err
        assert ("reconkit reconstruct: interrupted" in err) == isinstance(interrupt, KeyboardInterrupt)


def test_a_folder_that_cannot_be_listed_is_one_error_and_the_others_are_written(tmp_path, capsys, unlistable):
    """A folder without read permission ended the whole run in a PermissionError traceback."""
    write_fastmri_file(tmp_path / "a.h5", np.random.default_rng(7))
    (tmp_path / "locked").mkdir()
    unlistable(tmp_path / "locked")  # a chmod 000 folder
    code, _, err = _run(capsys, str(tmp_path / "a.h5"), str(tmp_path / "locked"), "--model", "zero-filled",
                        "--output", str(tmp_path / "out"))  # fmt: skip
    assert code == 1 and f"error: {tmp_path / 'locked'}: cannot list the folder: Permission denied" in err
    assert (tmp_path / "out" / "h5" / "a.h5").is_file()


def test_an_unreadable_onnx_model_is_one_error_naming_it(tmp_path, capsys, unreadable):
    """ONNX's PermissionError went to read_onnx's handler, which opened the file again to see whether it is a
    checkpoint: a PermissionError traceback."""
    write_fastmri_file(tmp_path / "a.h5", np.random.default_rng(7))
    model = tmp_path / "locked.onnx"
    model.write_bytes(b"\x08\x08")
    unreadable(model)
    code, _, err = _run(capsys, str(tmp_path / "a.h5"), "--model", str(model), "--output", str(tmp_path / "out"))
    assert code == 2 and f"reconkit reconstruct: {model}: cannot read the file: Permission denied" in err, err


def test_a_fifo_named_like_a_scan_is_one_error_not_a_hang(tmp_path, capsys):
    """A FIFO ``x.h5`` in a scan folder: opening it (the ISMRMRD check first) waited for a writer for ever."""
    write_fastmri_file(tmp_path / "a.h5", np.random.default_rng(7))
    os.mkfifo(tmp_path / "fifo.h5")
    # a writer after 20 s ends a wait that would otherwise hang the test run (HDF5's open holds the GIL)
    writer = subprocess.Popen(["sh", "-c", f"sleep 20; echo > '{tmp_path / 'fifo.h5'}'"])
    try:
        code, _, err = _run(capsys, str(tmp_path), "--model", "zero-filled", "--output", str(tmp_path / "out"))
    finally:
        writer.kill()
        writer.wait()
    assert code == 1
    assert f"error: {tmp_path / 'fifo.h5'}: is not a regular file (a FIFO, socket or device), not an HDF5 file" in err
    assert (tmp_path / "out" / "h5" / "a.h5").is_file()


def test_single_coil_and_odd_sizes(tmp_path, capsys):
    rng = np.random.default_rng(4)
    write_fastmri_file(tmp_path / "single.h5", rng, single_coil=True, height=40, width=36, recon=(20, 20))
    write_fastmri_file(tmp_path / "odd.h5", rng, coils=3, height=45, width=37, recon=(21, 19))
    code, _, err = _run(
        capsys,
        str(tmp_path / "single.h5"),
        str(tmp_path / "odd.h5"),
        "--model",
        "cg-sense",
        "--output",
        str(tmp_path / "out"),
    )
    assert code == 0, err
    with h5py.File(tmp_path / "out" / "h5" / "single.h5") as f:
        assert f["reconstruction"].shape == (2, 20, 20)
    with h5py.File(tmp_path / "out" / "h5" / "odd.h5") as f:
        assert f["reconstruction"].shape == (2, 21, 19) and np.isfinite(f["reconstruction"][()]).all()


def test_a_drawn_mask_without_any_line_is_an_error_naming_the_file(tmp_path, capsys):
    # 6 columns, random 4x at centre fraction 0.08: no centre line (0.48 rounds to 0) and, with seed 0, no drawn
    # line either; the file holds data, so writing zeros as "no k-space data" would be wrong
    rng = np.random.default_rng(5)
    write_fastmri_file(tmp_path / "narrow.h5", rng, height=8, width=6, recon=(8, 6))
    write_fastmri_file(tmp_path / "wide.h5", rng, height=16, width=24, recon=(8, 8))
    code, _, err = _run(capsys, str(tmp_path), "--model", "zero-filled", "--mask-type", "random", "--seed", "0",
                        "--output", str(tmp_path / "out"))  # fmt: skip
    assert code == 1
    assert f"error: {tmp_path / 'narrow.h5'}: the random mask (4x, centre fraction 0.08) samples none of the 6" in err
    assert not (tmp_path / "out" / "h5" / "narrow.h5").exists() and (tmp_path / "out" / "h5" / "wide.h5").exists()


def test_bad_model_and_help(tmp_path, capsys):
    rng = np.random.default_rng(5)
    write_fastmri_file(tmp_path / "a.h5", rng)
    code, _, err = _run(capsys, str(tmp_path / "a.h5"), "--model", str(tmp_path / "nope.ckpt"), "--output", "o")
    assert code == 2 and "nope.ckpt" in err and "not found" in err
    (tmp_path / "garbled.onnx").write_bytes(b"not an ONNX model at all")
    code, _, err = _run(capsys, str(tmp_path / "a.h5"), "--model", str(tmp_path / "garbled.onnx"), "--output",
                        str(tmp_path / "o"))
    assert code == 2 and "garbled.onnx: not an ONNX model" in err and not (tmp_path / "o").exists()
    for legacy in (False, True):  # a checkpoint saved under an .onnx name: torch.save's zip, or a legacy pickle
        torch.save({"state_dict": {}}, tmp_path / "ckpt.onnx", _use_new_zipfile_serialization=not legacy)
        code, _, err = _run(capsys, str(tmp_path / "a.h5"), "--model", str(tmp_path / "ckpt.onnx"), "--output",
                            str(tmp_path / "o"))
        assert code == 2 and "ckpt.onnx: looks like a PyTorch checkpoint, not an ONNX model" in err, err
    with pytest.raises(SystemExit) as exit_info:
        reconkit_main(["reconstruct", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--model",
        "--output",
        "--format",
        "--backend",
        "--device",
        "--batch-size",
        "--mask-type",
        "--acceleration",
        "--center-fraction",
        "--seed",
        "zero-filled",
        "cg-sense",
    ):
        assert option in text
    assert "reconkit reconstruct scans/" in text


def test_tiny_varnet_checkpoint_torch_and_onnx_agree(tmp_path, capsys):
    from reconkit.export import export_onnx
    from reconkit.models import build_model, save_model

    rng = np.random.default_rng(6)
    write_fastmri_file(tmp_path / "scan.h5", rng, slices=3, coils=3, height=32, width=24, recon=(16, 16))
    kwargs = {'num_cascades': 2, 'sens_chans': 2, 'sens_pools': 1, 'chans': 2, 'pools': 1}
    torch.manual_seed(0)
    mask_info = {"mask_type": "equispaced_fraction", "center_fractions": [0.16], "accelerations": [2]}
    checkpoint = save_model(tmp_path / "tiny.ckpt", build_model("varnet", **kwargs), "varnet", kwargs, mask_info)
    onnx_path = export_onnx(checkpoint, tmp_path / "tiny.onnx", example_shape=(3, 32, 24))
    outputs = {}
    for model, backend in ((checkpoint, "torch"), (onnx_path, "onnx")):
        code, out, err = _run(
            capsys,
            str(tmp_path / "scan.h5"),
            "--model",
            str(model),
            "--output",
            str(tmp_path / backend),
            "--batch-size",
            "2",
        )
        assert code == 0, err
        assert f"({backend})" in out
        with h5py.File(tmp_path / backend / "h5" / "scan.h5") as f:
            outputs[backend] = f["reconstruction"][()]
    assert outputs["torch"].shape == (3, 16, 16)
    np.testing.assert_allclose(outputs["onnx"], outputs["torch"], rtol=1e-3, atol=1e-4 * outputs["torch"].max())
    # the training mask recorded in the checkpoint is the default: 2x here, so more columns than the 4x default
    reconstructor = load_reconstructor(str(checkpoint))
    assert reconstructor.mask_defaults == {
        "mask_type": "equispaced_fraction",
        "acceleration": 2,
        "center_fraction": 0.16,
    }
    # a k-space size the ONNX graph was not specialised for runs the file's own weights in PyTorch, said so in
    # the summary; the image is the checkpoint's
    write_fastmri_file(tmp_path / "other.h5", rng, slices=2, coils=3, height=40, width=24, recon=(16, 16))
    for model, name in ((onnx_path, "fallback"), (checkpoint, "checkpoint")):
        code, out, err = _run(capsys, str(tmp_path / "other.h5"), "--model", str(model), "--output",
                              str(tmp_path / name))
        assert code == 0, err
        with h5py.File(tmp_path / name / "h5" / "other.h5") as f:
            outputs[name] = f["reconstruction"][()]
        assert ("ran in PyTorch: 40x24 is not a size of the ONNX graph (32x24)" in err) == (name == "fallback")
        assert ("ok (ran in PyTorch)" in out) == (name == "fallback")
    np.testing.assert_array_equal(outputs["fallback"], outputs["checkpoint"])
    # with --no-torch-fallback (or an ONNX file without the model's hyper-parameters) it is one clear error line
    code, _, err = _run(capsys, str(tmp_path / "other.h5"), "--model", str(onnx_path), "--output", str(tmp_path / "x"),
                        "--no-torch-fallback")
    assert code == 1 and "other.h5" in err and "40x24" in err and "32x24" in err and "--size 40 24" in err
    assert not (tmp_path / "x" / "h5" / "other.h5").exists()


def _two_size_export(tmp_path: Path) -> Path:
    """A small VarNet exported for 32 × 24 and 40 × 30 k-space, as ``tmp_path / "two.onnx"``."""
    from reconkit.export import export_onnx
    from reconkit.models import build_model

    kwargs = {'num_cascades': 1, 'sens_chans': 2, 'sens_pools': 1, 'chans': 2, 'pools': 1}
    return export_onnx(build_model("varnet", **kwargs), tmp_path / "two.onnx", [(32, 24), (40, 30)])


def test_multi_size_onnx_opens_one_session_per_size_on_first_use(tmp_path, count_onnx_sessions):
    """ONNX Runtime prepares every size branch of a file it opens; the engine opens only the branch of each size it
    meets, when it first meets it, with the whole file's output."""
    import onnxruntime as ort

    from reconkit.errors import ReconkitError

    torch.manual_seed(3)
    onnx_path = _two_size_export(tmp_path)
    whole = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    opened = count_onnx_sessions()
    reconstructor = load_reconstructor(str(onnx_path))
    assert opened == [] and reconstructor.spatial_sizes == [(32, 24), (40, 30)]
    rng = np.random.default_rng(2)
    for height, width in ((40, 30), (32, 24), (40, 30)):
        mask = np.zeros((2, 1, 1, width, 1), np.float32)
        mask[..., ::2, :] = 1
        kspace = rng.standard_normal((2, 3, height, width, 2)).astype(np.float32) * mask
        run, note = reconstructor.runner_for(Path("scan.h5"), height, width)
        image = run(kspace, mask)
        (expected,) = whole.run(None, {"masked_kspace": kspace, "mask": mask})
        np.testing.assert_allclose(image, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
        assert note is None and image.shape == (2, height, width)
        np.testing.assert_array_equal(reconstructor.run(kspace, mask), image)  # `run` picks the size's session
    assert len(opened) == 2 and all(isinstance(model, bytes) for model in opened)  # one per size, kept
    with pytest.raises(ReconkitError, match="36x28 not exported; this model serves 32x24, 40x30"):
        reconstructor.run(np.ones((1, 3, 36, 28, 2), np.float32), np.ones((1, 1, 1, 28, 1), np.float32))


def test_multi_size_onnx_called_from_several_threads_opens_each_size_once(tmp_path, count_onnx_sessions,
                                                                        monkeypatch):
    """A user's own server calls one reconstructor from several threads: the first calls of a size open its session
    once (every thread opened its own, each one more model in memory: on a GPU, more arenas than fit)."""
    from concurrent.futures import ThreadPoolExecutor

    import onnxruntime as ort

    onnx_path = _two_size_export(tmp_path)
    opened = count_onnx_sessions()
    counted = ort.InferenceSession

    def slow_session(*args, **kwargs):  # opening the bundled model's branch takes a second, not milliseconds
        time.sleep(0.2)
        return counted(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", slow_session)
    reconstructor = load_reconstructor(str(onnx_path))
    mask = np.ones((1, 1, 1, 30, 1), np.float32)
    kspace = np.random.default_rng(0).standard_normal((1, 3, 40, 30, 2)).astype(np.float32)
    with ThreadPoolExecutor(4) as pool:
        images = list(pool.map(lambda _: reconstructor.run(kspace, mask), range(4)))
    assert len(opened) == 1
    for image in images[1:]:
        np.testing.assert_array_equal(image, images[0])


def test_models_load_in_their_weights_dtype_whatever_the_callers_default_dtype(tmp_path):
    """A caller that works in float64 (``torch.set_default_dtype``) got float64 models from float32 weights, which
    float32 k-space then failed in ("expected scalar type Float but found Double")."""
    from reconkit.export import export_onnx
    from reconkit.models import build_model, save_model

    kwargs = {'num_cascades': 1, 'sens_chans': 2, 'sens_pools': 1, 'chans': 2, 'pools': 1}
    checkpoint = save_model(tmp_path / "tiny.ckpt", build_model("varnet", **kwargs), "varnet", kwargs)
    onnx_path = export_onnx(checkpoint, tmp_path / "tiny.onnx", (3, 32, 24))
    mask = np.ones((1, 1, 1, 20, 1), np.float32)
    kspace = np.random.default_rng(0).standard_normal((1, 3, 32, 20, 2)).astype(np.float32)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        from_checkpoint = load_reconstructor(str(checkpoint)).run(kspace, mask)
        from_onnx_weights = load_reconstructor(str(onnx_path)).fallback()(kspace, mask)  # 32x20: not in the graph
    finally:
        torch.set_default_dtype(previous)
    assert from_checkpoint.dtype == from_onnx_weights.dtype == np.float32
    np.testing.assert_array_equal(from_checkpoint, load_reconstructor(str(checkpoint)).run(kspace, mask))


def test_slice_without_data_is_written_as_zeros_and_the_others_as_usual(tmp_path, capsys):
    from reconkit.models import build_model, save_model

    rng = np.random.default_rng(8)
    write_fastmri_file(tmp_path / "full.h5", rng, slices=3, coils=3, height=32, width=24, recon=(16, 16))
    kwargs = {'num_cascades': 1, 'sens_chans': 2, 'sens_pools': 1, 'chans': 2, 'pools': 1}
    torch.manual_seed(1)
    checkpoint = save_model(tmp_path / "tiny.ckpt", build_model("varnet", **kwargs), "varnet", kwargs)
    with h5py.File(tmp_path / "full.h5") as f, h5py.File(tmp_path / "gap.h5", "w") as g:
        for key in f:
            g.create_dataset(key, data=f[key][()])
        g.attrs.update(f.attrs)
        g["kspace"][1] = 0  # e.g. a padded slice of a converted volume
    for name in ("full", "gap"):
        code, _, err = _run(capsys, str(tmp_path / f"{name}.h5"), "--model", str(checkpoint), "--output",
                            str(tmp_path / "out"), "--batch-size", "3", "--seed", "3")  # one mask for both
        assert code == 0, err
        assert ("gap.h5: slice(s) 1 hold no k-space data; written as zeros" in err) == (name == "gap")
    with h5py.File(tmp_path / "out" / "h5" / "full.h5") as f, h5py.File(tmp_path / "out" / "h5" / "gap.h5") as g:
        full, gap = f["reconstruction"][()], g["reconstruction"][()]
    assert np.isfinite(gap).all() and not gap[1].any() and full[1].any()
    np.testing.assert_allclose(gap[[0, 2]], full[[0, 2]], rtol=1e-5, atol=1e-6 * full.max())


def test_ismrmrd_raw_file_is_reconstructed(tmp_path, capsys):
    import ismrmrd

    rng = np.random.default_rng(7)
    write_fastmri_file(tmp_path / "ref.h5", rng, slices=2, coils=4, height=64, width=48, lines=44)
    with h5py.File(tmp_path / "ref.h5") as f:
        kspace, header = f["kspace"][()], f["ismrmrd_header"][()]
    left = (48 - 44) // 2
    columns = np.zeros(48, np.float32)
    columns[left : left + 44 : 2] = 1
    columns[20:28] = 1
    raw = ismrmrd.Dataset(str(tmp_path / "raw.h5"), "dataset", create_if_needed=True)
    raw.write_xml_header(header.decode() if isinstance(header, bytes) else header)
    noise = ismrmrd.Acquisition.from_array(rng.standard_normal((4, 64)).astype(np.complex64))
    noise.set_flag(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
    raw.append_acquisition(noise)
    for s in range(2):
        for column in np.flatnonzero(columns):
            acquisition = ismrmrd.Acquisition.from_array(np.ascontiguousarray(kspace[s, :, :, column]))
            acquisition.idx.kspace_encode_step_1 = int(column - left)
            acquisition.idx.slice = s
            raw.append_acquisition(acquisition)
    raw.close()
    code, _, err = _run(capsys, str(tmp_path / "raw.h5"), "--model", "zero-filled", "--output", str(tmp_path / "out"))
    assert code == 0, err
    masked = fastmri_transforms.to_tensor(kspace * columns)
    expected = fastmri_transforms.center_crop(fastmri.rss(fastmri.complex_abs(fastmri.ifft2c(masked)), dim=1), (32, 32))
    with h5py.File(tmp_path / "out" / "h5" / "raw.h5") as f:
        np.testing.assert_allclose(f["reconstruction"][()], expected.numpy(), rtol=1e-4, atol=1e-9)


def test_ismrmrd_series_lacking_a_slice_keep_the_slice_positions_of_the_others(tmp_path, capsys):
    """Two contrasts of three slices, contrast 1 without slice 0 (an interrupted scan): its NIfTI spans the file's
    three slices like contrast 0's, slice 0 zeros, and its DICOM series holds slices 1 and 2 at their places, so
    slice s of both contrasts is at one point of their shared frame of reference (they were centred on their own
    slice count: contrast 1's slice 1 half a slice off)."""
    import ismrmrd

    rng = np.random.default_rng(11)
    write_fastmri_file(tmp_path / "ref.h5", rng, slices=3, coils=2, height=32, width=24, recon=(16, 16))
    with h5py.File(tmp_path / "ref.h5") as f:
        kspace, header = f["kspace"][()], f["ismrmrd_header"][()]
    raw = ismrmrd.Dataset(str(tmp_path / "raw.h5"), "dataset", create_if_needed=True)
    raw.write_xml_header(header.decode() if isinstance(header, bytes) else header)
    for contrast, slices in ((0, (0, 1, 2)), (1, (1, 2))):
        for s in slices:
            for column in range(24):
                acquisition = ismrmrd.Acquisition.from_array(np.ascontiguousarray(kspace[s, :, :, column]))
                acquisition.idx.kspace_encode_step_1 = column
                acquisition.idx.slice, acquisition.idx.contrast = s, contrast
                raw.append_acquisition(acquisition)
    raw.close()
    out = tmp_path / "out"
    code, _, err = _run(capsys, str(tmp_path / "raw.h5"), "--model", "zero-filled", "--output", str(out),
                        "--format", "h5", "nifti", "dicom")  # fmt: skip
    assert code == 0, err
    with h5py.File(out / "h5" / "raw.h5") as f:
        images = f["reconstruction"][()]  # contrast 0 slices 0-2, contrast 1 slices 1-2
    niftis = [nib.load(out / "nifti" / f"raw_contrast{c}.nii.gz") for c in (0, 1)]
    np.testing.assert_array_equal(niftis[0].affine, niftis[1].affine)
    second = np.asarray(niftis[1].dataobj).transpose(2, 1, 0)
    assert second.shape == (3, 16, 16) and not second[0].any()
    np.testing.assert_allclose(second[1:], images[3:], rtol=1e-6)
    positions = {}
    for c in (0, 1):
        for path in sorted((out / "dicom" / f"raw_contrast{c}").glob("*.dcm")):
            ds = pydicom.dcmread(path)
            positions[c, int(ds.InstanceNumber)] = [float(v) for v in ds.ImagePositionPatient]
    # DICOM holds the images there are (no blank instance for the missing slice), at the same places
    assert positions[0, 2] == positions[1, 2] and positions[0, 3] == positions[1, 3] and len(positions) == 5
    assert sorted(p.name for p in (out / "dicom" / "raw_contrast1").glob("*.dcm")) == ["slice_001.dcm",
                                                                                       "slice_002.dcm"]


def _two_contrast_raw(tmp_path: Path, sequence_xml: str = "") -> Path:
    """An ISMRMRD raw file of 3 slices, contrast 0 on all of them and contrast 1 without slice 0; ``sequence_xml``
    (system / sequence elements) is added to the header."""
    import ismrmrd

    rng = np.random.default_rng(12)
    write_fastmri_file(tmp_path / "ref.h5", rng, slices=3, coils=2, height=32, width=24, recon=(16, 16))
    with h5py.File(tmp_path / "ref.h5") as f:
        kspace, header = f["kspace"][()], f["ismrmrd_header"][()]
    header = (header.decode() if isinstance(header, bytes) else header).replace("</encoding>",
                                                                                f"</encoding>{sequence_xml}")
    raw = ismrmrd.Dataset(str(tmp_path / "raw.h5"), "dataset", create_if_needed=True)
    raw.write_xml_header(header)
    for contrast, slices in ((0, (0, 1, 2)), (1, (1, 2))):
        for s in slices:
            for column in range(24):
                acquisition = ismrmrd.Acquisition.from_array(np.ascontiguousarray(kspace[s, :, :, column] * (1 + contrast)))
                acquisition.idx.kspace_encode_step_1 = column
                acquisition.idx.slice, acquisition.idx.contrast = s, contrast
                raw.append_acquisition(acquisition)
    raw.close()
    return tmp_path / "raw.h5"


def test_ismrmrd_series_get_png_folders_numbered_by_slice(tmp_path, capsys):
    """Two contrasts, contrast 1 without slice 0: the PNGs are per series and numbered by slice, as the DICOM files
    are (they were one folder numbered by stacked image, so contrast 1's slice 1 was "raw.h5 slice 3")."""
    out = tmp_path / "out"
    code, _, err = _run(capsys, str(_two_contrast_raw(tmp_path)), "--model", "zero-filled", "--output", str(out),
                        "--format", "png")  # fmt: skip
    assert code == 0, err
    assert sorted(p.name for p in (out / "png").iterdir()) == ["raw_contrast0", "raw_contrast1"]
    names = {c: sorted(p.name for p in (out / "png" / f"raw_contrast{c}").iterdir()) for c in (0, 1)}
    assert names == {0: ["slice_000.png", "slice_001.png", "slice_002.png"], 1: ["slice_001.png", "slice_002.png"]}


def test_dicom_series_carry_the_headers_tr_te_and_field_strength(tmp_path, capsys):
    """TR, each contrast's TE and B0 were read from the header but the DICOM files left them empty (a multi-echo
    scan's series could not be told apart by their echo time)."""
    raw = _two_contrast_raw(tmp_path, "<sequenceParameters><TR>2500</TR><TE>9.5</TE><TE>19</TE></sequenceParameters>")
    with h5py.File(raw, "r+") as f:  # the system element comes first in an ISMRMRD header
        header = f["dataset/xml"][0]
        header = header.decode() if isinstance(header, bytes) else header
        f["dataset/xml"][0] = header.replace("<encoding>", "<acquisitionSystemInformation><systemFieldStrength_T>"
                                             "2.89362</systemFieldStrength_T></acquisitionSystemInformation><encoding>", 1)
    out = tmp_path / "out"
    code, _, err = _run(capsys, str(raw), "--model", "zero-filled", "--output", str(out), "--format", "dicom")
    assert code == 0, err
    for contrast, echo_time in ((0, 9.5), (1, 19.0)):
        ds = pydicom.dcmread(next((out / "dicom" / f"raw_contrast{contrast}").iterdir()))
        assert (float(ds.RepetitionTime), float(ds.EchoTime), float(ds.MagneticFieldStrength)) == pytest.approx(
            (2500.0, echo_time, 2.89362))


def _rewritten(proto, how: str):
    """``proto`` changed as an ONNX optimiser might leave it: node names dropped ("names"), or a weight the size
    branches read moved from the initializers into a Constant node of the main graph ("constant")."""
    import onnx

    from reconkit.export.onnx_export import _subgraphs

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    if how == "names":
        def strip(graph):
            for node in graph.node:
                node.name = ""
                for subgraph in _subgraphs(node):
                    strip(subgraph)
        strip(model.graph)
    else:
        weight = model.graph.initializer[0]
        constant = onnx.helper.make_node("Constant", [], [weight.name], value=weight)
        del model.graph.initializer[0]
        model.graph.node.insert(0, constant)
    return model


@pytest.mark.parametrize("how", ["names", "constant"])
def test_multi_size_onnx_whose_branch_cannot_be_cut_out_runs_the_whole_file(tmp_path, count_onnx_sessions, how):
    """When one size's branch cannot be opened alone (a file rewritten by an optimiser), the engine opens the whole
    file instead, once, says so in a one-line warning, and gives the whole file's output."""
    import onnx
    import onnxruntime as ort

    from reconkit.errors import ReconkitWarning
    from reconkit.export import read_onnx

    torch.manual_seed(4)
    path = tmp_path / f"rewritten_{how}.onnx"
    onnx.save(_rewritten(read_onnx(_two_size_export(tmp_path)), how), str(path))
    whole = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    opened = count_onnx_sessions()
    reconstructor = load_reconstructor(str(path))
    rng = np.random.default_rng(5)
    met = set()
    for height, width in ((40, 30), (32, 24), (40, 30)):
        mask = np.zeros((1, 1, 1, width, 1), np.float32)
        mask[..., ::2, :] = 1
        kspace = rng.standard_normal((1, 3, height, width, 2)).astype(np.float32) * mask
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run, note = reconstructor.runner_for(Path("scan.h5"), height, width)
        said = [str(w.message) for w in caught if issubclass(w.category, ReconkitWarning)]
        (expected,) = whole.run(None, {"masked_kspace": kspace, "mask": mask})
        np.testing.assert_allclose(run(kspace, mask), expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
        assert note is None
        if (height, width) in met:  # a size met before: its runner is kept, nothing said again
            assert said == []
        else:
            assert len(said) == 1 and f"opened the whole file (slower to start) because its {height}x{width}" in said[0]
        met.add((height, width))
    assert [model for model in opened if isinstance(model, str)] == [str(path)]  # the whole file, opened once
    # from the command line the warning is one line, with the file named
    write_fastmri_file(tmp_path / "scan.h5", rng, slices=2, coils=3, height=32, width=24, recon=(16, 16))
    run = subprocess.run([sys.executable, "-m", "reconkit.cli.main", "reconstruct", str(tmp_path / "scan.h5"),
                          "--model", str(path), "--output", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert f"warning: {path}: opened the whole file (slower to start) because its 32x24 branch" in run.stderr
    assert "UserWarning" not in run.stderr and (tmp_path / "out" / "h5" / "scan.h5").exists()


def test_multi_size_onnx_that_cannot_be_opened_at_all_is_one_error_not_retried(tmp_path, count_onnx_sessions):
    from reconkit.errors import ReconkitError
    from reconkit.export import read_onnx

    proto = _rewritten(read_onnx(_two_size_export(tmp_path)), "names")  # branches that cannot be cut out
    for node in proto.graph.node:  # and a graph ONNX Runtime refuses: an op that does not exist
        if node.op_type == "Shape":
            node.op_type = "NoSuchOp"
    path = tmp_path / "broken.onnx"
    path.write_bytes(proto.SerializeToString())
    opened = count_onnx_sessions()
    reconstructor = load_reconstructor(str(path))
    for height, width in ((32, 24), (40, 30), (32, 24)):
        with pytest.raises(ReconkitError, match=re.escape(f"{path}: cannot load ONNX model")):
            reconstructor.runner_for(Path("scan.h5"), height, width)
    assert opened == [str(path)]  # tried once, not once per volume


def test_output_into_a_closed_pipe_ends_quietly():
    """``reconkit help | head -1``: the reader has gone before the CLI writes; the CLI ends without a
    BrokenPipeError traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # no reader left: the first write fails with EPIPE
    try:
        writer = subprocess.run([sys.executable, "-m", "reconkit.cli.main", "help"],
                                stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert "BrokenPipeError" not in writer.stderr and "Traceback" not in writer.stderr, writer.stderr


def test_memory_held_while_reconstructing_does_not_grow_with_the_slice_count(tmp_path):
    """Per slice only the cropped images are kept: the cropped views of each batch's full-size images once pinned
    them all, and among the batches' large temporaries those blocks fragmented the heap (a 64-slice 4-coil 640×368
    file peaked at 3.2 GB instead of 1.8 GB). numpy's allocations are what ``tracemalloc`` sees."""
    import tracemalloc

    from reconkit.data import read_volume
    from reconkit.inference import reconstruct_volume, volume_mask

    reconstructor = load_reconstructor("zero-filled")
    peaks = {}
    for slices in (4, 32):
        path = tmp_path / f"s{slices}.h5"
        write_fastmri_file(path, np.random.default_rng(0), slices=slices, height=256, width=256, recon=(16, 16),
                           single_coil=True)  # fmt: skip
        volume = read_volume(path)
        mask, _ = volume_mask(volume, "equispaced_fraction", 4, 0.08, 0)
        tracemalloc.start()
        result = reconstruct_volume(volume, reconstructor, mask, batch_size=1)
        peaks[slices] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert result.reconstruction.shape == result.zero_filled.shape == (slices, 16, 16)
    slice_image = 256 * 256 * 4  # one full-size float32 image
    assert peaks[32] - peaks[4] < 2 * slice_image, peaks


def test_reconstruct_volume_holds_one_copy_of_a_batch(tmp_path):
    """A batch's k-space is stacked, masked in place and handed to the model as it is: re-casting the float32 stack,
    the masked product, its ``+ 0.0``, a second re-cast and the boolean selection of the slices holding data were
    four more batch-sized arrays (numpy's peak 3.3 batches, ``tracemalloc``), for the same model input."""
    import tracemalloc

    from reconkit.data import read_volume
    from reconkit.inference import Reconstructor, reconstruct_volume, volume_mask

    path = tmp_path / "batch.h5"
    write_fastmri_file(path, np.random.default_rng(0), slices=2, coils=4, height=64, width=64, recon=(8, 8))
    volume = read_volume(path)
    mask, _ = volume_mask(volume, "equispaced_fraction", 4, 0.08, 0)
    seen = []

    def run(masked_kspace: np.ndarray, batch_mask: np.ndarray) -> np.ndarray:
        seen.append(masked_kspace.copy())
        return np.zeros((masked_kspace.shape[0], *masked_kspace.shape[2:4]), np.float32)

    tracemalloc.start()
    reconstruct_volume(volume, Reconstructor(name="zeros", backend="torch", run=run), mask, batch_size=2)
    peak = tracemalloc.get_traced_memory()[1] - sum(a.nbytes for a in seen)
    tracemalloc.stop()
    expected = np.stack((volume.kspace.real, volume.kspace.imag), axis=-1) * mask + 0.0
    np.testing.assert_array_equal(seen[0], expected)
    assert peak < 2 * expected.nbytes, peak / expected.nbytes


def test_reconstruct_volume_refuses_a_mask_not_of_the_documented_shape(tmp_path):
    """A column mask ``(W,)`` passed the slice-count check when W equals the number of slices, and each slice was
    then multiplied by one of its values (a scalar): slices kept whole or zeroed, no error."""
    from reconkit.data import read_volume
    from reconkit.inference import reconstruct_volume, volume_mask

    path = tmp_path / "square.h5"
    write_fastmri_file(path, np.random.default_rng(0), slices=8, height=8, width=8, recon=(8, 8), single_coil=True)
    volume = read_volume(path)
    mask, _ = volume_mask(volume, "equispaced_fraction", 4, 0.25, 0)
    for wrong in (mask.reshape(-1), mask.reshape(1, -1), mask[..., 0]):
        with pytest.raises(ValueError, match=r"mask must be \(1, 1, 1, 8, 1\) or \(8, 1, 1, 8, 1\)"):
            reconstruct_volume(volume, load_reconstructor("zero-filled"), wrong, batch_size=1)


def test_reconstruct_volume_takes_every_nonzero_mask_value_as_sampled(tmp_path):
    """A 0/255 mask (uint8 from a PNG) multiplied the k-space by 255: images 255× too bright, acceleration 255× too
    small, no error."""
    from reconkit.data import read_volume
    from reconkit.inference import reconstruct_volume, volume_mask

    path = tmp_path / "png_mask.h5"
    write_fastmri_file(path, np.random.default_rng(0), slices=2, height=8, width=8, recon=(8, 8), single_coil=True)
    volume = read_volume(path)
    mask, _ = volume_mask(volume, "equispaced_fraction", 4, 0.25, 0)
    expected = reconstruct_volume(volume, load_reconstructor("zero-filled"), mask)
    result = reconstruct_volume(volume, load_reconstructor("zero-filled"), (mask * 255).astype(np.uint8))
    np.testing.assert_array_equal(result.reconstruction, expected.reconstruction)
    np.testing.assert_array_equal(result.zero_filled, expected.zero_filled)
    assert result.acceleration == expected.acceleration


def test_finding_the_sampled_columns_holds_one_image_not_the_volume(tmp_path):
    """``volume_mask`` took ``np.abs`` of the whole volume at once: another half of the k-space's size in memory
    (0.78 GB for a 16-slice 20-coil 768 × 396 brain volume); now one image (slice) at a time."""
    import tracemalloc

    from reconkit.data import read_volume
    from reconkit.inference import volume_mask

    write_fastmri_file(tmp_path / "v.h5", np.random.default_rng(0), slices=16, coils=2, height=128, width=96)
    volume = read_volume(tmp_path / "v.h5")
    tracemalloc.start()
    mask, retrospective = volume_mask(volume, "equispaced_fraction", 4, 0.08, 0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert retrospective and mask.shape == (1, 1, 1, 96, 1)
    assert peak < volume.kspace.nbytes / 8, (peak, volume.kspace.nbytes)


def test_kspace_undersampled_along_the_readout_rows_is_an_error_naming_the_file(tmp_path, capsys):
    """A file whose sampled lines are rows (phase-encode along H, or a 2D-undersampled file) has data in every
    column: it was taken as fully sampled, undersampled once more along W and reconstructed into aliased garbage
    without a word. Empty rows at one edge (an asymmetric echo) stay fine."""
    rng = np.random.default_rng(8)
    write_fastmri_file(tmp_path / "full.h5", rng, height=64, width=48)
    with h5py.File(tmp_path / "full.h5") as src:
        kspace, header = src["kspace"][()], src["ismrmrd_header"][()]
    rows = np.zeros(64, bool)
    rows[::4], rows[28:36] = True, True
    echo = kspace.copy()
    echo[..., :12, :] = 0
    for name, data in (("rows.h5", kspace * rows[:, None]), ("echo.h5", echo)):
        with h5py.File(tmp_path / name, "w") as f:
            f.create_dataset("kspace", data=data)
            f.create_dataset("ismrmrd_header", data=header)
    code, _, err = _run(capsys, str(tmp_path / "rows.h5"), str(tmp_path / "echo.h5"), "--model", "zero-filled",
                        "--output", str(tmp_path / "out"))  # fmt: skip
    assert code == 1
    (error,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert f"error: {tmp_path / 'rows.h5'}: k-space rows are left empty" in error and "39 of the 61 rows" in error
    assert "transpose" in error
    assert not (tmp_path / "out" / "h5" / "rows.h5").exists() and (tmp_path / "out" / "h5" / "echo.h5").exists()


def test_stored_mask_columns_without_data_are_left_out_with_a_warning(tmp_path):
    """A stored ``mask`` marking columns that hold no data (an all-ones mask over undersampled k-space, or a mask
    stored uncentred) was used as it was: the model took those columns' zeros for measured data (the bundled VarNet
    fell from 36.7 to 20.5 dB PSNR). Columns in the padding, which fastMRI's masks mark, stay silent."""
    from reconkit.data import read_volume
    from reconkit.errors import DataError, ReconkitWarning
    from reconkit.inference import volume_mask

    write_fastmri_file(tmp_path / "full.h5", np.random.default_rng(9), height=32, width=48, lines=40)
    columns = np.zeros(48, bool)
    columns[4:44:3], columns[20:28] = True, True
    with h5py.File(tmp_path / "full.h5", "r+") as f:
        f["kspace"][...] = f["kspace"][()] * columns
        f.create_dataset("mask", data=np.ones(48, np.float32))
    with pytest.warns(ReconkitWarning, match=r"full\.h5: its 'mask' marks 20 column\(s\) .* hold no data") as caught:
        mask, retrospective = volume_mask(read_volume(tmp_path / "full.h5"), "equispaced_fraction", 4, 0.08, 0)
    assert len(caught) == 1 and "columns 5, 6, 8, 9, 11, …" in str(caught[0].message)
    assert not retrospective
    np.testing.assert_array_equal(mask.reshape(-1), columns.astype(np.float32))
    with h5py.File(tmp_path / "full.h5", "r+") as f:
        f["mask"][...] = columns | (np.arange(48) < 4)  # the padding columns [0, 4) hold no data either
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mask, _ = volume_mask(read_volume(tmp_path / "full.h5"), "equispaced_fraction", 4, 0.08, 0)
    np.testing.assert_array_equal(mask.reshape(-1), columns.astype(np.float32))
    with h5py.File(tmp_path / "full.h5", "r+") as f:
        f["mask"][...] = ~columns
    with pytest.raises(DataError, match=r"full\.h5: its 'mask' marks none of the k-space columns that hold data"):
        volume_mask(read_volume(tmp_path / "full.h5"), "equispaced_fraction", 4, 0.08, 0)


TRAINED_4X = {"mask_type": "equispaced_fraction", "center_fractions": [0.08], "accelerations": [4]}


def _model_trained_at(tmp_path: Path, mask: dict | None) -> str:
    """A zero-filled checkpoint that records ``mask`` as its training mask (None: records none)."""
    from reconkit.models import build_model, save_model

    return str(save_model(tmp_path / "zf.ckpt", build_model("zero_filled"), "zero_filled", {}, mask))


def _scan_sampled_with(tmp_path: Path, name: str, columns: np.ndarray, lines: int | None = None) -> Path:
    """A 2-slice, 2-coil scan of ``len(columns)`` k-space columns (``lines`` of them acquired, centred: zero padding
    around), already undersampled: its k-space times ``columns``, which its ``mask`` dataset stores."""
    full = tmp_path / f"full_{name}"
    write_fastmri_file(full, np.random.default_rng(3), coils=2, height=16, width=len(columns), recon=(16, 16),
                       lines=lines)
    with h5py.File(full) as src, h5py.File(tmp_path / name, "w") as dst:
        dst.create_dataset("kspace", data=src["kspace"][()] * columns)
        dst.create_dataset("ismrmrd_header", data=src["ismrmrd_header"][()])
        dst.create_dataset("mask", data=columns)
        dst.attrs.update(dict(src.attrs))
    return tmp_path / name


def _line_mask(mask_type: str, acceleration: int, center_fraction: float, width: int, seed: int = 0) -> np.ndarray:
    from reconkit.data import create_mask_for_mask_type

    mask, _ = create_mask_for_mask_type(mask_type, [center_fraction], [acceleration])((1, 16, width, 2), seed=seed)
    return mask.numpy().reshape(width)


def _mismatch_notes(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("note:") and "expect lower quality" in line]


def test_a_scan_sampled_beyond_the_training_acceleration_gets_one_note(tmp_path, capsys):
    """8× (8 % centre) on a model trained at 4×: one note naming the file, what was measured and the training mask;
    at 4× none, and none from a model that records no training mask (a classical baseline, an old checkpoint)."""
    columns = _line_mask("equispaced_fraction", 8, 0.08, 64)
    scan = _scan_sampled_with(tmp_path, "scan8x.h5", columns)
    model = _model_trained_at(tmp_path, TRAINED_4X)
    code, _, err = _run(capsys, str(scan), "--model", model, "--output", str(tmp_path / "out"))
    (note,) = _mismatch_notes(err)
    assert code == 0 and note == (f"note: {scan}: sampled at {64 / columns.sum():.1f}x with 5 centre lines; the model "
                                  "was trained at 4x with 8 % centre (5 lines at this width): expect lower quality"), err
    scan4x = _scan_sampled_with(tmp_path, "scan4x.h5", _line_mask("equispaced_fraction", 4, 0.08, 64))
    code, _, err = _run(capsys, str(scan4x), "--model", model, "--output", str(tmp_path / "out"))
    assert code == 0 and "note:" not in err, err
    for untrained in ("zero-filled", _model_trained_at(tmp_path, None)):
        code, _, err = _run(capsys, str(scan), "--model", untrained, "--output", str(tmp_path / "out"))
        assert code == 0 and "note:" not in err, err


def test_a_narrower_centre_than_trained_is_noted_and_zero_padding_is_not_unsampled(tmp_path, capsys):
    """4× with a 2 % centre (1 line) on a model trained with 8 % (5 lines at 64 columns): noted. A 4× scan whose 64
    columns hold 24 of zero padding (fastMRI brain files) is 4× of its 40 acquired columns, not 6×: no note."""
    model = _model_trained_at(tmp_path, TRAINED_4X)
    narrow = _scan_sampled_with(tmp_path, "narrow.h5", _line_mask("equispaced_fraction", 4, 0.02, 64))
    code, _, err = _run(capsys, str(narrow), "--model", model, "--output", str(tmp_path / "out"))
    (note,) = _mismatch_notes(err)
    assert code == 0 and "narrow.h5: sampled at 4.0x with 1 centre line;" in note and "(5 lines" in note, err
    columns = _line_mask("equispaced_fraction", 4, 0.08, 64)
    columns[:12] = columns[-12:] = 0  # as volume_mask zeroes a mask outside the acquired window
    padded = _scan_sampled_with(tmp_path, "padded.h5", columns, lines=40)
    assert 64 / columns.sum() > 1.25 * 4  # taken over the whole width, it would be noted
    code, _, err = _run(capsys, str(padded), "--model", model, "--output", str(tmp_path / "out"))
    assert code == 0 and "note:" not in err, err


def test_a_retrospective_mask_is_not_noted_even_beyond_the_training_mask(tmp_path, capsys):
    """Fully sampled input undersampled here at --acceleration 8: the mask asked for, not the scan's own."""
    write_fastmri_file(tmp_path / "full.h5", np.random.default_rng(4), coils=2, height=16, width=64, recon=(16, 16))
    model = _model_trained_at(tmp_path, TRAINED_4X)
    code, _, err = _run(capsys, str(tmp_path / "full.h5"), "--model", model, "--output", str(tmp_path / "out"),
                        "--acceleration", "8", "--center-fraction", "0.02")
    assert code == 0 and "note:" not in err, err


def test_random_lines_on_a_model_trained_with_equispaced_masks_are_noted(tmp_path, capsys):
    """Same acceleration and centre, but random lines where the model saw regular ones (and the reverse)."""
    random_scan = _scan_sampled_with(tmp_path, "random.h5", _line_mask("random", 4, 0.08, 128, seed=1))
    regular_scan = _scan_sampled_with(tmp_path, "regular.h5", _line_mask("equispaced_fraction", 4, 0.08, 128))
    equispaced_model = _model_trained_at(tmp_path, TRAINED_4X)
    code, _, err = _run(capsys, str(random_scan), "--model", equispaced_model, "--output", str(tmp_path / "out"))
    (note,) = _mismatch_notes(err)
    assert code == 0 and "centre lines, random lines;" in note and "on equispaced_fraction masks" in note, err
    random_model = _model_trained_at(tmp_path, {**TRAINED_4X, "mask_type": "random"})
    code, _, err = _run(capsys, str(regular_scan), "--model", random_model, "--output", str(tmp_path / "out"))
    (note,) = _mismatch_notes(err)
    assert code == 0 and "equispaced lines;" in note and "on random masks" in note, err
    code, _, err = _run(capsys, str(random_scan), "--model", random_model, "--output", str(tmp_path / "out"))
    assert code == 0 and "note:" not in err, err


def test_training_mask_of_checkpoint_and_onnx_and_the_measured_sampling_in_the_api(tmp_path):
    """Every training pair is kept (the CLI defaults are the first); ``VolumeResult.sampling`` is the measurement."""
    from reconkit.data import read_volume
    from reconkit.data.masks import LineSampling
    from reconkit.export import export_onnx
    from reconkit.inference import TrainingMask, reconstruct_volume, training_mask_mismatch, volume_mask
    from reconkit.models import build_model

    onnx_path = export_onnx(build_model("zero_filled"), tmp_path / "zf.onnx", (2, 16, 64), metadata={
        "mask_family": "random", "acceleration": [4, 8], "center_fraction": [0.08, 0.04]})
    onnx_model = load_reconstructor(str(onnx_path))
    assert onnx_model.training_mask == TrainingMask("random", (4.0, 8.0), (0.08, 0.04))
    assert onnx_model.mask_defaults == {"mask_type": "random", "acceleration": 4, "center_fraction": 0.08}
    checkpoint = load_reconstructor(_model_trained_at(tmp_path, TRAINED_4X))
    assert checkpoint.training_mask == TrainingMask("equispaced_fraction", (4.0,), (0.08,))
    assert load_reconstructor("cg-sense").training_mask == TrainingMask()
    columns = _line_mask("equispaced_fraction", 8, 0.04, 64)
    volume = read_volume(_scan_sampled_with(tmp_path, "scan.h5", columns))
    result = reconstruct_volume(volume, onnx_model, volume_mask(volume, "random", 4, 0.08, None)[0])
    assert result.sampling == LineSampling(64 / columns.sum(), 3, None) and result.acceleration == 64 / columns.sum()
    assert training_mask_mismatch(onnx_model.training_mask, result.sampling, 64) is None  # 8x and 4 % trained
    assert "(3-5 lines at this width)" in training_mask_mismatch(onnx_model.training_mask, LineSampling(11, 1, None), 64)


def test_summary_shows_each_files_sampling(tmp_path, capsys):
    """The summary table gave file, slices, seconds and status only: a file's acceleration and centre lines (what
    the reconstruction worked from) were not shown anywhere unless they lay outside the model's training mask."""
    columns = _line_mask("equispaced_fraction", 8, 0.08, 64)
    scan = _scan_sampled_with(tmp_path, "scan8x.h5", columns)
    code, out, _ = _run(capsys, str(scan), "--model", "zero-filled", "--output", str(tmp_path / "out"), "--format", "h5")
    (row,) = [line for line in out.splitlines() if "scan8x.h5" in line]
    assert code == 0 and f"{64 / columns.sum():.1f}x, 5 centre" in row, out
