"""MRAugment-style augmentation (reconkit.data.augment): physics consistency, geometry, seeding, schedule, wiring."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reconkit.data import VarNetDataTransform, create_mask_for_mask_type
from reconkit.data.augment import (
    AugmentConfig,
    AugmentedVarNetTransform,
    AugmentParams,
    augment_coil_images,
    augmentation_probability,
    sample_augmentation,
)
from reconkit.data.simulate import simulate_dataset
from reconkit.data.transforms import center_crop, to_tensor
from reconkit.errors import ConfigError, DataError
from reconkit.ops import fft2c, ifft2c, rss_complex
from reconkit.training import FastMriDataModule

ALWAYS = {"probability": 1.0, "schedule": "constant"}


def fake_slice(coils: int = 3, height: int = 24, width: int = 17, crop: tuple[int, int] = (12, 11), seed: int = 0):
    """A fully sampled slice as SliceDataset returns it: smooth object × coil phases, odd width."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:height, :width]
    obj = np.exp(-(((y - height / 2) / (height / 4)) ** 2 + ((x - width / 2) / (width / 3)) ** 2))
    phases = np.exp(1j * rng.uniform(0, 2 * np.pi, (coils, 1, 1)))
    coil_images = obj * phases * (1 + 0.3 * rng.standard_normal((coils, height, width)))
    kspace = fft2c(to_tensor(coil_images.astype(np.complex64)))
    kspace = torch.view_as_complex(kspace.contiguous()).numpy()
    target = center_crop(rss_complex(ifft2c(to_tensor(kspace)), dim=0), crop).numpy()
    attrs = {"padding_left": 0, "padding_right": width, "recon_size": (crop[0], crop[1], 1), "max": float(target.max())}
    return kspace, None, target, attrs, "vol_a.h5", 3


def test_augmented_target_is_rss_of_augmented_coil_images_and_kspace_their_fft():
    kspace, mask, target, attrs, fname, slice_num = fake_slice()
    transform = AugmentedVarNetTransform(config=ALWAYS, seed=5)
    new_kspace, new_target = transform.augment(kspace, target, fname, slice_num, p=1.0)
    # redo the augmentation independently from the same draw
    params = sample_augmentation(transform.config, 1.0, transform.rng(fname, slice_num), kspace.shape[-2:])
    assert params != AugmentParams()  # something was applied
    images = augment_coil_images(ifft2c(to_tensor(kspace)), params)
    torch.testing.assert_close(to_tensor(new_kspace), fft2c(images), rtol=1e-5, atol=1e-6)
    augmented_images = ifft2c(to_tensor(new_kspace))
    torch.testing.assert_close(to_tensor(new_target), center_crop(rss_complex(augmented_images, dim=0), target.shape),
                               rtol=1e-4, atol=1e-6)
    assert not np.allclose(new_target, target, atol=1e-3)

    sample = transform(kspace, mask, target, attrs, fname, slice_num)  # the undersampled model input
    torch.testing.assert_close(sample.masked_kspace, to_tensor(new_kspace) * sample.mask, rtol=0, atol=0)
    torch.testing.assert_close(sample.target, to_tensor(new_target), rtol=0, atol=0)
    assert sample.mask.sum() < sample.mask.numel()  # really undersampled


def test_kspace_narrower_than_the_recon_size_keeps_the_target_shape():
    """fastMRI brain FLAIR 203: the k-space is narrower than the recon size (and the stored target). The augmented
    target keeps the target's shape, the augmented RSS in the image's columns and zeros outside, which the loss
    and metrics crop away as they crop the model output (a ValueError from center_crop before)."""
    kspace, mask, target, attrs, fname, slice_num = fake_slice(width=9, crop=(12, 9))
    wide = np.pad(target, ((0, 0), (1, 1)))  # a 12 x 11 target, 2 columns wider than the image
    attrs = {**attrs, "recon_size": (12, 11, 1)}
    transform = AugmentedVarNetTransform(config=ALWAYS, seed=5)
    new_kspace, new_target = transform.augment(kspace, wide, fname, slice_num, p=1.0)
    assert new_target.shape == wide.shape and not new_target[:, [0, -1]].any()
    augmented_images = ifft2c(to_tensor(new_kspace))
    torch.testing.assert_close(to_tensor(new_target[:, 1:-1]),
                               center_crop(rss_complex(augmented_images, dim=0), (12, 9)), rtol=1e-4, atol=1e-6)
    sample = transform(kspace, mask, wide, attrs, fname, slice_num)
    torch.testing.assert_close(sample.target, to_tensor(new_target), rtol=0, atol=0)


