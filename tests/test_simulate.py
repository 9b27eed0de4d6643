"""Tests of the k-space simulator (reconkit.data.simulate) against fastmri, ismrmrd and the physics it claims."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import fastmri
import h5py
import ismrmrd.xsd
import numpy as np
import pytest
import torch
from fastmri.data import SliceDataset
from fastmri.data.subsample import create_mask_for_mask_type
from fastmri.data.transforms import VarNetDataTransform
from fastmri.data.transforms import center_crop as fastmri_center_crop

from reconkit.data.simulate import SOURCES, simulate_dataset, simulate_volume, write_volume
from reconkit.data.simulate.contrast import RANDOM_SIGNAL_RANGE, choose_protocol, randomise_signals, tissue_signals
from reconkit.data.simulate.dataset import split_assignment

SMALL = {"encoded_size": (96, 64), "recon_size": (48, 48), "slices": 3, "coils": 4}


def fastmri_rss_target(kspace: np.ndarray, recon_size) -> np.ndarray:
    """fastMRI's definition: RSS over coils of fastmri.ifft2c(kspace), fastmri's centre crop."""
    images = fastmri.ifft2c(torch.view_as_real(torch.from_numpy(kspace)))
    return fastmri_center_crop(fastmri.rss(fastmri.complex_abs(images), dim=1), recon_size).numpy()


@pytest.fixture(scope="module")
def noisy_and_clean():
    kwargs = {"encoded_size": (128, 80), "recon_size": (64, 64), "slices": 4, "coils": 8, "noise_correlation": 0.5}
    return simulate_volume(11, snr_db=20.0, **kwargs), simulate_volume(11, snr_db=float("inf"), **kwargs)


@pytest.mark.parametrize("snr_db", [float("inf"), 15.0])
@pytest.mark.parametrize("sizes", [((96, 64), (48, 48)), ((66, 42), (33, 27))])
def test_reconstruction_rss_is_fastmri_rss_of_kspace(snr_db, sizes):
    encoded, recon = sizes
    vol = simulate_volume(3, coils=5, slices=2, encoded_size=encoded, recon_size=recon, snr_db=snr_db)
    assert vol.kspace.dtype == np.complex64 and vol.kspace.shape == (2, 5, *encoded)
    assert vol.reconstruction_rss.dtype == np.float32 and vol.reconstruction_rss.shape == (2, *recon)
    np.testing.assert_allclose(vol.reconstruction_rss, fastmri_rss_target(vol.kspace, recon), rtol=1e-4, atol=1e-9)


def test_noise_free_kspace_images_the_object_in_fastmri_orientation(noisy_and_clean):
    """ifft2c of the noise-free k-space is the object times the coils (up to phase-encode truncation)."""
    _, clean = noisy_and_clean
    images = fastmri.ifft2c(torch.view_as_real(torch.from_numpy(clean.kspace)))
    rss = fastmri.rss(fastmri.complex_abs(images), dim=1).numpy()
    expected = np.abs(clean.image) * np.sqrt((np.abs(clean.sens_maps) ** 2).sum(axis=1))
    error = np.linalg.norm(rss - expected) / np.linalg.norm(expected)
    assert error < 0.1, f"relative error {error:.3f}"
    # Not flipped or transposed: the object's own mirror image is far off.
    flipped = np.linalg.norm(rss - expected[:, ::-1, ::-1]) / np.linalg.norm(expected)
    assert flipped > 3 * error


def test_fastmri_slice_dataset_reads_files_unchanged(tmp_path):
    manifest = simulate_dataset(tmp_path, 3, 4, snr_db=25.0, split=(1, 0, 0), seed=5, progress=False,
                                slices=2, encoded_size=(64, 48), recon_size=(32, 32))  # fmt: skip
    dataset = SliceDataset(tmp_path / "train", challenge="multicoil", dataset_cache_file=tmp_path / "cache.pkl")
    assert len(dataset) == 6
    by_name = {entry["file"].split("/")[-1]: entry for entry in manifest["volumes"]}
    for kspace, mask, target, attrs, fname, _slice_num in dataset:
        params = by_name[fname]["params"]
        assert kspace.shape == (4, 64, 48) and kspace.dtype == np.complex64 and mask is None
        assert attrs["encoding_size"] == (64, 48, 1) and attrs["recon_size"] == (32, 32, 1)
        assert (attrs["padding_left"], attrs["padding_right"]) == (params["padding_left"], params["padding_right"])
        left, right = attrs["padding_left"], attrs["padding_right"]
        assert not kspace[..., :left].any() and not kspace[..., right:].any()
        assert np.all(np.abs(kspace[..., left:right]).sum(axis=(0, 1)) > 0)
        assert target.shape == (32, 32) and np.isclose(attrs["max"], params_max(tmp_path / "train" / fname))
        assert attrs["acquisition"] == params["acquisition"] and attrs["patient_id"] == "mni152"
    # fastmri's own VarNet transform takes the samples as they come (masking honours the padding).
    transform = VarNetDataTransform(create_mask_for_mask_type("equispaced_fraction", [0.08], [4]), use_seed=True)
    sample = transform(*dataset[0])
    assert tuple(sample.masked_kspace.shape) == (4, 64, 48, 2) and tuple(sample.target.shape) == (32, 32)
    left, right = dataset.raw_samples[0].metadata["padding_left"], dataset.raw_samples[0].metadata["padding_right"]
    assert not sample.mask[..., :left, :].any() and not sample.mask[..., right:, :].any()


def params_max(path) -> float:
    with h5py.File(path, "r") as f:
        return float(f["reconstruction_rss"][()].max())


def test_file_schema_and_ismrmrd_header(tmp_path):
    vol = simulate_volume(2, **SMALL)
    path = write_volume(vol, tmp_path / "vol.h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vol.h5"]  # atomic: no temporary left behind
    with h5py.File(path, "r") as f:
        assert f["kspace"].dtype == np.complex64 and f["reconstruction_rss"].dtype == np.float32
        header = ismrmrd.xsd.CreateFromDocument(f["ismrmrd_header"][()])
        assert set(f.attrs) >= {"acquisition", "max", "norm", "patient_id"}
        np.testing.assert_allclose(f.attrs["norm"], np.linalg.norm(f["reconstruction_rss"][()]), rtol=1e-5)
        assert json.loads(f.attrs["simulation"])["seed"] == 2
    encoding = header.encoding[0]
    assert (encoding.encodedSpace.matrixSize.x, encoding.encodedSpace.matrixSize.y) == (96, 64)
    assert (encoding.reconSpace.matrixSize.x, encoding.reconSpace.matrixSize.y) == (48, 48)
    limits = encoding.encodingLimits.kspace_encoding_step_1
    assert 64 // 2 - limits.center == vol.padding[0] and vol.padding[0] + limits.maximum + 1 == vol.padding[1]
    assert header.acquisitionSystemInformation.receiverChannels == 4
    assert encoding.encodedSpace.fieldOfView_mm.x == pytest.approx(2 * encoding.reconSpace.fieldOfView_mm.x)


@pytest.mark.parametrize("num_coils", [1, 4, 15, 20])
def test_sensitivities_normalised_and_smooth(num_coils):
    vol = simulate_volume(4, coils=num_coils, slices=2, encoded_size=(128, 80), recon_size=(64, 64))
    assert vol.sens_maps.shape == (2, num_coils, 128, 80)
    support = np.abs(vol.image) > 0.05 * np.abs(vol.image).max()
    rss = np.sqrt((np.abs(vol.sens_maps) ** 2).sum(axis=1))
    assert rss[support].max() == pytest.approx(1.0, rel=1e-4)
    assert rss[support].min() > 0.02  # every part of the object is seen by some coil
    # Smooth: inside the object the maps change by under 4 % per mm (they vary over centimetres, not pixels).
    pixel_mm = vol.params["fov_mm"][1] / 64
    step = np.abs(np.diff(vol.sens_maps, axis=-1)) / pixel_mm
    inside = np.broadcast_to(support[:, None, :, 1:] & support[:, None, :, :-1], step.shape)
    level = np.abs(vol.sens_maps)[np.broadcast_to(support[:, None], vol.sens_maps.shape)].mean()
    assert step[inside].mean() < 0.04 * level
    # Realistic shading: each coil is bright near its side, so coil images differ a lot.
    if num_coils > 1:
        per_coil = np.abs(vol.sens_maps[0])[:, support[0]]
        assert (per_coil.max(axis=1) / per_coil.mean(axis=1)).min() > 1.5


def test_noise_covariance_and_snr(noisy_and_clean):
    noisy, clean = noisy_and_clean
    left, right = noisy.padding
    noise = (noisy.kspace - clean.kspace)[..., left:right]
    assert not noisy.kspace[..., :left].any() and not noisy.kspace[..., right:].any()
    samples = noise.transpose(1, 0, 2, 3).reshape(noise.shape[1], -1).astype(np.complex128)
    measured = samples @ samples.conj().T / samples.shape[1]
    expected = noisy.noise_covariance
    assert np.allclose(expected, expected.conj().T) and np.all(np.linalg.eigvalsh(expected) > 0)
    assert np.linalg.norm(measured - expected) / np.linalg.norm(expected) < 0.03
    std = np.sqrt(np.diag(expected).real)
    correlation = np.abs(expected) / np.outer(std, std)
    assert correlation[~np.eye(len(std), dtype=bool)].max() > 0.1  # coils share noise
    # SNR: 20 log10(mean object RSS / noise std) is the requested 20 dB.
    support = np.abs(clean.image) > 0.05 * np.abs(clean.image).max()
    signal = (np.abs(clean.image) * np.sqrt((np.abs(clean.sens_maps) ** 2).sum(axis=1)))[support].mean()
    snr = 20 * np.log10(signal / np.sqrt(np.trace(measured).real / len(std)))
    assert snr == pytest.approx(20.0, abs=0.1)


def test_uncorrelated_noise_option():
    vol = simulate_volume(1, noise_correlation=0.0, **SMALL)
    offdiag = vol.noise_covariance[~np.eye(4, dtype=bool)]
    assert np.all(offdiag == 0)


def test_reproducible_by_seed_and_streams_independent():
    a, b = simulate_volume(9, **SMALL), simulate_volume(9, **SMALL)
    np.testing.assert_array_equal(a.kspace, b.kspace)
    assert a.header == b.header and a.params == b.params
    c = simulate_volume(10, **SMALL)
    assert not np.array_equal(a.image, c.image)
    more_coils = simulate_volume(9, **{**SMALL, "coils": 8})
    np.testing.assert_array_equal(a.image, more_coils.image)  # same anatomy, contrast and phase


def test_contrast_weightings_follow_the_literature():
    rng = np.random.default_rng(0)
    for _ in range(20):
        t1 = tissue_signals(choose_protocol("t1", rng), rng)
        t2 = tissue_signals(choose_protocol("t2", rng), rng)
        pd = tissue_signals(choose_protocol("pd", rng), rng)
        assert t1["wm"] > t1["gm"] > t1["csf"] and t1["fat"] > t1["wm"]
        assert t2["csf"] > t2["gm"] > t2["wm"]
        assert pd["gm"] > pd["wm"]


def test_contrast_randomisation_draws_tissue_intensities_only_when_asked():
    rng = np.random.default_rng(1)
    physical = tissue_signals(choose_protocol("t2", rng), rng)
    state = rng.bit_generator.state
    assert randomise_signals(physical, rng, 0.0) == (physical, False)
    assert rng.bit_generator.state == state  # probability 0 draws nothing: old datasets are reproduced exactly
    draws = [randomise_signals(physical, rng, 1.0) for _ in range(50)]
    assert all(flag for _, flag in draws)
    values = np.array([[signals[t] for t in physical] for signals, _ in draws])
    assert values.min() >= RANDOM_SIGNAL_RANGE[0] and values.max() <= RANDOM_SIGNAL_RANGE[1]
    assert (np.argsort(values, axis=1) != np.argsort(values[0])).any(axis=1).mean() > 0.5  # tissue orders vary
    half = [randomise_signals(physical, np.random.default_rng(s), 0.5)[1] for s in range(200)]
    assert 0.35 < np.mean(half) < 0.65
    with pytest.raises(ValueError, match="probability"):
        randomise_signals(physical, rng, 1.5)


def test_random_contrast_changes_only_the_tissue_intensities():
    plain = simulate_volume(4, **SMALL)
    same = simulate_volume(4, random_contrast=0.0, **SMALL)
    randomised = simulate_volume(4, random_contrast=1.0, **SMALL)
    np.testing.assert_array_equal(plain.kspace, same.kspace)
    assert "contrast_randomised" not in plain.params  # files without randomisation are as before
    assert randomised.params["contrast_randomised"] and randomised.params["random_contrast"] == 1.0
    for key in ("orientation", "rotation_deg", "fov_mm", "slice_offsets_mm", "protocol"):
        assert randomised.params[key] == plain.params[key]
    np.testing.assert_array_equal(randomised.sens_maps, plain.sens_maps)
    assert not np.allclose(np.abs(randomised.image), np.abs(plain.image))
    # a fixed-contrast real image is not randomised
    epi = dict(SMALL, source="nibabel_epi")
    np.testing.assert_array_equal(
        simulate_volume(4, **epi).kspace, simulate_volume(4, random_contrast=1.0, **epi).kspace
    )


def test_held_out_sources_are_real_images_of_other_subjects():
    assert set(SOURCES) == {
        "mni152", "dipy_b0", "pydicom_mr", "nibabel_epi", "pydicom_abdomen", "pydicom_liver", "pydicom_shoulder"
    }
    b0 = simulate_volume(0, source="dipy_b0", coils=4, slices=12, encoded_size=(128, 96), recon_size=(64, 64))
    assert b0.kspace.shape[0] == 10 and b0.attrs["patient_id"] == "dipy_b0"  # the file has 10 slices
    single = simulate_volume(0, source="pydicom_mr", **SMALL)
    assert single.kspace.shape[0] == 1 and single.attrs["patient_id"] == "pydicom_mr"
    for vol in (b0, single):
        assert vol.reconstruction_rss.max() > 0 and np.isfinite(vol.kspace).all()
    with pytest.raises(ValueError, match="axial"):
        simulate_volume(0, source="dipy_b0", orientation="coronal", **SMALL)


def test_real_training_sources_are_the_package_images():
    import nibabel
    import pydicom
    from pydicom.data import get_testdata_file

    from reconkit.data.simulate.anatomy import load_source

    epi = load_source("nibabel_epi")
    path = Path(nibabel.__file__).parent / "tests" / "data" / "example4d.nii.gz"
    frame = np.asarray(nibabel.load(path).dataobj[..., 0], dtype=np.float32)
    assert epi.maps.shape == (1, *frame.shape) and np.allclose(np.diag(epi.affine)[:3], (2.0, 2.0, 2.2))
    # Same image up to the 99.5th-percentile scaling and the clip at 1.2.
    scale = np.percentile(frame, 99.5)
    np.testing.assert_allclose(epi.maps[0], np.clip(frame / scale, 0, 1.2), rtol=1e-5, atol=1e-6)
    abdomen = load_source("pydicom_abdomen")
    pixels = pydicom.dcmread(get_testdata_file("examples_overlay.dcm")).pixel_array
    assert abdomen.maps.shape == (1, pixels.shape[1], pixels.shape[0], 1)
    assert np.isclose(abdomen.affine[0, 0], 0.72314, atol=1e-4)
    centre = abdomen.maps[0, 100:-100, 100:-100, 0]  # inside the edge taper: the image itself, scaled
    pixels_xy = pixels.T[:, ::-1].astype(np.float32)[100:-100, 100:-100]
    ratio = centre[pixels_xy > 100] / pixels_xy[pixels_xy > 100]
    assert np.allclose(ratio, ratio[0], rtol=1e-4)
    epi_volume = simulate_volume(
        0, source="nibabel_epi", coils=4, slices=30, encoded_size=(128, 96), recon_size=(64, 64)
    )
    assert epi_volume.kspace.shape[0] == 24 and epi_volume.attrs["patient_id"] == "nibabel_epi"
    body = simulate_volume(0, source="pydicom_abdomen", **SMALL)
    assert body.kspace.shape[0] == 1 and body.params["protocol"]["contrast"] == "t1"


def test_pydicom_data_sources_are_its_images_binned_and_tapered():
    import pydicom
    from pydicom.data import get_testdata_file

    from reconkit.data.simulate.anatomy import load_source

    for name, filename, binning, acquisition in (("pydicom_liver", "MR-SIEMENS-DICOM-WithOverlays.dcm", 1, "AXT1"),
                                                 ("pydicom_shoulder", "MR2_UNCR.dcm", 2, "SAGT1")):  # fmt: skip
        dataset = pydicom.dcmread(get_testdata_file(filename, download=False))
        pixels = dataset.pixel_array.astype(np.float32)
        rows, cols = pixels.shape[0] // binning, pixels.shape[1] // binning
        binned = pixels[: rows * binning, : cols * binning].reshape(rows, binning, cols, binning).mean(axis=(1, 3))
        source = load_source(name)
        assert source.maps.shape == (1, cols, rows, 1)
        assert np.isclose(source.affine[0, 0], float(dataset.PixelSpacing[0]) * binning, rtol=1e-6)
        centre = source.maps[0, 40:-40, 40:-40, 0]  # inside the edge taper: the binned image, scaled (< the clip)
        binned_xy = binned.T[:, ::-1][40:-40, 40:-40]
        keep = (binned_xy > np.percentile(binned_xy, 50)) & (centre < 1.19)
        ratio = centre[keep] / binned_xy[keep]
        assert keep.sum() > 1000 and np.allclose(ratio, ratio[0], rtol=1e-4)
        assert source.maps[0, 0, :, 0].max() < 0.05 * source.maps.max()  # the frame's edge is tapered to ~0
        volume = simulate_volume(0, source=name, **SMALL)
        assert volume.kspace.shape[0] == 1 and volume.attrs["patient_id"] == name
        assert np.isfinite(volume.kspace).all() and volume.reconstruction_rss.max() > 0
        # labelled with the body plane of the DICOM header's ImageOrientationPatient, and cut only there
        assert volume.attrs["acquisition"] == acquisition and f"<protocolName>{acquisition}<" in volume.header
        plane = volume.params["orientation"]
        assert simulate_volume(0, source=name, orientation=plane, **SMALL).attrs["acquisition"] == acquisition
        other = "coronal" if plane != "coronal" else "axial"
        with pytest.raises(ValueError, match=f"can be cut only {plane}, not '{other}'"):
            simulate_volume(0, source=name, orientation=other, **SMALL)


def test_missing_package_image_is_a_clear_error_not_a_download(monkeypatch):
    import pydicom.data

    from reconkit.data.simulate import anatomy

    calls = []

    def offline(name, read=False, download=True):
        calls.append(download)

    monkeypatch.setattr(pydicom.data, "get_testdata_file", offline)
    anatomy._load_pydicom_abdomen.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="examples_overlay.dcm.*never downloads"):
            anatomy.load_source("pydicom_abdomen")
    finally:
        anatomy._load_pydicom_abdomen.cache_clear()
    assert calls == [False]


def test_dataset_draws_sources_per_volume(tmp_path):
    options = {"coils": 4, "slices": 1, "encoded_size": (48, 40), "recon_size": (24, 24), "seed": 3, "progress": False}
    mixed = simulate_dataset(tmp_path / "mixed", 8, source=("mni152", "nibabel_epi", "pydicom_abdomen"), **options)
    sources = [v["params"]["source"] for v in mixed["volumes"]]
    assert len(set(sources)) >= 2 and set(sources) <= {"mni152", "nibabel_epi", "pydicom_abdomen"}
    for entry, source in zip(mixed["volumes"], sources):
        assert Path(entry["file"]).name.startswith(f"{source}_s3_")
        with h5py.File(tmp_path / "mixed" / entry["file"], "r") as f:
            assert f.attrs["patient_id"] == source
    # A single source keeps the per-volume draws (coils, SNR) of a dataset without the source draw.
    single = simulate_dataset(tmp_path / "single", 3, source=["mni152"], **options)
    plain = simulate_dataset(tmp_path / "plain", 3, source="mni152", **options)
    assert single["volumes"] == plain["volumes"]
    for bad in ([], ["mni152", "mni153"]):
        with pytest.raises(ValueError, match="source needs names from"):
            simulate_dataset(tmp_path / "bad", 2, source=bad, **options)
    with pytest.raises(ValueError, match="probability"):
        simulate_dataset(tmp_path / "bad", 2, random_contrast=2.0, **options)
    assert not (tmp_path / "bad").exists()  # checked before anything is written


def test_mni152_files_are_nilearns_templates():
    from nilearn import datasets

    from reconkit.data.simulate.anatomy import load_source

    source = load_source("mni152")
    gm = datasets.load_mni152_gm_template(resolution=1)
    assert source.maps.shape[1:] == gm.shape and np.allclose(source.affine, gm.affine)
    brain = datasets.load_mni152_brain_mask(resolution=1).get_fdata() > 0.5
    tissue = source.maps[:3].sum(axis=0)
    assert tissue[brain].mean() > 0.9 and source.maps[3:].sum(axis=0)[brain].max() == 0  # fat/muscle outside


@pytest.mark.parametrize(
    "kwargs, message",
    [({"encoded_size": (63, 40)}, "even"), ({"recon_size": (80, 20)}, "fit"), ({"coils": 0}, "coils"),
     ({"contrast": "flair"}, "contrast"), ({"source": "knee"}, "source"), ({"noise_correlation": 1.0}, "correlation"),
     ({"random_contrast": -0.1}, "probability")],
)  # fmt: skip
def test_bad_options_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        simulate_volume(0, **{"encoded_size": (64, 40), "recon_size": (32, 32), "slices": 1, "coils": 2, **kwargs})


def test_split_disjoint_reproducible_and_sized():
    labels = split_assignment(20, (0.7, 0.15, 0.15), seed=1)
    assert labels == split_assignment(20, (0.7, 0.15, 0.15), seed=1)
    assert labels != split_assignment(20, (0.7, 0.15, 0.15), seed=2)
    assert [labels.count(s) for s in ("train", "val", "test")] == [14, 3, 3]
    assert split_assignment(3, (0.7, 0.15, 0.15), seed=0).count("test") == 1
    assert set(split_assignment(4, (0, 0, 1), seed=0)) == {"test"}
    with pytest.raises(ValueError, match="split"):
        split_assignment(4, (1, -1, 1), seed=0)


def test_simulate_dataset_reproducible_with_variety(tmp_path):
    options = {"coils": (2, 6), "snr_db": (10.0, 40.0), "slices": 1, "encoded_size": (48, 40), "recon_size": (24, 24),
                   "seed": 3, "progress": False}  # fmt: skip
    first = simulate_dataset(tmp_path / "a", 6, **options)
    second = simulate_dataset(tmp_path / "b", 6, **options)
    assert first == second
    assert json.loads((tmp_path / "a" / "manifest.json").read_text()) == first
    files = [entry["file"] for entry in first["volumes"]]
    assert len(set(files)) == 6 and all(f.startswith(entry["split"] + "/") for f, entry in zip(files, first["volumes"]))
    for name in files:
        with h5py.File(tmp_path / "a" / name, "r") as fa, h5py.File(tmp_path / "b" / name, "r") as fb:
            np.testing.assert_array_equal(fa["kspace"][()], fb["kspace"][()])
    assert {v["params"]["coils"] for v in first["volumes"]} == {2, 6}
    assert {v["params"]["snr_db"] for v in first["volumes"]} == {10.0, 40.0}
    assert len({v["params"]["acquisition"] for v in first["volumes"]}) >= 3  # mixed orientation and contrast


def test_noise_free_dataset_writes_standard_json(tmp_path):
    """``snr_db=inf`` once wrote ``Infinity`` into manifest.json and the ``simulation`` attribute, which strict JSON
    parsers (jq, JavaScript) refuse; it is now the string "inf", which ``float()`` reads."""

    def refuse(constant: str) -> None:
        raise ValueError(f"non-standard JSON constant {constant}")

    simulate_dataset(tmp_path, 1, 2, snr_db=float("inf"), slices=1, encoded_size=(48, 40), recon_size=(24, 24),
                     split=(1, 0, 0), progress=False)  # fmt: skip
    manifest = json.loads((tmp_path / "manifest.json").read_text(), parse_constant=refuse)
    assert manifest["options"]["snr_db"] == ["inf"] and float(manifest["volumes"][0]["params"]["snr_db"]) == np.inf
    with h5py.File(tmp_path / manifest["volumes"][0]["file"], "r") as f:
        assert json.loads(f.attrs["simulation"], parse_constant=refuse)["snr_db"] == "inf"


def test_cli_writes_dataset_and_reports_bad_options(tmp_path, capsys):
    from reconkit.cli.main import main

    args = ["simulate", "--output", str(tmp_path / "out"), "--num-volumes", "3", "--coils", "3",
            "--encoded-size", "48", "40", "--recon-size", "24", "24", "--slices", "1", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert sorted(p.parent.name for p in (tmp_path / "out").rglob("*.h5")) == ["test", "train", "val"]
    assert main([*args[:2], str(tmp_path / "mixed"), *args[3:], "--source", "nibabel_epi", "pydicom_abdomen"]) == 0
    manifest = json.loads((tmp_path / "mixed" / "manifest.json").read_text())
    assert manifest["options"]["source"] == ["nibabel_epi", "pydicom_abdomen"]
    assert {v["params"]["source"] for v in manifest["volumes"]} <= {"nibabel_epi", "pydicom_abdomen"}
    assert main([*args[:2], str(tmp_path / "random"), *args[3:], "--random-contrast", "1"]) == 0
    manifest = json.loads((tmp_path / "random" / "manifest.json").read_text())
    assert manifest["options"]["random_contrast"] == 1.0
    assert all(v["params"]["contrast_randomised"] for v in manifest["volumes"])
    capsys.readouterr()
    few = [*args[:2], str(tmp_path / "few"), "--num-volumes", "1", *args[5:13], "--slices", "2", "--no-progress"]
    assert main(few + ["--source", "pydicom_abdomen"]) == 0  # one image: fewer slices than asked is said
    assert ("note: source pydicom_abdomen holds 1 slice(s) in this orientation; its volumes have 1, not --slices 2"
            in capsys.readouterr().err)
    assert main(args[:-1] + ["--encoded-size", "47", "40"]) == 2
    assert "even" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("not a folder")
    assert main(["simulate", "--output", str(tmp_path / "a_file"), *args[3:]]) == 2
    err = capsys.readouterr().err
    assert f"a_file: the output cannot be written: {tmp_path / 'a_file'} exists and is not a directory" in err
    (tmp_path / "link").symlink_to(tmp_path / "unmounted")  # was "[Errno 17] File exists: '.../link'"
    assert main(["simulate", "--output", str(tmp_path / "link"), *args[3:]]) == 2
    assert f"is a symbolic link to {tmp_path / 'unmounted'}, which does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--help"])
    assert exit_info.value.code == 0 and "examples:" in capsys.readouterr().out


def test_cli_shows_no_progress_bar_when_stderr_is_not_a_terminal(tmp_path, capsys):
    """tqdm's bar went into CI logs and pipes (one line per update) unless --no-progress was given, where
    reconstruct's bar is off there."""
    from reconkit.cli.main import main

    assert main(["simulate", "--output", str(tmp_path), "--num-volumes", "1", "--coils", "2", "--encoded-size", "48",
                 "40", "--recon-size", "24", "24", "--slices", "1"]) == 0  # fmt: skip
    assert capsys.readouterr().err == ""


