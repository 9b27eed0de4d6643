"""ISMRMRD raw reader on what scanner exports hold beyond one clean line per column: several contrasts and
repetitions, averages, parallel-imaging reference lines, reversed / asymmetric / padded readouts, 3D encoding."""

from __future__ import annotations

import functools
import json

import ismrmrd
import ismrmrd.xsd as x
import numpy as np
import pytest

from reconkit.data.ismrmrd_raw import read_ismrmrd_raw
from reconkit.errors import DataError

COILS, SAMPLES, WIDTH = 3, 16, 12


def header_xml(
    z: int = 1,
    trajectory: str = "cartesian",
    step_1_limits: bool = True,
    calibration: str | None = None,
    first_line: int = 0,
) -> str:
    def space(size):
        return x.encodingSpaceType(
            matrixSize=x.matrixSizeType(x=size[0], y=size[1], z=z),
            fieldOfView_mm=x.fieldOfViewMm(x=200.0, y=150.0, z=3.0),
        )

    limits = x.encodingLimitsType(
        kspace_encoding_step_1=(
            x.limitType(minimum=first_line, maximum=WIDTH - 1, center=WIDTH // 2) if step_1_limits else None
        ),
        kspace_encoding_step_2=x.limitType(minimum=0, maximum=0, center=0),
    )
    parallel = None
    if calibration is not None:
        parallel = x.parallelImagingType(
            accelerationFactor=x.accelerationFactorType(kspace_encoding_step_1=3, kspace_encoding_step_2=1),
            calibrationMode=x.calibrationModeType(calibration),
        )
    header = x.ismrmrdHeader(experimentalConditions=x.experimentalConditionsType(H1resonanceFrequency_Hz=63_870_000))
    header.encoding.append(
        x.encodingType(
            encodedSpace=space((SAMPLES, WIDTH)),
            reconSpace=space((SAMPLES // 2, WIDTH)),
            encodingLimits=limits,
            trajectory=x.trajectoryType(trajectory),
            parallelImaging=parallel,
        )
    )
    return x.ToXML(header)


def line(data: np.ndarray, step: int, *flags: int, **index: int) -> ismrmrd.Acquisition:
    acquisition = ismrmrd.Acquisition.from_array(np.ascontiguousarray(data, np.complex64))
    acquisition.idx.kspace_encode_step_1 = step
    for name, value in index.items():
        setattr(acquisition.idx, name, value)
    for flag in flags:
        acquisition.set_flag(flag)
    return acquisition


def write_raw(path, acquisitions, z: int = 1, **header) -> None:
    raw = ismrmrd.Dataset(str(path), "dataset", create_if_needed=True)
    raw.write_xml_header(header_xml(z, **header))
    for acquisition in acquisitions:
        raw.append_acquisition(acquisition)
    raw.close()


def random_kspace(rng, *shape) -> np.ndarray:
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


def test_contrasts_and_repetitions_are_separate_images_and_averages_are_averaged(tmp_path):
    rng = np.random.default_rng(0)
    images = {
        (s, c, r): random_kspace(rng, COILS, SAMPLES, WIDTH) for s in range(2) for c in range(2) for r in range(2)
    }
    acquisitions = []
    for (s, c, r), kspace in images.items():
        for column in range(WIDTH):
            offset = random_kspace(rng, COILS, SAMPLES)  # two averages whose mean is the true line
            for average, sign in enumerate((1, -1)):
                acquisitions.append(
                    line(
                        kspace[..., column] + sign * offset, column, slice=s, contrast=c, repetition=r, average=average
                    )
                )
    rng.shuffle(acquisitions)
    write_raw(tmp_path / "raw.h5", acquisitions)
    volume = read_ismrmrd_raw(tmp_path / "raw.h5")
    index = json.loads(volume.info.attrs["image_index"])
    assert volume.kspace.shape == (8, COILS, SAMPLES, WIDTH)
    keys = [(i["slice"], i["contrast"], i["repetition"]) for i in index]
    assert keys == [(s, c, r) for r in range(2) for c in range(2) for s in range(2)]  # slices vary fastest
    for image, key in zip(volume.kspace, keys):
        np.testing.assert_allclose(image, images[key], atol=1e-5)


def test_reference_lines_fill_only_empty_columns_and_a_separate_reference_scan_is_left_out(tmp_path):
    rng = np.random.default_rng(1)
    kspace = random_kspace(rng, COILS, SAMPLES, WIDTH)
    imaging = [c for c in range(WIDTH) if c % 3 == 0]
    centre = [4, 5, 6, 7]  # 6 is also an imaging column: the imaging line must win
    acquisitions = [line(kspace[..., c], c) for c in imaging]
    offset = random_kspace(rng, COILS, SAMPLES)
    for sign in (1, -1):  # two averages of each reference line, whose mean is the true line
        acquisitions += [
            line(kspace[..., c] * (10 if c == 6 else 1) + sign * offset, c, ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
            for c in centre
        ]
    # a separate reference scan with a shorter readout (another sequence): not image data
    acquisitions += [line(kspace[:, :8, c], c, ismrmrd.ACQ_IS_PARALLEL_CALIBRATION) for c in (2, 8)]
    # lines flagged as both calibration and imaging are imaging lines
    acquisitions.append(
        line(kspace[..., 10], 10, ismrmrd.ACQ_IS_PARALLEL_CALIBRATION, ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
    )
    other_space = line(random_kspace(rng, COILS, SAMPLES), 1)  # a second encoding space: not this image's data
    other_space.encoding_space_ref = 1
    acquisitions.append(other_space)
    write_raw(tmp_path / "raw.h5", acquisitions)
    volume = read_ismrmrd_raw(tmp_path / "raw.h5")
    expected = np.zeros_like(kspace)
    for c in [*imaging, *centre, 10]:
        expected[..., c] = kspace[..., c]
    np.testing.assert_allclose(volume.kspace[0], expected, atol=1e-6)


def test_reference_lines_of_a_separate_reference_scan_with_the_same_readout_are_left_out(tmp_path):
    """calibrationMode "separate" (e.g. Siemens' GRE reference scan before a TSE scan): the reference lines have the
    imaging readout but another contrast; in the k-space centre they would set the image's contrast."""
    rng = np.random.default_rng(12)
    kspace = random_kspace(rng, COILS, SAMPLES, WIDTH)
    imaging = [c for c in range(WIDTH) if c % 3 == 0]
    acquisitions = [line(kspace[..., c], c) for c in imaging]
    reference = random_kspace(rng, COILS, SAMPLES, 4)
    acquisitions += [line(reference[..., c - 4], c, ismrmrd.ACQ_IS_PARALLEL_CALIBRATION) for c in range(4, 8)]
    write_raw(tmp_path / "separate.h5", acquisitions, calibration="separate")
    write_raw(tmp_path / "embedded.h5", acquisitions, calibration="embedded")
    expected = np.zeros_like(kspace)
    expected[..., imaging] = kspace[..., imaging]
    np.testing.assert_array_equal(read_ismrmrd_raw(tmp_path / "separate.h5").kspace[0], expected)
    embedded = read_ismrmrd_raw(tmp_path / "embedded.h5").kspace[0]  # embedded reference lines fill their columns
    assert np.abs(embedded[..., [4, 5, 7]]).min(axis=(0, 1)).all()


def test_a_separate_reference_scan_numbered_beyond_the_imaging_matrix_is_left_out(tmp_path):
    """A reference scan with another readout numbers its lines in its own matrix, here past the imaging one's
    WIDTH columns: it is left out as calibration data, not taken for imaging lines outside the matrix."""
    rng = np.random.default_rng(15)
    kspace = random_kspace(rng, COILS, SAMPLES, WIDTH)
    acquisitions = [line(kspace[..., c], c) for c in range(WIDTH)]
    reference = random_kspace(rng, COILS, 2 * SAMPLES, WIDTH + 8)
    acquisitions += [line(reference[..., c], c, ismrmrd.ACQ_IS_PARALLEL_CALIBRATION) for c in range(WIDTH + 8)]
    write_raw(tmp_path / "raw.h5", acquisitions)
    np.testing.assert_array_equal(read_ismrmrd_raw(tmp_path / "raw.h5").kspace[0], kspace)


def test_discarded_reversed_and_asymmetric_readouts(tmp_path):
    rng = np.random.default_rng(2)
    kspace = random_kspace(rng, COILS, SAMPLES, WIDTH)
    partial = SAMPLES // 4  # partial echo: the first quarter of the readout not acquired
    acquisitions = []
    for c in range(WIDTH):
        data = kspace[..., c]
        if c % 3 == 0:  # reversed readout with 2 + 3 ADC samples to discard, echo centred (stored at 15 - 8)
            padded = np.concatenate([random_kspace(rng, COILS, 2), data[:, ::-1], random_kspace(rng, COILS, 3)], 1)
            acquisition = line(padded, c, ismrmrd.ACQ_IS_REVERSE)
            acquisition.discard_pre, acquisition.discard_post = 2, 3
            # column 9 gives the centre in acquisition order, as some writers do: one sample off, still centred
            acquisition.center_sample = 2 + (SAMPLES // 2 if c == 9 else SAMPLES - 1 - SAMPLES // 2)
        elif c % 3 == 1:  # partial echo, echo at sample SAMPLES // 2 - partial
            acquisition = line(data[:, partial:], c)
            acquisition.center_sample = SAMPLES // 2 - partial
        else:  # partial echo, reversed: the echo is stored at the mirrored position
            stored = data[:, partial:][:, ::-1]
            acquisition = line(stored, c, ismrmrd.ACQ_IS_REVERSE)
            acquisition.center_sample = stored.shape[-1] - 1 - (SAMPLES // 2 - partial)
        acquisitions.append(acquisition)
    write_raw(tmp_path / "raw.h5", acquisitions)
    volume = read_ismrmrd_raw(tmp_path / "raw.h5")
    expected = kspace.copy()
    expected[:, :partial, [c for c in range(WIDTH) if c % 3]] = 0
    np.testing.assert_allclose(volume.kspace[0], expected, atol=1e-6)


def test_3d_encoding_is_refused_by_name(tmp_path):
    rng = np.random.default_rng(3)
    acquisitions = [
        line(random_kspace(rng, COILS, SAMPLES), c, kspace_encode_step_2=p) for p in range(2) for c in range(WIDTH)
    ]
    write_raw(tmp_path / "raw3d.h5", acquisitions)
    with pytest.raises(DataError, match=r"raw3d\.h5.*3D encoding \(2 values of kspace_encode_step_2"):
        read_ismrmrd_raw(tmp_path / "raw3d.h5")
    # a 3D header (4 partitions encoded) whose lines all sit in one partition is 3D too, not a 2D slice
    write_raw(tmp_path / "one_partition.h5", [line(random_kspace(rng, COILS, SAMPLES), c, kspace_encode_step_2=2)
                                              for c in range(WIDTH)], z=4)
    with pytest.raises(DataError, match=r"one_partition\.h5.*3D encoding .*encoded matrix z = 4"):
        read_ismrmrd_raw(tmp_path / "one_partition.h5")


def test_a_header_without_the_optional_step_1_limits_takes_every_encoded_line(tmp_path):
    """The ISMRMRD schema makes ``encodingLimits/kspace_encoding_step_1`` optional; without it the lines are
    placed as they are (centre ``WIDTH // 2``) and all of them count as acquired."""
    rng = np.random.default_rng(11)
    kspace = random_kspace(rng, COILS, SAMPLES, WIDTH)
    write_raw(tmp_path / "raw.h5", [line(kspace[..., c], c) for c in range(WIDTH)], step_1_limits=False)
    assert b"kspace_encoding_step_1" not in header_xml(step_1_limits=False).encode()
    volume = read_ismrmrd_raw(tmp_path / "raw.h5")
    np.testing.assert_array_equal(volume.kspace[0], kspace)
    assert (volume.info.header.padding_left, volume.info.header.padding_right) == (0, WIDTH)


def test_an_encoded_matrix_larger_than_the_memory_is_refused_before_it_is_allocated(tmp_path):
    """The k-space is as wide as the header's encoded matrix y: a header of a few bytes declaring 2**40 lines had
    numpy allocate it (a MemoryError, or, within the machine's memory, gigabytes filled as the lines were averaged).
    It is refused before the allocation, naming the file and sizes."""
    rng = np.random.default_rng(12)
    kspace = random_kspace(rng, COILS, SAMPLES, WIDTH)
    raw = ismrmrd.Dataset(str(tmp_path / "wide.h5"), "dataset", create_if_needed=True)
    raw.write_xml_header(header_xml().replace(f"<y>{WIDTH}</y>", f"<y>{2**40}</y>", 1))
    for c in range(WIDTH):
        raw.append_acquisition(line(kspace[..., c], c))
    raw.close()
    with pytest.raises(DataError, match=rf"wide\.h5: reading k-space \(header's encoded matrix y\) \(1, {COILS}, "
                                        rf"{SAMPLES}, {2**40}\) complex64 takes .* GiB, more than the"):
        read_ismrmrd_raw(tmp_path / "wide.h5")


def test_more_acquisition_rows_than_the_memory_holds_are_refused_before_reading(tmp_path, monkeypatch):
    """A file of KB can declare millions of acquisition rows (chunks never written): each was read into an
    ismrmrd.Acquisition of about 3 KB (200,000 rows: 0.7 GB, 6 s). Rows that would not fit are refused first."""
    import h5py

    rng = np.random.default_rng(13)
    write_raw(tmp_path / "rows.h5", [line(random_kspace(rng, COILS, SAMPLES), c) for c in range(WIDTH)])
    with h5py.File(tmp_path / "rows.h5", "a") as f:
        f["dataset/data"].resize((100,))
    monkeypatch.setattr("reconkit.data.volume.available_memory", lambda: 200_000)
    with pytest.raises(DataError, match=r"rows\.h5: reading 100 ISMRMRD acquisitions \(without their samples\) "
                                        r"\(100, 3072\) uint8 takes .* GiB, more than the"):
        read_ismrmrd_raw(tmp_path / "rows.h5")


def test_a_row_declaring_more_samples_than_it_stores_is_refused_before_they_are_allocated(tmp_path):
    """``ismrmrd.Acquisition`` allocates what a row's header declares: 65535 channels x 65535 samples (32 GiB), or a
    65535-dimensional trajectory of 65535 samples (16 GiB, never read, so a 0-channel row passed), in a file of KB.
    Each row's declared sizes must match what it stores; read under a 4 GB address-space limit, so that an
    allocation fails here rather than filling the machine."""
    import resource
    import subprocess
    import sys

    import h5py

    rng = np.random.default_rng(14)
    declared = {  # row 5's header fields
        "samples": {"active_channels": 65535, "number_of_samples": 65535},
        "trajectory": {"active_channels": 0, "number_of_samples": 65535, "trajectory_dimensions": 65535},
    }
    for name, head in declared.items():
        write_raw(tmp_path / f"{name}.h5", [line(random_kspace(rng, COILS, SAMPLES), c) for c in range(WIDTH)])
        with h5py.File(tmp_path / f"{name}.h5", "a") as f:
            row = f["dataset/data"][5]
            for field, value in head.items():
                row["head"][field] = value
            if not head["active_channels"]:
                row["data"] = np.zeros(0, np.float32)
            f["dataset/data"][5] = row
    code = (
        "import sys\nfrom reconkit.data.ismrmrd_raw import read_ismrmrd_raw\nfrom reconkit.errors import DataError\n"
        "for path in sys.argv[1:]:\n    try:\n        read_ismrmrd_raw(path)\n    except DataError as err:\n"
        "        print(err)\n"
    )

    def limit_address_space() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4_000_000_000, 4_000_000_000))

    result = subprocess.run([sys.executable, "-c", code, *(str(tmp_path / f"{name}.h5") for name in declared)],
                            capture_output=True, text=True, timeout=60, preexec_fn=limit_address_space)  # fmt: skip
    messages = result.stdout.splitlines()
    assert result.returncode == 0 and len(messages) == 2, result.stdout + result.stderr
    assert messages[0].endswith(f"samples.h5: ISMRMRD acquisition 5 declares 65535 channels x 65535 samples and a "
                                f"0-dimensional trajectory (32 GiB) but stores {COILS * SAMPLES} complex samples "
                                f"and 0 trajectory values"), messages[0]  # fmt: skip
    assert messages[1].endswith("trajectory.h5: ISMRMRD acquisition 5 declares 0 channels x 65535 samples and a "
                                "65535-dimensional trajectory (16 GiB) but stores 0 complex samples and 0 trajectory "
                                "values"), messages[1]  # fmt: skip


def test_partial_fourier_lines_numbered_in_the_full_kspace_are_acquired_from_the_minimum_on(tmp_path):
    """A fully sampled partial-Fourier scan whose lines keep their full k-space numbers (minimum 4, maximum 11,
    centre 6): its acquired window starts at the minimum, so it is fully sampled there (a retrospective mask is
    drawn inside it), not "already undersampled" because of the 4 lines partial Fourier never acquires."""
    from reconkit.inference import acquired_columns, volume_mask

    rng = np.random.default_rng(14)
    kspace = random_kspace(rng, COILS, SAMPLES, WIDTH)
    write_raw(tmp_path / "raw.h5", [line(kspace[..., c], c) for c in range(4, WIDTH)], first_line=4)
    volume = read_ismrmrd_raw(tmp_path / "raw.h5")
    expected = kspace.copy()
    expected[..., :4] = 0
    np.testing.assert_array_equal(volume.kspace[0], expected)
    assert acquired_columns(volume) == (4, WIDTH, None)
    mask, retrospective = volume_mask(volume, "equispaced_fraction", 2, 0.25, seed=0)
    assert retrospective and not mask[..., :4, :].any() and mask[..., 4:, :].any()


@pytest.mark.parametrize("trajectory", ["radial", "spiral", "epi"])
def test_a_non_cartesian_trajectory_is_refused_by_name(tmp_path, trajectory):
    """Radial spokes, spiral interleaves and ramp-sampled EPI echoes are no k-space columns: placed as such they
    would give a garbage image without a word."""
    rng = np.random.default_rng(10)
    lines = [line(random_kspace(rng, COILS, SAMPLES), c) for c in range(WIDTH)]
    write_raw(tmp_path / "raw.h5", lines, trajectory=trajectory)
    with pytest.raises(DataError, match=rf"raw\.h5: {trajectory} trajectory is not supported"):
        read_ismrmrd_raw(tmp_path / "raw.h5")


def test_cli_writes_one_nifti_and_dicom_series_per_contrast(tmp_path, capsys):
    import h5py
    import nibabel as nib
    import pydicom

    from reconkit.cli.main import main as reconkit_main

    rng = np.random.default_rng(4)
    kspace = {(s, c): random_kspace(rng, COILS, SAMPLES, WIDTH) for s in range(3) for c in range(2)}
    write_raw(
        tmp_path / "raw.h5",
        [line(k[..., col], col, slice=s, contrast=c) for (s, c), k in kspace.items() for col in range(WIDTH)],
    )
    code = reconkit_main(
        [
            "reconstruct",
            str(tmp_path / "raw.h5"),
            "--model",
            "zero-filled",
            "--output",
            str(tmp_path / "out"),
            "--format",
            "h5",
            "nifti",
            "dicom",
        ]
    )
    assert code == 0, capsys.readouterr().err
    with h5py.File(tmp_path / "out" / "h5" / "raw.h5") as f:
        stacked = f["reconstruction"][()]
        assert [(i["slice"], i["contrast"]) for i in json.loads(f.attrs["image_index"])] == [
            (0, 0),
            (1, 0),
            (2, 0),
            (0, 1),
            (1, 1),
            (2, 1),
        ]
    assert stacked.shape[0] == 6
    for contrast in range(2):
        nifti = nib.load(tmp_path / "out" / "nifti" / f"raw_contrast{contrast}.nii.gz").get_fdata()
        np.testing.assert_allclose(nifti.transpose(2, 1, 0), stacked[3 * contrast : 3 * contrast + 3], rtol=1e-6)
        assert len(list((tmp_path / "out" / "dicom" / f"raw_contrast{contrast}").glob("*.dcm"))) == 3
    assert not (tmp_path / "out" / "nifti" / "raw.nii.gz").exists()
    first = [pydicom.dcmread(tmp_path / "out" / "dicom" / f"raw_contrast{c}" / "slice_000.dcm") for c in range(2)]
    assert first[0].StudyInstanceUID == first[1].StudyInstanceUID  # one scan, one study
    assert first[0].FrameOfReferenceUID == first[1].FrameOfReferenceUID
    assert first[0].SeriesInstanceUID != first[1].SeriesInstanceUID
    assert [ds.SeriesNumber for ds in first] == [1, 2]


def test_cli_bad_raw_files_get_one_line_each_and_the_good_one_is_written(tmp_path, capsys):
    from reconkit.cli.main import main as reconkit_main

    rng = np.random.default_rng(5)
    scans = tmp_path / "scans"
    scans.mkdir()
    write_raw(scans / "good.h5", [line(random_kspace(rng, COILS, SAMPLES), c) for c in range(WIDTH)])
    write_raw(
        scans / "volumetric.h5",
        [line(random_kspace(rng, COILS, SAMPLES), c, kspace_encode_step_2=p) for p in range(2) for c in range(WIDTH)],
    )
    write_raw(  # imaging lines of two readout lengths, neither a reference scan nor a partial echo
        scans / "mixed.h5", [line(random_kspace(rng, COILS, SAMPLES if c % 2 else 8), c) for c in range(WIDTH)]
    )
    write_raw(scans / "empty.h5", [])  # a header and no acquisitions (ismrmrd then writes no 'data' dataset)
    before = (scans / "good.h5").stat().st_mtime_ns
    code = reconkit_main(["reconstruct", str(scans), "--model", "zero-filled", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1
    assert "volumetric.h5: 3D encoding (2 values of kspace_encode_step_2, encoded matrix z = 1) is not supported" in err
    assert "mixed.h5: imaging acquisitions differ in (coils, samples)" in err
    assert "empty.h5: ISMRMRD file holds no imaging acquisitions" in err
    assert sorted(p.name for p in (tmp_path / "out" / "h5").iterdir()) == ["good.h5"]
    assert (scans / "good.h5").stat().st_mtime_ns == before  # read-only: the input is not touched


def test_a_raw_file_held_open_elsewhere_is_still_read(tmp_path):
    """The reader opens read-only, so a file another reader holds open (HDF5 locks it) reads as usual."""
    import h5py

    rng = np.random.default_rng(8)
    write_raw(tmp_path / "scan.h5", [line(random_kspace(rng, COILS, SAMPLES), c) for c in range(WIDTH)])
    with h5py.File(tmp_path / "scan.h5", "r"):
        assert read_ismrmrd_raw(tmp_path / "scan.h5").kspace.shape == (1, COILS, SAMPLES, WIDTH)


def test_acquisitions_kept_in_an_external_raw_file_are_refused(tmp_path):
    """``dataset/data`` stored in another file (``external=``): HDF5 reads any file named there as the acquisitions,
    ``/etc/passwd`` as well as this test's copy of the real ones; only data inside the HDF5 file is read."""
    import h5py

    rng = np.random.default_rng(9)
    write_raw(tmp_path / "scan.h5", [line(random_kspace(rng, COILS, SAMPLES), c) for c in range(WIDTH)])
    with h5py.File(tmp_path / "scan.h5", "a") as f:
        data = f["dataset/data"][()]
        del f["dataset/data"]
        (tmp_path / "outside.bin").write_bytes(data.tobytes())
        f.create_dataset("dataset/data", shape=data.shape, dtype=data.dtype,
                         external=[(str(tmp_path / "outside.bin"), 0, data.nbytes)])
    with pytest.raises(DataError, match="'dataset/data' keeps its data in external raw file"):
        read_ismrmrd_raw(tmp_path / "scan.h5")


def test_acquisitions_are_read_in_blocks_not_one_hdf5_read_per_line(tmp_path, monkeypatch):
    """One HDF5 read per acquisition (``ismrmrd.Dataset.read_acquisition``) cost a few ms per line: minutes for a
    real scan's tens of thousands of lines. The table is read a block of rows at a time."""
    import h5py

    rng = np.random.default_rng(13)
    kspace = random_kspace(rng, 2, COILS, SAMPLES, WIDTH)
    write_raw(tmp_path / "scan.h5", [line(kspace[s][..., c], c, slice=s) for s in range(2) for c in range(WIDTH)])
    reads = []
    original = h5py.Dataset.__getitem__

    def counted(self, key):
        reads.append(self.name)
        return original(self, key)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", counted)
    np.testing.assert_array_equal(read_ismrmrd_raw(tmp_path / "scan.h5").kspace, kspace)
    assert reads.count("/dataset/data") == 1, reads


def test_slices_undersampled_with_different_lines_keep_their_own_sampling(tmp_path, capsys):
    """Slice 0 samples the even columns, slice 1 the odd ones (both the centre): together they cover every column,
    yet each is undersampled. Each is reconstructed with its own lines; no second mask is drawn over them."""
    import fastmri
    import h5py
    from fastmri.data import transforms

    from reconkit.cli.main import main as reconkit_main
    from reconkit.inference import volume_mask

    rng = np.random.default_rng(9)
    sampled = [[c for c in range(WIDTH) if c % 2 == s or 4 <= c < 8] for s in range(2)]
    kspace = [random_kspace(rng, COILS, SAMPLES, WIDTH) for _ in range(2)]
    write_raw(tmp_path / "raw.h5", [line(kspace[s][..., c], c, slice=s) for s in range(2) for c in sampled[s]])
    volume = read_ismrmrd_raw(tmp_path / "raw.h5")
    mask, retrospective = volume_mask(volume, "equispaced_fraction", 4, 0.08, seed=None)
    assert not retrospective and mask.shape == (2, 1, 1, WIDTH, 1)
    assert [list(np.flatnonzero(m.ravel())) for m in mask] == sampled
    code = reconkit_main(["reconstruct", str(tmp_path / "raw.h5"), "--model", "zero-filled", "--output",
                          str(tmp_path / "out"), "--acceleration", "8"])
    err = capsys.readouterr().err
    assert code == 0 and "already undersampled" in err, err
    with h5py.File(tmp_path / "out" / "h5" / "raw.h5") as f:
        output = f["reconstruction"][()]
    for s in range(2):
        measured = np.zeros_like(kspace[s])
        measured[..., sampled[s]] = kspace[s][..., sampled[s]]
        image = fastmri.rss(fastmri.complex_abs(fastmri.ifft2c(transforms.to_tensor(measured))), dim=0)
        expected = transforms.center_crop(image, output.shape[-2:]).numpy()
        np.testing.assert_allclose(output[s], expected, rtol=1e-5, atol=1e-7)


def _geometry_header(samples: int, width: int, recon: tuple[int, int], fov_mm: tuple[float, float]) -> str:
    """A header whose recon field of view over the recon matrix is the k-space's own pixel size (as a scanner's with
    2x readout oversampling), with a patient position and ID."""
    def space(size, fov):
        return x.encodingSpaceType(
            matrixSize=x.matrixSizeType(x=size[0], y=size[1], z=1),
            fieldOfView_mm=x.fieldOfViewMm(x=fov[0], y=fov[1], z=3.0),
        )

    spacing = (fov_mm[0] / samples, fov_mm[1] / width)
    header = x.ismrmrdHeader(
        experimentalConditions=x.experimentalConditionsType(H1resonanceFrequency_Hz=63_870_000),
        measurementInformation=x.measurementInformationType(patientPosition=x.patientPositionType("FFS")),
        subjectInformation=x.subjectInformationType(patientID="subj^07"),
    )
    header.encoding.append(
        x.encodingType(
            encodedSpace=space((samples, width), fov_mm),
            reconSpace=space(recon, (recon[0] * spacing[0], recon[1] * spacing[1])),
            encodingLimits=x.encodingLimitsType(
                kspace_encoding_step_1=x.limitType(minimum=0, maximum=width - 1, center=width // 2)
            ),
            trajectory=x.trajectoryType("cartesian"),
        )
    )
    return x.ToXML(header)


def _spot_kspace(shape: tuple[int, int], spot: tuple[int, int]) -> np.ndarray:
    """``(COILS, H, W)`` k-space (centred orthonormal FFT, fastMRI's and Gadgetron's convention) of an image that is
    one bright pixel at ``spot`` and faint noise elsewhere."""
    image = np.random.default_rng(8).uniform(0.0, 0.01, shape).astype(np.complex64)
    image[spot] = 1.0
    kspace = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(image), norm="ortho"))
    return np.repeat(kspace[None], COILS, axis=0).astype(np.complex64)


def _reconstruct(tmp_path, name: str, *formats: str) -> None:
    from reconkit.cli.main import main as reconkit_main

    out = ["--output", str(tmp_path / "out"), "--format", *formats]
    assert reconkit_main(["reconstruct", str(tmp_path / name), "--model", "zero-filled", *out]) == 0


def _dicom_point(ds, i: int, j: int) -> np.ndarray:
    """The LPS point of a DICOM image's pixel (row i, column j) (PS3.3 C.7.6.2.1.1)."""
    origin, orientation = (np.array([float(v) for v in values]) for values in (ds.ImagePositionPatient,
                                                                                ds.ImageOrientationPatient))
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    return origin + j * col_spacing * orientation[:3] + i * row_spacing * orientation[3:]


def _rotation(angles: tuple[float, float, float]) -> np.ndarray:
    """A rotation matrix (columns: read, phase, slice direction) from angles about x, y, z in degrees."""
    a, b, c = np.radians(angles)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


@pytest.mark.parametrize(
    ("directions", "samples", "width", "recon"),
    [
        # sagittal: readout head to feet (-z), phase encoding anterior to posterior (+y), slices right to left (+x)
        (np.array([[0, 0, 1], [0, 1, 0], [-1, 0, 0]]).T @ np.diag([-1, 1, -1]), 16, 12, (8, 12)),
        (_rotation((20.0, -35.0, 50.0)), 16, 11, (7, 11)),  # oblique; odd matrix sizes (fftshift's centre N // 2)
    ],
    ids=["sagittal", "oblique"],
)
def test_raw_slices_are_placed_where_the_acquisitions_say(tmp_path, directions, samples, width, recon):
    """Orientation, positions and slice spacing come from the acquisitions' position / read_dir / phase_dir /
    slice_dir (DICOM LPS), for DICOM and NIfTI alike, with a slice gap; PatientPosition / PatientID from the header.
    A bright pixel placed 2 rows and -3 columns from the image centre shows the in-plane signs: it must land at
    position + 2 row spacings along read_dir - 3 column spacings along phase_dir."""
    import nibabel as nib
    import pydicom

    read, phase, normal = directions.T
    assert np.allclose(np.cross(read, phase), normal)
    centre = np.array([12.5, -40.0, 31.0])
    slice_positions = [centre + offset * normal for offset in (-10.0, 0.0, 10.0)]  # 3 mm slices, 10 mm apart
    kspace = _spot_kspace((samples, width), (samples // 2 + 2, width // 2 - 3))
    acquisitions = []
    for s, position in enumerate(slice_positions):
        for col in range(width):
            acquisition = line(kspace[..., col], col, slice=s)
            for name, value in zip(("position", "read_dir", "phase_dir", "slice_dir"), (position, *directions.T)):
                setattr(acquisition, name, tuple(float(v) for v in value))
            acquisitions.append(acquisition)
    raw = ismrmrd.Dataset(str(tmp_path / "raw.h5"), "dataset", create_if_needed=True)
    raw.write_xml_header(_geometry_header(samples, width, recon, (100.0, 75.0)))
    for acquisition in acquisitions:
        raw.append_acquisition(acquisition)
    raw.close()
    _reconstruct(tmp_path, "raw.h5", "dicom", "nifti")

    slices = [pydicom.dcmread(p) for p in sorted((tmp_path / "out" / "dicom" / "raw").glob("*.dcm"))]
    nifti = nib.load(tmp_path / "out" / "nifti" / "raw.nii.gz")
    lps_to_ras = np.array([-1.0, -1.0, 1.0])
    for k, (ds, position) in enumerate(zip(slices, slice_positions)):
        orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
        np.testing.assert_allclose(orientation, [*phase, *read], atol=1e-6)  # rows: readout, columns: phase
        row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
        assert (row_spacing, col_spacing) == pytest.approx((100.0 / samples, 75.0 / width))

        patient = functools.partial(_dicom_point, ds)
        centre_pixel = (samples // 2 - (samples - recon[0]) // 2, width // 2 - (width - recon[1]) // 2)
        np.testing.assert_allclose(patient(*centre_pixel), position, atol=1e-3)
        spot = np.unravel_index(np.argmax(ds.pixel_array), ds.pixel_array.shape)
        expected_spot = position + 2 * row_spacing * read - 3 * col_spacing * phase
        np.testing.assert_allclose(patient(*spot), expected_spot, atol=1e-3)
        for i, j in [centre_pixel, spot, (0, 0), (recon[0] - 1, recon[1] - 1)]:  # NIfTI: voxel (col, row, slice)
            ras = nifti.affine @ [j, i, k, 1]
            np.testing.assert_allclose(ras[:3], lps_to_ras * patient(i, j), atol=1e-3)
        assert float(ds.SliceLocation) == pytest.approx(float(np.dot(position, normal)), abs=1e-3)
        assert float(ds.SpacingBetweenSlices) == pytest.approx(10.0)
        assert float(ds.SliceThickness) == pytest.approx(3.0)
        assert (ds.PatientPosition, ds.PatientID, str(ds.PatientName)) == ("FFS", "subj^07", "subj_07")
    assert np.argmax(nifti.get_fdata()[..., 1]) == np.ravel_multi_index(spot[::-1], nifti.shape[:2])


def test_raw_files_without_usable_geometry_keep_the_fixed_frame(tmp_path):
    """Acquisitions that leave position and directions zero (or give directions that are not orthonormal) get the
    fixed axial frame centred on the volume, as fastMRI files do."""
    import pydicom

    from reconkit.io import geometry_from_header, nifti_affine
    from reconkit.io.geometry import fixed_frame

    rng = np.random.default_rng(9)
    kspace = [random_kspace(rng, COILS, SAMPLES, WIDTH) for _ in range(2)]
    for name, read_dir in [("zeros.h5", (0.0, 0.0, 0.0)), ("skewed.h5", (1.0, 0.5, 0.0))]:
        acquisitions = [line(k[..., col], col, slice=s) for s, k in enumerate(kspace) for col in range(WIDTH)]
        for acquisition in acquisitions:
            acquisition.read_dir, acquisition.phase_dir, acquisition.slice_dir = read_dir, (0, 1, 0), (0, 0, 1)
        write_raw(tmp_path / name, acquisitions)
        _reconstruct(tmp_path, name, "dicom")
        geometry = geometry_from_header(read_ismrmrd_raw(tmp_path / name).info.header, (SAMPLES, WIDTH))
        frame = fixed_frame(geometry, SAMPLES // 2, WIDTH, 2)
        for k in range(2):
            ds = pydicom.dcmread(tmp_path / "out" / "dicom" / name[:-3] / f"slice_{k:03d}.dcm")
            assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], frame.origins[k])
            assert ds.PatientPosition == "" and ds.PatientID == "anonymous"
    affine = nifti_affine(geometry, (WIDTH, SAMPLES // 2, 2))
    np.testing.assert_allclose(affine[:3, 3], [-1, -1, 1] * np.array(frame.origins[0]))
