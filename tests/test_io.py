"""Output writers: fastMRI HDF5 read by fastmri's evaluation, DICOM / NIfTI geometry, PNG panels, atomicity."""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import stat
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import h5py
import matplotlib.image
import nibabel as nib
import numpy as np
import pydicom
import pytest
from fastmri import evaluate as fastmri_evaluate

from reconkit.data.ismrmrd_header import parse_ismrmrd_header
from reconkit.io import (
    ImageGeometry,
    geometry_from_header,
    new_study,
    write_dicom_series,
    write_fastmri_h5,
    write_nifti,
    write_png_panel,
    write_png_panels,
)
from reconkit.io import dicom as dicom_module
from reconkit.io.dicom import dicom_text

HEADER = (
    '<?xml version="1.0" encoding="utf-8"?><ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><encoding>'
    "<encodedSpace><matrixSize><x>640</x><y>368</y><z>1</z></matrixSize>"
    "<fieldOfView_mm><x>280</x><y>161</y><z>4.5</z></fieldOfView_mm></encodedSpace>"
    "<reconSpace><matrixSize><x>320</x><y>320</y><z>1</z></matrixSize>"
    "<fieldOfView_mm><x>140</x><y>120</y><z>3.5</z></fieldOfView_mm></reconSpace><encodingLimits>"
    "<kspace_encoding_step_1><minimum>0</minimum><maximum>366</maximum><center>183</center></kspace_encoding_step_1>"
    "</encodingLimits></encoding></ismrmrdHeader>"
)


def _volume(rng: np.random.Generator, shape=(3, 24, 18)) -> np.ndarray:
    return rng.random(shape).astype(np.float32) * 1e-4  # fastMRI magnitudes are ~1e-4


def _files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*"))


def test_geometry_from_fastmri_header():
    geometry = geometry_from_header(parse_ismrmrd_header(HEADER))
    assert geometry == ImageGeometry(row_spacing_mm=140 / 320, col_spacing_mm=120 / 320, slice_thickness_mm=3.5)
    assert geometry_from_header(None) == ImageGeometry()


def test_geometry_of_kspace_smaller_than_the_recon_matrix():
    """Images that keep the k-space's grid (it is smaller than the recon matrix) have the encoded field of view over
    the k-space size as spacing; they were labelled with the recon matrix's (here 1.5x too fine along W)."""
    info = parse_ismrmrd_header(HEADER)
    assert geometry_from_header(info, (640, 368)) == geometry_from_header(info)  # cropped to the recon matrix
    assert geometry_from_header(info, (640, 213)) == ImageGeometry(140 / 320, 161 / 213, 3.5)
    assert geometry_from_header(info, (300, 213)) == ImageGeometry(280 / 300, 161 / 213, 3.5)


def test_hdf5_is_scored_by_fastmri_evaluate(tmp_path):
    rng = np.random.default_rng(0)
    target_dir, pred_dir = tmp_path / "target", tmp_path / "pred"
    target_dir.mkdir()
    targets = {}
    for name in ("file_a.h5", "file_b.h5"):
        target = _volume(rng, (4, 32, 32))
        targets[name] = target
        with h5py.File(target_dir / name, "w") as f:
            f.create_dataset("reconstruction_rss", data=target)
            f.attrs["acquisition"] = "CORPD_FBK"
        write_fastmri_h5(pred_dir / name, target + 1e-5 * rng.standard_normal(target.shape), {"acquisition": "x"})
    args = argparse.Namespace(target_path=target_dir, predictions_path=pred_dir, acquisition=None, acceleration=None)
    metrics = fastmri_evaluate.evaluate(args, "reconstruction_rss")
    expected = np.mean(
        [fastmri_evaluate.nmse(t, h5py.File(pred_dir / n)["reconstruction"][()]) for n, t in targets.items()]
    )
    assert metrics.means()["NMSE"] == pytest.approx(expected, rel=1e-6)
    with h5py.File(pred_dir / "file_a.h5") as f:
        assert f["reconstruction"].dtype == np.float32 and f["reconstruction"].shape == (4, 32, 32)
        assert f.attrs["acquisition"] == "x"


def test_hdf5_rejects_complex_or_2d(tmp_path):
    with pytest.raises(ValueError, match="slices, h, w"):
        write_fastmri_h5(tmp_path / "x.h5", np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="slices, h, w"):
        write_fastmri_h5(tmp_path / "x.h5", np.zeros((1, 4, 4), np.complex64))
    assert _files_in(tmp_path) == []


