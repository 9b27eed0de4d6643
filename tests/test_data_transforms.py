"""Transforms produce the same tensors as fastmri.data.transforms (fastmri 0.3.0) for the same inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fastmri.data import subsample as fastmri_subsample
from fastmri.data import transforms as fastmri_transforms

from reconkit.data import masks, transforms
from reconkit.errors import DataError


def _kspace(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


def _attrs(height, width, recon=(16, 16), padding=(1, None), max_value=3.5):
    left, right = padding
    return {
        "encoding_size": (height, width, 1),
        "recon_size": (*recon, 1),
        "padding_left": left,
        "padding_right": width - 1 if right is None else right,
        "max": max_value,
        "acquisition": "CORPD_FBK",
    }


def test_to_tensor_and_apply_mask():
    kspace = _kspace((4, 32, 25))
    ours, theirs = transforms.to_tensor(kspace), fastmri_transforms.to_tensor(kspace)
    assert ours.shape == (4, 32, 25, 2) and torch.equal(ours, theirs)
    real = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert torch.equal(transforms.to_tensor(real), fastmri_transforms.to_tensor(real))

    for family in ("RandomMaskFunc", "EquispacedMaskFractionFunc", "MagicMaskFunc"):
        for padding in (None, (2, 21)):
            got = transforms.apply_mask(ours, getattr(masks, family)([0.08], [4]), seed=(1, 2), padding=padding)
            want = fastmri_transforms.apply_mask(
                theirs, getattr(fastmri_subsample, family)([0.08], [4]), seed=(1, 2), padding=padding
            )
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] == want[2]
            assert got[1].shape == (1, 1, 25, 1)
            assert not torch.signbit(got[0][..., got[1][0, 0, :, 0] == 0, :]).any()  # no -0.0 left


def test_apply_mask_allocates_one_kspace_sized_tensor_in_one_vectorised_product():
    """The masked k-space is the one new tensor: ``data * mask + 0.0`` made a second, k-space-sized one for the sum
    (per training sample; ``torch.profiler`` counts the allocations). And the product's mask is repeated along the
    (real, imag) axis: broadcast along that axis of 2, the product ran unvectorised, ~3x slower. The values are
    fastmri's (above)."""
    from torch.profiler import ProfilerActivity, profile

    kspace = torch.randn(4, 32, 24, 2)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
        transforms.apply_mask(kspace, masks.EquispacedMaskFractionFunc([0.08], [4]), seed=0)
    allocated = sum(event.cpu_memory_usage for event in prof.events() if event.cpu_memory_usage > 0)
    assert kspace.nbytes <= allocated < 2 * kspace.nbytes, allocated / kspace.nbytes
    products = [event.input_shapes for event in prof.events() if event.name == "aten::mul"]
    assert products == [[[4, 32, 24, 2], [1, 1, 24, 2]]], products


def test_apply_mask_refuses_complex_or_numpy_kspace():
    """A complex (C, H, W) tensor was masked along H (its W read as the (real, imag) axis): 12 of 16 readout rows
    zeroed, every phase-encode column kept, no error."""
    kspace = torch.randn(3, 16, 12, dtype=torch.complex64)
    for data, got in ((kspace, r"torch.complex64 \(3, 16, 12\)"), (torch.view_as_real(kspace).numpy(), "ndarray"),
                      (kspace.real, r"torch.float32 \(3, 16, 12\)")):
        with pytest.raises(ValueError, match=rf"apply_mask: data must be a real tensor \(\.\.\., H, W, 2\).*got {got}"):
            transforms.apply_mask(data, masks.RandomMaskFunc([0.25], [4]), seed=1)


