"""ISMRMRD header parsing, fastMRI file validation and SliceDataset, compared with fastmri 0.3.0 on tiny files."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import pickle
import random
import re
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import h5py
import ismrmrd.xsd as ismrmrd_xsd
import numpy as np
import pytest
from fastmri.data import SliceDataset as FastmriSliceDataset
from torch.utils.data import default_collate

from reconkit.data import (
    SliceDataset,
    VarNetDataTransform,
    parse_ismrmrd_header,
    read_volume,
    read_volume_info,
    slice_dataset,
)
from reconkit.data.slice_dataset import list_volume_files
from reconkit.errors import DataError

# --------------------------------------------------------------------------------------------- test files


def ismrmrd_xml(
    encoded=(32, 24, 1),
    recon=(16, 16, 1),
    center=11,
    maximum=21,
    encoded_fov=(280.0, 280.0, 4.5),
    recon_fov=(140.0, 140.0, 3.0),
    sequence=True,
) -> bytes:
    """A schema-valid ISMRMRD header built with the ismrmrd package (as fastMRI stores it: ASCII bytes)."""
    x = ismrmrd_xsd
    header = x.ismrmrdHeader(experimentalConditions=x.experimentalConditionsType(H1resonanceFrequency_Hz=123_252_000))
    header.acquisitionSystemInformation = x.acquisitionSystemInformationType(
        systemVendor="SIEMENS", systemFieldStrength_T=2.89362, receiverChannels=4
    )
    if sequence:
        header.sequenceParameters = x.sequenceParametersType(TR=[2750.0], TE=[27.0], TI=[100.0], flipAngle_deg=[140.0])

    def space(size, fov):
        return x.encodingSpaceType(
            matrixSize=x.matrixSizeType(x=size[0], y=size[1], z=size[2]),
            fieldOfView_mm=x.fieldOfViewMm(x=fov[0], y=fov[1], z=fov[2]),
        )

    limits = x.encodingLimitsType(
        kspace_encoding_step_0=x.limitType(minimum=0, maximum=encoded[0] - 1, center=encoded[0] // 2),
        kspace_encoding_step_1=x.limitType(minimum=0, maximum=maximum, center=center),
        kspace_encoding_step_2=x.limitType(minimum=0, maximum=0, center=0),
        slice=x.limitType(minimum=0, maximum=3, center=0),
    )
    header.encoding.append(
        x.encodingType(
            encodedSpace=space(encoded, encoded_fov),
            reconSpace=space(recon, recon_fov),
            encodingLimits=limits,
            trajectory=x.trajectoryType("cartesian"),
        )
    )
    return x.ToXML(header).encode("ascii")


def write_volume(
    path: Path,
    *,
    num_slices=3,
    coils=4,
    height=32,
    width=24,
    recon=(16, 16),
    challenge="multicoil",
    with_target=True,
    with_mask=False,
    header: bytes | None = None,
    seed=0,
) -> Path:
    """A tiny fastMRI-layout file; ``coils=None`` for single-coil. Header padding follows ``width``."""
    rng = np.random.default_rng(seed)
    shape = (num_slices, coils, height, width) if coils else (num_slices, height, width)
    kspace = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    if header is None:
        header = ismrmrd_xml(encoded=(height, width, 1), recon=(*recon, 1), center=width // 2 - 1, maximum=width - 3)
    with h5py.File(path, "w") as hf:
        hf.create_dataset("kspace", data=kspace)
        hf.create_dataset("ismrmrd_header", data=header)
        if with_target:
            key = "reconstruction_rss" if challenge == "multicoil" else "reconstruction_esc"
            target = rng.random((num_slices, *recon)).astype(np.float32)
            hf.create_dataset(key, data=target)
            hf.attrs["max"] = float(target.max())
            hf.attrs["norm"] = float(np.linalg.norm(target))
        if with_mask:
            hf.create_dataset("mask", data=(rng.random(width) < 0.3).astype(np.float32))
        hf.attrs["acquisition"] = "CORPD_FBK"
        hf.attrs["patient_id"] = f"patient-{seed}"
    return path


@pytest.fixture
def multicoil_dir(tmp_path):
    root = tmp_path / "multicoil"
    root.mkdir()
    write_volume(root / "file_b.h5", num_slices=3, coils=4, width=24, seed=1)
    write_volume(root / "file_a.h5", num_slices=2, coils=3, width=25, seed=2)  # odd width, other coil count
    write_volume(root / "file_c.h5", num_slices=4, coils=2, height=30, width=20, recon=(14, 14), seed=3, with_mask=True)
    write_volume(root / "file_d.h5", num_slices=1, coils=4, width=24, seed=4, with_target=False)
    return root


@pytest.fixture
def singlecoil_dir(tmp_path):
    root = tmp_path / "singlecoil"
    root.mkdir()
    write_volume(root / "sc_1.h5", num_slices=3, coils=None, challenge="singlecoil", seed=5)
    write_volume(root / "sc_2.h5", num_slices=2, coils=None, challenge="singlecoil", width=27, seed=6)
    return root


def fastmri_metadata(path: Path):
    """fastmri's own metadata for one file (``_retrieve_metadata`` does not use instance state)."""
    return FastmriSliceDataset._retrieve_metadata(None, path)