def test_probability_zero_is_the_plain_transform():
    kspace, mask, target, attrs, fname, slice_num = fake_slice()
    for config in ({"probability": 0.0}, {"probability": 0.55, "schedule": "linear", "ramp_length": 10}):  # epoch 0
        transform = AugmentedVarNetTransform(config=config, seed=1, use_seed=True)
        plain = VarNetDataTransform(create_mask_for_mask_type("equispaced_fraction", [0.08], [4]), use_seed=True)
        ours, theirs = transform(kspace, mask, target, attrs, fname, slice_num), plain(kspace, mask, target, attrs,
                                                                                        fname, slice_num)
        for a, b in zip(ours, theirs):
            if torch.is_tensor(a):
                assert torch.equal(a, b)
            else:
                assert a == b


def test_deterministic_given_seed_and_changes_with_epoch_and_seed():
    kspace, mask, target, attrs, fname, slice_num = fake_slice()

    def run(seed: int, epoch: int):
        transform = AugmentedVarNetTransform(config=ALWAYS, seed=seed, use_seed=True)
        transform.set_epoch(epoch)
        return transform(kspace, mask, target, attrs, fname, slice_num).target

    assert torch.equal(run(3, 0), run(3, 0))
    assert not torch.equal(run(3, 0), run(3, 1))
    assert not torch.equal(run(3, 0), run(4, 0))


def test_exact_geometry_flips_turns_and_affine_against_index_operations():
    images = torch.randn(2, 6, 10, 2)  # non-square
    assert torch.equal(augment_coil_images(images, AugmentParams(fliph=True)), images.flip(-2))
    assert torch.equal(augment_coil_images(images, AugmentParams(flipv=True)), images.flip(-3))
    assert torch.equal(augment_coil_images(images, AugmentParams(rot90=2)), torch.rot90(images, 2, dims=(-3, -2)))
    # a 90° turn of a non-square field of view is centre-cropped / zero-padded back to (H, W)
    turned = augment_coil_images(images, AugmentParams(rot90=1))
    assert turned.shape == images.shape
    torch.testing.assert_close(turned[:, :, 2:8], torch.rot90(images, 1, dims=(-3, -2))[:, 2:8])
    assert torch.equal(turned[:, :, :2], torch.zeros_like(turned[:, :, :2]))
    # affine path: pixel-exact cases (aspect ratio handled: 180° of a non-square image is a double flip)
    torch.testing.assert_close(augment_coil_images(images, AugmentParams(rotation=180.0)), images.flip(-2).flip(-3))
    square = torch.randn(2, 8, 8, 2)
    torch.testing.assert_close(augment_coil_images(square, AugmentParams(rotation=90.0)),
                               torch.rot90(square, 3, dims=(-3, -2)))
    shifted = augment_coil_images(images, AugmentParams(translation=(1.0, 2.0)), padding="zeros")
    torch.testing.assert_close(shifted[:, 1:, 2:], images[:, :-1, :-2])
    torch.testing.assert_close(shifted[:, :1], torch.zeros_like(shifted[:, :1]), rtol=0, atol=1e-6)
    zoomed = augment_coil_images(square, AugmentParams(scale=(2.0, 2.0)))
    assert zoomed.shape == square.shape and not torch.allclose(zoomed, square)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_interpolation_keeps_complex_phase(interpolation):
    magnitude = torch.zeros(1, 16, 15)
    magnitude[:, 4:12, 4:11] = 1.0
    phase = 0.7
    images = torch.stack([magnitude * math.cos(phase), magnitude * math.sin(phase)], dim=-1)
    params = AugmentParams(rotation=23.0, scale=(1.1, 0.9), shear=(5.0, -3.0), translation=(0.5, -1.2))
    out = augment_coil_images(images, params, interpolation=interpolation, padding="zeros")
    inside = out.norm(dim=-1) > 0.2
    assert inside.sum() > 20
    angles = torch.atan2(out[..., 1], out[..., 0])[inside]
    torch.testing.assert_close(angles, torch.full_like(angles, phase), rtol=0, atol=1e-4)