def test_dicom_series_geometry_pixels_and_uids(tmp_path):
    rng = np.random.default_rng(1)
    volume = _volume(rng, (3, 24, 18))
    geometry = geometry_from_header(parse_ismrmrd_header(HEADER))
    paths = write_dicom_series(tmp_path / "scan", volume, geometry, patient_id="subject7")
    assert [p.name for p in paths] == ["slice_000.dcm", "slice_001.dcm", "slice_002.dcm"]
    slices = [pydicom.dcmread(p) for p in paths]
    for i, ds in enumerate(slices):
        assert ds.SOPClassUID == pydicom.uid.MRImageStorage and ds.Modality == "MR"
        assert (ds.Rows, ds.Columns) == (24, 18)
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx([140 / 320, 120 / 320])
        assert float(ds.SliceThickness) == pytest.approx(3.5)
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert float(ds.ImagePositionPatient[2]) == pytest.approx((i - 1) * 3.5)
        assert float(ds.SliceLocation) == pytest.approx((i - 1) * 3.5)
        assert ds.pixel_array.dtype == np.uint16
        # MR has no rescale (viewers window the stored values): real values come from the real-world value mapping
        assert "RescaleSlope" not in ds and "RescaleIntercept" not in ds
        (mapping,) = ds.RealWorldValueMappingSequence
        slope = float(mapping.RealWorldValueSlope)
        assert (mapping.RealWorldValueFirstValueMapped, mapping.RealWorldValueLastValueMapped) == (0, 65535)
        assert float(mapping.RealWorldValueIntercept) == 0 and mapping.MeasurementUnitsCodeSequence[0].CodeValue
        np.testing.assert_allclose(ds.pixel_array * slope, volume[i], atol=slope)
        low, high = np.percentile(volume, [0.5, 99.5]) / slope  # the window in stored units
        assert float(ds.WindowCenter) == pytest.approx((low + high) / 2, rel=1e-5)
        assert float(ds.WindowWidth) == pytest.approx(high - low, rel=1e-5)
        assert ds.PatientID == "subject7"
    assert len({ds.SOPInstanceUID for ds in slices}) == 3
    assert len({ds.SeriesInstanceUID for ds in slices}) == 1
    again = pydicom.dcmread(write_dicom_series(tmp_path / "again", volume, geometry)[0])
    assert again.SeriesInstanceUID != slices[0].SeriesInstanceUID
    assert again.StudyInstanceUID != slices[0].StudyInstanceUID


def test_dicom_decimal_strings_fit_16_characters(tmp_path, monkeypatch):
    """DS values (positions, spacings, thickness) are at most 16 characters, so a strict reader takes them: a
    220 mm FOV over 96 pixels is 2.2916666666666665 mm, 18 characters as Python writes it."""
    geometry = ImageGeometry(row_spacing_mm=220 / 96, col_spacing_mm=227.4025 / 96, slice_thickness_mm=2.2)
    paths = write_dicom_series(tmp_path / "scan", _volume(np.random.default_rng(6), (3, 96, 96)), geometry)
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.RAISE)
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        decimals = [element for element in ds if element.VR == "DS"]
        assert {e.keyword for e in decimals} >= {"ImagePositionPatient", "PixelSpacing", "SliceThickness"}
        for element in decimals:
            for value in element.value if element.VM > 1 else [element.value]:
                assert len(str(value)) <= 16, (element.keyword, str(value))
        np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], [220 / 96, 227.4025 / 96], rtol=1e-12)
        position = [-95 / 2 * 227.4025 / 96, -95 / 2 * 220 / 96, (k - 1) * 2.2]
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], position, rtol=1e-12)


# MR Image IOD (DICOM PS3.3 A.4), mandatory modules: Patient, General Study, General Series, Frame of Reference,
# General Equipment, General Image, Image Plane, Image Pixel, MR Image, SOP Common
MR_IMAGE_TYPE_1 = (
    "StudyInstanceUID", "Modality", "SeriesInstanceUID", "FrameOfReferenceUID", "PixelSpacing",
    "ImageOrientationPatient", "ImagePositionPatient", "SamplesPerPixel", "PhotometricInterpretation", "Rows",
    "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "PixelData", "ImageType",
    "ScanningSequence", "SequenceVariant", "SOPClassUID", "SOPInstanceUID",
)  # fmt: skip
MR_IMAGE_TYPE_2 = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "ReferringPhysicianName",
    "StudyID", "AccessionNumber", "SeriesNumber", "PatientPosition", "Laterality", "PositionReferenceIndicator",
    "Manufacturer",
    "InstanceNumber", "SliceThickness", "ScanOptions", "MRAcquisitionType", "RepetitionTime", "EchoTime",
    "EchoTrainLength",
)  # fmt: skip


def test_dicom_has_every_type_1_and_type_2_attribute_of_the_mr_image_iod(tmp_path):
    """Type 1: present with a value; Type 2: present (empty where unknown). A missing one is an error for IOD
    validators such as dciodvfy (ScanningSequence / SequenceVariant were missing)."""
    (path,) = write_dicom_series(tmp_path / "scan", _volume(np.random.default_rng(7), (1, 8, 8)), ImageGeometry())
    ds = pydicom.dcmread(path)
    assert [k for k in MR_IMAGE_TYPE_1 if k not in ds or ds[k].value in (None, "", [], b"")] == []
    assert [k for k in MR_IMAGE_TYPE_2 if k not in ds] == []
    assert (ds.ScanningSequence, ds.SequenceVariant) == ("RM", "NONE")  # the enumerated "research mode" / none