def assert_same_samples(ours, theirs):
    assert len(ours) == len(theirs)
    for i in range(len(theirs)):
        got, want = ours[i], theirs[i]
        np.testing.assert_array_equal(got[0], want[0])
        assert got[0].dtype == want[0].dtype
        for a, b in ((got[1], want[1]), (got[2], want[2])):
            assert (a is None) == (b is None)
            if b is not None:
                np.testing.assert_array_equal(a, b)
        assert got[3].keys() == want[3].keys()
        for key in want[3]:
            assert np.all(got[3][key] == want[3][key]), key
        assert got[4:] == want[4:]


# --------------------------------------------------------------------------------------------- header


def test_header_matches_fastmri_metadata(multicoil_dir):
    for path in sorted(multicoil_dir.iterdir()):
        with h5py.File(path) as hf:
            info = parse_ismrmrd_header(hf["ismrmrd_header"][()])
        metadata, num_slices = fastmri_metadata(path)
        for key in ("padding_left", "padding_right", "encoding_size", "recon_size"):
            assert info.metadata()[key] == metadata[key], (path.name, key)
        assert read_volume_info(path).num_slices == num_slices


def test_header_all_fields():
    xml = ismrmrd_xml(encoded=(640, 372, 1), recon=(320, 320, 1), center=186, maximum=369)
    info = parse_ismrmrd_header(xml.decode())  # str works as bytes do
    assert info.encoding_size == (640, 372, 1) and info.recon_size == (320, 320, 1)
    assert info.encoding_fov_mm == (280.0, 280.0, 4.5) and info.recon_fov_mm == (140.0, 140.0, 3.0)
    assert (info.kspace_encoding_step_1_center, info.kspace_encoding_step_1_maximum) == (186, 369)
    assert (info.padding_left, info.padding_right) == (0, 370)
    assert info.slice_thickness_mm == 3.0
    assert (info.repetition_time_ms, info.echo_time_ms, info.field_strength_t) == (2750.0, 27.0, 2.89362)

    bare = parse_ismrmrd_header(ismrmrd_xml(sequence=False))
    assert bare.repetition_time_ms is None and bare.echo_time_ms is None


def test_header_without_namespace():
    xml = ismrmrd_xml().decode().replace(' xmlns="http://www.ismrm.org/ISMRMRD"', "")
    assert parse_ismrmrd_header(xml) == parse_ismrmrd_header(ismrmrd_xml())


@pytest.mark.parametrize(
    "xml,problem",
    [
        (b"", "empty"),
        (b"<ismrmrdHeader><encoding>", "not valid XML"),
        (b"\x89HDF garbage", "not valid XML"),
        (ismrmrd_xml().replace(b"<center>11</center>", b""), "kspace_encoding_step_1/center"),
        (ismrmrd_xml().replace(b"<reconSpace>", b"<reconSpaceX>").replace(b"</reconSpace>", b"</reconSpaceX>"),
         "lacks encoding/reconSpace/"),
        (ismrmrd_xml().replace(b"<x>32</x>", b"<x>thirty-two</x>"), "'thirty-two', not a number"),
        (ismrmrd_xml(recon=(0, 16, 1)), "reconSpace matrixSize is 0 x 16; the recon size must be positive"),
        (ismrmrd_xml(recon=(16, -16, 1)), "reconSpace matrixSize is 16 x -16"),
    ],
)
def test_header_errors_name_the_problem(xml, problem):
    with pytest.raises(DataError, match=problem) as err:
        parse_ismrmrd_header(xml, source="/data/file1.h5")
    assert str(err.value).startswith("/data/file1.h5: ")


def test_a_header_of_megabytes_is_refused_before_it_is_read_or_parsed(tmp_path):
    """A header of ``<x/>`` repeated, tens of MB that gzip keeps in a file of KB, was read and parsed whole:
    ElementTree took about 50 times its size (a 25 KB file: 0.9 GB and 8 s). Headers over 4 MiB are refused, in a
    fastMRI file before the string is read, in the parser for any caller."""
    xml = b"<r>" + b"<x/>" * 2**20 + b"</r>"
    path = write_volume(tmp_path / "big_header.h5", num_slices=1)
    with h5py.File(path, "a") as hf:
        del hf["ismrmrd_header"]
        hf.create_dataset("ismrmrd_header", data=np.array([xml]), chunks=(1,), compression="gzip")
    assert path.stat().st_size < 100_000
    with pytest.raises(DataError, match=r"big_header\.h5: ismrmrd_header is 4194311 bytes, more than the 4194304"):
        read_volume_info(path)
    with pytest.raises(DataError, match=r"^/data/f\.h5: ismrmrd_header is 4194311 bytes"):
        parse_ismrmrd_header(xml.decode(), source="/data/f.h5")


# --------------------------------------------------------------------------------------------- volume validation


def test_read_volume_and_info(multicoil_dir, singlecoil_dir):
    info = read_volume_info(multicoil_dir / "file_a.h5")
    assert info.challenge == "multicoil" and info.num_coils == 3 and info.kspace_shape == (2, 3, 32, 25)
    assert info.target_key == "reconstruction_rss" and info.target_shape == (2, 16, 16) and info.mask_shape is None
    assert info.attrs["acquisition"] == "CORPD_FBK"
    volume = read_volume(multicoil_dir / "file_c.h5")
    assert volume.kspace.shape == (4, 2, 30, 20) and volume.mask.shape == (20,) and volume.target.shape == (4, 14, 14)
    single = read_volume_info(singlecoil_dir / "sc_2.h5", challenge="singlecoil")
    assert single.num_coils is None and single.target_key == "reconstruction_esc"
    assert read_volume(multicoil_dir / "file_d.h5").target is None