def test_cli_exit_code_tells_a_failed_write_from_bad_arguments(tmp_path, capsys, monkeypatch):
    """Every OSError was exit 2 (bad arguments): a disk that filled during the run read as a usage error. An output
    below a file is still refused before any work with 2, naming --output, as reconstruct and demo do."""
    from reconkit.cli.main import main

    args = ["simulate", "--num-volumes", "1", "--coils", "2", "--encoded-size", "48", "40", "--recon-size", "24", "24",
            "--slices", "1"]  # fmt: skip
    (tmp_path / "a_file").write_text("")
    assert main([*args, "--output", str(tmp_path / "a_file" / "sim")]) == 2
    assert capsys.readouterr().err == (f"reconkit simulate: error: --output {tmp_path / 'a_file' / 'sim'}: "
                                       f"{tmp_path / 'a_file'} exists and is not a directory\n")

    def disk_full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("reconkit.data.simulate.dataset.write_volume", disk_full)
    assert main([*args, "--output", str(tmp_path / "sim")]) == 1
    assert capsys.readouterr().err == "reconkit simulate: error: [Errno 28] No space left on device\n"


def test_a_second_run_into_the_same_folder_cannot_put_a_volume_in_two_splits(tmp_path):
    options = {"snr_db": 25.0, "seed": 3, "progress": False, "slices": 1, "encoded_size": (48, 32),
               "recon_size": (24, 20)}
    first = simulate_dataset(tmp_path, 4, 2, **options)
    again = simulate_dataset(tmp_path, 4, 2, **options)  # the same command again: the same files, replaced
    assert again["volumes"] == first["volumes"]
    fewer = split_assignment(2, (0.7, 0.15, 0.15), 3)
    moved = [i for i in range(2) if fewer[i] != first["volumes"][i]["split"]]
    assert moved  # with 2 volumes, one of the 4-volume run's files changes split
    (tmp_path / "manifest.json").unlink()  # as after an interrupted run: the earlier volumes are not known as such
    with pytest.raises(ValueError, match="already exists .* the volume would be in two splits"):
        simulate_dataset(tmp_path, 2, 2, **options)
    with pytest.raises(ValueError, match="snr_db must be numbers"):
        simulate_dataset(tmp_path / "nan", 1, 2, **{**options, "snr_db": float("nan")})
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        simulate_dataset(tmp_path / "seed", 1, 2, **{**options, "seed": -1})
    with pytest.raises(ValueError, match="encoded_size must be two even numbers"):
        simulate_dataset(tmp_path / "odd", 1, 2, **{**options, "encoded_size": (97, 61)})
    assert not (tmp_path / "odd").exists()  # a bad size leaves no empty folder behind