def test_crops_and_normalisation():
    image = torch.randn(3, 17, 12)
    complex_image = torch.randn(3, 17, 12, 2)
    for size in ((17, 12), (9, 5), (4, 11), (1, 1)):
        assert torch.equal(transforms.center_crop(image, size), fastmri_transforms.center_crop(image, size))
        assert torch.equal(
            transforms.complex_center_crop(complex_image, size), fastmri_transforms.complex_center_crop(complex_image, size)
        )
    for bad in ((18, 12), (0, 4)):
        with pytest.raises(ValueError, match="cannot crop"):
            transforms.center_crop(image, bad)
        with pytest.raises(ValueError, match="cannot crop"):
            transforms.complex_center_crop(complex_image, bad)
    other = torch.randn(2, 11, 15)
    for got, want in zip(
        transforms.center_crop_to_smallest(image, other), fastmri_transforms.center_crop_to_smallest(image, other)
    ):
        assert torch.equal(got, want) and got.shape[-2:] == (11, 12)

    assert torch.equal(transforms.normalize(image, 0.5, 2.0, 1e-3), fastmri_transforms.normalize(image, 0.5, 2.0, 1e-3))
    for got, want in zip(
        transforms.normalize_instance(image, eps=1e-11), fastmri_transforms.normalize_instance(image, eps=1e-11)
    ):
        assert torch.equal(got, want)


def _assert_same_varnet(got, want):
    assert type(got).__name__ == type(want).__name__ == "VarNetSample"
    assert got._fields == want._fields
    assert torch.equal(got.masked_kspace, want.masked_kspace)
    assert got.mask.dtype == want.mask.dtype == torch.bool and torch.equal(got.mask, want.mask)
    assert torch.equal(got.target, want.target)
    assert (got.num_low_frequencies, got.fname, got.slice_num, got.max_value, got.crop_size) == (
        want.num_low_frequencies,
        want.fname,
        want.slice_num,
        want.max_value,
        want.crop_size,
    )


@pytest.mark.parametrize("family", ["RandomMaskFunc", "EquiSpacedMaskFunc", "EquispacedMaskFractionFunc", "MagicMaskFractionFunc"])
@pytest.mark.parametrize("coils,height,width", [(4, 32, 24), (3, 30, 25), (1, 20, 33)])
def test_varnet_transform_with_mask_func(family, coils, height, width):
    kspace = _kspace((coils, height, width), seed=coils)
    target = np.random.default_rng(1).random((16, 16)).astype(np.float32)
    attrs = _attrs(height, width, padding=(2, width - 2))
    ours = transforms.VarNetDataTransform(getattr(masks, family)([0.08, 0.04], [4, 8]))
    theirs = fastmri_transforms.VarNetDataTransform(getattr(fastmri_subsample, family)([0.08, 0.04], [4, 8]))
    for fname, slice_num in (("file1000001.h5", 0), ("file1000001.h5", 7), ("file_b.h5", 2)):
        got = ours(kspace, None, target, attrs, fname, slice_num)
        _assert_same_varnet(got, theirs(kspace, None, target, attrs, fname, slice_num))
        assert got.mask.shape == (1, 1, width, 1)
        assert not got.mask[..., :2, :].any() and not got.mask[..., width - 2 :, :].any()  # padding zeroed
    # same file name -> same mask for every slice (use_seed)
    assert torch.equal(ours(kspace, None, target, attrs, "f.h5", 0).mask, ours(kspace, None, target, attrs, "f.h5", 5).mask)


def test_varnet_transform_with_file_mask_and_without_target():
    kspace = _kspace((4, 32, 24), seed=3)
    file_mask = (np.random.default_rng(3).random(24) < 0.4).astype(np.float32)
    attrs = _attrs(32, 24, padding=(1, 22))
    got = transforms.VarNetDataTransform()(kspace, file_mask, None, attrs, "file_test.h5", 4)
    want = fastmri_transforms.VarNetDataTransform()(kspace, file_mask, None, attrs, "file_test.h5", 4)
    _assert_same_varnet(got, want)
    assert got.num_low_frequencies == 0 and got.max_value == 0.0 and got.target.ndim == 0