def _rewrite(path: Path, **changes) -> Path:
    """Copy of a good multi-coil file with datasets replaced (value) or removed (None)."""
    write_volume(path, num_slices=2, coils=2)
    with h5py.File(path, "a") as hf:
        for key, value in changes.items():
            del hf[key]
            if value is not None:
                hf.create_dataset(key, data=value)
    return path


def _bad_files(tmp: Path) -> dict:
    """name -> (path, expected problem)."""
    tmp.mkdir(exist_ok=True)
    good = write_volume(tmp / "good.h5", num_slices=2, coils=2)
    truncated = tmp / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp / "empty.h5").write_bytes(b"")
    (tmp / "text.h5").write_text("this is not HDF5\n" * 10)
    heap = bytearray(good.read_bytes())  # opens, then fails at the first lookup (h5py's RuntimeError, was raised as is)
    heap[heap.index(b"HEAP") : heap.index(b"HEAP") + 4] = b"XXXX"
    (tmp / "heap.h5").write_bytes(bytes(heap))
    group = tmp / "group.h5"
    with h5py.File(group, "w") as hf:
        hf.create_group("kspace")
    external, dangling = _rewrite(tmp / "external.h5", kspace=None), _rewrite(tmp / "dangling.h5", kspace=None)
    with h5py.File(external, "a") as hf, h5py.File(dangling, "a") as hf2:  # k-space kept in a file not copied along
        hf["kspace"] = h5py.ExternalLink(str(tmp / "elsewhere.h5"), "/kspace")
        hf2["kspace"] = h5py.SoftLink("/data/kspace")
    bad = {
        "missing": (tmp / "missing.h5", "file not found"),
        "virtual_source": (_virtual_file(tmp / "virtual.h5"), "'kspace' is a virtual dataset whose source"),
        "external_raw": (_external_raw_file(tmp / "raw.h5"), "'kspace' keeps its data in external raw file(s) "),
        "filter_plugin": (
            _plugin_filter_file(tmp / "plugin.h5"), "'kspace' is compressed with HDF5 filter 32009 (zzz)"
        ),
        "empty": (tmp / "empty.h5", "empty file"),
        "text": (tmp / "text.h5", "not an HDF5 file"),
        "truncated": (truncated, "truncated or corrupt"),
        "bad_heap": (tmp / "heap.h5", "truncated or corrupt HDF5 file (Unable to synchronously check link existence"),
        "no_kspace": (_rewrite(tmp / "no_kspace.h5", kspace=None), "missing dataset 'kspace'"),
        "group": (group, "'kspace' is a Group"),
        "external_link": (external, f"'kspace' is a link to {tmp / 'elsewhere.h5'}:/kspace, which cannot be opened"),
        "dangling_link": (dangling, "'kspace' is a link to /data/kspace, which cannot be opened"),
        "real_kspace": (_rewrite(tmp / "real.h5", kspace=np.zeros((2, 2, 32, 24), np.float32)), "dtype float32"),
        "bad_ndim": (_rewrite(tmp / "ndim.h5", kspace=np.zeros((32, 24), np.complex64)), "expected (slices, coils"),
        "prostate": (  # fastMRI prostate T2 raw k-space: (averages, slices, coils, readout, phase)
            _rewrite(tmp / "prostate.h5", kspace=np.zeros((3, 2, 2, 32, 24), np.complex64)),
            "'kspace' has shape (3, 2, 2, 32, 24), expected (slices, coils, H, W) or (slices, H, W); 5 axes are the "
            "fastMRI prostate layout (averages, slices, coils, readout, phase), which reconkit does not read",
        ),
        "zero_slices": (_rewrite(tmp / "zero.h5", kspace=np.zeros((0, 2, 32, 24), np.complex64)), "is empty"),
        "no_header": (_rewrite(tmp / "nohdr.h5", ismrmrd_header=None), "missing dataset 'ismrmrd_header'"),
        "garbled_header": (_rewrite(tmp / "garbled.h5", ismrmrd_header=b"<ismrmrdHeader><enc"), "not valid XML"),
        "target_slices": (
            _rewrite(tmp / "target.h5", reconstruction_rss=np.zeros((5, 16, 16), np.float32)),
            "'reconstruction_rss' has shape (5, 16, 16), expected (2, h, w)",
        ),
        "target_dtype": (
            _rewrite(tmp / "tdtype.h5", reconstruction_rss=np.zeros((2, 16, 16), np.complex64)), "dtype complex64"
        ),
        "mask_shape": (_mask_file(tmp / "mask.h5"), "'mask' has shape (23,), expected (24,)"),
        "transposed": (  # phase-encode lines as rows: the header's padding and every mask would cut the readout
            _rewrite(tmp / "transposed.h5", kspace=np.ones((2, 2, 24, 32), np.complex64)),
            "'kspace' is 24 x 32 (H x W), the header's encoded matrix 32 x 24 (readout x phase-encode) the other way",
        ),
    }
    if hasattr(h5py.h5t, "COMPLEX_IEEE_F16LE"):  # HDF5 2.0 (h5py 3.16); older releases cannot write the type
        bad["complex_half"] = (_complex_half_file(tmp / "half.h5"), "'kspace' has an HDF5 datatype numpy cannot hold")
    return bad