def test_a_rerun_replaces_the_earlier_runs_dataset_and_warns_of_other_files(tmp_path, capsys):
    """A second run with fewer volumes (or another seed) kept the first run's other volumes next to its own: the
    folder mixed two datasets, which training read as one, while manifest.json listed only the second. The volumes
    the earlier manifest lists are now replaced as a whole; files it does not list are kept, with a warning."""
    from reconkit.cli.main import main

    args = ["simulate", "--output", str(tmp_path), "--coils", "2", "--encoded-size", "48", "40", "--recon-size", "24",
            "24", "--slices", "1", "--split", "1", "1", "1"]  # fmt: skip
    assert main([*args, "--num-volumes", "4", "--seed", "0"]) == 0
    assert len(list(tmp_path.glob("*/*.h5"))) == 4
    (tmp_path / "train" / "mine.h5").write_text("a user's own file")
    (tmp_path / "keep.h5").write_text("outside the split folders")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["volumes"] += [{"file": "train/../keep.h5"}, {"file": "train/nul\0.h5"}]  # hand-edited entries that
    # name a file outside the split folders or no file at all are left out
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main([*args, "--num-volumes", "3", "--seed", "1"]) == 0
    second = json.loads((tmp_path / "manifest.json").read_text())
    volumes = sorted(path.relative_to(tmp_path).as_posix() for path in tmp_path.glob("*/*.h5"))
    assert volumes == sorted([*(volume["file"] for volume in second["volumes"]), "train/mine.h5"])
    assert (tmp_path / "keep.h5").exists()
    assert capsys.readouterr().err == (f"warning: {tmp_path} also holds 1 volume file(s) this run did not write (the "
                                       f"first: {tmp_path / 'train' / 'mine.h5'}); training on it reads them too\n")