def test_dicom_image_type_has_the_value_3_mr_images_need(tmp_path):
    """PS3.3 C.8.3.1.1.1: an MR image's ImageType has a value 3 from the defined terms (dciodvfy: "A value is
    required for value 3 in MR Images"; reconkit wrote DERIVED\\SECONDARY only)."""
    (path,) = write_dicom_series(tmp_path / "scan", _volume(np.random.default_rng(7), (1, 8, 8)), ImageGeometry())
    assert list(pydicom.dcmread(path).ImageType) == ["DERIVED", "SECONDARY", "OTHER"]


@pytest.mark.parametrize(("given", "written"), [("HFS", "HFS"), (" FFP ", "FFP"), (None, ""), ("hfs", ""),
                                               ("HFS\\FFS", ""), ("HEAD FIRST SUPINE X", "")])
def test_dicom_patient_position_is_the_header_code_where_it_is_a_valid_code_string(tmp_path, given, written):
    """PatientPosition (CS: upper-case letters, digits, space, _, at most 16 characters) is the header's
    patientPosition; a value that is no valid code string stays empty (Type 2: unknown) rather than rewritten."""
    (path,) = write_dicom_series(tmp_path / "scan", _volume(np.random.default_rng(7), (1, 8, 8)), ImageGeometry(),
                                 patient_position=given)
    assert pydicom.dcmread(path).PatientPosition == written