def _virtual_file(path: Path) -> Path:
    """A file whose k-space is a virtual dataset over another file's, with that file then deleted (HDF5 reads the
    missing source as zeros, with no error)."""
    source = write_volume(path.with_name("source.h5"), num_slices=2, coils=2)
    write_volume(path, num_slices=2, coils=2)
    with h5py.File(path, "a") as hf:
        shape, dtype = hf["kspace"].shape, hf["kspace"].dtype
        del hf["kspace"]
        layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
        layout[:] = h5py.VirtualSource(source.name, "kspace", shape=shape)
        hf.create_virtual_dataset("kspace", layout)
    with h5py.File(source) as hf:  # found beside it
        np.testing.assert_array_equal(read_volume(path).kspace, hf["kspace"][()])
    source.unlink()
    return path


def _external_raw_file(path: Path) -> Path:
    """A file whose k-space is stored in another, non-HDF5 file (``external=``, by absolute path): HDF5 read that
    file's bytes as k-space, so any file the reader can read (``/etc/passwd``) went into the reconstruction."""
    secret = path.with_name("secret.txt")
    secret.write_bytes(b"secret " * 1000)
    write_volume(path, num_slices=2, coils=2)
    with h5py.File(path, "a") as hf:
        shape = hf["kspace"].shape
        del hf["kspace"]
        hf.create_dataset("kspace", shape=shape, dtype=np.complex64, external=[(str(secret), 0, h5py.h5f.UNLIMITED)])
    return path


def _complex_half_file(path: Path) -> Path:
    """A file whose k-space is HDF5 2.0's float16 complex type, which numpy has no dtype for."""
    write_volume(path, num_slices=2, coils=2)
    with h5py.File(path, "a") as hf:
        kspace = hf["kspace"][()]
        del hf["kspace"]
        half = h5py.h5t.COMPLEX_IEEE_F16LE
        stored = h5py.h5d.create(hf.id, b"kspace", half, h5py.h5s.create_simple(kspace.shape))
        pairs = np.ascontiguousarray(np.stack([kspace.real, kspace.imag], axis=-1).astype("<f2"))
        stored.write(h5py.h5s.ALL, h5py.h5s.ALL, pairs, mtype=half)
    return path


def _plugin_filter_file(path: Path) -> Path:
    """A file whose k-space went through a filter plugin this HDF5 lacks (as Blosc / Zstandard files from other
    sites): written with h5py's LZF, then the filter id (32000) in its pipeline message renamed to 32009 'zzz'."""
    write_volume(path, num_slices=2, coils=2)
    with h5py.File(path, "a") as hf:
        kspace = hf["kspace"][()]
        del hf["kspace"]
        hf.create_dataset("kspace", data=kspace, compression="lzf", shuffle=True, chunks=(1, 2, 32, 24))
    data = bytearray(path.read_bytes())
    at = data.index(struct.pack("<4H", 32000, 8, 1, 3) + b"lzf\0")  # id, name length, optional flag, 3 values
    data[at : at + 2], data[at + 8 : at + 11] = struct.pack("<H", 32009), b"zzz"
    path.write_bytes(bytes(data))
    return path


def _mask_file(path: Path) -> Path:
    write_volume(path, num_slices=2, coils=2)
    with h5py.File(path, "a") as hf:
        hf.create_dataset("mask", data=np.ones(23, np.float32))
    return path


def test_bad_files_raise_data_error_naming_file_and_problem(tmp_path):
    for name, (path, problem) in _bad_files(tmp_path / "bad").items():
        with pytest.raises(DataError) as err:
            read_volume_info(path)
        assert err.value.path == str(path), name
        assert problem in err.value.problem, (name, err.value.problem)
        assert str(err.value).startswith(f"{path}: ")


def test_challenge_mismatch(multicoil_dir, singlecoil_dir):
    with pytest.raises(DataError, match="a multicoil file, but challenge is 'singlecoil'"):
        read_volume_info(multicoil_dir / "file_a.h5", challenge="singlecoil")
    with pytest.raises(DataError, match="a singlecoil file"):
        SliceDataset(singlecoil_dir, challenge="multicoil", use_dataset_cache=False)


# --------------------------------------------------------------------------------------------- SliceDataset


@pytest.mark.parametrize("challenge", ["multicoil", "singlecoil"])
def test_same_samples_as_fastmri(challenge, multicoil_dir, singlecoil_dir, tmp_path):
    root = multicoil_dir if challenge == "multicoil" else singlecoil_dir
    theirs = FastmriSliceDataset(root, challenge=challenge)
    ours = SliceDataset(root, challenge=challenge, dataset_cache_file=tmp_path / "cache.pkl")
    assert len(ours) == {"multicoil": 10, "singlecoil": 5}[challenge]
    assert_same_samples(ours, theirs)
    kspace, _, _, attrs, _, _ = ours[0]
    assert kspace.dtype == np.complex64 and kspace.ndim == (3 if challenge == "multicoil" else 2)
    assert {"encoding_size", "recon_size", "padding_left", "padding_right", "max", "acquisition"} <= attrs.keys()


def test_transform_receives_the_sample(multicoil_dir, tmp_path):
    ours = SliceDataset(multicoil_dir, transform=lambda *sample: sample[4:], dataset_cache_file=tmp_path / "c.pkl")
    assert ours[0] == ("file_a.h5", 0) and ours[len(ours) - 1] == ("file_d.h5", 0)


def test_root_may_be_a_list_of_files(multicoil_dir, tmp_path):
    files = [multicoil_dir / "file_c.h5", multicoil_dir / "file_a.h5"]
    ours = SliceDataset(files, dataset_cache_file=tmp_path / "c.pkl")
    assert [(s.fname.name, s.slice_ind) for s in ours.raw_samples] == [("file_a.h5", 0), ("file_a.h5", 1)] + [
        ("file_c.h5", i) for i in range(4)
    ]