def test_schedules_and_weights():
    constant = AugmentConfig(probability=0.5, schedule="constant")
    linear = AugmentConfig(probability=0.5, schedule="linear", ramp_length=10)
    exp = AugmentConfig(probability=0.5, schedule="exp", ramp_length=10, exp_rate=5.0)
    assert augmentation_probability(constant, 0) == 0.5
    assert [augmentation_probability(linear, t) for t in (0, 5, 10, 20)] == [0.0, 0.25, 0.5, 0.5]
    assert augmentation_probability(exp, 0) == 0.0 and augmentation_probability(exp, 10) == pytest.approx(0.5)
    assert augmentation_probability(exp, 5) == pytest.approx(0.5 * (1 - math.exp(-2.5)) / (1 - math.exp(-5)))
    step = AugmentedVarNetTransform(config={"probability": 0.5, "schedule": "linear", "schedule_unit": "step",
                                                "ramp_length": 100})
    step.set_step(50)
    assert step.probability() == pytest.approx(0.25)
    # a zero weight never fires; weight 1 with p = 1 always fires
    config = AugmentConfig(probability=1.0, schedule="constant", weights={"fliph": 1.0})
    rng = np.random.default_rng(0)
    draws = [sample_augmentation(config, 1.0, rng, (8, 8)) for _ in range(50)]
    assert all(d.fliph for d in draws) and not any(d.flipv or d.rot90 or d.rotation for d in draws)
    # frequency follows weight · p
    config = AugmentConfig(probability=1.0, weights={"flipv": 0.5})
    hits = sum(sample_augmentation(config, 0.6, rng, (8, 8)).flipv for _ in range(4000))
    assert abs(hits / 4000 - 0.3) < 0.03


def test_bad_configuration_is_rejected():
    with pytest.raises(ValueError, match="probability"):
        AugmentConfig(probability=1.5)
    with pytest.raises(ValueError, match="schedule"):
        AugmentConfig(schedule="cosine")
    with pytest.raises(ValueError, match="unknown augmentation weights"):
        AugmentConfig(weights={"elastic": 1.0})
    with pytest.raises(ValueError, match="images must be"):
        augment_coil_images(torch.zeros(4, 4, 2), AugmentParams())
    # each was taken: exp_rate 0 divided by zero at the first sample, a NaN ramp or weight switched augmentation off
    # without a word, a NaN angle was numpy's OverflowError, a one-number translation an IndexError, max_scaling 1
    # drew scale factors near 0 (a collapsed image)
    for options, problem in (({"exp_rate": 0.0}, r"exp_rate must be a finite number other than 0.*got 0.0"),
                             ({"ramp_length": math.nan}, r"ramp_length must be a finite number > 0, got nan"),
                             ({"weights": {"rotation": math.nan}}, r"weights\['rotation'\] must be a finite number"),
                             ({"max_rotation": math.nan}, r"max_rotation must be a finite number >= 0, got nan"),
                             ({"max_shearing": math.inf}, r"max_shearing must be a finite number >= 0, got inf"),
                             ({"max_translation": (0.1,)}, r"max_translation must be \(y, x\) fractions"),
                             ({"max_translation": (0.1, -0.1)}, r"max_translation must be a finite number >= 0"),
                             ({"max_scaling": 1.0}, r"max_scaling must be below 1.*got 1.0")):
        with pytest.raises(ConfigError, match=problem):
            AugmentConfig(**options)
    assert AugmentConfig(schedule="linear", exp_rate=0.0).exp_rate == 0.0  # only the exp schedule divides by it
    kspace, _, target, _, fname, slice_num = fake_slice()
    with pytest.raises(DataError, match=r"vol_a.h5: augmentation needs \(C, H, W\) or single-coil \(H, W\)"):
        AugmentedVarNetTransform(config=ALWAYS).augment(kspace[None], target, fname, slice_num, 1.0)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("augment_data")
    simulate_dataset(root, num_volumes=3, coils=3, slices=2, encoded_size=(48, 36), recon_size=(24, 24),
                     split=(2, 1, 0), seed=1, progress=False)
    return root