def test_series_of_one_study_share_its_date_and_time(tmp_path, monkeypatch):
    """Two series written a second apart into one study (an ISMRMRD file's contrasts): the same StudyDate /
    StudyTime, as one StudyInstanceUID must have, and each its own ContentTime."""
    clock = iter(datetime.datetime(2026, 12, 7, 23, 59, 58) + datetime.timedelta(seconds=s) for s in range(10))

    class Clock(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return next(clock)

    monkeypatch.setattr(dicom_module, "datetime", types.SimpleNamespace(datetime=Clock))
    volume = _volume(np.random.default_rng(8), (1, 8, 8))
    study = new_study()
    first, second = (
        pydicom.dcmread(write_dicom_series(tmp_path / name, volume, ImageGeometry(), study=study, series_number=n)[0])
        for n, name in enumerate(("contrast0", "contrast1"), start=1)
    )
    assert first.StudyInstanceUID == second.StudyInstanceUID == study.instance_uid
    assert (first.StudyDate, first.StudyTime) == (second.StudyDate, second.StudyTime) == ("20261207", "235958")
    assert (first.ContentDate, first.ContentTime) != (second.ContentDate, second.ContentTime)


def test_dicom_texts_are_valid_for_long_or_odd_patient_ids(tmp_path):
    """PatientID / PatientName are LO / PN: at most 64 characters, no ``\\``, and in the name no PN delimiters
    ``^`` / ``=`` (an ID with three ``=`` was a name of four component groups, which pydicom warns about and its
    strict reading refuses); pydicom warns about neither."""
    volume = _volume(np.random.default_rng(5), (1, 8, 8))
    ids = {}
    for name, patient_id in (("a", "p" * 70 + "-run1"), ("b", "p" * 70 + "-run2"), ("c", "Müller\\01"),
                               ("d", "a=b=c=d^e^f^g^h")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # pydicom's "exceeds the maximum length" is a UserWarning
            (path,) = write_dicom_series(tmp_path / name, volume, ImageGeometry(), patient_id=patient_id,
                                         series_description="reconkit " + "x" * 80)
            ds = pydicom.dcmread(path)
        assert len(ds.PatientID) <= 64 and len(str(ds.PatientName)) <= 64 and len(ds.SeriesDescription) <= 64
        ids[name] = ds.PatientID
    assert ids["a"] != ids["b"] and ids["a"].startswith("p" * 55)  # same 64-character prefix, still distinct
    assert ids["c"] == "M_ller_01"
    assert ids["d"] == "a=b=c=d^e^f^g^h" and str(ds.PatientName) == "a_b_c_d_e_f_g_h"  # the ID (LO) keeps them
    assert dicom_text("a" * 64) == "a" * 64  # fastMRI's IDs (64 hex digits) are kept as they are


def test_nifti_shape_spacing_and_affine(tmp_path):
    rng = np.random.default_rng(2)
    volume = _volume(rng, (5, 24, 17))
    geometry = ImageGeometry(row_spacing_mm=0.5, col_spacing_mm=0.4, slice_thickness_mm=3.0)
    for name in ("vol.nii.gz", "vol.nii"):
        image = nib.load(write_nifti(tmp_path / name, volume, geometry))
        assert image.shape == (17, 24, 5)
        assert image.header.get_zooms() == pytest.approx((0.4, 0.5, 3.0))
        np.testing.assert_allclose(np.asarray(image.dataobj), volume.transpose(2, 1, 0))
        centre = image.affine @ np.array([8, 11.5, 2, 1])
        np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)
        assert nib.aff2axcodes(image.affine) == ("L", "P", "S")  # DICOM's LPS frame (dcm2niix: L A S, rows reversed)


def test_nifti_and_dicom_refuse_complex_images(tmp_path):
    """A complex volume (e.g. a SENSE image before its magnitude) was cast to its real part with only numpy's
    ComplexWarning: negative real parts, clipped to 0 in DICOM. It is refused, as write_fastmri_h5 refuses it."""
    volume = np.ones((2, 4, 5), np.complex64) * (1 - 1j)
    with pytest.raises(ValueError, match=r"real \(slices, rows, cols\).*complex64"):
        write_nifti(tmp_path / "vol.nii", volume, ImageGeometry())
    with pytest.raises(ValueError, match=r"real \(slices, rows, cols\).*complex64"):
        write_dicom_series(tmp_path / "dicom", volume, ImageGeometry())
    assert _files_in(tmp_path) == []


def test_nifti_and_dicom_put_each_pixel_at_the_same_point(tmp_path):
    """Pixel (row r, column c) of slice k: DICOM's position (LPS, from ImagePositionPatient + orientation) turned to
    RAS equals the NIfTI affine's position of voxel (c, r, k)."""
    volume = _volume(np.random.default_rng(4), (3, 24, 17))
    geometry = ImageGeometry(row_spacing_mm=0.5, col_spacing_mm=0.4, slice_thickness_mm=3.0)
    affine = nib.load(write_nifti(tmp_path / "vol.nii.gz", volume, geometry)).affine
    for k, path in enumerate(write_dicom_series(tmp_path / "dicom", volume, geometry)):
        ds = pydicom.dcmread(path)
        position = np.array([float(v) for v in ds.ImagePositionPatient])
        along_row, along_column = np.array([float(v) for v in ds.ImageOrientationPatient]).reshape(2, 3)
        row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
        for r, c in ((0, 0), (23, 0), (0, 16), (5, 9)):
            lps = position + c * col_spacing * along_row + r * row_spacing * along_column
            ras = lps * np.array([-1, -1, 1])
            np.testing.assert_allclose((affine @ np.array([c, r, k, 1]))[:3], ras, atol=1e-9)


def test_png_panels(tmp_path):
    rng = np.random.default_rng(3)
    recon = _volume(rng, (2, 24, 20))
    paths = write_png_panels(tmp_path / "png", recon, zero_filled=0.5 * recon, reference=recon * 1.1, name="f")
    assert [p.name for p in paths] == ["slice_000.png", "slice_001.png"]
    with_ref = matplotlib.image.imread(paths[0])
    only = matplotlib.image.imread(write_png_panel(tmp_path / "one.png", recon[0]))
    assert with_ref.ndim == 3 and with_ref.shape[1] > 3 * only.shape[1]  # four panels vs one


def test_png_panel_is_drawn_once_and_lays_out_no_ticks(tmp_path, monkeypatch):
    """Each panel's figure is rendered once (savefig drew a whole dry run first while the placeholder layout engine
    that fig.tight_layout() leaves was set) and no tick is laid out (hidden by axis("off"), ticks were still built
    at every layout and draw), for the same image."""
    import matplotlib.axis
    from matplotlib.figure import Figure

    draws, ticks = [], []
    figure_draw, update_ticks = Figure.draw, matplotlib.axis.Axis._update_ticks

    def counted_draw(self, renderer):
        draws.append(self)
        return figure_draw(self, renderer)

    def counted_ticks(self):
        laid_out = update_ticks(self)
        ticks.extend(laid_out)
        return laid_out

    monkeypatch.setattr(Figure, "draw", counted_draw)
    monkeypatch.setattr(matplotlib.axis.Axis, "_update_ticks", counted_ticks)
    image = _volume(np.random.default_rng(4), (1, 24, 20))[0]
    write_png_panels(tmp_path / "png", image[None], zero_filled=0.5 * image[None], reference=1.1 * image[None])
    write_png_panel(tmp_path / "one.png", image, title="scan.h5", pixel_aspect=2.0)
    assert len(draws) == 2 and ticks == []


def _drawn_box(path: Path) -> tuple[int, int]:
    """Height and width in PNG pixels of the black (all-zero) image drawn on the white figure: the rows and columns
    that are black almost all the way across (the panel heading's black text is not)."""
    black = matplotlib.image.imread(path)[..., :3].max(axis=-1) < 0.1
    per_row, per_col = black.sum(axis=1), black.sum(axis=0)
    return int((per_row > 0.9 * per_row.max()).sum()), int((per_col > 0.9 * per_col.max()).sum())


def test_png_error_panel_of_unsigned_images_does_not_wrap(tmp_path, monkeypatch):
    """uint8 images (8-bit PNGs): reconstruction − reference wrapped around (2 − 3 = 255), an error panel showing
    the largest error where the reconstruction was 1 below the reference."""
    import matplotlib.axes

    drawn, imshow = [], matplotlib.axes.Axes.imshow

    def recording_imshow(ax, image, **kwargs):
        drawn.append(np.asarray(image))
        return imshow(ax, image, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", recording_imshow)
    reference = np.full((8, 8), 3, np.uint8)
    write_png_panel(tmp_path / "u8.png", reference - 1, reference=reference)
    np.testing.assert_array_equal(drawn[-1], np.full((8, 8), 5.0))  # ERROR_GAIN × |2 − 3|


def test_png_draws_anisotropic_pixels_at_their_aspect(tmp_path):
    """A 24 × 24 slice of 2 mm rows and 1 mm columns covers 48 × 24 mm: drawn twice as tall as wide."""
    image = np.zeros((24, 24), np.float32)
    height, width = _drawn_box(write_png_panel(tmp_path / "aniso.png", image, pixel_aspect=2.0))
    assert height / width == pytest.approx(2.0, rel=0.05)
    height, width = _drawn_box(write_png_panel(tmp_path / "square.png", image))
    assert height / width == pytest.approx(1.0, rel=0.05)


def _dark_runs(line: np.ndarray) -> int:
    """Number of runs of dark pixels along a line of a PNG (dark: grey below one half)."""
    dark = line < 0.5
    return int(dark[0]) + int((dark[1:] & ~dark[:-1]).sum())


@pytest.mark.parametrize(("shape", "aspect"), [((320, 320), 1.0), ((200, 160), 0.5)])
def test_png_shows_every_row_and_column(tmp_path, shape, aspect):
    """One-pixel stripes survive the drawing: in a 3-inch panel a 320 × 320 fastMRI slice (0.87 PNG pixels per
    image pixel, drawn nearest-neighbour) showed 110 of its 160 dark stripes, and thin structures and aliasing lines
    went the same way."""
    columns, rows = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    columns[:, 1::2], rows[1::2] = 1.0, 1.0
    drawn = matplotlib.image.imread(write_png_panel(tmp_path / "columns.png", columns, pixel_aspect=aspect))
    grey = drawn[..., :3].mean(axis=-1)
    assert _dark_runs(grey[grey.shape[0] // 2]) == shape[1] // 2  # the dark columns (the margins are white)
    drawn = matplotlib.image.imread(write_png_panel(tmp_path / "rows.png", rows, pixel_aspect=aspect))
    grey = drawn[..., :3].mean(axis=-1)
    assert _dark_runs(grey[:, grey.shape[1] // 4]) == shape[0] // 2  # clear of the centred heading


def test_metrics_csv_is_utf8_whatever_the_locale(tmp_path):
    """A volume named ``müller_Ω.h5`` under an ASCII locale (C, UTF-8 mode off; Windows' cp1252 cannot write Ω
    either) is written, as UTF-8."""
    code = (
        "import sys; from reconkit.io import write_metrics_csv; "
        "write_metrics_csv(sys.argv[1], [('m\\u00fcller_\\u03a9.h5', 3, 0.01, 30.0, 0.9)])"
    )
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.csv")], env=env, check=True, capture_output=True)
    rows = (tmp_path / "m.csv").read_text(encoding="utf-8").splitlines()
    assert rows[1] == "müller_Ω.h5,3,0.01,30,0.9"


def test_a_file_name_that_is_not_utf8_reaches_the_png_and_csv_outputs(tmp_path):
    """``scan\\xff1.h5`` (a Latin-1 name) comes to Python with a lone surrogate: matplotlib refused it as the PNG
    title and the CSV writer raised UnicodeEncodeError, so the file's PNGs and evaluate's whole CSV failed."""
    from reconkit.io import write_metrics_csv

    name = os.fsdecode(b"scan\xff1.h5")
    volume = _volume(np.random.default_rng(6))
    (png,) = write_png_panels(tmp_path / "png", volume[:1], name=name)
    assert matplotlib.image.imread(png).ndim == 3
    write_metrics_csv(tmp_path / "m.csv", [(name, 3, 0.01, 30.0, 0.9)])
    assert (tmp_path / "m.csv").read_bytes().splitlines()[1] == b"scan\xff1.h5,3,0.01,30,0.9"


def test_dollar_signs_and_control_characters_in_a_name_reach_the_png_title(tmp_path):
    """matplotlib read ``$...$`` in a title as mathtext: ``reconkit reconstruct --format png`` failed for a file
    named ``x$$.h5`` or ``scan$x_{$.h5`` (ParseException) and garbled ``a$b$.h5``; a control character in a name
    drew a missing glyph and printed a UserWarning per character. The title shows the name as it is, escaped."""
    volume = _volume(np.random.default_rng(7))[:1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i, name in enumerate(["x$$.h5", "scan$x_{$.h5", "a$\\frac$b.h5", "c\x1b[2J\r.h5"]):
            (png,) = write_png_panels(tmp_path / f"png{i}", volume, name=name)
            assert matplotlib.image.imread(png).ndim == 3


def test_png_grey_scale_ignores_nan_in_the_reference(tmp_path):
    """One NaN pixel in a file's reference image made the grey scale NaN and every panel of the slice blank."""
    reconstruction = np.full((40, 40), 0.5, np.float32)
    reference = np.ones((40, 40), np.float32)
    reference[3, 4] = np.nan
    image = matplotlib.image.imread(write_png_panel(tmp_path / "nan.png", reconstruction, reference=reference))
    mid_grey = np.all(np.abs(image[..., :3] - 0.5) < 0.02, axis=-1)
    assert mid_grey.sum() > 40 * 40  # the reconstruction panel, drawn at half the reference's level


def test_atomic_writes_leave_nothing_on_failure(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    volume = _volume(rng)
    geometry = ImageGeometry()
    write_dicom_series(tmp_path / "scan", volume, geometry)
    before = {p: p.read_bytes() for p in (tmp_path / "scan").iterdir()}
    calls = {"n": 0}
    real_save = pydicom.Dataset.save_as

    def failing_save(self, filename, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # an interrupted run
        return real_save(self, filename, *args, **kwargs)

    monkeypatch.setattr(dicom_module.pydicom.Dataset, "save_as", failing_save)
    with pytest.raises(KeyboardInterrupt):
        write_dicom_series(tmp_path / "scan", volume * 2, geometry)
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        write_dicom_series(tmp_path / "new_scan", volume, geometry)
    monkeypatch.undo()
    # the earlier complete series is untouched, the new one does not exist, no temporary files remain
    assert {p: p.read_bytes() for p in (tmp_path / "scan").iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["scan"]

    def failing_dataset(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(h5py.File, "create_dataset", failing_dataset)
    with pytest.raises(OSError, match="disk full"):
        write_fastmri_h5(tmp_path / "vol.h5", volume)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["scan"]
    write_fastmri_h5(tmp_path / "vol.h5", volume)
    assert sorted(os.listdir(tmp_path)) == ["scan", "vol.h5"]


def test_atomic_directory_with_a_second_writer_between_its_renames(tmp_path, monkeypatch):
    """Two runs writing one output folder at once: the other run's series moved away (FileNotFoundError) or put in
    place (a non-empty destination) between this writer's two renames failed the file and left a ``.old-`` folder."""
    from reconkit import atomic

    def write(name: str) -> None:
        with atomic.atomic_directory(tmp_path / "series") as tmp:
            (tmp / "slice_000.dcm").write_text(name)

    def other_run_moves_it_away() -> None:
        real_replace(tmp_path / "series", tmp_path / "moved")

    def other_run_puts_its_own_in_place() -> None:
        write("other")

    real_replace = os.replace
    # before this writer moves the old series aside, or before it moves its own in
    for other_run, at_call in ((other_run_moves_it_away, 1), (other_run_puts_its_own_in_place, 2)):
        write("first")
        calls = []

        def replace(source, destination, other_run=other_run, at_call=at_call, calls=calls):
            calls.append(source)
            if len(calls) == at_call:
                other_run()
            return real_replace(source, destination)

        monkeypatch.setattr(atomic.os, "replace", replace)
        write("last")
        monkeypatch.undo()
        assert (tmp_path / "series" / "slice_000.dcm").read_text() == "last"
        shutil.rmtree(tmp_path / "moved", ignore_errors=True)
        assert os.listdir(tmp_path) == ["series"]  # no temporary folder left


def test_atomic_writes_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    """Nothing was fsynced: after a power loss just after the rename, ext4 / XFS can show the final name over a short
    or empty file. Each file's data (and, for a series, its folder) must be flushed before the rename that publishes
    it, and the destination folder after it."""
    from reconkit import atomic

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(source, destination):
        events.append(("replace", os.fspath(source)))
        return real_replace(source, destination)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    volume = _volume(np.random.default_rng(5))
    write_fastmri_h5(tmp_path / "vol.h5", volume)
    [(_, staged)] = [event for event in events if event[0] == "replace"]
    assert events == [("fsync", staged), ("replace", staged), ("fsync", str(tmp_path))]

    events.clear()
    write_dicom_series(tmp_path / "scan", volume, ImageGeometry())
    renames = [i for i, event in enumerate(events) if event[0] == "replace"]
    synced = {path for kind, path in events[: renames[-1]] if kind == "fsync"}
    staged_folder = events[renames[-1]][1]
    assert {os.path.join(staged_folder, name) for name in os.listdir(tmp_path / "scan")} | {staged_folder} <= synced
    assert events[-1] == ("fsync", str(tmp_path))


def test_an_hdf5_write_past_the_space_left_is_a_plain_oserror(tmp_path):
    """With HDF5's own file driver a full disk left the file half closed: the error came out of its close as a
    RuntimeError (``reconkit simulate`` printed a traceback) or the interpreter crashed at exit (SIGSEGV)."""
    code = (
        "import resource, sys, numpy as np\n"
        "from reconkit.atomic import atomic_hdf5  # what write_fastmri_h5 and the simulator's write_volume use\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))  # as a full disk: EFBIG past 50 kB\n"
        "try:\n"
        "    with atomic_hdf5(sys.argv[1]) as f:\n"
        "        f.create_dataset('reconstruction', data=np.ones((4, 100, 100), np.float32))\n"
        "except OSError as err:\n"
        "    print(err.strerror, err.filename)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "vol.h5")], capture_output=True, text=True)
    # (the file named, as the simulator's and reconstruct's error lines print it)
    assert (done.returncode, done.stdout) == (0, f"File too large {tmp_path / 'vol.h5'}\n"), done.stderr[-2000:]
    assert os.listdir(tmp_path) == []


def test_outputs_whose_names_are_close_to_the_file_name_limit(tmp_path):
    """A scan named with 245 characters (the limit is 255 bytes) failed every output: 'File name too long' for the
    temporary name, ``.tmp-<8 random>-`` + the output's name."""
    volume = _volume(np.random.default_rng(7))
    stem = "s" + "\u00fc" * 119 + "s"  # 240 bytes in UTF-8; the h5 temporary name cuts its second character in two
    write_fastmri_h5(tmp_path / f"{stem}.h5", volume)
    write_nifti(tmp_path / f"{stem}.nii.gz", volume, ImageGeometry())
    write_dicom_series(tmp_path / stem, volume, ImageGeometry())
    assert nib.load(tmp_path / f"{stem}.nii.gz").shape == volume.shape[::-1]
    assert sorted(os.listdir(tmp_path)) == sorted([stem, f"{stem}.h5", f"{stem}.nii.gz"])


def test_outputs_get_the_umask_permissions_of_a_plain_write(tmp_path):
    """Atomic writes go through ``tempfile`` names (owner-only 0o600 / 0o700); the results must not stay so."""
    volume = _volume(np.random.default_rng(5))
    old_umask = os.umask(0o027)
    try:
        h5 = write_fastmri_h5(tmp_path / "vol.h5", volume)
        series = tmp_path / "scan"
        write_dicom_series(series, volume, ImageGeometry())
        assert stat.S_IMODE(h5.stat().st_mode) == 0o640
        assert stat.S_IMODE(series.stat().st_mode) == 0o750
        assert {stat.S_IMODE(p.stat().st_mode) for p in series.iterdir()} == {0o640}
        os.chmod(h5, 0o604)  # a file being replaced keeps the mode someone gave it
        write_fastmri_h5(h5, volume * 2)
        assert stat.S_IMODE(h5.stat().st_mode) == 0o604
    finally:
        os.umask(old_umask)


def test_ismrmrd_raw_without_imaging_data_is_a_data_error(tmp_path):
    import ismrmrd

    from reconkit.data.ismrmrd_raw import is_ismrmrd_raw, read_ismrmrd_raw
    from reconkit.errors import DataError

    raw = ismrmrd.Dataset(str(tmp_path / "noise_only.h5"), "dataset", create_if_needed=True)
    raw.write_xml_header(HEADER)
    noise = ismrmrd.Acquisition.from_array(np.ones((2, 16), np.complex64))
    noise.set_flag(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
    raw.append_acquisition(noise)
    raw.close()
    assert is_ismrmrd_raw(tmp_path / "noise_only.h5")
    with pytest.raises(DataError, match="noise_only.h5: ISMRMRD file holds no imaging acquisitions"):
        read_ismrmrd_raw(tmp_path / "noise_only.h5")
    (tmp_path / "junk.h5").write_bytes(b"junk")
    assert not is_ismrmrd_raw(tmp_path / "junk.h5")


def test_atomic_writes_flush_through_a_writable_handle_on_windows(tmp_path, monkeypatch):
    """Windows' ``os.fsync`` (``_commit``, ``FlushFileBuffers``) refuses a descriptor open read-only with EBADF:
    every atomic write (reconstructions, exports, manifests) failed there. Emulated: ``sys.platform`` is win32 and
    ``os.fsync`` fails as Windows' does."""
    import errno
    import fcntl

    from reconkit import atomic

    real_fsync = os.fsync

    def windows_fsync(fd):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        return real_fsync(fd)

    monkeypatch.setattr(atomic.sys, "platform", "win32")
    monkeypatch.setattr(atomic.os, "fsync", windows_fsync)
    with atomic.atomic_path(tmp_path / "a.json") as tmp:
        tmp.write_text("{}")
    with atomic.atomic_directory(tmp_path / "series") as folder:
        (folder / "slice_000.dcm").write_text("x")
    assert (tmp_path / "a.json").read_text() == "{}"
    assert (tmp_path / "series" / "slice_000.dcm").read_text() == "x"


def test_two_machines_of_one_host_name_get_different_temporary_tags(monkeypatch):
    """The host tag hashed the host name and the PID namespace only; outside containers every Linux host's root PID
    namespace is the same number, so two machines of one name sharing a folder had one tag and only the age guard
    kept one from removing the other's live temporaries (review audit). Their machine IDs now tell them apart."""
    from reconkit import atomic

    def tag_on(machine_id: str) -> str:
        monkeypatch.setattr(Path, "read_text", lambda self, *args, **kwargs: machine_id + "\n")
        return atomic._host_tag.__wrapped__()

    assert tag_on("3d1219c7c4c5404aaa1f6d2a48adfda4") != tag_on("0f5e8a1b2c3d4e5f60718293a4b5c6d7")


def test_a_killed_writers_temporaries_are_removed_by_the_next_write_only_when_provably_dead(tmp_path):
    """A writer killed with SIGKILL (the OOM killer) during a write left its ``.tmp-*`` file, and during a series swap
    its ``.tmp-*`` / ``.old-*`` folders, in the output folder for ever. The next write there removes a dead writer's
    (its PID not running on this host, untouched for an hour), never a live one's, a recent one or another form."""
    from reconkit import atomic

    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from reconkit import atomic\n"
        "with atomic.atomic_path(Path(sys.argv[1]) / 'vol.h5') as tmp:\n"
        "    tmp.write_text('half')\n"
        "    os.kill(os.getpid(), 9)\n"
    )
    with subprocess.Popen([sys.executable, "-c", code, str(tmp_path)]) as killed:
        assert killed.wait() == -9
    [dead_file] = list(tmp_path.iterdir())
    dead_pid = killed.pid
    tag = atomic._host_tag()
    dead_folder = tmp_path / f".old-{tag}.{dead_pid}-abcd1234-scan"
    (dead_folder / "0").mkdir(parents=True)
    (dead_folder / "0" / "slice_000.dcm").write_text("first run")
    (tmp_path / "scan").mkdir()  # the series that dead_folder's writer had put in place
    kept = [
        tmp_path / f".old-{tag}.{dead_pid}-abcd1234-gone",  # killed between its renames: "gone" is only here
        tmp_path / f".tmp-{tag}.{os.getpid()}-abcd1234-live.h5",  # a live writer (this process)
        tmp_path / f".tmp-{tag}.{dead_pid}-abcd1234-recent.h5",  # dead, but touched recently
        tmp_path / f".tmp-00000000.{dead_pid}-abcd1234-other-host.h5",  # another host's
        tmp_path / ".tmp-abcd1234-old-form.h5",  # no PID in the name
    ]
    for path in kept:
        path.write_text("x")
    hours_ago = time.time() - 2 * atomic.STALE_AFTER_S
    for path in [dead_file, dead_folder, *kept]:
        if "recent" not in path.name:
            os.utime(path, (hours_ago, hours_ago))
    write_fastmri_h5(tmp_path / "vol.h5", _volume(np.random.default_rng(3)))
    assert sorted(os.listdir(tmp_path)) == sorted(["scan", "vol.h5", *(path.name for path in kept)])


def test_temporary_names_of_long_outputs_are_cut_between_characters(tmp_path, monkeypatch):
    """The temporary name kept the last 224 bytes of a long output's name, which could cut a multi-byte UTF-8
    character in two: the name then held a lone byte (not UTF-8), which APFS refuses (namefix audit)."""
    from reconkit import atomic

    renamed = []
    real_replace = atomic.os.replace

    def recording_replace(source, destination):
        renamed.extend(Path(path).relative_to(tmp_path).parts[0] for path in (source, destination))
        return real_replace(source, destination)

    monkeypatch.setattr(atomic.os, "replace", recording_replace)
    stem = "s" + "\u00fc" * 119 + "s"  # 240 bytes in UTF-8: byte 224 from the end falls inside a character
    with atomic.atomic_path(tmp_path / f"{stem}.h5") as tmp:
        tmp.write_text("x")
    with atomic.atomic_directory(tmp_path / stem) as folder:
        (folder / "slice_000.dcm").write_text("x")
    with atomic.atomic_directory(tmp_path / stem) as folder:  # replaces it: an .old- folder too
        (folder / "slice_000.dcm").write_text("y")
    assert {name[:5] for name in renamed} >= {".tmp-", ".old-"}
    for name in renamed:
        os.fsencode(name).decode("utf-8")  # a lone surrogate encodes to a byte that is not UTF-8
    assert sorted(os.listdir(tmp_path)) == sorted([stem, f"{stem}.h5"])


def test_a_killed_writers_old_folder_of_a_long_name_is_removed_only_when_its_output_exists(tmp_path, monkeypatch):
    """An ``.old-`` folder was kept while its output was missing by looking for the output under the name at the end
    of the folder's name, which for a long output is cut: that name never existed, so a dead writer's ``.old-``
    folders of long names were kept for ever (namefix audit). The folder now records its output's full name; one
    whose output is missing stays, though another output ends with the same cut name."""
    from reconkit import atomic

    with subprocess.Popen([sys.executable, "-c", "pass"]) as finished:
        assert finished.wait() == 0
    tail = "\u00fc" * 119 + "s"  # 239 bytes: the .old- folders' names end with a cut of it
    for keep_old in (False, True):  # the second write moves the first's series aside into an .old- folder
        if keep_old:
            monkeypatch.setattr(atomic.shutil, "rmtree", lambda path, **kwargs: None)
        for name in ("a" + tail, "b" + tail):
            with atomic.atomic_directory(tmp_path / name) as folder:
                (folder / "slice_000.dcm").write_text(name[0])
    monkeypatch.undo()
    hours_ago = time.time() - 2 * atomic.STALE_AFTER_S
    old = {}
    for path in tmp_path.iterdir():
        if path.name.startswith(".old-"):
            dead = tmp_path / path.name.replace(f".{os.getpid()}-", f".{finished.pid}-", 1)
            path.rename(dead)  # as left by a writer killed between its renames
            os.utime(dead, (hours_ago, hours_ago))
            old[(dead / "0" / "slice_000.dcm").read_text()] = dead
    shutil.rmtree(tmp_path / ("a" + tail))  # "a"'s writer was killed before moving its new series in
    assert atomic.remove_stale_temporaries(tmp_path) == [old["b"]]
    assert (old["a"] / "0" / "slice_000.dcm").read_text() == "a"