def test_folder_listing_takes_volume_suffixes_in_any_case(tmp_path):
    for name in ("b.H5", "a.h5", "c.HDF5", ".hidden.h5", "notes.txt", "d.h5.bak"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_volume_files(tmp_path)] == ["a.h5", "b.H5", "c.HDF5"]


@pytest.mark.parametrize(
    "kwargs",
    [{"sample_rate": 0.5}, {"sample_rate": 0.3}, {"volume_sample_rate": 0.5}, {"volume_sample_rate": 0.75}],
)
def test_sampling_like_fastmri(kwargs, multicoil_dir, tmp_path):
    for seed in range(4):
        random.seed(seed)
        theirs = FastmriSliceDataset(multicoil_dir, challenge="multicoil", **kwargs)
        random.seed(seed)
        ours = SliceDataset(multicoil_dir, dataset_cache_file=tmp_path / "cache.pkl", **kwargs)
        assert [(s.fname.name, s.slice_ind) for s in ours.raw_samples] == [
            (s.fname.name, s.slice_ind) for s in theirs.raw_samples
        ]
        assert 0 < len(ours) < 10
    with pytest.raises(ValueError, match="not both"):
        SliceDataset(multicoil_dir, sample_rate=0.5, volume_sample_rate=0.5)


@pytest.mark.parametrize("kwargs,message", [
    ({"sample_rate": -0.5}, "sample_rate must be in (0, 1], got -0.5"),  # kept all but the last half
    ({"sample_rate": float("nan")}, "sample_rate must be in (0, 1], got nan"),  # kept everything
    ({"sample_rate": 0.0}, "sample_rate must be in (0, 1], got 0.0"),
    ({"volume_sample_rate": 1.5}, "volume_sample_rate must be in (0, 1], got 1.5"),
])
def test_sample_rates_that_are_no_fraction_are_refused(kwargs, message, multicoil_dir, tmp_path):
    with pytest.raises(ValueError, match=re.escape(message)):
        SliceDataset(multicoil_dir, dataset_cache_file=tmp_path / "cache.pkl", **kwargs)


def test_num_cols_and_raw_sample_filter_like_fastmri(multicoil_dir, tmp_path):
    def only_first_two_slices(raw_sample):
        return raw_sample.slice_ind < 2

    for kwargs in ({"num_cols": (24,)}, {"num_cols": (25, 20)}, {"raw_sample_filter": only_first_two_slices}):
        theirs = FastmriSliceDataset(multicoil_dir, challenge="multicoil", **kwargs)
        ours = SliceDataset(multicoil_dir, dataset_cache_file=tmp_path / "cache.pkl", **kwargs)
        assert [(s.fname.name, s.slice_ind) for s in ours.raw_samples] == [
            (s.fname.name, s.slice_ind) for s in theirs.raw_samples
        ]
        assert 0 < len(ours) < 10


class _CountingOpens:
    """Replaces ``h5py.File``; records the files opened."""

    def __init__(self, monkeypatch):
        self.opened: list[str] = []
        real = h5py.File

        def counting(name, *args, **kwargs):
            self.opened.append(Path(name).name)
            return real(name, *args, **kwargs)

        monkeypatch.setattr(h5py, "File", counting)