def test_a_rerun_refused_for_a_split_leak_deletes_nothing(tmp_path, capsys):
    """A rerun deleted the earlier run's volumes before checking that none of its own already lay in another split
    folder: refused there (exit 2, 'use an empty output folder'), it had deleted the earlier dataset and left its
    manifest.json listing the deleted files (review41). The check now comes first."""
    from reconkit.cli.main import main

    args = ["simulate", "--output", str(tmp_path), "--coils", "2", "--encoded-size", "48", "40", "--recon-size", "24",
            "24", "--slices", "1"]  # fmt: skip
    assert main([*args, "--num-volumes", "2", "--seed", "0", "--split", "1", "1", "0"]) == 0
    first = sorted(path.relative_to(tmp_path).as_posix() for path in tmp_path.glob("*/*.h5"))
    (tmp_path / "val" / "mni152_s1_0000.h5").write_text("a file this rerun would also write, in train")
    capsys.readouterr()
    assert main([*args, "--num-volumes", "1", "--seed", "1", "--split", "1", "0", "0"]) == 2
    assert "would be in two splits" in capsys.readouterr().err
    assert sorted(path.relative_to(tmp_path).as_posix() for path in tmp_path.glob("*/*.h5")) == sorted(
        [*first, "val/mni152_s1_0000.h5"])
    assert sorted(v["file"] for v in json.loads((tmp_path / "manifest.json").read_text())["volumes"]) == first