def test_datamodule_hook_sets_epoch_and_subsets_are_reproducible(tiny_data):
    transform = AugmentedVarNetTransform(config={"probability": 1.0, "schedule": "linear", "ramp_length": 4}, seed=2)
    module = FastMriDataModule(tiny_data, num_workers=0, train_transform=transform, fraction=0.5, seed=7)
    loader = module.train_dataloader()
    assert len(loader.dataset) == 2  # one of two volumes, both its slices
    loader.sampler.set_epoch(0)
    first = [batch.target.clone() for batch in loader]
    loader.sampler.set_epoch(2)
    later = [batch.target.clone() for batch in loader]
    assert transform.epoch == 2 and transform.probability() == pytest.approx(0.5)  # the data module's hook
    loader.sampler.set_epoch(0)
    again = [batch.target.clone() for batch in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # reproducible per epoch
    again_names = [b.fname[0] for b in FastMriDataModule(tiny_data, num_workers=0, fraction=0.5,
                                                         seed=7).train_dataloader()]
    assert len(set(again_names)) == 1
    assert not all(torch.equal(a, b) for a, b in zip(first, later))


class StepProbe(AugmentedVarNetTransform):
    """Records the schedule position each sample was drawn at (from the dataloader's own process)."""

    def __call__(self, kspace, mask, target, attrs, fname, slice_num):
        sample = super().__call__(kspace, mask, target, attrs, fname, slice_num)
        return sample._replace(slice_num=(self.epoch, self.step, self.probability()))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_step_schedule_follows_the_training_batches_in_the_data_module(tiny_data, num_workers):
    """schedule_unit "step" under reconkit train: every sample knows its batch's step (4 slices, batches of 2:
    steps 0, 1 in epoch 0 and 2, 3 in epoch 1), also inside dataloader workers, so the ramp advances per step."""
    config = {"probability": 0.8, "schedule": "linear", "schedule_unit": "step", "ramp_length": 4}
    module = FastMriDataModule(tiny_data, num_workers=num_workers, train_transform=StepProbe(config=config),
                               batch_size=2)
    loader = module.train_dataloader()
    seen = []
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        seen += [sorted({(int(e), int(s), round(float(p), 6)) for e, s, p in zip(*batch.slice_num)})
                 for batch in loader]
    assert seen == [[(0, 0, 0.0)], [(0, 1, 0.2)], [(1, 2, 0.4)], [(1, 3, 0.6)]]


@pytest.mark.parametrize("limit", [1, 0.5])
def test_step_schedule_counts_the_batches_run_under_limit_train_batches(tiny_data, limit):
    """With ``limit_train_batches`` (1 or half of the 2 batches per epoch) the schedule's step is the optimizer
    step: 0, 1, 2 over three epochs (it had counted the batches left out too: steps 0, 2, 4)."""
    from lightning.pytorch import Callback, Trainer

    from reconkit.training import VarNetModule

    class Steps(Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.seen.append((trainer.global_step, sorted({int(step) for _, step, _ in zip(*batch.slice_num)})))

    config = {"probability": 0.8, "schedule": "linear", "schedule_unit": "step", "ramp_length": 4}
    module = FastMriDataModule(tiny_data, num_workers=0, train_transform=StepProbe(config=config), batch_size=2)
    steps = Steps()
    trainer = Trainer(accelerator="cpu", max_epochs=3, limit_train_batches=limit, limit_val_batches=0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[steps])
    trainer.fit(VarNetModule(num_cascades=1, chans=2, pools=1, sens_chans=2, sens_pools=1), datamodule=module)
    assert steps.seen == [(0, [0]), (1, [1]), (2, [2])]


def test_stored_masks_and_single_coil_files():
    """A file with a stored mask is undersampled already: its mask is kept and its k-space is not augmented (there
    is no fully sampled image), even at p = 1. Single-coil (H, W) k-space is augmented as one coil."""
    kspace, _, target, attrs, fname, slice_num = fake_slice()
    stored = np.zeros(kspace.shape[-1], dtype=np.float32)
    stored[::3] = stored[7:10] = 1
    transform = AugmentedVarNetTransform(config=ALWAYS, seed=5)
    sample = transform(kspace * stored, stored, target, attrs, fname, slice_num)
    assert torch.equal(sample.mask.reshape(-1), torch.from_numpy(stored).bool())
    torch.testing.assert_close(sample.masked_kspace, to_tensor(kspace * stored), rtol=0, atol=0)
    assert np.array_equal(sample.target.numpy(), target)
    single = kspace[0]
    new_kspace, new_target = transform.augment(single, target, fname, slice_num, p=1.0)
    coil_kspace, coil_target = transform.augment(single[None], target, fname, slice_num, p=1.0)
    assert new_kspace.shape == single.shape and np.array_equal(new_kspace, coil_kspace[0])
    assert np.array_equal(new_target, coil_target)


def test_training_files_without_targets_are_refused_at_setup_with_augmentation(tiny_data, tmp_path):
    """Augmentation needs every training file's target: one without is named at setup, before any training (it
    had failed at its batch with 'this batch has no target images', no file named, and skip_bad_files kept it).
    SSDU trains without targets, so its training files need none."""
    import shutil

    import h5py

    from reconkit.data.ssdu import SsduVarNetTransform

    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    no_target = sorted((root / "train").glob("*.h5"))[0]
    with h5py.File(no_target, "r+") as f:
        del f["reconstruction_rss"]
    module = FastMriDataModule(root, num_workers=0, train_transform=AugmentedVarNetTransform(config=ALWAYS))
    with pytest.raises(DataError, match=rf"{no_target.name}: no target \('reconstruction_rss'\) in the 'train' split"):
        module.setup("fit")
    FastMriDataModule(root, num_workers=0, train_transform=SsduVarNetTransform()).setup("fit")


def test_training_transform_must_match_the_data_module(tiny_data):
    """A k-space training transform with the image-crop default would train and validate on different inputs: an
    error. A training mask family other than the data module's (which validation uses) is a warning."""
    from reconkit.data.ssdu import SsduVarNetTransform
    from reconkit.errors import ConfigError, ReconkitWarning

    for transform in (AugmentedVarNetTransform(), SsduVarNetTransform()):
        with pytest.raises(ConfigError, match="use data.transform varnet"):
            FastMriDataModule(tiny_data, transform="unet", train_transform=transform)
    with pytest.warns(ReconkitWarning, match=r"draws \('EquispacedMaskFractionFunc', \[0.08\], \[4.0\]\) masks but "
                                             r"data.\* \(validation, test\) \('RandomMaskFunc', \[0.04\], \[8.0\]\)"):
        FastMriDataModule(tiny_data, mask_type="random", center_fractions=[0.04], accelerations=[8],
                          train_transform=SsduVarNetTransform())
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FastMriDataModule(tiny_data, train_transform=AugmentedVarNetTransform())  # the same family: silent


def test_yaml_config_builds_the_augmented_training_transform(tiny_data, tmp_path):
    from pathlib import Path

    from reconkit.training.cli import run_cli

    config = Path(__file__).resolve().parents[1] / "configs" / "varnet_sim_small_augment.yaml"
    cli = run_cli(["--config", str(config), "--data.data_path", str(tiny_data),
                   "--trainer.default_root_dir", str(tmp_path)], run=False)
    transform = cli.datamodule.transform_overrides["train"]
    assert isinstance(transform, AugmentedVarNetTransform)
    assert transform.config.schedule == "exp" and transform.config.probability == 0.55
    assert transform.config.weights["translation"] == 1.0 and transform.mask_func.accelerations == [4]
    assert cli.datamodule.transform_overrides["val"] is None  # validation stays un-augmented