def test_cache_is_used_on_reopen_and_invalidated_by_changes(multicoil_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache" / "dataset_cache.pkl"
    opens = _CountingOpens(monkeypatch)
    first = SliceDataset(multicoil_dir, dataset_cache_file=cache)
    assert sorted(opens.opened) == ["file_a.h5", "file_b.h5", "file_c.h5", "file_d.h5"]
    assert cache.exists()

    opens.opened.clear()
    second = SliceDataset(multicoil_dir, dataset_cache_file=cache)
    assert opens.opened == []  # nothing re-read
    assert [s[:2] for s in second.raw_samples] == [s[:2] for s in first.raw_samples]
    assert_same_samples(second, first)

    # a changed file (more slices) and a new file are re-read; the others come from the cache
    write_volume(multicoil_dir / "file_b.h5", num_slices=5, coils=4, width=24, seed=11)
    write_volume(multicoil_dir / "file_e.h5", num_slices=2, coils=4, width=24, seed=12)
    opens.opened.clear()
    third = SliceDataset(multicoil_dir, dataset_cache_file=cache)
    assert sorted(opens.opened) == ["file_b.h5", "file_e.h5"]
    assert len(third) == 10 - 3 + 5 + 2

    # a removed file disappears without any re-read
    opens.opened.clear()
    (multicoil_dir / "file_a.h5").unlink()
    fourth = SliceDataset(multicoil_dir, dataset_cache_file=cache)
    assert opens.opened == [] and len(fourth) == 14 - 2

    # use_dataset_cache=False always scans
    opens.opened.clear()
    SliceDataset(multicoil_dir, dataset_cache_file=cache, use_dataset_cache=False)
    assert len(opens.opened) == 4

    # stale entries for rewritten files are pruned
    with open(cache, "rb") as f:
        entries = pickle.load(f)["entries"]
    assert sum(Path(key[0][0]).name == "file_b.h5" for key in entries) == 1


@pytest.mark.parametrize(("content", "message"), [
    (b"not a pickle", "unreadable dataset cache"),
    # names a module this Python lacks (numpy 2 -> numpy 1 home cache)
    (b"cnumpy._core_of_another_numpy\nscalar\n.", "unreadable dataset cache"),
    (b"K\x01)R.", "unreadable dataset cache"),  # damaged: calls an int (TypeError)
    # truncated (a write cut short, e.g. by a full disk, by a writer that was not atomic)
    (pickle.dumps({"version": 6, "entries": {"a": 1}})[:-5], "unreadable dataset cache"),
    (pickle.dumps({"version": 6, "entries": ["not", "a", "dict"]}), "dataset cache .* of another format"),
])
def test_unreadable_cache_is_rebuilt(content, message, multicoil_dir, tmp_path, caplog):
    cache = tmp_path / "cache.pkl"
    cache.write_bytes(content)
    with caplog.at_level(logging.WARNING):
        ours = SliceDataset(multicoil_dir, dataset_cache_file=cache)
    assert len(ours) == 10 and re.search(message, caplog.text)
    assert len(SliceDataset(multicoil_dir, dataset_cache_file=cache)) == 10


def test_datasets_scanning_at_once_keep_each_others_cache_entries(tmp_path, monkeypatch):
    """Two datasets scanning other files into one cache file at once (DDP ranks, two training runs) each read the
    cache, scanned and wrote back what they had read plus their own files: the last writer dropped the other's
    entries, rescanned next time (gapfix audit). The write now merges into the file on disk under a lock file."""
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        write_volume(tmp_path / split / f"{split}.h5", num_slices=2, coils=2)
    cache = tmp_path / "cache.pkl"
    both_read_the_cache = threading.Barrier(2, timeout=30)
    real_read_volume_info = slice_dataset.read_volume_info

    def read_volume_info(*args, **kwargs):
        both_read_the_cache.wait()
        return real_read_volume_info(*args, **kwargs)

    monkeypatch.setattr(slice_dataset, "read_volume_info", read_volume_info)
    with ThreadPoolExecutor(2) as pool:
        datasets = list(pool.map(lambda split: SliceDataset(tmp_path / split, dataset_cache_file=cache), ("train", "val")))
    assert [len(dataset) for dataset in datasets] == [2, 2]
    with open(cache, "rb") as f:
        entries = pickle.load(f)["entries"]
    assert sorted(Path(key[0][0]).name for key in entries) == ["train.h5", "val.h5"]


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.ENOSYS])
def test_cache_is_written_where_the_file_system_has_no_locks(code, tmp_path, caplog, monkeypatch):
    """flock fails with "No locks available" on NFSv3 without lockd and "Function not implemented" on Lustre
    mounted noflock: the cache, written without a lock before the merge under flock, was never written there,
    each run rescanning with a warning (review41). It is now merged without the lock."""
    (tmp_path / "data").mkdir()
    write_volume(tmp_path / "data" / "a.h5", num_slices=2, coils=2)

    def flock(fd, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(slice_dataset, "fcntl", SimpleNamespace(flock=flock, LOCK_EX=fcntl.LOCK_EX))
    cache = tmp_path / "cache.pkl"
    with caplog.at_level(logging.WARNING):
        assert len(SliceDataset(tmp_path / "data", dataset_cache_file=cache)) == 2
    assert "could not write dataset cache" not in caplog.text
    with open(cache, "rb") as f:
        assert [Path(key[0][0]).name for key in pickle.load(f)["entries"]] == ["a.h5"]


def test_a_cache_that_cannot_be_pickled_is_not_written(tmp_path, caplog, monkeypatch):
    """A value pickle refuses among the sample metadata (an HDF5 reference attr did, before file_attrs left them
    out): the TypeError ended the dataset, though the cache is only a speed-up."""
    (tmp_path / "data").mkdir()
    write_volume(tmp_path / "data" / "a.h5", num_slices=2, coils=2)

    def refuse(obj, file):
        raise TypeError("cannot pickle 'h5py.h5r.Reference' object")

    monkeypatch.setattr(pickle, "dump", refuse)
    cache = tmp_path / "cache.pkl"
    with caplog.at_level(logging.WARNING):
        ours = SliceDataset(tmp_path / "data", dataset_cache_file=cache)
    assert len(ours) == 2 and "could not write dataset cache" in caplog.text and not cache.exists()


def test_hdf5_reference_attrs_are_left_out_so_the_dataset_pickles_for_spawned_workers(tmp_path):
    """HDF5 object / region references among a file's attrs (alone or in an array) mean nothing without the open
    file, and pickle refuses them: a DataLoader whose workers start by spawn or forkserver (macOS, Windows, Python
    3.14's Linux default), which pickles the dataset into each worker, failed at its first batch ("no default
    __reduce__"), a sample tuple holding them could not come back from any worker, and the cache was not written."""
    (tmp_path / "data").mkdir()
    path = write_volume(tmp_path / "data" / "ref.h5", num_slices=2, coils=2)
    with h5py.File(path, "a") as hf:
        hf.attrs["source"] = hf["kspace"].ref
        hf.attrs["region"] = hf["kspace"].regionref[0:1]
        hf.attrs.create("sources", [hf["kspace"].ref] * 2, dtype=h5py.ref_dtype)
    cache = tmp_path / "cache.pkl"
    dataset = SliceDataset(tmp_path / "data", dataset_cache_file=cache)
    assert cache.exists()
    in_worker = pickle.loads(pickle.dumps(dataset))  # what a spawned worker receives
    sample = pickle.loads(pickle.dumps(in_worker[1]))  # and what it sends back
    assert not {"source", "region", "sources"} & set(sample[3]) and sample[3]["max"] == dataset[1][3]["max"]
    assert np.array_equal(sample[0], dataset[1][0])


@pytest.mark.parametrize("use_cache", [True, False])
def test_bad_files_raise_or_are_skipped_with_a_warning(use_cache, multicoil_dir, tmp_path, caplog):
    bad = _bad_files(tmp_path / "bad")
    names = ("empty", "text", "truncated", "no_kspace", "garbled_header", "target_slices", "external_link", "bad_heap")
    for name in names:
        path, _ = bad[name]
        (multicoil_dir / f"zz_{name}.h5").write_bytes(path.read_bytes())
    cache = tmp_path / "cache.pkl"

    with pytest.raises(DataError) as err:
        SliceDataset(multicoil_dir, dataset_cache_file=cache, use_dataset_cache=use_cache)
    assert Path(err.value.path).name.startswith("zz_")
    # one error names every bad file with its problem, so one run finds them all
    assert "and 7 more bad file(s)" in str(err.value) and "skip_bad_files" in str(err.value)
    for name in names:
        assert f"zz_{name}.h5: " in str(err.value) and bad[name][1] in str(err.value), name

    for _ in range(2):  # second time from the cache when enabled: bad files are still reported
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            ours = SliceDataset(multicoil_dir, dataset_cache_file=cache, use_dataset_cache=use_cache, skip_bad_files=True)
        assert len(ours) == 10
        assert sorted({s.fname.name for s in ours.raw_samples}) == ["file_a.h5", "file_b.h5", "file_c.h5", "file_d.h5"]
        for name in names:
            assert f"zz_{name}.h5: " in caplog.text and bad[name][1] in caplog.text, name
        with pytest.raises(DataError):
            SliceDataset(multicoil_dir, dataset_cache_file=cache, use_dataset_cache=use_cache)


def test_file_broken_after_scan_raises_data_error_on_read(multicoil_dir, tmp_path):
    ours = SliceDataset(multicoil_dir, dataset_cache_file=tmp_path / "cache.pkl")
    path = multicoil_dir / "file_a.h5"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError, match="truncated or corrupt") as err:
        ours[0]
    assert err.value.path == str(path)