def test_a_rerun_stopped_part_way_leaves_no_manifest_of_the_earlier_run(tmp_path, monkeypatch):
    """The earlier run's manifest.json stayed and gave the files the stopped rerun had replaced their old
    parameters (here 2 coils for a 4-coil file)."""
    from reconkit.data.simulate import dataset

    options = {"slices": 1, "encoded_size": (48, 32), "recon_size": (24, 20), "split": (1, 0, 0), "progress": False,
               "source": "pydicom_mr"}  # fmt: skip
    simulate_dataset(tmp_path, 1, 2, **options)
    real_simulate, calls = dataset.simulate_volume, []

    def simulate_volume(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # Ctrl-C while the second volume is simulated
            raise KeyboardInterrupt
        return real_simulate(*args, **kwargs)

    monkeypatch.setattr(dataset, "simulate_volume", simulate_volume)
    with pytest.raises(KeyboardInterrupt):
        simulate_dataset(tmp_path, 2, 4, **options)
    with h5py.File(tmp_path / "train" / "pydicom_mr_s0_0000.h5") as f:
        assert f["kspace"].shape[1] == 4
    assert not (tmp_path / "manifest.json").exists()


def test_options_a_source_cannot_take_are_refused_before_anything_is_written(tmp_path):
    options = {"coils": 2, "slices": 1, "encoded_size": (48, 32), "recon_size": (24, 20), "seed": 1, "progress": False}
    # dipy_b0 is axial only: the mni152 volumes drawn before it were written, then the run stopped without a manifest
    with pytest.raises(ValueError, match="source 'dipy_b0' can be cut only axial, not 'coronal'"):
        simulate_dataset(tmp_path / "orientation", 6, source=("mni152", "dipy_b0"), orientation="coronal", **options)
    with pytest.raises(ValueError, match="noise correlation must be in"):
        simulate_dataset(tmp_path / "correlation", 2, noise_correlation=1.0, **options)
    assert not (tmp_path / "orientation").exists() and not (tmp_path / "correlation").exists()
    fixed = {"source": "dipy_b0", "coils": 2, "slices": 1, "encoded_size": (48, 32), "recon_size": (24, 20)}
    with pytest.raises(ValueError, match="unknown contrast 'flair'"):  # ignored by a fixed-contrast source, still a typo
        simulate_volume(0, contrast="flair", **fixed)
    with pytest.raises(ValueError, match="field_strength_t must be 1.5 or 3.0, got 2.0"):
        simulate_volume(0, field_strength_t=2.0, **fixed)


def test_split_fractions_must_be_finite():
    for bad in ((float("nan"), 1, 1), (float("inf"), 1, 1)):
        with pytest.raises(ValueError, match="split needs three finite non-negative fractions"):
            split_assignment(4, bad, seed=0)


@pytest.mark.parametrize("choices", [{"coils": []}, {"snr_db": []}])
def test_empty_coil_or_snr_choices_are_named(tmp_path, choices):
    options = {"coils": 2, "slices": 1, "encoded_size": (48, 32), "recon_size": (24, 20), "progress": False}
    with pytest.raises(ValueError, match="coils and snr_db need at least one value each"):
        simulate_dataset(tmp_path / "out", 1, **{**options, **choices})
    assert not (tmp_path / "out").exists()