def test_varnet_transform_keeps_a_single_coil_file_mask_inside_the_acquired_window():
    """fastmri's transform zeroes a single-coil stored mask entirely (its padding hits the last axis of (1, W, 1))."""
    kspace = _kspace((32, 24), seed=4)
    file_mask = (np.random.default_rng(4).random(24) < 0.4).astype(np.float32)
    got = transforms.VarNetDataTransform()(kspace, file_mask, None, _attrs(32, 24, padding=(1, 22)), "f.h5", 0)
    want = file_mask.copy()
    want[:1], want[22:] = 0, 0
    assert got.mask.shape == (1, 24, 1) and want.any()
    np.testing.assert_array_equal(got.mask.reshape(24).numpy(), want.astype(bool))


def test_varnet_transform_fully_sampled_without_any_mask():
    kspace = _kspace((2, 16, 12))
    sample = transforms.VarNetDataTransform()(kspace, None, None, _attrs(16, 12, recon=(8, 8), padding=(0, 12)), "f.h5", 0)
    assert sample.mask.shape == (1, 1, 12, 1) and sample.mask.all()
    assert torch.equal(sample.masked_kspace, transforms.to_tensor(kspace))


@pytest.mark.parametrize("transform", [transforms.VarNetDataTransform(), transforms.UnetDataTransform("multicoil")])
def test_transforms_need_max_with_target(transform):
    """The U-Net transform took a missing 'max' as 0.0 (as fastmri's): PSNR -inf and an SSIM of constants 0 (NaN
    on flat windows) in validation, for a converted dataset without the attr, instead of an error naming the file."""
    attrs = _attrs(16, 12, recon=(8, 8))
    del attrs["max"]
    with pytest.raises(DataError, match="f.h5: file attrs lack 'max'"):
        transform(_kspace((2, 16, 12)), None, np.zeros((8, 8), np.float32), attrs, "f.h5", 0)


def _assert_same_unet(got, want):
    assert type(got).__name__ == type(want).__name__ == "UnetSample" and got._fields == want._fields
    # reconkit.ops.ifft2c and fastmri.ifft2c are computed differently (sign modulation vs rolls): float32 rounding
    torch.testing.assert_close(got.image, want.image, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.target, want.target, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.mean, want.mean, rtol=1e-5, atol=0)
    torch.testing.assert_close(got.std, want.std, rtol=1e-5, atol=0)
    assert (got.fname, got.slice_num, got.max_value) == (want.fname, want.slice_num, want.max_value)


@pytest.mark.parametrize("challenge,shape", [("multicoil", (4, 32, 24)), ("multicoil", (3, 31, 25)), ("singlecoil", (32, 24))])
@pytest.mark.parametrize("with_mask_func", [False, True])
@pytest.mark.parametrize("with_target", [False, True])
def test_unet_transform_matches_fastmri(challenge, shape, with_mask_func, with_target):
    kspace = _kspace(shape, seed=7)
    target = np.random.default_rng(7).random((14, 16)).astype(np.float32) if with_target else None
    attrs = _attrs(shape[-2], shape[-1], recon=(16, 12))
    ours = transforms.UnetDataTransform(challenge, masks.RandomMaskFunc([0.08], [4]) if with_mask_func else None)
    theirs = fastmri_transforms.UnetDataTransform(
        challenge, fastmri_subsample.RandomMaskFunc([0.08], [4]) if with_mask_func else None
    )
    got = ours(kspace, None, target, attrs, "file1.h5", 3)
    _assert_same_unet(got, theirs(kspace, None, target, attrs, "file1.h5", 3))
    assert got.image.shape == ((14, 16) if with_target else (16, 12))


def test_unet_transform_narrow_kspace_crop_and_missing_max():
    """k-space narrower than the recon size (fastMRI brain FLAIR 203): square crop to the k-space width."""
    kspace = _kspace((2, 40, 10))
    attrs = _attrs(40, 10, recon=(16, 16))
    del attrs["max"]
    got = transforms.UnetDataTransform("multicoil")(kspace, None, None, attrs, "f.h5", 0)
    want = fastmri_transforms.UnetDataTransform("multicoil")(kspace, None, None, attrs, "f.h5", 0)
    _assert_same_unet(got, want)
    assert got.image.shape == (10, 10) and got.max_value == 0.0
    with pytest.raises(ValueError, match="Challenge"):
        transforms.UnetDataTransform("dualcoil")