def test_file_locked_by_a_writer_is_not_called_corrupt(tmp_path, monkeypatch):
    """HDF5 refuses to open a file another process holds open for writing; that was reported as 'truncated or
    corrupt'. An exclusive flock on the file is what such a writer holds."""
    monkeypatch.delenv("HDF5_USE_FILE_LOCKING", raising=False)
    path = write_volume(tmp_path / "busy.h5", num_slices=2, coils=2)
    with open(path, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(DataError, match="locked: another process has it open for writing") as err:
            read_volume_info(path)
    assert err.value.path == str(path) and "corrupt" not in err.value.problem
    assert read_volume_info(path).num_slices == 2


def test_an_unreadable_file_is_a_bad_file_named_with_its_problem(multicoil_dir, monkeypatch, caplog):
    """h5py.is_hdf5 raises PermissionError for a file without read permission: that ended the whole scan in a
    PermissionError traceback, with skip_bad_files too."""
    locked = multicoil_dir / "zz_locked.h5"
    locked.write_bytes((multicoil_dir / "file_a.h5").read_bytes())
    real_is_hdf5 = h5py.is_hdf5

    def is_hdf5(name):  # what h5py raises for a chmod 000 file (root, running tests in containers, reads it anyway)
        if Path(name) == locked:
            raise PermissionError(13, f"Unable to determine if file is accessible as hdf5 (unable to open file: name = "
                                      f"'{locked}', errno = 13, error message = 'Permission denied', flags = 0)")
        return real_is_hdf5(name)

    monkeypatch.setattr(h5py, "is_hdf5", is_hdf5)
    with pytest.raises(DataError, match="zz_locked.h5: cannot read the file: Permission denied; skip_bad_files"):
        SliceDataset(multicoil_dir, use_dataset_cache=False)
    with caplog.at_level(logging.WARNING):
        ours = SliceDataset(multicoil_dir, use_dataset_cache=False, skip_bad_files=True)
    assert len(ours) == 10 and "zz_locked.h5: cannot read the file: Permission denied" in caplog.text


def test_bad_root(tmp_path):
    with pytest.raises(DataError, match="dataset root not found"):
        SliceDataset(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="challenge"):
        SliceDataset(tmp_path, challenge="dualcoil")


def test_complex128_kspace_and_float64_target_are_cast(tmp_path):
    """A valid file written with numpy's default dtypes gives the promised complex64 / float32 samples (float64
    tensors had reached the float32 model weights: 'expected scalar type Double but found Float' mid-training)."""
    path = write_volume(tmp_path / "c128.h5", width=25, seed=7)
    with h5py.File(path, "a") as hf:
        kspace, target = hf["kspace"][()], hf["reconstruction_rss"][()]
        del hf["kspace"], hf["reconstruction_rss"]
        hf.create_dataset("kspace", data=kspace.astype(np.complex128))
        hf.create_dataset("reconstruction_rss", data=target.astype(np.float64))
    sample = SliceDataset(tmp_path, use_dataset_cache=False)[1]
    assert sample[0].dtype == np.complex64 and sample[2].dtype == np.float32
    np.testing.assert_array_equal(sample[0], kspace[1])


def test_a_small_file_declaring_more_than_the_memory_is_refused_before_reading(tmp_path, monkeypatch):
    """A file of a few KB can declare petabytes of k-space (chunks never written, which HDF5 reads as zeros, or
    compressed zeros): read_volume and SliceDataset allocated what it declared, a MemoryError or, where it fit in
    the machine's memory, gigabytes filled with zeros. They refuse it before reading, naming the file and sizes."""
    path = write_volume(tmp_path / "bomb.h5", num_slices=2, with_target=False)
    with h5py.File(path, "a") as hf:
        del hf["kspace"]
        hf.create_dataset("kspace", shape=(2, 2**16, 2**16, 2**16), dtype=np.complex64, chunks=(1, 1, 64, 64))
    assert path.stat().st_size < 100_000
    with pytest.raises(DataError, match=r"bomb\.h5: reading 'kspace' \(2, 65536, 65536, 65536\) complex64 takes "
                                        r"4\.19e\+06 GiB, more than the .* GiB of memory available"):
        read_volume(path)
    with pytest.raises(DataError, match=r"bomb\.h5: reading one slice of 'kspace' .* takes 2\.1e\+06 GiB"):
        SliceDataset(tmp_path, use_dataset_cache=False)[0]
    # a target without the 'max' attr: the scan reads its slices for their maximum
    (tmp_path / "scan").mkdir()
    scan = write_volume(tmp_path / "scan" / "target_bomb.h5", num_slices=2)
    with h5py.File(scan, "a") as hf:
        del hf["reconstruction_rss"], hf.attrs["max"]
        hf.create_dataset("reconstruction_rss", shape=(2, 2**24, 2**24), dtype=np.float32, chunks=(1, 64, 64))
    with pytest.raises(DataError, match=r"target_bomb\.h5: reading one slice of 'reconstruction_rss' "):
        SliceDataset(scan.parent, use_dataset_cache=False)
    small = write_volume(tmp_path / "small.h5")  # 3 x 4 x 32 x 24 complex64 + 3 x 16 x 16 float32: 76,800 bytes
    monkeypatch.setattr("reconkit.data.volume.available_memory", lambda: 50_000)
    with pytest.raises(DataError, match=r"small\.h5: reading 'kspace' .* \+ 'reconstruction_rss' \(3, 16, 16\) "
                                        r"float32 takes 7\.15e-05 GiB, more than the 4\.66e-05 GiB"):
        read_volume(small)


def test_slice_with_nan_or_inf_raises_data_error_naming_file_and_slice(tmp_path):
    """The scan reads no array data, so a NaN / inf value used to reach the transform unnoticed (a NaN loss and NaN
    weights in training, a NaN volume written by ``reconkit train predict``); clean slices still read normally."""
    path = write_volume(tmp_path / "nan.h5", num_slices=3, coils=2, seed=8)
    with h5py.File(path, "a") as hf:
        hf["kspace"][1, 0, 5, 7] = np.nan + 0j
        target = hf["reconstruction_rss"][()]
        target[2, 3, 4] = np.inf
        hf["reconstruction_rss"][...] = target
    dataset = SliceDataset(tmp_path, use_dataset_cache=False)
    assert np.isfinite(dataset[0][0]).all() and np.isfinite(dataset[0][2]).all()
    with pytest.raises(DataError, match=r"slice 1: 'kspace' holds 1 NaN / inf values \(first at index \(0, 5, 7\)\)"):
        dataset[1]
    with pytest.raises(DataError, match=r"slice 2: 'reconstruction_rss' holds 1 NaN / inf values") as err:
        dataset[2]
    assert err.value.path == str(path)


def test_one_element_array_attrs_are_scalars(tmp_path):
    """Attributes stored as one-element arrays (MATLAB's scalars) reached the samples as arrays: a batch mixing such a
    file with a fastMRI one failed in the collate ('stack expects each tensor to be equal size') with no file name."""
    write_volume(tmp_path / "a.h5", num_slices=1, coils=2, seed=9)
    path = write_volume(tmp_path / "b.h5", num_slices=1, coils=2, seed=10)
    with h5py.File(tmp_path / "a.h5") as first, h5py.File(path, "a") as hf:
        maxima = [first.attrs["max"], hf.attrs["max"]]
        for key in ("max", "norm"):
            hf.attrs[key] = np.array([hf.attrs[key]])
        hf.attrs["acquisition"] = np.array([b"AXT2"])
    dataset = SliceDataset(tmp_path, transform=VarNetDataTransform(), use_dataset_cache=False)
    assert default_collate([dataset[0], dataset[1]]).max_value.tolist() == maxima
    attrs = SliceDataset(tmp_path, use_dataset_cache=False)[1][3]
    assert np.ndim(attrs["max"]) == 0 and np.ndim(attrs["norm"]) == 0 and attrs["acquisition"] == b"AXT2"


@pytest.mark.parametrize("value", ["0.25", np.nan, 0.0])
def test_a_max_attr_that_is_no_positive_number_is_a_bad_file(value, tmp_path):
    """It is the loss scale and the PSNR / SSIM data range: a string failed in the training step without a file name
    ("'tuple' object has no attribute 'to'"), NaN or 0 turned the loss and the weights into NaN."""
    write_volume(tmp_path / "good.h5", num_slices=1, coils=2, seed=11)
    path = write_volume(tmp_path / "odd_max.h5", num_slices=1, coils=2, seed=12)
    with h5py.File(path, "a") as hf:
        hf.attrs["max"] = value
    with pytest.raises(DataError, match=f"'max' attr is {value!r}; expected") as err:
        SliceDataset(tmp_path, use_dataset_cache=False)
    assert err.value.path == str(path)
    assert {s.fname.name for s in SliceDataset(tmp_path, use_dataset_cache=False, skip_bad_files=True).raw_samples} == {
        "good.h5"
    }
